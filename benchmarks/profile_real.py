"""Where the time of one training step goes, on the real job (MiniLM bert2bert, codespell, batch 64).

    python benchmarks/profile_real.py --method full --precision fp32 --steps 8
    python benchmarks/profile_real.py --method full --precision fp32 --optimizer single   # AdamW before fused

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
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--fused-loss", default=None, choices=("on", "off", "auto"))
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--lora-targets", default=None, metavar="REGEX",
                    help="the adapter methods' targets (default: the family's; the main job's: "
                         "'\\.(query|key|value|dense)$')")
    ap.add_argument("--optimizer", choices=("engine", "single", "foreach"), default="engine",
                    help="engine: the engine's AdamW (fused); single / foreach: torch's other AdamW loops, for comparison")
    ap.add_argument("--lora-dropout", type=float, default=None, help="the adapter methods' dropout (the main job: 0)")
    args = ap.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    from finetune import Engine, TrainConfig, apply_method, new_tensor_lr
    from finetune.data.builtin import codespell_pairs
    from finetune.models import bert2bert, minilm_path

    torch.manual_seed(0)
    built = bert2bert(minilm_path())
    apply_method(built.model, args.method, built.new_parameters,
                 lora_targets=[args.lora_targets] if args.lora_targets else None, lora_dropout=args.lora_dropout)
    extra = {} if args.fused_loss is None else {"fused_loss": {"on": True, "off": False, "auto": None}[args.fused_loss]}
    cfg = TrainConfig(lr=1e-4, lr_overrides=new_tensor_lr(built.new_parameters, 1e-3), batch_size=args.batch_size,
                      precision=args.precision, max_source_length=32, max_target_length=32, progress=False,
                      save_model=False, output_dir=tempfile.mkdtemp(), warmup_ratio=0.05, **extra)
    engine = Engine(built.model, built.tokenizer, cfg)
    pairs = codespell_pairs("train", limit=args.batch_size * (args.warmup + 2 * args.steps), seed=0)
    run = engine.prepare(pairs)
    if args.optimizer != "engine":  # the same groups and schedule under another AdamW implementation
        from finetune.train.optim import build_scheduler

        groups = [{"params": g["params"], "lr": g.get("initial_lr", g["lr"]), "weight_decay": g["weight_decay"],
                   "betas": g["betas"], "eps": g["eps"]} for g in engine.optimizer.param_groups]
        engine.optimizer = torch.optim.AdamW(groups, foreach=args.optimizer == "foreach")
        engine.scheduler = build_scheduler(engine.optimizer, run.total_steps, 0, cfg.schedule)
    print(f"{engine.precision}; {engine.loss.reason}; AdamW {args.optimizer}")
    windows = [w for _, w in engine.windows(run, 0)]
    for w in windows[:args.warmup]:
        engine.train_step(w)
    start = time.perf_counter()
    for w in windows[args.warmup:args.warmup + args.steps]:
        engine.train_step(w)
    plain = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for w in windows[args.warmup + args.steps:args.warmup + 2 * args.steps]:
            engine.train_step(w)
        profiled = time.perf_counter() - start
    print(f"samples/s: {args.steps * args.batch_size / plain:.1f} (profiled: {args.steps * args.batch_size / profiled:.1f})")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
