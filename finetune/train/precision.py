"""Numeric precision of a run, as one object: which dtype, why, the autocast context, and the loss scaler.

    fp32   no autocast
    bf16   autocast to bfloat16 (CUDA with bf16, or a CPU with AMX / AVX-512-BF16 units); no scaler needed
    fp16   autocast to float16 with a dynamic loss scaler (CUDA only; T5-family activations overflow it)
    auto   bf16 where the hardware has bf16 matrix units, else fp32 (`choose`): on a CPU without them bf16
           is emulated and about 29x slower than fp32

The scaler is always there (nanoGPT's `GradScaler(enabled=dtype == "float16")`), disabled unless fp16, so the
training step has no precision branch: `backward(loss)`, `unscale_(optimizer)`, `step(optimizer, finite)`.
"""
from __future__ import annotations

import contextlib
import functools
import math
import warnings

import torch

from finetune.families import family_of

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where they cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_bf16_units() -> str | None:
    """Which bf16 matrix units this CPU has ("AMX", "AVX-512-BF16"), or None."""
    flags = cpu_flags()
    if "amx_bf16" in flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX-512-BF16"
    return None


def choose(device: torch.device) -> tuple[str, str]:
    """precision='auto': (precision, reason)."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", f"CUDA device {torch.cuda.get_device_name(device)} supports bfloat16"
        return "fp32", "this GPU has no bfloat16 support (fp16 needs a loss scaler: ask for it explicitly)"
    units = cpu_bf16_units()
    if device.type == "cpu" and units:
        return "bf16", f"this CPU has {units} bf16 matrix units"
    return "fp32", "this CPU has no bf16 matrix units (AMX or AVX-512-BF16): bf16 would be emulated and slow"


class Precision:
    """Built once from the config's `precision`, the device and the model (checks happen here)."""

    def __init__(self, name: str, device: torch.device, model=None):
        self.requested = name
        if name == "auto":
            name, self.reason = choose(device)
        else:
            self.reason = "as configured"
        if name == "fp16" and device.type != "cuda":
            raise ValueError("precision='fp16' needs a CUDA device (fp16 autocast with a loss scaler); "
                             "on CPU use precision='bf16', 'fp32' or 'auto'")
        if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("precision='bf16': this GPU does not support bfloat16; use 'fp16' or 'fp32'")
        if name == "fp16" and model is not None and not family_of(model).fp16_safe:
            warnings.warn(f"precision='fp16' with a {family_of(model).name} model: its activations overflow "
                          "float16 and the loss turns to NaN; precision='bf16' is the safe choice", stacklevel=3)
        self.name = name
        self.device = device
        self.dtype = DTYPES[name]
        self.scaler = torch.amp.GradScaler(device.type if device.type == "cuda" else "cpu", enabled=name == "fp16")

    def apply_to(self, model) -> None:
        """Tell the layers that compute in a dtype of their own (a module with `set_compute_dtype`: the 4-bit
        bases) the dtype this precision computes in (float32 for fp32)."""
        for module in model.modules():
            if hasattr(module, "set_compute_dtype"):
                module.set_compute_dtype(self.dtype or torch.float32)

    def float32_attention(self, setting: bool | None) -> str | None:
        """TrainConfig.attention_fp32: why attention runs in float32 under this precision (finetune.models.
        attention), or None where it does not. None (auto): on for bf16 on a CPU with AVX-512-BF16 and no AMX, where
        its bf16 flash kernel was measured slower; not measured on AMX, so off there. Never without autocast or on a
        GPU (whose bf16 attention kernels are fast)."""
        if setting is False or self.dtype is None or self.device.type != "cpu":
            return None
        if setting is None and cpu_bf16_units() != "AVX-512-BF16":
            return None
        return "as configured" if setting else "auto: this CPU's bf16 attention kernel is the slower one"

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def unscale_(self, optimizer) -> None:
        self.scaler.unscale_(optimizer)

    def step(self, optimizer, loss: float, grad_norm: float | None) -> tuple[bool, bool]:
        """The optimizer step, or none: (skipped, diverging). fp16's scaler skips steps with inf/nan gradients
        itself and lowers its scale - routine while it finds its scale, so only a non-finite loss counts as
        diverging; otherwise a non-finite loss or gradient norm skips the step and counts."""
        if self.scaler.is_enabled():
            scale = self.scaler.get_scale()
            self.scaler.step(optimizer)
            self.scaler.update()
            return self.scaler.get_scale() < scale, not math.isfinite(loss)
        if not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm)):
            return True, True
        optimizer.step()
        return False, False

    def __str__(self) -> str:
        chosen = f"{self.name} (auto: {self.reason})" if self.requested == "auto" else self.name
        return f"precision {chosen}"
