"""Int8 base weights: a small wrapper over bitsandbytes' `Linear8bitLt` (LLM.int8(), Dettmers et al., 2022).

Each weight row is stored as int8 with one float32 scale (absmax / 127). On CUDA, bitsandbytes' LLM.int8()
matmul runs: input columns holding an outlier above `threshold` (default 6.0) go through a float path. On CPU,
the weight is rebuilt from its codes for each matmul, in the compute dtype (bitsandbytes' own CPU training path
does the same, in the input's dtype, and an int8 matmul with outliers in evaluation; here training and evaluation
compute the same thing, and under bf16 autocast the rebuilt weight and the input's gradient are bf16). The
weights are frozen: train LoRA adapters on top (`finetune.methods.apply_method(model, "int8-lora")`).
"""
from __future__ import annotations

import torch
from torch import nn

from finetune.methods.quant import (QuantizedLinear, QuantizeReport, bitsandbytes_module, float_copy,
                                    prepare_quantized_training, replace_linears)

prepare_int8_training = prepare_quantized_training  # the same preparation serves int8 and 4-bit bases


class Int8Linear(QuantizedLinear):
    """A frozen int8 copy of an nn.Linear: forward, `dequantize()` back to float, and a repr that says what it holds."""

    def __init__(self, linear: nn.Linear, threshold: float = 6.0):
        super().__init__()
        bnb = bitsandbytes_module()
        self.in_features, self.out_features, self.threshold = linear.in_features, linear.out_features, threshold
        device = linear.weight.device
        inner = bnb.nn.Linear8bitLt(self.in_features, self.out_features, bias=linear.bias is not None,
                                    has_fp16_weights=False, threshold=threshold, device="meta")
        inner.weight = bnb.nn.Int8Params(float_copy(linear.weight), requires_grad=False,
                                         has_fp16_weights=False)
        if linear.bias is not None:
            inner.bias = nn.Parameter(float_copy(linear.bias), requires_grad=False)
        self.inner = inner.to(device)  # moving the module quantises the weight
        if self.inner.weight.dtype != torch.int8:
            raise RuntimeError(f"Int8Linear: bitsandbytes left the weight as {self.inner.weight.dtype} on {device}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.inner.bias
        if x.device.type != "cpu":  # bitsandbytes' LLM.int8() kernel; it would cast the bias in place
            return self.inner(x) if bias is None else self.inner_with_bias_outside(x)
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        out = _DequantizedMatmul.apply(x, self.inner.weight.data, self.scales(), dtype)
        return out if bias is None else out + bias.to(out.dtype)

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
                f"scales, outlier threshold={self.threshold} (CUDA), frozen")


class _DequantizedMatmul(torch.autograd.Function):
    """x @ (codes * scale / 127)^T in `dtype` for a frozen int8 weight. The weight is rebuilt from the codes in
    one pass (int8 times a `dtype` scale gives `dtype`), in the forward and again in the backward: never kept.
    Only the input gets a gradient."""

    @staticmethod
    def forward(ctx, x, codes, row_absmax, dtype):
        scale = row_absmax.mul(1.0 / 127.0).to(dtype).unsqueeze(1)
        ctx.save_for_backward(codes, scale)
        ctx.x_dtype = x.dtype
        with torch.autocast(x.device.type, enabled=False):
            return nn.functional.linear(x.to(dtype), torch.mul(codes, scale))

    @staticmethod
    def backward(ctx, grad):
        codes, scale = ctx.saved_tensors
        weight = torch.mul(codes, scale)
        flat = grad.reshape(-1, grad.shape[-1]).to(weight.dtype)  # one 2-D mm (a 3-D matmul may go through bmm)
        return flat.mm(weight).view(*grad.shape[:-1], weight.shape[1]).to(ctx.x_dtype), None, None, None


def quantize_int8(model: nn.Module, skip=(), threshold: float = 6.0, keep_float: bool = True) -> QuantizeReport:
    """Replace nn.Linear layers by Int8Linear, except the LM head, modules whose name (or whose weight's name)
    matches a `skip` regex, and (with `keep_float`) the layers the model's class keeps in float. Embeddings stay
    as they are."""
    bitsandbytes_module()
    return replace_linears(model, lambda linear: Int8Linear(linear, threshold=threshold), skip, "quantize_int8",
                           keep_float)
