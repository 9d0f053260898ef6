"""Every attention kernel candidate, timed and checked: the data to prune configs and variants by.

For each shape and dtype, every config that the autotuner of each Triton kernel (the forward
variants: the pointer kernel "fwd", and where the GPU and Triton allow TMA, "fwd_tma" and
"fwd_tma_persistent"; backward dK/dV, backward dQ, and the 5-matmul backward, deterministic "fused"
and "atomic", and where TMA serves, their TMA twins "bwd_tma" and "bwd_tma_atomic") would
try there, i.e. every survivor of its pruning, is launched on its own and timed, the candidates of one kernel alternately, round by round (CUDA events, L2
flushed before each timed call). Each candidate's result is checked against a float32 reference
(``err``: max abs error of out, of dk and dv, or of dq) beside the same error of SDPA's flash
backend in the same dtype (``sdpa_err``). ``dot_tflops`` counts the kernel's own matmuls at N^2
(forward 2, dK/dV 4, dQ 3, the 5-matmul kernels 5; tile waste not counted). Each row's ``bwd`` names
the backward variant the kernel belongs to ("split": dK/dV + dQ, "fused", "atomic", "tma",
"tma_atomic"); after them,
one ``attention_bwd_variant`` row per variant adds up its best candidates' medians (split: the
best dK/dV plus the best dQ) and marks the variant ``auto`` takes there; one
``attention_fwd_variant`` row per forward variant does the same for the forward (each row's ``fwd``
names it: "pointer", "tma", "tma_persistent"). After the candidates, one group times the
autotuned kernel (forward, backward, forward+backward) beside SDPA's flash, efficient and cuDNN
backends (rows as ``python -m vitfast.cli.kernels.attention`` writes them).

Compiling ~40 configs per head dim and dtype dominates the run, so on the GPU they are
compiled first by ``--jobs`` worker processes filling Triton's on-disk cache (the same
shapes, hence the same specialisation); the timed process then finds them compiled.

    python -m vitfast.cli.kernels.attention_candidates --json benchmarks/results/ --deadline 240
    python -m vitfast.cli.kernels.attention_candidates --shapes 256,12,197,64 --dtypes bf16
    TRITON_INTERPRET=1 python -m vitfast.cli.kernels.attention_candidates --smoke   # CPU check

``--deadline`` (seconds from the start): no new shape starts after it; the JSON is rewritten
after every shape, so a run stopped from outside keeps what it measured.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing as mp
import os
import statistics
import sys
import time
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .. import benchmarking as bu
from . import attention as ab

# In priority order (a deadline cuts the tail): the ViT lengths (197 ViT-B/16 at 224, 257 ViT-*/14
# at 224, 577 at 384, 1025 at 512) at head dims 64 and 80, batch x heads filling the GPU
# (~600k query rows), then a long sequence comparable with published FlashAttention figures.
def _vit_shapes() -> list[tuple]:
    shapes = []
    for N in (197, 257, 577, 1025):
        for D, H in ((64, 12), (80, 16)):
            shapes.append((max(1, round(256 * 12 * 197 / (H * N))), H, N, D))
    return shapes + [(8, 16, 4096, 128)]


SHAPES = _vit_shapes()
SMOKE_SHAPES = [(1, 2, 50, 32)]
KINDS = ("fwd", "fwd_tma", "fwd_tma_persistent", "dkdv", "dq", "fused", "atomic", "bwd_tma", "bwd_tma_atomic")
DOTS = {"fwd": 2, "fwd_tma": 2, "fwd_tma_persistent": 2, "dkdv": 4, "dq": 3, "fused": 5,
        "atomic": 5, "bwd_tma": 5, "bwd_tma_atomic": 5}  # matmuls of N x N x D per (batch, head)
BWD = {"fwd": None, "fwd_tma": None, "fwd_tma_persistent": None, "dkdv": "split", "dq": "split", "fused": "fused",
       "atomic": "atomic", "bwd_tma": "tma", "bwd_tma_atomic": "tma_atomic"}  # backward variant
TMA_KINDS = ("fwd_tma", "fwd_tma_persistent", "bwd_tma", "bwd_tma_atomic")  # timed where TMA serves
# forward variant of each forward kernel (ops.triton.attention.FWD_VARIANTS)
FWD = {"fwd": "pointer", "fwd_tma": "tma", "fwd_tma_persistent": "tma_persistent"}


def _config_str(c: dict) -> str:
    extra = (f" tail {c['TAIL']}" if "TAIL" in c else "") + (" ws" if c.get("WARP_SPEC") else "") + (
        f" {c['PER_SM']}/SM" if "PER_SM" in c else "")
    return f"{c['BLOCK_M']}x{c['BLOCK_N']}{extra}, {c['num_warps']} warps, {c['num_stages']} stages"


def _kinds(q: torch.Tensor) -> list[str]:
    """The kernels timed at q's shape: every backward one, and every forward variant that can serve
    it here (the TMA ones need sm_90 and a Triton with device-side descriptors)."""
    from ...ops.triton import attention as K

    tma_ok = not K.tma_bwd_not_supported_reasons(q, q, q, q, q, q)
    return [k for k in KINDS if k not in TMA_KINDS or tma_ok]


def _tensors(shape: tuple, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    B, H, N, D = shape
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v, dout = (torch.randn(B, H, N, D, device=device, dtype=dtype, generator=g) for _ in range(4))
    return dict(q=q, k=k, v=v, dout=dout)


def _launchers(t: dict, scale: float) -> dict[str, Callable[[dict], tuple]]:
    """kind -> function(config) launching that kernel alone, returning what it wrote."""
    from ...ops.triton import attention as K

    q, k, v, dout = t["q"], t["k"], t["v"], t["dout"]
    B, H, N, D = q.shape
    out, lse = torch.empty_like(q), torch.empty(B, H, N, device=q.device, dtype=torch.float32)
    first = K.candidate_configs("fwd", q)[0]
    K.launch_fwd(q, k, v, out, lse, scale, config=first, variant="pointer")  # lse and delta for the backward
    delta = K.launch_bwd_preprocess(out, dout)
    o2, dq, dk, dv = (torch.empty_like(q) for _ in range(4))
    lse2 = torch.empty_like(lse)  # the candidates' own: lse stays the backward kernels' input

    def fwd(c, variant="pointer"):
        K.launch_fwd(q, k, v, o2, lse2, scale, config=c, variant=variant)
        return (o2,)

    def dkdv(c):
        K.launch_bwd_dkdv(dout, q, k, v, lse, delta, dk, dv, scale, config=c)
        return dk, dv

    def dq_(c):
        K.launch_bwd_dq(dout, q, k, v, lse, delta, dq, scale, config=c)
        return (dq,)

    def fused(c, atomic=False):
        K.launch_bwd_fused(dout, q, k, v, lse, delta, dq, dk, dv, scale, config=c, atomic=atomic)
        return dq, dk, dv

    def tma(c, atomic=False):
        K._launch_bwd_tma(dout, q, k, v, lse, delta, dq, dk, dv, scale, config=c, atomic=atomic)
        return dq, dk, dv

    return {"fwd": fwd, "fwd_tma": lambda c: fwd(c, "tma"), "fwd_tma_persistent": lambda c: fwd(c, "tma_persistent"),
            "dkdv": dkdv, "dq": dq_, "fused": fused, "atomic": lambda c: fused(c, atomic=True),
            "bwd_tma": tma, "bwd_tma_atomic": lambda c: tma(c, atomic=True)}


def _reference(t: dict, scale: float, device: str) -> dict:
    """float32 out, dq, dk, dv, and SDPA flash's (or, on the CPU, math's) in the input dtype."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run(dtype, backends):
        q, k, v = (t[n].detach().to(dtype).requires_grad_() for n in ("q", "k", "v"))
        with sdpa_kernel(backends):
            out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        out.backward(t["dout"].to(dtype))
        return dict(out=out.detach(), dq=q.grad, dk=k.grad, dv=v.grad)

    fp32 = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH] if device == "cuda" else [SDPBackend.MATH]
    low = [SDPBackend.FLASH_ATTENTION] if device == "cuda" else [SDPBackend.MATH]
    dtype = t["q"].dtype
    return {"ref": run(torch.float32, fp32), "sdpa": run(dtype, low if dtype != torch.float32 else fp32)}


