"""Builds vitfast._C: the C++ operators, plus the CUDA ones when the toolchain allows.

Build switches (environment, never GPU presence):
  VITFAST_SKIP_CUDA_BUILD=1  build the CPU operators only
  TORCH_CUDA_ARCH_LIST       CUDA architectures (default "8.0;9.0": A100 and H100)
  MAX_JOBS                   parallel compile jobs (ninja)
  DEBUG=1                    -O0 -g (and -G for device code)

The CUDA sources are compiled when nvcc is found (CUDA_HOME) and torch is a CUDA build;
no GPU is needed at build time.

A C++ extension only loads with the exact torch it was compiled against, so build with the torch
you will run: `pip install --no-build-isolation .` (torch installed first). A plain `pip install .`
builds in an isolated environment with whatever torch pip downloads there; this script says so
when it sees that. The torch used is recorded twice: `vitfast._C.torch_version`, and
`vitfast/_build_info.json` beside the extension (readable even when the extension no longer
loads), from which `import vitfast` names the torch to install.
"""

import glob
import json
import os
import shutil
import site
import sys

from setuptools import setup

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


def _installed_torch_version():
    """The torch of the environment being installed into, when this build runs in an isolated
    one (pip and `build` leave the target's site-packages off sys.path, not out of reach)."""
    from importlib import metadata

    paths = [p for p in site.getsitepackages() if os.path.isdir(p) and not os.path.dirname(torch.__file__).startswith(p)]
    for dist in metadata.distributions(path=paths):
        if (dist.metadata["Name"] or "").lower() == "torch":
            return dist.version
    return None


def warn_if_isolated() -> None:
    """Explain, loudly, a build against a torch from an isolated build environment (pip's
    pip-build-env-*, pypa/build's build-env-*, uv's builds-v0): the extension will load only with
    that exact torch, which need not be the one installed."""
    where = os.path.dirname(torch.__file__)
    if not any(mark in where for mark in ("pip-build-env-", os.sep + "build-env-", "builds-v0")):
        return
    installed = _installed_torch_version()
    clash = (f"the torch installed here is {installed}, so `import vitfast` will run without it"
             if installed and installed != torch.__version__ else
             "it will load only where exactly that torch is installed")
    bar = "=" * 78
    print(f"\n{bar}\nvitfast: building vitfast._C against torch {torch.__version__} from an isolated build "
          f"environment\n({where}); {clash}.\nInstall torch first, then `pip install --no-build-isolation .`, so "
          f"the extension is built\nagainst the torch you run.\n{bar}\n", file=sys.stderr)


def _torch_uses_libgomp() -> bool:
    """Whether torch's CPU library needs GNU OpenMP by the soname ``-fopenmp`` links
    (libgomp.so.1: PyPI's Linux wheels). Elsewhere (LLVM's or Intel's OpenMP, a renamed libgomp),
    linking it would load a second OpenMP runtime with its own thread count, so the extension's
    CPU loops stay serial, as before."""
    if not sys.platform.startswith("linux"):
        return False
    lib = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        import mmap

        with open(lib, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return m.find(b"\0libgomp.so.1\0") >= 0
    except (OSError, ValueError):
        return False


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
    link = [] if debug else ["-Wl,-O1"]
    if _torch_uses_libgomp():
        # at::parallel_for is a `#pragma omp parallel` in ATen's headers (torch's CPU builds use
        # OpenMP): without -fopenmp it compiles to a serial loop, and every CPU pass of the op ran
        # on one thread. -fopenmp links libgomp.so.1, the soname of the one torch has loaded, so
        # the loops run in torch's thread pool (torch.set_num_threads applies).
        cxx += ["-fopenmp"]
        link += ["-fopenmp"]
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
            extra_link_args=link,
            py_limited_api=True,
        )
    ]


class BuildExt(cpp_extension.BuildExtension.with_options(use_ninja=True)):
    """torch's build_ext, plus the build record (``_build_info.json``) beside each extension."""

    def run(self):
        super().run()
        for ext in self.extensions:
            path = os.path.join(os.path.dirname(self.get_ext_fullpath(ext.name)), "_build_info.json")
            cuda = dict(ext.define_macros).get("VITFAST_WITH_CUDA") == "1"
            with open(path, "w") as f:
                json.dump({"torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
                           "cuda_kernels": cuda}, f)
                f.write("\n")


warn_if_isolated()
setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExt},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
