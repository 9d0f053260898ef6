"""Model registry: ``create_model(name, **overrides)`` for the standard ViT names."""

from __future__ import annotations

from .vit import FastViT
from .registry import MODEL_CONFIGS, create_model, list_models  # noqa: F401

__all__ = ["FastViT", "create_model", "list_models", "MODEL_CONFIGS"]
