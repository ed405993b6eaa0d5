"""Every quantised method on every family, with dropout on as in every real checkpoint: the quantised model computes
what its dequantised weights say (bitsandbytes' layers are the reference), stays within the quantisation error of
the float model, and trains. T5 keeps its feed-forward output `wo` in float, as transformers does when it
quantises T5 (`_keep_in_fp32_modules`): T5 casts the activations entering `wo` to `wo.weight.dtype`, and 4-bit
codes are uint8."""
import copy

import pytest
import torch
from conftest import SPELLING

from finetune import Engine, TrainConfig, apply_method
from finetune.methods.quant import is_quantized
from finetune.models import char_tokenizer, set_dropout, tiny_bart, tiny_bert2bert, tiny_t5

pytest.importorskip("bitsandbytes")
METHODS = ("int8-lora", "qlora")
# the quantisation error of the logits, relative to their norm, on these tiny random models (measured on this
# seed: int8 0.02-0.9%, NF4 0.3-14%): bounds with room, far below a broken model's (T5's integer activations
# entering a 4-bit `wo`: ~100%)
BOUND = {"int8-lora": 0.03, "qlora": 0.3}


def t5_gated():
    from transformers import T5Config, T5ForConditionalGeneration

    tok = char_tokenizer("t5")
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tok), d_model=64, d_kv=32, d_ff=128, num_layers=1, num_heads=2,
                      feed_forward_proj="gated-gelu", pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      decoder_start_token_id=tok.pad_token_id)
    return T5ForConditionalGeneration(config), tok


FAMILIES = {"bart": lambda: tiny_bart(d_model=64), "t5-relu": lambda: tiny_t5(d_model=64), "t5-gated-gelu": t5_gated,
            "bert2bert": lambda: tiny_bert2bert(hidden=64)}


def build(family):
    model, tok = FAMILIES[family]()
    set_dropout(model, 0.1)
    return model, tok


def logits(model, tok):
    batch = tok(["teh cat sat", "recieve it"], return_tensors="pt", padding=True)
    labels = tok(text_target=["the cat sat", "receive it"], return_tensors="pt", padding=True)["input_ids"]
    model.eval()
    with torch.no_grad():
        return model(**batch, labels=labels).logits


def dequantised_copy(float_model, quantised):
    """The float model with each quantised layer's weight replaced by what its codes stand for."""
    reference = copy.deepcopy(float_model)
    for name, module in quantised.named_modules():
        if is_quantized(module):
            target = reference.get_submodule(name.replace(".base_layer", ""))
            with torch.no_grad():
                target.weight.copy_(module.dequantized_weight())
    return reference


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_quantised_logits_are_the_dequantised_weights_and_near_the_float_model(family, method):
    model, tok = build(family)
    quantised = copy.deepcopy(model)
    apply_method(quantised, method)
    assert any(is_quantized(m) for m in quantised.modules())
    ours, reference, exact = logits(quantised, tok), logits(dequantised_copy(model, quantised), tok), logits(model, tok)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)
    assert float((ours - exact).norm() / exact.norm()) < BOUND[method]


@pytest.mark.parametrize("family", ["t5-relu", "t5-gated-gelu"])
def test_t5_keeps_its_feed_forward_output_in_float(family):
    model, _ = build(family)
    apply_method(model, "qlora")
    kept = {n for n, m in model.named_modules() if n.endswith(".wo")}
    assert kept and all(type(model.get_submodule(n)) is torch.nn.Linear for n in kept)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_quantised_methods_train_with_dropout_on(tmp_path, family, method):
    model, tok = build(family)
    apply_method(model, method)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    cfg = TrainConfig(lr=3e-3, batch_size=3, max_steps=3, log_every=1, progress=False, save_model=False,
                      precision="fp32", output_dir=str(tmp_path))
    history = Engine(model, tok, cfg).fit(SPELLING)
    assert len(history["train"]) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in history["train"])
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed and all("lora_" in n for n in changed if "cross" not in n)
