"""The benchmark script runs end to end in a tiny configuration (its figures are not checked: speed is shown
by running it, never asserted in tests)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_train_smoke_with_peer(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_train.py"), "--models", "minilm", "--methods",
           "lora", "--checkpointing", "off", "--precisions", "fp32", "--batch-size", "2", "--warmup", "1",
           "--steps", "2", "--src-len", "8", "--tgt-len", "4", "--out", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads((tmp_path / "results.json").read_text())
    assert {"cpu", "cores", "torch", "transformers"} <= data["machine"].keys()
    results = data["results"]
    assert len(results) == 2  # ours and the peer
    for r in results:
        assert "error" not in r, r
        assert r["samples_per_s"] > 0 and r["peak_memory_mib"] > 0
    ours = [r for r in results if r["engine"] == "ours"]
    assert all(0 < r["mfu"] < 1 and r["trainable"] < r["total"] for r in ours)
    table = (tmp_path / "results.md").read_text()
    assert "| minilm | lora | off | fp32 |" in table
    assert (tmp_path / "results.png").stat().st_size > 1000


def test_bench_long_smoke_with_peer(tmp_path):
    """The long-input benchmark: ours padded and packed and the peer, the same trainable count, whole-life peak RSS,
    MFU, the table (a row for each of ours)."""
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_long.py"), "--methods", "bitfit", "--rounds", "1",
           "--steps", "2", "--batch-size", "2", "--max-source-length", "32", "--checkpointing", "on",
           "--out", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert {r["engine"] for r in runs} == {"ours", "packed", "peer"} and len({r["trainable"] for r in runs}) == 1
    assert all(r["samples_per_s"] > 0 and r["peak_rss_mib"] > 100 and r["gflops_per_s"] > 0 for r in runs)
    table = (tmp_path / "results.md").read_text()
    assert "| bitfit | on | ours |" in table and "| bitfit | on | packed |" in table and "matmul peak" in table


def test_bench_large_smoke(tmp_path):
    """The big-model benchmark at a tiny shape: the checkpoint written in shards, QLoRA quantised while it loads
    (wo too), trained, its adapter saved and reloaded, one generation, the table; the checkpoint deleted."""
    pytest.importorskip("bitsandbytes")
    checkpoint = tmp_path / "checkpoint"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_large.py"), "--size", "tiny", "--methods",
           "qlora-kept", "--steps", "2", "--shard-gb", "0.0002", "--checkpoint", str(checkpoint),
           "--out", str(tmp_path / "out")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["checkpoint"]["shards"] > 1 and not checkpoint.exists()
    (run,) = data["runs"]
    assert run["ok"] and run["quantize_kept"] and run["adapter_reloaded"] and len(run["step_s"]) == 2
    assert 0 < run["trainable"] < run["frozen"] and run["peak_mib"] >= run["load_peak_mib"] > 100
    assert 0 < run["mfu"] and run["tokens_per_s"] > 0
    assert "| qlora (wo quantised too) |" in (tmp_path / "out" / "results.md").read_text()


def test_matmul_peak_prints_each_precision():
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "matmul_peak.py"), "--precisions", "fp32", "--repeats",
           "1", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["gflops"]["fp32"] > 0


def test_bench_data_smoke(tmp_path):
    """The data benchmark on a 300-pair file: cold caches (1 process, every core), a warm one (a cache hit), the
    list path."""
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_data.py"), "--part", "start", "--pairs", "300",
           "--list-pairs", "300", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "out")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["start"]
    from finetune.data.corpus import default_num_proc

    cold = [("file", "cold", 1)] + ([("file", "cold", default_num_proc())] if default_num_proc() > 1 else [])
    assert [(r["path"], r["cache"], r["num_proc"]) for r in rows[:-2]] == cold  # 1 process, then every core
    assert [(r["path"], r["cache"]) for r in rows[-2:]] == [("file", "warm"), ("list", "none (list)")]
    assert all(r["pairs"] == 300 and r["peak_first_window_mib"] > 100 for r in rows)
    assert rows[-2]["origin"].startswith("cache hit")
    assert "| 300 | file | warm |" in (tmp_path / "out" / "results.md").read_text()


def test_recipe_seeds_tabulates_each_run_and_the_distribution(tmp_path, monkeypatch):
    """The runs (fresh processes of the example, each with its --result-json) are replaced here by their figures:
    the table marks a collapsed run, names the precision used, gives min / median / max and the machine."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("recipe_seeds", os.path.join(ROOT, "benchmarks", "recipe_seeds.py"))
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    calls = []

    def fake_run(args, precision, seed, extra):
        calls.append((precision, seed, extra))
        rouge = [0.30, 0.16, 0.28][seed]
        return {"requested": precision, "seed": seed, "precision": "bf16" if precision == "auto" else precision,
                "model": {"rougeL": rouge, "bleu": 6.0, "exact_match": 0.0},
                "baseline": {"rougeL": 0.161, "bleu": 0.04, "exact_match": 0.0},
                "variety": {"collapsed": seed == 1, "distinct_share": 0.01 if seed == 1 else 0.9},
                "train_seconds": 480, "peak_rss_mib": 4400}

    monkeypatch.setattr(recipe, "run_one", fake_run)
    assert recipe.main(["--runs", "auto=3", "--out", str(tmp_path), "--", "--max-source-length", "256"]) == 0
    assert calls == [("auto", s, ["--max-source-length", "256"]) for s in range(3)]
    table = (tmp_path / "results.md").read_text()
    assert "family" in table and "| auto (bf16) | 1 | 0.160 |" in table and "**COLLAPSED**" in table
    assert "| auto | 3 | 1 | 0.160 / 0.280 / 0.300 |" in table
    assert len(json.loads((tmp_path / "results.json").read_text())["runs"]) == 3
    with pytest.raises(SystemExit, match="expected PRECISION=COUNT"):
        recipe.main(["--runs", "fp8=2", "--out", str(tmp_path)])
    calls.clear()
    assert recipe.main(["--runs", "fp32=2", "--first-seed", "1", "--out", str(tmp_path / "more")]) == 0
    assert calls == [("fp32", 1, []), ("fp32", 2, [])]
    with pytest.raises(SystemExit):
        recipe.main(["--runs", "fp32=1", "--first-seed", "-1", "--out", str(tmp_path)])