_OUTPUTS = {"fwd": ("out",), "fwd_tma": ("out",), "fwd_tma_persistent": ("out",), "dkdv": ("dk", "dv"),
            "dq": ("dq",), "fused": ("dq", "dk", "dv"), "atomic": ("dq", "dk", "dv"), "bwd_tma": ("dq", "dk", "dv"),
            "bwd_tma_atomic": ("dq", "dk", "dv")}


def _err(got: Sequence[torch.Tensor], names: Sequence[str], ref: dict) -> float:
    return max((g.float() - ref[n].float()).abs().max().item() for g, n in zip(got, names))


# ------------------------------------------------------------------ parallel compile
def _compile_worker(tasks: Sequence[tuple[tuple, str, str, dict]], device: str = "cuda") -> tuple[int, list[str]]:
    """In a worker process: launch every (shape, dtype, kind, config) once with batch 1 (the
    same specialisation as the timed run: strides and lengths), so Triton's cache holds it."""
    import vitfast  # noqa: F401  (registers the ops)

    launchers: dict = {}
    failed = []
    for shape, dtype_name, kind, c in tasks:
        _, H, N, D = shape
        if (shape, dtype_name) not in launchers:
            launchers[(shape, dtype_name)] = _launchers(_tensors((1, H, N, D), ab.DTYPES[dtype_name], device), D**-0.5)
        try:
            launchers[(shape, dtype_name)][kind](c)
        except Exception as e:  # reported by the timed run, which launches it again
            failed.append(f"{kind} {_config_str(c)}: {type(e).__name__}")
    if device == "cuda":
        torch.cuda.synchronize()
    return len(tasks), failed


