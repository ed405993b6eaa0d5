"""A recipe is a distribution, not a run: an example's default command over seeds and precisions, each run in a
fresh process, tabulated per run and as min / median / max, with the machine.

    python benchmarks/recipe_seeds.py                                   # the code-summary job: auto x 5, fp32 x 3
    python benchmarks/recipe_seeds.py --runs auto=3 -- --max-source-length 256
    python benchmarks/recipe_seeds.py --script examples/spelling_bert2bert.py --runs auto=3

Each run is `python SCRIPT --seed S --precision P --output-dir OUT/P-seedS [extra flags]`; the script writes its
figures with --result-json (the examples' `results.json` fields). Runs whose evaluation collapsed (one prediction
for nearly every input) are marked, never averaged in silently. Writes OUT/results.json and OUT/results.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

from common import cpu_description  # noqa: E402

FIGURES = (("rougeL", "ROUGE-L"), ("bleu", "BLEU"), ("exact_match", "exact match"))


def parse_runs(items: list[str]) -> list[tuple[str, int]]:
    runs = []
    for item in items:
        precision, _, count = item.partition("=")
        if precision not in ("auto", "fp32", "bf16") or not count.isdigit() or int(count) < 1:
            raise SystemExit(f"--runs {item!r}: expected PRECISION=COUNT with PRECISION auto, fp32 or bf16")
        runs.append((precision, int(count)))
    return runs


def run_one(args, precision: str, seed: int, extra: list[str]) -> dict:
    name = f"{precision}-seed{seed}"
    folder, result_json = os.path.join(args.out, name), os.path.join(args.out, f"{name}.json")
    cmd = [sys.executable, os.path.join(ROOT, args.script), "--seed", str(seed), "--precision", precision,
           "--output-dir", folder, "--overwrite-output-dir", "--result-json", result_json, *extra]
    print("$", " ".join(cmd), flush=True)
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    with open(os.path.join(args.out, f"{name}.log"), "w", encoding="utf-8") as f:
        f.write(done.stdout + done.stderr)
    if done.returncode != 0 or not os.path.exists(result_json):
        return {"requested": precision, "precision": precision, "seed": seed,
                "error": done.stderr[-2000:] or f"exit {done.returncode}"}
    with open(result_json, encoding="utf-8") as f:
        result = json.load(f)
    return {**result, "requested": precision, "seed": seed, "wall_s": time.perf_counter() - started}


def summary(rows: list[dict], key: str) -> str:
    values = [r["model"][key] for r in rows if "model" in r]
    if not values:
        return "-"
    return f"{min(values):.3f} / {statistics.median(values):.3f} / {max(values):.3f}"


def table(results: list[dict], machine: str) -> str:
    lines = [f"Machine: {machine}", "", "| precision | seed | ROUGE-L | BLEU | baseline ROUGE-L / BLEU | distinct | "
             "collapsed | training min | peak RSS MiB |", "|" + "---|" * 9]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['requested']} | {r['seed']} | error | | | | | | |")
            continue
        m, b, v = r["model"], r["baseline"], r.get("variety", {})
        used = r["requested"] + (f" ({r['precision']})" if r["precision"] != r["requested"] else "")
        lines.append(f"| {used} | {r['seed']} | {m['rougeL']:.3f} | {m['bleu']:.2f} | {b['rougeL']:.3f} / "
                     f"{b['bleu']:.2f} | {v.get('distinct_share', float('nan')):.0%} | "
                     f"{'**COLLAPSED**' if v.get('collapsed') else 'no'} | {r['train_seconds'] / 60:.1f} | "
                     f"{r['peak_rss_mib']:.0f} |")
    lines += ["", "| precision | runs | collapsed | ROUGE-L min / median / max | BLEU min / median / max |",
              "|---|---|---|---|---|"]
    for precision in dict.fromkeys(r["requested"] for r in results):
        rows = [r for r in results if r["requested"] == precision and "model" in r]
        collapsed = sum(bool(r.get("variety", {}).get("collapsed")) for r in rows)
        lines.append(f"| {precision} | {len(rows)} | {collapsed} | {summary(rows, 'rougeL')} | "
                     f"{summary(rows, 'bleu').replace('.000', '.00')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--script", default="examples/code_summary_bert2bert.py")
    ap.add_argument("--runs", nargs="+", default=["auto=5", "fp32=3"],
                    help="PRECISION=COUNT (seeds FIRST..FIRST+COUNT-1)")
    ap.add_argument("--first-seed", type=int, default=0, help="the first seed of each precision's runs (FIRST)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "recipe_seeds"))
    ap.add_argument("--timeout", type=int, default=3600, help="seconds one run may take")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if args.first_seed < 0:
        ap.error(f"--first-seed must be >= 0, got {args.first_seed}")
    os.makedirs(args.out, exist_ok=True)
    machine = cpu_description()
    results = []
    for precision, count in parse_runs(args.runs):
        for seed in range(args.first_seed, args.first_seed + count):
            results.append(run_one(args, precision, seed, extra))
            with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
                json.dump({"machine": machine, "script": args.script, "extra": extra, "runs": results}, f, indent=1)
            with open(os.path.join(args.out, "results.md"), "w", encoding="utf-8") as f:
                f.write(table(results, machine))
    print(table(results, machine))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
