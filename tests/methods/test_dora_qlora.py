"""DoRA (parity with PEFT's use_dora, merge, adapters) and 4-bit base weights (bitsandbytes Linear4bit, QLoRA)."""
import copy
import json
import os

import pytest
import torch
from conftest import SPELLING, build
from test_lora import TARGETS

from finetune import Engine, TrainConfig, load_seq2seq
from finetune.methods import apply_method
from finetune.methods.adapters import load_adapter, save_adapter
from finetune.methods.lora import LoRALinear, apply_lora, lora_layers

peft = pytest.importorskip("peft")


def batch_of(tok):
    enc = tok(["teh cat sat", "adress"], padding=True, return_tensors="pt")
    return {**enc, "labels": torch.tensor([[5, 6, 7, 8], [8, 9, 10, 11]])}


def logits(model, tok):
    model.eval()
    with torch.no_grad():
        return model(**batch_of(tok)).logits


def ours_and_peft(family, dropout=0.0, r=4, alpha=8):
    ours, tok = build(family)
    theirs = copy.deepcopy(ours)
    apply_lora(ours, targets=[rf"\.({'|'.join(TARGETS[family])})$"], r=r, alpha=alpha, dropout=dropout, dora=True)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=TARGETS[family],
                             use_dora=True, task_type="SEQ_2_SEQ_LM")
    theirs = peft.get_peft_model(theirs, config)
    return ours, theirs, tok


def peft_name(name):
    return "base_model.model." + name.replace(".weight", ".default.weight")


def randomise(ours, theirs=None, seed=1):
    """Random B (A is random already) and magnitudes moved off their initial norms, the same in both models."""
    g = torch.Generator().manual_seed(seed)
    state = dict(theirs.named_parameters()) if theirs is not None else {}
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif ".lora_magnitude_vector." in name:
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))
            if theirs is not None and ".lora_" in name:
                state[peft_name(name)].copy_(p)


@pytest.mark.parametrize("family", ["bart", "t5", "bert2bert"])
def test_dora_output_and_gradients_equal_peft(family):
    ours, theirs, tok = ours_and_peft(family)
    # at init the output is unchanged and the magnitudes are PEFT's (the base's row norms)
    state = dict(theirs.named_parameters())
    magnitudes = [(name, p) for name, p in ours.named_parameters() if ".lora_magnitude_vector." in name]
    assert magnitudes
    for name, p in magnitudes:
        assert torch.equal(p, state[peft_name(name)]), name
    randomise(ours, theirs)
    for model in (ours, theirs):
        model.train()
    out_ours, out_theirs = ours(**batch_of(tok)), theirs(**batch_of(tok))
    assert (out_ours.logits - out_theirs.logits).abs().max() < 1e-5
    out_ours.loss.backward()
    out_theirs.loss.backward()
    trainable = [(n, p) for n, p in ours.named_parameters() if p.requires_grad]
    assert any("magnitude" in n for n, _ in trainable)
    for name, p in trainable:
        theirs_grad = state[peft_name(name)].grad
        assert (p.grad - theirs_grad).abs().max() <= 1e-5 * max(1.0, float(theirs_grad.abs().max())), name


def test_dora_with_dropout_equals_peft_in_training():
    """With dropout active PEFT takes the base term from the dropped input too; same random draws, same result."""
    ours, theirs, tok = ours_and_peft("bart", dropout=0.3)
    randomise(ours, theirs)
    ours.train(), theirs.train()
    torch.manual_seed(5)
    a = ours(**batch_of(tok))
    torch.manual_seed(5)
    b = theirs(**batch_of(tok))
    assert (a.logits - b.logits).abs().max() < 1e-5
    a.loss.backward(), b.loss.backward()
    state = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        if p.requires_grad:
            g = state[peft_name(name)].grad
            assert (p.grad - g).abs().max() <= 1e-5 * max(1.0, float(g.abs().max())), name


