"""Where the time of one training step goes, on the real job (MiniLM bert2bert, codespell, batch 64) or the
long-input job (`--data code`: stdlib code -> summary, token-budget batches, as examples/code_summary_bert2bert.py).

    python benchmarks/profile_real.py --method full --precision fp32 --steps 8
    python benchmarks/profile_real.py --data code --max-tokens 1024 --precision fp32 --steps 20
    python benchmarks/profile_real.py --method full --precision fp32 --optimizer single   # AdamW before fused
    python benchmarks/profile_real.py --data code --precision bf16 --compile dynamic --warmup 20
    python benchmarks/profile_real.py --data code --precision bf16 --attention-fp32 off   # bf16 attention kernels
    python benchmarks/profile_real.py --data code --max-source-length 256 --pack          # packed batches
    python benchmarks/profile_real.py --data code --max-source-length 256 --max-tokens 0 --batch-size 16 --dropout 0.1
                                                                   # bench_long.py's batches and dropout

Runs a few steps through the engine's public seam (`Engine.prepare`, `Engine.windows`, `Engine.train_step`),
then profiles `--steps` more with torch.profiler and prints the operators with the most self CPU time, and
the samples/s of the profiled and unprofiled steps. One process, nothing else should run beside it.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="full")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--data", choices=("spelling", "code"), default="spelling")
    ap.add_argument("--batch-size", type=int, default=64, help="spelling, and code with --max-tokens 0: pairs a batch")
    ap.add_argument("--max-tokens", type=int, default=1024, help="code: padded tokens per batch (0: --batch-size)")
    ap.add_argument("--dropout", type=float, default=0.0,
                    help="code: every dropout layer's rate (the job's 0; the checkpoint's own 0.1, as bench_long.py)")
    ap.add_argument("--max-source-length", type=int, default=128, help="code: source tokens kept (the job's 128)")
    ap.add_argument("--pack", action="store_true", help="TrainConfig.pack: each micro-batch one padding-free row")
    ap.add_argument("--no-grouping", action="store_true", help="TrainConfig.group_by_length=False: shuffled batches")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--fused-loss", default=None, choices=("on", "off", "auto"))
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--shapes", action="store_true", help="one row per operator and input shapes")
    ap.add_argument("--lora-targets", default=None, metavar="REGEX",
                    help="the adapter methods' targets (default: the family's; the main job's: "
                         "'\\.(query|key|value|dense)$')")
    ap.add_argument("--optimizer", choices=("engine", "single", "foreach"), default="engine",
                    help="engine: the engine's AdamW (fused); single / foreach: torch's other AdamW loops, for "
                         "comparison")
    ap.add_argument("--lora-dropout", type=float, default=None, help="the adapter methods' dropout (the main job: 0)")
    ap.add_argument("--attention-fp32", choices=("auto", "on", "off"), default="auto",
                    help="TrainConfig.attention_fp32 (auto: on for bf16 on CPUs with AVX-512-BF16 and no AMX)")
    ap.add_argument("--compile", choices=("off", "static", "dynamic"), default="off",
                    help="Engine.compile() before the warm-up steps (dynamic: dynamic=True, one graph for the "
                         "token-budget batches' varying shapes); the warm-up's seconds include the compilation")
    args = ap.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    from finetune import Engine, TrainConfig, apply_method, new_tensor_lr
    from finetune.data.builtin import code_summary_pairs, codespell_pairs
    from finetune.models import bert2bert, bert2bert_by_name, minilm_path, set_dropout

    torch.manual_seed(0)
    if args.data == "code":  # the long-input job's model, lengths and batches
        built = bert2bert_by_name("minilm", cross_init="self", seed=0)
        set_dropout(built.model, args.dropout)
        shape = {"max_tokens": args.max_tokens or None, "batch_size": args.batch_size,
                 "max_source_length": args.max_source_length, "max_target_length": 32, "label_smoothing": 0.1}
        pairs = [(code, summary.lower()) for code, summary in code_summary_pairs("train")]
    else:
        built = bert2bert(minilm_path())
        shape = {"batch_size": args.batch_size, "max_source_length": 32, "max_target_length": 32}
        pairs = codespell_pairs("train", limit=args.batch_size * (args.warmup + 2 * args.steps), seed=0)
    apply_method(built.model, args.method, built.new_parameters,
                 lora_targets=[args.lora_targets] if args.lora_targets else None, lora_dropout=args.lora_dropout)
    setting = {"on": True, "off": False, "auto": None}
    extra = {"attention_fp32": setting[args.attention_fp32], "pack": args.pack, "group_by_length": not args.no_grouping}
    extra |= {} if args.fused_loss is None else {"fused_loss": setting[args.fused_loss]}
    cfg = TrainConfig(lr=1e-4, lr_overrides=new_tensor_lr(built.new_parameters, 1e-3), precision=args.precision,
                      progress=False, save_model=False, output_dir=tempfile.mkdtemp(), warmup_ratio=0.05, **shape,
                      **extra)
    engine = Engine(built.model, built.tokenizer, cfg)
    run = engine.prepare(pairs)
    if args.optimizer != "engine":  # the same groups and schedule under another AdamW implementation
        from finetune.train.optim import build_scheduler

        groups = [{"params": g["params"], "lr": g.get("initial_lr", g["lr"]), "weight_decay": g["weight_decay"],
                   "betas": g["betas"], "eps": g["eps"]} for g in engine.optimizer.param_groups]
        engine.optimizer = torch.optim.AdamW(groups, foreach=args.optimizer == "foreach")
        engine.scheduler = build_scheduler(engine.optimizer, run.total_steps, 0, cfg.schedule)
    print(f"{engine.precision}; {engine.loss.reason}; AdamW {args.optimizer}")
    windows = [w for _, w in engine.windows(run, 0)]
    if len(windows) < args.warmup + 2 * args.steps:  # before any step is spent
        raise SystemExit(f"--warmup {args.warmup} + 2 x --steps {args.steps} needs more batches than the "
                         f"{len(windows)} of one epoch")
    if args.compile != "off":
        engine.compile(dynamic=args.compile == "dynamic")
    start = time.perf_counter()
    for w in windows[:args.warmup]:
        engine.train_step(w)
    print(f"warm-up: {args.warmup} steps in {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    plain_samples = sum(engine.train_step(w)["samples"] for w in windows[args.warmup:args.warmup + args.steps])
    plain = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CPU], record_shapes=args.shapes) as prof:
        start = time.perf_counter()
        profiled_samples = sum(engine.train_step(w)["samples"]
                               for w in windows[args.warmup + args.steps:args.warmup + 2 * args.steps])
        profiled = time.perf_counter() - start
    print(f"samples/s: {plain_samples / plain:.1f} (profiled: {profiled_samples / profiled:.1f}); s a step: "
          f"{plain / args.steps:.3f} (profiled: {profiled / args.steps:.3f})")
    print(prof.key_averages(group_by_input_shape=args.shapes).table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
