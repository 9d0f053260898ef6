"""Attention throughput: vitfast's Triton kernel against every torch SDPA backend.

TFLOP/s with the usual convention: forward 4*B*H*N^2*D FLOPs, backward 2.5x that,
forward+backward 3.5x. Each figure is the median of ``triton.testing.do_bench`` (which
flushes L2 between runs) after a warm-up call that also runs the autotuner. Backends that
cannot run a shape are reported with their reason, never dropped.

    python benchmarks/bench_attention.py                      # the ViT shapes, bf16 + fp16
    python benchmarks/bench_attention.py --json benchmarks/results/attention_h100.json
    python benchmarks/bench_attention.py --shapes 8,12,197,64 --dtypes bf16 --modes fwd
    python benchmarks/bench_attention.py --tiles --shapes 256,12,197,64 --dtypes bf16   # tile choices
    TRITON_INTERPRET=1 python benchmarks/bench_attention.py --smoke   # CPU check of the script

``collect_rows(...)`` returns the JSON-able rows (used by ``vitfast bench kernels``);
``main(argv)`` prints a table and appends the rows to ``--json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

# (B, H, N, D): ViT-B/16 at 224, ViT-L/14 at 224 (D = 80 as in ViT-H/14), ViT-B/16 at 384,
# ViT-L/16 at 512, and a long-sequence shape comparable with published FlashAttention figures.
VIT_SHAPES = [(256, 12, 197, 64), (64, 16, 257, 80), (64, 16, 577, 64), (32, 16, 1025, 64), (8, 16, 4096, 128)]
SMOKE_SHAPES = [(1, 2, 50, 32)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODES = ("fwd", "bwd", "fwd+bwd")
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")
MATH_MEMORY_FRACTION = 0.6  # run the math backend only if its N x N tensors fit in this much free memory


def attention_flops(B: int, H: int, N: int, D: int, mode: str) -> float:
    return 4.0 * B * H * N * N * D * FLOP_FACTOR[mode]


def environment() -> dict:
    """Device and versions, stamped on every row."""
    import triton

    try:
        import vitfast

        vitfast_version = getattr(vitfast, "__version__", "unknown")
    except Exception as e:  # the extension may be absent; the attention op does not need it
        vitfast_version = f"unavailable ({type(e).__name__})"
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
        cc = ".".join(map(str, torch.cuda.get_device_capability()))
    else:
        device, cc = f"cpu ({platform.processor() or platform.machine()})", None
    return {
        "device": device,
        "compute_capability": cc,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "vitfast": vitfast_version,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }


def _median_ms(fn: Callable[[], object], grad_to_none: Sequence[torch.Tensor], device: str) -> float:
    fn()  # warm-up: compilation and autotuning happen here, not in the timed runs
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, grad_to_none=list(grad_to_none), return_mode="median"))
    times = []
    for _ in range(3):  # CPU smoke path: only checks that the script runs
        for t in grad_to_none:
            t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _attention_fn(backend: str) -> Callable:
    if backend == "vitfast":
        from vitfast.ops.attention import attention

        return lambda q, k, v: attention(q, k, v, backend="triton")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kind = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[backend]

    def run(q, k, v):
        with sdpa_kernel([kind]):
            return F.scaled_dot_product_attention(q, k, v)

    return run


def _skip_reason(backend: str, B: int, H: int, N: int, D: int, dtype: torch.dtype, device: str) -> Optional[str]:
    if backend == "math" and device == "cuda":
        # scores, probabilities and their gradients: ~4 N x N tensors (fp32 softmax in backward)
        need = 4 * B * H * N * N * 4
        free, _ = torch.cuda.mem_get_info()
        if need > MATH_MEMORY_FRACTION * free:
            return f"skipped: math needs ~{need / 2**30:.0f} GiB of N x N tensors, {free / 2**30:.0f} GiB free"
    return None


def bench_one(backend: str, shape: tuple, dtype: torch.dtype, modes: Iterable[str], device: str) -> list[dict]:
    """Rows for one backend at one shape and dtype (one per mode)."""
    B, H, N, D = shape
    base = dict(op="attention", backend=backend, B=B, H=H, N=N, D=D, dtype=str(dtype).replace("torch.", ""))
    modes = list(modes)
    skip = _skip_reason(backend, B, H, N, D, dtype, device)
    if skip:
        return [dict(base, mode=m, status=skip, ms=None, tflops=None) for m in modes]
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype, generator=g).requires_grad_() for _ in range(3))
    dout = torch.randn(B, H, N, D, device=device, dtype=dtype, generator=g)
    fn = _attention_fn(backend)
    rows = []
    try:
        out = fn(q, k, v)
    except Exception as e:  # e.g. a backend that does not take this head dim: say so in the row
        msg = f"unsupported: {type(e).__name__}: {' '.join(str(e).split())[:240]}"
        return [dict(base, mode=m, status=msg, ms=None, tflops=None) for m in modes]
    for mode in modes:
        if mode == "fwd":
            def run():
                with torch.no_grad():
                    fn(q, k, v)
        elif mode == "bwd":
            out = fn(q, k, v)

            def run():
                out.backward(dout, retain_graph=True)
        else:
            def run():
                fn(q, k, v).backward(dout)
        ms = _median_ms(run, (q, k, v), device)
        tflops = attention_flops(B, H, N, D, mode) / (ms * 1e-3) / 1e12
        row = dict(base, mode=mode, status="ok", ms=round(ms, 4), tflops=round(tflops, 2) if tflops >= 1 else round(tflops, 6))
        if backend == "vitfast":
            row["configs"] = _chosen_configs()
        rows.append(row)
    del out
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def _config_str(c) -> Optional[str]:
    if c is None:
        return None
    kw = c.kwargs
    return f"{kw['BLOCK_M']}x{kw['BLOCK_N']} tail {kw['TAIL']}, {c.num_warps} warps, {c.num_stages} stages"


def _chosen_configs() -> dict:
    """The tiles the autotuner picked last (the interpreter uses a fixed config)."""
    from vitfast.ops import _attention_kernels as K

    if K.INTERPRET:
        return {"all": str(K.INTERPRET_CONFIG)}
    return {name: _config_str(getattr(t, "best_config", None)) for name, t in
            (("fwd", K._attn_fwd_tuned), ("dkdv", K._attn_bwd_dkdv_tuned), ("dq", K._attn_bwd_dq_tuned))}


def tile_rows(shape: tuple, dtype: torch.dtype, device: str) -> list[dict]:
    """Forward TFLOP/s of every forward tile config that fits, at one shape: how much the
    tile choice matters at short N. ``work`` is computed scores over useful scores (N^2)."""
    from vitfast.ops import _attention_kernels as K

    B, H, N, D = shape
    q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype) for _ in range(3))
    out, lse = torch.empty_like(q), torch.empty(B, H, N, device=device)
    rows = []
    for c in K._FWD_CONFIGS:
        bm, bn, tail = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["TAIL"]
        if not K._fits("fwd", bm, bn, K.block_d(D), c.num_warps, c.num_stages, q.element_size()):
            continue
        rows_done = -(-N // bm) * bm
        cols_done = N // bn * bn + -(-(N % bn) // tail) * tail
        config = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
        ms = _median_ms(lambda: K.launch_fwd(q, k, v, out, lse, D**-0.5, config=config), (), device)
        rows.append(dict(op="attention_fwd_tile", backend="vitfast", B=B, H=H, N=N, D=D,
                         dtype=str(dtype).replace("torch.", ""), mode="fwd", status="ok", config=_config_str(c),
                         work=round(rows_done * cols_done / (N * N), 3), ms=round(ms, 4),
                         tflops=round(attention_flops(B, H, N, D, "fwd") / (ms * 1e-3) / 1e12, 2)))
    return rows


def collect_rows(shapes: Sequence[tuple] = VIT_SHAPES, dtypes: Sequence[str] = ("bf16", "fp16"),
                 modes: Sequence[str] = MODES, backends: Sequence[str] = ("vitfast",) + SDPA_BACKENDS,
                 device: Optional[str] = None) -> list[dict]:
    """Benchmark every (shape, dtype, backend) and return JSON-able rows, each stamped
    with the device, versions, date and command line."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    env = environment()
    rows = []
    for shape in shapes:
        for dtype_name in dtypes:
            for backend in backends:
                for row in bench_one(backend, tuple(shape), DTYPES[dtype_name], modes, device):
                    rows.append({**row, **env})
    _add_speedups(rows)
    return rows


