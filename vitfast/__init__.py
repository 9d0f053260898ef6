"""vitfast: fused kernels (Triton attention, CUDA patch embedding) and a drop-in ViT for PyTorch.

``import vitfast`` is light: the public names (``FastViT``, ``from_timm``, ``ops``, ...) load on
first use (PEP 562), so ``vitfast --help`` and ``vitfast --version`` start without torch. When
torch is already imported, everything loads at once as it always did, so
``import torch; import vitfast`` leaves ``torch.ops.vitfast.*`` registered. Every submodule that
needs the ops registers them itself (``import vitfast.ops`` loads the compiled extension and reads
the dispatch table).
"""

from __future__ import annotations

import sys as _sys


def _version() -> str:
    """The installed distribution's version; in a source checkout nobody installed, the one
    written in pyproject.toml (the only place the version is written)."""
    from importlib import metadata

    try:
        return metadata.version("vitfast")
    except metadata.PackageNotFoundError:
        pass
    import os
    import re

    pyproject = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml")
    try:
        with open(pyproject) as f:
            m = re.search(r'^version\s*=\s*"([^"]+)"', f.read(), re.MULTILINE)
        if m:
            return m.group(1)
    except OSError:
        pass
    return "0+unknown"


__version__ = _version()

from . import _compat  # noqa: E402  (no torch)

_compat.install()  # the module paths from before 0.2 (vitfast.convert, vitfast.bench, ...)

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
    "tune",
    "convert",
    "checkpoint",
    "ops",
    "__version__",
]

# name -> (module, attribute in it; None: the module itself), imported on first use
_LAZY = {
    "FastViT": ("vitfast.models", "FastViT"),
    "create_model": ("vitfast.models", "create_model"),
    "list_models": ("vitfast.models", "list_models"),
    "from_timm": ("vitfast.models.convert", "from_timm"),
    "to_timm": ("vitfast.models.convert", "to_timm"),
    "from_torchvision": ("vitfast.models.convert", "from_torchvision"),
    "from_hf": ("vitfast.models.convert", "from_hf"),
    "load_weights": ("vitfast.models.weights", "load_weights"),
    "patch_timm": ("vitfast.integrations.timm", "patch_timm"),
    "unpatch_timm": ("vitfast.integrations.timm", "unpatch_timm"),
    "optimize_for_inference": ("vitfast.inference", "optimize_for_inference"),
    "tune": ("vitfast.tuning", "tune"),
    "convert": ("vitfast.models.convert", None),
    "checkpoint": ("vitfast.models.weights", None),  # the old name of vitfast.models.weights
    "ops": ("vitfast.ops", None),  # registers torch.ops.vitfast.* and reads the dispatch table
    "dispatch": ("vitfast.dispatch", None),
    "models": ("vitfast.models", None),
    "modules": ("vitfast.modules", None),
    "inference": ("vitfast.inference", None),
    "integrations": ("vitfast.integrations", None),
}


def __getattr__(name: str):
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'vitfast' has no attribute {name!r}")
    import importlib

    module = importlib.import_module(target[0])
    value = module if target[1] is None else getattr(module, target[1])
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


def _load() -> None:
    """Everything ``import vitfast`` did before it was lazy: the compiled extension (when it can be
    used), every op's registration, the dispatch table, the models, conversions and the timm patcher."""
    for name in _LAZY:
        __getattr__(name)


if "torch" in _sys.modules:  # torch is loaded anyway: register the ops now, as before
    _load()
