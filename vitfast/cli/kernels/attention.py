"""Attention throughput: vitfast's Triton kernel against every torch SDPA backend.

TFLOP/s with the usual convention: forward 4*B*H*N^2*D FLOPs, backward 2.5x that,
forward+backward 3.5x. At each shape, dtype and mode the backends are timed alternately,
round by round (CUDA events, L2 flushed before each timed call, as ``triton.testing.do_bench``
does), after a warm-up call that also runs the autotuner; each row gives the median time and
vitfast's rows the median of the per-round ratios (``speedup_vs_<backend>``). Backends that
cannot run a shape are reported with their reason, never dropped.

    python -m vitfast.cli.kernels.attention                      # the ViT shapes, bf16 + fp16
    python -m vitfast.cli.kernels.attention --json benchmarks/results/
    python -m vitfast.cli.kernels.attention --shapes 8,12,197,64 --dtypes bf16 --modes fwd
    python -m vitfast.cli.kernels.attention --tiles --shapes 256,12,197,64 --dtypes bf16   # tile choices
    TRITON_INTERPRET=1 python -m vitfast.cli.kernels.attention --smoke   # CPU check of the script

``collect_rows(...)`` returns the JSON-able rows (used by ``vitfast bench kernels``);
``main(argv)`` prints a table and writes ``--json`` (refused on a busy machine unless
``--allow-noisy``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

from .. import benchmarking as bu

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


def _l2_flush(device: str) -> Optional[Callable[[], None]]:
    """On the GPU, a function that evicts L2 (as ``triton.testing.do_bench`` does), else None."""
    if device != "cuda":
        return None
    buf = torch.empty(256 * 2**20, dtype=torch.int8, device=device)
    return buf.zero_


def _attention_fn(backend: str) -> Callable:
    if backend == "vitfast":
        from ...ops.attention import attention

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


def _prepare(backend: str, shape: tuple, dtype: torch.dtype, device: str) -> dict:
    """Inputs and function of one backend, checked with one call: {"fn", "q", "k", "v", "dout"},
    or {"status": why it cannot run}."""
    B, H, N, D = shape
    skip = _skip_reason(backend, B, H, N, D, dtype, device)
    if skip:
        return {"status": skip}
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype, generator=g).requires_grad_() for _ in range(3))
    dout = torch.randn(B, H, N, D, device=device, dtype=dtype, generator=g)
    fn = _attention_fn(backend)
    try:
        fn(q, k, v)  # compiles and autotunes here, outside the timed runs
    except Exception as e:  # e.g. a backend that does not take this head dim: say so in the row
        return {"status": f"unsupported: {type(e).__name__}: {' '.join(str(e).split())[:240]}"}
    return dict(fn=fn, q=q, k=k, v=v, dout=dout)


def _step(p: dict, mode: str) -> Callable[[int], None]:
    fn, q, k, v, dout = p["fn"], p["q"], p["k"], p["v"], p["dout"]
    if mode == "fwd":
        def step(i):
            with torch.no_grad():
                fn(q, k, v)
    elif mode == "bwd":
        out = fn(q, k, v)

        def step(i):
            out.backward(dout, retain_graph=True)
    else:
        def step(i):
            fn(q, k, v).backward(dout)
    return step


def bench_group(backends: Sequence[str], shape: tuple, dtype: torch.dtype, modes: Iterable[str], device: str,
                warmup: Optional[int] = None, iters: Optional[int] = None) -> list[dict]:
    """Rows for every backend at one shape and dtype (one per backend and mode, in that order).
    In each mode the backends are timed alternately, round by round (L2 flushed before each
    timed call on the GPU); vitfast's rows get ``speedup_vs_<backend>``, the median of the
    per-round ratios."""
    B, H, N, D = shape
    gpu = device == "cuda"
    warmup = warmup if warmup is not None else (5 if gpu else 1)
    iters = iters if iters is not None else (30 if gpu else 3)
    base = dict(op="attention", B=B, H=H, N=N, D=D, dtype=str(dtype).replace("torch.", ""))
    prepared = {b: _prepare(b, shape, dtype, device) for b in backends}
    flush = _l2_flush(device)
    leaves = [t for p in prepared.values() if "fn" in p for t in (p["q"], p["k"], p["v"])]

    def between():
        for t in leaves:
            t.grad = None
        if flush:
            flush()

    rows: dict = {(b, m): None for b in backends for m in modes}
    for mode in modes:
        steps = {b: _step(p, mode) for b, p in prepared.items() if "fn" in p}
        times = bu.time_alternating(steps, warmup=warmup, iters=iters, device=torch.device(device), between=between)
        group = []
        for b in backends:
            row = dict(base, backend=b, mode=mode)
            if b not in times:
                row.update(status=prepared[b]["status"], ms=None, tflops=None)
            else:
                ms = statistics.median(times[b])
                tflops = attention_flops(B, H, N, D, mode) / (ms * 1e-3) / 1e12
                row.update(status="ok", ms=round(ms, 4), tflops=float(f"{tflops:.4g}"))  # 4 significant digits: never 0
                if b == "vitfast":
                    row["configs"] = _chosen_configs()
                    if mode != "fwd":  # the backward that ran (backward_variant's choice at this shape)
                        from ...ops.triton import attention as K

                        row["bwd"] = K.backward_variant(prepared[b]["q"])
            rows[(b, mode)] = row
            group.append(row)
        bu.add_paired_speedups(group, times, key="backend")
        del steps
    del prepared
    if gpu:
        torch.cuda.empty_cache()
    return list(rows.values())


def _config_str(c) -> Optional[str]:
    if c is None:
        return None
    kw = c.kwargs
    return f"{kw['BLOCK_M']}x{kw['BLOCK_N']} tail {kw['TAIL']}, {c.num_warps} warps, {c.num_stages} stages"


def _chosen_configs() -> dict:
    """The tiles the autotuner picked last (the interpreter uses a fixed config)."""
    from ...ops.triton import attention as K

    if K.INTERPRET:
        return {"all": str(K.INTERPRET_CONFIG)}
    return {name: _config_str(getattr(t, "best_config", None)) for name, t in K._TUNED.items()}


def tile_rows(shape: tuple, dtype: torch.dtype, device: str) -> list[dict]:
    """Forward TFLOP/s of every forward tile config that fits, at one shape: how much the
    tile choice matters at short N. ``work`` is computed scores over useful scores (N^2)."""
    from ...ops.triton import attention as K

    B, H, N, D = shape
    q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype) for _ in range(3))
    out, lse = torch.empty_like(q), torch.empty(B, H, N, device=device)
    steps, meta = {}, {}
    for c in K._FWD_CONFIGS:
        bm, bn, tail = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["TAIL"]
        if not K._fits("fwd", bm, bn, K.block_d(D), c.num_warps, c.num_stages, q.element_size()):
            continue
        rows_done = -(-N // bm) * bm
        cols_done = N // bn * bn + -(-(N % bn) // tail) * tail
        config = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
        name = _config_str(c)
        steps[name] = lambda i, config=config: K.launch_fwd(q, k, v, out, lse, D**-0.5, config=config)
        steps[name](0)  # compiles
        meta[name] = round(rows_done * cols_done / (N * N), 3)
    gpu = device == "cuda"
    times = bu.time_alternating(steps, warmup=2, iters=20 if gpu else 2, device=torch.device(device),
                                between=_l2_flush(device))
    rows = []
    for name, ts in times.items():
        ms = statistics.median(ts)
        rows.append(dict(op="attention_fwd_tile", backend="vitfast", B=B, H=H, N=N, D=D,
                         dtype=str(dtype).replace("torch.", ""), mode="fwd", status="ok", config=name,
                         work=meta[name], ms=round(ms, 4),
                         tflops=round(attention_flops(B, H, N, D, "fwd") / (ms * 1e-3) / 1e12, 2)))
    return rows


def collect_rows(shapes: Sequence[tuple] = VIT_SHAPES, dtypes: Sequence[str] = ("bf16", "fp16"),
                 modes: Sequence[str] = MODES, backends: Sequence[str] = ("vitfast",) + SDPA_BACKENDS,
                 device: Optional[str] = None, argv: Optional[Sequence[str]] = None, allow_noisy: bool = True,
                 writes: bool = False, env_out: Optional[dict] = None) -> list[dict]:
    """Benchmark every (shape, dtype, backend) and return JSON-able rows, each stamped
    with the device, versions, date and command line. With ``writes`` and not
    ``allow_noisy``, a busy machine raises ``bu.NoisyMachine``."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    env = bu.env_info(torch.device(device), argv, prog="python -m vitfast.cli.kernels.attention")
    env["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "0")
    rows = []
    with bu.load_guard(env, "bench_attention", allow_noisy=allow_noisy, writes=writes, device=torch.device(device)):
        for shape in shapes:
            for dtype_name in dtypes:
                rows += bench_group(backends, tuple(shape), DTYPES[dtype_name], modes, device)
    _add_speedups(rows)
    if env_out is not None:
        env_out.update(env)
    return [{**env, **r} for r in rows]


def _add_speedups(rows: list[dict]) -> None:
    """vitfast rows get ``best_sdpa`` (the SDPA backend with the highest median TFLOP/s) and
    ``vs_best_sdpa``, the median of the per-round ratios of its time to vitfast's."""
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
            # the per-round ratio to that backend (timed alternately), not a ratio of medians
            r["vs_best_sdpa"] = r.get(f"speedup_vs_{best[key][1]}", round(r["tflops"] / best[key][0], 3))


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


def _interpreted() -> bool:
    from ...ops.triton import attention as kernels

    return kernels.INTERPRET


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", type=_shape, nargs="+", default=None, help="B,H,N,D (default: the ViT shapes)")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp16"])
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--backends", nargs="+", choices=("vitfast",) + SDPA_BACKENDS,
                   default=["vitfast", *SDPA_BACKENDS])
    p.add_argument("--tiles", action="store_true",
                   help="also time every forward tile config at each shape (table of tile choices)")
    p.add_argument("--json", default=None, help="write the rows here (a folder: <date>_<device>_attention.json)")
    bu.add_noise_args(p)
    p.add_argument("--smoke", action="store_true",
                   help="one tiny shape in fp32 on vitfast and math (runs on the CPU under TRITON_INTERPRET=1)")
    args = p.parse_args(argv)
    if not bu.triton_runs_here(p.prog, _interpreted()):
        return 2
    if args.smoke:
        shapes, dtypes, backends = args.shapes or SMOKE_SHAPES, ["fp32"], ["vitfast", "math"]
    else:
        shapes, dtypes, backends = args.shapes or VIT_SHAPES, args.dtypes, args.backends
        if not torch.cuda.is_available():
            p.error("needs a CUDA GPU (use --smoke for a CPU check of the script)")
    env: dict = {}
    try:
        rows = collect_rows(shapes, dtypes, args.modes, backends, argv=argv, allow_noisy=args.allow_noisy,
                            writes=bool(args.json), env_out=env)
    except bu.NoisyMachine as e:
        print(e, file=sys.stderr)
        return bu.EXIT_NOISY
    print(format_table(rows))
    if args.tiles:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        tiles = [{**env, **r} for shape in shapes for d in dtypes for r in tile_rows(tuple(shape), DTYPES[d], device)]
        print(format_tiles(tiles))
        rows += tiles
    if args.json:
        print(f"wrote {len(rows)} rows to {bu.write_json(args.json, 'attention', env, rows, smoke=args.smoke)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
