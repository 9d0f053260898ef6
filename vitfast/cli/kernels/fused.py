"""Fused block epilogues: vitfast's Triton ops against the eager chains they replace.

Ops (x, y ``[M, C]`` with M = batch * tokens; vectors ``[C]``):
  add_layer_norm       x + gamma * (y + y_bias), then LayerNorm (both outputs)
  layer_norm           LayerNorm alone
  bias_gelu            gelu(z + bias) on the MLP hidden activation ``[M, H]`` (exact erf GELU)
  bias_scale_residual  x + gamma * (y + bias)
Implementations: ``vitfast`` (the op, backend="kernel"), ``eager`` (the plain-PyTorch chain,
``*_ref``, from the op's declaration), ``compile`` (that chain under torch.compile, fullgraph,
static shapes).
Modes: ``fwd`` (no grad) and ``fwd+bwd`` (every input requires grad: training).

These ops are memory-bound, so each row reports GB/s over the bytes the op must move at
least (every [M, C] operand read once and every result written once, forward and backward;
the [C] vectors are negligible and not counted) and, for vitfast, the speed-ups over the
other two and the fraction of the measured device copy rate reached.

    python -m vitfast.cli.kernels.fused                              # GPU: ViT-B/L/H/g/bigG widths, bf16
    python -m vitfast.cli.kernels.fused --models vit_base --json benchmarks/results/
    python -m vitfast.cli.kernels.fused --smoke --json /tmp/x.json   # tiny, checks the script (any device)

``collect_rows(...)`` returns the JSON-able rows; ``main(argv)`` prints a table and writes
``--json``. Without a GPU the vitfast kernels run under the Triton interpreter: such CPU
figures check that the script works and say nothing about the kernels' speed.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional, Sequence

import torch

from .. import benchmarking as bu
from ...ops.spec import SPECS

# name: (width C, MLP hidden H, tokens N, batch on the GPU, batch on the CPU)
MODELS = {
    "vit_base": (768, 3072, 197, 256, 2),
    "vit_large": (1024, 4096, 197, 256, 1),
    "vit_huge_14": (1280, 5120, 257, 128, 1),
    "vit_giant_14": (1408, 6144, 257, 128, 1),
    "vit_bigG_14": (1664, 8192, 257, 64, 1),
}
SMOKE_MODELS = {"smoke": (96, 384, 17, 2, 2)}
OPS = ("add_layer_norm", "layer_norm", "bias_gelu", "bias_scale_residual")
IMPLS = ("vitfast", "eager", "compile")
MODES = ("fwd", "fwd+bwd")
EPS = 1e-6

# op: (argument layout, width key, (fwd, bwd) tensor passes). The function and its reference come
# from the op's declaration (vitfast.ops.spec). In the layout "row" is an [M, width] tensor, "vec"
# a [width] vector, "w" a LayerNorm weight (around 1), "eps" the LayerNorm epsilon; "kw:name" a
# keyword argument. The passes count whole [M, width] tensors moved: add_layer_norm reads x, y and
# writes x_out, h (4); its backward reads dx_out, dh, x_out, y and writes dx, dy (6).
# bias_scale_residual's backward reads dout, y and writes dy (3): dx is dout itself.
CASES = {
    "add_layer_norm": (("row", "row", "vec", "w", "vec", "eps", "kw:y_bias"), "C", (4, 6)),
    "layer_norm": (("row", "w", "vec", "eps"), "C", (2, 3)),
    "bias_gelu": (("row", "vec"), "H", (2, 3)),
    "bias_scale_residual": (("row", "row", "vec", "vec"), "C", (3, 3)),
}


def make_inputs(op: str, M: int, width: int, dtype: torch.dtype, device: torch.device, grad: bool):
    """(args, kwargs) of one call, tensors requiring grad when ``grad``."""
    g = torch.Generator(device=device).manual_seed(0)
    args, kwargs = [], {}
    for kind in CASES[op][0]:
        name, _, key = kind.partition(":")
        if name == "eps":
            value = EPS
        elif name == "row":
            value = torch.randn(M, width, generator=g, device=device, dtype=dtype).requires_grad_(grad)
        else:
            value = (torch.randn(width, generator=g, device=device, dtype=dtype) * 0.1
                     + (1.0 if name == "w" else 0.0)).requires_grad_(grad)
        if name == "kw":
            value = (torch.randn(width, generator=g, device=device, dtype=dtype) * 0.1).requires_grad_(grad)
            kwargs[key] = value
        else:
            args.append(value)
    return args, kwargs


def make_step(fn: Callable, inputs, mode: str) -> Callable[[int], None]:
    args, kwargs = inputs
    if mode == "fwd":
        def step(i):
            with torch.no_grad():
                fn(*args, **kwargs)
        return step
    leaves = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
    outs = fn(*args, **kwargs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = [torch.randn_like(o) for o in outs]
    del outs

    def step(i):
        for t in leaves:
            t.grad = None
        outs = fn(*args, **kwargs)
        torch.autograd.backward(outs if isinstance(outs, tuple) else (outs,), grads)
    return step


def _impl(op: str, impl: str) -> Callable:
    """The op forced onto its kernel, its reference (eager), or the reference compiled."""
    spec = SPECS[op]
    if impl == "vitfast":
        return lambda *a, **k: spec.fn(*a, **k, backend=spec.kernel_backend)
    if impl == "eager":
        return spec.ref
    if impl == "compile":
        return torch.compile(spec.ref, fullgraph=True, dynamic=False)
    raise ValueError(impl)


def collect_rows(models: Optional[dict] = None, ops: Sequence[str] = OPS, impls: Sequence[str] = IMPLS,
                 modes: Sequence[str] = MODES, dtype_name: Optional[str] = None, device: str = "auto",
                 warmup: Optional[int] = None, iters: Optional[int] = None, argv: Optional[Sequence[str]] = None,
                 smoke: bool = False, env_out: Optional[dict] = None, allow_noisy: bool = True,
                 writes: bool = False) -> list[dict]:
    """Benchmark every (model, op, mode, impl); JSON-able rows stamped with device, versions,
    date and command line. A failing implementation gets a row saying why, never none.
    The implementations of one (model, op, mode) are timed alternately, round by round. With
    ``writes`` and not ``allow_noisy``, a busy machine raises ``bu.NoisyMachine``."""
    dev, dtype_name, dtype, warmup, iters = bu.microbench_settings(device, dtype_name, warmup, iters,
                                                                   gpu=(10, 50), cpu=(1, 3))
    models = models or (SMOKE_MODELS if smoke else MODELS)
    return bu.measured_rows("fused", dev, argv, lambda env: _measure(
        env, models, ops, impls, modes, dtype_name, dtype, dev, warmup, iters),
        allow_noisy=allow_noisy, writes=writes, env_out=env_out)


def _measure(env: dict, models: dict, ops, impls, modes, dtype_name: str, dtype: torch.dtype, dev: torch.device,
             warmup: int, iters: int) -> list[dict]:
    gpu = dev.type == "cuda"
    copy_gbps = bu.measure_copy_gbps(dev)
    env.update(copy_gbps_measured=round(copy_gbps, 1), triton_interpreted=os.environ.get("TRITON_INTERPRET") == "1")
    es = torch.finfo(dtype).bits // 8
    rows = []
    for model_name, (C, H, N, gpu_batch, cpu_batch) in models.items():
        batch = gpu_batch if gpu else cpu_batch
        M = batch * N
        for op in ops:
            width = {"C": C, "H": H}[CASES[op][1]]
            fwd_passes, bwd_passes = CASES[op][2]
            for mode in modes:
                nbytes = (fwd_passes + (bwd_passes if mode == "fwd+bwd" else 0)) * M * width * es
                group = [dict(op=op, impl=impl, backend=impl, model=model_name, batch=batch, tokens=N, M=M,
                              width=width, dtype=dtype_name, mode=mode, bytes=int(nbytes), gbps=None) for impl in impls]

                def make(impl):
                    if impl == "compile":
                        torch._dynamo.reset()
                    return make_step(_impl(op, impl), make_inputs(op, M, width, dtype, dev, grad=mode == "fwd+bwd"),
                                     mode)

                times = bu.time_group(group, make, warmup=warmup, iters=iters, device=dev)
                for row in group:
                    if row["status"] == "ok":
                        row["gbps"] = round(nbytes / (row["ms"] * 1e-3) / 1e9, 1)
                        row["frac_of_copy"] = round(row["gbps"] / copy_gbps, 3)
                bu.add_paired_speedups(group, times)
                rows += group
                if gpu:
                    torch.cuda.empty_cache()
    return rows


def format_table(rows: list[dict]) -> str:
    head = (f"{'model':<13} {'op':<20} {'mode':<8} {'impl':<8} {'ms':>9} {'GB/s':>8} {'% copy':>7} "
            f"{'vs eager':>8} {'vs comp':>8}")
    lines = [head, "-" * len(head)]
    f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
    for r in rows:
        left = f"{r['model']:<13} {r['op']:<20} {r['mode']:<8} {r['impl']:<8}"
        if r["status"] != "ok":
            lines.append(f"{left} {r['status'][:90]}")
            continue
        line = f"{left} {r['ms']:9.3f} {r['gbps']:8.1f} {100 * r['frac_of_copy']:6.1f}%"
        if r["impl"] == "vitfast":
            line += f" {f(r.get('speedup_vs_eager'), '7.2f')}x {f(r.get('speedup_vs_compile'), '7.2f')}x"
        lines.append(line)
    if rows:
        r = rows[0]
        interp = " [Triton interpreted: not kernel speed]" if r.get("triton_interpreted") else ""
        lines.append(f"{r['label']} ({r['device']}); torch {r['torch']}, triton {r.get('triton')}, vitfast "
                     f"{r['vitfast']}; copy {r['copy_gbps_measured']} GB/s; {r['dtype']}; {r['date']}{interp}")
    return "\n".join(lines)


def _interpreted() -> bool:
    from ...ops.triton import fused as kernels

    return kernels.INTERPRET


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bu.add_microbench_args(p, MODELS, "fused")
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    args = p.parse_args(argv)
    if not bu.triton_runs_here(p.prog, _interpreted()):
        return 2
    models = bu.select_models(MODELS, args.models, args.batch)
    return bu.finish_microbench(args, "fused", lambda env: collect_rows(
        models, args.ops, args.impls, args.modes, args.dtype, args.device, args.warmup, args.iters, argv,
        smoke=args.smoke, env_out=env, allow_noisy=args.allow_noisy, writes=bool(args.json)), format_table)


if __name__ == "__main__":
    sys.exit(main())