def test_dora_weight_norm_is_the_direct_norm_and_follows_the_base():
    layer = LoRALinear(torch.nn.Linear(32, 16), r=4, alpha=8, dora=True)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.3)
    direct = torch.linalg.norm(layer.base_layer.weight + layer.delta_weight(), dim=1)
    torch.testing.assert_close(layer.weight_norm(), direct, atol=1e-6, rtol=1e-6)
    with torch.no_grad():  # the cached ||W||^2 is refreshed when the base weight changes in place
        layer.base_layer.weight.mul_(2)
    direct = torch.linalg.norm(layer.base_layer.weight + layer.delta_weight(), dim=1)
    torch.testing.assert_close(layer.weight_norm(), direct, atol=1e-6, rtol=1e-6)
    assert not layer.weight_norm().requires_grad


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_dora_adapter_ours_to_peft_and_back(tmp_path, family):
    ours, tok = build(family)
    apply_lora(ours, targets=[rf"\.({'|'.join(TARGETS[family])})$"], r=4, alpha=8, dropout=0.0, dora=True)
    randomise(ours)
    save_adapter(ours, str(tmp_path / "peft"), format="peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    theirs = peft.PeftModel.from_pretrained(build(family)[0], str(tmp_path / "peft"))
    torch.testing.assert_close(logits(theirs, tok), logits(ours, tok), atol=1e-5, rtol=0)
    # PEFT's own save, back into our layers (and our format round trip)
    theirs.save_pretrained(str(tmp_path / "theirs"))
    again, _ = build(family)
    load_adapter(again, str(tmp_path / "theirs"))
    assert all(m.dora for m in lora_layers(again).values())
    torch.testing.assert_close(logits(again, tok), logits(theirs, tok), atol=1e-5, rtol=0)
    save_adapter(again, str(tmp_path / "ours"))
    third, _ = build(family)
    load_adapter(third, str(tmp_path / "ours"))
    assert torch.equal(logits(third, tok), logits(again, tok))


def test_dora_adapter_into_plain_lora_layers_is_refused(tmp_path):
    model, _ = build("bart")
    apply_lora(model, targets=[r"\.(q_proj|v_proj)$"], r=4, alpha=8, dora=True)
    save_adapter(model, str(tmp_path))
    plain, _ = build("bart")
    apply_lora(plain, targets=[r"\.(q_proj|v_proj)$"], r=4, alpha=8)
    before = {n: p.clone() for n, p in plain.state_dict().items()}
    with pytest.raises(ValueError, match="the adapter is DoRA and the model's LoRA layers are not"):
        load_adapter(plain, str(tmp_path))
    assert all(torch.equal(before[n], p) for n, p in plain.state_dict().items())


def test_dora_and_quant_settings_checked():
    model, _ = build("bart")
    with pytest.raises(ValueError, match="dora must be true or false"):
        apply_lora(model, dora="yes")
    with pytest.raises(ValueError, match="quant_type"):
        apply_method(build("bart")[0], "qlora", quant_type="nf5")
    with pytest.raises(ValueError, match="key 'double_quant' has int 1, expected true or false"):
        apply_method(build("bart")[0], "qlora", double_quant=1)


# ----- 4-bit base weights -------------------------------------------------------------------------------------

bnb = pytest.importorskip("bitsandbytes")
from finetune.methods.int4 import Int4Linear, quantize_4bit  # noqa: E402


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_int4_linear_equals_bitsandbytes_and_is_close_to_float(quant_type, double_quant):
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128)
    ours = Int4Linear(linear, quant_type=quant_type, double_quant=double_quant)
    reference = bnb.nn.Linear4bit(256, 128, bias=True, compress_statistics=double_quant, quant_type=quant_type,
                                  device="cpu")
    reference.weight = bnb.nn.Params4bit(linear.weight.detach().clone(), requires_grad=False,
                                         compress_statistics=double_quant, quant_type=quant_type, module=reference)
    reference.bias = torch.nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    reference = reference.to("cpu")
    x = torch.randn(8, 256)
    assert torch.equal(ours(x), reference(x))
    assert torch.equal(ours.inner.weight.data, reference.weight.data)
    assert torch.equal(ours.weight, reference.weight.data.view(torch.int8))  # read as int8 (Int4Linear.weight)
    # within 4-bit's expected error: each weight is rounded to the nearest of 16 codes (times its block's absmax),
    # so its error is at most half the widest gap between codes, times the absmax (plus the absmax's own 8-bit
    # rounding under double quantisation); on a Gaussian-like layer the output error is then ~10% of its size
    code = ours.inner.weight.quant_state.code.float().sort().values
    bound = 0.5 * float(code.diff().max()) * (1.02 if double_quant else 1.0) + 1e-6
    weight = ours.dequantized_weight()
    blocks = linear.weight.detach().reshape(-1, 64)
    err = (weight.reshape(-1, 64) - blocks).abs().amax(dim=1) / blocks.abs().amax(dim=1)
    assert float(err.max()) <= bound, (float(err.max()), bound)
    rel = float((ours(x) - linear(x)).norm() / linear(x).norm())
    assert 0 < rel < (0.15 if quant_type == "nf4" else 0.25), rel
    assert f"{quant_type} 4-bit weight" in repr(ours)


def test_4bit_weights_take_at_most_a_sixth_and_lm_head_stays_float():
    from finetune.models import tiny_bart

    model, _ = tiny_bart(d_model=256, layers=2)  # layers big enough that the per-layer code tables do not dominate
    report = quantize_4bit(model)
    assert report.bytes_after * 6 <= report.bytes_before, str(report)
    assert type(model.lm_head) is torch.nn.Linear
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.dim() == 1)
    layers = [m for m in model.modules() if isinstance(m, Int4Linear)]
    assert len(layers) == report.replaced and report.replaced > 0


