"""Bias + LayerScale + residual add in one pass: the epilogue of a ViT block's fc2 (or of
the attention projection when no LayerNorm follows).

Public API:

* :func:`bias_scale_residual` -- ``x + gamma * (y + bias)``: x the residual stream, y the
  matmul output without its bias (``F.linear(a, fc2.weight)``), bias the Linear's bias,
  gamma the LayerScale (each optional). Eager PyTorch makes three passes (bias, scale,
  add) and the backward another three; this is one each way, the backward producing dy,
  dbias and dgamma together (dx is dout itself).
* :func:`bias_scale_residual_ref` -- the plain-PyTorch chain.
* :func:`bias_scale_residual_not_supported_reasons` -- why the kernel cannot serve an input.

Shapes: x, y ``[..., C]`` (any leading dims, any C >= 1); bias, gamma ``[C]`` or None. The
result has x's dtype (the residual stream's: fp32 with a bf16 y under autocast);
float16/bfloat16/float32 (and float64), vectors in any float dtype. Arithmetic is fp32.

Backends, registration: as :mod:`vitfast.ops.layer_norm` (``"auto"``, ``"kernel"``,
``"reference"``; ``vitfast::bias_scale_residual_fwd``/``_bwd`` with fake and autograd).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .triton import fused as _k
from ._fused_common import (ATOL, CHECK_TOL, ROW_SHAPES, SM90, as_rows, choose_backend, empty0, input_problems,
                            kernel_reasons, raise_first, record_kernels, register)
from .spec import BadInput, OpSpec, Sample, declare, randn

__all__ = ["bias_scale_residual", "bias_scale_residual_ref", "bias_scale_residual_not_supported_reasons"]


def bias_scale_residual_ref(x: Tensor, y: Tensor, bias: Optional[Tensor] = None, gamma: Optional[Tensor] = None,
                            *, upcast: bool = False) -> Tensor:
    """The eager chain ``x + gamma * (y + bias)`` (PyTorch's type promotion), in x's dtype;
    with ``upcast`` computed in fp32 (fp64 stays fp64) and rounded once."""
    ct = None
    if upcast:
        ct = torch.float64 if any(t is not None and t.dtype == torch.float64 for t in (x, y, bias, gamma)) \
            else torch.float32
    to = lambda t: t if t is None or ct is None else t.to(ct)  # noqa: E731
    branch = to(y)
    if bias is not None:
        branch = branch + to(bias)
    if gamma is not None:
        branch = branch * to(gamma)
    return (to(x) + branch).to(x.dtype)


def _problems(x, y, bias, gamma):
    return input_problems("bias_scale_residual", {"x": x, "y": y}, {"bias": bias, "gamma": gamma})


def bias_scale_residual_not_supported_reasons(x: Tensor, y: Tensor, bias: Optional[Tensor] = None,
                                              gamma: Optional[Tensor] = None) -> list[str]:
    """Why the Triton kernel cannot serve these inputs (empty: it can). Never raises."""
    reasons = kernel_reasons(_problems(x, y, bias, gamma), {"x": x, "y": y, "bias": bias, "gamma": gamma})
    return reasons + (_k.ew_grid_reasons(x.shape[-1]) if isinstance(x, Tensor) and x.dim() else [])


# --------------------------------------------------------------------------- the ops
@register("vitfast::bias_scale_residual_fwd", mutates_args=())
def _fwd(x: Tensor, y: Tensor, bias: Optional[Tensor], gamma: Optional[Tensor]) -> Tensor:
    """x + gamma * (y + bias), [..., C] in x's dtype (contiguous)."""
    C = x.shape[-1]
    out = x.new_empty(x.shape)
    if x.numel():
        _k.launch_bias_scale_residual_fwd(as_rows(y, C), bias, gamma, as_rows(x, C), out.view(-1, C))
    return out


@_fwd.register_fake
def _(x, y, bias, gamma):
    torch._check(y.shape == x.shape, lambda: "vitfast::bias_scale_residual_fwd: x and y must have the same shape")
    return x.new_empty(x.shape)


@register("vitfast::bias_scale_residual_bwd", mutates_args=())
def _bwd(dout: Tensor, y: Optional[Tensor], bias: Optional[Tensor], gamma: Optional[Tensor], y_dtype: torch.dtype,
         need_dbias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dy = gamma * dout in ``y_dtype``, dbias (if ``need_dbias``), dgamma (with gamma;
    needs y)); absent ones are empty tensors. dx is dout itself and is not computed here."""
    C = dout.shape[-1]
    dy = dout.new_empty(dout.shape, dtype=y_dtype)
    sums: dict = {}
    if dout.numel():
        sums = _k.launch_bias_scale_residual_bwd(as_rows(dout, C), as_rows(y, C), bias, gamma, dy.view(-1, C), need_dbias)

    def vec(key, param, wanted):
        if not wanted or param is None:
            return empty0(dout)
        return sums[key].to(param.dtype) if key in sums else param.new_zeros((C,))

    return dy, vec("dbias", bias, need_dbias), vec("dgamma", gamma, True)


@_bwd.register_fake
def _(dout, y, bias, gamma, y_dtype, need_dbias):
    C = dout.shape[-1]
    db = bias.new_empty((C,)) if need_dbias and bias is not None else empty0(dout)
    dg = gamma.new_empty((C,)) if gamma is not None else empty0(dout)
    return dout.new_empty(dout.shape, dtype=y_dtype), db, dg


def _setup(ctx, inputs, output):
    x, y, bias, gamma = inputs
    ctx.save_for_backward(y if gamma is not None else None, bias, gamma)
    ctx.x_dtype, ctx.y_dtype = x.dtype, y.dtype


def _backward(ctx, dout):
    y, bias, gamma = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx = None
    if need[0]:
        dx = dout if dout.dtype == ctx.x_dtype else dout.to(ctx.x_dtype)
    dy = dbias = dgamma = None
    if need[1] or need[2] or need[3]:
        dy, dbias, dgamma = _bwd(dout, y, bias, gamma, ctx.y_dtype, bias is not None)
    return (dx, dy if need[1] else None, dbias if bias is not None and need[2] else None,
            dgamma if gamma is not None and need[3] else None)


_fwd.register_autograd(_backward, setup_context=_setup)

record_kernels({"bias_scale_residual_fwd": [_k._bias_scale_residual_fwd_kernel],
                "bias_scale_residual_bwd": [_k._bias_scale_residual_bwd_kernel]})


# ---------------------------------------------------------------------- public API
def bias_scale_residual(x: Tensor, y: Tensor, bias: Optional[Tensor] = None, gamma: Optional[Tensor] = None, *,
                        backend: str = "auto") -> Tensor:
    """``x + gamma * (y + bias)`` for x, y ``[..., C]`` and bias, gamma ``[C]`` (or None).
    Returns x's dtype; differentiable in every tensor argument."""
    raise_first(_problems(x, y, bias, gamma))
    chosen = choose_backend("bias_scale_residual", backend, x.device,
                            lambda: bias_scale_residual_not_supported_reasons(x, y, bias, gamma), x, x, y, bias, gamma)
    if chosen == "reference":
        return bias_scale_residual_ref(x, y, bias, gamma)
    return _fwd(x, y, bias, gamma)


# ---------------------------------------------------------------------- declaration
def _samples(device, dtype):
    out = []
    for i, shape in enumerate(ROW_SHAPES):
        x, y = randn(shape, dtype, 10 * i, device), randn(shape, dtype, 10 * i + 1, device)
        b, g = randn(shape[-1:], dtype, 10 * i + 2, device), randn(shape[-1:], dtype, 10 * i + 3, device, 0.1)
        out.append(Sample(f"{list(shape)}", (x, y, b, g), {}, grad=(0, 1, 2, 3)))
    x, y = randn((5, 16), dtype, 97, device), randn((5, 16), dtype, 96, device)
    out.append(Sample("no bias, no gamma", (x, y, None, None), {}, grad=(0, 1)))
    return out


def _bad_inputs():
    x = randn((2, 5, 12), torch.float32, 0)
    VE, TE = (ValueError,), (TypeError,)
    out = []
    for be in ("kernel", "reference"):
        R = lambda *a, **k: (lambda: bias_scale_residual(*a, backend=be, **k))  # noqa: E731
        out += [
            BadInput(f"bias_scale_residual[{be}]/y_shape", R(x, randn((2, 5, 13), torch.float32, 1)), VE, ("y",)),
            BadInput(f"bias_scale_residual[{be}]/gamma_rank2", R(x, x, None, randn((1, 12), torch.float32, 2)), VE,
                     ("gamma",)),
            BadInput(f"bias_scale_residual[{be}]/y_bool", R(x, x > 0), TE, ("y",)),
        ]
    return out


declare(OpSpec(
    name="bias_scale_residual", fn=bias_scale_residual, ref=bias_scale_residual_ref,
    not_supported_reasons=bias_scale_residual_not_supported_reasons, kernel_backend="kernel", sample_inputs=_samples,
    atol=ATOL, check_tol=CHECK_TOL, sm90=SM90, bad_inputs=_bad_inputs))
