"""The loop's behaviour: overfit one batch, accumulation equivalence, autocast, checkpointing, guards, fit."""
import json
import os

import pytest
import torch
from conftest import SPELLING, build

from finetune import Engine, TrainConfig, TrainingStopped
from finetune.data.tokenize import tokenize_pairs
from finetune.methods import freeze
from finetune.models import tiny_bart, tiny_t5


def config(tmp_path, **kw):
    return TrainConfig(**{"progress": False, "output_dir": str(tmp_path / "run"), **kw})


def gradients_of_one_step(engine, windows):
    """Run Engine.train_step on each window with an optimizer that only records the gradients it is given."""
    params = [p for p in engine.model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    seen = []
    original = optimizer.step

    def record(*a, **k):
        seen.append({n: p.grad.clone() for n, p in engine.model.named_parameters() if p.grad is not None})
        return original(*a, **k)

    optimizer.step = record
    engine.optimizer, engine.scheduler = optimizer, scheduler
    losses = [engine.train_step(w)["loss"] for w in windows]
    return seen, losses


def batches(engine, pairs, size):
    examples, _ = tokenize_pairs(pairs, engine.tokenizer, 64, 64, engine.tokens.decoder_start)
    return [engine.collate(examples[i:i + size]) for i in range(0, len(examples), size)]


@pytest.mark.parametrize("family", ["bart", "t5", "bert2bert"])
def test_overfit_one_batch(tmp_path, family):
    model, tok = build(family, **({"hidden": 64} if family == "bert2bert" else {"d_model": 64}))
    engine = Engine(model, tok, config(tmp_path, lr=2e-3))
    history = engine.overfit_batch(SPELLING, steps=300)
    assert history[0]["loss"] > 3.0
    assert history[-1]["loss"] < 0.05
    assert history[-1]["token_accuracy"] == 1.0
    assert engine.generate([s for s, _ in SPELLING]) == [t for _, t in SPELLING]


@pytest.mark.parametrize("family", ["bart", "t5", "bert2bert"])
def test_accumulation_equals_one_big_batch(tmp_path, family):
    """grad_accum=3 x batch 2 gives the gradients of one batch of 6: the loss is normalised by the window's tokens."""
    model, tok = build(family)
    engine = Engine(model, tok, config(tmp_path, max_grad_norm=None))
    small = batches(engine, SPELLING, 2)  # uneven lengths: each micro-batch has its own token count
    big = batches(engine, SPELLING, 6)
    (accumulated,), (loss_acc,) = gradients_of_one_step(engine, [small])
    (whole,), (loss_whole,) = gradients_of_one_step(engine, [big])
    assert accumulated.keys() == whole.keys() and len(whole) > 0
    for name in whole:
        torch.testing.assert_close(accumulated[name], whole[name], atol=1e-6, rtol=0, msg=name)
    assert loss_acc == pytest.approx(loss_whole, abs=1e-6)


def test_naive_mean_per_micro_batch_would_differ(tmp_path):
    """Sanity check of the test above: the micro-batches really hold different token counts."""
    model, tok = tiny_bart()
    engine = Engine(model, tok, config(tmp_path))
    counts = {int((b["labels"] != -100).sum()) for b in batches(engine, SPELLING, 2)}
    assert len(counts) > 1


@pytest.mark.parametrize("family", ["bart", "t5", "bert2bert"])
def test_checkpointing_gives_same_loss_and_gradients(tmp_path, family):
    model, tok = build(family, layers=2)
    plain = Engine(model, tok, config(tmp_path, max_grad_norm=None))
    window = batches(plain, SPELLING, 6)
    (expected,), (loss,) = gradients_of_one_step(plain, [window])
    model2, tok2 = build(family, layers=2)
    freeze(model2, [r"embed|shared|word_embeddings"])  # frozen embeddings: block inputs need no grad
    model.load_state_dict(model2.state_dict())
    checkpointed = Engine(model2, tok2, config(tmp_path, max_grad_norm=None, grad_checkpointing=True))
    checkpointed.enable_checkpointing()
    checkpointed.model.train()
    (got,), (loss2,) = gradients_of_one_step(checkpointed, [window])
    assert loss2 == pytest.approx(loss, abs=1e-6)
    assert len(got) > 0
    for name, grad in got.items():
        torch.testing.assert_close(grad, expected[name], atol=1e-6, rtol=1e-5, msg=name)
    layer_grads = [n for n in got if "layer" in n]
    assert layer_grads, "checkpointed layers must still receive gradients"


def test_compile_runs_the_same_step(tmp_path):
    """Engine.compile: train_step runs the compiled module (the eager backend keeps the test fast); loss and
    gradients equal the uncompiled step's; the plain model stays for saving."""
    model, tok = build("bart", layers=1)
    plain = Engine(model, tok, config(tmp_path, max_grad_norm=None))
    window = batches(plain, SPELLING, 6)
    (expected,), (loss,) = gradients_of_one_step(plain, [window])
    model2, tok2 = build("bart", layers=1)
    model2.load_state_dict(model.state_dict())
    compiled = Engine(model2, tok2, config(tmp_path, max_grad_norm=None))
    compiled.compile(backend="eager")
    assert compiled.train_model is not compiled.model and compiled.model is model2
    compiled.model.train()
    (got,), (loss2,) = gradients_of_one_step(compiled, [window])
    assert loss2 == pytest.approx(loss, abs=1e-6)
    for name, grad in got.items():
        torch.testing.assert_close(grad, expected[name], atol=1e-6, rtol=1e-5, msg=name)


def test_bf16_autocast_on_cpu_trains(tmp_path):
    model, tok = tiny_bart(d_model=64)
    engine = Engine(model, tok, config(tmp_path, lr=3e-3, precision="bf16", device="cpu"))
    history = engine.overfit_batch(SPELLING, steps=60)
    assert history[-1]["loss"] < history[0]["loss"] / 3
    assert next(model.parameters()).dtype == torch.float32  # autocast, not a cast of the weights


def test_fp16_on_cpu_is_a_clear_error(tmp_path):
    model, tok = tiny_bart()
    with pytest.raises(ValueError, match="fp16.*CUDA"):
        Engine(model, tok, config(tmp_path, precision="fp16", device="cpu"))


def test_nothing_trainable_is_refused(tmp_path):
    model, tok = tiny_bart()
    freeze(model, [".*"])
    engine = Engine(model, tok, config(tmp_path))
    with pytest.raises(ValueError, match="no trainable parameters"):
        engine.fit(SPELLING)


def test_tensor_without_gradient_is_named(tmp_path):
    model, tok = tiny_bart()
    model.register_parameter("unused_head", torch.nn.Parameter(torch.zeros(3, 3)))
    engine = Engine(model, tok, config(tmp_path))
    with pytest.raises(TrainingStopped, match="1 trainable tensor.*no gradient.*unused_head"):
        engine.fit(SPELLING)


def test_all_zero_gradients_are_refused(tmp_path):
    model, tok = tiny_bart()
    engine = Engine(model, tok, config(tmp_path))
    window = batches(engine, SPELLING, 6)
    for batch in window:
        batch["labels"][:] = -100
        batch["labels"][:, 0] = 5  # one token per row so the loss is defined...
    for p in model.parameters():  # ...but a model whose weights are all zero passes no gradient back
        torch.nn.init.zeros_(p)
    with pytest.raises(TrainingStopped, match="every gradient is zero"):
        gradients_of_one_step(engine, [window])


def test_nonfinite_loss_skips_then_stops(tmp_path):
    model, tok = tiny_bart()
    engine = Engine(model, tok, config(tmp_path, max_nonfinite_steps=2))
    window = batches(engine, SPELLING, 6)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")  # shared embedding: every logit becomes NaN
    before = {n: p.clone() for n, p in model.named_parameters()}
    params = [p for p in model.parameters()]
    engine.optimizer = torch.optim.AdamW(params)
    engine.scheduler = torch.optim.lr_scheduler.LambdaLR(engine.optimizer, lambda s: 1.0)
    with pytest.warns(UserWarning, match="step 0: non-finite"):
        stats = engine.train_step(window)
    assert stats["skipped"]
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) or torch.isnan(p).any()
    with pytest.warns(UserWarning), pytest.raises(TrainingStopped, match="2 non-finite steps in a row"):
        engine.train_step(window)


