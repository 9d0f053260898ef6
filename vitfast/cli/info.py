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

DISPATCH_KEYS = (
    "CPU", "CUDA", "Meta", "AutocastCPU", "AutocastCUDA", "Autograd", "AutogradCPU", "AutogradCUDA",
    "CompositeExplicitAutograd", "CompositeImplicitAutograd",
)


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


# ------------------------------------------------------------------------ self-test
# Tolerances of a smoke test (max |err| / max(1, |ref|max)), not the tests' 2x rule: they
# catch a broken build or kernel, not a last-bit regression.
_TOL = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 4e-2}


def _rel_err(got, ref) -> float:
    return (got.double() - ref.double()).abs().max().item() / max(1.0, ref.double().abs().max().item())


def _grads(fn, inputs, dout_seed=1):
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*leaves)
    g = torch.Generator().manual_seed(dout_seed)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(device=out.device, dtype=out.dtype)
    out.backward(dout)
    return [out.detach()] + [t.grad for t in leaves if t.requires_grad]


def _compare(name_fn, got, ref, dtype) -> str:
    tol = _TOL[str(dtype).replace("torch.", "")]
    worst = max(((_rel_err(a, b), n) for n, a, b in zip(name_fn, got, ref)), default=(0.0, ""))
    if not worst[0] <= tol:
        raise AssertionError(f"{worst[1]} error {worst[0]:.3g} > {tol:g}")
    return f"max rel err {worst[0]:.1e}"


