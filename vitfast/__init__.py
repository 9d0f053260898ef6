"""vitfast: fused kernels (Triton attention, CUDA patch embedding) and a drop-in ViT for PyTorch."""

__version__ = "0.1.0"

from ._ext import load_extension as _load_extension

_load_extension()  # registers torch.ops.vitfast.*; raises a clear ImportError when the build is missing

from . import checkpoint, convert, ops  # noqa: E402
from .convert import from_timm  # noqa: E402
from .models import FastViT, create_model, list_models  # noqa: E402
from .inference import optimize_for_inference  # noqa: E402
from .patch import patch_timm, unpatch_timm  # noqa: E402

__all__ = [
    "FastViT",
    "create_model",
    "list_models",
    "from_timm",
    "patch_timm",
    "unpatch_timm",
    "optimize_for_inference",
    "convert",
    "checkpoint",
    "ops",
    "__version__",
]
