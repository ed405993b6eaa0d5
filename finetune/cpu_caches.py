"""Bounds on the CPU matmul library's per-shape caches, set when `finetune` is imported.

On a CPU, bf16 matrix multiplies (and a few fp32 ones) run through oneDNN, which keeps every kernel it builds in
two caches keyed by the exact tensor shapes: oneDNN's primitive cache (`ONEDNN_PRIMITIVE_CACHE_CAPACITY`, 1024
entries by default) and ideep's computation cache in PyTorch (`LRU_CACHE_CAPACITY`, 1024). With a token budget or
length-grouped batches every micro-batch has new shapes, so both fill up over the first hundreds of steps, and
their long-lived entries, scattered among the step's freed activations, keep glibc from reusing or returning that
memory. Measured on the long-input job (examples/code_summary_bert2bert.py, sources at 256 tokens, bf16, AMD EPYC
Zen 4, 2026-12-05): resident memory grew from 1.3 GB to 3.1-3.4 GB in 120 steps with the default capacities, and
stayed at 1.9 GB with 128 / 64 entries, at the same speed (steps 20-100: 82.9 s against 80.7-84.3 s); at sources of
128 tokens, 64 / 32 entries took another 146-175 MiB off the training phase at the same speed (120 steps, two
alternating pairs: 133.6 / 123.2 s against 133.8 / 134.6 s, the same predictions; benchmarks/RESULTS.md). A capacity
smaller than one step's kernels would rebuild kernels every step (with 0 entries the step was 4x slower), so the
bounds keep at least one step's worth: one bf16 training step of BART or T5 with LoRA, or of bert2bert, calls 19-25
distinct matmul shapes (counted with a TorchDispatchMode; the layer structure, not the width, sets the count).

Both variables are read once, when oneDNN builds its first kernel, so they are set at import, before any model
runs; a value the user exported is kept as it is.
"""
from __future__ import annotations

import os

SHAPE_CACHE_BOUNDS = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64", "LRU_CACHE_CAPACITY": "32"}


def bound_shape_caches(environ=os.environ) -> dict[str, str]:
    """Set each cache bound the environment does not already set; returns the values in force."""
    for name, value in SHAPE_CACHE_BOUNDS.items():
        environ.setdefault(name, value)
    return {name: environ[name] for name in SHAPE_CACHE_BOUNDS}