def test_4bit_eval_forward_is_the_training_arithmetic():
    """bitsandbytes' CPU inference path would repack the weight in place and compute in bf16; ours never does."""
    torch.manual_seed(0)
    layer = Int4Linear(torch.nn.Linear(128, 64))
    x = torch.randn(4, 128)
    train_out = layer.train()(x)
    with torch.no_grad():
        eval_out = layer.eval()(x)
    assert torch.equal(train_out, eval_out)
    assert not getattr(layer.inner.weight.quant_state, "packing_format_for_cpu", False)


def test_4bit_bf16_compute_leaves_the_float_bias_as_it_was():
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 64)
    layer = Int4Linear(linear, compute_dtype=torch.bfloat16)
    x = torch.randn(4, 128)
    out = layer(x)
    assert layer.bias.dtype == torch.float32 and torch.equal(layer.bias, linear.bias)
    reference = torch.nn.functional.linear(x.bfloat16(), layer.dequantized_weight().bfloat16()).float() + linear.bias
    torch.testing.assert_close(out, reference, atol=1e-2, rtol=1e-2)
    assert torch.equal(layer.dequantize().bias, linear.bias)


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("quantize", ["int8", "4bit"])
def test_lora_and_dora_over_quantised_bases_start_unchanged(quantize, dora):
    model, tok = build("bart")
    if quantize == "int8":
        from finetune.methods.int8 import quantize_int8
        quantize_int8(model)
    else:
        quantize_4bit(model)
    before = logits(model, tok)
    apply_lora(model, targets=[r"\.(q_proj|v_proj)$"], r=4, alpha=8, dora=dora)
    torch.testing.assert_close(logits(model, tok), before, atol=1e-5, rtol=1e-5)
    if dora:  # the magnitude starts at the dequantised base's row norms
        layer = next(iter(lora_layers(model).values()))
        norms = torch.linalg.norm(layer.base_layer.dequantized_weight(), dim=1)
        torch.testing.assert_close(layer.lora_magnitude_vector.weight, norms)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_qlora_trains_only_adapters(tmp_path, checkpointing):
    from finetune.models import tiny_bart

    model, tok = tiny_bart(d_model=128, layers=2)
    apply_method(model, "qlora", lora_r=8, lora_alpha=16)
    assert any(isinstance(m, Int4Linear) for m in model.modules())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    frozen = {n: t.clone() for n, t in model.state_dict().items() if t.dtype == torch.uint8}
    engine = Engine(model, tok, TrainConfig(lr=1e-2, progress=False, output_dir=str(tmp_path),
                                            grad_checkpointing=checkpointing))
    if checkpointing:
        engine.enable_checkpointing()
    history = engine.overfit_batch(SPELLING, steps=40)
    assert history[-1]["loss"] < history[0]["loss"] * 0.8, [h["loss"] for h in history]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".lora_" in n for n in changed)
    assert all(torch.equal(frozen[n], t) for n, t in model.state_dict().items() if n in frozen)


def test_qlora_run_saves_a_plain_float_model(tmp_path):
    model, tok = build("bart")
    apply_method(model, "qlora", lora_r=8, lora_alpha=16)
    cfg = TrainConfig(lr=1e-2, progress=False, output_dir=str(tmp_path), max_steps=5, batch_size=4)
    Engine(model, tok, cfg).fit(SPELLING)
    trained = logits(model, tok)
    reloaded, _ = load_seq2seq(os.path.join(str(tmp_path), "model"))
    assert not any(isinstance(m, (Int4Linear, LoRALinear)) for m in reloaded.modules())
    # the float model computes with the dequantised 4-bit weights: equal up to float rounding
    torch.testing.assert_close(logits(reloaded, tok), trained, atol=1e-4, rtol=1e-4)


def test_dora_run_saves_a_merged_plain_model(tmp_path):
    model, tok = build("t5")
    apply_method(model, "dora", lora_r=8, lora_alpha=16)
    cfg = TrainConfig(lr=1e-2, progress=False, output_dir=str(tmp_path), max_steps=5, batch_size=4,
                      precision="fp32")
    Engine(model, tok, cfg).fit(SPELLING)
    trained = logits(model, tok)
    reloaded, _ = load_seq2seq(os.path.join(str(tmp_path), "model"))
    torch.testing.assert_close(logits(reloaded, tok), trained, atol=1e-5, rtol=1e-5)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config.get("use_dora", config.get("dora")) is True


def test_qlora_adapter_round_trip_on_a_fresh_4bit_base(tmp_path):
    """An adapter trained on a 4-bit base, saved in PEFT format, loads into a freshly quantised copy of the same
    base and gives the same logits (quantisation is deterministic)."""
    model, tok = build("bart")
    quantize_4bit(model)
    apply_lora(model, targets=[r"\.(q_proj|v_proj)$"], r=4, alpha=8, dora=True)
    randomise(model)
    save_adapter(model, str(tmp_path), format="peft")
    fresh, _ = build("bart")
    quantize_4bit(fresh)
    load_adapter(fresh, str(tmp_path))
    assert torch.equal(logits(fresh, tok), logits(model, tok))
