"""Fused multi-head attention for ViTs: ``softmax(q k^T * scale) v``.

Public API:

* :func:`attention` -- q, k, v ``[B, H, N, D]`` (any strides with the last one 1, so views
  of a packed qkv tensor are read in place) -> out ``[B, H, N, D]``. ``out`` is laid out
  as ``[B, N, H, D]`` in memory, so ``out.transpose(1, 2).reshape(B, N, H * D)`` is free.
* :func:`attention_packed` -- qkv ``[B, N, 3*H*D]`` straight from a ViT's qkv Linear
  (split as ``(3, H, D)``, timm's order) -> out ``[B, N, H*D]`` ready for the projection.
* :func:`attention_not_supported_reasons` -- why the Triton kernel cannot serve an input.

``backend="auto"`` runs the Triton kernel on CUDA tensors and ``torch``'s SDPA on the CPU
(that is the documented behaviour, not a fallback, so it does not warn); a CUDA input the
kernel cannot serve falls back to SDPA with a one-time warning. ``"kernel"`` forces the
kernel (on the CPU only under ``TRITON_INTERPRET=1``) and raises
:class:`~vitfast._dispatch.KernelNotSupported` with every reason; ``"reference"`` forces
PyTorch's SDPA. (``"triton"`` and ``"sdpa"``, the names before 0.2, still work.)
On the CPU, NaN/Inf in q or k propagate as in ``softmax(q k^T) v`` (PyTorch's CPU SDPA
kernels do not; see ``_sdpa``).

Precision: fp16 and bf16 inputs are multiplied on tensor cores with fp32 accumulation and
an fp32 softmax. fp32 inputs use TF32 dots when ``torch.backends.cuda.matmul.allow_tf32``
is True; otherwise (PyTorch's default) 3xTF32 dots, which keep close to fp32 accuracy on
the tensor cores. (The Triton interpreter always multiplies in fp32.)

Backward: by default one 5-matmul kernel (dq, dk, dv from one recomputation of P; one program
per (batch, head), dq summed in a fixed order: bit-identical runs) where N <= 1024, D <= 96 and
B*H fills the GPU, else the 7-matmul pair (a dK/dV kernel and a dQ kernel, also deterministic).
``VITFAST_ATTENTION_BWD=auto|fused|atomic|split|tma|tma_atomic`` (or
:func:`vitfast.ops.triton.attention.set_backward_variant`) forces one; ``atomic`` (5 matmuls,
one program per key tile, dq by atomic adds, so not bit-reproducible) is only ever opt-in and is
refused under ``torch.use_deterministic_algorithms(True)``; ``tma`` and ``tma_atomic`` are the
5-matmul kernels with their tiles moved by TMA (sm_90+; opt-in until GPU timings exist). Per call, ``deterministic=True`` never
takes ``atomic`` and ``deterministic=False`` lets ``auto`` take it where it would take the 7-matmul
pair (long sequences, wide heads, small grids).

Deterministic means what ``torch.use_deterministic_algorithms`` means: the same bits on every
run with the same kernel config. On the GPU the autotuner picks each kernel's config (its tile
sizes fix the order in which sums are taken) by timing, once per process and shape bucket, so
two processes may pick different configs and differ in the last bits; for bits that repeat
across processes as well, turn autotuning off (``VITFAST_ATTENTION_AUTOTUNE=0``: the first
surviving config, always the same), as ``torch.backends.cudnn.benchmark = False`` does for cuDNN.

Forward: the pointer kernel by default; on Hopper (sm_90+) with a Triton that has device-side
tensor descriptors, a TMA kernel (``tma``: TMA copies with out-of-bounds zero fill instead of masks,
warp-specialised configs) and a persistent one (``tma_persistent``).
``VITFAST_ATTENTION_FWD=auto|pointer|tma|tma_persistent`` (or
:func:`vitfast.ops.triton.attention.set_forward_variant`) picks one; ``auto`` takes the pointer kernel until a GPU run has checked the TMA kernels'
numerics (see ``vitfast/ops/triton/attention.py``, ``AUTO_TMA_MIN_N`` and ``forward_variant``).

Registration: four ops in the ``vitfast`` namespace -- ``attention_fwd``/``attention_bwd``
and ``attention_packed_fwd``/``attention_packed_bwd`` -- each with a fake (meta)
implementation and the forward ops with autograd, so ``torch.compile(fullgraph=True)``
traces through them. On the GPU they are ``torch.library.triton_op``s whose kernels are
wrapped with ``wrap_triton`` (Inductor sees the kernels); under the Triton interpreter they
are opaque ``torch.library.custom_op``s, because ``wrap_triton`` cannot trace an
interpreted kernel.
"""

