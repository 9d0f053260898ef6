"""The ``vitfast`` command: ``vitfast info | bench | bench kernels | profile | train | tune``.

The tools (``vitfast.cli.*``) sit apart from the library (``ops``, ``modules``, ``models``,
``training``, ...). Each command lives in its own module with a ``main(argv) -> int``; this
file only routes, two-word commands (``bench kernels``) included, and answers ``--help`` and
``--version`` without importing torch (well under a second).
"""

from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence

COMMANDS = {
    "info": ("vitfast.cli.info", "versions, what was built, the registered ops and the GPU; --check self-tests"),
    "bench": ("vitfast.cli.bench", "throughput of FastViT against the reference and timm"),
    "bench kernels": ("vitfast.cli.bench_kernels", "the kernel microbenchmarks (attention, patch embedding, ...)"),
    "profile": ("vitfast.cli.profile", "where the kernel time goes (torch.profiler)"),
    "train": ("vitfast.cli.train", "train FastViT (or a patched timm ViT) under torchrun: DDP or FSDP2"),
    "tune": ("vitfast.cli.tune", "measure kernel vs PyTorch per op at a model's shapes on this GPU; write the dispatch cache"),
}


def _usage() -> str:
    lines = ["usage: vitfast [--version] <command> [options]", "", "commands:"]
    lines += [f"  {name:<14} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`vitfast <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from .. import __version__

        print(f"vitfast {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if rest and f"{name} {rest[0]}" in COMMANDS:  # a two-word command
        name, rest = f"{name} {rest[0]}", rest[1:]
    if name not in COMMANDS:
        print(f"vitfast: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)

