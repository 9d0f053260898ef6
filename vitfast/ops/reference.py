"""Plain-PyTorch references of the attention and the patch embedding (and the image
normalisation they share with the data pipeline).

The fused epilogue ops keep theirs beside them (``layer_norm_ref``, ``add_layer_norm_ref``,
``bias_gelu_ref``, ``bias_scale_residual_ref``); every op's reference is also in its
declaration (``vitfast.ops.spec.SPECS[name].ref``). Tests compare the kernels against these
(in float64 on the CPU), benchmarks use them as the baseline, and ``backend="reference"``
runs on them.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

__all__ = ["attention_ref", "patch_embed_ref", "normalize_images_ref"]


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: Optional[float] = None,
    upcast: bool = True,
) -> torch.Tensor:
    """softmax(q @ k^T * scale) @ v with q, k, v ``[B, H, N, D]``.

    With ``upcast`` the computation runs in float32 (float64 stays float64) and the result
    is cast back to q's dtype; without it, it runs in the inputs' dtype, which is what
    measures PyTorch's own error in that dtype.
    """
    dtype = q.dtype
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if upcast:
        ct = torch.float64 if dtype == torch.float64 else torch.float32
        q, k, v = q.to(ct), k.to(ct), v.to(ct)
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v).to(dtype)


def _channel_vector(x: Union[torch.Tensor, Sequence[float]], like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(x, dtype=like.dtype, device=like.device).reshape(1, -1, 1, 1)


def normalize_images_ref(
    images: torch.Tensor,
    mean: Optional[Union[torch.Tensor, Sequence[float]]] = None,
    std: Optional[Union[torch.Tensor, Sequence[float]]] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """uint8 images → ``(images/255 - mean)/std``; float images → ``(images - mean)/std``
    (or unchanged without mean/std), in ``dtype``."""
    x = images.to(dtype)
    if images.dtype == torch.uint8:
        x = x / 255.0
    if mean is not None:
        x = x - _channel_vector(mean, x)
    if std is not None:
        x = x / _channel_vector(std, x)
    return x


def patch_embed_ref(
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    cls_token: Optional[torch.Tensor] = None,
    pos_embed: Optional[torch.Tensor] = None,
    mean: Optional[Union[torch.Tensor, Sequence[float]]] = None,
    std: Optional[Union[torch.Tensor, Sequence[float]]] = None,
    upcast: bool = False,
) -> torch.Tensor:
    """The eager chain the fused patch-embedding op replaces.

    images ``[B, C, H, W]`` (float or uint8), weight ``[D, C, p, p]``, bias ``[D]``,
    cls_token ``[1, 1, D]``, pos_embed ``[1, 1+N, D]`` or ``[1, N, D]`` (patches only).
    Returns ``[B, (1+)N, D]`` in the weight's dtype (computed in float64 when the weight is
    float64, or in float32 with ``upcast``).
    """
    out_dtype = weight.dtype
    ct = torch.float64 if out_dtype == torch.float64 else (torch.float32 if upcast else out_dtype)
    x = normalize_images_ref(images, mean, std, dtype=ct)
    p = weight.shape[-1]
    w = weight.to(ct)
    b = None if bias is None else bias.to(ct)
    tokens = F.conv2d(x, w, b, stride=p).flatten(2).transpose(1, 2)
    if cls_token is not None:
        tokens = torch.cat([cls_token.to(ct).expand(tokens.shape[0], -1, -1), tokens], dim=1)
    if pos_embed is not None:
        pe = pos_embed.to(ct)
        if cls_token is not None and pe.shape[1] == tokens.shape[1] - 1:
            # timm's no_embed_class: positions cover the patches only
            tokens = torch.cat([tokens[:, :1], tokens[:, 1:] + pe], dim=1)
        else:
            tokens = tokens + pe
    return tokens.to(out_dtype)