def _rand(shape, device, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def _check_patch_embed(device, dtype, backend):
    from vitfast.ops.patch_embed import patch_embed
    from vitfast.ops.reference import patch_embed_ref

    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (2, 3, 32, 48), generator=g, dtype=torch.uint8).to(device)
    w, b = _rand((24, 3, 16, 16), device, dtype, 1, 0.05), _rand((24,), device, dtype, 2)
    cls, pos = _rand((1, 1, 24), device, dtype, 3), _rand((1, 7, 24), device, dtype, 4)
    stats = dict(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    got = [patch_embed(raw, w, b, cls_token=cls, pos_embed=pos, **stats)]
    ref = [patch_embed_ref(raw, w.double(), b.double(), cls_token=cls.double(), pos_embed=pos.double(), **stats)]
    images = _rand((2, 3, 32, 48), device, dtype, 5)
    got += _grads(lambda i, w_, b_, c, p: patch_embed(i, w_, b_, cls_token=c, pos_embed=p), (images, w, b, cls, pos))
    ref += _grads(lambda i, w_, b_, c, p: patch_embed_ref(i, w_, b_, cls_token=c, pos_embed=p),
                  [t.double() for t in (images, w, b, cls, pos)])
    return _compare(["uint8 out", "out", "dimages", "dweight", "dbias", "dcls", "dpos"], got, ref, dtype)


def _check_attention(device, dtype, backend):
    from vitfast.ops.attention import attention
    from vitfast.ops.reference import attention_ref

    q, k, v = (_rand((2, 3, 77, 64), device, dtype, i) for i in range(3))
    got = _grads(lambda a, b_, c: attention(a, b_, c, backend=backend), (q, k, v))
    ref = _grads(attention_ref, [t.double() for t in (q, k, v)])
    return _compare(["out", "dq", "dk", "dv"], got, ref, dtype)


def _check_attention_packed(device, dtype, backend):
    from vitfast.ops.attention import attention_packed
    from vitfast.ops.reference import attention_ref

    H, D = 3, 40
    qkv = _rand((2, 50, 3 * H * D), device, dtype, 7)

    def ref_fn(x):
        q, k, v = x.unflatten(-1, (3, H, D)).permute(2, 0, 3, 1, 4).unbind(0)
        return attention_ref(q, k, v).transpose(1, 2).flatten(2)

    got = _grads(lambda x: attention_packed(x, num_heads=H, backend=backend), (qkv,))
    return _compare(["out", "dqkv"], got, _grads(ref_fn, (qkv.double(),)), dtype)


def _check_fused(op):
    def check(device, dtype, backend):
        from vitfast.ops.bias_gelu import bias_gelu
        from vitfast.ops.layer_norm import add_layer_norm, layer_norm
        from vitfast.ops.bias_scale_residual import bias_scale_residual

        be = "reference" if backend == "sdpa" else backend
        x, y = _rand((2, 50, 192), device, dtype, 8), _rand((2, 50, 192), device, dtype, 9)
        v = [_rand((192,), device, dtype, 10 + i, 0.5) for i in range(4)]
        fns = {
            "layer_norm": lambda x_, y_, a, b_, c, d: layer_norm(x_, a, b_, backend=be),
            "add_layer_norm": lambda x_, y_, a, b_, c, d: add_layer_norm(x_, y_, c, a, b_, y_bias=d, backend=be)[1],
            "bias_gelu": lambda x_, y_, a, b_, c, d: bias_gelu(x_, d, backend=be),
            "bias_scale_residual": lambda x_, y_, a, b_, c, d: bias_scale_residual(x_, y_, d, c, backend=be),
        }
        refs = {
            "layer_norm": lambda x_, y_, a, b_, c, d: torch.nn.functional.layer_norm(x_, (192,), a, b_, 1e-6),
            "add_layer_norm": lambda x_, y_, a, b_, c, d: torch.nn.functional.layer_norm(
                x_ + c * (y_ + d), (192,), a, b_, 1e-6),
            "bias_gelu": lambda x_, y_, a, b_, c, d: torch.nn.functional.gelu(x_ + d),
            "bias_scale_residual": lambda x_, y_, a, b_, c, d: x_ + c * (y_ + d),
        }
        inputs = (x, y, *v)
        got = _grads(fns[op], inputs)
        ref = _grads(refs[op], [t.double() for t in inputs])
        # unused inputs get no gradient in either: compare what both produced
        names = ["out"] + [f"d{n}" for n in ("x", "y", "weight", "bias", "gamma", "vbias")]
        pairs = [(n, a, b_) for n, a, b_ in zip(names, got, ref) if a is not None and b_ is not None]
        return _compare([p[0] for p in pairs], [p[1] for p in pairs], [p[2] for p in pairs], dtype)

    return check


CHECKS: dict[str, Callable] = {
    "patch_embed": _check_patch_embed,
    "attention": _check_attention,
    "attention_packed": _check_attention_packed,
    **{op: _check_fused(op) for op in ("layer_norm", "add_layer_norm", "bias_gelu", "bias_scale_residual")},
}


def run_checks(target: str) -> list[dict]:
    """Run every check in this process. ``target``: ``cpu`` (auto's CPU paths),
    ``cpu-triton`` (Triton kernels; needs TRITON_INTERPRET=1 set before vitfast was
    imported) or ``cuda``."""
    device = "cuda" if target == "cuda" else "cpu"
    backend = "sdpa" if target == "cpu" else "triton"
    dtypes = [torch.bfloat16, torch.float16] if target == "cuda" else [torch.float32]
    results = []
    for op, fn in CHECKS.items():
        for dtype in dtypes:
            # patch_embed has no Triton kernel: the C++ op is checked on cpu and cuda only
            if op == "patch_embed" and target == "cpu-triton":
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="vitfast info", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the facts (and check results) as JSON")
    parser.add_argument("--check", action="store_true",
                        help="self-test every op on every available device; exit code 1 when any check fails")
    parser.add_argument("--no-interpreter", action="store_true",
                        help="with --check: skip the Triton-interpreter checks on the CPU (the slow part)")
    parser.add_argument("--check-worker", choices=["cpu-triton"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.check_worker:
        print(json.dumps(run_checks(args.check_worker)))
        return 0
    info = collect()
    results = check_all(interpreter=not args.no_interpreter) if args.check else None
    if args.json:
        print(json.dumps({**info, "checks": results} if results is not None else info, indent=2))
    else:
        print(render(info))
        if results is not None:
            print(render_checks(results))
    return 1 if results is not None and not all(r["ok"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
