"""4-bit base weights (QLoRA, Dettmers et al., 2023): a small wrapper over bitsandbytes' `Linear4bit`.

Each block of 64 weights is stored as 4-bit codes (NF4: the quantiles of a normal distribution; or FP4) with one
absmax scale per block; double quantisation (on by default) stores those scales in 8 bits as well. At matmul
time the weight is dequantised to the compute dtype. About 0.52 bytes per weight instead of 4. The weights are
frozen: train LoRA adapters on top (`finetune.methods.apply_method(model, "qlora")`). bitsandbytes >= 0.45 runs
NF4 and FP4 on CPU as well as CUDA.

The compute dtype follows the engine's precision (`set_compute_dtype`, which `Precision.apply_to` calls): bf16 under
bf16 autocast, float16 under fp16, float32 otherwise. Unlike a bare `Linear4bit`, the wrapper never takes
bitsandbytes' CPU inference path that repacks the weight in place and computes in bf16 (it would make
evaluation compute differently from training); every forward is the training arithmetic.
"""
from __future__ import annotations

import torch
from torch import nn

from finetune.methods.quant import QuantizedLinear, QuantizeReport, bitsandbytes_module, float_copy, replace_linears

QUANT_TYPES = ("nf4", "fp4")


def check_4bit_settings(where: str, quant_type, double_quant) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"{where}: quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    if not isinstance(double_quant, bool):
        raise ValueError(f"{where}: double_quant must be true or false, got {double_quant!r}")


class Int4Linear(QuantizedLinear):
    """A frozen 4-bit copy of an nn.Linear: forward, `dequantize()` back to float, and a repr of what it holds."""

    def __init__(self, linear: nn.Linear, quant_type: str = "nf4", double_quant: bool = True,
                 compute_dtype: torch.dtype | None = None):
        super().__init__()
        check_4bit_settings("Int4Linear", quant_type, double_quant)
        bnb = bitsandbytes_module("4-bit")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.quant_type, self.double_quant = quant_type, double_quant
        device = linear.weight.device
        inner = bnb.nn.Linear4bit(self.in_features, self.out_features, bias=linear.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=double_quant,
                                  quant_type=quant_type, device="meta")
        inner.weight = bnb.nn.Params4bit(float_copy(linear.weight), requires_grad=False,
                                         compress_statistics=double_quant, quant_type=quant_type, module=inner)
        if linear.bias is not None:
            inner.bias = nn.Parameter(float_copy(linear.bias), requires_grad=False)
        inner.support_avx512bf16_for_cpu = False  # no in-place repacking for CPU inference (module docstring)
        self.inner = inner.to(device)  # moving the module quantises the weight
        if not getattr(self.inner.weight, "bnb_quantized", False):
            raise RuntimeError(f"Int4Linear: bitsandbytes did not quantise the weight on {device}")

    @property
    def weight(self) -> torch.Tensor:
        """The packed 4-bit codes viewed as int8 (two codes a byte): the dtype tells model code that this weight is
        quantised. T5 casts the activations entering its feed-forward output `wo` to `wo.weight.dtype` unless it
        is int8; under bitsandbytes' uint8 they would become integers."""
        return self.inner.weight.data.view(torch.int8)

    @property
    def compute_dtype(self):
        return self.inner.compute_dtype

    def set_compute_dtype(self, dtype: torch.dtype) -> None:
        self.inner.compute_dtype = dtype
        self.inner.compute_type_is_set = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.inner.bias
        if bias is None or self.inner.compute_dtype in (None, bias.dtype):
            return self.inner(x)
        return self.inner_with_bias_outside(x)  # bitsandbytes would cast the float32 bias in place

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight the 4-bit codes stand for (the weight every forward computes with)."""
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(self.inner.weight.data, self.inner.weight.quant_state).float()

    def weight_bytes(self) -> int:
        """Bytes of the quantised weight: the 4-bit codes and the block scales (and their own scales and code
        table under double quantisation)."""
        state = self.inner.weight.quant_state
        tensors = [self.inner.weight.data, state.absmax, state.code]
        if state.nested:
            tensors += [state.state2.absmax, state.state2.code]
        return sum(t.numel() * t.element_size() for t in tensors)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.quant_type} 4-bit weight, "
                f"block 64, double quantisation {'on' if self.double_quant else 'off'}, compute dtype "
                f"{self.compute_dtype or 'from the input'}, frozen")


def quantize_4bit(model: nn.Module, skip=(), quant_type: str = "nf4", double_quant: bool = True,
                  compute_dtype: torch.dtype | None = None, keep_float: bool = True) -> QuantizeReport:
    """Replace nn.Linear layers by Int4Linear, except the LM head and modules whose name (or whose weight's
    name) matches a `skip` regex, and (with `keep_float`) the layers the model's class keeps in float. Embeddings and
    1-D tensors stay float (`prepare_quantized_training` then makes them float32)."""
    check_4bit_settings("quantize_4bit", quant_type, double_quant)
    bitsandbytes_module("4-bit")
    return replace_linears(model, lambda linear: Int4Linear(linear, quant_type, double_quant, compute_dtype), skip,
                           f"quantize_4bit ({quant_type})", keep_float)