def _specialisation(shape: tuple, dtype_name: str) -> tuple:
    """What Triton compiles a separate kernel for, besides the config: ints are specialised on
    being divisible by 16 (H, N; the strides N*D and H*N*D are at D = 64, 80, 128) or 1."""
    _, H, N, D = shape
    return (H % 16 == 0, H == 1, N % 16 == 0, N == 1, D, dtype_name)


def precompile(groups: Sequence[tuple[tuple, str]], jobs: int, deadline: Optional[float], device: str = "cuda") -> str:
    """Compile every candidate of every (shape, dtype) group in ``jobs`` processes (each
    kernel once: groups that compile to the same kernel share it); a summary line."""
    from ...ops.triton import attention as K

    seen, work = set(), []
    for shape, dtype_name in groups:
        _, H, N, D = shape
        q = torch.empty(1, H, N, D, dtype=ab.DTYPES[dtype_name], device=device)
        for kind in _kinds(q):
            for c in K.candidate_configs(kind, q):
                key = (_specialisation(shape, dtype_name), kind, tuple(sorted(c.items())))
                if key not in seen:
                    seen.add(key)
                    work.append((shape, dtype_name, kind, c))
    chunks = [work[i::jobs] for i in range(jobs) if work[i::jobs]]
    t0, done, failed = time.perf_counter(), 0, []
    with cf.ProcessPoolExecutor(max_workers=len(chunks) or 1, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(_compile_worker, chunk, device) for chunk in chunks]
        timeout = None if deadline is None else max(1.0, deadline - time.monotonic())
        try:
            for f in cf.as_completed(futures, timeout=timeout):
                try:
                    n, bad = f.result()
                    done, failed = done + n, failed + bad
                except Exception as e:  # a worker died: the timed run compiles what is missing
                    failed.append(f"worker: {type(e).__name__}: {e}")
        except cf.TimeoutError:
            failed.append("deadline reached while compiling")
            for f in futures:
                f.cancel()
    msg = f"precompiled {done} of {len(work)} kernels on {len(chunks)} processes in {time.perf_counter() - t0:.0f} s"
    return msg + (f"; {len(failed)} failed: " + "; ".join(failed[:5]) if failed else "")


# ------------------------------------------------------------------------- timing
def candidate_rows(shape: tuple, dtype: torch.dtype, device: str, warmup: int, iters: int) -> list[dict]:
    """One row per (kernel, candidate config) at one shape and dtype."""
    from ...ops.triton import attention as K

    B, H, N, D = shape
    scale = D**-0.5
    t = _tensors(shape, dtype, device)
    refs = _reference(t, scale, device)
    launch = _launchers(t, scale)
    flush = ab._l2_flush(device)
    base = dict(op="attention_candidate", backend="vitfast", B=B, H=H, N=N, D=D,
                dtype=str(dtype).replace("torch.", ""))
    rows = []
    for kind in _kinds(t["q"]):
        names = _OUTPUTS[kind]
        configs = K.candidate_configs(kind, t["q"])
        steps, results = {}, {}
        for c in configs:
            name = _config_str(c)
            try:
                got = launch[kind](c)  # compiles (or finds the precompiled kernel) and checks
                results[name] = dict(config=c, err=_err(got, names, refs["ref"]))
                steps[name] = lambda i, c=c, kind=kind: launch[kind](c)
            except Exception as e:
                results[name] = dict(config=c, status=f"failed: {type(e).__name__}: {' '.join(str(e).split())[:200]}")
        times = bu.time_alternating(steps, warmup=warmup, iters=iters, device=torch.device(device),
                                    between=flush) if steps else {}
        sdpa_err = _err([refs["sdpa"][n] for n in names], names, refs["ref"])
        flops = DOTS[kind] * 2.0 * B * H * N * N * D
        medians = {n: statistics.median(ts) for n, ts in times.items()}
        best = min(medians, key=medians.get) if medians else None
        for name, r in results.items():
            row = dict(base, mode=kind, kernel=kind, bwd=BWD[kind], fwd=FWD.get(kind), config=name,
                       **{k: r["config"][k] for k in r["config"]})
            if name in medians:
                ms = medians[name]
                row.update(status="ok", ms=round(ms, 4), dot_tflops=round(flops / (ms * 1e-3) / 1e12, 3),
                           err=r["err"], sdpa_err=sdpa_err, best=name == best,
                           x_best=round(ms / medians[best], 3), first=name == _config_str(configs[0]))
            else:
                row.update(status=r["status"], ms=None)
            rows.append(row)
    auto_fwd = K.forward_variant(t["q"], t["k"], t["v"], torch.empty_like(t["q"]), "auto")
    return rows + variant_rows(rows, K.backward_variant(t["q"], "auto")) + forward_variant_rows(rows, auto_fwd)


