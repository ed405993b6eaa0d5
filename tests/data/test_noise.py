"""BART noising: rates, span lengths, invariants, determinism, protection, and the engine hook."""
from collections import Counter

import numpy as np
import pytest

from finetune.data.noise import NoiseConfig, add_noise, infill_spans, last_word_positions
from finetune.models import char_tokenizer

TOK = char_tokenizer("bart")
TEXT = "the quick brown fox jumps over the lazy dog. a stitch in time saves nine! where is my hat?"
IDS = TOK(TEXT)["input_ids"]
BOS, EOS, MASK = TOK.bos_token_id, TOK.eos_token_id, TOK.mask_token_id
CONTENT = len(IDS) - 2


def many(config, n=400):
    return [add_noise(IDS, config, TOK, seed=[0, 0, i]) for i in range(n)]


def test_noise_off_leaves_source_unchanged():
    assert add_noise(IDS, NoiseConfig(), TOK, seed=1) == IDS
    import torch
    assert add_noise(torch.tensor(IDS), NoiseConfig(), TOK, seed=1) == IDS


def test_masking_rate():
    outs = many(NoiseConfig(mask_rate=0.25))
    rate = np.mean([o.count(MASK) / CONTENT for o in outs])
    assert rate == pytest.approx(0.25, abs=0.01)
    assert all(len(o) == len(IDS) for o in outs)


def test_deletion_rate():
    outs = many(NoiseConfig(delete_rate=0.3))
    rate = np.mean([(len(IDS) - len(o)) / CONTENT for o in outs])
    assert rate == pytest.approx(0.3, abs=0.01)


def test_infilling_span_lengths_and_covered_fraction():
    rng = np.random.default_rng(0)
    seq = [(t, True) for t in range(5, 2005)]
    all_lengths, covered = [], []
    for _ in range(50):
        out, lengths = infill_spans(seq, rng, 0.3, 3.0, MASK)
        all_lengths += lengths[:-1]  # the last span is trimmed to hit the target exactly
        kept = sum(1 for t, _ in out if t != MASK)
        covered.append((len(seq) - kept) / len(seq))
    assert np.mean(all_lengths) == pytest.approx(3.0, abs=0.1)
    assert np.mean(covered) == pytest.approx(0.3, abs=0.02)
    assert 0 in all_lengths  # 0-length spans occur (Poisson(3) gives 0 about 5% of the time)


def test_zero_length_span_inserts_a_mask():
    rng = np.random.default_rng(0)
    seq = [(t, True) for t in range(5, 105)]
    for _ in range(200):
        out, lengths = infill_spans(seq, rng, 0.05, 0.0001, MASK)  # lambda ~ 0: almost every span has length 0
        if lengths and all(x == 0 for x in lengths):
            assert len(out) > len(seq)  # spans of 0 insert rather than replace
            return
    pytest.fail("no all-zero span sample")


def test_special_tokens_never_change():
    config = NoiseConfig(mask_rate=0.3, delete_rate=0.2, infill_rate=0.3, permute_sentences=True, rotate=True)
    for out in many(config, 200):
        assert out[0] == BOS and out[-1] == EOS
        assert out.count(BOS) == 1 and out.count(EOS) == 1


def test_protected_last_word_never_changes():
    line = TOK("you're the one that i want")["input_ids"]
    protected = last_word_positions(line, TOK)
    assert sorted(protected) == list(range(len(line) - 5, len(line) - 1))  # "want"
    config = NoiseConfig(mask_rate=0.5, delete_rate=0.2, infill_rate=0.3, protect="last_word")
    for i in range(300):
        out = add_noise(line, config, TOK, seed=i)
        assert out[-5:] == line[-5:]


def test_last_word_with_wordpiece_and_punctuation():
    from transformers import AutoTokenizer

    from finetune.models import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())
    ids = tok("and the rhyme is unbelievable.")["input_ids"]
    words = tok.convert_ids_to_tokens([ids[i] for i in sorted(last_word_positions(ids, tok))])
    assert "".join(w.removeprefix("##") for w in words) == "unbelievable"


