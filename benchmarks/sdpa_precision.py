"""SDPA forward + backward on a CPU: bf16 inputs, the same inputs cast to float32 (what `sdpa_float32` does under bf16
autocast: finetune/models/attention.py), and float32, at the shapes of the long-input job (12 heads of 32).

    python benchmarks/sdpa_precision.py                  # 7 rows x 12 heads, keys 128 / 256 / 512, padding mask
    python benchmarks/sdpa_precision.py --keys 64 128 --queries 32

Prints milliseconds a call (mean of --repeats after 5 warm-up calls) and the CPU. One process, nothing else running.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def time_attention(dtype, upcast: bool, rows: int, queries: int, keys: int, repeats: int) -> float:
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(rows, 12, queries, 32, generator=gen).to(dtype).requires_grad_()
    k, v = (torch.randn(rows, 12, keys, 32, generator=gen).to(dtype).requires_grad_() for _ in range(2))
    mask = torch.ones(rows, 1, 1, keys, dtype=torch.bool)
    mask[:, :, :, keys - keys // 8:] = False  # some padding, as in a batch

    def call():
        inputs = [t.float() for t in (q, k, v)] if upcast else [q, k, v]
        F.scaled_dot_product_attention(*inputs, attn_mask=mask).to(dtype).sum().backward()

    for _ in range(5):
        call()
    started = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - started) / repeats * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=7)
    ap.add_argument("--keys", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--queries", type=int, default=None, help="default: as many as keys (self-attention)")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args(argv)
    if min(args.keys) < 1 or args.rows < 1 or args.repeats < 1 or (args.queries is not None and args.queries < 1):
        ap.error("--rows, --keys, --queries and --repeats must be >= 1")
    import torch
    from bench_real import machine

    print(machine())
    print("| queries x keys | bf16 ms | bf16 cast to float32 ms | float32 ms |\n|---|---|---|---|")
    for keys in args.keys:
        queries = args.queries or keys
        row = [time_attention(dtype, up, args.rows, queries, keys, args.repeats)
               for dtype, up in ((torch.bfloat16, False), (torch.bfloat16, True), (torch.float32, False))]
        print(f"| {queries} x {keys} | " + " | ".join(f"{ms:.2f}" for ms in row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
