"""vitfast: fused kernels (Triton attention, CUDA patch embedding) and a drop-in ViT for PyTorch."""

__version__ = "0.1.0"

from ._ext import load_extension as _load_extension

_load_extension()  # registers torch.ops.vitfast.*; raises a clear ImportError when the build is missing

from . import _compat  # noqa: E402

_compat.install()  # the module paths from before 0.2 (vitfast.convert, vitfast.bench, ...)

from . import ops  # noqa: E402
from .models import FastViT, convert, create_model, list_models  # noqa: E402
from .models import weights as checkpoint  # noqa: E402  (the old name of vitfast.models.weights)
from .models.convert import from_hf, from_timm, from_torchvision, to_timm  # noqa: E402
from .models.weights import load_weights  # noqa: E402
from .inference import optimize_for_inference  # noqa: E402
from .integrations.timm import patch_timm, unpatch_timm  # noqa: E402
from . import dispatch  # noqa: E402

dispatch.table()  # read now: the ops' choice must never read a file while torch.compile traces

__all__ = [
    "FastViT",
    "create_model",
    "list_models",
    "from_timm",
    "to_timm",
    "from_torchvision",
    "from_hf",
    "load_weights",
    "patch_timm",
    "unpatch_timm",
    "optimize_for_inference",
    "convert",
    "checkpoint",
    "ops",
    "__version__",
]
