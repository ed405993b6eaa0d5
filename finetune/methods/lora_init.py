"""How LoRA's A and B start (`lora_init`), as PEFT's `init_lora_weights` does it:

    default   A Kaiming-uniform, B zero: the model is unchanged at step 0 (Hu et al., 2021)
    gaussian  A normal with std 1/r, B zero (PEFT's "gaussian")
    pissa     A, B from the r principal singular vectors of W (Meng et al., 2024): B A = U_r S_r V_r^T / s, and the
              frozen base becomes the residual W - s B A, so the model is unchanged at step 0 and the adapter
              trains the principal part. Float bases only (the residual must stay exact)
    loftq     for quantised bases (Li et al., 2023): the base's codes and A, B chosen together so that
              dequant(Q) + s B A approximates the float W, alternating `iterations` times: Q = quantise(W - s B A),
              then s B A = the rank-r SVD of W - dequant(Q)

PEFT's LoftQ leaves the scale s out (exact only at alpha = r, where s = 1); here A and B are divided by sqrt(s) so
base + s B A approximates W at every alpha. A PiSSA adapter is saved against the original base (PEFT's
`path_initial_model_for_weight_conversion`): rank 2r, A' = [A; A0], B' = [B, -B0], alpha doubled, so
W + s' B' A' = W - s B0 A0 + s B A = the residual + s B A, what the model computes.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

INITS = ("default", "gaussian", "pissa", "loftq")


def low_rank(matrix: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, R) with L R the best rank-r approximation of `matrix` (float32): L = U_r sqrt(S_r), R = sqrt(S_r) V_r^T
    (PEFT's `_low_rank_decomposition`)."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = s[:r].sqrt()
    return u[:, :r] * root, root.unsqueeze(1) * vh[:r]


@torch.no_grad()
def pissa(weight: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, B, residual) of PiSSA for a float weight [out, in]: PEFT's `pissa_init` (full SVD)."""
    w = weight.float()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = (s[:r] / scaling).sqrt()
    a, b = root.unsqueeze(1) * vh[:r], u[:, :r] * root
    return a, b, (w - scaling * (b @ a)).to(weight.dtype)


@torch.no_grad()
def loftq(linear: nn.Linear, r: int, scaling: float, quantize: Callable[[nn.Linear], nn.Module],
          iterations: int = 1) -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    """(A, B, quantised layer) of LoftQ for a float nn.Linear and the method's quantiser (`quantize(linear)` ->
    its Int4Linear / Int8Linear). The layer returned holds the codes of the last quantisation; A and B the rank-r
    SVD of what those codes lost. PEFT's `loftq_init`, with the scale taken into account."""
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"loftq: iterations must be an integer >= 1, got {iterations!r}")
    w = linear.weight.detach().float()
    residual = w
    for step in range(iterations):
        quantised = quantize(_linear_like(linear, residual))
        lost = w - quantised.dequantized_weight().float()
        left, right = low_rank(lost, r)
        if step + 1 < iterations:
            residual = w - left @ right
    root = math.sqrt(scaling)
    return right / root, left / root, quantised


def _linear_like(linear: nn.Linear, weight: torch.Tensor) -> nn.Linear:
    """A float nn.Linear like `linear` (its bias, dtype) with another weight: what the quantiser takes."""
    copy = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    copy.weight = nn.Parameter(weight.to(linear.weight.dtype), requires_grad=False)
    if linear.bias is not None:
        copy.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return copy


def converted_for_the_original_base(a, b, a0, b0) -> tuple[torch.Tensor, torch.Tensor]:
    """A PiSSA layer's (A, B) at rank 2r against the original weight: [A; A0] and [B, -B0] (PEFT's conversion)."""
    return torch.cat([a, a0.to(a.dtype)], dim=0), torch.cat([b, -b0.to(b.dtype)], dim=1)
