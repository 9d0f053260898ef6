"""The compiled operators (``vitfast._C``): load them if they can be used, else say why and how to fix it.

vitfast works without its extension: the patch embedding then runs its plain-PyTorch reference
(one warning naming the reason and the fix), everything else is Triton or PyTorch. The extension
cannot be used when it was not built (a source checkout nobody built), when it fails to load, or
when it was built for another torch than the one installed (a C++ extension only works with the
exact torch it was compiled against). The build writes :data:`BUILD_INFO` beside ``_C`` with
the torch it used, so even an extension that no longer loads (undefined symbols after a torch
upgrade) can name the torch to install.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Optional

BUILD_INFO = "_build_info.json"  # {"torch": ..., "cuda": ...}, written by setup.py beside the extension

__all__ = ["ExtensionStatus", "status", "load_extension", "require_extension", "build_info", "BUILD_INFO"]


@dataclass(frozen=True)
class ExtensionStatus:
    """What :func:`status` found. ``module`` is the loaded ``vitfast._C`` when it can be used;
    otherwise ``reason`` says why not and ``fix`` what to do."""

    module: Optional[ModuleType]
    reason: str = ""
    fix: str = ""
    built_for_torch: Optional[str] = None
    built: bool = True  # False: there is no extension at all (a source tree nobody built)

    @property
    def ok(self) -> bool:
        return self.module is not None

    def message(self) -> str:
        """One sentence for warnings and errors: the reason and the fix."""
        return f"{self.reason}; {self.fix}" if self.reason else "vitfast._C is loaded"


def _fix(torch_version: str, built_for: Optional[str] = None, verb: str = "build it") -> str:
    """What to do: install the torch the extension was built for (when that is another one than
    ``torch_version``) or (re)build it against ``torch_version``."""
    build = ("`pip install --no-build-isolation --no-deps --force-reinstall .` in the vitfast source tree (`make .venv` "
             f"in a checkout) compiles it against the installed torch {torch_version}; a plain `pip install .` would "
             "compile it in an isolated build environment against another torch")
    if not built_for or built_for == torch_version:
        return f"{verb}: {build}"
    base, _, local = built_for.partition("+")
    which = f"`pip install torch=={base}`" + (f" from the index of the {built_for} build" if local else "")
    return f"install the torch it was built for ({which}) or rebuild it: {build}"


def build_info(directory: Optional[str] = None) -> Optional[dict]:
    """The build record written beside the extension (None when absent or unreadable)."""
    path = os.path.join(directory or os.path.dirname(os.path.abspath(__file__)), BUILD_INFO)
    try:
        with open(path) as f:
            info = json.load(f)
        return info if isinstance(info, dict) else None
    except (OSError, ValueError):
        return None


def _probe() -> ExtensionStatus:
    import torch

    have = torch.__version__
    record = build_info()
    recorded = record.get("torch") if record else None
    try:
        spec = importlib.util.find_spec("vitfast._C")
    except (ImportError, ValueError):  # a blocked import (sys.modules["vitfast._C"] = None) or a broken finder
        spec = None
    try:
        module = importlib.import_module("vitfast._C")
    except ImportError as e:
        if spec is None:
            return ExtensionStatus(None, "vitfast._C is not built (no compiled extension was found in the package)",
                                   _fix(have), built=False)
        if recorded and recorded != have:
            return ExtensionStatus(None, f"vitfast._C was built for torch {recorded} but torch {have} is installed "
                                         f"(it fails to load: {_first_line(e)})", _fix(have, recorded), recorded)
        return ExtensionStatus(None, f"vitfast._C could not be loaded ({_first_line(e)})",
                               _fix(have, recorded, verb="rebuild it"), recorded)
    built_for = getattr(module, "torch_version", None)
    if built_for != have:
        return ExtensionStatus(None, f"vitfast._C was built for torch {built_for} but torch {have} is installed",
                               _fix(have, built_for), built_for)
    return ExtensionStatus(module, built_for_torch=built_for)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


_STATUS: Optional[ExtensionStatus] = None


def status() -> ExtensionStatus:
    """Load ``vitfast._C`` once (its import registers the C++ ops in ``torch.ops.vitfast``) and
    tell whether it can be used."""
    global _STATUS
    if _STATUS is None:
        _STATUS = _probe()
    return _STATUS


def load_extension() -> Optional[ModuleType]:
    """``vitfast._C`` when it can be used, else None (never raises: see :func:`status` for why)."""
    return status().module


def require_extension() -> ModuleType:
    """``vitfast._C``, or an ImportError with the reason and the fix."""
    st = status()
    if st.module is None:
        raise ImportError(st.message())
    return st.module
