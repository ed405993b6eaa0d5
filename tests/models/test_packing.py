"""Packed batches (TrainConfig.pack; finetune/models/packing.py, PackedCollator): a packed row's loss and gradients
equal its pairs' trained unpacked on BART, T5 (relative bias) and bert2bert, with sdpa and eager attention, with
activation checkpointing and under bf16; attention really runs pair by pair; unpacked forwards are unchanged; a
whole run gives the same losses packed and unpacked, resumes exactly, streams; what packing cannot do is refused."""
import json
import os
import signal

import pytest
import torch
import torch.nn.functional as F
from conftest import BUILDERS, SPELLING
from torch.overrides import TorchFunctionMode

from finetune import Engine, TrainConfig, apply_method
from finetune.data.collate import Collator, PackedCollator, pairs_in
from finetune.data.tokenize import Example
from finetune.models import (enable_activation_checkpointing, enable_packing, packed_inputs, resolve_special_tokens,
                             use_float32_attention)
from finetune.train.loss import token_loss

LENGTHS = [(7, 3), (12, 5), (3, 4), (9, 2)]  # (source, target) tokens of the pairs of one micro-batch


def examples(lengths=LENGTHS, seed=0):
    gen = torch.Generator().manual_seed(seed)
    def ids(n):
        return torch.randint(5, 40, (n,), generator=gen).tolist()

    return [Example(ids(s), ids(t)) for s, t in lengths]


def loss_and_grads(model, inputs, labels):
    model.zero_grad()
    loss, _ = token_loss(model(**inputs).logits, labels)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def plain_and_packed(family, attention="sdpa", checkpointing=False, lengths=LENGTHS):
    model, tok = BUILDERS[family]()
    model.set_attn_implementation(attention)
    if checkpointing:
        enable_activation_checkpointing(model)
        model.train()  # checkpointing recomputes only in training mode; the tiny models have no dropout
    else:
        model.eval()
    tokens = resolve_special_tokens(model, tok)
    batch = Collator(tokens.pad, tokens.decoder_start)(examples(lengths))
    plain = loss_and_grads(model, {k: batch[k] for k in ("input_ids", "attention_mask", "decoder_input_ids")},
                           batch["labels"])
    enable_packing(model)
    packed_batch = PackedCollator(tokens.pad, tokens.decoder_start)(examples(lengths))
    packed = loss_and_grads(model, packed_inputs(packed_batch), packed_batch["labels"])
    return plain, packed


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_packed_row_trains_like_its_pairs_unpacked(family, attention):
    (loss, grads), (packed_loss, packed_grads) = plain_and_packed(family, attention)
    assert packed_loss == pytest.approx(loss, rel=1e-6)
    assert grads.keys() == packed_grads.keys() and len(grads) > 10
    for name in grads:
        torch.testing.assert_close(packed_grads[name], grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_packing_with_activation_checkpointing(family):
    """Checkpointing recomputes attention during backward: the segments travel with the layers' arguments."""
    (loss, grads), (packed_loss, packed_grads) = plain_and_packed(family, checkpointing=True)
    assert packed_loss == pytest.approx(loss, rel=1e-6)
    for name in grads:
        torch.testing.assert_close(packed_grads[name], grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_a_row_longer_than_the_position_table(family):
    """Tiny models hold 128 positions; a row of 3 x 100 source tokens still looks up each pair's own 0..99."""
    (loss, grads), (packed_loss, packed_grads) = plain_and_packed(family, lengths=[(100, 60), (100, 50), (100, 40)])
    assert packed_loss == pytest.approx(loss, rel=1e-6)
    for name in grads:
        torch.testing.assert_close(packed_grads[name], grads[name], atol=1e-5, rtol=1e-4, msg=name)


class KeyLengths(TorchFunctionMode):
    """The key lengths every `scaled_dot_product_attention` call receives."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            self.seen.append(args[1].shape[-2])
        return func(*args, **(kwargs or {}))


def test_attention_runs_pair_by_pair(family):
    """No attention call sees the whole row: each pair attends over its own keys only (masked blocks cost nothing)."""
    model, tok = BUILDERS[family]()
    model.eval()
    tokens = resolve_special_tokens(model, tok)
    enable_packing(model)
    batch = PackedCollator(tokens.pad, tokens.decoder_start)(examples())
    with torch.no_grad(), KeyLengths() as mode:
        model(**packed_inputs(batch))
    assert mode.seen and set(mode.seen) <= {n for pair in LENGTHS for n in pair}
    assert len(mode.seen) % len(LENGTHS) == 0


class QueryDtypes(KeyLengths):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            self.seen.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


def test_packed_attention_in_float32_under_bf16(family):
    """With float32 attention on (bf16 autocast on a CPU), a packed row is cast once and every pair attends in
    float32; the logits stay close to fp32's."""
    model, tok = BUILDERS[family]()
    model.eval()
    tokens = resolve_special_tokens(model, tok)
    use_float32_attention(model)
    enable_packing(model)
    inputs = packed_inputs(PackedCollator(tokens.pad, tokens.decoder_start)(examples()))
    with torch.no_grad():
        reference = model(**inputs).logits
        with torch.autocast("cpu", dtype=torch.bfloat16), QueryDtypes() as mode:
            logits = model(**inputs).logits.float()
    assert mode.seen and set(mode.seen) == {torch.float32}
    torch.testing.assert_close(logits, reference, atol=0.1, rtol=0.05)


def test_unpacked_forwards_and_generation_are_unchanged(family):
    model, tok = BUILDERS[family]()
    model.eval()
    tokens = resolve_special_tokens(model, tok)
    batch = Collator(tokens.pad, tokens.decoder_start)(examples())
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "decoder_input_ids")}
    with torch.no_grad():
        before = model(**inputs).logits
        generated = model.generate(batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=5)
        enable_packing(model)
        enable_packing(model)  # twice: the same as once
        torch.testing.assert_close(model(**inputs).logits, before, atol=1e-6, rtol=0)
        assert torch.equal(model.generate(batch["input_ids"], attention_mask=batch["attention_mask"],
                                          max_new_tokens=5), generated)


