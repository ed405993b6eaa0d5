"""Token-budget batches against fixed-size batches on the code-summary job: padding and training speed.

    python benchmarks/bench_batching.py                       # padding of each scheme, then timed steps
    python benchmarks/bench_batching.py --steps 0             # padding only (seconds)

Padding: the share of padded positions in one epoch's micro-batches (finetune.data.batching.padding_fraction) for
fixed batches of --batch-size (shuffled, and length-grouped as the engine does by default) and for
`max_tokens` budgets with about the same tokens a batch. Speed: --steps steps of full fine-tuning of the
bundled MiniLM bert2bert with each scheme, samples/s and real tokens/s, fresh process each, alternating.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def examples(max_source_length: int):
    from finetune.data.tokenize import tokenize_pairs
    from finetune.data.builtin import code_summary_pairs
    from finetune.models import bert2bert_by_name

    built = bert2bert_by_name("minilm")
    pairs = [(c, s.lower()) for c, s in code_summary_pairs("train")]
    tok = built.tokenizer
    return pairs, tokenize_pairs(pairs, tok, max_source_length, 32, tok.cls_token_id)[0], built


def schemes(args):
    return {"fixed, shuffled": {"batch_size": args.batch_size, "group_by_length": False},
            "fixed, length-grouped": {"batch_size": args.batch_size},
            f"max_tokens {args.max_tokens}": {"max_tokens": args.max_tokens}}


def worker(args) -> dict:
    from finetune import Engine, TrainConfig, new_tensor_lr

    pairs, _, built = examples(args.max_source_length)
    times, real = [], []
    cfg = TrainConfig(lr=2e-4, lr_overrides=new_tensor_lr(built.new_parameters, 1e-3), max_steps=args.steps,
                      max_source_length=args.max_source_length, max_target_length=32, optimizer="adamw",
                      progress=False, save_model=False, output_dir=tempfile.mkdtemp(), log_every=10**6,
                      **json.loads(args.scheme))
    engine = Engine(built.model, built.tokenizer, cfg)
    collate = engine.collate

    def counting(batch_examples):
        real.append(sum(len(e.input_ids) + len(e.labels) for e in batch_examples))
        return collate(batch_examples)

    engine.collate = counting
    history = {"samples": 0}

    def clock(engine, stats):
        times.append(time.perf_counter())
        if len(times) > 1:
            history["samples"] += stats["samples"]

    engine.fit(pairs, on_step=clock)
    seconds = times[-1] - times[0]
    return {"samples_per_s": history["samples"] / seconds, "tokens_per_s": sum(real[1:]) / seconds,
            "padding": engine.padding}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=None, help="default: about batch-size x the mean padded "
                                                                 "length of length-grouped batches")
    ap.add_argument("--max-source-length", type=int, default=256)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--scheme", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    from bench_real import machine
    from finetune import TrainConfig
    from finetune.data.batching import padding_fraction, training_sampler

    _, exs, _ = examples(args.max_source_length)
    if args.max_tokens is None:
        grouped = training_sampler(TrainConfig(batch_size=args.batch_size), exs).batches(0)
        padded = sum(len(b) * (max(len(exs[j].input_ids) for j in b) + max(len(exs[j].labels) for j in b))
                     for b in grouped)
        args.max_tokens = int(round(padded / len(grouped), -2))
    rows = {}
    for name, scheme in schemes(args).items():
        cfg = TrainConfig(max_source_length=args.max_source_length, max_target_length=32, **scheme)
        rows[name] = {"padding": padding_fraction(training_sampler(cfg, exs).batches(0), exs), "runs": []}
    for r in range(args.rounds if args.steps else 0):
        names = list(rows) if r % 2 == 0 else list(reversed(rows))
        for name in names:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--scheme", json.dumps(schemes(args)[name]),
                   "--steps", str(args.steps), "--max-source-length", str(args.max_source_length)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows[name]["runs"].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"round {r} {name}: {rows[name]['runs'][-1]}", flush=True)
    info = machine()
    lines = [f"{info['cpu']} ({info['cores']} cores, bf16 units: {info['bf16_units']}), Python {info['python']}; "
             f"{len(exs)} code-summary training pairs, sources cut at {args.max_source_length}, full fine-tuning, "
             f"fp32, {args.steps} steps, median of {args.rounds} rounds", "",
             "| batches | padding | samples/s | real tokens/s |", "|---|---|---|---|"]
    for name, row in rows.items():
        runs = sorted(row["runs"], key=lambda x: x["samples_per_s"])
        mid = runs[len(runs) // 2] if runs else None
        lines.append(f"| {name} | {row['padding']:.1%} | {mid['samples_per_s'] if mid else float('nan'):.2f} | "
                     f"{mid['tokens_per_s'] if mid else float('nan'):.0f} |")
    table = "\n".join(lines)
    print("\n" + table)
    out = args.out or os.path.join(ROOT, "benchmarks", "results", "batching")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"machine": info, "args": vars(args), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