def test_special_token_disagreement_is_refused(tmp_path):
    model, tok = tiny_bart()
    model.config.pad_token_id = 3
    with pytest.raises(ValueError, match="pad_token_id disagrees: model config says 3, tokenizer says 0"):
        Engine(model, tok, config(tmp_path))


def test_missing_decoder_start_is_refused_for_bert2bert(tmp_path):
    model, tok = build("bert2bert")
    model.config.decoder_start_token_id = None
    with pytest.raises(ValueError, match=r"decoder_start_token_id is missing.*cls_token_id"):
        Engine(model, tok, config(tmp_path))


def test_t5_start_token_defaults_to_pad(tmp_path):
    model, tok = tiny_t5()
    model.config.decoder_start_token_id = None
    model.generation_config.decoder_start_token_id = None
    engine = Engine(model, tok, config(tmp_path))
    assert engine.tokens.decoder_start == tok.pad_token_id


def test_tokenizer_larger_than_embedding_is_refused(tmp_path):
    model, tok = tiny_bart()
    model.resize_token_embeddings(10)
    with pytest.raises(ValueError, match="embedding has 10 rows"):
        Engine(model, tok, config(tmp_path))


def test_fit_logs_evaluates_and_saves(tmp_path):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model, tok = tiny_bart(d_model=64)
    cfg = config(tmp_path, lr=3e-3, epochs=40, batch_size=2, grad_accum=2, warmup_ratio=0.1, log_every=5,
                 eval_every=None)
    engine = Engine(model, tok, cfg)
    history = engine.fit(SPELLING * 2, eval=SPELLING)
    run = tmp_path / "run"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["split"] == "train"]
    assert train[0]["step"] == 5 and train[-1]["step"] == 40 * 3
    assert train[-1]["loss"] < train[0]["loss"]
    assert {"lr", "grad_norm", "samples_per_s", "tokens_per_s", "token_accuracy"} <= train[0].keys()
    final = history["eval"][-1]
    assert {"loss", "exact_match", "by_edit_distance", "rouge1", "rouge2", "rougeL"} <= final.keys()
    assert final["exact_match"] == 1.0
    assert final["by_edit_distance"]["1"]["n"] == 4 and final["by_edit_distance"]["2"]["n"] == 2
    predictions = [json.loads(x) for x in (run / "eval_predictions.jsonl").read_text().splitlines()]
    assert [p["source"] for p in predictions] == [s for s, _ in SPELLING]
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(run / "model")
    AutoTokenizer.from_pretrained(run / "model")
    assert os.path.exists(run / "model" / "model.safetensors")
    for (n, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), n


