"""Validation during training, the best model, early stopping, BLEU/chrF, `finetune check`, TensorBoard, and data
given as mappings (issue "Training that keeps its best model and tells you it is right")."""
import json
import os
import signal

import pytest
import torch
from conftest import RUN_DATA as DATA
from conftest import RUN_EVAL as EVAL
from conftest import SPELLING
from conftest import short_run as cfg
from conftest import spoil_after
from safetensors.torch import load_file

from finetune import Engine, TrainConfig
from finetune.evaluate.metrics import GenerationMetrics
from finetune.models import tiny_bart, tiny_bert2bert
from finetune.run_build import check_setup
from finetune.train.best import Best


def events(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


# --- the best so far -------------------------------------------------------------------------------------------

def test_best_knows_each_metrics_direction_and_threshold():
    loss = Best("loss")
    assert [loss.update({"loss": v}, s) for s, v in enumerate([3.0, 2.0, 2.5, 1.0])] == [True, True, False, True]
    assert (loss.value, loss.step, loss.since) == (1.0, 3, 0)
    exact = Best("exact_match", patience=2, threshold=0.05)
    assert [exact.update({"exact_match": v}, s) for s, v in enumerate([0.1, 0.12, 0.2, 0.21])] == \
        [True, False, True, False]
    assert exact.since == 1 and not exact.stop
    exact.update({"exact_match": 0.22}, 4)
    assert exact.stop


def test_unknown_best_metric_and_patience_without_metric_are_refused():
    with pytest.raises(ValueError, match="TrainConfig.best_metric='accuracy'"):
        TrainConfig(best_metric="accuracy")
    with pytest.raises(ValueError, match="early_stopping_patience.*needs best_metric"):
        TrainConfig(early_stopping_patience=2)
    model, tok = tiny_bart()
    with pytest.raises(ValueError, match="best_metric='loss' needs evaluation data"):
        Engine(model, tok, TrainConfig(best_metric="loss", progress=False, output_dir="/tmp/unused")).prepare(DATA)


def test_model_folder_holds_the_best_evaluations_weights_bit_for_bit(tmp_path):
    model, tok = tiny_bart()
    history = Engine(model, tok, cfg(tmp_path, best_metric="loss")).fit(DATA, eval=EVAL, on_step=spoil_after(5))
    healthy = [r for r in history["eval"] if not r["collapsed"]] or history["eval"]  # a collapse is never the best
    best_step = min(healthy, key=lambda r: r["loss"])["step"]
    assert best_step < 8 and history["best"]["step"] == best_step
    best = load_file(str(tmp_path / "checkpoints" / f"step-{best_step:08d}" / "model.safetensors"))
    saved = load_file(str(tmp_path / "model" / "model.safetensors"))
    shared = set(saved) & set(best)  # tied tensors are stored once, perhaps under different names
    assert len(shared) >= len(saved) - 3
    for name in shared:
        assert torch.equal(saved[name], best[name]), name
    last = load_file(str(tmp_path / "checkpoints" / "step-00000008" / "model.safetensors"))  # the last weights
    assert any(not torch.equal(last[n], best[n]) for n in best)
    assert any(e.get("event") == "best_model" and e["step"] == best_step for e in events(tmp_path))


def test_pruning_never_deletes_the_best_checkpoint(tmp_path):
    model, tok = tiny_bart()
    history = Engine(model, tok, cfg(tmp_path, best_metric="loss", save_every=1, keep_last=1)).fit(
        DATA, eval=EVAL, on_step=spoil_after(3))
    kept = sorted(os.listdir(tmp_path / "checkpoints"))
    assert f"step-{history['best']['step']:08d}" in kept and "step-00000008" in kept


def test_early_stopping_stops_at_the_right_evaluation(tmp_path):
    model, tok = tiny_bart()
    history = Engine(model, tok, cfg(tmp_path, max_steps=40, best_metric="loss", early_stopping_patience=2)).fit(
        DATA, eval=EVAL, on_step=spoil_after(3))
    evals = history["eval"]
    best = min(range(len(evals)), key=lambda i: evals[i]["loss"])
    assert len(evals) == best + 1 + 2  # the best, then two evaluations without improvement
    assert evals[-1]["step"] < 40 and "early stopping" in history["stopped_early"]
    assert (tmp_path / "model" / "config.json").exists()


def test_resume_keeps_the_best_and_patience_and_ends_bit_identical(tmp_path):
    def run(out, on_step=None, resume=None):
        model, tok = tiny_bart()
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.1
        config = cfg(out, max_steps=12, best_metric="loss", early_stopping_patience=4, save_every=1, keep_last=20)
        return Engine(model, tok, config).fit(DATA, eval=EVAL, on_step=on_step, resume=resume)

    def spoil_then_stop(engine, stats):
        spoil_after(5)(engine, stats)
        if engine.global_step == 7:
            os.kill(os.getpid(), signal.SIGTERM)

    whole = run(tmp_path / "a", on_step=spoil_after(5))
    with pytest.raises(SystemExit):
        run(tmp_path / "b", on_step=spoil_then_stop)
    resumed = run(tmp_path / "b", on_step=spoil_after(5), resume="latest")
    assert resumed["best"] == {**whole["best"], "path": resumed["best"]["path"]}
    assert resumed.get("stopped_early") == whole.get("stopped_early")
    a, b = load_file(str(tmp_path / "a" / "model" / "model.safetensors")), \
        load_file(str(tmp_path / "b" / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    evals_a = [e for e in events(tmp_path / "a") if e["split"] == "eval"]
    evals_b = [e for e in events(tmp_path / "b") if e["split"] == "eval"]
    assert [(e["step"], e["loss"]) for e in evals_a] == [(e["step"], e["loss"]) for e in evals_b]


def test_evaluations_during_training_are_greedy_on_a_fixed_subset_and_the_final_one_uses_the_beams(tmp_path):
    model, tok = tiny_bart()
    history = Engine(model, tok, cfg(tmp_path, eval_max_samples=4, num_beams=3)).fit(DATA, eval=EVAL)
    assert all(r["n"] == 4 and r["num_beams"] == 1 for r in history["eval"])
    final = history["final_eval"]
    assert final["n"] == len(EVAL) and final["num_beams"] == 3 and final["final"]


# --- metrics ---------------------------------------------------------------------------------------------------

def test_bleu_and_chrf_are_sacrebleus():
    import sacrebleu

    pairs = [("the cat sat on the mat", "the cat sat on a mat"), ("a quick brown fox", "a quick brown fox"),
             ("hello there world", "hello world")]
    metrics = GenerationMetrics()
    for target, prediction in pairs:
        metrics.add("src", target, prediction)
    result = metrics.result()
    assert result["bleu"] == sacrebleu.corpus_bleu([p for _, p in pairs], [[t for t, _ in pairs]]).score
    assert result["chrf"] == sacrebleu.corpus_chrf([p for _, p in pairs], [[t for t, _ in pairs]]).score


def test_edit_distance_handles_long_texts():
    from finetune.evaluate.metrics import edit_distance

    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("a" * 2000, "b" * 200) == 2000


# --- finetune check ----------------------------------------------------------------------------------------------

def check_cfg(tmp_path, **kw):
    return TrainConfig(**{**dict(lr=3e-3, batch_size=8, progress=False, output_dir=str(tmp_path), precision="fp32"),
                          **kw})


def test_check_passes_on_a_correct_setup(tmp_path):
    model, tok = tiny_bart()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    report = check_setup(model, tok, check_cfg(tmp_path), SPELLING, steps=300)
    assert not report.failed, str(report)
    assert [name for _, name, _ in report.rows] == ["special tokens", "data", "batches", "evaluation", "first batch",
                                                    "truncation", "parameter groups", "gradients", "overfit one batch",
                                                    "outputs differ", "output folder"]
    # the trial trained the model itself (a copy would double an 11B model's memory) and put its weights back
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())
    assert model.training is True and all(p.grad is None for p in model.parameters())


def _failed(report):
    return {name: detail for status, name, detail in report.rows if status == "FAIL"}


def pad_in_labels(batch, pad):
    batch["labels"][batch["labels"] == -100] = pad
    return batch


def shift_missing(batch, pad):
    batch["decoder_input_ids"] = batch["labels"].clamp(min=pad)
    return batch


@pytest.mark.parametrize("broken,message", [(pad_in_labels, "pad id"), (shift_missing, "shifted right")])
def test_check_fails_on_a_collator_that_breaks_the_batch(tmp_path, broken, message):
    model, tok = tiny_bart()
    engine = Engine(model, tok, check_cfg(tmp_path))
    collate = engine.collate
    engine.collate = lambda examples: broken(collate(examples), engine.tokens.pad)  # a user's own collator
    assert message in _failed(engine.check(SPELLING, steps=5))["first batch"]


def test_check_fails_when_everything_is_frozen(tmp_path):
    from finetune.methods import freeze

    model, tok = tiny_bart()
    freeze(model, [".*"])
    assert "nothing is trainable" in _failed(check_setup(model, tok, check_cfg(tmp_path), SPELLING))["parameter groups"]


def test_check_fails_when_new_tensors_train_at_a_small_pretrained_rate(tmp_path):
    model, tok = tiny_bert2bert()
    new = [n for n, _ in model.named_parameters() if "crossattention" in n]
    report = check_setup(model, tok, check_cfg(tmp_path, lr=5e-5), SPELLING, new_parameters=new, steps=5)
    assert "newly initialised tensors" in _failed(report)["parameter groups"]


def test_check_fails_on_a_mismatched_pad_id(tmp_path):
    model, tok = tiny_bart()
    model.config.pad_token_id = 5
    report = check_setup(model, tok, check_cfg(tmp_path), SPELLING)
    assert "pad_token_id disagrees" in _failed(report)["special tokens"]


def test_finetune_check_command_exits_nonzero_on_fail(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"source": s, "target": t}) + "\n" for s, t in SPELLING))
    run = tmp_path / "run.toml"
    run.write_text(f'[model]\nname = "tiny-bart"\n[method]\nname = "full"\nfreeze = [".*"]\n[data]\ntrain = "{data}"\n'
                   f'[train]\nprogress = false\noutput_dir = "{tmp_path / "out"}"\n')
    from finetune.cli import main

    code, out = main(["check", str(run), "--steps", "5"]), capsys.readouterr().out  # `finetune check RUN --steps 5`
    assert code == 1 and "FAIL  parameter groups" in out and "nothing is trainable" in out


# --- logs and data ---------------------------------------------------------------------------------------------

def test_tensorboard_event_files_are_written_and_readable(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model, tok = tiny_bart()
    Engine(model, tok, cfg(tmp_path, max_steps=4, report_to=["tensorboard"])).fit(DATA, eval=EVAL)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/grad_norm", "train/samples_per_s", "eval/exact_match"} <= set(tags)
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]


def test_data_as_mappings_like_a_datasets_dataset(tmp_path):
    class Rows:  # what an HF datasets.Dataset looks like to the engine: a sized iterable of dicts
        def __init__(self, rows):
            self.rows = rows

        def __len__(self):
            return len(self.rows)

        def __iter__(self):
            return iter(self.rows)

    rows = Rows([{"typo": s, "fix": t} for s, t in DATA])
    model, tok = tiny_bart()
    engine = Engine(model, tok, cfg(tmp_path, source_field="typo", target_field="fix", max_steps=2, eval_every=None))
    history = engine.fit(rows, eval=Rows([{"typo": s, "fix": t} for s, t in EVAL]))
    assert history["eval"][0]["n"] == len(EVAL)
