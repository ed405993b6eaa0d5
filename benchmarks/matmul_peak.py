"""This machine's matrix-multiply peak, the denominator of every MFU figure in the benchmarks.

    python benchmarks/matmul_peak.py            # fp32 and bf16, 2048 x 2048 (CPU) / 8192 (CUDA), best of 5

Prints GFLOP/s per precision (the best of --repeats timings of a square matmul with every thread torch uses) and
the CPU's bf16 units (AMX / AVX-512-BF16; without them bf16 is emulated and its "peak" is far below fp32's).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def peaks(precisions=("fp32", "bf16"), repeats: int = 5) -> dict[str, float]:
    """GFLOP/s of each precision's matmul on this machine: the best of `repeats` timings."""
    import torch

    from bench_train import matmul_peak

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {p: max(matmul_peak(p, device) for _ in range(repeats)) / 1e9 for p in precisions}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precisions", nargs="+", choices=("fp32", "bf16", "fp16"), default=["fp32", "bf16"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    import torch

    from bench_real import machine

    found = peaks(tuple(args.precisions), args.repeats)
    info = machine()
    if args.json:
        print(json.dumps({"machine": info, "gflops": found}))
        return 0
    print(f"{info['cpu']} ({info['cores']} cores, bf16 units: {info['bf16_units']}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    for name, value in found.items():
        print(f"{name}: {value:.1f} GFLOP/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