def test_sentence_permutation_keeps_the_sentences():
    outs = many(NoiseConfig(permute_sentences=True), 50)
    sentences = sorted(["the quick brown fox jumps over the lazy dog.", " a stitch in time saves nine!",
                        " where is my hat?"])
    changed = 0
    for out in outs:
        text = TOK.decode(out, skip_special_tokens=True)
        assert Counter(text) == Counter(TEXT)
        parts = sorted(s for s in sentences if s.strip() in text)
        assert len(parts) == 3
        changed += text != TEXT
    assert changed > 0


def test_rotation_keeps_the_tokens():
    outs = many(NoiseConfig(rotate=True), 50)
    assert all(Counter(o) == Counter(IDS) for o in outs)
    assert len({tuple(o) for o in outs}) > 10


def test_same_seed_same_output_and_epochs_differ():
    config = NoiseConfig(mask_rate=0.2, infill_rate=0.2, rotate=True)
    assert add_noise(IDS, config, TOK, seed=[3, 1, 7]) == add_noise(IDS, config, TOK, seed=[3, 1, 7])
    assert add_noise(IDS, config, TOK, seed=[3, 1, 7]) != add_noise(IDS, config, TOK, seed=[3, 2, 7])


def test_bad_config():
    with pytest.raises(ValueError, match="mask_rate=1.5"):
        NoiseConfig(mask_rate=1.5)
    with pytest.raises(ValueError, match="protect='first_word'"):
        NoiseConfig(protect="first_word")


def test_engine_noises_sources_per_epoch_and_keeps_targets(tmp_path):
    from conftest import SPELLING

    from finetune import Engine, TrainConfig
    from finetune.models import tiny_bart

    model, tok = tiny_bart()
    engine = Engine(model, tok, TrainConfig(progress=False, output_dir=str(tmp_path)),
                    noise=NoiseConfig(mask_rate=0.5))
    seen = []
    original = engine.collate

    def spy(examples):
        seen.append([(tuple(e.input_ids), tuple(e.labels)) for e in examples])
        return original(examples)

    engine.collate = spy
    engine.config.epochs = 2
    engine.fit(SPELLING)
    epoch0, epoch1 = sorted(seen[0]), sorted(seen[1])
    assert sorted(lab for _, lab in epoch0) == sorted(lab for _, lab in epoch1)  # targets clean and the same
    assert epoch0 != epoch1  # sources corrupted differently in each epoch
    assert any(MASK in src for src, _ in epoch0)
    assert all(MASK not in lab for _, lab in epoch0)


def test_infilling_never_pushes_a_batch_past_its_token_budget(tmp_path):
    """0-length infilling spans insert masks (sources grow); the batches were cut by the lengths before noise, so
    the engine cuts a grown source back: every collated micro-batch stays within max_tokens."""
    from conftest import SPELLING

    from finetune import Engine, TrainConfig
    from finetune.models import tiny_bart

    noise = NoiseConfig(infill_rate=0.5, poisson_lambda=0.05)  # nearly every span is empty: masks inserted
    tok = char_tokenizer("bart")
    source = tok("the cat sat on the mat")["input_ids"]
    assert max(len(add_noise(source, noise, tok, seed=[0, 0, i])) for i in range(20)) > len(source)  # it grows
    model, tok = tiny_bart(tok)
    pairs = [(f"{s} and the {s}", t) for s, t in SPELLING] * 4
    cfg = TrainConfig(max_tokens=96, max_source_length=48, max_target_length=48, epochs=2, progress=False,
                      output_dir=str(tmp_path))
    engine = Engine(model, tok, cfg, noise=noise)
    run = engine.prepare(pairs)
    sizes = [b["input_ids"].shape[0] * (b["input_ids"].shape[1] + b["labels"].shape[1])
             for epoch in range(2) for _, window in engine.windows(run, epoch) for b in window]
    assert sizes and max(sizes) <= 96
