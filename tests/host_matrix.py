"""``make test-matrix``: the numerics-sensitive tests under the host variants this machine can emulate.

CI runs on whatever machine the submitter has (Intel or AMD, AVX2 or AVX-512, any core count),
and the floating-point code paths differ with it: ATen's vectorised kernels
(``ATEN_CPU_CAPABILITY``), oneDNN's (``ONEDNN_MAX_CPU_ISA``, set with the capability so the
two agree), MKL's BLAS (``MKL_CBWR``: ``COMPATIBLE`` is the generic path, ``AVX2`` an AVX2
host's; unset, MKL picks for this CPU) and the thread count (how reductions split). A test that
passes here under every cell passes on those hosts.

The axes have three values each. By default the 9 cells of a Latin square are run, so every
pair of values of any two axes meets once; ``--full`` runs all 27. Cells this CPU cannot
emulate (AVX-512 on a CPU without it) are reported as skipped.

    python tests/host_matrix.py                 # 9 cells, the table at the end
    python tests/host_matrix.py --full -- -k attention   # all 27, extra pytest arguments after --
    python tests/host_matrix.py --only avx2/mkl=COMPATIBLE/4t     # one cell
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CAPABILITIES = ("default", "avx2", "avx512")
ONEDNN_ISA = {"default": "SSE41", "avx2": "AVX2", "avx512": None}  # None: oneDNN's own choice on this CPU
MKL_PATHS = ("native", "COMPATIBLE", "AVX2")
THREADS = (1, 2, 4)
# what depends on the host's arithmetic: training and parity runs, property tests, every op's
# numerics (attention, fused epilogues, patch embedding), the model against timm
TESTS = ["tests/training", "tests/property", "tests/ops", "tests/modules", "tests/models", "tests/integrations",
         "--ignore=tests/ops/test_gpu_path.py"]


def cells(full: bool = False) -> list[dict]:
    if full:
        combos = itertools.product(range(3), range(3), range(3))
    else:  # Latin square: cell (i, j) gets threads (i + j) mod 3
        combos = ((i, j, (i + j) % 3) for i in range(3) for j in range(3))
    return [dict(capability=CAPABILITIES[i], mkl=MKL_PATHS[j], threads=THREADS[t]) for i, j, t in combos]


def cell_name(cell: dict) -> str:
    return f"{cell['capability']}/mkl={cell['mkl']}/{cell['threads']}t"


def cell_env(cell: dict, base: dict) -> dict:
    env = {k: v for k, v in base.items() if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR")}
    env["ATEN_CPU_CAPABILITY"] = cell["capability"]
    if ONEDNN_ISA[cell["capability"]]:
        env["ONEDNN_MAX_CPU_ISA"] = ONEDNN_ISA[cell["capability"]]
    if cell["mkl"] != "native":
        env["MKL_CBWR"] = cell["mkl"]
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(cell["threads"])
    return env


def supported_capabilities() -> set:
    """The ATen capabilities this CPU runs (asking torch under each setting: it falls back to
    what the CPU has)."""
    out = set()
    for cap in CAPABILITIES:
        p = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                           env=dict(os.environ, ATEN_CPU_CAPABILITY=cap), capture_output=True, text=True)
        if p.returncode == 0 and p.stdout.strip().splitlines()[-1].lower() == cap:
            out.add(cap)
    return out


def _counts(text: str) -> str:
    m = re.findall(r"^=* ?(\d+ (?:passed|failed|error).*?) in [\d.]+s", text, re.M)
    return m[-1] if m else "no pytest summary"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="all 27 cells instead of the 9 of the Latin square")
    p.add_argument("--log-dir", default=None, help="keep each cell's pytest output here")
    p.add_argument("--only", nargs="+", metavar="CELL", help="run only these cells (names as in the table, "
                   "e.g. avx2/mkl=COMPATIBLE/4t)")
    args = p.parse_args(own)
    ok_caps = supported_capabilities()
    results = []
    for cell in cells(args.full or bool(args.only)):
        name = cell_name(cell)
        if args.only and name not in args.only:
            continue
        if cell["capability"] not in ok_caps:
            results.append((name, "skipped", f"this CPU has no {cell['capability']}", 0.0))
            print(f"== {name}: skipped (this CPU has no {cell['capability']})", flush=True)
            continue
        env = cell_env(cell, dict(os.environ, TRITON_INTERPRET="1"))
        print(f"== {name}", flush=True)
        t0 = time.time()
        with tempfile.TemporaryDirectory(prefix="vitfast-matrix-") as cache:
            # a host of its own: Inductor's compiled kernels and precompiled headers depend on the
            # vector ISA, and a cache shared with another cell (or another run) mixes them up
            env.update(TORCHINDUCTOR_CACHE_DIR=os.path.join(cache, "inductor"), TRITON_CACHE_DIR=os.path.join(cache, "triton"))
            proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS, *extra],
                                  cwd=ROOT, env=env, capture_output=True, text=True)
        dt = time.time() - t0
        if args.log_dir:
            Path(args.log_dir).mkdir(parents=True, exist_ok=True)
            (Path(args.log_dir) / (name.replace("/", "_") + ".log")).write_text(proc.stdout + proc.stderr)
        status = "pass" if proc.returncode == 0 else "FAIL"
        results.append((name, status, _counts(proc.stdout), dt))
        print(f"   {status}: {_counts(proc.stdout)} ({dt:.0f} s)", flush=True)
        if proc.returncode != 0:
            print("\n".join(line for line in proc.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))))
    print(f"\n{'cell':<30} {'result':<8} {'time':>6}  tests")
    for name, status, counts, dt in results:
        print(f"{name:<30} {status:<8} {dt:5.0f}s  {counts}")
    failed = [r for r in results if r[1] == "FAIL"]
    passed = [r for r in results if r[1] == "pass"]
    print(f"cells: {len(passed)} passed, {len(failed)} failed, {len(results) - len(passed) - len(failed)} skipped")
    return 1 if failed or not passed else 0


if __name__ == "__main__":
    sys.exit(main())
