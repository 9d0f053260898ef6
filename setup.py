"""Builds vitfast._C: the C++ operators, plus the CUDA ones when the toolchain allows.

Build switches (environment, never GPU presence):
  VITFAST_SKIP_CUDA_BUILD=1  build the CPU operators only
  TORCH_CUDA_ARCH_LIST       CUDA architectures (default "8.0;9.0": A100 and H100)
  MAX_JOBS                   parallel compile jobs (ninja)
  DEBUG=1                    -O0 -g (and -G for device code)

The CUDA sources are compiled when nvcc is found (CUDA_HOME) and torch is a CUDA build;
no GPU is needed at build time.
"""

import glob
import os
import site
import sys

from setuptools import setup

import shutil

import torch


def _find_cuda_home():
    """CUDA_HOME, else the toolkit nvcc belongs to, else /usr/local/cuda. A toolkit is a folder
    with bin/nvcc and include/cuda_runtime.h (an nvcc wrapper in /usr/local/bin is not one)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    candidates += ["/usr/local/cuda"]
    for home in candidates:
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and os.path.exists(
            os.path.join(home, "include", "cuda_runtime.h")
        ):
            os.environ["CUDA_HOME"] = home
            return


_find_cuda_home()
from torch.utils import cpp_extension  # noqa: E402  (reads CUDA_HOME at import)

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _nvidia_include_dirs():
    """torch's CUDA headers include cusparse.h and friends; pip's CUDA wheels keep them in
    site-packages/nvidia/cu*/include rather than in CUDA_HOME."""
    roots = list(site.getsitepackages()) + [os.path.dirname(os.path.dirname(torch.__file__))]
    dirs = []
    for root in dict.fromkeys(roots):
        for d in sorted(glob.glob(os.path.join(root, "nvidia", "cu*", "include"))):
            if os.path.isdir(d) and d not in dirs:
                dirs.append(d)
    return dirs


def build_cuda() -> bool:
    if _env_flag("VITFAST_SKIP_CUDA_BUILD"):
        return False
    if torch.version.cuda is None:
        print("vitfast: torch is a CPU build, building the CPU operators only", file=sys.stderr)
        return False
    if cpp_extension.CUDA_HOME is None:
        print("vitfast: nvcc not found (set CUDA_HOME), building the CPU operators only", file=sys.stderr)
        return False
    return True


def extensions():
    debug = _env_flag("DEBUG")
    with_cuda = build_cuda()
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    macros = [
        ("VITFAST_TORCH_VERSION", f'"{torch.__version__}"'),
        ("VITFAST_WITH_CUDA", "1" if with_cuda else "0"),
        ("VITFAST_CUDA_VERSION", f'"{torch.version.cuda or ""}"' if with_cuda else '""'),
        ("Py_LIMITED_API", "0x030A0000"),
    ]
    # the C++ standard is left to torch.utils.cpp_extension (C++17 or C++20 by torch version)
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    extra = {"cxx": cxx}
    include_dirs = [os.path.join(ROOT, "csrc")]
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        include_dirs += _nvidia_include_dirs()
        nvcc = ["-O0", "-g", "-G"] if debug else ["-O3", "-lineinfo"]
        nvcc += ["--expt-relaxed-constexpr", "-U__CUDA_NO_HALF_OPERATORS__",
                 "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
        extra["nvcc"] = nvcc
        ext_cls = cpp_extension.CUDAExtension
    else:
        ext_cls = cpp_extension.CppExtension
    return [
        ext_cls(
            "vitfast._C",
            sources,
            include_dirs=include_dirs,
            define_macros=macros,
            extra_compile_args=extra,
            extra_link_args=[] if debug else ["-Wl,-O1"],
            py_limited_api=True,
        )
    ]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