def test_save_replaces_atomically(tmp_path):
    model, tok = tiny_bart()
    engine = Engine(model, tok, config(tmp_path))
    target = tmp_path / "m"
    engine.save(str(target))
    (target / "marker").write_text("old")
    engine.save(str(target))
    assert not (target / "marker").exists()
    assert not (tmp_path / "m.tmp").exists() and not (tmp_path / "m.old").exists()


@pytest.mark.parametrize("family", ["bart", "t5", "bert2bert"])
def test_decoder_padding_mask_is_redundant_under_right_padding(tmp_path, family):
    """The engine leaves decoder_attention_mask out of the forward (faster); with right padding the causal mask
    already hides the pads, so every target position's logits are the same with or without it."""
    model, tok = build(family)
    engine = Engine(model, tok, config(tmp_path))
    model.eval()
    (batch,) = batches(engine, SPELLING, 6)
    assert (batch["decoder_attention_mask"] == 0).any()  # there is padding to hide
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "decoder_input_ids")}
    with torch.no_grad():
        without = model(**inputs).logits
        with_mask = model(**inputs, decoder_attention_mask=batch["decoder_attention_mask"]).logits
    real = batch["labels"] != -100
    torch.testing.assert_close(without[real], with_mask[real], atol=1e-5, rtol=0)


def test_lengths_beyond_the_position_table_are_refused(tmp_path):
    model, tok = tiny_bart()  # 128 learned positions
    with pytest.raises(ValueError, match="max_source_length=256 exceeds the model's 128 learned positions"):
        Engine(model, tok, config(tmp_path, max_source_length=256))
    tiny_t5_model, tok5 = tiny_t5()  # relative positions: no table, no limit
    Engine(tiny_t5_model, tok5, config(tmp_path, max_source_length=4096))


def test_reloaded_bert2bert_trains_without_a_stray_pooler(tmp_path):
    from finetune.models import load_seq2seq

    model, tok = build("bert2bert")
    engine = Engine(model, tok, config(tmp_path))
    engine.save(str(tmp_path / "saved"))
    reloaded, tok2 = load_seq2seq(str(tmp_path / "saved"))  # transformers re-adds a random BERT pooler
    assert reloaded.encoder.pooler is None
    Engine(reloaded, tok2, config(tmp_path / "again")).overfit_batch(SPELLING, steps=2)  # the gradient guard passes


def test_samples_per_s_leaves_the_evaluations_out(tmp_path):
    """An evaluation (here made slow by its callback) between two records does not lower the training rate."""
    import time

    engine = Engine(*tiny_bart(), config(tmp_path, max_steps=4, batch_size=2, log_every=2, eval_every=2))
    history = engine.fit(SPELLING, eval=SPELLING[:2], on_evaluate=lambda engine, metrics: time.sleep(1.0))
    after_evaluation = [r for r in history["train"] if r["step"] == 4][0]
    assert after_evaluation["samples"] / after_evaluation["samples_per_s"] < 0.9  # seconds of 2 tiny steps
