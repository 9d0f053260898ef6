"""Attention pooling with a learned latent query (``global_pool="map"``: SigLIP's head), with
timm's ``AttentionPoolLatent`` names (``latent``, ``q``, ``kv``, ``proj``, ``norm``, ``mlp``)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .initializers import trunc_normal_tf_
from .layers import Mlp

__all__ = ["AttentionPoolLatent"]


class AttentionPoolLatent(nn.Module):
    """One learned query attends over the tokens (multi-head), then a projection and a pre-norm
    MLP residual: ``[B, N, D] -> [B, D]``. The same computation, parameters and construction-time
    random draws as timm's ``AttentionPoolLatent`` as ``VisionTransformer(global_pool="map")``
    builds it (one latent, a q projection, no positional embedding, no q/k norm).

    The query is a single token, so the attention is a [1 x N] row per head: plain PyTorch SDPA,
    a negligible part of a ViT's time next to its blocks."""

    def __init__(self, dim: int, num_heads: int = 8, mlp_ratio: float = 4.0, act_layer: str = "gelu",
                 norm_eps: float = 1e-6, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.latent_len = 1
        self.latent_dim = dim
        self.latent = nn.Parameter(torch.zeros(1, 1, dim))
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.q_norm = nn.Identity()
        self.k_norm = nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer)
        self.init_weights()

    def init_weights(self) -> None:
        """The latent ~ N(0, 1/dim) truncated at 2 std (timm's ``trunc_normal_tf_``, same draws)."""
        trunc_normal_tf_(self.latent, std=self.latent_dim**-0.5)

    # the latent's only initialisation: weight_init="reset" (and "skip", then init_weights()) reach it
    # too, where timm's "reset" leaves it as torch.empty gave it
    reset_parameters = init_weights

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, N, D = x.shape
        H, hd = self.num_heads, self.head_dim
        q = self.q(self.latent.expand(B, -1, -1)).reshape(B, 1, H, hd).transpose(1, 2)
        k, v = self.kv(x).reshape(B, N, 2, H, hd).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        x = self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, 1, D)))
        x = x + self.mlp(self.norm(x))
        return x[:, 0]
