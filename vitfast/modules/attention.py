"""Multi-head self-attention with timm's parameter names (qkv, q_norm, k_norm, proj).

The computation between the qkv Linear and the proj Linear runs through
``vitfast.ops.attention_packed`` (no permute or contiguous copy in or out) or, with
qk_norm, ``vitfast.ops.attention`` on strided views. :func:`attention_forward` is shared
with the timm modules that :func:`vitfast.patch_timm` patches.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._dispatch import BACKENDS, auto_is_reference, canonical_backend, module_uses_kernel
from ..ops.attention import attention, attention_not_supported_reasons, attention_packed, split_packed_qkv, table_choice

__all__ = ["Attention", "attention_forward", "attention_core", "attention_fallback_reasons", "MODULE_BACKENDS"]

# "auto": kernels where they serve the input, else the reference path with a one-time warning.
# "kernel": kernels forced (KernelNotSupported lists every reason). "reference": plain PyTorch.
MODULE_BACKENDS = BACKENDS


def check_backend(backend: str) -> str:
    """The backend in the one vocabulary (``auto``, ``kernel``, ``reference``; the older
    ``kernels`` is ``kernel``)."""
    return canonical_backend("FastViT", backend)


def attention_fallback_reasons(
    mod: nn.Module, qkv: torch.Tensor, backend: str, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False
) -> List[str]:
    """Why the attention kernel cannot serve this call of ``mod`` (empty: it can)."""
    reasons = []
    if attn_mask is not None:
        reasons.append("an attn_mask was given; the attention kernel takes no mask")
    if is_causal:
        reasons.append("is_causal=True; the attention kernel is bidirectional only")
    if mod.training and mod.attn_drop.p > 0:
        reasons.append(f"attention dropout p={mod.attn_drop.p} in training; the attention kernel has no dropout")
    if backend == "auto" and qkv.device.type != "cuda":
        # backend="kernel" may still run the kernel on the CPU under TRITON_INTERPRET=1.
        reasons.append(f"input is on {qkv.device.type}; the Triton attention kernel runs on CUDA")
        return reasons
    q, k, v = split_packed_qkv(qkv, mod.num_heads)
    return reasons + attention_not_supported_reasons(q, k, v)


def _reference(mod, qkv, attn_mask, is_causal):
    q, k, v = split_packed_qkv(qkv, mod.num_heads)
    q, k = mod.q_norm(q), mod.k_norm(k)
    p = mod.attn_drop.p if mod.training else 0.0
    # scale=mod.scale, as the kernel path and timm's non-fused path take it (a changed attn.scale)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p, is_causal=is_causal,
                                       scale=mod.scale)
    return o.transpose(1, 2).flatten(2)


def _kernel(mod, qkv):
    if isinstance(mod.q_norm, nn.Identity) and isinstance(mod.k_norm, nn.Identity):
        return attention_packed(qkv, num_heads=mod.num_heads, scale=mod.scale, backend="kernel")
    # qk_norm: normalise [B, N, H, D] views (same rows as timm's [B, H, N, D]), then view as [B, H, N, D]
    q, k, v = qkv.unflatten(-1, (3, mod.num_heads, mod.head_dim)).unbind(2)
    q, k = mod.q_norm(q), mod.k_norm(k)
    o = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=mod.scale, backend="kernel")
    return o.transpose(1, 2).flatten(2)  # o is laid out [B, N, H, D]: free


def attention_forward(
    mod: nn.Module,
    x: torch.Tensor,
    backend: str = "auto",
    attn_mask: Optional[torch.Tensor] = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """qkv Linear -> attention -> (scale norm) -> proj Linear for ``mod`` (timm's attribute names)."""
    return mod.proj_drop(mod.proj(attention_core(mod, x, backend, attn_mask, is_causal)))


def attention_core(
    mod: nn.Module,
    x: torch.Tensor,
    backend: str = "auto",
    attn_mask: Optional[torch.Tensor] = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """qkv Linear -> attention -> (scale norm): everything before the output projection, which
    a fused block applies itself (its bias folded into the residual + LayerNorm op)."""
    qkv = mod.qkv(x)
    # "auto" off CUDA is the reference path by definition (no fallback, so no warning), as for the ops
    use_kernel = backend != "reference" and not (backend == "auto" and auto_is_reference(qkv.device)) and module_uses_kernel(
        "FastViT.attention", backend, attention_fallback_reasons(mod, qkv, backend, attn_mask, is_causal)
    )
    if use_kernel and backend == "auto":  # the measured dispatch table (vitfast.dispatch) may prefer SDPA
        use_kernel = table_choice("attention", *split_packed_qkv(qkv, mod.num_heads)) == "kernel"
    o = _kernel(mod, qkv) if use_kernel else _reference(mod, qkv, attn_mask, is_causal)
    norm = getattr(mod, "norm", None)  # timm's scale_norm (Identity unless enabled)
    return norm(o) if norm is not None else o


class Attention(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_eps: float = 1e-6,
        backend: str = "auto",
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.backend = check_backend(backend)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False
    ) -> torch.Tensor:
        return attention_forward(self, x, self.backend, attn_mask, is_causal)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, backend={self.backend!r}"


# a leaf of torch.fx graphs (see vitfast.models.vit): the kernel-or-reference choice needs real tensors
torch.fx.wrap("attention_forward")
