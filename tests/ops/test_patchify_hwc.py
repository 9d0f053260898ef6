"""The channels_last patchify/unpatchify CUDA kernels' per-thread work, run on the CPU.

No CUDA kernel runs here, but what each thread of patchify_hwc_kernel and unpatchify_hwc_kernel
computes -- which G pixels x C channels it reads, where its C matrix runs go, the de-interleaving
and the normalisation -- lives in csrc/cuda/patchify_hwc.h, free of CUDA, so a host program
(tests/ops/patchify_hwc_host.cpp) runs it over every item of small images and compares with the
patch matrix and the image gradient built from the definition, exactly. It also checks the
alignment the kernels' wide accesses assume. On a GPU, test_patch_embed.py compares the kernels
themselves with the CPU op (channels_last inputs).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_channels_last_items_match_the_definition(tmp_path):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path / "patchify_hwc_host"
    subprocess.run([cxx, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas",
                    f"-I{ROOT / 'csrc' / 'cuda'}", str(ROOT / "tests" / "ops" / "patchify_hwc_host.cpp"),
                    "-o", str(exe)], check=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.startswith("ok"), run.stdout + run.stderr
    assert int(run.stdout.split()[1]) >= 300  # every sweep ran
