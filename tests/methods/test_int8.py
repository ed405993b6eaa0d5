"""Int8 base weights through bitsandbytes, on CPU: accuracy, memory, int8 + LoRA training, adapters, errors."""
import sys

import pytest
import torch
from conftest import SPELLING

from finetune import Engine, TrainConfig
from finetune.methods import apply_method
from finetune.methods.adapters import load_adapter, save_adapter
from finetune.methods.int8 import Int8Linear, prepare_int8_training, quantize_int8
from finetune.methods.lora import apply_lora, lora_layers, merge_lora
from finetune.models import tiny_bart

pytest.importorskip("bitsandbytes")


def model_and_inputs(seed=0):
    model, tok = tiny_bart(d_model=128, layers=2, seed=seed)
    enc = tok(["teh cat sat on the mat", "adress"], padding=True, return_tensors="pt")
    batch = {**enc, "decoder_input_ids": torch.tensor([[2, 5, 6, 7, 8], [2, 8, 9, 10, 11]])}
    return model.eval(), tok, batch


def logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


def test_int8_linear_round_trip_and_repr():
    linear = torch.nn.Linear(64, 32)
    q = Int8Linear(linear)
    assert q.weight.dtype == torch.int8
    step = float(linear.weight.abs().max()) / 127  # one int8 step of the largest row scale
    torch.testing.assert_close(q.dequantize().weight, linear.weight, atol=step, rtol=0)
    x = torch.randn(4, 64)
    assert relative_error(q(x), linear(x)) < 0.02
    assert "int8 weight + float32 row scales, outlier threshold=6.0 (CUDA)" in repr(q)


def test_quantised_bart_logits_close_and_weights_smaller():
    model, _, batch = model_and_inputs()
    reference = logits(model, batch)
    report = quantize_int8(model)
    assert report.replaced == 2 * 6 + 2 * 10  # per encoder layer q,k,v,o,fc1,fc2; per decoder layer also cross q,k,v,o
    assert report.bytes_before >= 3 * report.bytes_after
    assert not isinstance(model.lm_head, Int8Linear)  # the LM head stays float
    err = relative_error(logits(model, batch), reference)
    assert 0 < err < 0.02, err
    # a broken quantisation (rows scaled by the wrong row's scale) cannot pass that bound
    broken, _, _ = model_and_inputs()
    quantize_int8(broken)
    for m in broken.modules():
        if isinstance(m, Int8Linear):
            scales = m.scales()
            scales.copy_(scales[torch.randperm(len(scales), generator=torch.Generator().manual_seed(0))] * 4)
    assert relative_error(logits(broken, batch), reference) > 0.1


def test_skip_patterns():
    model, _, _ = model_and_inputs()
    report = quantize_int8(model, skip=[r"decoder"])
    assert report.replaced == 2 * 4 + 2 * 2
    assert isinstance(model.model.decoder.layers[0].fc1, torch.nn.Linear)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_int8_lora_trains_only_adapters(tmp_path, checkpointing):
    model, tok, _ = model_and_inputs()
    apply_method(model, "int8-lora", lora_r=8, lora_alpha=16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    int8_before = {n: b.clone() for n, b in model.state_dict().items() if b.dtype == torch.int8}
    cfg = TrainConfig(lr=1e-2, progress=False, output_dir=str(tmp_path), grad_checkpointing=checkpointing)
    engine = Engine(model, tok, cfg)
    if checkpointing:
        engine.enable_checkpointing()
    history = engine.overfit_batch(SPELLING, steps=40)
    assert history[-1]["loss"] < history[0]["loss"] * 0.8
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".lora_" in n for n in changed)
    for n, b in model.state_dict().items():
        if n in int8_before:
            assert torch.equal(b, int8_before[n])


def test_adapter_over_fresh_int8_base_reproduces_logits(tmp_path):
    model, tok, batch = model_and_inputs()
    apply_method(model, "int8-lora", lora_r=4, lora_alpha=8)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.05)
    expected = logits(model, batch)
    save_adapter(model, str(tmp_path))
    fresh, _, _ = model_and_inputs()
    quantize_int8(fresh)
    prepare_int8_training(fresh)
    load_adapter(fresh, str(tmp_path))
    torch.testing.assert_close(logits(fresh, batch), expected, atol=0, rtol=0)


def test_merge_lora_on_int8_base_dequantises(tmp_path):
    model, tok, batch = model_and_inputs()
    quantize_int8(model)
    apply_lora(model, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.05)
    adapted = logits(model, batch)
    layer = next(iter(lora_layers(model).values()))
    with pytest.raises(TypeError, match=r"cannot merge into a quantised base weight \(torch.int8\)"):
        layer.merge()
    merged = merge_lora(model)
    assert not any(isinstance(m, Int8Linear) for m in merged.modules() if m.__class__.__name__ == "LoRALinear")
    assert relative_error(logits(merged, batch), adapted) < 0.02  # int8 (with outliers) vs dequantised weights


def test_missing_bitsandbytes_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match=r"int8 base weights need bitsandbytes.*pip install -e '\.\[int8\]'"):
        Int8Linear(torch.nn.Linear(4, 4))


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_cpu_forward_is_the_dequantised_matmul_in_training_and_evaluation(dtype):
    """On CPU the weight is rebuilt from its codes for each matmul (bitsandbytes' own CPU training path), in the
    autocast dtype when autocast is on; evaluation computes what training computes, and the input gets the
    gradient of that same matmul."""
    torch.manual_seed(0)
    q = Int8Linear(torch.nn.Linear(64, 48))
    ref = q.dequantize()
    x = torch.randn(3, 5, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
        out_train = q.train()(x)
        want = ref(x)
        with torch.no_grad():
            out_eval = q.eval()(x)
    assert out_train.dtype == want.dtype == (dtype or torch.float32)
    torch.testing.assert_close(out_eval, out_train, rtol=0, atol=0)
    tol = dict(rtol=0, atol=1e-5) if dtype is None else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out_train, want, **tol)
    grad = torch.randn_like(out_train)
    (got,) = torch.autograd.grad(out_train, x, grad)
    (expected,) = torch.autograd.grad(want, x, grad)
    torch.testing.assert_close(got, expected, **tol)
    if dtype is None:  # fp32: the same numbers as bitsandbytes' CPU training matmul
        torch.testing.assert_close(out_train, q.train().inner(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_bf16_autocast_leaves_the_float32_bias_untouched(input_dtype):
    """bitsandbytes' Linear8bitLt casts its bias to the input's dtype in place (`bias.data = ...`), which would
    round the frozen bias to bf16 for good (and the saved model's with it)."""
    q = Int8Linear(torch.nn.Linear(16, 8))
    bias = q.bias.detach().clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q(torch.randn(2, 16, dtype=input_dtype))
    assert q.bias.dtype == torch.float32 and torch.equal(q.bias, bias)
