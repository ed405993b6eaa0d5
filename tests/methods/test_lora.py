"""LoRA: zero update at init, merge/unmerge, PEFT parity and format round trips, training touches only adapters."""
import pytest
import torch
from conftest import SPELLING, build

from finetune import Engine, TrainConfig
from finetune.methods.adapters import load_adapter, save_adapter
from finetune.methods.lora import LoRALinear, apply_lora, lora_layers, merge_lora

TARGETS = {"bart": ["q_proj", "v_proj"], "t5": ["q", "v"], "bert2bert": ["query", "value"]}


def inputs(tok):
    enc = tok(["teh cat", "adress"], padding=True, return_tensors="pt")
    return {**enc, "decoder_input_ids": torch.tensor([[2, 5, 6, 7], [2, 8, 9, 10]])}


def logits(model, tok):
    model.eval()
    with torch.no_grad():
        return model(**inputs(tok)).logits


def randomise_b(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)


@pytest.mark.parametrize("family", ["bart", "t5", "bert2bert"])
def test_zero_update_at_init_and_defaults(family):
    model, tok = build(family)
    before = logits(model, tok)
    wrapped = apply_lora(model)  # per-family default targets
    assert wrapped and all(name.rsplit(".", 1)[-1] in TARGETS[family] for name in wrapped)
    assert torch.equal(logits(model, tok), before)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


@pytest.mark.parametrize("family, dora", [("bart", False), ("bart", True), ("t5", True), ("bert2bert", True)])
def test_merge_unmerge_round_trip(family, dora):
    model, tok = build(family)
    apply_lora(model, r=4, alpha=8, dora=dora)
    randomise_b(model)
    if dora:  # magnitudes off their initial row norms
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora_magnitude_vector.weight.mul_(1.1)
    layer = next(iter(lora_layers(model).values()))
    original = layer.base_layer.weight.clone()
    adapted = logits(model, tok)
    for m in lora_layers(model).values():
        m.merge()
    torch.testing.assert_close(logits(model, tok), adapted, atol=1e-5, rtol=0)
    for m in lora_layers(model).values():
        m.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, original, atol=1e-6, rtol=0)
    # float32 rounding of W -> merged -> W: about one ulp of the logits (1.2e-6 on an Intel Xeon, T5 + DoRA)
    torch.testing.assert_close(logits(model, tok), adapted, atol=2e-6, rtol=0)
    merge_lora(model)  # the plain layers back, the update folded in
    assert not lora_layers(model)
    torch.testing.assert_close(logits(model, tok), adapted, atol=1e-5, rtol=0)


def test_rslora_scaling():
    layer = LoRALinear(torch.nn.Linear(8, 8), r=16, alpha=32, rslora=True)
    assert layer.scaling == pytest.approx(32 / 4)
    assert LoRALinear(torch.nn.Linear(8, 8), r=16, alpha=32).scaling == 2.0


def test_no_match_is_an_error():
    model, _ = build("bart")
    with pytest.raises(ValueError, match=r"\['nothing'\] match no linear layer"):
        apply_lora(model, targets=[r"q_proj", "nothing"])


def peft_model(family, model):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS[family],
                             task_type="SEQ_2_SEQ_LM")
    return peft.get_peft_model(model, config)


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_output_parity_with_peft(family):
    ours, tok = build(family)
    apply_lora(ours, targets=[rf"\.({'|'.join(TARGETS[family])})$"], r=4, alpha=8, dropout=0.0)
    randomise_b(ours)
    theirs = peft_model(family, build(family)[0])
    state = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if ".lora_" in name:
                key = "base_model.model." + name.replace(".weight", ".default.weight")
                state[key].copy_(p)
    diff = (logits(ours, tok) - logits(theirs, tok)).abs().max()
    assert diff < 1e-5


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_peft_export_loads_in_peft(tmp_path, family):
    peft = pytest.importorskip("peft")
    ours, tok = build(family)
    apply_lora(ours, targets=[rf"\.({'|'.join(TARGETS[family])})$"], r=4, alpha=8, dropout=0.0)
    randomise_b(ours)
    save_adapter(ours, str(tmp_path), format="peft")
    theirs = peft.PeftModel.from_pretrained(build(family)[0], str(tmp_path))
    torch.testing.assert_close(logits(theirs, tok), logits(ours, tok), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_peft_adapter_imports_into_our_layers(tmp_path, family):
    theirs = peft_model(family, build(family)[0])
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    theirs.save_pretrained(str(tmp_path))
    _, tok = build(family)
    ours, _ = build(family)
    loaded = load_adapter(ours, str(tmp_path))
    assert loaded and lora_layers(ours)
    torch.testing.assert_close(logits(ours, tok), logits(theirs, tok), atol=1e-5, rtol=0)


def test_own_format_round_trip_with_also_train(tmp_path):
    model, tok = build("bert2bert")
    apply_lora(model, r=4, alpha=8, also_train=[r"crossattention"])
    randomise_b(model)
    with torch.no_grad():
        model.decoder.bert.encoder.layer[0].crossattention.output.dense.bias.fill_(0.5)
    save_adapter(model, str(tmp_path))
    fresh, _ = build("bert2bert")
    load_adapter(fresh, str(tmp_path))
    torch.testing.assert_close(logits(fresh, tok), logits(model, tok), atol=0, rtol=0)
    assert fresh.decoder.bert.encoder.layer[0].crossattention.output.dense.bias.requires_grad


def test_merge_lora_saves_a_plain_model(tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    model, tok = build("bart")
    apply_lora(model, r=4, alpha=8)
    randomise_b(model)
    adapted = logits(model, tok)
    merged = merge_lora(model)
    assert not lora_layers(merged)
    merged.save_pretrained(str(tmp_path))
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(str(tmp_path))
    torch.testing.assert_close(logits(reloaded, tok), adapted, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["bart", "t5", "bert2bert"])
def test_training_changes_only_lora_and_also_train(tmp_path, family):
    model, tok = build(family)
    also = [r"crossattention"] if family == "bert2bert" else []
    apply_lora(model, r=4, alpha=8, also_train=also)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = Engine(model, tok, TrainConfig(lr=1e-2, progress=False, output_dir=str(tmp_path)))
    engine.overfit_batch(SPELLING, steps=3)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(".lora_B." in n for n in changed) and any(".lora_A." in n for n in changed)
    assert all(".lora_" in n or "crossattention" in n for n in changed), changed - {n for n in changed if ".lora_" in n}


def test_optimizer_holds_state_only_for_trainable_tensors(tmp_path):
    model, tok = build("bart")
    apply_lora(model, r=4, alpha=8)
    engine = Engine(model, tok, TrainConfig(progress=False, output_dir=str(tmp_path)))
    optimizer, _ = engine.build_optimizer(10, 0)
    held = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(held) == sum(1 for _, p in model.named_parameters() if p.requires_grad)
    assert all(p.requires_grad for p in held)