def variant_rows(rows: list[dict], auto: str) -> list[dict]:
    """One row per backward variant: the sum of its kernels' best candidate medians (the shared
    delta pre-pass not counted), ``x_best`` against the fastest variant, and ``auto`` marking the
    variant that ``backward_variant`` takes at this shape."""
    best: dict = {}
    for r in rows:
        if r.get("bwd") and r.get("ms") is not None:
            best[r["kernel"]] = min(best.get(r["kernel"], float("inf")), r["ms"])
    parts = {"split": ("dkdv", "dq"), **{v: (k,) for k, v in BWD.items() if v not in (None, "split")}}
    ms = {v: sum(best[k] for k in ks) for v, ks in parts.items() if all(k in best for k in ks)}
    if not rows or not ms:
        return []
    fastest = min(ms.values())
    base = {k: rows[0][k] for k in ("backend", "B", "H", "N", "D", "dtype")}
    return [dict(base, op="attention_bwd_variant", mode="bwd", kernel="+".join(parts[v]), bwd=v, status="ok",
                 ms=round(t, 4), x_best=round(t / fastest, 3), best=t == fastest, auto=v == auto)
            for v, t in ms.items()]


def forward_variant_rows(rows: list[dict], auto: str) -> list[dict]:
    """One row per forward variant timed: its best candidate's median, ``x_best`` against the fastest
    variant, and ``auto`` marking the variant that ``forward_variant`` takes at this shape."""
    best: dict = {}
    for r in rows:
        if r.get("fwd") and r.get("ms") is not None:
            best[r["fwd"]] = min(best.get(r["fwd"], float("inf")), r["ms"])
    if not best:
        return []
    fastest = min(best.values())
    base = {k: rows[0][k] for k in ("backend", "B", "H", "N", "D", "dtype")}
    return [dict(base, op="attention_fwd_variant", mode="fwd", kernel=kind, fwd=v, status="ok", ms=round(t, 4),
                 x_best=round(t / fastest, 3), best=t == fastest, auto=v == auto)
            for kind, v in FWD.items() if (t := best.get(v)) is not None]


