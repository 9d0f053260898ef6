"""``vitfast info`` / ``python -m vitfast.info``: what is installed and what was built."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from typing import Optional, Sequence

import torch

DISPATCH_KEYS = ("CPU", "CUDA", "Meta", "Autograd", "AutogradCPU", "AutogradCUDA", "CompositeImplicitAutograd")


def vitfast_ops() -> list[str]:
    """Names of the ops registered in torch.ops.vitfast (C++ and Python registrations)."""
    import vitfast  # noqa: F401  (loads _C and the Python registrations)

    names = set()
    for schema in torch._C._jit_get_all_schemas():
        if schema.name.startswith("vitfast::"):
            names.add(schema.name.split("::", 1)[1])
    return sorted(names)


def op_dispatch_keys(op: str) -> list[str]:
    keys = [k for k in DISPATCH_KEYS if torch._C._dispatch_has_kernel_for_dispatch_key(f"vitfast::{op}", k)]
    # a fake (meta) kernel registered from Python is kept by torch.library, not the dispatcher
    try:
        from torch._library.simple_registry import singleton

        if singleton.find(f"vitfast::{op}").fake_impl.kernel is not None and "Meta" not in keys:
            keys.append("Fake")
    except Exception:  # torch-internal API, informative only
        pass
    return keys


def collect() -> dict:
    import vitfast
    from vitfast import _C

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {
        "vitfast": vitfast.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "extension": {
            "built_for_torch": _C.torch_version,
            "cuda_kernels": bool(_C.with_cuda),
            "cuda_version": _C.cuda_version or None,
            "path": _C.__file__,
        },
        "ops": {op: op_dispatch_keys(op) for op in vitfast_ops()},
        "cuda_available": torch.cuda.is_available(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else [],
    }
    return info


def render(info: dict) -> str:
    ext = info["extension"]
    lines = [
        f"vitfast        {info['vitfast']}",
        f"python         {info['python']}  ({info['platform']})",
        f"torch          {info['torch']}  (CUDA {info['torch_cuda'] or 'none: CPU build'})",
        f"triton         {info['triton'] or 'not installed'}",
        f"extension      {ext['path']}",
        f"  built for    torch {ext['built_for_torch']}",
        f"  CUDA kernels {'yes (CUDA ' + ext['cuda_version'] + ')' if ext['cuda_kernels'] else 'no (CPU only build)'}",
        f"GPU            {', '.join(info['gpus']) if info['gpus'] else 'none visible (torch.cuda.is_available() is False)'}",
        "ops (torch.ops.vitfast) and their dispatch keys:",
    ]
    for op, keys in info["ops"].items():
        lines.append(f"  {op:<24} {', '.join(keys) if keys else '(no kernels)'}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="vitfast info", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print the facts as JSON")
    args = parser.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=2) if args.json else render(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
