"""``vitfast info`` / ``python -m vitfast.cli info``: what is installed and what was built.

``--check`` runs a quick self-test of every op on every available device and prints one
PASS/FAIL line per (device, op) with the error or the reason; the exit code is 1 when any
check fails. Devices: ``cpu`` (the paths ``backend="auto"`` takes on the CPU: the C++
patch embedding, SDPA, the fused ops' reference), ``cpu-triton`` (the Triton kernels under
the interpreter, in a child process with ``TRITON_INTERPRET=1`` set before import, since the
interpreter must be on before the kernels are defined; a crash there is a FAIL, not a crash
of this command) and ``cuda`` when a GPU is visible (the Triton and CUDA kernels).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
from typing import Callable, Optional, Sequence

import torch

from .benchmarking import rel_err

DISPATCH_KEYS = (
    "CPU", "CUDA", "Meta", "AutocastCPU", "AutocastCUDA", "Autograd", "AutogradCPU", "AutogradCUDA",
    "CompositeExplicitAutograd", "CompositeImplicitAutograd",
)


def vitfast_ops() -> list[str]:
    """Names of the ops registered in torch.ops.vitfast (C++ and Python registrations)."""
    import vitfast.ops  # noqa: F401  (loads _C, when it can be used, and the Python registrations)

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


def extension_facts() -> dict:
    """What was built. ``usable`` False with the ``reason`` (and the fix) when vitfast._C cannot be
    used (``built`` False: there is none; else it fails to load or was built for another torch):
    vitfast then runs without it, the patch embedding on its PyTorch reference."""
    from .. import _ext

    st = _ext.status()
    if not st.ok:
        return {"built": st.built, "usable": False, "reason": st.reason, "fix": st.fix, "built_for_torch": st.built_for_torch,
                "cuda_kernels": False, "cuda_version": None, "path": None}
    _C = st.module
    strategy = getattr(_C, "cpu_patch_embed_strategy", None)
    return {"built": True, "usable": True, "reason": None, "fix": None, "built_for_torch": _C.torch_version, "cuda_kernels": bool(_C.with_cuda),
            "cuda_version": _C.cuda_version or None, "path": _C.__file__,
            "cpu_patch_embed": strategy() if strategy is not None else None}


def attention_variants() -> dict:
    """The attention forward and backward variants in force (VITFAST_ATTENTION_FWD/_BWD or
    set_forward_variant/set_backward_variant) and the ones there are."""
    from ..ops.triton import attention as K

    return {"forward": K._FWD, "backward": K._BWD, "forward_variants": list(K.FWD_VARIANTS),
            "backward_variants": list(K.BWD_VARIANTS)}


def collect() -> dict:
    import vitfast

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
        "extension": extension_facts(),
        "attention_variants": attention_variants(),
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
    ]
    if ext["usable"]:
        lines += [
            f"extension      {ext['path']}",
            f"  built for    torch {ext['built_for_torch']}",
            f"  CUDA kernels {'yes (CUDA ' + ext['cuda_version'] + ')' if ext['cuda_kernels'] else 'no (CPU only build)'}",
        ]
        if ext.get("cpu_patch_embed"):  # which GEMM the float32 CPU patch embedding runs here
            how = {"conv": "oneDNN's convolution", "gemm": "MKL's GEMM on the patch matrix"}
            lines.append(f"  CPU patch embedding  {ext['cpu_patch_embed']} ({how.get(ext['cpu_patch_embed'], '?')}; "
                         "VITFAST_CPU_PATCH_EMBED)")
    else:  # the patch embedding runs its PyTorch reference
        why = f"{ext['reason']}; {ext['fix']}" if ext["built"] else ext["fix"]
        lines.append(f"extension      {'not usable' if ext['built'] else 'not built'} ({why})")
    av = info.get("attention_variants")
    if av:
        lines.append(f"attention      forward {av['forward']} (VITFAST_ATTENTION_FWD: {'|'.join(av['forward_variants'])}), "
                     f"backward {av['backward']} (VITFAST_ATTENTION_BWD: {'|'.join(av['backward_variants'])})")
    lines += [
        f"GPU            {', '.join(info['gpus']) if info['gpus'] else 'none visible (torch.cuda.is_available() is False)'}",
        "ops (torch.ops.vitfast) and their dispatch keys:",
    ]
    for op, keys in info["ops"].items():
        lines.append(f"  {op:<24} {', '.join(keys) if keys else '(no kernels)'}")
    return "\n".join(lines)


# ------------------------------------------------------------------------ self-test
# One check per op, from its declaration (vitfast.ops.spec): its first sample input, forward and
# backward, against its reference in float64, within the declared self-test tolerance (max |err|
# / max(1, |ref|max)): a smoke test that catches a broken build or kernel, not a last-bit change.


def _compare(names, got, ref, dtype, tol: Optional[float] = None) -> str:
    tol = tol if tol is not None else {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}[dtype]
    worst = max(((rel_err(a, b, unit=1.0), n) for n, a, b in zip(names, got, ref)), default=(0.0, ""))
    if not worst[0] <= tol:
        raise AssertionError(f"{worst[1]} error {worst[0]:.3g} > {tol:g}")
    return f"max rel err {worst[0]:.1e}"


def _outputs_and_grads(fn, sample, dtype, **kw) -> list:
    cast = lambda x: x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x  # noqa: E731
    args = [cast(a) for a in sample.args]
    kwargs = {k: cast(v) for k, v in sample.kwargs.items()}
    for i in sample.grad:
        args[i] = args[i].detach().requires_grad_()
    outs = fn(*args, **kwargs, **kw)
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    g = torch.Generator().manual_seed(1)
    douts = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(device=o.device, dtype=o.dtype) for o in outs]
    leaves = [args[i] for i in sample.grad]
    return [o.detach() for o in outs] + list(torch.autograd.grad(outs, leaves, douts) if leaves else ())


def _spec_check(spec) -> Callable:
    """``check(device, dtype, backend)``; backend ``"kernel"`` forces the op's kernel, ``"auto"``
    takes the path ``backend="auto"`` takes."""
    def check(device, dtype, backend):
        sample = spec.sample_inputs(device, dtype)[0]
        be = spec.kernel_backend if backend == "kernel" else "auto"
        got = _outputs_and_grads(spec.fn, sample, dtype, backend=be)
        ref = _outputs_and_grads(spec.ref, sample, torch.float64)
        names = [f"out{i}" for i in range(len(got) - len(sample.grad))] + [f"d(arg {i})" for i in sample.grad]
        return _compare(names, got, ref, dtype, spec.check_tol[dtype])

    return check


def _checks() -> dict:
    from ..ops.spec import SPECS

    return {name: _spec_check(spec) for name, spec in SPECS.items()}


CHECKS: dict[str, Callable] = {}  # filled on first use (importing vitfast.ops declares the specs)


def run_checks(target: str) -> list[dict]:
    """Run every check in this process. ``target``: ``cpu`` (auto's CPU paths),
    ``cpu-triton`` (Triton kernels; needs TRITON_INTERPRET=1 set before vitfast was
    imported) or ``cuda``."""
    from ..ops.spec import SPECS

    if not CHECKS:
        CHECKS.update(_checks())
    device = "cuda" if target == "cuda" else "cpu"
    backend = "auto" if target == "cpu" else "kernel"
    dtypes = [torch.bfloat16, torch.float16] if target == "cuda" else [torch.float32]
    results = []
    for op, fn in CHECKS.items():
        for dtype in dtypes:
            # a kernel that is not Triton (the C++ patch embedding) is checked on cpu and cuda only
            if target == "cpu-triton" and op in SPECS and not SPECS[op].triton:
                continue
            row = {"device": target, "op": op, "dtype": str(dtype).replace("torch.", "")}
            try:
                row.update(ok=True, detail=fn(device, dtype, backend))
            except Exception as e:  # noqa: BLE001  (reported as FAIL with the reason)
                row.update(ok=False, detail=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            results.append(row)
    return results


def _worker_command() -> list[str]:
    return [sys.executable, "-m", "vitfast.cli.info", "--check-worker", "cpu-triton"]


def run_interpreter_checks(timeout: float = 600.0) -> list[dict]:
    """The Triton kernels under the interpreter, in a child process (TRITON_INTERPRET=1 must
    be set before the kernels are defined, and a crash must not take this process down)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    fail = lambda why: [{"device": "cpu-triton", "op": "(all)", "dtype": "-", "ok": False, "detail": why}]  # noqa: E731
    try:
        proc = subprocess.run(_worker_command(), capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return fail(f"the interpreter self-test did not finish in {timeout:.0f} s")
    if proc.returncode != 0:
        how = (f"killed by signal {signal.Signals(-proc.returncode).name}" if proc.returncode < 0
               else f"exit code {proc.returncode}")
        tail = (proc.stderr.strip().splitlines() or [""])[-1]
        return fail(f"the interpreter self-test process died ({how}): {tail}")
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return fail(f"unreadable output from the interpreter self-test: {proc.stdout[-300:]!r}")


def check_all(interpreter: bool = True) -> list[dict]:
    """Every check on every available device."""
    results = run_checks("cpu")
    if interpreter:
        results += run_interpreter_checks()
    if torch.cuda.is_available():
        results += run_checks("cuda")
    return results


def render_checks(results: list[dict]) -> str:
    lines = ["self-test (vitfast info --check):"]
    for r in results:
        lines.append(f"  {'PASS' if r['ok'] else 'FAIL'}  {r['device']:<10} {r['op']:<20} {r['dtype']:<9} {r['detail']}")
    failed = sum(not r["ok"] for r in results)
    lines.append(f"{len(results) - failed} passed, {failed} failed")
    return "\n".join(lines)


def _dispatch_summary(show_all: bool = False) -> str:
    """The dispatch table in force: its sources, and the entries for this GPU (all with --dispatch)."""
    from .. import dispatch

    try:
        import torch

        here = dispatch.device_key(torch.device("cuda")) if torch.cuda.is_available() else None
    except Exception:  # a broken CUDA setup is reported above, not here
        here = None
    text = dispatch.describe(device=None if show_all else here or "(no GPU here)")
    if not show_all and here is None:
        text += f"\n  (no GPU here: `vitfast info --dispatch` lists all {len(dispatch.table())} entries)"
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="vitfast info", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the facts (and check results) as JSON")
    parser.add_argument("--check", action="store_true",
                        help="self-test every op on every available device; exit code 1 when any check fails")
    parser.add_argument("--no-interpreter", action="store_true",
                        help="with --check: skip the Triton-interpreter checks on the CPU (the slow part)")
    parser.add_argument("--check-worker", choices=["cpu-triton"], help=argparse.SUPPRESS)
    parser.add_argument("--dispatch", action="store_true",
                        help="print every entry of the measured dispatch table in force (default: this GPU's only)")
    args = parser.parse_args(argv)
    if args.check_worker:
        print(json.dumps(run_checks(args.check_worker)))
        return 0
    info = collect()
    results = check_all(interpreter=not args.no_interpreter) if args.check else None
    if args.json:
        from .. import dispatch

        info = {**info, "dispatch": {"override": dispatch.override(), "sources": dispatch.table().sources,
                                     "entries": len(dispatch.table())}}
        print(json.dumps({**info, "checks": results} if results is not None else info, indent=2))
    else:
        print(render(info))
        print(_dispatch_summary(show_all=args.dispatch))
        if results is not None:
            print(render_checks(results))
    return 1 if results is not None and not all(r["ok"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
