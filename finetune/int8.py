"""Int8 base weights: a small wrapper over bitsandbytes' `Linear8bitLt` (LLM.int8(), Dettmers et al., 2022).

Each weight row is stored as int8 with one float32 scale (absmax / 127); at matmul time, input columns
holding an outlier above `threshold` (default 6.0) go through a float path. The weights are frozen: train
LoRA adapters on top (`finetune.methods.apply_method(model, "int8-lora")`). bitsandbytes >= 0.45 runs
this on CPU as well as CUDA.
"""
from __future__ import annotations

import torch
from torch import nn

from .quant import (QuantizedLinear, QuantizeReport, bitsandbytes_module, prepare_quantized_training,
                    replace_linears)

prepare_int8_training = prepare_quantized_training  # the same preparation serves int8 and 4-bit bases


class Int8Linear(QuantizedLinear):
    """A frozen int8 copy of an nn.Linear: forward, `dequantize()` back to float, and a repr that says what it holds."""

    def __init__(self, linear: nn.Linear, threshold: float = 6.0):
        super().__init__()
        bnb = bitsandbytes_module()
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)

    def scales(self) -> torch.Tensor:
        """Row scales (absmax per output row); bitsandbytes moves them into its matmul state at the first forward."""
        scales = getattr(self.inner.weight, "SCB", None)
        return scales if scales is not None else self.inner.state.SCB

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight the int8 codes stand for (row * scale / 127)."""
        from bitsandbytes.functional import int8_vectorwise_dequant

        return int8_vectorwise_dequant(self.inner.weight.data, self.scales()).float()

    def weight_bytes(self) -> int:
        w, scales = self.inner.weight, self.scales()
        return w.numel() * w.element_size() + scales.numel() * scales.element_size()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int8 weight + float32 row "
                f"scales, outlier threshold={self.threshold}, frozen")


def quantize_int8(model: nn.Module, skip=(), threshold: float = 6.0) -> QuantizeReport:
    """Replace nn.Linear layers by Int8Linear, except the LM head and modules whose name (or whose weight's
    name) matches a `skip` regex. Embeddings stay as they are."""
    bitsandbytes_module()
    return replace_linears(model, lambda linear: Int8Linear(linear, threshold=threshold), skip, "quantize_int8")
