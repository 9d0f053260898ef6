"""Loads the compiled operators (vitfast._C) and says clearly what to do when that fails."""

from __future__ import annotations

import torch

REBUILD_HINT = "rebuild it with `make .venv` or `pip install --no-build-isolation -e .` in the vitfast checkout"


def load_extension():
    """Import vitfast._C (which registers torch.ops.vitfast.*) and check it matches torch."""
    try:
        from . import _C  # noqa: F401  (registers the ops)
    except ImportError as e:
        raise ImportError(
            f"vitfast: the compiled extension vitfast._C could not be loaded ({e}). It is missing, or it was "
            f"built for another torch than the one installed ({torch.__version__}); {REBUILD_HINT}."
        ) from e
    if _C.torch_version != torch.__version__:
        raise ImportError(
            f"vitfast._C was built for torch {_C.torch_version}, you have {torch.__version__}; {REBUILD_HINT}."
        )
    return _C

