"""Int8 base weights: a small wrapper over bitsandbytes' `Linear8bitLt` (LLM.int8(), Dettmers et al., 2022).

Each weight row is stored as int8 with one float32 scale (absmax / 127); at matmul time, input columns
holding an outlier above `threshold` (default 6.0) go through a float path. The weights are frozen: train
LoRA adapters on top (`finetune.methods.apply_method(model, "int8-lora")`). bitsandbytes >= 0.45 runs
this on CPU as well as CUDA.
"""
from __future__ import annotations

from .patterns import compile_patterns
from dataclasses import dataclass

import torch
from torch import nn


def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError as err:
        raise ImportError(
            "int8 base weights need bitsandbytes, which is not installed (or cannot load on this machine): "
            "pip install -e '.[int8]'  (bitsandbytes >= 0.45 runs on CPU and CUDA)"
        ) from err
    return bitsandbytes


class Int8Linear(nn.Module):
    """A frozen int8 copy of an nn.Linear: forward, `dequantize()` back to float, and a repr that says what it holds."""

    is_int8_linear = True

    def __init__(self, linear: nn.Linear, threshold: float = 6.0):
        super().__init__()
        bnb = _bitsandbytes()
        self.in_features, self.out_features, self.threshold = linear.in_features, linear.out_features, threshold
        device = linear.weight.device
        inner = bnb.nn.Linear8bitLt(self.in_features, self.out_features, bias=linear.bias is not None,
                                    has_fp16_weights=False, threshold=threshold, device="cpu")
        inner.weight = bnb.nn.Int8Params(linear.weight.detach().float().cpu().clone(), requires_grad=False,
                                         has_fp16_weights=False)
        if linear.bias is not None:
            inner.bias = nn.Parameter(linear.bias.detach().float().cpu().clone(), requires_grad=False)
        self.inner = inner.to(device)  # moving the module quantises the weight
        if self.inner.weight.dtype != torch.int8:
            raise RuntimeError(f"Int8Linear: bitsandbytes left the weight as {self.inner.weight.dtype} on {device}")

    @property
    def weight(self) -> torch.Tensor:
        return self.inner.weight

    @property
    def bias(self):
        return self.inner.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)

    def scales(self) -> torch.Tensor:
        """Row scales (absmax per output row); bitsandbytes moves them into its matmul state at the first forward."""
        scales = getattr(self.inner.weight, "SCB", None)
        return scales if scales is not None else self.inner.state.SCB

    def dequantize(self) -> nn.Linear:
        """A float32 nn.Linear with the int8 weights scaled back (row * scale / 127)."""
        from bitsandbytes.functional import int8_vectorwise_dequant

        weight = int8_vectorwise_dequant(self.inner.weight.data, self.scales()).float()
        out = nn.Linear(self.in_features, self.out_features, bias=self.inner.bias is not None, device=weight.device)
        with torch.no_grad():
            out.weight.copy_(weight)
            if self.inner.bias is not None:
                out.bias.copy_(self.inner.bias.float())
        return out

    def weight_bytes(self) -> int:
        w, scales = self.inner.weight, self.scales()
        return w.numel() * w.element_size() + scales.numel() * scales.element_size()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int8 weight + float32 row "
                f"scales, outlier threshold={self.threshold}, frozen")


@dataclass
class QuantizeReport:
    replaced: int
    bytes_before: int
    bytes_after: int

    def __str__(self) -> str:
        return (f"quantize_int8: {self.replaced} linear layers to int8; their weights {self.bytes_before / 2**20:.1f} "
                f"MiB -> {self.bytes_after / 2**20:.1f} MiB ({self.bytes_before / max(1, self.bytes_after):.1f}x less)")


def quantize_int8(model: nn.Module, skip=(), threshold: float = 6.0) -> QuantizeReport:
    """Replace nn.Linear layers by Int8Linear, except the LM head and modules whose name (or whose weight's
    name) matches a `skip` regex. Embeddings stay as they are."""
    _bitsandbytes()
    skip_res = compile_patterns(skip, "quantize_int8 skip")
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    replaced, before, after = 0, 0, 0
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or module is output or ".lora_" in name:
            continue
        if any(rx.search(name) or rx.search(name + ".weight") for rx in skip_res):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        before += module.weight.numel() * module.weight.element_size()
        new = Int8Linear(module, threshold=threshold)
        after += new.weight_bytes()
        setattr(parent, child, new)
        replaced += 1
    if not replaced:
        raise ValueError("quantize_int8: no nn.Linear layer to quantise (all skipped?)")
    report = QuantizeReport(replaced, before, after)
    print(report, flush=True)
    return report


def _float_output(module, inputs, output):
    if hasattr(output, "float"):
        return output.float()
    return output


def prepare_int8_training(model: nn.Module) -> nn.Module:
    """Make an int8 model trainable with adapters: 1-D parameters (LayerNorm gains, biases) in float32, the LM
    head's output in float32 (the loss is computed in float32), and inputs that require grad so that even
    reentrant activation checkpointing passes gradients (the engine uses the non-reentrant form anyway)."""
    for param in model.parameters():
        if param.dim() == 1 and param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and not getattr(head, "_finetune_float_output", False):
        head.register_forward_hook(_float_output)
        head._finetune_float_output = True
    try:
        model.enable_input_require_grads()
    except (AttributeError, NotImplementedError):
        pass  # a model without input embeddings to hook: non-reentrant checkpointing needs none
    return model
