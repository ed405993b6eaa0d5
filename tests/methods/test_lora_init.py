"""lora_init: default and gaussian equal PEFT's at the same seed; PiSSA equal to PEFT's (A, B, residual base) and
saved against the original base (PeftModel and the engine reload it to the same outputs); LoftQ reduces what the
4-bit codes lose and equals PEFT's algorithm (bitsandbytes' codes + its low-rank decomposition) at alpha = r."""
import pytest
import torch
from conftest import build
from test_lora import logits, randomise_b

from finetune.methods import apply_method
from finetune.methods.adapters import load_adapter, save_adapter
from finetune.methods.lora import apply_lora, lora_layers

peft = pytest.importorskip("peft")


def theirs_with(init, r=4, alpha=8, family="t5"):
    model = build(family)[0]
    torch.manual_seed(7)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=["q", "v"],
                             init_lora_weights=init, task_type="SEQ_2_SEQ_LM")
    return peft.get_peft_model(model, config)


def ours_with(init, r=4, alpha=8):
    model, tok = build("t5")
    torch.manual_seed(7)
    apply_lora(model, targets=[r"\.(q|v)$"], r=r, alpha=alpha, dropout=0.0, init=init)
    return model, tok


def peft_tensor(theirs, name, part):
    return dict(theirs.named_parameters())[f"base_model.model.{name}.{part}.default.weight"]


@pytest.mark.parametrize("ours_init, peft_init", [("default", True), ("gaussian", "gaussian")])
def test_default_and_gaussian_starts_equal_peft_at_the_same_seed(ours_init, peft_init):
    ours, _ = ours_with(ours_init)
    theirs = theirs_with(peft_init)
    for name, layer in lora_layers(ours).items():
        torch.testing.assert_close(layer.lora_A.weight, peft_tensor(theirs, name, "lora_A"), atol=0, rtol=0)
        assert not layer.lora_B.weight.any()


def test_pissa_equals_peft_and_leaves_the_output_unchanged():
    base = logits(build("t5")[0], build("t5")[1])
    ours, tok = ours_with("pissa")
    theirs = theirs_with("pissa")
    state = dict(theirs.named_parameters())
    for name, layer in lora_layers(ours).items():
        torch.testing.assert_close(layer.lora_A.weight, peft_tensor(theirs, name, "lora_A"), atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.lora_B.weight, peft_tensor(theirs, name, "lora_B"), atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.base_layer.weight, state[f"base_model.model.{name}.base_layer.weight"],
                                   atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(ours, tok), base, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fmt", ["peft", "finetune"])
def test_a_pissa_adapter_is_saved_against_the_original_base(tmp_path, fmt):
    ours, tok = ours_with("pissa")
    randomise_b(ours)  # as training moves it
    save_adapter(ours, str(tmp_path), format=fmt)
    fresh, _ = build("t5")
    load_adapter(fresh, str(tmp_path))
    torch.testing.assert_close(logits(fresh, tok), logits(ours, tok), atol=1e-5, rtol=0)
    assert next(iter(lora_layers(fresh).values())).r == 8  # rank 2r
    if fmt == "peft":
        theirs = peft.PeftModel.from_pretrained(build("t5")[0], str(tmp_path))
        torch.testing.assert_close(logits(theirs, tok), logits(ours, tok), atol=1e-5, rtol=0)


def test_loftq_equals_peft_algorithm_and_reduces_what_the_codes_lose():
    import bitsandbytes as bnb
    from peft.utils.loftq_utils import _low_rank_decomposition

    plain, _ = build("t5")
    weights = {n: m.weight.detach().clone() for n, m in plain.named_modules() if n.endswith((".q", ".v"))}
    model, tok = build("t5")
    apply_method(model, "qlora-loftq", lora_targets=[r"\.(q|v)$"], lora_r=4, lora_alpha=4.0, double_quant=False)
    for name, layer in lora_layers(model).items():
        w = weights[name]
        codes = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=False, quant_type="nf4").to("cpu")
        reference = bnb.functional.dequantize_4bit(codes.data, codes.quant_state)
        decomposition = _low_rank_decomposition(w - reference, reduced_rank=4)  # PEFT's loftq_init, one iteration
        torch.testing.assert_close(layer.lora_A.weight, decomposition["R"], atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.lora_B.weight, decomposition["L"], atol=1e-5, rtol=0)
        deq = layer.base_layer.dequantized_weight().float()
        torch.testing.assert_close(deq, reference, atol=1e-6, rtol=0)
        with_adapter = deq + layer.scaling * layer.lora_B.weight @ layer.lora_A.weight
        assert (w - with_adapter).norm() < 0.9 * (w - deq).norm()


def test_loftq_iterations_and_the_scale():
    plain, _ = build("t5")
    weights = {n: m.weight.detach().clone() for n, m in plain.named_modules() if n.endswith((".q", ".v"))}
    errors = []
    for iterations in (1, 3):
        model, _ = build("t5")
        apply_method(model, "qlora-loftq", lora_targets=[r"\.(q|v)$"], lora_r=4, loftq_iter=iterations)
        error = 0.0
        for name, layer in lora_layers(model).items():  # alpha 32, r 4: s = 8, taken into account
            approx = layer.base_layer.dequantized_weight().float() + layer.scaling * layer.lora_B.weight @ \
                layer.lora_A.weight
            error += float((weights[name] - approx).norm())
        errors.append(error)
    assert errors[1] <= errors[0] * 1.001


def test_loftq_on_every_quantised_layer():
    model, tok = build("bart")  # every linear layer a LoRA target: none is left for the plain quantiser
    apply_method(model, "qlora-loftq", lora_targets=[r"_proj$|fc1$|fc2$"], lora_r=2)
    assert lora_layers(model) and torch.isfinite(logits(model, tok)).all()


@pytest.mark.parametrize("method, settings, message", [
    ("qlora", {"lora_init": "pissa"}, "counterpart is lora_init = 'loftq'"),
    ("lora", {"lora_init": "loftq"}, "use it through the quantising methods"),
    ("dora", {"lora_init": "pissa"}, "not DoRA"),
    ("lora", {"loftq_iter": 3}, "loftq_iter = 3 is LoftQ's"),
    ("lora", {"lora_init": "svd"}, "choose one of"),
])
def test_an_init_a_method_cannot_do_is_refused_before_anything_changes(method, settings, message):
    model, tok = build("t5")
    before = logits(model, tok)
    with pytest.raises(ValueError, match=message):
        apply_method(model, method, **settings)
    assert not lora_layers(model) and torch.equal(logits(model, tok), before)


def test_loftq_on_a_base_quantised_while_loading_is_refused(tmp_path):
    from finetune.models import load_quantized

    model, tok = build("t5")
    model.save_pretrained(str(tmp_path))
    tok.save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="quantised while it loaded"):
        loaded, _ = load_quantized(str(tmp_path), "qlora")
        apply_method(loaded, "qlora", lora_init="loftq")
