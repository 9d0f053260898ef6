"""Configurations of the standard ViT names (timm's), and ``create_model``."""

from __future__ import annotations

import difflib
from typing import Any, Dict

from .vit import FastViT

__all__ = ["MODEL_CONFIGS", "create_model", "list_models"]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_SIZES = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16),
}
# (size, patch, img) that timm defines for the plain ImageNet ViTs
_PLAIN = [
    ("tiny", 16, 224), ("tiny", 16, 384),
    ("small", 32, 224), ("small", 32, 384), ("small", 16, 224), ("small", 16, 384), ("small", 8, 224),
    ("base", 32, 224), ("base", 32, 384), ("base", 16, 224), ("base", 16, 384), ("base", 8, 224),
    ("large", 32, 224), ("large", 32, 384), ("large", 16, 224), ("large", 16, 384),
    ("huge", 14, 224),
]

MODEL_CONFIGS: Dict[str, Dict[str, Any]] = {}
for _size, _patch, _img in _PLAIN:
    MODEL_CONFIGS[f"vit_{_size}_patch{_patch}_{_img}"] = dict(img_size=_img, patch_size=_patch, **_SIZES[_size])
# register-token variants (Darcet et al.): no class token, average pooling
for _size in ("small", "base"):
    MODEL_CONFIGS[f"vit_{_size}_patch16_reg4_gap_256"] = dict(
        img_size=256, patch_size=16, class_token=False, no_embed_class=True, global_pool="avg", reg_tokens=4,
        **_SIZES[_size],
    )
# CLIP image towers: pre-norm, torch LayerNorm eps, CLIP statistics
for _size, _patch in (("base", 32), ("base", 16), ("large", 14), ("huge", 14)):
    MODEL_CONFIGS[f"vit_{_size}_patch{_patch}_clip_224"] = dict(
        img_size=224, patch_size=_patch, pre_norm=True, norm_eps=1e-5, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
        **_SIZES[_size],
    )
    MODEL_CONFIGS[f"vit_{_size}_patch{_patch}_clip_quickgelu_224"] = dict(
        MODEL_CONFIGS[f"vit_{_size}_patch{_patch}_clip_224"], act_layer="quick_gelu"
    )


def list_models() -> list[str]:
    return sorted(MODEL_CONFIGS)


def create_model(name: str, **overrides: Any) -> FastViT:
    """Build a FastViT by timm's model name, with constructor arguments overridden."""
    if name not in MODEL_CONFIGS:
        close = difflib.get_close_matches(name, MODEL_CONFIGS, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"vitfast.create_model: unknown model {name!r}.{hint} See vitfast.list_models().")
    return FastViT(**{**MODEL_CONFIGS[name], **overrides})
