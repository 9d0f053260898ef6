"""Bias + GELU in one pass: the epilogue of a ViT MLP's fc1.

Public API:

* :func:`bias_gelu` -- ``gelu(x + bias)`` with ``approximate="none"`` (exact, erf) or
  ``"tanh"``, like :func:`torch.nn.functional.gelu`. Use it on ``F.linear(h, fc1.weight)``
  (the matmul without its bias) with ``bias=fc1.bias``: one read and one write of the
  ``[..., hidden]`` activation; the backward computes dx and dbias in one pass too.
* :func:`bias_gelu_ref` -- the plain-PyTorch chain.
* :func:`bias_gelu_not_supported_reasons` -- why the kernel cannot serve an input.

Shapes: x ``[..., C]`` (any leading dims, any C >= 1), bias ``[C]`` or None. The result has
x's dtype (float16/bfloat16/float32, and float64); bias may be in another float dtype (an
fp32 parameter under autocast). Arithmetic is fp32.

* :func:`linear_bias_gelu` -- ``gelu(h @ weight^T + bias)``, the whole fc1: the GEMM plus this
  op, or, where allowed and measured faster, one cuBLASLt GEMM with its GELU_BIAS epilogue.

The GEMM epilogue path is ``torch._addmm_activation(bias, h, weight^T, use_gelu=True)``, which on
CUDA reaches cuBLASLt's GELU_BIAS epilogue (or, where cuBLASLt does not take the call, a GEMM and
a tanh GELU). That epilogue computes the **tanh approximation** of GELU, so it serves only

* models whose activation is tanh GELU (``approximate="tanh"``), or
* a user who accepts tanh for an exact-GELU model: ``allow_tanh_epilogue=True`` or
  ``VITFAST_GELU_EPILOGUE=1`` (never chosen silently);

and only in inference: ``_addmm_activation`` has no derivative in PyTorch, and the
pre-activation a backward would need (cuBLASLt's GELU_AUX epilogue) is not exposed. Among the
eligible calls, the measured dispatch table (op ``linear_bias_gelu``, keys C = out features,
K = in features, rows; "kernel" = GEMM + the Triton epilogue, "torch" = the cuBLASLt epilogue)
decides; without an entry it stays on GEMM + Triton. ``vitfast tune`` times both.

Backends, registration: as :mod:`vitfast.ops.layer_norm` (``"auto"``, ``"kernel"``,
``"reference"``; ``vitfast::bias_gelu_fwd``/``_bwd`` with fake and autograd).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .._dispatch import canonical_backend
from .triton import fused as _k
from ._fused_common import (ATOL, CHECK_TOL, ROW_SHAPES, SM90, as_rows, choose_backend, empty0, input_problems,
                            kernel_reasons, raise_first, record_kernels, register)
from .spec import BadInput, OpSpec, Sample, declare, randn

__all__ = ["bias_gelu", "bias_gelu_ref", "bias_gelu_not_supported_reasons", "APPROXIMATIONS", "linear_bias_gelu",
           "gelu_epilogue_reasons"]

APPROXIMATIONS = tuple(_k.ACT_CODES)  # ("none", "tanh")


def bias_gelu_ref(x: Tensor, bias: Optional[Tensor] = None, approximate: str = "none", *,
                  upcast: bool = False) -> Tensor:
    """``F.gelu(x + bias)`` in x's dtype (bias cast to it); with ``upcast`` in fp32 (fp64
    stays fp64), rounded to x's dtype at the end."""
    ct = x.dtype
    if upcast:
        ct = torch.float64 if x.dtype == torch.float64 or (bias is not None and bias.dtype == torch.float64) \
            else torch.float32
    z = x.to(ct)
    if bias is not None:
        z = z + bias.to(ct)
    return F.gelu(z, approximate=approximate).to(x.dtype)


def _problems(x, bias):
    return input_problems("bias_gelu", {"x": x}, {"bias": bias})


def bias_gelu_not_supported_reasons(x: Tensor, bias: Optional[Tensor] = None) -> list[str]:
    """Why the Triton kernel cannot serve these inputs (empty: it can). Never raises."""
    reasons = kernel_reasons(_problems(x, bias), {"x": x, "bias": bias})
    return reasons + (_k.ew_grid_reasons(x.shape[-1]) if isinstance(x, Tensor) and x.dim() else [])


def _check_approximate(approximate) -> None:
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"vitfast.bias_gelu: approximate must be one of {list(APPROXIMATIONS)}, got {approximate!r}")


