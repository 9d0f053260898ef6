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


@torch.no_grad()
def normal_clipped_(t: torch.Tensor, std: float = 0.02, bound: float = 2.0) -> torch.Tensor:
    """timm's ``trunc_normal_(t, std=std)``: N(0, std) truncated at +-``bound`` absolute, so with
    std .02 a plain normal in effect."""
    return _inverse_cdf_normal_(t, std, -bound, bound)


@torch.no_grad()
def trunc_normal_tf_(t: torch.Tensor, std: float = 1.0) -> torch.Tensor:
    """A standard normal truncated to [-2, 2], then scaled by ``std`` (timm's ``trunc_normal_tf_``,
    TensorFlow's truncated_normal initialiser: the bounds scale with std)."""
    _inverse_cdf_normal_(t, 1.0, -2.0, 2.0)
    return t.mul_(std)


@torch.no_grad()
def lecun_normal_(w: torch.Tensor) -> torch.Tensor:
    """Normal truncated at +-2 std, scaled so that its std is sqrt(1 / fan_in) (timm's and JAX's
    ``lecun_normal``); fan_in = w.shape[1] * the kernel's size."""
    fan_in = w.shape[1] * math.prod(w.shape[2:])
    _inverse_cdf_normal_(w, 1.0, -2.0, 2.0)
    return w.mul_(math.sqrt(1.0 / fan_in) / TRUNC2_STD)
