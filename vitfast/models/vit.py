"""FastViT: timm's VisionTransformer (constructor, state_dict keys, forward API) on vitfast's ops."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..modules.block import Block
from ..modules.layers import init_linear, trunc_normal_
from ..modules.patch_embed import PatchEmbed
from ..ops.patch_embed import patch_embed
from ..ops.reference import normalize_images_ref

__all__ = ["FastViT", "BACKENDS"]

BACKENDS = ("auto", "reference")
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)


class FastViT(nn.Module):
    """A Vision Transformer with timm's constructor arguments and state_dict names.

    ``backend="auto"`` runs vitfast's kernels where they can serve the input and falls back to
    plain PyTorch with a one-time warning otherwise; ``backend="reference"`` is plain PyTorch
    everywhere (what the benchmarks compare against).

    Float images are taken as already normalised (as timm does); uint8 images are normalised
    inside the patch-embedding op with ``mean``/``std`` (default: the pretrained configs' 0.5).
    """

    def __init__(
        self,
        img_size=224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        proj_bias: bool = True,
        init_values: Optional[float] = None,
        class_token: bool = True,
        no_embed_class: bool = False,
        reg_tokens: int = 0,
        pre_norm: bool = False,
        final_norm: bool = True,
        fc_norm: Optional[bool] = None,
        pool_include_prefix: bool = False,
        dynamic_img_size: bool = False,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        act_layer: str = "gelu",
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        backend: str = "auto",
    ):
        super().__init__()
        if global_pool not in ("", "token", "avg", "max", "avgmax"):
            raise ValueError(f"global_pool must be one of '', 'token', 'avg', 'max', 'avgmax'; got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.config["mean"] = tuple(mean) if mean is not None else None
        self.config["std"] = tuple(std) if std is not None else None
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.embed_dim = embed_dim
        self.num_prefix_tokens = (1 if class_token else 0) + reg_tokens
        self.num_reg_tokens = reg_tokens
        self.has_class_token = class_token
        self.no_embed_class = no_embed_class
        self.pool_include_prefix = pool_include_prefix
        self.dynamic_img_size = dynamic_img_size
        self.grad_checkpointing = False
        self.backend = backend
        use_fc_norm = global_pool in ("avg", "max", "avgmax") if fc_norm is None else fc_norm

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, bias=not pre_norm)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        embed_len = num_patches if no_embed_class else num_patches + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.randn(1, embed_len, embed_dim) * 0.02)
        self.pos_drop = nn.Dropout(pos_drop_rate)
        self.norm_pre = nn.LayerNorm(embed_dim, eps=norm_eps) if pre_norm else nn.Identity()
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = nn.Sequential(
            *[
                Block(embed_dim, num_heads, mlp_ratio, qkv_bias, qk_norm, proj_bias, proj_drop_rate, attn_drop_rate,
                      init_values, dpr[i], act_layer, norm_eps, backend)
                for i in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps) if final_norm and not use_fc_norm else nn.Identity()
        self.fc_norm = nn.LayerNorm(embed_dim, eps=norm_eps) if final_norm and use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.register_buffer("pixel_mean", torch.tensor(mean if mean is not None else INCEPTION_MEAN), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std if std is not None else INCEPTION_STD), persistent=False)
        self._init_weights()

    # -- construction helpers ---------------------------------------------------------------
    def _init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        self.apply(init_linear)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {"pos_embed", "cls_token", "reg_token"}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.config["num_classes"] = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
            self.config["global_pool"] = global_pool
        dev = self.pos_embed.device
        self.head = nn.Linear(self.embed_dim, num_classes, device=dev) if num_classes > 0 else nn.Identity()

    # -- forward ------------------------------------------------------------------------------
    def _check_images(self, x: torch.Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"FastViT: images must be [B, C, H, W], got shape {list(x.shape)}")
        C = self.patch_embed.proj.in_channels
        if x.shape[1] != C:
            raise ValueError(f"FastViT: images have {x.shape[1]} channels, the model expects {C}")
        if not self.dynamic_img_size and tuple(x.shape[-2:]) != self.patch_embed.img_size:
            raise ValueError(
                f"FastViT: image size {tuple(x.shape[-2:])} does not match the model's img_size "
                f"{self.patch_embed.img_size} (build with dynamic_img_size=True to accept other sizes)"
            )

    def _fused_embed_ok(self, x: torch.Tensor) -> bool:
        # The fused op has no backward yet (the patch-embedding issue adds it): use it for
        # inference only, and only where it computes the whole embedding (no register tokens).
        if self.backend == "reference" or self.reg_token is not None:
            return False
        params = (self.patch_embed.proj.weight, self.pos_embed, self.cls_token)
        return not (torch.is_grad_enabled() and (x.requires_grad or any(p is not None and p.requires_grad for p in params)))

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> tokens with class/register tokens and positional embedding."""
        self._check_images(x)
        mean = std = None
        if x.dtype == torch.uint8:
            mean, std = self.pixel_mean, self.pixel_std
        w, b = self.patch_embed.proj.weight, self.patch_embed.proj.bias
        if self._fused_embed_ok(x):
            cls = self.cls_token
            pos = self.pos_embed
            return self.pos_drop(patch_embed(x, w, b, cls_token=cls, pos_embed=pos, mean=mean, std=std))
        x = normalize_images_ref(x, mean, std, dtype=w.dtype) if x.dtype == torch.uint8 else x.to(w.dtype)
        x = F.conv2d(x, w, b, stride=self.patch_embed.patch_size).flatten(2).transpose(1, 2)
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if self.no_embed_class:
            x = torch.cat(prefix + [x + self.pos_embed], dim=1)
        else:
            x = torch.cat(prefix + [x], dim=1) + self.pos_embed
        return self.pos_drop(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._embed(x)
        x = self.norm_pre(x)
        if self.grad_checkpointing and torch.is_grad_enabled():
            for blk in self.blocks:
                x = checkpoint(blk, x, use_reentrant=False)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def pool(self, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
        pool_type = self.global_pool if pool_type is None else pool_type
        if pool_type == "token":
            return x[:, 0]
        if pool_type == "":
            return x
        if not self.pool_include_prefix:
            x = x[:, self.num_prefix_tokens :]
        if pool_type == "avg":
            return x.mean(dim=1)
        if pool_type == "max":
            return x.amax(dim=1)
        return 0.5 * (x.amax(dim=1) + x.mean(dim=1))  # avgmax

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(x)
        x = self.fc_norm(x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