# --------------------------------------------------------------------------- the ops
@register("vitfast::bias_gelu_fwd", mutates_args=())
def _bias_gelu_fwd(x: Tensor, bias: Optional[Tensor], approximate: str) -> Tensor:
    """gelu(x + bias), [..., C] in x's dtype (contiguous)."""
    C = x.shape[-1]
    out = x.new_empty(x.shape)
    if x.numel():
        _k.launch_bias_gelu_fwd(as_rows(x, C), bias, out.view(-1, C), approximate)
    return out


@_bias_gelu_fwd.register_fake
def _(x, bias, approximate):
    return x.new_empty(x.shape)


@register("vitfast::bias_gelu_bwd", mutates_args=())
def _bias_gelu_bwd(dout: Tensor, x: Tensor, bias: Optional[Tensor], approximate: str) -> tuple[Tensor, Tensor]:
    """(dx [..., C] in x's dtype, dbias [C] in bias's dtype, or empty without bias)."""
    C = x.shape[-1]
    dx = x.new_empty(x.shape)
    if not x.numel():
        return dx, bias.new_zeros((C,)) if bias is not None else empty0(x)
    dbias = _k.launch_bias_gelu_bwd(as_rows(dout, C), as_rows(x, C), bias, dx.view(-1, C), approximate)
    return dx, dbias.to(bias.dtype) if bias is not None else empty0(x)


@_bias_gelu_bwd.register_fake
def _(dout, x, bias, approximate):
    return x.new_empty(x.shape), bias.new_empty((x.shape[-1],)) if bias is not None else empty0(x)


def _setup(ctx, inputs, output):
    x, bias, approximate = inputs
    ctx.save_for_backward(x, bias)
    ctx.approximate = approximate


def _backward(ctx, dout):
    x, bias = ctx.saved_tensors
    dx, dbias = _bias_gelu_bwd(dout, x, bias, ctx.approximate)
    return dx, dbias if bias is not None else None, None


_bias_gelu_fwd.register_autograd(_backward, setup_context=_setup)

record_kernels({"bias_gelu_fwd": [_k._bias_gelu_fwd_kernel], "bias_gelu_bwd": [_k._bias_gelu_bwd_kernel]})


# ---------------------------------------------------------------------- public API
def bias_gelu(x: Tensor, bias: Optional[Tensor] = None, approximate: str = "none", *,
              backend: str = "auto") -> Tensor:
    """``gelu(x + bias)`` for x ``[..., C]`` and bias ``[C]`` (or None); ``approximate`` is
    ``"none"`` (exact erf GELU) or ``"tanh"``. Returns x's dtype; differentiable in x and
    bias."""
    raise_first(_problems(x, bias))
    _check_approximate(approximate)
    if choose_backend("bias_gelu", backend, x.device, lambda: bias_gelu_not_supported_reasons(x, bias),
                      x, x, bias) == "reference":
        return bias_gelu_ref(x, bias, approximate)
    return _bias_gelu_fwd(x, bias, approximate)


GELU_EPILOGUE_ENV = "VITFAST_GELU_EPILOGUE"
_EPILOGUE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _tanh_allowed(allow: Optional[bool]) -> bool:
    if allow is not None:
        return bool(allow)
    return os.environ.get("VITFAST_GELU_EPILOGUE", "0").strip().lower() in ("1", "true", "yes", "tanh")


def gelu_epilogue_reasons(h: Tensor, weight: Tensor, bias: Optional[Tensor], approximate: str = "none",
                          allow_tanh_epilogue: Optional[bool] = None, dtype: Optional[torch.dtype] = None) -> list[str]:
    """Why ``gelu(h @ weight^T + bias)`` may not take cuBLASLt's GELU_BIAS epilogue (empty: it
    may, subject to the dispatch table). ``dtype``: the compute dtype (autocast's), default h's."""
    dtype = dtype or h.dtype
    reasons = []
    if h.device.type != "cuda":
        reasons.append(f"h is on {h.device}; the cuBLASLt epilogue is a CUDA path")
    if approximate != "tanh" and not _tanh_allowed(allow_tanh_epilogue):
        reasons.append("the activation is exact (erf) GELU and cuBLASLt's GELU_BIAS epilogue computes the tanh "
                       f"approximation; allow_tanh_epilogue=True or {GELU_EPILOGUE_ENV}=1 accepts it")
    if bias is None:
        reasons.append("no bias (the epilogue is GELU_BIAS)")
    if dtype not in _EPILOGUE_DTYPES:
        reasons.append(f"dtype {dtype} (the epilogue path takes float16, bfloat16, float32)")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (h, weight, bias)):
        reasons.append("a gradient is needed: torch._addmm_activation has no derivative and cuBLASLt's "
                       "pre-activation output (GELU_AUX) is not exposed, so the epilogue path is inference only")
    if h.dim() < 1 or weight.dim() != 2 or h.shape[-1] != weight.shape[1]:
        reasons.append(f"h {list(h.shape)} and weight {list(weight.shape)} do not make h @ weight^T")
    return reasons


