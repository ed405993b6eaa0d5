"""Bad inputs and faults across the engine, each tried as a new user would (a tiny BART, a few steps): the best
model, the preflight, the evaluation data, partial LoRA surgery, a missing best checkpoint on resume, strict CSV
quoting, an all-NaN early stop. Each is refused with a message naming the file and line, the parameter or the
pattern, or handled without losing work."""
import json
import math
import os
import shutil
import tempfile

import pytest
import torch
from conftest import RUN_DATA as DATA  # the short run with validation
from conftest import RUN_EVAL as EVAL
from conftest import SPELLING
from conftest import short_run as cfg
from conftest import spoil_after
from safetensors.torch import load_file

from finetune import DataError, Engine, apply_method, read_pairs
from finetune.cli import main
from finetune.methods.lora import LoRALinear
from finetune.methods.quant import is_quantized
from finetune.models import tiny_bart
from finetune.run_build import check_setup
from finetune.train.best import Best
from finetune.train.checkpoint import CheckpointError

OTHER_EVAL = [(f"teh {i}", f"the {i}") for i in range(6)]


def model_tensors(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def assert_same_weights(saved, checkpoint):
    shared = set(saved) & set(checkpoint)  # tied tensors are stored once, perhaps under different names
    assert len(shared) >= len(saved) - 3
    for name in shared:
        assert torch.equal(saved[name], checkpoint[name]), name


# --- 1. a NaN evaluation is never the best ----------------------------------------------------------------------

def test_a_nan_evaluation_is_never_the_best_and_counts_towards_patience():
    best = Best("loss", patience=3)
    assert [best.update({"loss": v}, s) for s, v in enumerate([math.nan, 4.26, math.nan, 4.02, math.inf])] == \
        [False, True, False, True, False]
    assert (best.value, best.step, best.since) == (4.02, 3, 1)
    higher = Best("rougeL")
    assert not higher.update({"rougeL": math.nan}, 1) and higher.update({"rougeL": 0.1}, 2)


def test_a_nan_first_evaluation_does_not_keep_the_step_one_weights(tmp_path):
    model, tok = tiny_bart()
    engine = Engine(model, tok, cfg(tmp_path, best_metric="loss", eval_every=2))
    real_evaluate, calls = engine.evaluate, []

    def first_is_nan(*args, **kwargs):  # the first evaluation's loss is NaN, as after an overflow
        result = real_evaluate(*args, **kwargs)
        calls.append(result["step"])
        return {**result, "loss": math.nan} if len(calls) == 1 else result

    engine.evaluate = first_is_nan
    with pytest.warns(UserWarning, match="evaluation loss is nan: never the best model"):
        history = engine.fit(DATA, eval=EVAL)
    finite = [r for r in history["eval"] if math.isfinite(r["loss"])]
    best_step = min(finite, key=lambda r: r["loss"])["step"]
    assert history["best"]["step"] == best_step > 2
    assert_same_weights(model_tensors(tmp_path / "model"),
                        model_tensors(tmp_path / "checkpoints" / f"step-{best_step:08d}"))


def test_early_stopping_when_no_evaluation_was_ever_finite_says_so(tmp_path):
    """Beyond the list: the early-stopping message formatted the best value, which was None."""
    model, tok = tiny_bart()
    engine = Engine(model, tok, cfg(tmp_path, best_metric="loss", early_stopping_patience=2))
    real_evaluate = engine.evaluate
    engine.evaluate = lambda *a, **k: {**real_evaluate(*a, **k), "loss": math.nan}
    with pytest.warns(UserWarning, match="never the best model"):
        history = engine.fit(DATA, eval=EVAL)
    assert "no finite value yet" in history["stopped_early"]
    assert "best" not in history  # model/ holds the last weights: there is no best evaluation


# --- 2. settings that can never act -----------------------------------------------------------------------------

@pytest.mark.parametrize("setting", [{"eval_every": 2}, {"eval_max_samples": 3}, {"eval_num_beams": 4}])
def test_evaluation_settings_without_evaluation_data_are_refused(tmp_path, setting):
    model, tok = tiny_bart()
    engine = Engine(model, tok, cfg(tmp_path, **{"eval_every": None, **setting}))
    name = next(iter(setting))
    with pytest.raises(ValueError, match=rf"TrainConfig\.{name}=.*no evaluation data.*fit\(train, eval=\.\.\.\)"):
        engine.prepare(DATA)


def test_a_best_model_whose_evaluations_all_fall_after_the_last_step_is_refused(tmp_path):
    model, tok = tiny_bart()
    engine = Engine(model, tok, cfg(tmp_path, best_metric="loss", early_stopping_patience=2, eval_every=100))
    with pytest.raises(ValueError, match=r"eval_every=100 is beyond the run's last step \(8\).*early stopping"
                                         r".*eval_every <= 8"):
        engine.prepare(DATA, eval=EVAL)
    plain = Engine(*tiny_bart(), cfg(tmp_path / "plain", eval_every=100))
    with pytest.warns(UserWarning, match="only the final one"):
        plain.prepare(DATA, eval=EVAL)  # no best model: only the final evaluation, said out loud


# --- 3. resuming with other evaluation data ---------------------------------------------------------------------

def test_resuming_with_other_evaluation_data_is_refused_when_a_best_model_is_kept(tmp_path):
    model, tok = tiny_bart()
    Engine(model, tok, cfg(tmp_path, best_metric="loss", save_every=4)).fit(DATA, eval=EVAL)
    again = Engine(*tiny_bart(), cfg(tmp_path, best_metric="loss", save_every=4))
    with pytest.raises(CheckpointError, match="the evaluation data differ.*best loss so far was measured"):
        again.prepare(DATA, eval=OTHER_EVAL, resume="latest")
    again.prepare(DATA, eval=EVAL, resume="latest")  # the same data resumes


def test_resuming_with_other_evaluation_data_warns_without_a_best_model(tmp_path):
    model, tok = tiny_bart()
    Engine(model, tok, cfg(tmp_path, save_every=4)).fit(DATA, eval=EVAL)
    with pytest.warns(UserWarning, match="the evaluation data differ.*not comparable"):
        Engine(*tiny_bart(), cfg(tmp_path, save_every=4)).prepare(DATA, eval=OTHER_EVAL, resume="latest")


# --- 4. a moved run folder finishes -----------------------------------------------------------------------------

class Interrupted(Exception):
    pass


def stop_at(step):
    def hook(engine, stats):
        if engine.global_step == step:
            raise Interrupted
    return hook


def test_a_moved_run_folder_resumes_and_writes_the_best_model(tmp_path, monkeypatch):
    import finetune.evaluate.metrics

    # the tiny model's early evaluations give one output for every input (collapsed), and a healthy evaluation
    # always replaces a collapsed best: here the best must be decided by the loss alone
    monkeypatch.setattr(finetune.evaluate.metrics, "COLLAPSE_SHARE", 2.0)
    first = tmp_path / "first"
    model, tok = tiny_bart()
    with pytest.raises(Interrupted):
        Engine(model, tok, cfg(first, best_metric="loss", save_every=2)).fit(DATA, eval=EVAL, on_step=stop_at(5))
    moved = tmp_path / "moved"
    shutil.move(str(first), str(moved))
    history = Engine(*tiny_bart(), cfg(moved, best_metric="loss", save_every=2)).fit(
        DATA, eval=EVAL, resume="latest", on_step=spoil_after(5))  # the best stays one from before the move
    best = history["best"]
    assert best["step"] <= 4
    assert best["path"] == str(moved / "checkpoints" / f"step-{best['step']:08d}")
    assert_same_weights(model_tensors(moved / "model"), model_tensors(best["path"]))


def test_resuming_when_the_best_checkpoint_is_gone_is_refused_before_training(tmp_path):
    """Beyond the list: a deleted best checkpoint used to fail only after the whole run, at model/."""
    model, tok = tiny_bart()
    history = Engine(model, tok, cfg(tmp_path, best_metric="loss", save_every=2)).fit(DATA, eval=EVAL,
                                                                                      on_step=spoil_after(3))
    assert history["best"]["step"] < 8
    shutil.rmtree(history["best"]["path"])
    engine = Engine(*tiny_bart(), cfg(tmp_path, best_metric="loss", save_every=2))
    with pytest.raises(CheckpointError, match="best evaluation's checkpoint .* is gone"):
        engine.prepare(DATA, eval=EVAL, resume="latest")


# --- 5. the preflight sees what fit will refuse, and leaves nothing behind ---------------------------------------

def test_check_fails_for_a_best_metric_without_evaluation_data(tmp_path):
    model, tok = tiny_bart()
    report = check_setup(model, tok, cfg(tmp_path, best_metric="loss", eval_every=None), SPELLING, steps=5)
    assert report.failed
    rows = {name: (status, detail) for status, name, detail in report.rows}
    assert rows["evaluation"][0] == "FAIL" and "needs evaluation data" in rows["evaluation"][1]
    ok = check_setup(*tiny_bart(), cfg(tmp_path, best_metric="loss"), SPELLING, steps=5, eval=EVAL)
    assert {name: status for status, name, _ in ok.rows}["evaluation"] == "PASS"


def test_finetune_check_on_a_run_file_fit_would_refuse_exits_1_and_leaves_no_temp_folder(tmp_path, monkeypatch,
                                                                                           capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"source": s, "target": t}) + "\n" for s, t in SPELLING))
    run = tmp_path / "run.toml"
    run.write_text(f'[model]\nname = "tiny-bart"\n[data]\ntrain = "{data}"\n[train]\nbest_metric = "loss"\n'
                   f'output_dir = "{tmp_path / "out"}"\nprogress = false\nprecision = "fp32"\n')
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    assert main(["check", str(run), "--steps", "5"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "best_metric='loss' needs evaluation data" in out and "ready to train" not in out
    assert os.listdir(scratch) == []  # the trial run's folder is removed
    assert main(["check", str(run), "--steps", "5", "--set", "train.best_metric=false"]) == 2  # a bad value


# --- 6. evaluation data errors say it is the evaluation data -----------------------------------------------------

def test_errors_in_evaluation_data_given_as_mappings_name_the_evaluation_data(tmp_path):
    model, tok = tiny_bart()
    engine = Engine(model, tok, cfg(tmp_path))
    rows = [{"source": s, "target": t} for s, t in EVAL]
    with pytest.raises(DataError, match=r"^evaluation data\[3\]: missing field\(s\) \['target'\]"):
        engine.prepare(DATA, eval=rows[:3] + [{"source": "wrod"}])
    with pytest.raises(DataError, match=r"^evaluation data: no pairs given"):
        engine.prepare(DATA, eval=[])
    with pytest.raises(DataError, match=r"^training data\[1\]: empty target"):
        engine.prepare([("teh", "the"), ("wich", " ")], eval=rows)


# --- 7. LoRA settings are checked before the model is quantised ---------------------------------------------------

@pytest.mark.parametrize("method", ["qlora", "int8-lora"])
def test_quantising_methods_refuse_bad_lora_targets_before_quantising(method):
    pytest.importorskip("bitsandbytes")
    model, _ = tiny_bart()
    with pytest.raises(ValueError, match=r"target pattern\(s\) \['no_such_layer'\] match no linear layer"):
        apply_method(model, method, lora_targets=["no_such_layer"])
    assert not any(is_quantized(m) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())  # untouched
    apply_method(model, method, lora_targets=["q_proj", "v_proj"])  # the corrected retry works
    assert any(is_quantized(m) for m in model.modules())


def test_lora_with_one_bad_target_among_good_ones_changes_nothing():
    """Beyond the list: apply_lora wrapped the matching layers before it refused the pattern that matched none."""
    model, _ = tiny_bart()
    with pytest.raises(ValueError, match="match no linear layer"):
        apply_method(model, "lora", lora_targets=["q_proj", "nothing_here"])
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    with pytest.raises(ValueError, match="also_train pattern"):
        from finetune import apply_lora
        apply_lora(model, targets=["q_proj"], also_train=["no_such_tensor"])
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


# --- 9, 10. bad rows named by file and line ---------------------------------------------------------------------

def test_a_lone_surrogate_in_a_jsonl_row_is_refused_naming_the_line(tmp_path):
    path = tmp_path / "surrogate.jsonl"
    path.write_text('{"source": "teh", "target": "the"}\n{"source": "\\ud800", "target": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"surrogate\.jsonl:2: source holds a lone surrogate"):
        read_pairs(path)
    with pytest.raises(DataError, match=r"data\[0\]: target holds a lone surrogate"):
        read_pairs([("teh", "the\udc80")])


@pytest.mark.parametrize("text,line", [
    ('source,target\n"teh,the\nwrod,word\nrecieve,receive\n', 2),
    ('teh,the\nwrod,"word\nrecieve,receive\nwich,which\n', 2),  # would have been read as 2 columns: silently wrong
    ('teh,the\n"a\nb",c\nd,"e\n', 4),  # a legitimate multi-line cell first, then the open quote
])
def test_an_unterminated_csv_quote_is_reported_where_it_opens(tmp_path, text, line):
    path = tmp_path / "openquote.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=rf"openquote\.csv:{line}: a quote \(\"\) opened on this line is never closed"):
        read_pairs(path)


def test_text_after_a_closing_csv_quote_is_refused_not_dropped(tmp_path):
    """Beyond the list: `"teh"x,the` was read as 'tehx' (the quote silently dropped)."""
    path = tmp_path / "stray.csv"
    path.write_text('wich,which\n"teh"x,the\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"stray\.csv:2: malformed CSV"):
        read_pairs(path)


# --- 11. a damaged weights file is named ------------------------------------------------------------------------

def test_generate_with_a_truncated_model_file_names_the_file(tmp_path, capsys):
    model, tok = tiny_bart()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert main(["generate", "--model", str(folder), "teh"]) == 2
    err = capsys.readouterr().err
    assert f"{weights}: damaged weights file" in err and "cut short" in err
    assert "offline" not in err


def test_early_stopping_patience_that_can_never_act_is_said(tmp_path):
    """Beyond the list: patience 4 with 4 evaluations in the whole run can never stop it."""
    engine = Engine(*tiny_bart(), cfg(tmp_path, best_metric="loss", early_stopping_patience=4, eval_every=2))
    with pytest.warns(UserWarning, match=r"early_stopping_patience=4 needs at least 5 evaluations and this run has "
                                         r"4.*never stop early"):
        engine.prepare(DATA, eval=EVAL)


def test_check_fails_for_an_output_folder_that_train_would_refuse(tmp_path):
    """Beyond the list: `finetune check` said "ready to train" for an output_dir holding another run's outputs,
    which `finetune train` refuses at once."""
    Engine(*tiny_bart(), cfg(tmp_path, eval_every=None)).fit(DATA)
    report = check_setup(*tiny_bart(), cfg(tmp_path, eval_every=None), SPELLING, steps=5)
    rows = {name: (status, detail) for status, name, detail in report.rows}
    assert report.failed and rows["output folder"][0] == "FAIL" and "already holds the outputs" in \
        rows["output folder"][1]
    resumed = check_setup(*tiny_bart(), cfg(tmp_path, eval_every=None), SPELLING, steps=5, resume=True)
    assert "output folder" not in {name for _, name, _ in resumed.rows}