def autotuned_rows(shape: tuple, dtype: torch.dtype, device: str) -> list[dict]:
    """The autotuned kernel beside SDPA's backends (forward, backward, forward+backward), and the
    config the autotuner picked for each kernel."""
    from ...ops.triton import attention as K

    backends = ["vitfast", "flash", "efficient", "cudnn"] if device == "cuda" else ["vitfast", "math"]
    rows = ab.bench_group(backends, shape, dtype, ab.MODES, device)
    ab._add_speedups(rows)
    picked = {kind: (_config_str(c) if (c := K.tuned_config(kind)) else None) for kind in KINDS}
    variant = K.backward_variant(torch.empty(1, 1, 1, 1, device=device).expand(*shape))
    for r in rows:
        if r["backend"] == "vitfast":
            r["configs"] = picked
            r["bwd"] = variant  # the backward these rows ran (auto's choice, or VITFAST_ATTENTION_BWD)
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    start = time.monotonic()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", type=ab._shape, nargs="+", default=None, help="B,H,N,D (default: the ViT shapes)")
    p.add_argument("--dtypes", nargs="+", choices=sorted(ab.DTYPES), default=["bf16", "fp16"])
    p.add_argument("--json", default=None, help="write the rows here (a folder: <date>_<device>_attention_candidates.json)")
    p.add_argument("--deadline", type=float, default=None, help="seconds from the start after which no new shape starts")
    p.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1),
                   help="processes compiling the candidates first (GPU; 0: compile in the timed process)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--no-autotuned", action="store_true", help="skip the autotuned-vs-SDPA rows")
    bu.add_noise_args(p)
    p.add_argument("--smoke", action="store_true", help="one tiny shape in fp32 (runs on the CPU under TRITON_INTERPRET=1)")
    args = p.parse_args(argv)
    if not bu.triton_runs_here(p.prog, ab._interpreted()):
        return 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke:
        shapes, dtypes = args.shapes or SMOKE_SHAPES, ["fp32"]
    else:
        shapes, dtypes = args.shapes or SHAPES, args.dtypes
        if device != "cuda":
            p.error("needs a CUDA GPU (use --smoke for a CPU check of the script)")
    gpu = device == "cuda"
    warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    iters = args.iters if args.iters is not None else (15 if gpu else 2)
    deadline = None if args.deadline is None else start + args.deadline
    groups = [(tuple(s), d) for d in dtypes for s in shapes]  # every shape in one dtype first
    env = bu.env_info(torch.device(device), argv, prog="python -m vitfast.cli.kernels.attention_candidates")
    env["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "0")
    json_path = bu.results_path(args.json, env, "attention_candidates") if args.json else None
    rows: list[dict] = []
    notes: dict = {}
    try:
        with bu.load_guard(env, "attention_candidates", allow_noisy=args.allow_noisy, writes=bool(args.json),
                           device=torch.device(device)):
            if gpu and args.jobs > 0:
                notes["precompile"] = precompile(groups, args.jobs, deadline)
                print(notes["precompile"], flush=True)
            for shape, d in groups:
                if deadline is not None and time.monotonic() > deadline:
                    notes.setdefault("skipped", []).append(f"{shape} {d}")
                    continue
                t0 = time.perf_counter()
                group = candidate_rows(shape, ab.DTYPES[d], device, warmup, iters)
                if not args.no_autotuned:
                    group += autotuned_rows(shape, ab.DTYPES[d], device)
                rows += [{**env, **r} for r in group]
                print(format_table(group), f"\n({time.perf_counter() - t0:.1f} s)", flush=True)
                if json_path:  # after every shape: a run stopped from outside keeps what it measured
                    bu.write_json(json_path, "attention_candidates", env, rows, smoke=args.smoke, **notes)
    except bu.NoisyMachine as e:
        print(e, file=sys.stderr)
        return bu.EXIT_NOISY
    if notes.get("skipped"):
        print(f"deadline: not measured: {', '.join(notes['skipped'])}")
    if json_path and rows:
        print(f"wrote {len(rows)} rows to {bu.write_json(json_path, 'attention_candidates', env, rows, smoke=args.smoke, **notes)}")
    return 0


def format_table(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        head = f"{r['B']:>4} {r['H']:>3} {r['N']:>5} {r['D']:>4} {r['dtype']:>8} {r['mode']:>8}"
        if r["op"] in ("attention_bwd_variant", "attention_fwd_variant"):
            mark = "*" if r["best"] else " "
            name = "bwd " + r["bwd"] if r["op"] == "attention_bwd_variant" else "fwd " + r["fwd"]
            lines.append(f"{head} {name + (' (auto)' if r['auto'] else ''):>36}{mark} {r['ms']:9.4f} ms "
                         f"{'':>16} x{r['x_best']}")
            continue
        if r["op"] == "attention_candidate":
            if r["status"] != "ok":
                lines.append(f"{head} {r['config']:>36}  {r['status'][:80]}")
                continue
            mark = "*" if r["best"] else " "
            lines.append(f"{head} {r['config']:>36}{mark} {r['ms']:9.4f} ms {r['dot_tflops']:8.1f} TFLOP/s "
                         f"x{r['x_best']:<6} err {r['err']:.2e} (sdpa {r['sdpa_err']:.2e})")
        else:
            ms = f"{r['ms']:9.4f} ms" if r.get("ms") is not None else "-"
            note = r["status"] if r["status"] != "ok" else (
                f"{r['vs_best_sdpa']:.2f}x {r['best_sdpa']}" if "vs_best_sdpa" in r else "")
            lines.append(f"{head} {r['backend']:>36}  {ms} {r.get('tflops') or 0:8.1f} TFLOP/s  {note}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