def _add_speedups(rows: list[dict]) -> None:
    """vitfast rows get ``vs_best_sdpa``: its TFLOP/s over the fastest SDPA backend's."""
    best: dict = {}
    for r in rows:
        if r["backend"] != "vitfast" and r["tflops"]:
            key = (r["B"], r["H"], r["N"], r["D"], r["dtype"], r["mode"])
            if r["tflops"] > best.get(key, (0, None))[0]:
                best[key] = (r["tflops"], r["backend"])
    for r in rows:
        key = (r["B"], r["H"], r["N"], r["D"], r["dtype"], r["mode"])
        if r["backend"] == "vitfast" and r["tflops"] and key in best:
            r["best_sdpa"] = best[key][1]
            r["vs_best_sdpa"] = round(r["tflops"] / best[key][0], 3)


def format_table(rows: list[dict]) -> str:
    header = f"{'B':>4} {'H':>3} {'N':>5} {'D':>4} {'dtype':>8} {'mode':>8} {'backend':>10} {'ms':>9} {'TFLOP/s':>8}  note"
    lines = [header, "-" * len(header)]
    for r in rows:
        ms = f"{r['ms']:.3f}" if r["ms"] is not None else "-"
        tf = f"{r['tflops']:.1f}" if r["tflops"] is not None else "-"
        note = r["status"] if r["status"] != "ok" else (
            f"{r['vs_best_sdpa']:.2f}x {r['best_sdpa']}" if "vs_best_sdpa" in r else "")
        lines.append(f"{r['B']:>4} {r['H']:>3} {r['N']:>5} {r['D']:>4} {r['dtype']:>8} {r['mode']:>8} "
                     f"{r['backend']:>10} {ms:>9} {tf:>8}  {note}")
    if rows:
        lines.append(f"device: {rows[0]['device']}; torch {rows[0]['torch']}, triton {rows[0]['triton']}, "
                     f"vitfast {rows[0]['vitfast']}; {rows[0]['date']}")
    return "\n".join(lines)