def test_decoding_sweep_scores_each_setting_on_validation(tmp_path):
    """A trained run's model/ folder decoded under each length penalty: one row per setting, the best marked, the
    references' length beside the predictions'; a bad grid is refused before anything loads."""
    run = [sys.executable, os.path.join(ROOT, "examples", "code_summary_bert2bert.py"), "--model", "tiny",
           "--train-size", "16", "--valid-size", "4", "--eval-size", "4", "--max-steps", "2", "--eval-every", "2",
           "--max-source-length", "64", "--num-beams", "2", "--max-new-tokens", "4", "--output-dir", str(tmp_path)]
    assert subprocess.run(run, capture_output=True, text=True, timeout=600).returncode == 0
    sweep = [sys.executable, os.path.join(ROOT, "benchmarks", "decoding_sweep.py"), str(tmp_path / "model"),
             "--valid-size", "6", "--num-beams", "2", "--length-penalties", "0.5", "2.0", "--max-source-length", "64",
             "--max-new-tokens", "4", "--out", str(tmp_path / "sweep")]
    out = subprocess.run(sweep, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    assert [r["length_penalty"] for r in rows] == [0.5, 2.0] and all(r["pairs"] == 6 for r in rows)
    table = (tmp_path / "sweep.md").read_text()
    assert "6 validation pairs" in table and table.count("**") == 2 and "| 2 | 0.5 | 3 |" in table
    bad = subprocess.run(sweep[:3] + ["--num-beams", "0"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--num-beams: every value must be >= 1" in bad.stderr


def test_profile_real_profiles_the_long_input_job():
    """The step profile on the code-summary job's model, lengths and token-budget batches: the rate, the seconds a
    step and the operator table."""
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "profile_real.py"), "--data", "code", "--max-tokens",
           "512", "--warmup", "1", "--steps", "1", "--rows", "3", "--shapes"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "s a step:" in out.stdout and "Self CPU" in out.stdout
