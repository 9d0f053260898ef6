"""Patch embedding: raw or float images to ViT tokens in one op (``torch.ops.vitfast.patch_embed``).

Two implementations on CUDA, one on the CPU (whose GEMM is MKL's on a patch matrix or oneDNN's
convolution on the normalised image, by CPU: :func:`cpu_strategy`):

* the C++ op (schemas and CPU/CUDA kernels in ``csrc/``: forward ``vitfast::patch_embed``,
  backward ``vitfast::patch_embed_backward``); on CUDA three launches (patchify to a patch
  matrix, bias + pos prefill, cuBLAS GEMM with beta = 1): ``backend="gemm"`` forces it;
* on CUDA, the fused Triton implicit GEMM (``vitfast::patch_embed_fused`` and
  ``vitfast::patch_embed_fused_backward``, kernels in :mod:`vitfast.ops.triton.patch_embed`):
  one launch forward, the weight gradient over recomputed patches backward; ``backend="fused"``
  forces it (also on CPU tensors under ``TRITON_INTERPRET=1``, for the tests).

``backend="kernel"``/``"auto"`` on CUDA take the fused kernel where it can serve the input
(:func:`patch_embed_fused_not_supported_reasons`) unless the measured dispatch table
(:mod:`vitfast.dispatch`, op ``patch_embed``: ``kernel`` = fused, ``torch`` = the cuBLAS path;
``vitfast tune`` times both) chose the three-kernel path there, else the C++ op. This module
holds the typed wrapper, the argument checks shared with the fake (meta) implementations, and
the registrations (fake, autograd). Without a usable compiled extension (``vitfast._ext.status()``:
not built, or built for another torch) the C++ op is not registered and ``backend="auto"`` runs
the fused kernel on CUDA, else the reference, warning once why.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import torch
from torch.fx.experimental.symbolic_shapes import sym_or

from .._dispatch import (BACKENDS, KernelNotSupported, canonical_backend, record_triton_kernels, resolve_backend,
                         shape_of, triton_op_registrar)
from .. import _ext
from .reference import patch_embed_ref
from .triton import patch_embed as _tk
from .spec import BadInput, OpSpec, Sample, declare, randn

_C = _ext.load_extension()  # None when the extension cannot be used (the reason: _ext.status())

__all__ = ["patch_embed", "patch_embed_not_supported_reasons", "patch_embed_fused_not_supported_reasons",
           "check_patch_embed_args", "cpu_strategy", "set_cpu_strategy", "BACKENDS", "IMPLEMENTATIONS"]

CPU_STRATEGIES = ("auto", "gemm", "conv")


def _read_cpu_strategy() -> str:
    fn = getattr(_C, "cpu_patch_embed_strategy", None)
    return fn() if fn is not None else "gemm"


# The C++ op reads VITFAST_CPU_PATCH_EMBED at every call; this copy (taken at import and by
# set_cpu_strategy) decides whether the autograd path keeps the patch matrix, a constant for
# torch.compile.
_CPU_STRATEGY = _read_cpu_strategy()


def cpu_strategy() -> str:
    """The GEMM of the float32 CPU patch embedding: ``"gemm"`` (a patch matrix and MKL's sgemm;
    the backward keeps the matrix for the weight gradient) or ``"conv"`` (oneDNN's convolution on
    the normalised channels-last image, its backward for the weight gradient). ``auto`` picks
    ``conv`` on x86 CPUs that are not Intel's, where MKL runs its generic code paths (measured
    1.4-1.7x faster on an AMD EPYC; the GEMM 1.2-1.4x faster on an Intel Xeon), else ``gemm``.
    float64 weights always take the GEMM. ``VITFAST_CPU_PATCH_EMBED`` or :func:`set_cpu_strategy`
    force one."""
    return _CPU_STRATEGY


def set_cpu_strategy(name: str) -> str:
    """Force the CPU GEMM strategy (``"gemm"``, ``"conv"``) or go back to ``"auto"``; returns the
    setting before (``"auto"`` when none was forced), to restore it with. Sets
    ``VITFAST_CPU_PATCH_EMBED`` for this process."""
    global _CPU_STRATEGY
    if name not in CPU_STRATEGIES:
        raise ValueError(f"set_cpu_strategy: name must be one of {CPU_STRATEGIES}, got {name!r}")
    previous = os.environ.get("VITFAST_CPU_PATCH_EMBED", "auto")
    previous = previous if previous in CPU_STRATEGIES else "auto"
    if name == "auto":
        os.environ.pop("VITFAST_CPU_PATCH_EMBED", None)
    else:
        os.environ["VITFAST_CPU_PATCH_EMBED"] = name
    _CPU_STRATEGY = _read_cpu_strategy()
    return previous

# backend= names that force one CUDA implementation of the kernel (besides BACKENDS): the fused
# Triton implicit GEMM (vitfast::patch_embed_fused) or the C++ three-kernel path (vitfast::patch_embed:
# patchify, bias + pos prefill, cuBLAS GEMM)
IMPLEMENTATIONS = ("fused", "gemm")


ChannelStats = Optional[Union[torch.Tensor, Sequence[float]]]
_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def check_patch_embed_args(images, weight, bias=None, cls_token=None, pos_embed=None, mean=None, std=None):
    """Raise a ValueError/TypeError naming the argument for any input the op cannot take.

    The values of std are checked (no zero, no NaN) where that needs no host sync: sequences and
    CPU tensors (outside torch.compile); CUDA tensors are not value-checked.

    Returns ``(B, N, T, D)``: batch, patches, tokens out, embedding dim.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"vitfast.patch_embed: images must be a [B, C, H, W] tensor, got {_describe(images)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        raise ValueError(f"vitfast.patch_embed: weight must be a [D, C, p, p] tensor, got {_describe(weight)}")
    if images.dtype != torch.uint8 and images.dtype not in _FLOAT:
        raise TypeError(f"vitfast.patch_embed: images must be uint8 or floating point, got {images.dtype}")
    if weight.dtype not in _FLOAT:
        raise TypeError(f"vitfast.patch_embed: weight must be floating point, got {weight.dtype}")
    B, C, H, W = images.shape
    D, Cw, p, q = weight.shape
    if p < 1:
        raise ValueError(f"vitfast.patch_embed: weight must be [D, C, p, p] with p >= 1, got {shape_of(weight)}")
    if C < 1:
        raise ValueError(f"vitfast.patch_embed: images must have at least one channel, got {shape_of(images)}")
    if p != q:
        raise ValueError(f"vitfast.patch_embed: weight must have a square kernel [D, C, p, p], got {shape_of(weight)}")
    if Cw != C:
        raise ValueError(
            f"vitfast.patch_embed: images have {C} channels but weight expects {Cw} (weight shape {shape_of(weight)})"
        )
    if H % p or W % p:
        raise ValueError(f"vitfast.patch_embed: image size {H}x{W} is not divisible by the patch size {p}")
    N = (H // p) * (W // p)
    T = N + (1 if cls_token is not None else 0)  # SymInt + bool breaks sympy on torch 2.11
    for name, t in (("bias", bias), ("cls_token", cls_token), ("pos_embed", pos_embed)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"vitfast.patch_embed: {name} must be a tensor or None, got {type(t).__name__}")
    for name, t in (("weight", weight), ("bias", bias), ("cls_token", cls_token), ("pos_embed", pos_embed),
                    ("mean", mean), ("std", std)):
        if isinstance(t, torch.Tensor) and t.device != images.device:
            raise ValueError(f"vitfast.patch_embed: {name} is on {t.device} but images are on {images.device}")
    for name, t in (("bias", bias), ("cls_token", cls_token), ("pos_embed", pos_embed)):
        if t is not None and t.dtype not in _FLOAT:
            raise TypeError(f"vitfast.patch_embed: {name} must be floating point, got {t.dtype}")
    if bias is not None and shape_of(bias) != [D]:
        raise ValueError(f"vitfast.patch_embed: bias must be [{D}], got {shape_of(bias)}")
    if cls_token is not None and (cls_token.dim() < 1 or cls_token.numel() != D or cls_token.shape[-1] != D):
        raise ValueError(f"vitfast.patch_embed: cls_token must be [1, 1, {D}], got {shape_of(cls_token)}")
    if pos_embed is not None:
        allowed = [[1, T, D]] + ([[1, N, D]] if cls_token is not None else [])
        if shape_of(pos_embed) not in allowed:
            extra = f" (or [1, {N}, {D}] for patches only)" if cls_token is not None else ""
            raise ValueError(
                f"vitfast.patch_embed: pos_embed must be [1, {T}, {D}]{extra} for "
                f"{H // p}x{W // p} patches of {H}x{W} images, got {shape_of(pos_embed)}"
            )
    if (mean is None) != (std is None):
        missing = "std" if std is None else "mean"
        raise ValueError(
            f"vitfast.patch_embed: mean and std must be given together ({missing} is missing); without both, "
            "uint8 images are only divided by 255 and float images are used as they are"
        )
    for name, t in (("mean", mean), ("std", std)):
        if t is None:
            continue
        if isinstance(t, torch.Tensor):
            if t.is_complex() or not (t.is_floating_point() or t.dtype in _INT):
                raise TypeError(f"vitfast.patch_embed: {name} must be a real tensor, got {t.dtype}")
            numel = t.numel()
        else:
            bad_type = TypeError(f"vitfast.patch_embed: {name} must be a tensor or a sequence of {C} floats, "
                                 f"got {_describe_stats(t)}")
            if isinstance(t, (str, bytes)):
                raise bad_type
            try:
                numel = len(t)
                [float(v) for v in t]  # nested sequences, strings, None, ... are not floats
            except (TypeError, ValueError):
                raise bad_type from None
        if numel != C:
            raise ValueError(
                f"vitfast.patch_embed: {name} must have one value per channel ({C}), got {numel} value(s)"
            )
        if name == "std" and _std_invalid(t):
            values = t.tolist() if isinstance(t, torch.Tensor) else list(t)
            raise ValueError(f"vitfast.patch_embed: std must be non-zero and not NaN, got {values}")
    return B, N, T, D


def _std_invalid(std) -> bool:
    """A zero or NaN in std (a sequence, or a tensor whose values can be read here without a host
    sync or a trace: a plain CPU tensor outside torch.compile). Other tensors (CUDA, meta, fake)
    are not value-checked."""
    if not isinstance(std, torch.Tensor):
        return any(v == 0.0 or v != v for v in map(float, std))
    if type(std) not in (torch.Tensor, torch.nn.Parameter) or std.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    return bool(((std == 0) | std.isnan()).any())


def _describe_stats(x) -> str:
    text = repr(x)
    return f"{type(x).__name__} {text if len(text) <= 80 else text[:77] + '...'}"


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {shape_of(x)}"
    return type(x).__name__


_STATS_CACHE: dict = {}


def _stats(x: ChannelStats, device: torch.device) -> Optional[torch.Tensor]:
    """mean/std as the float64 [C] tensor the op takes. Python sequences are converted once
    per device and cached: building them anew would be a blocking host-to-device copy on
    every call with CUDA images."""
    if x is None:
        return None
    if isinstance(x, torch.Tensor) or torch.compiler.is_compiling():
        return torch.as_tensor(x, dtype=torch.float64, device=device).reshape(-1).contiguous()
    key = (tuple(float(v) for v in x), str(device))
    t = _STATS_CACHE.get(key)
    if t is None:
        if len(_STATS_CACHE) > 64:
            _STATS_CACHE.clear()
        with torch.inference_mode(False):  # a normal tensor, usable later with autograd
            t = _STATS_CACHE[key] = torch.tensor(key[0], dtype=torch.float64, device=device)
    return t


def patch_embed_not_supported_reasons(images, weight, bias=None, *, cls_token=None, pos_embed=None,
                                      mean=None, std=None) -> list[str]:
    """Why the C++/CUDA op cannot serve these inputs (empty list: it can). Never raises;
    inputs no backend accepts are reported here too."""
    try:
        check_patch_embed_args(images, weight, bias, cls_token, pos_embed, mean, std)
    except (TypeError, ValueError) as e:
        return [str(e)]
    if _C is None:
        return [_ext.status().message()]
    device = images.device.type
    if device not in ("cpu", "cuda", "meta"):
        return [f"images are on {images.device}; vitfast's patch-embedding kernels run on CPU and CUDA tensors"]
    if device == "cuda" and not _C.with_cuda:
        return ["images are on CUDA but vitfast._C was built without its CUDA kernels (see `vitfast info`)"]
    return []


def patch_embed(
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    cls_token: Optional[torch.Tensor] = None,
    pos_embed: Optional[torch.Tensor] = None,
    mean: ChannelStats = None,
    std: ChannelStats = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Images to ViT tokens in one fused op.

    Args:
        images: ``[B, C, H, W]``, uint8 (raw pixels) or float16/bfloat16/float32/float64,
            NCHW or channels_last.
        weight: ``[D, C, p, p]`` (a stride-p Conv2d's weight, timm's layout).
        bias: ``[D]``.
        cls_token: ``[1, 1, D]``, prepended to the patch tokens.
        pos_embed: ``[1, T, D]`` with T the tokens out, or ``[1, N, D]`` for the patches only
            (timm's ``no_embed_class``).
        mean, std: per-channel statistics (``C`` values). uint8 images become
            ``(images/255 - mean)/std``, float images ``(images - mean)/std``; without them
            uint8 images become ``images/255`` and float images are used as they are.
            A zero or NaN in std raises a ValueError for sequences and CPU tensors; the values
            of CUDA tensors are not checked (that would be a host sync).

    Returns:
        ``[B, T, D]`` in the weight's dtype, T = N (+1 with cls_token), N = (H/p)(W/p):
        ``cat(cls, conv2d(x, weight, bias, stride=p).flatten(2).transpose(1, 2)) + pos_embed``.
        Under ``torch.autocast`` as that chain under autocast: the GEMM in the autocast dtype, and
        float32 tokens when the class token or the positions are float32 (timm's residual stream).
        As autocast never casts float64, a float64 weight (and bias) keeps its GEMM and its tokens
        in float64.

    Differentiable in images (float only), weight, bias, cls_token and pos_embed (through the
    registered ``vitfast::patch_embed_backward``). mean and std are constants of the data
    pipeline and get no gradient. No double backward.

    ``backend``: ``"kernel"`` (vitfast's kernel: on CUDA the fused Triton kernel where it can
    serve the inputs and the dispatch table does not prefer the three-kernel path, else the
    registered C++/CUDA op; raises with the reasons when neither can), ``"fused"`` / ``"gemm"``
    (force one CUDA implementation, see the module docstring), ``"reference"`` (the eager chain,
    :func:`patch_embed_ref`) or ``"auto"`` (the kernel, else the reference with a one-time
    warning listing the reasons, e.g. that vitfast's compiled extension is not built).

    Raises:
        ValueError / TypeError naming the argument for any shape, dtype or device it cannot
        take, before any kernel runs.
    """
    check_patch_embed_args(images, weight, bias, cls_token, pos_embed, mean, std)
    if backend in IMPLEMENTATIONS or (images.device.type == "cuda"
                                      and canonical_backend("patch_embed", backend) != "reference"):
        out = _try_fused(images, weight, bias, cls_token, pos_embed, mean, std, backend)
        if out is not None:
            return out
        backend = "kernel" if backend in IMPLEMENTATIONS else backend  # "gemm": the C++ op below
    reasons = [] if canonical_backend("patch_embed", backend) == "reference" else patch_embed_not_supported_reasons(
        images, weight, bias, cls_token=cls_token, pos_embed=pos_embed, mean=mean, std=std)
    if resolve_backend("patch_embed", backend, reasons) == "reference":
        return patch_embed_ref(images, weight, bias, cls_token=cls_token, pos_embed=pos_embed, mean=mean, std=std)
    mean_t, std_t = _stats(mean, images.device), _stats(std, images.device)
    patches = None
    if (images.device.type == "cpu" and weight.requires_grad and torch.is_grad_enabled()
            and (_CPU_STRATEGY == "gemm" or _grad_acc_dtype(weight) == torch.float64)):
        # Keep the patch matrix for the weight gradient, as a Linear keeps its input, instead of
        # re-making it from the images in the backward (on the CPU that pass is ~4% of a
        # forward + backward). On CUDA the backward re-makes it: cheap there, and memory is not.
        # The "conv" strategy keeps nothing: its backward re-makes the normalised image.
        # In the CPU compute dtype of this (uncast) weight, float32 or float64: under autocast the
        # op's Autocast kernel casts the weight to a 16-bit dtype, whose compute dtype is float32
        # too, and leaves float64 as it is, so these are what the op expects either way.
        patches = torch.ops.vitfast.patch_embed_patches(images.detach(), weight.detach(), cls_token is not None,
                                                        mean_t, std_t)
    return torch.ops.vitfast.patch_embed(images, weight, bias, cls_token, pos_embed, mean_t, std_t, patches)


def _patches_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype of patch_embed_patches: the CPU kernels' compute dtype, the weight's on CUDA."""
    return weight.dtype if weight.device.type == "cuda" else _grad_acc_dtype(weight)


# The fake (meta) implementations check what the C++ kernels check (csrc/patch_embed_common.cpp),
# with the same exception classes: besides tracing, the dispatcher sends them real calls in which
# one tensor is on the meta device (a meta `patches` or `grad_out` beside CPU tensors), which must
# raise rather than return uninitialised memory. Device, dtype and flags are concrete: plain raises.
# Sizes may be symbolic under torch.compile: torch._check_value (a ValueError when false, a
# runtime assertion rather than a guard when it cannot be decided while tracing).
def _check_patches(patches, images, weight, B: int, T: int, op: str = "vitfast.patch_embed") -> None:
    if patches is None:
        return
    K = weight.shape[1] * weight.shape[2] * weight.shape[3]
    want = lambda: (f"{op}: patches must be [{B * T}, {K}] (patch_embed_patches of these images), "  # noqa: E731
                    f"got {shape_of(patches)}")
    if patches.dim() != 2:
        raise ValueError(want())
    torch._check_value(patches.shape[0] == B * T, want)
    torch._check_value(patches.shape[1] == K, want)
    if patches.device != images.device:
        raise ValueError(f"{op}: patches is on {patches.device} but images are on {images.device}")
    if patches.dtype != _patches_dtype(weight):
        raise TypeError(f"{op}: patches must be {_patches_dtype(weight)} (patch_embed_patches of these images and "
                        f"weight), got {patches.dtype}")
    torch._check_value(patches.is_contiguous(), lambda: f"{op}: patches must be contiguous")


def _patch_embed_fake(images, weight, bias=None, cls_token=None, pos_embed=None, mean=None, std=None, patches=None,
                      out_dtype=None):
    B, N, T, D = check_patch_embed_args(images, weight, bias, cls_token, pos_embed, mean, std)
    _check_patches(patches, images, weight, B, T)
    _check_out_dtype(out_dtype)
    return images.new_empty((B, T, D), dtype=out_dtype or weight.dtype)


def _check_out_dtype(out_dtype) -> None:
    if out_dtype is not None and out_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"vitfast.patch_embed: out_dtype must be a floating point dtype, got {out_dtype}")


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _patch_embed_patches_fake(images, weight, has_cls, mean=None, std=None):
    cls_stub = weight.new_empty((1, 1, weight.shape[0])) if has_cls else None
    B, N, T, D = check_patch_embed_args(images, weight, None, cls_stub, None, mean, std)
    K = weight.shape[1] * weight.shape[2] * weight.shape[3]
    return images.new_empty((B * T, K), dtype=_patches_dtype(weight))


def _grad_acc_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _patch_embed_backward_fake(grad_out, images, weight, mean, std, has_cls, pos_tokens, output_mask, patches=None):
    op = "vitfast.patch_embed_backward"
    cls_stub = weight.new_empty((1, 1, weight.shape[0])) if has_cls else None
    B, N, T, D = check_patch_embed_args(images, weight, None, cls_stub, None, mean, std)
    want = lambda: f"{op}: grad_out must be [{B}, {T}, {D}], got {shape_of(grad_out)}"  # noqa: E731
    if grad_out.dim() != 3:
        raise ValueError(want())
    for i, n in enumerate((B, T, D)):
        torch._check_value(grad_out.shape[i] == n, want)
    if grad_out.device != images.device:
        raise ValueError(f"{op}: grad_out is on {grad_out.device} but images are on {images.device}")
    if grad_out.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: grad_out must be floating point, got {grad_out.dtype}")
    torch._check_value(sym_or(pos_tokens == 0, pos_tokens == N, pos_tokens == T),
                       lambda: f"{op}: pos_tokens must be 0, {N} or {T}, got {pos_tokens}")
    if output_mask[0] and not images.is_floating_point():
        raise ValueError(f"{op}: no gradient for uint8 images (output_mask[0] must be false)")
    if output_mask[3] and not has_cls:
        raise ValueError(f"{op}: output_mask[3] (cls_token) needs has_cls")
    if output_mask[4] and not pos_tokens > 0:
        raise ValueError(f"{op}: output_mask[4] (pos_embed) needs pos_tokens > 0")
    _check_patches(patches, images, weight, B, T, op)
    acc = _grad_acc_dtype(weight)
    g_images = torch.empty_like(images) if output_mask[0] else None
    g_weight = weight.new_empty(weight.shape) if output_mask[1] else None
    g_bias = weight.new_empty((D,), dtype=acc) if output_mask[2] else None
    g_cls = weight.new_empty((D,), dtype=acc) if output_mask[3] else None
    g_pos = weight.new_empty((1, pos_tokens, D), dtype=acc) if output_mask[4] else None
    return g_images, g_weight, g_bias, g_cls, g_pos


# The autograd of both ops (vitfast::patch_embed and vitfast::patch_embed_fused), whose first
# seven arguments are the same: what the backward needs of the optional ones, which gradients
# to make, and the parameter gradients in their parameters' dtypes and shapes.
def _keep_meta(ctx, bias, cls_token, pos_embed) -> None:
    ctx.has_cls = cls_token is not None
    ctx.pos_tokens = 0 if pos_embed is None else pos_embed.shape[1]
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.cls_meta = None if cls_token is None else (cls_token.shape, cls_token.dtype)
    ctx.pos_dtype = None if pos_embed is None else pos_embed.dtype


def _grad_mask(ctx, images: torch.Tensor, n_args: int) -> list:
    """output_mask of the backward ops: (images, weight, bias, cls_token, pos_embed). The
    dispatcher drops trailing None arguments from the call it records, so needs_input_grad has
    one entry per argument actually passed (2 when only images and weight are given); the
    missing optionals need no gradient."""
    need = tuple(ctx.needs_input_grad) + (False,) * (n_args - len(ctx.needs_input_grad))
    return [bool(need[0]) and images.is_floating_point(), bool(need[1]), bool(need[2]) and ctx.bias_dtype is not None,
            bool(need[3]) and ctx.has_cls, bool(need[4]) and ctx.pos_tokens > 0]


def _param_grads(ctx, g_bias, g_cls, g_pos) -> tuple:
    if g_bias is not None:
        g_bias = g_bias.to(ctx.bias_dtype)
    if g_cls is not None:
        g_cls = g_cls.reshape(ctx.cls_meta[0]).to(ctx.cls_meta[1])
    if g_pos is not None:
        g_pos = g_pos.to(ctx.pos_dtype)
    return g_bias, g_cls, g_pos


def _setup_context(ctx, inputs, output):
    # (padded like needs_input_grad in _backward, in case trailing Nones are dropped here too)
    images, weight, bias, cls_token, pos_embed, mean, std, patches, _ = tuple(inputs) + (None,) * (9 - len(inputs))
    ctx.save_for_backward(images, weight, mean, std, patches)
    _keep_meta(ctx, bias, cls_token, pos_embed)


def _backward(ctx, grad_out):
    images, weight, mean, std, patches = ctx.saved_tensors
    mask = _grad_mask(ctx, images, 9)
    if not any(mask):
        return None, None, None, None, None, None, None, None, None
    g_images, g_weight, g_bias, g_cls, g_pos = torch.ops.vitfast.patch_embed_backward(
        grad_out, images, weight, mean, std, ctx.has_cls, ctx.pos_tokens, mask, patches
    )
    # mean and std: constants of the data pipeline, no gradient; patches: a function of the images
    # (their gradient flows through g_images); out_dtype: not a tensor
    return (g_images, g_weight, *_param_grads(ctx, g_bias, g_cls, g_pos), None, None, None, None)


def _register() -> None:
    """The Python side of the C++ schemas (they exist only once vitfast._C is loaded)."""
    torch.library.register_fake("vitfast::patch_embed")(_patch_embed_fake)
    torch.library.register_fake("vitfast::patch_embed_backward")(_patch_embed_backward_fake)
    torch.library.register_fake("vitfast::patch_embed_patches")(_patch_embed_patches_fake)
    torch.library.register_autograd("vitfast::patch_embed", _backward, setup_context=_setup_context)


if _C is not None:
    _register()


# ------------------------------------------------------------- the fused Triton kernel (CUDA)
_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def patch_embed_fused_not_supported_reasons(images, weight, bias=None, *, cls_token=None, pos_embed=None,
                                            mean=None, std=None) -> list[str]:
    """Why the fused Triton kernel cannot serve these inputs (empty list: it can). Never raises;
    inputs no backend accepts are reported here too."""
    try:
        B, N, T, D = check_patch_embed_args(images, weight, bias, cls_token, pos_embed, mean, std)
    except (TypeError, ValueError) as e:
        return [str(e)]
    reasons = []
    if images.device.type != "cuda" and not (_tk.INTERPRET and images.device.type == "cpu"):
        reasons.append(f"images are on {images.device}; the fused Triton kernel needs CUDA tensors (on the CPU it "
                       "runs only with TRITON_INTERPRET=1 set before vitfast is imported)")
    if weight.dtype not in _FUSED_DTYPES:
        reasons.append(f"weight has dtype {weight.dtype}; the fused kernel computes in float16, bfloat16 or float32 "
                       "(the C++ op serves float64)")
    if _tk.INTERPRET:
        for name, t in (("images", images), ("weight", weight), ("bias", bias), ("cls_token", cls_token),
                        ("pos_embed", pos_embed)):
            if isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16:
                reasons.append(f"{name} has dtype torch.bfloat16, which the Triton interpreter (TRITON_INTERPRET=1) "
                               "does not support")
    C, H, W = images.shape[1:]
    span = sum((n - 1) * st for n, st in zip(images.shape[1:], images.stride()[1:])) if C * H * W else 0
    if C * H * W >= 2**31 or span >= 2**31:
        reasons.append(f"one image has {C * H * W} elements, its last one {span} elements after its first (strides "
                       f"{tuple(images.stride())}); the fused kernel's offsets inside an image are 32-bit (< 2**31)")
    if B * T >= 2**31:
        reasons.append(f"B*T = {B * T} token rows >= 2**31; the fused kernel's row indices are 32-bit")
    return reasons


def _autocast_params(device, weight, bias, cls_token, pos_embed):
    """((weight, bias, cls_token, pos_embed), out_dtype) as the C++ op's Autocast kernel makes them
    when autocast is on for ``device``: weight and bias cast to the autocast dtype (the GEMM's)
    unless float64 (autocast never casts float64), the class token and positions kept, and the
    tokens in the type promotion of the cast weight's dtype with theirs (the eager chain's conv,
    then cat and add); else the arguments and None. Images and mean/std stay as they are."""
    params = (weight, bias, cls_token, pos_embed)
    if device.type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device.type):
        return params, None
    dt = torch.get_autocast_dtype(device.type)
    weight, bias = (t.to(dt) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
                    else t for t in (weight, bias))
    out_dtype = weight.dtype  # (a float tensor: the wrapper checked the arguments first)
    for t in (cls_token, pos_embed):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            out_dtype = torch.promote_types(out_dtype, t.dtype)
    return (weight, bias, cls_token, pos_embed), out_dtype


def _fused_chosen(images, weight, bias, cls_token, pos_embed) -> bool:
    """The measured dispatch's choice between the fused kernel (``"kernel"``) and the C++
    three-kernel cuBLAS path (``"torch"``) for this call; the fused kernel where nothing was measured."""
    from .. import dispatch

    B, _, H, W = images.shape
    D, C, p, _ = weight.shape
    T = (H // p) * (W // p) + (1 if cls_token is not None else 0)
    shape = {"D": D, "C": C, "p": p, "T": max(1, T), "B": max(1, B), "u8": 2 if images.dtype == torch.uint8 else 1}
    training = dispatch.training_call(images, weight, bias, cls_token, pos_embed)
    return dispatch.choose("patch_embed", images.device, weight.dtype, training, shape) == "kernel"


def _try_fused(images, weight, bias, cls_token, pos_embed, mean, std, backend):
    """The fused kernel's tokens, or None when the C++ op (or the reference) is to run instead:
    ``backend="gemm"``, or ``auto``/``kernel`` where the fused kernel cannot serve the inputs or the
    dispatch table chose the three-kernel path. ``backend="fused"`` raises with the reasons."""
    params, out_dtype = _autocast_params(images.device, weight, bias, cls_token, pos_embed)
    if backend == "gemm":
        reasons = patch_embed_not_supported_reasons(images, weight, bias, cls_token=cls_token, pos_embed=pos_embed,
                                                    mean=mean, std=std)
        if reasons:
            raise KernelNotSupported("patch_embed", "gemm", reasons)
        return None
    reasons = patch_embed_fused_not_supported_reasons(images, params[0], params[1], cls_token=params[2],
                                                      pos_embed=params[3], mean=mean, std=std)
    if backend == "fused":
        if reasons:
            raise KernelNotSupported("patch_embed", "fused", reasons)
    elif reasons or (not _fused_chosen(images, *params) and not patch_embed_not_supported_reasons(
            images, weight, bias, cls_token=cls_token, pos_embed=pos_embed, mean=mean, std=std)):
        return None  # (the table's "torch", the C++ op, only where that op can serve: else the fused kernel)
    return _patch_embed_fused(images, *params, _stats(mean, images.device), _stats(std, images.device), out_dtype)


_register_triton = triton_op_registrar(_tk.INTERPRET)


def _pos_rows(pos_embed, N: int, T: int):
    """pos_embed as contiguous [rows, D] and its mode for the kernel (0 none, 1 every token,
    2 the patches only)."""
    if pos_embed is None:
        return None, 0
    D = pos_embed.shape[-1]
    return pos_embed.reshape(-1, D).contiguous(), (1 if pos_embed.shape[1] == T else 2)


def _dense(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A parameter vector (bias, class token, mean or std) flattened and contiguous, or None."""
    return None if t is None else t.reshape(-1).contiguous()


@_register_triton("vitfast::patch_embed_fused", mutates_args=())
def _patch_embed_fused(images: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       cls_token: Optional[torch.Tensor], pos_embed: Optional[torch.Tensor],
                       mean: Optional[torch.Tensor], std: Optional[torch.Tensor],
                       out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The tokens [B, T, D] (``out_dtype``, default the weight's) from the fused implicit-GEMM
    kernel; mean/std float64 [C] or None (as :func:`_stats` makes them)."""
    B, N, T, D = check_patch_embed_args(images, weight, bias, cls_token, pos_embed, mean, std)
    _check_out_dtype(out_dtype)
    out = weight.new_empty((B, T, D), dtype=out_dtype or weight.dtype)
    if out.numel() == 0:
        return out
    pos, mode = _pos_rows(pos_embed, N, T)
    # the kernel reads bias, the class token and mean/std as dense vectors: any strides here
    # (a strided view, an expanded mean) become contiguous copies of a few hundred bytes
    _tk.launch_fwd(images, weight.reshape(D, -1).contiguous(), _dense(bias), _dense(cls_token), pos, mode,
                   _dense(mean), _dense(std), out, weight.shape[-1])
    return out


@_patch_embed_fused.register_fake
def _(images, weight, bias, cls_token, pos_embed, mean, std, out_dtype=None):
    B, N, T, D = check_patch_embed_args(images, weight, bias, cls_token, pos_embed, mean, std)
    _check_out_dtype(out_dtype)
    return weight.new_empty((B, T, D), dtype=out_dtype or weight.dtype)


def _empty0(like: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    return like.new_empty((0,), dtype=dtype or like.dtype)


@_register_triton("vitfast::patch_embed_fused_backward", mutates_args=())
def _patch_embed_fused_backward(grad_out: torch.Tensor, images: torch.Tensor, weight: torch.Tensor,
                                mean: Optional[torch.Tensor], std: Optional[torch.Tensor], has_cls: bool,
                                pos_tokens: int, output_mask: list[bool]
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dimages (images' dtype and strides), dweight (weight's), dbias [D], dcls [D],
    dpos [1, pos_tokens, D] (fp32)) for the gradients ``output_mask`` asks for; a 0-element
    tensor for the others."""
    D, C, p, _ = weight.shape
    B, _, H, W = images.shape
    N = (H // p) * (W // p)
    T = N + (1 if has_cls else 0)
    K = C * p * p
    dout = grad_out.to(weight.dtype).contiguous()  # the GEMMs' operand
    w2d = weight.reshape(D, K).contiguous()
    mean, std = _dense(mean), _dense(std)
    g_images, g_weight, g_bias, g_cls, g_pos = (_empty0(weight, torch.float32) for _ in range(5))  # distinct
    if output_mask[0]:
        g_images = torch.empty_like(images)
        if g_images.numel():
            _tk.launch_dimages(dout, w2d, std, g_images, has_cls, p)
    if output_mask[1]:
        if B * N and D:  # (D = 0: no tiles to launch)
            g_weight = _tk.launch_dweight(dout, images, mean, std, has_cls, p, D, K).to(weight.dtype).reshape(weight.shape)
        else:
            g_weight = torch.zeros_like(weight)
    if any(output_mask[2:]):
        # one pass over dOut: G[t] = sum_b dOut[b, t]; the class token, position and bias
        # gradients are slices and one [N, D] column sum of it
        # (from grad_out in its own dtype: float32 tokens under autocast keep their gradient's bits)
        G = _tk.launch_token_sums(grad_out.contiguous()) if B * T else dout.new_zeros((T, D), dtype=torch.float32)
        first = 1 if has_cls else 0
        if output_mask[2]:
            g_bias = G[first:].sum(0)
        if output_mask[3]:
            g_cls = G[0].clone()
        if output_mask[4]:
            g_pos = (G if pos_tokens == T else G[first:]).reshape(1, pos_tokens, D).clone()
    return g_images, g_weight, g_bias, g_cls, g_pos


@_patch_embed_fused_backward.register_fake
def _(grad_out, images, weight, mean, std, has_cls, pos_tokens, output_mask):
    D = weight.shape[0]
    f32 = torch.float32
    return (torch.empty_like(images) if output_mask[0] else _empty0(weight, f32),
            weight.new_empty(weight.shape) if output_mask[1] else _empty0(weight, f32),
            weight.new_empty((D,), dtype=f32) if output_mask[2] else _empty0(weight, f32),
            weight.new_empty((D,), dtype=f32) if output_mask[3] else _empty0(weight, f32),
            weight.new_empty((1, pos_tokens, D), dtype=f32) if output_mask[4] else _empty0(weight, f32))


def _fused_setup(ctx, inputs, output):
    images, weight, bias, cls_token, pos_embed, mean, std, _ = tuple(inputs) + (None,) * (8 - len(inputs))
    ctx.save_for_backward(images, weight, mean, std)
    _keep_meta(ctx, bias, cls_token, pos_embed)


def _fused_backward(ctx, grad_out):
    images, weight, mean, std = ctx.saved_tensors
    mask = _grad_mask(ctx, images, 8)
    if not any(mask):
        return None, None, None, None, None, None, None, None
    g = _patch_embed_fused_backward(grad_out, images, weight, mean, std, ctx.has_cls, ctx.pos_tokens, mask)
    g_images, g_weight, g_bias, g_cls, g_pos = (t if m else None for t, m in zip(g, mask))
    # mean, std: no gradient; out_dtype: not a tensor
    return (g_images, g_weight, *_param_grads(ctx, g_bias, g_cls, g_pos), None, None, None)


_patch_embed_fused.register_autograd(_fused_backward, setup_context=_fused_setup)
if not _tk.INTERPRET:  # triton_op's own scan of the op bodies finds no kernel (see record_triton_kernels)
    record_triton_kernels("vitfast::patch_embed_fused", [_tk._pe_fwd_kernel])
    record_triton_kernels("vitfast::patch_embed_fused_backward", _tk.KERNELS["bwd"])


# ---------------------------------------------------------------------- declaration
IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def _samples(device, dtype):
    """Float and raw uint8 images, class token and positions (timm's layout and no_embed_class),
    a non-square image, channels_last, RGBA."""
    def params(D, C, p, T, seed):
        return (randn((D, C, p, p), dtype, seed, device, (C * p * p) ** -0.5), randn((D,), dtype, seed + 1, device),
                randn((1, 1, D), dtype, seed + 2, device), randn((1, T, D), dtype, seed + 3, device, 0.02))

    out = []
    w, b, cls, pos = params(24, 3, 16, 7, 1)
    images = randn((2, 3, 32, 48), dtype, 0, device)
    out.append(Sample("float 32x48 p16, cls + pos", (images, w, b), dict(cls_token=cls, pos_embed=pos),
                      grad=(0, 1, 2)))
    g = torch.Generator().manual_seed(5)
    raw = torch.randint(0, 256, (2, 3, 32, 48), generator=g, dtype=torch.uint8).to(device)
    out.append(Sample("uint8 ImageNet-normalised", (raw, w, b), dict(cls_token=cls, pos_embed=pos, **IMAGENET),
                      grad=(1, 2)))
    w, b, cls, pos = params(16, 4, 8, 12, 11)
    images = randn((1, 4, 24, 32), dtype, 10, device).contiguous(memory_format=torch.channels_last)
    out.append(Sample("RGBA channels_last p8, no_embed_class", (images, w, None),
                      dict(cls_token=cls, pos_embed=pos), grad=(0, 1)))
    return out


def _bad_inputs():
    t = lambda *shape: randn(shape, torch.float32, sum(shape))  # noqa: E731
    im, w = t(2, 3, 8, 8), t(6, 3, 4, 4)
    VE, TE, EITHER = (ValueError,), (TypeError,), (ValueError, TypeError)
    E = lambda *a, **k: (lambda: patch_embed(*a, **k))  # noqa: E731
    op = torch.ops.vitfast
    return [
        BadInput("patch_embed/images_not_tensor", E([[1.0]], w), EITHER, ("images",)),
        BadInput("patch_embed/images_rank3", E(im[0], w), VE, ("images",)),
        BadInput("patch_embed/weight_none", E(im, None), EITHER, ("weight",)),
        BadInput("patch_embed/weight_rank2", E(im, w.flatten(1)), VE, ("weight",)),
        BadInput("patch_embed/not_divisible", E(t(2, 3, 9, 8), w), VE, ("patch size", "divisible")),
        BadInput("patch_embed/not_square", E(im, t(6, 3, 4, 2)), VE, ("weight",)),
        BadInput("patch_embed/patch_0", E(im, t(6, 3, 0, 0)), VE, ("weight",)),
        BadInput("patch_embed/channels", E(im, t(6, 2, 4, 4)), VE, ("channels", "weight")),
        BadInput("patch_embed/channels_0", E(t(2, 0, 8, 8), t(6, 0, 4, 4)), VE, ("images",)),
        BadInput("patch_embed/images_int8", E(im.to(torch.int8), w), TE, ("images",)),
        BadInput("patch_embed/images_bool", E(im > 0, w), TE, ("images",)),
        BadInput("patch_embed/weight_int", E(im, w.long()), TE, ("weight",)),
        BadInput("patch_embed/bias_shape", E(im, w, t(5)), VE, ("bias",)),
        BadInput("patch_embed/bias_int", E(im, w, torch.ones(6, dtype=torch.long)), TE, ("bias",)),
        BadInput("patch_embed/bias_list", E(im, w, [0.0] * 6), TE, ("bias",)),
        BadInput("patch_embed/cls_shape", E(im, w, cls_token=t(1, 2, 6)), VE, ("cls_token",)),
        BadInput("patch_embed/pos_shape", E(im, w, pos_embed=t(1, 5, 6)), VE, ("pos_embed",)),
        BadInput("patch_embed/pos_list", E(im, w, pos_embed=[0.0] * 6), TE, ("pos_embed",)),
        BadInput("patch_embed/weight_meta", E(im, w.to("meta")), VE, ("weight",)),
        BadInput("patch_embed/mean_without_std", E(im, w, mean=[0.5] * 3), VE, ("std",)),
        BadInput("patch_embed/mean_len", E(im, w, mean=[0.5] * 2, std=[0.5] * 3), VE, ("mean",)),
        BadInput("patch_embed/std_zero", E(im, w, mean=[0.5] * 3, std=[0.5, 0.0, 0.5]), VE, ("std",)),
        BadInput("patch_embed/mean_scalar", E(im, w, mean=0.5, std=0.5), TE, ("mean",)),
        BadInput("patch_embed/mean_complex", E(im, w, mean=torch.zeros(3, dtype=torch.complex64), std=torch.ones(3)),
                 TE, ("mean",)),
        BadInput("patch_embed/mean_nested", E(im, w, mean=[[0.5]] * 3, std=[0.5] * 3), TE, ("mean",)),
        BadInput("patch_embed/std_str", E(im, w, mean=[0.5] * 3, std="abc"), TE, ("std",)),
        BadInput("patch_embed/std_digit_str", E(im, w, mean=[0.5] * 3, std="123"), TE, ("std",)),
        BadInput("patch_embed/mean_none_items", E(im, w, mean=[None] * 3, std=[0.5] * 3), TE, ("mean",)),
        BadInput("patch_embed/cls_tuple", E(im, w, cls_token=(0.0,) * 6), TE, ("cls_token",)),
        BadInput("patch_embed/backend", E(im, w, backend="cuda"), VE, ("backend",)),
        # the registered op itself, past the Python wrapper: the C++ checks (TORCH_CHECK_VALUE)
        BadInput("patch_embed/op_not_divisible", lambda: op.patch_embed(t(1, 3, 9, 8), w), VE, ("divisible",)),
        BadInput("patch_embed/op_channels", lambda: op.patch_embed(im, t(6, 2, 4, 4)), VE, ("channels",)),
        BadInput("patch_embed/op_pos_shape", lambda: op.patch_embed(im, w, None, None, t(1, 3, 6)), VE,
                 ("pos_embed",)),
        BadInput("patch_embed/op_mean_len", lambda: op.patch_embed(
            im, w, None, None, None, torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)),
                 VE, ("mean",)),
        BadInput("patch_embed/op_backward_grad_shape", lambda: op.patch_embed_backward(
            t(2, 5, 6), im, w, None, None, False, 0, [True, True, False, False, False]), VE, ("grad_out",)),
    ]


declare(OpSpec(
    name="patch_embed", fn=patch_embed, ref=patch_embed_ref, not_supported_reasons=patch_embed_not_supported_reasons,
    kernel_backend="kernel", sample_inputs=_samples, triton=False, kernel_devices=("cpu", "cuda"),
    atol={torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12},
    check_tol={torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}, bad_inputs=_bad_inputs,
    # the fused Triton kernel (CUDA), ViT-B/16 at 224: raw and float images (all four kernels), every
    # autotune config (fp16 and fp32: `python tests/ops/_sm90_compile.py patch_embed:float16:uint8:768:224:16`)
    sm90=("patch_embed:bfloat16:uint8:768:224:16", "patch_embed:bfloat16:bfloat16:768:224:16")))
