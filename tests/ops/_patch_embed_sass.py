"""What the CUDA patch-embedding kernels compile to on sm_90, read from the SASS (no GPU needed).

Counts, per kernel instantiation, the memory instructions that decide its speed: shared-memory
accesses by width (``STS.U16``/``LDS.U16`` are the bank-conflicting 16-bit staging the
three-kernel path used to do), global loads and stores by width (``LDG.E.128``/``STG.E.128``
are 16-byte accesses) and local-memory traffic (``STL``/``LDL``: register spills).

    python tests/ops/_patch_embed_sass.py                  # the built vitfast._C
    python tests/ops/_patch_embed_sass.py --so path/_C.so  # another build
    python tests/ops/_patch_embed_sass.py --compile        # nvcc csrc/cuda/patch_embed.cu now (~1 min)
    python tests/ops/_patch_embed_sass.py --json out.json

The SASS comes from ``cuobjdump``: CUDA's own when it is on the PATH or under CUDA_HOME, else
the copy Triton ships (``triton/backends/nvidia/bin``). tests/ops/test_patch_embed_sass.py
asserts on these counts; on a GPU, ``ncu``'s bank-conflict counters confirm them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Dict, Optional

ROOT = Path(__file__).resolve().parents[2]
OP = re.compile(r"\b((?:LDS|STS|LDG|STG|LDL|STL|LD|ST)(?:\.[A-Z0-9]+)*)\b")

# the C++ template arguments as they appear in the mangled names
TYPES = {"h": "uint8", "f": "fp32", "d": "fp64", "S3_": "<same>", "S2_": "<same>"}
TYPES.update({f"{prefix}{name}{e}": short for prefix in ("N3c10", "NS2_") for name, short in
              (("8BFloat16", "bf16"), ("4Half", "fp16")) for e in ("E", "")})


def find_cuobjdump() -> Optional[str]:
    found = shutil.which("cuobjdump")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    if os.path.exists(os.path.join(home, "bin", "cuobjdump")):
        return os.path.join(home, "bin", "cuobjdump")
    try:
        import triton  # noqa: F401  (ships cuobjdump with its NVIDIA backend)
    except ImportError:
        return None
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(path) if path.exists() else None


def built_extension() -> Optional[str]:
    import importlib.util
    spec = importlib.util.find_spec("vitfast._C")
    return spec.origin if spec is not None else None


def compile_cubin(out_dir: str) -> str:
    """nvcc csrc/cuda/patch_embed.cu for sm_90 with the flags setup.py uses."""
    import sysconfig

    import torch.utils.cpp_extension as ext
    nvcc = os.path.join(os.environ.get("CUDA_HOME") or "/usr/local/cuda", "bin", "nvcc")
    inc = [f"-I{p}" for p in ext.include_paths("cuda")] + [f"-I{sysconfig.get_paths()['include']}"]
    try:
        import nvidia
        inc += [f"-I{Path(p) / 'cu13' / 'include'}" for p in nvidia.__path__ if (Path(p) / "cu13" / "include").exists()]
    except ImportError:
        pass
    cubin = os.path.join(out_dir, "patch_embed.sm_90.cubin")
    cmd = [nvcc, "-std=c++20", "-O3", "-cubin", "-arch=sm_90", "--expt-relaxed-constexpr",
           "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
           *inc, str(ROOT / "csrc" / "cuda" / "patch_embed.cu"), "-o", cubin]
    subprocess.run(cmd, check=True)
    return cubin


def short_name(mangled: str) -> str:
    """``patchify_rows_kernel<uint8,bf16>`` (``patchify_hwc_kernel<uint8,bf16,C3>``) from the mangled name."""
    m = re.search(r"\d(unpatchify_\w+?_kernel|patchify_\w+?_kernel|prefill_kernel)I(.*?)E+vP", mangled)
    if not m:
        return mangled
    args, out = m.group(2), []
    while args:
        for code in sorted(TYPES, key=len, reverse=True):
            if args.startswith(code):
                out.append(TYPES[code])
                args = args[len(code):]
                break
        else:
            if args[0] in "il" and m.group(1) == "prefill_kernel":  # the index type
                out.append("int32" if args[0] == "i" else "int64")
                args = args[1:]
            elif re.match(r"Li\d+E?$", args):  # the channel count of the channels_last kernels
                out.append("C" + re.match(r"Li(\d+)", args).group(1))
                args = ""
            elif args.startswith("Lb0") or args.startswith("Lb1"):
                out.append("vec" if args[2] == "1" else "scalar")
                args = args[3:]
            else:
                out.append(args)
                break
    out = [out[0] if a == "<same>" else a for a in out]
    return f"{m.group(1)}<{','.join(out)}>"


def sass_counts(binary: str, arch: str = "sm_90") -> Dict[str, Counter]:
    """{kernel: Counter(instruction -> static count)} for the patch-embedding kernels in binary."""
    tool = find_cuobjdump()
    if tool is None:
        raise FileNotFoundError("cuobjdump not found (CUDA_HOME, PATH or triton's copy)")
    args = [tool, "-sass", binary] if binary.endswith(".cubin") else [tool, "-sass", "-arch", arch, binary]
    text = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    counts: Dict[str, Counter] = {}
    current = None
    for line in text.splitlines():
        if "Function :" in line:
            current = short_name(line.split("Function :")[1].strip())
            counts[current] = Counter()
        elif current is not None:
            parts = line.split("*/", 1)  # "/*0180*/  LDG.E.128 R4, [R2.64] ;  /* 0x... */"
            text = parts[1].strip() if len(parts) == 2 and parts[0].strip().startswith("/*") else ""
            if text.startswith("@"):  # a predicate: "@P0 LDG.E.128 ..."
                text = text.split(None, 1)[1] if " " in text else ""
            m = OP.match(text)
            if m:
                counts[current][m.group(1)] += 1
    return counts


def table(counts: Dict[str, Counter]) -> str:
    cols = ["STS.U16", "LDS.U16", "STS.128", "LDS.128", "LDG.E.128.CONSTANT", "LDG.E.U16.CONSTANT", "STG.E.128",
            "STG.E.U16", "STL", "LDL"]
    head = f"{'kernel':<48}" + "".join(f"{c.replace('.CONSTANT', '.C'):>11}" for c in cols)
    rows = [head, "-" * len(head)]
    for name in sorted(counts):
        rows.append(f"{name:<48}" + "".join(f"{counts[name].get(c, 0):>11}" for c in cols))
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--so", help="a built vitfast._C (default: the importable one)")
    ap.add_argument("--compile", action="store_true", help="compile csrc/cuda/patch_embed.cu for sm_90 now")
    ap.add_argument("--json", help="write the counts here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        binary = compile_cubin(tmp) if args.compile else (args.so or built_extension())
        if binary is None:
            print("vitfast._C is not built", file=sys.stderr)
            return 2
        counts = sass_counts(binary)
    if not counts:
        print(f"no sm_90 kernels in {binary} (built without CUDA, or without 9.0 in TORCH_CUDA_ARCH_LIST)",
              file=sys.stderr)
        return 2
    print(table(counts))
    if args.json:
        Path(args.json).write_text(json.dumps({k: dict(v) for k, v in sorted(counts.items())}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