def _gelu_epilogue(h: Tensor, weight: Tensor, bias: Tensor, dtype: torch.dtype) -> Tensor:
    C, K = weight.shape
    out = torch._addmm_activation(bias.to(dtype), h.to(dtype).reshape(-1, K), weight.to(dtype).t(), use_gelu=True)
    return out.view(*h.shape[:-1], C)


def linear_bias_gelu(h: Tensor, weight: Tensor, bias: Optional[Tensor] = None, approximate: str = "none", *,
                     backend: str = "auto", allow_tanh_epilogue: Optional[bool] = None) -> Tensor:
    """``gelu(h @ weight^T + bias)`` (an MLP's fc1 and its activation) for h ``[..., K]``, weight
    ``[C, K]``, bias ``[C]`` or None. ``approximate`` as in :func:`bias_gelu`.

    ``backend="auto"`` on CUDA: cuBLASLt's GELU_BIAS epilogue where it may serve the call (see
    :func:`gelu_epilogue_reasons`: tanh GELU or ``allow_tanh_epilogue``, inference) and the
    dispatch table measured it faster; otherwise ``bias_gelu(F.linear(h, weight), bias)`` with
    that op's own dispatch. ``"kernel"`` / ``"reference"``: the GEMM, then :func:`bias_gelu`'s
    kernel / reference."""
    _check_approximate(approximate)
    if canonical_backend("bias_gelu", backend) == "auto" and h.device.type == "cuda":
        # (autocast leaves float64 alone, as eager fc1 + GELU under autocast would)
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") and torch.float64 not in (
            h.dtype, weight.dtype) else h.dtype
        if not gelu_epilogue_reasons(h, weight, bias, approximate, allow_tanh_epilogue, dtype):
            from .. import dispatch

            shape = {"C": weight.shape[0], "K": weight.shape[1], "rows": max(1, h.numel() // max(1, h.shape[-1]))}
            if dispatch.choose("linear_bias_gelu", h.device, dtype, False, shape) == "torch":
                return _gelu_epilogue(h, weight, bias, dtype)
    return bias_gelu(F.linear(h, weight), bias, approximate, backend=backend)


# ---------------------------------------------------------------------- declaration
def _samples(device, dtype):
    out = []
    for i, shape in enumerate(ROW_SHAPES):
        x, b = randn(shape, dtype, 10 * i, device, 2.0), randn(shape[-1:], dtype, 10 * i + 1, device)
        out.append(Sample(f"{list(shape)}", (x, b), {}, grad=(0, 1)))
    x = randn((3, 40), dtype, 98, device, 3.0)
    out.append(Sample("tanh, no bias", (x, None, "tanh"), {}, grad=(0,)))
    return out


def _bad_inputs():
    x, v = randn((2, 5, 12), torch.float32, 0), randn((12,), torch.float32, 1)
    VE, TE = (ValueError,), (TypeError,)
    out = []
    for be in ("kernel", "reference"):
        G = lambda *a, **k: (lambda: bias_gelu(*a, backend=be, **k))  # noqa: E731
        out += [
            BadInput(f"bias_gelu[{be}]/approximate", G(x, v, approximate="fast"), VE, ("approximate",)),
            BadInput(f"bias_gelu[{be}]/bias_shape", G(x, randn((13,), torch.float32, 2)), VE, ("bias",)),
            BadInput(f"bias_gelu[{be}]/x_not_tensor", G(1.0, v), TE, ("x",)),
        ]
    return out


declare(OpSpec(
    name="bias_gelu", fn=bias_gelu, ref=bias_gelu_ref,
    not_supported_reasons=lambda x, bias=None, approximate="none": bias_gelu_not_supported_reasons(x, bias),
    kernel_backend="kernel", sample_inputs=_samples, atol=ATOL, check_tol=CHECK_TOL, sm90=SM90,
    bad_inputs=_bad_inputs))
