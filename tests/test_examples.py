"""Every example in smoke mode (tiny model, a few steps), offline.

The examples run in this process (`main(argv)`, as `python examples/X.py` calls it), which saves starting a
Python with torch and transformers per test; `--compare` starts its own processes, as it does for users, and
`run_process` runs one example exactly as a user would, traceback check included."""
import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


def run(script, *args):
    """`python examples/SCRIPT ARGS` in this process: returncode, stdout, stderr."""
    sys.path.insert(0, EXAMPLES)
    try:
        spec = importlib.util.spec_from_file_location(f"example_{script[:-3]}", os.path.join(EXAMPLES, script))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = module.main(list(args)) or 0
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.path.remove(EXAMPLES)
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def run_process(script, *args):
    return subprocess.run([sys.executable, os.path.join(EXAMPLES, script), *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_bitfit_bart_tiny_runs_end_to_end(tmp_path):
    out = run("bitfit_bart.py", "--model", "tiny", "--max-steps", "5", "--train-size", "64", "--eval-size", "8",
              "--output-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "RANDOMLY INITIALISED" in out.stdout
    assert "trainable parameters:" in out.stdout and "exact match" in out.stdout
    assert (tmp_path / "model" / "model.safetensors").exists()


def test_bitfit_bart_default_offline_says_what_to_do(tmp_path):
    out = run_process("bitfit_bart.py", "--output-dir", str(tmp_path))
    assert out.returncode == 2
    assert "could not load 'facebook/bart-base'" in out.stderr and "--model tiny" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("method", ["full", "bitfit", "lora", "frozen-encoder", "int8-lora", "dora", "lora-plus",
                                    "rslora", "qlora"])
def test_spelling_example_smoke(tmp_path, method):
    out = run("spelling_bert2bert.py", "--model", "tiny", "--method", method, "--max-steps", "4", "--train-size",
              "64", "--eval-size", "8", "--valid-size", "8", "--eval-every", "2", "--num-beams", "1",
              "--output-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "edit distance | pairs | exact match" in out.stdout


@pytest.mark.parametrize("noise", ["mask", "infill"])
def test_bart_next_line_tiny(tmp_path, noise):
    out = run("bart_next_line.py", "--model", "tiny", "--noise", noise, "--epochs", "2", "--output-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "(line, next line) pairs" in out.stdout and "->" in out.stdout


def test_lora_int8_flan_t5_tiny(tmp_path):
    out = run("lora_int8_flan_t5.py", "--model", "tiny", "--max-steps", "3", "--train-size", "32", "--eval-size", "4",
              "--output-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "quantize_int8:" in out.stdout and "exact match" in out.stdout
    assert (tmp_path / "adapter" / "adapter.safetensors").exists()
    assert (tmp_path / "adapter_peft" / "adapter_model.safetensors").exists()


def test_qlora_flan_t5_tiny(tmp_path):
    out = run("lora_int8_flan_t5.py", "--model", "tiny", "--method", "qlora", "--max-steps", "3", "--train-size", "32",
              "--eval-size", "4", "--output-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "quantize_4bit (nf4):" in out.stdout and "exact match" in out.stdout
    assert (tmp_path / "adapter_peft" / "adapter_model.safetensors").exists()


def test_lora_int8_flan_t5_default_offline_says_what_to_do(tmp_path):
    out = run("lora_int8_flan_t5.py", "--output-dir", str(tmp_path))
    assert out.returncode == 2 and "google/flan-t5-base" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("model", ["tiny", "minilm"])
def test_bert2bert_summarization_smoke(tmp_path, model):
    out = run("bert2bert_summarization.py", "--model", model, "--smoke", "--output-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "ROUGE-1" in out.stdout and "generated:" in out.stdout


def test_spelling_compare_tiny_writes_table_and_chart_on_its_own_budget(tmp_path):
    """--compare with its own budget (--budget-minutes): no probe of full, flags not passed on, at least 20 steps;
    the table and the chart. (Every method runs in test_spelling_example_smoke.)"""
    out = run("spelling_bert2bert.py", "--model", "tiny", "--compare", "--methods", "lora", "--budget-minutes",
              "0.001", "--budget", "time", "--train-size", "32", "--eval-size", "4", "--valid-size", "4",
              "--num-beams", "1", "--compare-probe-steps", "40", "--output-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "timing probe, full" not in out.stdout and "timing probe, lora" in out.stdout
    assert json.loads((tmp_path / "lora" / "result.json").read_text())["steps"] == 20  # at least 20
    table = (tmp_path / "compare.md").read_text()
    assert "| lora |" in table and "training min" in table
    assert (tmp_path / "compare.png").stat().st_size > 0


def test_spelling_compare_same_minutes_sets_steps_from_a_timed_probe(tmp_path):
    out = run("spelling_bert2bert.py", "--model", "tiny", "--compare", "--methods", "bitfit", "--max-steps", "40",
              "--train-size", "64", "--eval-size", "4", "--valid-size", "4", "--num-beams", "1",
              "--compare-probe-steps", "40", "--output-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    probes = {m: json.loads((tmp_path / f"probe-{m}.json").read_text()) for m in ("full", "bitfit")}  # full: budget
    assert all(p["steps"] == 40 and p["samples_per_s"] > 0 for p in probes.values())
    result = json.loads((tmp_path / "bitfit" / "result.json").read_text())
    want = max(20, round(40 * probes["bitfit"]["samples_per_s"] / probes["full"]["samples_per_s"] / 20) * 20)
    assert result["steps"] == want and f"bitfit {probes['bitfit']['samples_per_s']:.0f} samples/s -> {want} steps" \
        in out.stdout
    assert len(result["curve"]) == 4  # validated 4 times, whatever its step count
    assert not (tmp_path / "full").exists()  # probed for the budget, not trained


@pytest.mark.parametrize("flags, message", [(["--budget-minutes", "0"], "--budget-minutes must be"),
                                            (["--max-steps", "0"], "--max-steps must be >= 1"),
                                            (["--lora-r", "0"], "--lora-r must be >= 1"),
                                            (["--lora-alpha", "nan"], "--lora-alpha must be"),
                                            (["--compare-probe-steps", "20"], "--compare-probe-steps must be > 20"),
                                            (["--compare", "--budget", "steps", "--budget-minutes", "2"],
                                             "--budget-minutes sets the budget of --compare --budget time"),
                                            (["--budget-minutes", "2"], "it does nothing here")])
def test_spelling_example_refuses_bad_budgets(tmp_path, flags, message):
    flags = flags if "--budget" in flags or flags == ["--budget-minutes", "2"] else ["--compare", *flags]
    out = run("spelling_bert2bert.py", "--model", "tiny", *flags, "--output-dir", str(tmp_path))
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr
