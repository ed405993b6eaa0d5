"""What a dropout mask costs on this CPU, and what cheaper ways to draw the same one would save.

    python benchmarks/dropout_masks.py                 # a (16, 100, 384) activation, p = 0.1
    python benchmarks/dropout_masks.py --shape 1 1500 384 --p 0.1 --repeat 50

Times (ms a call, mean of --repeat after one warm-up, one thread pool as torch sets it): torch's own dropout in
training mode (what BERT's, T5's and BART's layers call), its parts (`bernoulli_` into a float tensor, then the
multiply), and candidates with the same distribution: a uniform draw compared with the keep probability (`rand <
1 - p`: P(keep) = 1 - p to float32 resolution), the mask applied as a bool multiply. Nothing here changes the
engine; it is the measurement behind the note on dropout in benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def timed(fn, repeat: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", type=int, nargs="+", default=[16, 100, 384])
    ap.add_argument("--p", type=float, default=0.1)
    ap.add_argument("--repeat", type=int, default=30)
    args = ap.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from bench_real import machine

    torch.manual_seed(0)
    x, p, keep = torch.randn(*args.shape), args.p, 1 - args.p
    mask = torch.rand(x.shape) < keep
    cases = {
        "F.dropout (training)": lambda: F.dropout(x, p, True),
        "bernoulli_ into float": lambda: torch.empty_like(x).bernoulli_(keep),
        "bernoulli_ into bool": lambda: torch.empty(x.shape, dtype=torch.bool).bernoulli_(keep),
        "rand < keep (bool)": lambda: torch.rand(x.shape) < keep,
        "x * bool mask / keep": lambda: x * mask * (1 / keep),
    }
    info = machine()
    print(f"{info.get('cpu')} ({info.get('cores')} cores, bf16 units: {info['bf16_units']}), torch "
          f"{info.get('torch')}; shape {tuple(args.shape)} ({x.numel():,} elements), p {p}, mean of {args.repeat}")
    for name, fn in cases.items():
        ms = timed(fn, args.repeat)
        print(f"{name:<24} {ms:7.3f} ms  {ms * 1e6 / x.numel():5.2f} ns / element")
    return 0


if __name__ == "__main__":
    sys.exit(main())
