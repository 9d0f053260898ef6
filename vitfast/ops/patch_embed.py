"""Patch embedding: raw or float images to ViT tokens in one op (``torch.ops.vitfast.patch_embed``).

The schemas and the CPU/CUDA kernels live in ``csrc/`` (forward ``vitfast::patch_embed``,
backward ``vitfast::patch_embed_backward``); this module holds the typed wrapper, the argument
checks shared with the fake (meta) implementations, and the registrations (fake, autograd).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .._ext import load_extension

load_extension()

__all__ = ["patch_embed", "check_patch_embed_args"]

ChannelStats = Optional[Union[torch.Tensor, Sequence[float]]]
_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def check_patch_embed_args(images, weight, bias=None, cls_token=None, pos_embed=None, mean=None, std=None):
    """Raise a ValueError/TypeError naming the argument for any input the op cannot take.

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
        raise ValueError(f"vitfast.patch_embed: weight must be [D, C, p, p] with p >= 1, got {_shape(weight)}")
    if C < 1:
        raise ValueError(f"vitfast.patch_embed: images must have at least one channel, got {_shape(images)}")
    if p != q:
        raise ValueError(f"vitfast.patch_embed: weight must have a square kernel [D, C, p, p], got {_shape(weight)}")
    if Cw != C:
        raise ValueError(
            f"vitfast.patch_embed: images have {C} channels but weight expects {Cw} (weight shape {_shape(weight)})"
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
    if bias is not None and _shape(bias) != [D]:
        raise ValueError(f"vitfast.patch_embed: bias must be [{D}], got {_shape(bias)}")
    if cls_token is not None and (cls_token.numel() != D or cls_token.shape[-1] != D):
        raise ValueError(f"vitfast.patch_embed: cls_token must be [1, 1, {D}], got {_shape(cls_token)}")
    if pos_embed is not None:
        allowed = [[1, T, D]] + ([[1, N, D]] if cls_token is not None else [])
        if _shape(pos_embed) not in allowed:
            extra = f" (or [1, {N}, {D}] for patches only)" if cls_token is not None else ""
            raise ValueError(
                f"vitfast.patch_embed: pos_embed must be [1, {T}, {D}]{extra} for "
                f"{H // p}x{W // p} patches of {H}x{W} images, got {_shape(pos_embed)}"
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
        if name == "std" and not isinstance(t, torch.Tensor) and any(float(v) == 0.0 for v in t):
            raise ValueError(f"vitfast.patch_embed: std must be non-zero, got {list(t)}")
    return B, N, T, D


def _describe_stats(x) -> str:
    text = repr(x)
    return f"{type(x).__name__} {text if len(text) <= 80 else text[:77] + '...'}"


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {_shape(x)}"
    return type(x).__name__


_STATS_CACHE: dict = {}


def _stats(x: ChannelStats, device: torch.device) -> Optional[torch.Tensor]:
    """mean/std as the float64 [C] tensor the op takes. Python sequences are converted once
    per device and cached: building them anew would be a blocking host-to-device copy on
    every call with CUDA images."""
    if x is None:
        return None
    if isinstance(x, torch.Tensor) or torch.compiler.is_compiling():
        return torch.as_tensor(x, dtype=torch.float64, device=device).reshape(-1)
    key = (tuple(float(v) for v in x), str(device))
    t = _STATS_CACHE.get(key)
    if t is None:
        if len(_STATS_CACHE) > 64:
            _STATS_CACHE.clear()
        with torch.inference_mode(False):  # a normal tensor, usable later with autograd
            t = _STATS_CACHE[key] = torch.tensor(key[0], dtype=torch.float64, device=device)
    return t


def patch_embed(
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    cls_token: Optional[torch.Tensor] = None,
    pos_embed: Optional[torch.Tensor] = None,
    mean: ChannelStats = None,
    std: ChannelStats = None,
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

    Returns:
        ``[B, T, D]`` in the weight's dtype, T = N (+1 with cls_token), N = (H/p)(W/p):
        ``cat(cls, conv2d(x, weight, bias, stride=p).flatten(2).transpose(1, 2)) + pos_embed``.

    Differentiable in images (float only), weight, bias, cls_token and pos_embed (through the
    registered ``vitfast::patch_embed_backward``). mean and std are constants of the data
    pipeline and get no gradient. No double backward.

    Raises:
        ValueError / TypeError naming the argument for any shape, dtype or device it cannot
        take, before any kernel runs.
    """
    check_patch_embed_args(images, weight, bias, cls_token, pos_embed, mean, std)
    return torch.ops.vitfast.patch_embed(
        images, weight, bias, cls_token, pos_embed, _stats(mean, images.device), _stats(std, images.device)
    )


@torch.library.register_fake("vitfast::patch_embed")
def _patch_embed_fake(images, weight, bias=None, cls_token=None, pos_embed=None, mean=None, std=None):
    B, N, T, D = check_patch_embed_args(images, weight, bias, cls_token, pos_embed, mean, std)
    return images.new_empty((B, T, D), dtype=weight.dtype)


def _grad_acc_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


@torch.library.register_fake("vitfast::patch_embed_backward")
def _patch_embed_backward_fake(grad_out, images, weight, mean, std, has_cls, pos_tokens, output_mask):
    cls_stub = weight.new_empty((1, 1, weight.shape[0])) if has_cls else None
    B, N, T, D = check_patch_embed_args(images, weight, None, cls_stub, None, mean, std)
    torch._check(list(grad_out.shape) == [B, T, D], lambda: f"grad_out must be [{B}, {T}, {D}]")
    torch._check(pos_tokens in (0, N, T), lambda: f"pos_tokens must be 0, {N} or {T}")
    acc = _grad_acc_dtype(weight)
    g_images = torch.empty_like(images) if output_mask[0] else None
    g_weight = weight.new_empty(weight.shape) if output_mask[1] else None
    g_bias = weight.new_empty((D,), dtype=acc) if output_mask[2] else None
    g_cls = weight.new_empty((D,), dtype=acc) if output_mask[3] else None
    g_pos = weight.new_empty((1, pos_tokens, D), dtype=acc) if output_mask[4] else None
    return g_images, g_weight, g_bias, g_cls, g_pos


def _setup_context(ctx, inputs, output):
    # (padded like needs_input_grad in _backward, in case trailing Nones are dropped here too)
    images, weight, bias, cls_token, pos_embed, mean, std = tuple(inputs) + (None,) * (7 - len(inputs))
    ctx.save_for_backward(images, weight, mean, std)
    ctx.has_cls = cls_token is not None
    ctx.pos_tokens = 0 if pos_embed is None else pos_embed.shape[1]
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.cls_meta = None if cls_token is None else (cls_token.shape, cls_token.dtype)
    ctx.pos_dtype = None if pos_embed is None else pos_embed.dtype


def _backward(ctx, grad_out):
    images, weight, mean, std = ctx.saved_tensors
    # The dispatcher drops trailing None arguments from the call it records, so
    # needs_input_grad has one entry per argument actually passed (2 when only images and
    # weight are given); the missing optionals need no gradient.
    need = tuple(ctx.needs_input_grad) + (False,) * (7 - len(ctx.needs_input_grad))
    mask = [
        bool(need[0]) and images.is_floating_point(),
        bool(need[1]),
        bool(need[2]) and ctx.bias_dtype is not None,
        bool(need[3]) and ctx.has_cls,
        bool(need[4]) and ctx.pos_tokens > 0,
    ]
    if not any(mask):
        return None, None, None, None, None, None, None
    g_images, g_weight, g_bias, g_cls, g_pos = torch.ops.vitfast.patch_embed_backward(
        grad_out, images, weight, mean, std, ctx.has_cls, ctx.pos_tokens, mask
    )
    if g_bias is not None:
        g_bias = g_bias.to(ctx.bias_dtype)
    if g_cls is not None:
        shape, dtype = ctx.cls_meta
        g_cls = g_cls.reshape(shape).to(dtype)
    if g_pos is not None:
        g_pos = g_pos.to(ctx.pos_dtype)
    # mean and std: constants of the data pipeline, no gradient
    return g_images, g_weight, g_bias, g_cls, g_pos, None, None


torch.library.register_autograd("vitfast::patch_embed", _backward, setup_context=_setup_context)