def test_packed_collator_shifts_each_pair_on_its_own():
    batch = PackedCollator(pad_token_id=0, decoder_start_token_id=2)([Example([5, 6, 7], [8, 9]),
                                                                      Example([10], [11, 12, 13])])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 10]]
    assert batch["labels"].tolist() == [[8, 9, 11, 12, 13]]
    assert batch["decoder_input_ids"].tolist() == [[2, 8, 2, 11, 12]]  # the start token begins every pair
    assert batch["source_lengths"].tolist() == [3, 1] and batch["target_lengths"].tolist() == [2, 3]
    assert pairs_in(batch) == 2
    with pytest.raises(ValueError, match="no examples"):
        PackedCollator(0, 2)([])
    with pytest.raises(ValueError, match="example 1 of the batch has an empty source or target"):
        PackedCollator(0, 2)([Example([5], [6]), Example([], [6])])


def test_packed_masks_keep_each_pair_to_itself():
    batch = PackedCollator(0, 2)([Example([5, 6], [8, 9]), Example([10], [11])])
    inputs = packed_inputs(batch)
    cross, decoder = inputs["attention_mask"], inputs["decoder_attention_mask"]
    assert cross[0, 0].tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    assert decoder[0, 0].tolist() == [[True, False, False], [True, True, False], [False, False, True]]
    encoder = cross.packed_encoder_mask
    assert encoder[0, 0].tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    assert encoder.packed_positions.tolist() == [0, 1, 0] and decoder.packed_positions.tolist() == [0, 1, 0]


# ---------------------------------------------------------------------------------------------------------------
# whole runs

DATA = [(" ".join(["teh"] * (1 + i % 5)), " ".join(["the"] * (1 + i % 3))) for i in range(24)]


def cfg(out, **kw):
    return TrainConfig(**{**dict(lr=3e-3, batch_size=4, epochs=2, log_every=1, progress=False, save_model=False,
                                 output_dir=str(out), precision="fp32", max_grad_norm=None), **kw})


def train_records(out):
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    return [r for r in rows if r["split"] == "train"]


@pytest.mark.parametrize("method,batching", [("full", {}), ("full", {"max_tokens": 40, "max_source_length": 16,
                                                                    "max_target_length": 8}),
                                             ("full", {"grad_accum": 2, "group_by_length": False}), ("lora", {}),
                                             ("bitfit", {})])