def format_tiles(rows: list[dict]) -> str:
    header = f"{'B':>4} {'H':>3} {'N':>5} {'D':>4} {'dtype':>8} {'tile':>36} {'work':>6} {'ms':>9} {'TFLOP/s':>8}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['B']:>4} {r['H']:>3} {r['N']:>5} {r['D']:>4} {r['dtype']:>8} {r['config']:>36} "
                     f"{r['work']:>6.3f} {r['ms']:>9.3f} {r['tflops']:>8.1f}")
    return "\n".join(lines)


def _shape(text: str) -> tuple:
    parts = tuple(int(x) for x in text.split(","))
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"--shapes takes B,H,N,D, got {text!r}")
    return parts


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", type=_shape, nargs="+", default=None, help="B,H,N,D (default: the ViT shapes)")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp16"])
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--backends", nargs="+", choices=("vitfast",) + SDPA_BACKENDS,
                   default=["vitfast", *SDPA_BACKENDS])
    p.add_argument("--tiles", action="store_true",
                   help="also time every forward tile config at each shape (table of tile choices)")
    p.add_argument("--json", default=None, help="append the rows to this JSON file (a list of rows)")
    p.add_argument("--smoke", action="store_true",
                   help="one tiny shape in fp32 on vitfast and math (runs on the CPU under TRITON_INTERPRET=1)")
    args = p.parse_args(argv)
    if args.smoke:
        shapes, dtypes, backends = args.shapes or SMOKE_SHAPES, ["fp32"], ["vitfast", "math"]
    else:
        shapes, dtypes, backends = args.shapes or VIT_SHAPES, args.dtypes, args.backends
        if not torch.cuda.is_available():
            p.error("needs a CUDA GPU (use --smoke for a CPU check of the script)")
    rows = collect_rows(shapes, dtypes, args.modes, backends)
    print(format_table(rows))
    if args.tiles:
        env = environment()
        device = "cuda" if torch.cuda.is_available() else "cpu"
        tiles = [{**r, **env} for shape in shapes for d in dtypes for r in tile_rows(tuple(shape), DTYPES[d], device)]
        print(format_tiles(tiles))
        rows += tiles
    if args.json:
        existing = []
        if os.path.exists(args.json) and os.path.getsize(args.json):
            with open(args.json) as f:
                existing = json.load(f)
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(existing + rows, f, indent=1)
        print(f"wrote {len(rows)} rows to {args.json}")
    return rows


if __name__ == "__main__":
    main()
