"""LayerNorm fused with the residual add and LayerScale before it, in one pass.

Public API:

* :func:`add_layer_norm` -- ``x_out = x + gamma * (y + y_bias)``, ``h = LayerNorm(x_out)``;
  returns both. In a pre-norm ViT block this is the attention branch's residual add
  (``y`` the output projection without its bias, ``y_bias`` that bias, ``gamma`` the
  LayerScale) followed by ``norm2``: one read of x and y, one write of x_out and h,
  instead of eager PyTorch's four passes.
* :func:`layer_norm` -- plain ``LayerNorm(x) * weight + bias`` on the same kernel.
* :func:`add_layer_norm_ref`, :func:`layer_norm_ref` -- the plain-PyTorch chains.
* :func:`add_layer_norm_not_supported_reasons` -- why the kernel cannot serve an input.

Shapes: x, y ``[..., C]`` (any leading dims, any C >= 1 up to
``MAX_LN_HIDDEN`` = 16384 for the kernel); gamma, y_bias, weight, bias ``[C]`` or None.

Dtypes: float16/bfloat16/float32 (and float64); x and y may differ (e.g. an fp32
residual stream with a bf16 branch under autocast) and the vectors may be in any float
dtype. ``x_out`` has x's dtype; ``h`` has ``out_dtype`` (default: x's dtype). Arithmetic
is fp32; the statistics are those of ``x_out`` as stored, as in eager PyTorch.

Backends: ``backend="auto"`` runs the Triton kernel on CUDA tensors and the reference on
the CPU (by definition, no warning); a CUDA input the kernel cannot serve falls back to the
reference with a one-time warning. ``"kernel"`` forces the kernel (on the CPU only under
``TRITON_INTERPRET=1``) and raises :class:`~vitfast._dispatch.KernelNotSupported` with every
reason; ``"reference"`` forces plain PyTorch.

Registration: ``vitfast::add_layer_norm_fwd``/``_bwd`` and ``vitfast::layer_norm_fwd``/
``_bwd``, with fake implementations and autograd (every tensor input is differentiable);
``torch.library.triton_op`` on the GPU, ``custom_op`` under the interpreter.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .spec import BadInput, OpSpec, Sample, declare, randn
from .triton import fused as _k
from ._fused_common import (ATOL, CHECK_TOL, ROW_SHAPES, SM90, as_rows, check_eps, check_out_dtype, choose_backend,
                            empty0, input_problems, kernel_reasons, raise_first, record_kernels, register)

__all__ = ["add_layer_norm", "layer_norm", "add_layer_norm_ref", "layer_norm_ref",
           "add_layer_norm_not_supported_reasons", "layer_norm_not_supported_reasons"]

MAX_LN_HIDDEN = _k.MAX_LN_HIDDEN


# ------------------------------------------------------------------------ references
def _compute_dtype(upcast: bool, *tensors: Optional[Tensor]) -> Optional[torch.dtype]:
    if not upcast:
        return None
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _to(t: Optional[Tensor], dtype: Optional[torch.dtype]) -> Optional[Tensor]:
    return t if t is None or dtype is None else t.to(dtype)


def layer_norm_ref(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, eps: float = 1e-6,
                   *, out_dtype: Optional[torch.dtype] = None, upcast: bool = False) -> Tensor:
    """``F.layer_norm`` over the last dim, weight and bias in x's dtype, result in
    ``out_dtype`` (default x's). With ``upcast`` it runs in fp32 (fp64 stays fp64)."""
    ct = _compute_dtype(upcast, x, weight, bias) or x.dtype
    h = F.layer_norm(x.to(ct), (x.shape[-1],), _to(weight, ct), _to(bias, ct), eps)
    return h.to(out_dtype or x.dtype)


def add_layer_norm_ref(x: Tensor, y: Tensor, gamma: Optional[Tensor] = None, weight: Optional[Tensor] = None,
                       bias: Optional[Tensor] = None, eps: float = 1e-6, *, y_bias: Optional[Tensor] = None,
                       out_dtype: Optional[torch.dtype] = None, upcast: bool = False) -> tuple[Tensor, Tensor]:
    """The eager chain: ``x_out = x + gamma * (y + y_bias)`` (PyTorch's type promotion, then
    x's dtype) and ``h = layer_norm(x_out)``. With ``upcast`` the sum runs in fp32 (fp64
    stays fp64) before rounding to x's dtype."""
    ct = _compute_dtype(upcast, x, y, gamma, y_bias)
    branch = _to(y, ct)
    if y_bias is not None:
        branch = branch + _to(y_bias, ct)
    if gamma is not None:
        branch = branch * _to(gamma, ct)
    x_out = (_to(x, ct) + branch).to(x.dtype)
    return x_out, layer_norm_ref(x_out, weight, bias, eps, out_dtype=out_dtype, upcast=upcast)


# ------------------------------------------------------------------ capability checks
def _problems(x, y, gamma, y_bias, weight, bias, has_y: bool):
    rows = {"x": x, "y": y} if has_y else {"x": x}
    vectors = {"gamma": gamma, "y_bias": y_bias} if has_y else {}
    vectors.update(weight=weight, bias=bias)
    return input_problems("add_layer_norm" if has_y else "layer_norm", rows, vectors)


def _reasons(problems, tensors: dict, out_dtype) -> list[str]:
    reasons = kernel_reasons(problems, tensors, [out_dtype] if out_dtype is not None else [])
    if not problems:
        C = tensors["x"].shape[-1]
        if C > MAX_LN_HIDDEN:
            reasons.append(f"x.shape[-1] (hidden size) is {C}; the LayerNorm kernel keeps a row in registers "
                           f"and takes at most {MAX_LN_HIDDEN}")
    return reasons


def add_layer_norm_not_supported_reasons(x: Tensor, y: Tensor, gamma: Optional[Tensor] = None,
                                         weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, *,
                                         y_bias: Optional[Tensor] = None,
                                         out_dtype: Optional[torch.dtype] = None) -> list[str]:
    """Why the Triton kernel cannot serve these inputs (empty: it can). Never raises."""
    problems = _problems(x, y, gamma, y_bias, weight, bias, True)
    return _reasons(problems, dict(x=x, y=y, gamma=gamma, y_bias=y_bias, weight=weight, bias=bias), out_dtype)


def layer_norm_not_supported_reasons(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                                     *, out_dtype: Optional[torch.dtype] = None) -> list[str]:
    """Why the Triton kernel cannot serve these inputs (empty: it can). Never raises."""
    problems = _problems(x, None, None, None, weight, bias, False)
    return _reasons(problems, dict(x=x, weight=weight, bias=bias), out_dtype)


# --------------------------------------------------------------------------- the ops
def _stats(x: Tensor, M: int, *tensors: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    dt = _k.acc_dtype(x, *tensors)
    return x.new_empty((M,), dtype=dt), x.new_empty((M,), dtype=dt)


def _new(like: Tensor, shape, dtype: Optional[torch.dtype] = None) -> Tensor:
    return like.new_empty(shape, dtype=dtype or like.dtype)


def _vector_grads(sums: dict, like: Tensor, **dtypes: Optional[torch.dtype]) -> list[Tensor]:
    """Column sums cast to their parameters' dtypes; an empty tensor where a parameter is
    absent (dtype None). Zeros when there were no rows."""
    C = like.shape[-1]
    return [empty0(like) if dt is None else (sums[k].to(dt) if k in sums else like.new_zeros((C,), dtype=dt))
            for k, dt in dtypes.items()]


def _dtype(t: Optional[Tensor]) -> Optional[torch.dtype]:
    return None if t is None else t.dtype


@register("vitfast::add_layer_norm_fwd", mutates_args=())
def _add_ln_fwd(x: Tensor, y: Tensor, gamma: Optional[Tensor], y_bias: Optional[Tensor], weight: Optional[Tensor],
                bias: Optional[Tensor], eps: float,
                out_dtype: Optional[torch.dtype]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_out [..., C] in x's dtype, h [..., C] in out_dtype, mean [M], rstd [M] fp32/fp64)."""
    C = x.shape[-1]
    x_out, h = _new(x, x.shape), _new(x, x.shape, out_dtype)
    mean, rstd = _stats(x, x.numel() // C, y, gamma, y_bias, weight, bias)
    if x.numel():
        _k.launch_ln_fwd(as_rows(x, C), as_rows(y, C), y_bias, gamma, weight, bias,
                         x_out.view(-1, C), h.view(-1, C), mean, rstd, eps)
    return x_out, h, mean, rstd


@_add_ln_fwd.register_fake
def _(x, y, gamma, y_bias, weight, bias, eps, out_dtype):
    torch._check(y.shape == x.shape, lambda: "vitfast::add_layer_norm_fwd: x and y must have the same shape")
    mean, rstd = _stats(x, x.numel() // x.shape[-1], y, gamma, y_bias, weight, bias)
    return _new(x, x.shape), _new(x, x.shape, out_dtype), mean, rstd


@register("vitfast::add_layer_norm_bwd", mutates_args=())
def _add_ln_bwd(dx_out: Optional[Tensor], dh: Tensor, x_out: Tensor, y: Optional[Tensor], gamma: Optional[Tensor],
                y_bias: Optional[Tensor], weight: Optional[Tensor], bias_dtype: Optional[torch.dtype],
                mean: Tensor, rstd: Tensor,
                dy_dtype: Optional[torch.dtype]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dy, dgamma, dy_bias, dweight, dbias), each in its input's dtype (dbias in
    ``bias_dtype``); a gradient that does not exist (no gamma, ``dy_dtype`` None, ...) is
    an empty tensor. ``y`` is needed only with gamma; ``dx_out`` None means zeros."""
    C = x_out.shape[-1]
    dx = _new(x_out, x_out.shape)
    dy = _new(x_out, x_out.shape, dy_dtype) if dy_dtype is not None else None
    sums: dict = {}
    if x_out.numel():
        sums = _k.launch_ln_bwd(as_rows(dh, C), as_rows(dx_out, C), as_rows(x_out, C), as_rows(y, C), y_bias,
                                gamma, weight, bias_dtype is not None, mean, rstd, dx.view(-1, C),
                                dy.view(-1, C) if dy is not None else None, has_y=True)
    vecs = _vector_grads(sums, x_out, dgamma=_dtype(gamma), dy_bias=_dtype(y_bias), dweight=_dtype(weight),
                         dbias=bias_dtype)
    return (dx, dy if dy is not None else empty0(x_out), *vecs)


@_add_ln_bwd.register_fake
def _(dx_out, dh, x_out, y, gamma, y_bias, weight, bias_dtype, mean, rstd, dy_dtype):
    C = x_out.shape[-1]
    vec = lambda dt: _new(x_out, (C,), dt) if dt is not None else empty0(x_out)  # noqa: E731
    dy = _new(x_out, x_out.shape, dy_dtype) if dy_dtype is not None else empty0(x_out)
    return (_new(x_out, x_out.shape), dy, vec(_dtype(gamma)), vec(_dtype(y_bias)), vec(_dtype(weight)),
            vec(bias_dtype))


def _add_ln_setup(ctx, inputs, output):
    x, y, gamma, y_bias, weight, bias, eps, out_dtype = inputs
    x_out, h, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x_out, y if gamma is not None else None, gamma, y_bias, weight, mean, rstd)
    ctx.bias_dtype, ctx.y_dtype = _dtype(bias), y.dtype


def _add_ln_backward(ctx, dx_out, dh, _dmean, _drstd):
    x_out, y, gamma, y_bias, weight, mean, rstd = ctx.saved_tensors
    if dh is None:
        dh = torch.zeros_like(x_out)
    need = ctx.needs_input_grad
    dx, dy, dgamma, dy_bias, dweight, dbias = _add_ln_bwd(
        dx_out, dh, x_out, y, gamma, y_bias, weight, ctx.bias_dtype, mean, rstd, ctx.y_dtype if need[1] else None)
    some = lambda ok, t: t if ok else None  # noqa: E731
    return (dx, some(need[1], dy), some(gamma is not None, dgamma), some(y_bias is not None, dy_bias),
            some(weight is not None, dweight), some(ctx.bias_dtype is not None, dbias), None, None)


_add_ln_fwd.register_autograd(_add_ln_backward, setup_context=_add_ln_setup)


@register("vitfast::layer_norm_fwd", mutates_args=())
def _ln_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
            out_dtype: Optional[torch.dtype]) -> tuple[Tensor, Tensor, Tensor]:
    """(h [..., C] in out_dtype, mean [M], rstd [M] fp32/fp64)."""
    C = x.shape[-1]
    h = _new(x, x.shape, out_dtype)
    mean, rstd = _stats(x, x.numel() // C, weight, bias)
    if x.numel():
        _k.launch_ln_fwd(as_rows(x, C), None, None, None, weight, bias, None, h.view(-1, C), mean, rstd, eps)
    return h, mean, rstd


@_ln_fwd.register_fake
def _(x, weight, bias, eps, out_dtype):
    mean, rstd = _stats(x, x.numel() // x.shape[-1], weight, bias)
    return _new(x, x.shape, out_dtype), mean, rstd


@register("vitfast::layer_norm_bwd", mutates_args=())
def _ln_bwd(dh: Tensor, x: Tensor, weight: Optional[Tensor], bias_dtype: Optional[torch.dtype], mean: Tensor,
            rstd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias); dweight/dbias are empty when absent (dbias in ``bias_dtype``)."""
    C = x.shape[-1]
    dx = _new(x, x.shape)
    sums: dict = {}
    if x.numel():
        sums = _k.launch_ln_bwd(as_rows(dh, C), None, as_rows(x, C), None, None, None, weight,
                                bias_dtype is not None, mean, rstd, dx.view(-1, C), None, has_y=False)
    return (dx, *_vector_grads(sums, x, dweight=_dtype(weight), dbias=bias_dtype))


@_ln_bwd.register_fake
def _(dh, x, weight, bias_dtype, mean, rstd):
    C = x.shape[-1]
    vec = lambda dt: _new(x, (C,), dt) if dt is not None else empty0(x)  # noqa: E731
    return _new(x, x.shape), vec(_dtype(weight)), vec(bias_dtype)


def _ln_setup(ctx, inputs, output):
    x, weight, bias, eps, out_dtype = inputs
    h, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.bias_dtype = _dtype(bias)


def _ln_backward(ctx, dh, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias = _ln_bwd(dh, x, weight, ctx.bias_dtype, mean, rstd)
    return dx, dweight if weight is not None else None, dbias if ctx.bias_dtype is not None else None, None, None


_ln_fwd.register_autograd(_ln_backward, setup_context=_ln_setup)

record_kernels({"add_layer_norm_fwd": [_k._ln_fwd_kernel], "add_layer_norm_bwd": [_k._ln_bwd_kernel],
                "layer_norm_fwd": [_k._ln_fwd_kernel], "layer_norm_bwd": [_k._ln_bwd_kernel]})


# ---------------------------------------------------------------------- public API
def add_layer_norm(x: Tensor, y: Tensor, gamma: Optional[Tensor] = None, weight: Optional[Tensor] = None,
                   bias: Optional[Tensor] = None, eps: float = 1e-6, *, y_bias: Optional[Tensor] = None,
                   out_dtype: Optional[torch.dtype] = None, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """``x_out = x + gamma * (y + y_bias)`` and ``h = LayerNorm(x_out) * weight + bias``.

    x, y ``[..., C]``; gamma (LayerScale), y_bias (the bias of the Linear that made y),
    weight, bias (the LayerNorm's affine parameters) ``[C]`` or None. Returns
    ``(x_out, h)``: x_out in x's dtype, h in ``out_dtype`` (default x's dtype).
    Differentiable in every tensor argument.
    """
    raise_first(_problems(x, y, gamma, y_bias, weight, bias, True))
    check_out_dtype("add_layer_norm", out_dtype)
    eps = check_eps("add_layer_norm", eps)
    chosen = choose_backend("add_layer_norm", backend, x.device, lambda: add_layer_norm_not_supported_reasons(
        x, y, gamma, weight, bias, y_bias=y_bias, out_dtype=out_dtype), x, x, y, gamma, y_bias, weight, bias)
    if chosen == "reference":
        return add_layer_norm_ref(x, y, gamma, weight, bias, eps, y_bias=y_bias, out_dtype=out_dtype)
    x_out, h, _, _ = _add_ln_fwd(x, y, gamma, y_bias, weight, bias, eps, out_dtype)
    return x_out, h


def layer_norm(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, eps: float = 1e-6, *,
               out_dtype: Optional[torch.dtype] = None, backend: str = "auto") -> Tensor:
    """``LayerNorm(x) * weight + bias`` over the last dim of x ``[..., C]``; weight, bias
    ``[C]`` or None. Returns h in ``out_dtype`` (default x's dtype). Differentiable in x,
    weight and bias."""
    raise_first(_problems(x, None, None, None, weight, bias, False))
    check_out_dtype("layer_norm", out_dtype)
    eps = check_eps("layer_norm", eps)
    chosen = choose_backend("layer_norm", backend, x.device, lambda: layer_norm_not_supported_reasons(
        x, weight, bias, out_dtype=out_dtype), x, x, weight, bias)
    if chosen == "reference":
        return layer_norm_ref(x, weight, bias, eps, out_dtype=out_dtype)
    return _ln_fwd(x, weight, bias, eps, out_dtype)[0]


# ---------------------------------------------------------------------- declaration
def _samples(device, dtype, add: bool):
    out = []
    for i, shape in enumerate(ROW_SHAPES):
        C = shape[-1]
        x = randn(shape, dtype, 10 * i, device, scale=2.0, shift=0.5)
        w, b = randn((C,), dtype, 10 * i + 1, device, 0.5, 1.0), randn((C,), dtype, 10 * i + 2, device)
        if add:
            y = randn(shape, dtype, 10 * i + 3, device)
            g, yb = randn((C,), dtype, 10 * i + 4, device, 0.5), randn((C,), dtype, 10 * i + 5, device)
            out.append(Sample(f"{list(shape)}", (x, y, g, w, b, 1e-6), {"y_bias": yb}, grad=(0, 1, 2, 3, 4)))
        else:
            out.append(Sample(f"{list(shape)}", (x, w, b, 1e-6), {}, grad=(0, 1, 2)))
    if not add:  # no affine parameters, and a large eps that matters
        x = randn((4, 24), dtype, 99, device, scale=1e-2)
        out.append(Sample("no-affine, eps 0.1", (x, None, None, 0.1), {}, grad=(0,)))
    return out


def _bad_inputs():
    x, v = randn((2, 5, 12), torch.float32, 0), randn((12,), torch.float32, 1)
    VE, TE = (ValueError,), (TypeError,)
    out = []
    for be in ("kernel", "reference"):
        L = lambda *a, **k: (lambda: layer_norm(*a, backend=be, **k))  # noqa: E731
        AL = lambda *a, **k: (lambda: add_layer_norm(*a, backend=be, **k))  # noqa: E731
        out += [
            BadInput(f"layer_norm[{be}]/hidden_0", L(randn((2, 0), torch.float32, 2)), VE, ("x",)),
            BadInput(f"layer_norm[{be}]/scalar", L(torch.tensor(1.0)), VE, ("x",)),
            BadInput(f"layer_norm[{be}]/weight_shape", L(x, randn((11,), torch.float32, 3)), VE, ("weight",)),
            BadInput(f"layer_norm[{be}]/weight_list", L(x, [1.0] * 12), TE, ("weight",)),
            BadInput(f"layer_norm[{be}]/x_int", L(x.long()), TE, ("x",)),
            BadInput(f"layer_norm[{be}]/eps_negative", L(x, eps=-1.0), VE, ("eps",)),
            BadInput(f"layer_norm[{be}]/eps_nan", L(x, eps=float("nan")), VE, ("eps",)),
            BadInput(f"layer_norm[{be}]/out_dtype_int", L(x, out_dtype=torch.int32), TE, ("out_dtype",)),
            BadInput(f"layer_norm[{be}]/bias_meta", L(x, None, v.to("meta")), VE, ("bias",)),
            BadInput(f"add_layer_norm[{be}]/y_shape", AL(x, x[:1]), VE, ("y",)),
            BadInput(f"add_layer_norm[{be}]/gamma_shape", AL(x, x, randn((3,), torch.float32, 4)), VE, ("gamma",)),
            BadInput(f"add_layer_norm[{be}]/y_bias_int", AL(x, x, y_bias=torch.ones(12, dtype=torch.long)), TE,
                     ("y_bias",)),
        ]
    out.append(BadInput("layer_norm/backend", lambda: layer_norm(x, backend="cuda"), VE, ("backend",)))
    return out


declare(OpSpec(
    name="layer_norm", fn=layer_norm, ref=layer_norm_ref,
    not_supported_reasons=lambda x, weight=None, bias=None, eps=1e-6, **kw: layer_norm_not_supported_reasons(
        x, weight, bias, **kw),
    kernel_backend="kernel", sample_inputs=lambda device, dtype: _samples(device, dtype, add=False),
    atol=ATOL, check_tol=CHECK_TOL, sm90=SM90, bad_inputs=_bad_inputs))
declare(OpSpec(
    name="add_layer_norm", fn=add_layer_norm, ref=add_layer_norm_ref,
    not_supported_reasons=lambda x, y, gamma=None, weight=None, bias=None, eps=1e-6, **kw:
        add_layer_norm_not_supported_reasons(x, y, gamma, weight, bias, **kw),
    kernel_backend="kernel",
    sample_inputs=lambda device, dtype: _samples(device, dtype, add=True), atol=ATOL, check_tol=CHECK_TOL))
