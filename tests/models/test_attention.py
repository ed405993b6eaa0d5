"""Attention in float32 under CPU bf16 autocast (finetune/models/attention.py): the same attention with less
rounding, on every attention layer of BART, T5 and bert2bert, never on sequences longer than MAX_KEYS, never saved."""
import collections
import json

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from finetune import Engine, TrainConfig
from finetune.models import MAX_KEYS, tiny_bart, tiny_bert2bert, tiny_t5, use_float32_attention

BUILDERS = {"bart": tiny_bart, "t5": tiny_t5, "bert2bert": tiny_bert2bert}


class AttentionDtypes(TorchFunctionMode):
    """Counts the dtypes of the queries every `scaled_dot_product_attention` call receives."""

    def __init__(self):
        super().__init__()
        self.seen = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            self.seen[args[0].dtype] += 1
        return func(*args, **(kwargs or {}))


def batch(tokenizer, source_len=12, target_len=6, rows=3):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, len(tokenizer), (rows, source_len), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, source_len // 2:] = 0  # one padded row: the mask must reach every layer
    labels = torch.randint(5, len(tokenizer), (rows, target_len), generator=gen)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def logits(model, inputs, bf16: bool):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), AttentionDtypes() as mode:
        out = model(**inputs).logits.float()
    return out, mode.seen


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_float32_attention_is_sdpa_with_less_rounding(family):
    model, tok = BUILDERS[family]()
    model.eval()
    inputs = batch(tok)
    reference, _ = logits(model, inputs, bf16=False)
    plain_bf16, seen_plain = logits(model, inputs, bf16=True)
    assert use_float32_attention(model)
    same_fp32, _ = logits(model, inputs, bf16=False)  # float32 inputs go through unchanged
    torch.testing.assert_close(same_fp32, reference, rtol=0, atol=0)
    fp32_attention, seen = logits(model, inputs, bf16=True)
    assert set(seen) == {torch.float32} and sum(seen.values()) == sum(seen_plain.values())  # every layer, cross too
    assert torch.bfloat16 in seen_plain
    # the bf16 matmuls of the projections remain: close to the float32 reference, at least as close as plain bf16
    torch.testing.assert_close(fp32_attention, reference, rtol=0.05, atol=0.05)
    assert (fp32_attention - reference).abs().mean() <= (plain_bf16 - reference).abs().mean() * 1.05


def test_sequences_longer_than_max_keys_keep_bf16_attention():
    model, tok = tiny_t5()  # relative positions: any length
    model.eval()
    use_float32_attention(model)
    _, seen = logits(model, batch(tok, source_len=MAX_KEYS + 8), bf16=True)
    assert seen[torch.bfloat16] >= 1 and seen[torch.float32] >= 1  # encoder and cross-attention long, decoder short


def test_gradients_flow_through_the_float32_attention():
    model, tok = tiny_bert2bert()
    use_float32_attention(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch(tok)).loss
    loss.backward()
    query = model.encoder.encoder.layer[0].attention.self.query.weight
    assert query.grad is not None and torch.isfinite(query.grad).all() and query.grad.abs().sum() > 0


def test_switching_twice_is_a_no_op(tmp_path):
    model, tok = tiny_bart()
    assert use_float32_attention(model) and use_float32_attention(model)
    Engine(model, tok, TrainConfig(output_dir=str(tmp_path), precision="bf16", attention_fp32=True, progress=False))
    assert model.config._attn_implementation == "sdpa_float32"


def test_models_without_sdpa_attention_are_left_alone():
    model, _ = tiny_bart()
    model.set_attn_implementation("eager")
    assert not use_float32_attention(model)
    assert model.config._attn_implementation == "eager"
    assert not use_float32_attention(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("setting, precision, expected", [
    (True, "bf16", "sdpa_float32"), (False, "bf16", "sdpa"), (True, "fp32", "sdpa"), (None, "fp32", "sdpa")])
def test_engine_applies_the_setting_only_under_bf16(tmp_path, setting, precision, expected):
    model, tok = tiny_bart()
    Engine(model, tok, TrainConfig(output_dir=str(tmp_path), precision=precision, attention_fp32=setting,
                                   progress=False))
    assert model.config._attn_implementation == expected


def test_engine_warns_when_the_model_attention_cannot_be_switched(tmp_path):
    model, tok = tiny_bart()
    model.set_attn_implementation("eager")
    with pytest.warns(UserWarning, match="attention_fp32=True: this model's attention \\('eager'\\) is not"):
        Engine(model, tok, TrainConfig(output_dir=str(tmp_path), precision="bf16", attention_fp32=True,
                                       progress=False))
    assert model.config._attn_implementation == "eager"


def test_a_saved_model_does_not_carry_the_float32_attention(tmp_path):
    model, _ = tiny_bart()
    use_float32_attention(model)
    model.save_pretrained(tmp_path)
    assert "sdpa_float32" not in json.dumps(json.loads((tmp_path / "config.json").read_text()))


def test_attention_fp32_must_be_a_bool_or_none():
    with pytest.raises((TypeError, ValueError), match="attention_fp32"):
        TrainConfig.from_dict({"attention_fp32": "yes"})
