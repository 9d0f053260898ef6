"""Argument checking, capability reasons and backend choice shared by the fused epilogue
ops (:mod:`~vitfast.ops.layer_norm`, :mod:`~vitfast.ops.bias_gelu`,
:mod:`~vitfast.ops.bias_scale_residual`).

Conventions of those ops: a *row* tensor has any leading dims and the hidden size ``C``
last; a *vector* (LayerScale gamma, LayerNorm weight/bias, a Linear's bias) is ``[C]``.
Inputs no backend can run (wrong shape, non-float dtype, mixed devices) raise
``ValueError``/``TypeError`` naming the argument; inputs only the Triton kernel cannot
serve are listed by the ``*_not_supported_reasons`` functions and, with
``backend="auto"``, fall back to the reference path (plain PyTorch).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .._dispatch import (auto_is_reference, canonical_backend, record_triton_kernels, resolve_backend, shape_of,
                         triton_op_registrar)
from .._dispatch import raise_first  # noqa: F401  (the fused ops import it from here)
from .triton import fused as _k

BACKENDS = ("auto", "kernel", "reference")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

register = triton_op_registrar(_k.INTERPRET)

Problems = list  # of (exception type, message)

# Declarations shared by the fused ops' specs (vitfast.ops.spec). ATOL: the floor on top of 2x
# eager PyTorch's error, relative to max(1, |ref|max): a couple of rounding steps of the dtype
# (fp32 1e-5 also covers another summation order over thousands of rows). CHECK_TOL: the
# self-test's bound (vitfast info --check). SM90: the compile cases covering all their kernels.
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}
CHECK_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}
SM90 = ("fused:bfloat16:768", "fused:bfloat16:1408", "fused:float32:4100")
ROW_SHAPES = ((1, 1, 8), (2, 50, 192), (3, 7, 72))  # [..., C]: one row, a ViT-ish width, an odd one


def record_kernels(ops_to_kernels: dict) -> None:
    """After an op module's registrations: name each triton_op's kernels for torch (see
    :func:`~vitfast._dispatch.record_triton_kernels`); nothing under the interpreter."""
    if not _k.INTERPRET:
        for op, kernels in ops_to_kernels.items():
            record_triton_kernels(f"vitfast::{op}", kernels)


def input_problems(op: str, rows: dict, vectors: dict) -> Problems:
    """What makes these inputs unusable by any backend. ``rows``: name -> row tensor, the
    first one sets the shape (all must match it); ``vectors``: name -> ``[C]`` tensor or
    None."""
    problems: Problems = []
    for name, t in list(rows.items()) + [(n, v) for n, v in vectors.items() if v is not None]:
        if not isinstance(t, Tensor):
            problems.append((TypeError, f"vitfast.{op}: {name} must be a torch.Tensor"
                                        f"{'' if name in rows else ' or None'}, got {type(t).__name__}"))
        elif not t.is_floating_point():
            problems.append((TypeError, f"vitfast.{op}: {name} has dtype {t.dtype}; expected a floating-point dtype"))
    if problems:
        return problems
    (n0, t0), *rest = rows.items()
    if t0.dim() == 0 or t0.shape[-1] == 0:
        return [(ValueError, f"vitfast.{op}: {n0} must have a hidden (last) dimension of size >= 1, "
                             f"got shape {shape_of(t0)}")]
    C = t0.shape[-1]
    for name, t in rest:
        if t.shape != t0.shape:
            problems.append((ValueError, f"vitfast.{op}: {name} has shape {shape_of(t)} but {n0} has "
                                         f"{shape_of(t0)}; expected the same shape"))
    for name, t in vectors.items():
        if t is not None and t.shape != (C,):
            problems.append((ValueError, f"vitfast.{op}: {name} has shape {shape_of(t)}; expected [{C}] "
                                         f"(the hidden size, {n0}.shape[-1])"))
    for name, t in list(rest) + [(n, v) for n, v in vectors.items() if v is not None]:
        if t.device != t0.device:
            problems.append((ValueError, f"vitfast.{op}: {name} is on {t.device} but {n0} is on {t0.device}; "
                                         "expected one device"))
    return problems


def check_out_dtype(op: str, out_dtype) -> None:
    if out_dtype is not None and (not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point):
        raise TypeError(f"vitfast.{op}: out_dtype must be None or a floating-point torch.dtype, got {out_dtype!r}")


def check_eps(op: str, eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"vitfast.{op}: eps must be a non-negative float, got {eps!r}")
    return float(eps)


def kernel_reasons(problems: Problems, tensors: dict, extra_dtypes: Sequence[torch.dtype] = ()) -> list[str]:
    """Why the Triton kernels cannot serve these (valid) inputs; ``problems`` first."""
    if problems:
        return [msg for _, msg in problems]
    present = {n: t for n, t in tensors.items() if t is not None}
    reasons: list[str] = []
    name0, t0 = next(iter(present.items()))
    if t0.device.type != "cuda" and not _k.INTERPRET:
        reasons.append(f"{name0} is on {t0.device}; the Triton kernels need CUDA tensors (on the CPU they run only "
                       "with TRITON_INTERPRET=1 set before vitfast is imported)")
    dtypes = [(n, t.dtype) for n, t in present.items()] + [("out_dtype", d) for d in extra_dtypes]
    for name, dt in dtypes:
        if dt not in KERNEL_DTYPES:
            reasons.append(f"{name} has dtype {dt}; the kernels support float16, bfloat16, float32 and float64")
        elif dt == torch.bfloat16 and _k.INTERPRET:
            reasons.append(f"{name} has dtype torch.bfloat16, which the Triton interpreter (TRITON_INTERPRET=1) "
                           "does not support")
    return reasons


def choose_backend(op: str, backend: str, device: torch.device, reasons: Callable[[], list[str]],
                   rows_of: Optional[Tensor] = None, *grad_inputs: Optional[Tensor]) -> str:
    """``"kernel"`` or ``"reference"``. ``auto`` on a non-CUDA tensor is the reference path
    by definition (no warning); on CUDA it is the kernel unless ``reasons()`` says why not
    (then a one-time warning) or the measured dispatch table (:mod:`vitfast.dispatch`, keyed by
    ``rows_of``'s width C, row count and dtype, training when any of ``grad_inputs`` needs a
    gradient) says the plain-PyTorch path was faster there. A forced ``"kernel"`` raises with
    every reason."""
    b = canonical_backend(op, backend)
    if b == "reference" or (b == "auto" and auto_is_reference(device)):
        return "reference"
    chosen = resolve_backend(op, backend, reasons())
    if chosen == "kernel" and b == "auto" and rows_of is not None and rows_of.dim() >= 1:
        from .. import dispatch

        C = rows_of.shape[-1]
        shape = {"C": C, "rows": max(1, rows_of.numel() // max(C, 1))}
        if dispatch.choose(op, device, rows_of.dtype, dispatch.training_call(*grad_inputs), shape) == "torch":
            return "reference"
    return chosen


def as_rows(t: Optional[Tensor], C: int) -> Optional[Tensor]:
    """``[..., C]`` -> ``[M, C]`` with unit column stride (a view when possible)."""
    if t is None:
        return None
    r = t.reshape(-1, C)
    return r if r.stride(-1) == 1 else r.contiguous()


def empty0(like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """The placeholder an op returns for a gradient that does not exist."""
    return like.new_empty((0,), dtype=dtype or like.dtype)
