"""Attention in float32 under CPU bf16 autocast: the `sdpa_float32` attention implementation.

Under bf16 autocast on a CPU, `torch.nn.functional.scaled_dot_product_attention` runs its bf16 flash kernel, whose
backward is much slower than the float32 kernel on the short sequences most seq2seq jobs have. Forward + backward,
7 rows x 12 heads of 32, AMD EPYC Zen 4 (AVX-512-BF16, no AMX), `python benchmarks/sdpa_precision.py`: 128 keys
22.6 ms in bf16, 10.0 ms with the inputs cast to float32; 256 keys 32.0 against 24.2; 32 queries x 128 keys (the
cross-attention) 5.95 against 3.86; at 512 keys the two were within noise (93 / 98 ms in one run, 119 / 96 in
another). So `sdpa_float32` casts query, key, value (and a float mask or T5's position bias) to float32 for
sequences of at most `MAX_KEYS` keys, runs transformers' own SDPA attention there with autocast off, and casts the
output back to the input's dtype; longer sequences, float32 inputs and other devices go through unchanged. The
softmax and its matmuls then run in float32 instead of bf16: the same attention with less rounding (autocast runs
softmax in float32 elsewhere for the same reason). On the long-input job (bf16, `benchmarks/profile_real.py --data
code --precision bf16 --attention-fp32 off|auto`) a step took 0.614 s (median of 3) without it and 0.522 with it.

It is a transformers attention implementation (`AttentionInterface`, with SDPA's mask function), set on a model
whose layers use "sdpa" by `use_float32_attention`; a saved model/ does not carry it (transformers does not write
the attention implementation to config.json).
"""
from __future__ import annotations

import torch

NAME = "sdpa_float32"
MAX_KEYS = 256  # measured faster up to here; at 512 keys within noise (see above)


def in_float32(query, keys: int) -> bool:
    """Whether `sdpa_float32` computes this attention in float32: reduced-precision CPU inputs, at most MAX_KEYS keys."""
    return query.device.type == "cpu" and query.dtype != torch.float32 and keys <= MAX_KEYS


def sdpa_float32_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention, in float32 for reduced-precision CPU inputs of at most `MAX_KEYS` keys."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    dtype = query.dtype
    if not in_float32(query, key.shape[-2]):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    if kwargs.get("position_bias") is not None:
        kwargs["position_bias"] = kwargs["position_bias"].float()
    with torch.autocast("cpu", enabled=False):
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                              **kwargs)
    return out.to(dtype), weights


def register() -> None:
    """Make `NAME` a transformers attention implementation (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, sdpa_float32_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def use_float32_attention(model) -> bool:
    """Switch every config of `model` whose attention is "sdpa" to `sdpa_float32` (the model's own and any its
    layers hold: a bert2bert's encoder layers keep a config object of their own); False, with nothing changed, for
    a model that does not dispatch through transformers' AttentionInterface or uses no "sdpa" attention."""
    can_set = getattr(model, "_can_set_attn_implementation", None)
    if can_set is None or not can_set():
        return False
    configs = [c for c in attention_configs(model) if c._attn_implementation in ("sdpa", NAME)]  # NAME: again
    if not configs:
        return False
    register()
    for config in configs:
        config._attn_implementation = NAME
    return True


def attention_configs(model) -> list:
    """Every distinct config object of `model` and its modules that names an attention implementation (the model's
    own, and any its layers hold: a bert2bert's encoder layers keep a config object of their own)."""
    found = [getattr(model, "config", None)] + [getattr(m, "config", None) for m in model.modules()]
    return list({id(c): c for c in found if getattr(c, "_attn_implementation", None) is not None}.values())
