"""The random initialisers timm's ViTs use, drawing timm's numbers in timm's order (the inverse-CDF
sampler of ``timm.layers.weight_init``), so that a model initialised here equals timm's from the
same seed."""

from __future__ import annotations

import math

import torch

__all__ = ["TRUNC2_STD", "normal_clipped_", "trunc_normal_tf_", "lecun_normal_"]

# std of a standard normal truncated to [-2, 2] (timm's literal: bit-exact lecun_normal_ needs it)
TRUNC2_STD = 0.87962566103423978


def _cdf(x: float) -> float:
    return (1.0 + math.erf(x / math.sqrt(2.0))) / 2.0


def _inverse_cdf_normal_(t: torch.Tensor, std: float, lo: float, hi: float) -> torch.Tensor:
    """N(0, std) restricted to [lo, hi] by inverse CDF, then clamped there (timm's sampler, same
    RNG draw and float ops)."""
    t.uniform_(2 * _cdf(lo / std) - 1, 2 * _cdf(hi / std) - 1).erfinv_()
    return t.mul_(std * math.sqrt(2.0)).clamp_(min=lo, max=hi)


def _sample_(t: torch.Tensor, draw) -> torch.Tensor:
    """``draw`` fills ``t`` in place; for float16/bfloat16 ``t`` it fills a float32 copy, then
    rounds once (in 16 bits, erfinv of a uniform rounded to +-1 is +-inf: clamped to the bounds,
    100 std out). float32/float64 draw in place: timm's numbers, bit for bit."""
    if t.dtype in (torch.float16, torch.bfloat16):
        x = torch.empty(t.shape, dtype=torch.float32, device=t.device)
        draw(x)
        return t.copy_(x)
    draw(t)
    return t


@torch.no_grad()
def normal_clipped_(t: torch.Tensor, std: float = 0.02, bound: float = 2.0) -> torch.Tensor:
    """timm's ``trunc_normal_(t, std=std)``: N(0, std) truncated at +-``bound`` absolute, so with
    std .02 a plain normal in effect."""
    return _sample_(t, lambda x: _inverse_cdf_normal_(x, std, -bound, bound))


@torch.no_grad()
def trunc_normal_tf_(t: torch.Tensor, std: float = 1.0) -> torch.Tensor:
    """A standard normal truncated to [-2, 2], then scaled by ``std`` (timm's ``trunc_normal_tf_``,
    TensorFlow's truncated_normal initialiser: the bounds scale with std)."""
    return _sample_(t, lambda x: _inverse_cdf_normal_(x, 1.0, -2.0, 2.0).mul_(std))


@torch.no_grad()
def lecun_normal_(w: torch.Tensor) -> torch.Tensor:
    """Normal truncated at +-2 std, scaled so that its std is sqrt(1 / fan_in) (timm's and JAX's
    ``lecun_normal``); fan_in = w.shape[1] * the kernel's size."""
    fan_in = w.shape[1] * math.prod(w.shape[2:])
    return _sample_(w, lambda x: _inverse_cdf_normal_(x, 1.0, -2.0, 2.0).mul_(math.sqrt(1.0 / fan_in) / TRUNC2_STD))