from __future__ import annotations

import numbers
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .._dispatch import (BACKENDS, auto_is_reference, canonical_backend, raise_first, record_triton_kernels,  # noqa: F401
                         resolve_backend, shape_of, triton_op_registrar)
from .triton import attention as _k
from .reference import attention_ref
from .spec import BadInput, OpSpec, Sample, declare, randn

__all__ = ["attention", "attention_packed", "attention_not_supported_reasons"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INT32_MAX = 2**31 - 1


# ------------------------------------------------------------------------ validation
def _qkv_problems(op: str, tensors: dict) -> list[tuple[type, str]]:
    """Errors that no backend can run with: (exception type, message) pairs."""
    problems: list[tuple[type, str]] = []
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            problems.append((TypeError, f"vitfast.{op}: {name} must be a torch.Tensor, got {type(t).__name__}"))
    if problems:
        return problems
    (n0, t0), *rest = tensors.items()
    for name, t in tensors.items():
        if t.dim() != 4:
            problems.append((ValueError, f"vitfast.{op}: {name} must have 4 dimensions [B, H, N, D], got shape {shape_of(t)}"))
        elif t.shape[-1] == 0:
            problems.append((ValueError, f"vitfast.{op}: {name}.shape[-1] (head dim D) must be >= 1, got shape {shape_of(t)}"))
        if not (t.is_floating_point()):
            problems.append((TypeError, f"vitfast.{op}: {name} has dtype {t.dtype}; attention needs a floating-point dtype"))
    if problems:
        return problems
    for name, t in rest:
        if t.shape != t0.shape:
            problems.append((ValueError, f"vitfast.{op}: {name} has shape {shape_of(t)} but {n0} has {shape_of(t0)}; "
                                         f"expected {', '.join(tensors)} to share [B, H, N, D]"))
        if t.dtype != t0.dtype:
            problems.append((TypeError, f"vitfast.{op}: {name} has dtype {t.dtype} but {n0} has {t0.dtype}; expected one dtype"))
        if t.device != t0.device:
            problems.append((ValueError, f"vitfast.{op}: {name} is on {t.device} but {n0} is on {t0.device}; expected one device"))
    return problems


def attention_not_supported_reasons(q: Tensor, k: Tensor, v: Tensor) -> list[str]:
    """Why the Triton kernel cannot serve q, k, v (empty list: it can).

    Never raises; inputs no backend accepts (wrong rank, mismatched shapes, ...) are
    reported here too.
    """
    problems = _qkv_problems("attention", {"q": q, "k": k, "v": v})
    if problems:
        return [msg for _, msg in problems]
    reasons: list[str] = []
    B, H, N, D = q.shape
    if q.device.type != "cuda" and not _k.INTERPRET:
        reasons.append(f"q is on {q.device}; the Triton kernel needs CUDA tensors "
                       "(on the CPU it runs only with TRITON_INTERPRET=1 set before vitfast is imported)")
    if q.dtype not in _KERNEL_DTYPES:
        reasons.append(f"q has dtype {q.dtype}; the kernel supports float16, bfloat16 and float32")
    elif q.dtype == torch.bfloat16 and _k.INTERPRET:
        reasons.append("q has dtype torch.bfloat16, which the Triton interpreter (TRITON_INTERPRET=1) does not support")
    if D % 8 or not _k.MIN_HEAD_DIM <= D <= _k.MAX_HEAD_DIM:
        reasons.append(f"q.shape[-1] (head dim D) is {D}; the kernel takes multiples of 8 "
                       f"from {_k.MIN_HEAD_DIM} to {_k.MAX_HEAD_DIM}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            reasons.append(f"{name}.stride(-1) is {t.stride(-1)}; the kernel needs the last dimension contiguous (stride 1)")
        elif (N + 256) * max(t.stride(2), H * D) > _INT32_MAX:
            reasons.append(f"{name}: N * stride(2) = {N} * {t.stride(2)} overflows the kernel's 32-bit row offsets")
    if _k.grid_size(B * H, N, _k.MIN_TILE)[0] > _INT32_MAX:
        reasons.append(f"B*H*ceil(N/{_k.MIN_TILE}) = {_k.grid_size(B * H, N, _k.MIN_TILE)[0]} programs exceed the grid limit 2**31-1")
    return reasons


def _choose_backend(op: str, backend: str, q: Tensor, k: Tensor, v: Tensor) -> str:
    """``"kernel"`` (the Triton kernel) or ``"reference"`` (torch's SDPA); ``auto`` on CUDA
    follows the measured dispatch table (:func:`table_choice`) where the kernel can serve."""
    b = canonical_backend(op, backend)
    if b == "reference" or (b == "auto" and auto_is_reference(q.device)):
        return "reference"
    chosen = resolve_backend(op, backend, attention_not_supported_reasons(q, k, v))
    if chosen == "kernel" and b == "auto" and table_choice(op, q, k, v) == "torch":
        return "reference"
    return chosen


def table_choice(op: str, q: Tensor, k: Tensor, v: Tensor) -> str:
    """:func:`vitfast.dispatch.choose` for q, k, v ``[B, H, N, D]``: keyed by D, N and B * H."""
    from .. import dispatch

    B, H, N, D = q.shape
    return dispatch.choose(op, q.device, q.dtype, dispatch.training_call(q, k, v),
                           {"D": D, "N": max(N, 1), "BH": max(B * H, 1)})


def _default_scale(op: str, scale: Optional[float], head_dim: int) -> float:
    if scale is None:
        return float(head_dim ** -0.5)
    ok = (isinstance(scale, (numbers.Real, torch.SymFloat, torch.SymInt)) and not isinstance(scale, bool)) or (
        isinstance(scale, Tensor) and scale.numel() == 1 and (scale.is_floating_point() or scale.dtype in
                                                              (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)))
    if not ok:
        raise TypeError(f"vitfast.{op}: scale must be None or a float, got {_describe_scale(scale)}")
    if isinstance(scale, Tensor) and scale.requires_grad:
        raise TypeError(f"vitfast.{op}: scale is a tensor that requires grad; the kernels take scale as a constant "
                        "and would drop its gradient (pass float(scale), or scale q instead)")
    return float(scale)


def _describe_scale(scale) -> str:
    if isinstance(scale, Tensor):
        return f"a {scale.dtype} tensor of shape {shape_of(scale)}"
    text = repr(scale)
    return f"{type(scale).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _all_finite(*tensors: Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """The ``sdpa`` backend: PyTorch's SDPA, with non-finite q/k on the CPU computed exactly.

    PyTorch's CPU SDPA kernels do not propagate non-finite q or k as ``softmax(q k^T) v`` does:
    the flash kernel can return finite values where q or k holds a NaN or an Inf, and the
    math kernel's "safe" softmax gives 0 instead of NaN for a row whose scores are all -Inf.
    So on the CPU, when q or k holds a NaN/Inf, the output is the explicit formula
    (:func:`~vitfast.ops.reference.attention_ref`: fp32 math for fp16/bf16, an N x N score
    matrix for such inputs only), which propagates them as the reference and the Triton
    kernel do. The check reads q and k once (O(N D),
    next to the O(N^2 D) attention); it is never made on CUDA tensors (it would sync the host
    with the GPU), and it is skipped inside ``torch.compile``d graphs, where a data-dependent
    branch would break the graph: there non-finite q/k get SDPA's own answer.
    """
    if q.device.type == "cpu" and not torch.compiler.is_compiling() and q.numel() and not _all_finite(q, k):
        return attention_ref(q, k, v, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


# ------------------------------------------------------------------------- the ops
_register = triton_op_registrar(_k.INTERPRET)


def _empty_bnhd(like: Tensor, B: int, H: int, N: int, D: int, dtype=None) -> Tensor:
    """A fresh [B, H, N, D] tensor laid out as [B, N, H, D] (not a view)."""
    return torch.empty_strided((B, H, N, D), (N * H * D, D, H * D, 1),
                               dtype=dtype or like.dtype, device=like.device)


def _lse(like: Tensor, B: int, H: int, N: int) -> Tensor:
    return torch.empty((B, H, N), dtype=torch.float32, device=like.device)


def split_packed_qkv(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """[B, N, 3*H*D] -> three [B, H, N, D] views (timm's (3, H, D) split), no copies."""
    D = qkv.shape[-1] // (3 * num_heads)
    q, k, v = qkv.unflatten(-1, (3, num_heads, D)).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def _last_dim_contiguous(t: Tensor) -> Tensor:
    # e.g. the expanded gradient of out.sum() has stride 0 everywhere
    return t if t.stride(-1) == 1 else t.contiguous()


@_register("vitfast::attention_fwd", mutates_args=())
def _attention_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float,
                   deterministic: Optional[bool] = None) -> tuple[Tensor, Tensor]:
    """q, k, v [B, H, N, D] -> (out [B, H, N, D] laid out as [B, N, H, D], lse [B, H, N] fp32).
    ``deterministic`` only travels to the backward (see backward_variant)."""
    B, H, N, D = q.shape
    out, lse = _empty_bnhd(q, B, H, N, D), _lse(q, B, H, N)
    if out.numel():
        _k.launch_fwd(q, k, v, out, lse, scale)
    return out, lse


@_attention_fwd.register_fake
def _(q, k, v, scale, deterministic=None):
    torch._check(q.dim() == 4 and k.shape == q.shape and v.shape == q.shape,
                 lambda: "vitfast::attention_fwd: q, k, v must share [B, H, N, D]")
    B, H, N, D = q.shape
    return _empty_bnhd(q, B, H, N, D), _lse(q, B, H, N)


@_register("vitfast::attention_bwd", mutates_args=())
def _attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                   scale: float, deterministic: Optional[bool] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv), each [B, H, N, D] shaped like its input."""
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.numel():
        _k.launch_bwd(_last_dim_contiguous(dout), q, k, v, out, lse, dq, dk, dv, scale, deterministic=deterministic)
    return dq, dk, dv


@_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, scale, deterministic=None):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, scale, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale, ctx.deterministic = scale, deterministic


def _attention_backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _attention_bwd(dout, q, k, v, out, lse, ctx.scale, ctx.deterministic)
    return dq, dk, dv, None, None


_attention_fwd.register_autograd(_attention_backward, setup_context=_attention_setup_context)


@_register("vitfast::attention_packed_fwd", mutates_args=())
def _attention_packed_fwd(qkv: Tensor, num_heads: int, scale: float,
                          deterministic: Optional[bool] = None) -> tuple[Tensor, Tensor]:
    """qkv [B, N, 3*H*D] -> (out [B, N, H*D], lse [B, H, N] fp32); no copies in or out."""
    B, N, C = qkv.shape
    H, D = num_heads, C // (3 * num_heads)
    out, lse = qkv.new_empty((B, N, H * D)), _lse(qkv, B, H, N)
    if out.numel():
        q, k, v = split_packed_qkv(qkv, H)
        _k.launch_fwd(q, k, v, out.unflatten(-1, (H, D)).transpose(1, 2), lse, scale)
    return out, lse


@_attention_packed_fwd.register_fake
def _(qkv, num_heads, scale, deterministic=None):
    torch._check(qkv.dim() == 3, lambda: "vitfast::attention_packed_fwd: qkv must be [B, N, 3*H*D]")
    B, N, C = qkv.shape
    return qkv.new_empty((B, N, C // 3)), _lse(qkv, B, num_heads, N)


@_register("vitfast::attention_packed_bwd", mutates_args=())
def _attention_packed_bwd(dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, num_heads: int,
                          scale: float, deterministic: Optional[bool] = None) -> Tensor:
    """dqkv [B, N, 3*H*D]: dq, dk, dv are written straight into their packed slots."""
    B, N, C = qkv.shape
    H, D = num_heads, C // (3 * num_heads)
    dqkv = qkv.new_empty((B, N, C))
    if dqkv.numel():
        q, k, v = split_packed_qkv(qkv, H)
        dq, dk, dv = split_packed_qkv(dqkv, H)
        as_bhnd = lambda t: _last_dim_contiguous(t).unflatten(-1, (H, D)).transpose(1, 2)  # noqa: E731
        _k.launch_bwd(as_bhnd(dout), q, k, v, as_bhnd(out), lse, dq, dk, dv, scale, deterministic=deterministic)
    return dqkv


@_attention_packed_bwd.register_fake
def _(dout, qkv, out, lse, num_heads, scale, deterministic=None):
    return qkv.new_empty(qkv.shape)


def _packed_setup_context(ctx, inputs, output):
    qkv, num_heads, scale, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse)
    ctx.num_heads, ctx.scale, ctx.deterministic = num_heads, scale, deterministic


def _packed_backward(ctx, dout, _dlse):
    qkv, out, lse = ctx.saved_tensors
    return _attention_packed_bwd(dout, qkv, out, lse, ctx.num_heads, ctx.scale, ctx.deterministic), None, None, None


_attention_packed_fwd.register_autograd(_packed_backward, setup_context=_packed_setup_context)


if not _k.INTERPRET:  # see record_triton_kernels: the AST scan of the op bodies finds none
    _BWD_KERNELS = (_k._bwd_preprocess_kernel, _k._attn_bwd_dkdv_kernel, _k._attn_bwd_dq_kernel,
                    _k._attn_bwd_fused_kernel, _k._tma._attn_bwd_tma_kernel)
    _FWD_KERNELS = (_k._attn_fwd_kernel, _k._tma._attn_fwd_tma_kernel, _k._tma._attn_fwd_tma_persistent_kernel)
    for _op, _kernels in (("attention_fwd", _FWD_KERNELS), ("attention_bwd", _BWD_KERNELS),
                          ("attention_packed_fwd", _FWD_KERNELS), ("attention_packed_bwd", _BWD_KERNELS)):
        record_triton_kernels(f"vitfast::{_op}", _kernels)


# ---------------------------------------------------------------------- public API
def _autocast(*ts: Tensor) -> tuple:
    """Under autocast, floating-point inputs in the autocast dtype, as SDPA (on autocast's
    lower-precision list) gets them: e.g. q and k from an fp32 LayerNorm (qk_norm) beside a
    bf16 v. Outside autocast, or for non-tensors, the inputs unchanged."""
    if not all(isinstance(t, Tensor) for t in ts):
        return ts
    kind = ts[0].device.type
    if kind not in _AUTOCAST_DEVICES or not torch.is_autocast_enabled(kind):  # (meta: no autocast, no error)
        return ts
    dtype = torch.get_autocast_dtype(kind)
    # float64 stays float64, as autocast leaves it for SDPA
    return tuple(t.to(dtype) if t.dtype in _AUTOCAST_CAST else t for t in ts)


_AUTOCAST_DEVICES = ("cuda", "cpu", "xpu", "mps", "hpu")
_AUTOCAST_CAST = (torch.float32, torch.float16, torch.bfloat16)


def attention(q: Tensor, k: Tensor, v: Tensor, *, scale: Optional[float] = None,
              backend: str = "auto", deterministic: Optional[bool] = None) -> Tensor:
    """``softmax(q @ k^T * scale) @ v`` for q, k, v ``[B, H, N, D]``.

    Any strides work as long as the last dimension has stride 1. ``scale`` defaults to
    ``D ** -0.5``. Returns ``[B, H, N, D]`` (with the Triton kernel, laid out as
    ``[B, N, H, D]`` in memory). Differentiable in q, k and v.

    ``deterministic`` (the kernel's backward): None (default) follows
    ``VITFAST_ATTENTION_BWD``/``set_backward_variant``, which are deterministic unless set to
    ``atomic``; True never adds dq atomically; False lets the backward add dq atomically (5
    matmuls instead of 7, not bit-reproducible) where the deterministic 5-matmul kernel does not
    apply. ``torch.use_deterministic_algorithms(True)`` overrides False. Bit-identical across
    processes too only with autotuning off (see the module docstring).
    """
    q, k, v = _autocast(q, k, v)
    raise_first(_qkv_problems("attention", {"q": q, "k": k, "v": v}))
    scale = _default_scale("attention", scale, q.shape[-1])
    _check_deterministic("attention", deterministic)
    if _choose_backend("attention", backend, q, k, v) == "reference":
        return _sdpa(q, k, v, scale)
    return _attention_fwd(q, k, v, scale, deterministic)[0]


def _check_deterministic(op: str, deterministic) -> None:
    if deterministic is not None and not isinstance(deterministic, bool):
        raise TypeError(f"vitfast.{op}: deterministic must be None, True or False, "
                        f"got {type(deterministic).__name__} {deterministic!r}")


def attention_packed(qkv: Tensor, *, num_heads: int, scale: Optional[float] = None,
                     backend: str = "auto", deterministic: Optional[bool] = None) -> Tensor:
    """Attention straight from a ViT's fused qkv projection.

    ``qkv`` is ``[B, N, 3*H*D]`` (``H = num_heads``) split as ``(3, H, D)`` like timm's
    ``qkv.reshape(B, N, 3, H, D)``; returns ``[B, N, H*D]``, ready for the output
    projection. With the Triton kernel nothing is copied on the way in or out, and the
    backward writes dq, dk, dv straight into one packed ``[B, N, 3*H*D]`` gradient.
    ``deterministic`` as in :func:`attention`.
    """
    if not isinstance(qkv, Tensor):
        raise TypeError(f"vitfast.attention_packed: qkv must be a torch.Tensor, got {type(qkv).__name__}")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"vitfast.attention_packed: num_heads must be a positive int, got {num_heads!r}")
    if qkv.dim() == 3 and qkv.shape[-1] == 0:
        raise ValueError(f"vitfast.attention_packed: qkv must be [B, N, 3*H*D] with head dim D >= 1, got shape {shape_of(qkv)}")
    if qkv.dim() != 3 or qkv.shape[-1] % (3 * num_heads):
        raise ValueError(f"vitfast.attention_packed: qkv must be [B, N, 3*H*D] with H = num_heads = {num_heads}, "
                         f"got shape {shape_of(qkv)}")
    if not qkv.is_floating_point():
        raise TypeError(f"vitfast.attention_packed: qkv has dtype {qkv.dtype}; attention needs a floating-point dtype")
    (qkv,) = _autocast(qkv)
    q, k, v = split_packed_qkv(qkv, num_heads)
    raise_first(_qkv_problems("attention_packed", {"q": q, "k": k, "v": v}))
    scale = _default_scale("attention_packed", scale, q.shape[-1])
    _check_deterministic("attention_packed", deterministic)
    if _choose_backend("attention_packed", backend, q, k, v) == "reference":
        B, N, _ = qkv.shape
        H, D = q.shape[1], q.shape[-1]  # explicit: reshape cannot infer -1 when B or N is 0
        return _sdpa(q, k, v, scale).transpose(1, 2).reshape(B, N, H * D)
    return _attention_packed_fwd(qkv, num_heads, scale, deterministic)[0]


# ---------------------------------------------------------------------- declaration
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}
CHECK_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}
# (B, H, N, D): one token; batch 2 at N = 50 and D = 80; ViT-B's N with D = 72; ViT-L/14's N, D = 88
SHAPES = ((1, 1, 1, 64), (2, 2, 50, 80), (1, 2, 197, 72), (1, 1, 257, 88))


def attention_ref_same_dtype(q, k, v, scale=None):
    """The reference, in the inputs' dtype (PyTorch's own error in that dtype)."""
    return attention_ref(q, k, v, scale, upcast=False)


def attention_packed_ref(qkv, num_heads, scale=None):
    """:func:`attention_packed` in plain PyTorch (in qkv's dtype)."""
    q, k, v = split_packed_qkv(qkv, num_heads)
    return attention_ref(q, k, v, scale, upcast=False).transpose(1, 2).flatten(2)


def _samples(device, dtype):
    out = []
    for i, (B, H, N, D) in enumerate(SHAPES):
        q, k, v = (randn((B, H, N, D), dtype, 10 * i + j, device) for j in range(3))
        out.append(Sample(f"B{B} H{H} N{N} D{D}", (q, k, v), {}, grad=(0, 1, 2)))
    return out


def _packed_samples(device, dtype):
    return [Sample(f"B{B} N{N} H{H} D{D}", (randn((B, N, 3 * H * D), dtype, 7 + N, device),),
                   {"num_heads": H}, grad=(0,)) for B, N, H, D in ((2, 50, 3, 40), (1, 197, 2, 80))]


def _bad_inputs():
    t = lambda *shape: randn(shape, torch.float32, sum(shape))  # noqa: E731
    q = t(2, 2, 5, 16)
    VE, TE = (ValueError,), (TypeError,)
    A = lambda *a, **k: (lambda: attention(*a, **k))  # noqa: E731
    P = lambda *a, **k: (lambda: attention_packed(*a, **k))  # noqa: E731
    return [
        BadInput("attention/q_not_tensor", A([[1.0]], q, q), TE, ("q",)),
        BadInput("attention/q_rank3", A(q[0], q[0], q[0]), VE, ("q",)),
        BadInput("attention/k_shape", A(q, t(2, 2, 6, 16), q), VE, ("k",)),
        BadInput("attention/v_int", A(q, q, q.long()), TE, ("v",)),
        BadInput("attention/k_half", A(q, q.half(), q), TE, ("k",)),
        BadInput("attention/k_meta", A(q, q.to("meta"), q), VE, ("k",)),
        BadInput("attention/complex", A(*[q.to(torch.complex64)] * 3), TE, ("q",)),
        BadInput("attention/backend", A(q, q, q, backend="cuda"), VE, ("backend",)),
        BadInput("attention/head_dim_0", A(*[t(1, 1, 3, 0)] * 3, backend="reference"), VE, ("q", "D")),
        BadInput("attention/scale_str", A(q, q, q, scale="a", backend="reference"), TE, ("scale",)),
        BadInput("attention/scale_bool", A(q, q, q, scale=True), TE, ("scale",)),
        BadInput("attention/scale_list", A(q, q, q, scale=[0.5]), TE, ("scale",)),
        BadInput("attention/scale_tensor_2", A(q, q, q, scale=torch.ones(2), backend="kernel"), TE, ("scale",)),
        BadInput("attention/deterministic_str", A(q, q, q, deterministic="yes"), TE, ("deterministic",)),
        BadInput("attention_packed/deterministic_int", P(t(1, 4, 48), num_heads=2, deterministic=1), TE,
                 ("deterministic",)),
        BadInput("attention_packed/scale_str", P(t(1, 4, 48), num_heads=2, scale="0.5"), TE, ("scale",)),
        BadInput("attention/triton_head_dim_12", A(*[t(1, 1, 3, 12)] * 3, backend="kernel"), VE, ("q.shape[-1]",)),
        BadInput("attention/triton_head_dim_264", A(*[t(1, 1, 3, 264)] * 3, backend="kernel"), VE,
                 ("q.shape[-1]",)),
        BadInput("attention/triton_float64", A(*[q.double()] * 3, backend="kernel"), VE, ("dtype",)),
        BadInput("attention/triton_last_stride", A(*[t(1, 1, 3, 32)[..., ::2]] * 3, backend="kernel"), VE,
                 ("stride(-1)",)),
        BadInput("attention_packed/not_tensor", P([1.0], num_heads=1), TE, ("qkv",)),
        BadInput("attention_packed/heads_0", P(t(1, 4, 48), num_heads=0), VE, ("num_heads",)),
        BadInput("attention_packed/heads_neg", P(t(1, 4, 48), num_heads=-2), VE, ("num_heads",)),
        BadInput("attention_packed/heads_float", P(t(1, 4, 48), num_heads=2.0), VE, ("num_heads",)),
        BadInput("attention_packed/heads_bool", P(t(1, 4, 48), num_heads=True), VE, ("num_heads",)),
        BadInput("attention_packed/C_not_3HD", P(t(1, 4, 50), num_heads=2), VE, ("qkv",)),
        BadInput("attention_packed/rank2", P(t(4, 48), num_heads=2), VE, ("qkv",)),
        BadInput("attention_packed/int", P(t(1, 4, 48).long(), num_heads=2), TE, ("qkv",)),
        BadInput("attention_packed/C_0", P(t(1, 4, 0), num_heads=2, backend="reference"), VE, ("qkv",)),
        BadInput("attention_packed/triton_head_dim_8", P(t(1, 4, 48), num_heads=2, backend="kernel"), VE,
                 ("q.shape[-1]",)),
    ]


def _packed_reasons(qkv, num_heads, scale=None):
    return attention_not_supported_reasons(*split_packed_qkv(qkv, num_heads))


declare(OpSpec(
    name="attention", fn=attention, ref=attention_ref_same_dtype,
    not_supported_reasons=lambda q, k, v, scale=None: attention_not_supported_reasons(q, k, v),
    kernel_backend="kernel", sample_inputs=_samples, atol=ATOL, check_tol=CHECK_TOL,
    sm90=("attention:bfloat16:64:197", "attention:bfloat16:80:257", "attention:float16:72:577",
          "attention:bfloat16:88:257", "attention:float32:128:197"), bad_inputs=_bad_inputs))
declare(OpSpec(
    name="attention_packed", fn=attention_packed, ref=attention_packed_ref, not_supported_reasons=_packed_reasons,
    kernel_backend="kernel", sample_inputs=_packed_samples, atol=ATOL, check_tol=CHECK_TOL))
