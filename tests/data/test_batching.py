"""Token-budget batches (TrainConfig.max_tokens): never over the budget, every example once an epoch, the same
batches for the same seed and epoch, a rank share for every rank, an exact resume, and the padding fraction in
the log records."""
import json
import os
import random
import signal

import pytest
import torch

from finetune import Engine, TrainConfig
from finetune.data.batching import LengthGroupedBatches, TokenBudgetBatches, padding_fraction, schedule_of
from finetune.data.tokenize import Example
from finetune.models import tiny_bart
from finetune.train.checkpoint import CheckpointError


def skewed(n, seed=0):
    """Source lengths like code (a long tail), short targets."""
    rng = random.Random(seed)
    return [min(256, int(rng.lognormvariate(4, 0.9)) + 2) for _ in range(n)], [rng.randint(3, 30) for _ in range(n)]


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("budget", [300, 1000, 4096])
def test_batches_stay_within_the_budget_and_cover_every_example_once(world, budget):
    source, target = skewed(1001)
    sampler = TokenBudgetBatches(source, target, budget, world=world, seed=5)
    for epoch in range(3):
        batches = sampler.batches(epoch)
        assert sorted(j for b in batches for j in b) == list(range(1001))
        for b in batches:
            assert len(b) >= world  # every rank has an example
            for rank in range(world):
                share = b[rank::world]
                assert len(share) * (max(source[j] for j in share) + max(target[j] for j in share)) <= budget
        assert sampler.num_batches(epoch) == len(batches)
    assert sampler.batches(1) == TokenBudgetBatches(source, target, budget, world=world, seed=5).batches(1)
    assert sampler.batches(1) != sampler.batches(2)


def test_an_example_over_the_budget_and_a_too_small_budget_are_refused():
    with pytest.raises(ValueError, match="an example of 40 tokens"):
        TokenBudgetBatches([30, 5], [10, 5], 39)
    with pytest.raises(ValueError, match=r"max_tokens=100: must hold one example .* >= max_source_length \+ "
                                         r"max_target_length = 192"):
        TrainConfig(max_tokens=100, max_source_length=128, max_target_length=64)


def test_budget_batches_pad_less_than_fixed_batches_on_skewed_lengths():
    source, target = skewed(3000, seed=1)
    examples = [Example([1] * s, [1] * t) for s, t in zip(source, target)]
    fixed = LengthGroupedBatches([s + t for s, t in zip(source, target)], 32, seed=0).batches(0)
    tokens = sum(len(b) for b in fixed) / len(fixed) * 120  # about the same tokens a batch
    budget = TokenBudgetBatches(source, target, int(tokens), seed=0).batches(0)
    assert padding_fraction(budget, examples) < padding_fraction(fixed, examples)


def test_the_schedule_counts_each_epochs_batches():
    source, target = skewed(500)
    sampler = TokenBudgetBatches(source, target, 800, seed=0)
    counts = [sampler.num_batches(e) for e in range(4)]
    cfg = TrainConfig(max_tokens=800, grad_accum=2, epochs=3, max_source_length=256, max_target_length=64)
    assert schedule_of(cfg, sampler) == (-(-counts[0] // 2), sum(-(-c // 2) for c in counts[:3]), 3)
    one_epoch = -(-counts[0] // 2)
    cfg = TrainConfig(max_tokens=800, grad_accum=2, max_steps=one_epoch + 1, max_source_length=256,
                      max_target_length=64)
    assert schedule_of(cfg, sampler) == (one_epoch, one_epoch + 1, 2)


DATA = [(" ".join(["word"] * (1 + i % 9)), " ".join(["w"] * (1 + i % 4))) for i in range(40)]


def cfg(out, **kw):
    base = dict(lr=3e-3, max_tokens=96, max_source_length=48, max_target_length=24, epochs=2, log_every=1,
                save_every=3, keep_last=10, progress=False, save_model=False, output_dir=str(out), precision="fp32")
    return TrainConfig(**{**base, **kw})


def fresh():
    model, tok = tiny_bart(d_model=32, layers=1)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.1  # the RNG state must be restored too
    return model, tok


def train_losses(out):
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}, rows


def test_an_engine_run_keeps_the_budget_and_records_the_padding(tmp_path):
    model, tok = fresh()
    engine = Engine(model, tok, cfg(tmp_path))
    shapes, collate = [], engine.collate
    engine.collate = lambda examples: shapes.append(collate(examples)) or shapes[-1]
    engine.fit(DATA)
    assert all(b["input_ids"].numel() + b["labels"].numel() <= 96 for b in shapes)
    assert sum(len(b["labels"]) for b in shapes) == 2 * len(DATA)  # every example once an epoch
    assert len({len(b["labels"]) for b in shapes}) > 1  # short examples travel in larger batches
    _, rows = train_losses(tmp_path)
    fractions = [r["padding_fraction"] for r in rows if r["split"] == "train"]
    assert all(0 <= f < 1 for f in fractions)


def test_a_token_budget_run_resumes_bit_exactly(tmp_path):
    model, tok = fresh()
    Engine(model, tok, cfg(tmp_path / "a")).fit(DATA)
    reference = {n: p.clone() for n, p in model.state_dict().items()}
    steps = max(train_losses(tmp_path / "a")[0])

    model_b, tok = fresh()

    def stop_mid_epoch_2(engine, stats):
        if engine.global_step == steps - 2:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(SystemExit):
        Engine(model_b, tok, cfg(tmp_path / "b")).fit(DATA, on_step=stop_mid_epoch_2)
    model_c, tok = fresh()
    Engine(model_c, tok, cfg(tmp_path / "b")).fit(DATA, resume="latest")
    assert train_losses(tmp_path / "a")[0] == train_losses(tmp_path / "b")[0]
    for name, tensor in model_c.state_dict().items():
        assert torch.equal(tensor, reference[name]), name
    with pytest.raises(CheckpointError, match="config.max_tokens was 96, is now 128"):
        Engine(*fresh(), cfg(tmp_path / "b", max_tokens=128)).fit(DATA, resume="latest")