def test_a_packed_run_equals_the_unpacked_run(tmp_path, method, batching):
    """Same pairs a step, same losses at every step and the same weights at the end; `samples` counts pairs, and
    the padding reported is none."""
    runs = {}
    for pack in (False, True):
        model, tok = BUILDERS["bart"]()
        apply_method(model, method, **({"lora_dropout": 0.0} if method == "lora" else {}))  # no random masks
        Engine(model, tok, cfg(tmp_path / str(pack), pack=pack, **batching)).fit(DATA)
        runs[pack] = (train_records(tmp_path / str(pack)), model.state_dict())
    (plain, plain_weights), (packed, packed_weights) = runs[False], runs[True]
    assert [r["samples"] for r in packed] == [r["samples"] for r in plain] and len(plain) > 4
    for a, b in zip(plain, packed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), a["step"]
    assert all(r["padding_fraction"] == 0.0 for r in packed) and any(r["padding_fraction"] > 0 for r in plain)
    for name, tensor in plain_weights.items():
        torch.testing.assert_close(packed_weights[name], tensor, atol=1e-5, rtol=1e-4, msg=name)


def test_a_packed_run_resumes_exactly(tmp_path):
    model, tok = BUILDERS["t5"]()
    Engine(model, tok, cfg(tmp_path / "a", pack=True, save_every=3)).fit(DATA)
    reference = {n: p.clone() for n, p in model.state_dict().items()}

    def interrupt_at_step_7(engine, stats):
        if engine.global_step == 7:
            os.kill(os.getpid(), signal.SIGTERM)

    model, tok = BUILDERS["t5"]()
    with pytest.raises(SystemExit):
        Engine(model, tok, cfg(tmp_path / "b", pack=True, save_every=3)).fit(DATA, on_step=interrupt_at_step_7)
    model, tok = BUILDERS["t5"]()
    Engine(model, tok, cfg(tmp_path / "b", pack=True, save_every=3)).fit(DATA, resume="latest")
    assert [r["loss"] for r in train_records(tmp_path / "a")] == [r["loss"] for r in train_records(tmp_path / "b")]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reference[name]), name


def test_a_packed_stream_trains(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"source": s, "target": t}) + "\n" for s, t in DATA))
    model, tok = BUILDERS["bert2bert"]()
    history = Engine(model, tok, cfg(tmp_path / "run", pack=True, streaming=True, max_steps=5, epochs=1,
                                     stream_buffer=12)).fit(str(path))
    assert [r["samples"] for r in history["train"]] == [4] * 5


def test_packed_bf16_with_float32_attention_is_close_to_fp32(tmp_path):
    runs = {}
    for precision in ("fp32", "bf16"):
        model, tok = BUILDERS["bart"]()
        history = Engine(model, tok, cfg(tmp_path / precision, pack=True, precision=precision, max_steps=3,
                                         attention_fp32=True)).fit(DATA)
        runs[precision] = [r["loss"] for r in history["train"]]
    assert runs["bf16"] == pytest.approx(runs["fp32"], rel=3e-2)


# ---------------------------------------------------------------------------------------------------------------
# refusals

def test_what_packing_cannot_do_is_refused(tmp_path):
    model, tok = BUILDERS["bart"]()
    model.config.model_type = "marian"  # a family whose positions the table does not describe
    with pytest.raises(ValueError, match="TrainConfig.pack: .* family is 'marian'"):
        Engine(model, tok, cfg(tmp_path, pack=True))
    model, tok = BUILDERS["bart"]()
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="TrainConfig.pack: packed batches need 'sdpa' or 'eager' attention; this "
                                         "model uses 'flex_attention'"):
        enable_packing(model)
    with pytest.raises(ValueError, match="TrainConfig.pack=True: packed batches are not tested under FSDP"):
        cfg(tmp_path, pack=True, fsdp=True)
    with pytest.raises(ValueError, match="TrainConfig.pack=1: expected true/false"):
        cfg(tmp_path, pack=1)
    engine = Engine(*BUILDERS["bart"](), cfg(tmp_path, pack=True))
    with pytest.raises(ValueError, match="Engine.compile: TrainConfig.pack"):
        engine.compile()


def test_overfit_batch_packs_too(tmp_path):
    engine = Engine(*BUILDERS["bart"](d_model=64), cfg(tmp_path, pack=True))
    history = engine.overfit_batch(SPELLING, steps=150, lr=2e-3)
    assert history[-1]["loss"] < history[0]["loss"] / 5
