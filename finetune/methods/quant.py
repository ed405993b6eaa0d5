"""What the int8 and 4-bit base weights share: loading bitsandbytes, swapping linear layers, the report, and
making a quantised model trainable with adapters.

The wrappers (finetune.methods.int8.Int8Linear, finetune.methods.int4.Int4Linear) carry `is_quantized_linear = True`, expose
`in_features`, `out_features`, `weight`, `bias`, `dequantize()` (a float nn.Linear), `plain_linear()` (what
finetune.store.export saves) and `weight_bytes()`, and are frozen: adapters train on top of them (finetune.methods.lora).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from finetune.methods.surgery import replace_module
from finetune.patterns import compile_patterns


def bitsandbytes_module(what: str = "int8"):
    try:
        import bitsandbytes
    except ImportError as err:
        raise ImportError(
            f"{what} base weights need bitsandbytes, which is not installed (or cannot load on this machine): "
            "pip install -e '.[int8]'  (bitsandbytes >= 0.45 runs on CPU and CUDA)"
        ) from err
    return bitsandbytes


def float_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A float32 CPU copy of `tensor` made with one copy (what bitsandbytes quantises from)."""
    tensor = tensor.detach()
    if tensor.dtype == torch.float32 and tensor.device.type == "cpu":
        return tensor.clone()
    return tensor.to(device="cpu", dtype=torch.float32)


def is_quantized(module: nn.Module) -> bool:
    """An Int8Linear or Int4Linear, recognised without importing bitsandbytes."""
    return getattr(type(module), "is_quantized_linear", False)


class QuantizedLinear(nn.Module):
    """What the int8 and 4-bit wrappers share: the bitsandbytes layer as `inner`, its weight and bias, and
    `dequantize()` built on the subclass's `dequantized_weight()`."""

    is_quantized_linear = True

    @property
    def weight(self) -> torch.Tensor:
        return self.inner.weight

    @property
    def bias(self):
        return self.inner.bias

    def dequantized_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def inner_with_bias_outside(self, x: torch.Tensor) -> torch.Tensor:
        """The bitsandbytes layer's forward without its bias, then the bias added here, left as it was: both
        `Linear8bitLt` and `Linear4bit` cast the bias to the input's / compute dtype in place (`bias.data = ...`),
        which under autocast would round the frozen float32 bias - and the saved model's - for good."""
        bias = self.inner.bias
        self.inner.bias = None
        try:
            out = self.inner(x)
        finally:
            self.inner.bias = bias
        return out + bias.to(out.dtype)

    def plain_linear(self, state: dict, prefix: str) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        """(weight, bias, bias added by BitFit) of the float layer the codes stand for (finetune.store.export)."""
        bias = self.inner.bias
        return self.dequantized_weight().detach(), None if bias is None else bias.detach().float(), False

    def dequantize(self) -> nn.Linear:
        """A float32 nn.Linear holding the weight the quantised codes stand for, and the bias."""
        weight = self.dequantized_weight()
        out = nn.Linear(self.in_features, self.out_features, bias=self.inner.bias is not None, device=weight.device)
        with torch.no_grad():
            out.weight.copy_(weight)
            if self.inner.bias is not None:
                out.bias.copy_(self.inner.bias.float())
        return out


@dataclass
class QuantizeReport:
    what: str
    replaced: int
    bytes_before: int
    bytes_after: int

    def __str__(self) -> str:
        return (f"{self.what}: {self.replaced} linear layers; their weights {self.bytes_before / 2**20:.1f} MiB -> "
                f"{self.bytes_after / 2**20:.1f} MiB ({self.bytes_before / max(1, self.bytes_after):.1f}x less)")


def linears_to_quantize(model: nn.Module, skip=(), what: str = "quantise", keep_float: bool = True,
                        required: bool = True) -> list[str]:
    """Names of the plain nn.Linear layers a quantised base quantises: all but the LM head, LoRA's own layers, the
    layers the model's class keeps in float when transformers quantises it (`float_kept`; with `keep_float`) and
    modules whose name (or whose weight's name) matches a `skip` regex. Works on a model whose tensors are still
    on the meta device (finetune.models.streamed)."""
    skip_res = compile_patterns(list(skip) + (float_kept(model) if keep_float else []), f"{what} skip")
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or module is output or ".lora_" in name:
            continue
        if not any(rx.search(name) or rx.search(name + ".weight") for rx in skip_res):
            names.append(name)
    if not names and required:
        raise ValueError(f"{what}: no nn.Linear layer to quantise (all skipped?)")
    return names


def replace_linears(model: nn.Module, make, skip, what: str, keep_float: bool = True,
                    required: bool = True) -> QuantizeReport:
    """Replace each layer `linears_to_quantize` names by `make(linear)`. Embeddings stay as they are. Prints the
    report. `required=False`: none left to quantise is no error (LoftQ quantised them with their adapters)."""
    replaced, before, after = 0, 0, 0
    for name in linears_to_quantize(model, skip, what, keep_float, required):
        module = model.get_submodule(name)
        before += module.weight.numel() * module.weight.element_size()
        new = make(module)
        after += new.weight_bytes()
        replace_module(model, name, new)
        replaced += 1
    report = QuantizeReport(what, replaced, before, after)
    print(report, flush=True)
    return report


def float_kept(model: nn.Module) -> list[str]:
    """Regexes of the layers a quantised base keeps in float: those the model's class names in
    `_keep_in_fp32_modules`, as transformers does when it quantises it. T5's feed-forward output `wo` is one: T5
    casts the activations entering `wo` to `wo.weight.dtype` (unless int8), which for 4-bit codes (uint8) would
    turn them into integers; and Flan-T5-XXL loses accuracy with an 8-bit `wo` (transformers issue 20287)."""
    return [rf"(^|\.){re.escape(name)}$" for name in getattr(model, "_keep_in_fp32_modules", None) or ()]


def _float_output(module, inputs, output):
    if hasattr(output, "float"):
        return output.float()
    return output


def prepare_quantized_training(model: nn.Module) -> nn.Module:
    """Make an int8 / 4-bit model trainable with adapters: 1-D parameters (LayerNorm gains, biases) in float32,
    the LM head's output in float32 (the loss is computed in float32), and inputs that require grad so that even
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
