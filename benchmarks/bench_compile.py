"""Does `torch.compile` speed up the engine's training step? Eager vs compiled, each in a fresh process.

    python benchmarks/bench_compile.py --model bart-base --batch-size 16 --src-len 32 --tgt-len 16

Runs `Engine.train_step` on the same synthetic batches as bench_train.py, with the model as it is and with
`Engine.compile()` (torch.compile, inductor, default mode: the module the step calls); prints compile/warm-up time
and samples/s after warm-up. The fit loop does not compile by default because this probe found no gain on the CPU
the figures in the README come from; rerun it where you train.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def worker(args) -> dict:
    import torch

    from bench_train import build, synthetic_examples_for
    from finetune import Engine, TrainConfig

    torch.manual_seed(0)
    model, tok, _ = build(args.model)
    cfg = TrainConfig(lr=1e-4, batch_size=args.batch_size, progress=False, output_dir=tempfile.mkdtemp(),
                      save_model=False, device="cuda" if torch.cuda.is_available() else "cpu")
    engine = Engine(model, tok, cfg)
    if args.mode == "compile":
        engine.compile()
    model.train()
    total = args.warmup + args.steps
    engine.build_optimizer(total, 0)
    examples = synthetic_examples_for(model, tok, args.batch_size * total, args.src_len, args.tgt_len)
    windows = [[engine.collate(examples[i * args.batch_size:(i + 1) * args.batch_size])] for i in range(total)]
    start = time.perf_counter()
    for w in windows[:args.warmup]:
        engine.train_step(w)
    warm = time.perf_counter()
    for w in windows[args.warmup:]:
        engine.train_step(w)
    end = time.perf_counter()
    return {"mode": args.mode, "warmup_s": warm - start, "samples_per_s": args.steps * args.batch_size / (end - warm)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("eager", "compile"), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", choices=("minilm", "bart-base", "t5-base"), default="bart-base")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--src-len", type=int, default=32)
    ap.add_argument("--tgt-len", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=11)
    args = ap.parse_args(argv)
    if args.mode:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0
    for mode in ("eager", "compile"):
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--mode", mode, *(argv or sys.argv[1:])],
                              capture_output=True, text=True)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{mode}: failed\n{proc.stderr[-3000:]}")
            return 1
        r = json.loads(lines[-1][7:])
        print(f"{args.model} {mode}: warm-up {r['warmup_s']:.1f} s, {r['samples_per_s']:.2f} samples/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
