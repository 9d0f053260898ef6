"""Module paths from before the 0.2 layout, kept working without files at the package root.

One table, :data:`MOVED`, old name -> new module. ``import vitfast.convert`` (or
``from vitfast.patch import patch_timm``) returns the new module itself (same object, so
monkeypatching either name patches both), and ``python -m vitfast.bench ...`` runs the new
module as ``__main__``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED = {
    # library
    "vitfast.convert": "vitfast.models.convert",
    "vitfast.checkpoint": "vitfast.models.weights",
    "vitfast.patch": "vitfast.integrations.timm",
    "vitfast.ops.bias_act": "vitfast.ops.bias_gelu",
    "vitfast.ops.residual": "vitfast.ops.bias_scale_residual",
    # tools
    "vitfast.bench": "vitfast.cli.bench",
    "vitfast.bench_kernels": "vitfast.cli.bench_kernels",
    "vitfast.benchmark_utils": "vitfast.cli.benchmarking",
    "vitfast.benchmark_report": "vitfast.cli.report",
    "vitfast.info": "vitfast.cli.info",
    "vitfast.profile": "vitfast.cli.profile",
    "vitfast.train": "vitfast.cli.train",
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        module = importlib.import_module(self.target)
        self._spec = module.__spec__  # the import system overwrites __spec__ with the alias's
        return module

    def exec_module(self, module) -> None:
        module.__spec__ = self._spec

    def is_package(self, fullname: str) -> bool:
        return False

    def get_code(self, fullname: str):
        """What ``python -m <old name>`` runs: the new module as ``__main__``."""
        return compile(f"import runpy\nrunpy.run_module({self.target!r}, run_name='__main__', alter_sys=True)\n",
                       f"<{fullname} -> {self.target}>", "exec")

    def get_source(self, fullname: str):
        return None


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, _AliasLoader(MOVED[fullname]))
        return None


def install() -> None:
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder())
