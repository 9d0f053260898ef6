"""FastViT and what belongs beside it: the registry (``create_model(name, **overrides)`` for the
standard ViT names), weight loading (:mod:`.weights`) and the conversions from timm,
torchvision and Hugging Face (:mod:`.convert`)."""

from __future__ import annotations

from .vit import FastViT
from .registry import MODEL_CONFIGS, create_model, list_models  # noqa: F401
from . import convert, weights  # noqa: F401

__all__ = ["FastViT", "create_model", "list_models", "MODEL_CONFIGS"]
