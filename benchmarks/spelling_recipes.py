"""Recipe search for the main job: run examples/spelling_bert2bert.py with other settings and tabulate.

Each row is one run of the example in its own process (same data, same seed), so every row is exactly a
command anyone can rerun. Rows are chosen by their validation exact match (500 greedy pairs, the example's
evaluation during training); the test column is the example's final report on --eval-size test pairs (beam 4),
shown for information, not used to choose.

    python benchmarks/spelling_recipes.py                       # the rows below, in order
    python benchmarks/spelling_recipes.py --rows lr2e-4 ls0.1   # some of them
    python benchmarks/spelling_recipes.py --steps 800 --precision fp32

Results: benchmarks/results/spelling_recipes/{ROW}.json and recipes.md (rows already measured are reused;
--again reruns them).
"""
import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLE = os.path.join(HERE, "..", "examples", "spelling_bert2bert.py")

# name -> the example's flags (on top of --max-steps / --precision / --eval-size); every row names its dropout
# (0.1 is MiniLM's own), so rows stay what they were when the example's defaults change
ROWS = {
    "lr1e-4": ["--lr", "1e-4", "--new-lr", "1e-3", "--dropout", "0.1"],
    "lr2e-4": ["--lr", "2e-4", "--new-lr", "1e-3", "--dropout", "0.1"],
    "lr3e-4/new2e-3": ["--lr", "3e-4", "--new-lr", "2e-3", "--dropout", "0.1"],
    "lr2e-4/ls0.1": ["--lr", "2e-4", "--new-lr", "1e-3", "--label-smoothing", "0.1", "--dropout", "0.1"],
    "lr2e-4/batch32": ["--lr", "2e-4", "--new-lr", "1e-3", "--batch-size", "32", "--steps-x", "2", "--dropout", "0.1"],
    "lr5e-4/new2e-3": ["--lr", "5e-4", "--new-lr", "2e-3", "--dropout", "0.1"],
    "lr2e-4/drop0": ["--lr", "2e-4", "--new-lr", "1e-3", "--dropout", "0"],
    "lr3e-4/new2e-3/drop0": ["--lr", "3e-4", "--new-lr", "2e-3", "--dropout", "0"],
    "lr1e-4/drop0": ["--lr", "1e-4", "--new-lr", "1e-3", "--dropout", "0"],
    "lr2e-4/drop0/ls0.1": ["--lr", "2e-4", "--new-lr", "1e-3", "--dropout", "0", "--label-smoothing", "0.1"],
    "lr2e-4/drop0/frozen-enc-emb": ["--lr", "2e-4", "--new-lr", "1e-3", "--dropout", "0",
                                    "--freeze", "^encoder\\.embeddings\\.word_embeddings\\."],
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--steps", type=int, default=800, help="optimizer steps of batch 64 (--steps-x scales them)")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--eval-size", type=int, default=500, help="test pairs of each row's final report")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "spelling_recipes"))
    ap.add_argument("--runs", default=os.path.join(HERE, "..", "runs", "spelling_recipes"),
                    help="where each row's run (checkpoints, model) goes; only the result files go to --out")
    ap.add_argument("--again", action="store_true", help="rerun rows that already have a result")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for name in args.rows:
        flags = list(ROWS[name])
        scale = 1
        if "--steps-x" in flags:
            i = flags.index("--steps-x")
            scale = int(flags[i + 1])
            del flags[i:i + 2]
        file = os.path.join(args.out, name.replace("/", "_") + f"_{args.steps}_{args.precision}.json")
        if os.path.exists(file) and not args.again:
            continue
        cmd = [sys.executable, EXAMPLE, *flags, "--max-steps", str(args.steps * scale),
               "--eval-every", str(args.steps * scale // 4), "--precision", args.precision,
               "--eval-size", str(args.eval_size), "--output-dir", os.path.join(args.runs, name.replace("/", "_")),
               "--overwrite-output-dir", "--result-json", file]
        print("==", name, " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True)
        with open(file, encoding="utf-8") as f:
            result = json.load(f)
        result.update(row=name, flags=flags, steps_per_64=args.steps)
        with open(file, "w", encoding="utf-8") as f:
            json.dump(result, f)
    table = tabulate(args.out)
    print(table)
    with open(os.path.join(args.out, "recipes.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    return 0


def tabulate(folder) -> str:
    rows = []
    for file in sorted(os.listdir(folder)):
        if file.endswith(".json"):
            with open(os.path.join(folder, file), encoding="utf-8") as f:
                r = json.load(f)
            if "row" in r:
                rows.append(r)
    rows.sort(key=lambda r: (r.get("precision", ""), r["steps"], -r["best_valid"].get("value", 0)))
    lines = ["| row | flags | precision | steps | validation exact match (best) | test exact match | "
             "training minutes | samples/s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['row']} | `{' '.join(r['flags'])}` | {r['precision']} | {r['steps']} | "
                     f"{r['best_valid'].get('value', 0):.3f} (step {r['best_valid'].get('step')}) | "
                     f"{r['exact_match']:.3f} ({r.get('test_pairs', '?')}) | {r['train_seconds'] / 60:.1f} | "
                     f"{r['samples_per_s']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
