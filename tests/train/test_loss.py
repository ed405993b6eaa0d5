"""The fused head + cross-entropy equals the model's logits through F.cross_entropy: loss, accuracy, gradients."""
import pytest
import torch
from conftest import SPELLING, build

from finetune.data.collate import Collator
from finetune.data.tokenize import tokenize_pairs
from finetune.models import resolve_special_tokens
from finetune.train.loss import capture_hidden, fusable_head, fused_head_loss, head_loss, token_loss

INPUTS = ("input_ids", "attention_mask", "decoder_input_ids")


def batch_for(model, tok):
    tokens = resolve_special_tokens(model, tok)
    examples, _ = tokenize_pairs(SPELLING, tok, 32, 32, tokens.decoder_start)
    return Collator(tokens.pad, tokens.decoder_start)(examples)


def perturbed(family, seed=0):
    """A tiny model whose output biases are not zero, so that they are part of what is compared."""
    model, tok = build(family, seed=seed)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        if hasattr(model, "final_logits_bias"):
            model.final_logits_bias.normal_(0, 0.5, generator=g)
        head = model.get_output_embeddings()
        if head.bias is not None:
            head.bias.normal_(0, 0.5, generator=g)
    return model, tok


def loss_and_grads(model, batch, fused, smoothing, dtype=None, rows=3):
    """fused: True (fused_head_loss), "targets" (head_loss: the head on target positions) or False (the logits)."""
    model.zero_grad(set_to_none=True)
    autocast = torch.autocast("cpu", dtype=dtype) if dtype else torch.autocast("cpu", enabled=False)
    with autocast:
        if fused:
            head = fusable_head(model)
            with capture_hidden(model, head) as cap:
                out = model(**{k: batch[k] for k in INPUTS})
            assert out.logits.shape[-1] == 1  # the model built no vocabulary-wide logits
            bias = getattr(model, "final_logits_bias", None)
            loss, correct = (head_loss(cap.hidden, head, batch["labels"], smoothing, bias) if fused == "targets" else
                             fused_head_loss(cap.hidden, head, batch["labels"], smoothing, bias, rows=rows))
        else:
            logits = model(**{k: batch[k] for k in INPUTS}).logits
    if not fused:
        loss, correct = token_loss(logits, batch["labels"], smoothing)
    (loss / 7).backward()  # any scale: the fused backward multiplies by it
    return loss.detach(), int(correct), {n: p.grad.clone() for n, p in model.named_parameters()
                                         if p.grad is not None}


@pytest.mark.parametrize("how", [True, "targets"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_fused_loss_equals_cross_entropy_on_the_logits(family, smoothing, how):
    model, tok = perturbed(family)
    batch = batch_for(model, tok)
    assert (batch["labels"] == -100).any()  # padded targets: their logits are left out, not wrongly counted
    ref_loss, ref_correct, ref_grads = loss_and_grads(model, batch, False, smoothing)
    loss, correct, grads = loss_and_grads(model, batch, how, smoothing)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert correct == ref_correct
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # the model is as it was: its own head and bias are back
    assert fusable_head(model) is model.get_output_embeddings()
    assert model(**{k: batch[k] for k in INPUTS}).logits.shape[-1] == model.get_output_embeddings().out_features


@pytest.mark.parametrize("how", [True, "targets"])
def test_fused_loss_under_bf16_autocast_matches_to_bf16_rounding(family, how):
    model, tok = perturbed(family)
    batch = batch_for(model, tok)
    ref_loss, _, ref_grads = loss_and_grads(model, batch, False, 0.0, torch.bfloat16)
    loss, _, grads = loss_and_grads(model, batch, how, 0.0, torch.bfloat16)
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=0)
    for name, grad in ref_grads.items():
        assert grads[name].dtype == grad.dtype == torch.float32
        scale = grad.abs().max()
        assert (grads[name] - grad).abs().max() <= 5e-2 * scale + 1e-6, name


def test_fused_loss_frozen_head_and_inference_mode():
    model, tok = perturbed("bart")
    batch = batch_for(model, tok)
    model.get_output_embeddings().weight.requires_grad_(False)  # tied: the embeddings are frozen too
    _, _, grads = loss_and_grads(model, batch, True, 0.0)
    assert "model.shared.weight" not in grads and grads  # the rest still learns
    with torch.inference_mode():
        head = fusable_head(model)
        with capture_hidden(model, head) as cap:
            model(**{k: batch[k] for k in INPUTS})
        loss, _ = fused_head_loss(cap.hidden, head, batch["labels"], extra_bias=model.final_logits_bias)
        ref, _ = token_loss(model(**{k: batch[k] for k in INPUTS}).logits, batch["labels"])
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)


def test_only_plain_linear_heads_are_fused():
    from finetune.methods.lora import apply_lora

    model, _ = build("bart")
    assert fusable_head(model) is model.lm_head
    apply_lora(model, targets=r"lm_head", r=2)
    assert fusable_head(model) is None


def test_engine_checks_the_fused_loss_of_an_unknown_class_and_falls_back_when_it_rescales_its_logits(tmp_path):
    from finetune import Engine, TrainConfig

    model, tok = build("bart")

    class Rescaled(type(model)):  # changes the logits after the output layer: the fused loss cannot know
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    model.__class__ = Rescaled
    model.eval()
    batch = batch_for(model, tok)
    engine = Engine(model, tok, TrainConfig(output_dir=str(tmp_path), progress=False, fused_loss=True))
    with pytest.warns(UserWarning, match="changes its logits after the output layer"):
        loss, _ = engine.loss(engine.model, batch)
    ref, _ = token_loss(model(**{k: batch[k] for k in INPUTS}).logits, batch["labels"])
    torch.testing.assert_close(loss, ref)  # the plain loss on the model's own (rescaled) logits
    assert not engine.loss.fused and "changes its logits" in engine.loss.reason
    # an unmodified model passes the check without a warning and keeps the fused loss
    plain_model, tok = build("bart")
    engine = Engine(plain_model, tok, TrainConfig(output_dir=str(tmp_path), progress=False, fused_loss=True))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine.loss(engine.model, batch_for(plain_model, tok))
    assert engine.loss.fused
