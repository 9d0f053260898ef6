"""What every vitfast benchmark shares: the environment record, timing, FLOPs, the measured peak.

* :func:`env_info` -- the facts each JSON row carries: device name and kind, CPU threads,
  torch/triton/timm/vitfast versions, date (UTC), the exact command line.
* :func:`time_steps` -- warm-up, then one timing per step: CUDA events on the GPU,
  ``time.perf_counter`` on the CPU; :func:`summarize_ms` gives the median and spread.
* :func:`time_alternating` -- several implementations timed in turn, iteration by iteration,
  so that each sees the same machine; :func:`paired_speedup` is the median of the per-pair
  ratios (steadier than the ratio of two medians when the load drifts).
* :func:`check_load` / :func:`finish_load_check` -- a benchmark refuses to write results
  measured while the 1-minute load average exceeds the number of cores, unless
  ``--allow-noisy`` (:func:`add_noise_args`) is given; then every row says ``noisy: true``.
* :func:`steady_cpu_malloc` -- CPU runs keep freed memory in glibc's heap (``--cpu-malloc``,
  :func:`add_cpu_malloc_arg`), so that page faults do not swamp CPU timings; each CPU row records
  its median minor ``page_faults`` per step.
* :func:`vit_forward_flops` / :func:`vit_step_flops` -- analytic matmul FLOPs of a ViT
  (timm's or FastViT: the same module names), the convention MFU is quoted in.
* :func:`measure_peak_tflops` -- a short square matmul on the same device and dtype (the
  microbenchmarks' reference rate); :func:`device_peak` -- the documented peak MFU is quoted
  against: on a GPU the rate of a large GEMM (8192^3) in the run's dtype, on the CPU none unless
  asked for (a 4096^3 GEMM) or given.
* :func:`results_path`, :func:`write_json`, :func:`write_csv` -- results as data.

Kernel microbenchmarks use these too, so every results file has the same shape.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import json
import os
import platform
import random
import re
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.nn as nn

__all__ = [
    "DTYPES",
    "SCHEMA",
    "env_info",
    "device_name",
    "resolve_device",
    "time_steps",
    "time_alternating",
    "paired_speedup",
    "add_paired_speedups",
    "time_group",
    "summarize_ms",
    "rel_err",
    "NoisyMachine",
    "EXIT_NOISY",
    "add_noise_args",
    "add_cpu_malloc_arg",
    "steady_cpu_malloc",
    "minor_page_faults",
    "CPU_MALLOC_MODES",
    "check_load",
    "finish_load_check",
    "load_guard",
    "machine_load",
    "own_threads",
    "triton_runs_here",
    "finish_microbench",
    "microbench_settings",
    "measured_rows",
    "vit_forward_flops",
    "vit_step_flops",
    "vit_patch_embed_flops",
    "measure_peak_tflops",
    "peak_gemm",
    "device_peak",
    "results_path",
    "write_json",
    "write_csv",
]

SCHEMA = "vitfast-bench/1"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ------------------------------------------------------------------------ environment
def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` is the GPU when one is visible, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch.cuda.is_available() is False")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {name!r}")
    return dev


def _cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_model_name()


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or broken: the record says so
        return None


def env_info(device: torch.device, argv: Optional[Sequence[str]] = None, prog: str = "vitfast bench") -> dict:
    """The facts every results row carries. ``argv`` is the command's own argument list."""
    import vitfast

    cmd = shlex.join([*prog.split(), *argv]) if argv is not None else shlex.join([sys.executable, *sys.argv])
    info = {
        "device": device_name(device),
        "device_kind": device.type,  # "cuda" or "cpu": CPU figures are labelled CPU
        "label": "CPU" if device.type == "cpu" else device_name(device),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "timm": _version("timm"),
        "vitfast": vitfast.__version__,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": cmd,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["compute_capability"] = f"{props.major}.{props.minor}"
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["allow_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
        info["cudnn_benchmark"] = bool(torch.backends.cudnn.benchmark)
    if device.type == "cpu":
        info["cpu_malloc"] = _cpu_malloc
    load = machine_load()
    if load is not None:  # other processes skew timings: keep the load next to the figures
        info["loadavg_1m"] = round(load, 2)
        info["cores"] = os.cpu_count()
    return info


# ------------------------------------------------------------------------ the CPU allocator
CPU_MALLOC_MODES = ("steady", "default")
_cpu_malloc = "default"  # what this process runs under (recorded by env_info)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def minor_page_faults() -> Optional[int]:
    """This process's minor page faults so far (None where the OS does not count them)."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except (ImportError, OSError):
        return None


def steady_cpu_malloc(mode: str = "steady") -> str:
    """``"steady"``: glibc keeps the memory a step frees for the next step (``mallopt``:
    M_MMAP_MAX = 0, so large blocks come from the heap rather than fresh mmap pages, and
    M_TRIM_THRESHOLD = 2^31 - 1, so the heap is not handed back to the kernel), for the rest of
    this process. Returns what the process now runs under, which :func:`env_info` records.

    Why: under glibc's defaults a freed block of more than 128 KB (the threshold then adapts up to
    32 MB) goes back to the kernel, and the next step's buffers are fresh pages, each zeroed by a
    page fault. On the 2-core CPU VM these results come from, a fault costs ~1.3 us; ViT-L/14's
    patch embedding (batch 4) took 3,784 faults per call one way and 996 another, depending only
    on which implementation ran before it, which made 40% of its time and reordered the
    implementations from run to run (ViT-L/14 forward: 9.6 ms vs 4.5 ms with the heap kept,
    every implementation the same way). jemalloc and tcmalloc, which PyTorch's CPU tuning guide
    recommends, keep freed memory too. Each CPU row also records its median ``page_faults``.
    Elsewhere than glibc (or with ``"default"``) nothing is changed."""
    global _cpu_malloc
    if mode not in CPU_MALLOC_MODES:
        raise ValueError(f"cpu malloc mode must be one of {', '.join(CPU_MALLOC_MODES)}, got {mode!r}")
    if mode == "default" or _cpu_malloc != "default":
        return _cpu_malloc
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):  # not glibc
        ok = False
    if ok:
        _cpu_malloc = "steady (glibc mallopt: M_MMAP_MAX=0, M_TRIM_THRESHOLD=2^31-1)"
    return _cpu_malloc


def add_cpu_malloc_arg(p) -> None:
    p.add_argument("--cpu-malloc", choices=CPU_MALLOC_MODES, default="steady",
                   help="steady (default): glibc keeps freed memory for the next step, so CPU timings do not "
                   "measure page faults (see vitfast.cli.benchmarking.steady_cpu_malloc); default: glibc as it is")


# ------------------------------------------------------------------------ a quiet machine
class NoisyMachine(RuntimeError):
    """The machine is too busy for trustworthy timings and ``--allow-noisy`` was not given."""


EXIT_NOISY = 75  # the exit code of a benchmark that refused to write (sysexits' EX_TEMPFAIL: try later)


def machine_load() -> Optional[float]:
    """The 1-minute load average, or None where the OS has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def add_noise_args(p) -> None:
    p.add_argument("--allow-noisy", action="store_true",
                   help="measure and write results even when the 1-minute load average exceeds the number of "
                   "cores; every row is then marked noisy: true (and left out of the README)")


def check_load(env: dict, allow_noisy: bool, prog: str, writes: bool = True) -> bool:
    """Before measuring: is the machine quiet (load average <= cores)? Records the load in
    ``env`` (``loadavg_1m_start``, ``noisy``). A busy machine raises :class:`NoisyMachine` when
    results are to be written and ``allow_noisy`` is false; otherwise the run goes on, noisy."""
    load, cores = machine_load(), os.cpu_count() or 1
    noisy = load is not None and load > cores
    env.update(loadavg_1m_start=None if load is None else round(load, 2), cores=cores, noisy=noisy)
    if noisy and writes and not allow_noisy:
        raise NoisyMachine(f"{prog}: the 1-minute load average is {load:.2f} on {cores} cores: other work would skew the "
                           "timings, so no results are written. Wait for a quiet machine, or pass --allow-noisy "
                           "(every row is then marked noisy: true and left out of the README).")
    if noisy:
        print(f"{prog}: warning: load average {load:.2f} on {cores} cores: figures are noisy", file=sys.stderr)
    return noisy


def finish_load_check(env: dict, allow_noisy: bool, prog: str, own_threads: int, writes: bool = True) -> bool:
    """After measuring: the load average less this run's own busy threads must still be under
    the core count (someone else may have started work meanwhile). Same rules as
    :func:`check_load`; updates ``env["noisy"]`` and ``env["loadavg_1m_end"]``."""
    load, cores = machine_load(), os.cpu_count() or 1
    env["loadavg_1m_end"] = None if load is None else round(load, 2)
    if load is None or load - own_threads <= cores:
        return bool(env.get("noisy"))
    if not env.get("noisy"):
        env["noisy"] = True
        if writes and not allow_noisy:
            raise NoisyMachine(f"{prog}: the 1-minute load average rose to {load:.2f} on {cores} cores during the run "
                               f"({own_threads} thread(s) of its own): no results are written. Rerun on a quiet machine, "
                               "or pass --allow-noisy.")
        print(f"{prog}: warning: load average rose to {load:.2f} during the run: figures are noisy", file=sys.stderr)
    return True


@contextlib.contextmanager
def load_guard(env: dict, prog: str, *, allow_noisy: bool, writes: bool, device: torch.device):
    """:func:`check_load` before the block (the measurements), :func:`finish_load_check` after."""
    check_load(env, allow_noisy, prog, writes)
    yield
    finish_load_check(env, allow_noisy, prog, own_threads(device), writes)


def own_threads(device: torch.device) -> int:
    """Threads this process keeps busy while timing: the CPU pool, or one host thread for a GPU."""
    return torch.get_num_threads() if device.type == "cpu" else 1


# ------------------------------------------------------------------------ timing
def _current(device: torch.device) -> contextlib.AbstractContextManager:
    """``device`` made the current CUDA device (nothing on the CPU): a CUDA event records on the
    current device's stream, and the steps' work goes to its tensors' device, so timing a model
    on ``cuda:1`` from a process whose current device is ``cuda:0`` must switch first."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def time_steps(
    step: Callable[[int], Any],
    *,
    warmup: int,
    iters: int,
    device: torch.device,
    on_step: Optional[Callable[[], None]] = None,
) -> list[float]:
    """Run ``step(i)`` ``warmup`` times, then ``iters`` timed times; milliseconds per step.

    On the GPU each step is bracketed by CUDA events (recorded on ``device``'s current stream,
    with ``device`` current, read after one synchronize at the end, so timing adds no sync
    between steps); on the CPU by ``time.perf_counter``. ``step`` gets the iteration index so it
    can rotate its inputs. ``on_step`` is called after every step (progress bars).
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    with _current(device):
        for i in range(warmup):
            step(i)
            if on_step:
                on_step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            stream = torch.cuda.current_stream(device)
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
            for i, (start, end) in enumerate(events):
                start.record(stream)
                step(warmup + i)
                end.record(stream)
                if on_step:
                    on_step()
            torch.cuda.synchronize(device)
            return [s.elapsed_time(e) for s, e in events]
        times = []
        for i in range(iters):
            t0 = time.perf_counter()
            step(warmup + i)
            times.append((time.perf_counter() - t0) * 1e3)
            if on_step:
                on_step()
        return times


def time_alternating(
    steps: Mapping[str, Callable[[int], Any]],
    *,
    warmup: int,
    iters: int,
    device: torch.device,
    on_step: Optional[Callable[[], None]] = None,
    between: Optional[Callable[[], None]] = None,
    faults: Optional[dict] = None,
) -> dict[str, list[float]]:
    """Time several implementations in turn: warm-up each, then ``iters`` rounds in which every
    implementation runs one timed step. Milliseconds per step, one list per implementation,
    aligned by round (``paired_speedup`` compares round by round).

    Implementations that run one after the other see different machines when the load drifts
    (other processes, clocks, thermals); alternating gives each the same conditions. The order
    rotates each round, so every implementation takes every position once in each block of
    len(steps) rounds; and each block starts from a fresh (seeded) shuffle, so that no
    implementation always follows the same one. (Under a fixed cyclic order, two names for the same
    CPU code path came out 0.94-0.99x in every row of a run; with the reshuffle they straddle 1.0
    in an A/B, but a full run still shows them ~1.5% apart, cause unknown: read ratios within a
    few percent of 1.0 on a CPU VM as ties.) ``between()`` runs untimed before every timed step
    (e.g. an L2 flush on the GPU). GPU events as in :func:`time_steps`: on ``device``'s current
    stream, with ``device`` current. On the CPU, ``faults`` (a dict), if given, receives each
    timed step's minor page faults, aligned as the times (see :func:`steady_cpu_malloc`).
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    names = list(steps)
    cuda = device.type == "cuda"
    events: dict = {name: [] for name in names}
    times: dict = {name: [] for name in names}
    with _current(device):
        for i in range(warmup):
            for name in names:
                steps[name](i)
                if on_step:
                    on_step()
        if cuda:
            torch.cuda.synchronize(device)
            stream = torch.cuda.current_stream(device)
        n = len(names)
        base = names
        for r in range(iters):
            if r % n == 0 and r:  # a new block: a new cyclic order (the first block keeps the given one)
                base = names[:]
                random.Random(r // n).shuffle(base)
            for j in range(n):
                name = base[(r + j) % n]
                if between:
                    between()
                if cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record(stream)
                    steps[name](warmup + r)
                    end.record(stream)
                    events[name].append((start, end))
                else:
                    f0 = minor_page_faults()
                    t0 = time.perf_counter()
                    steps[name](warmup + r)
                    times[name].append((time.perf_counter() - t0) * 1e3)
                    if faults is not None and f0 is not None:
                        faults.setdefault(name, []).append(minor_page_faults() - f0)
                if on_step:
                    on_step()
        if cuda:
            torch.cuda.synchronize(device)
            times = {name: [s.elapsed_time(e) for s, e in ev] for name, ev in events.items()}
    return times


def paired_speedup(times: Mapping[str, Sequence[float]], base: str, impl: str) -> Optional[float]:
    """Median over rounds of ``base``'s time / ``impl``'s time in the same round (from
    :func:`time_alternating`): > 1 means ``impl`` is faster. None if either is missing."""
    a, b = times.get(base), times.get(impl)
    if not a or not b or len(a) != len(b):
        return None
    return statistics.median(x / y for x, y in zip(a, b) if y > 0)


def time_group(group: Sequence[dict], make_step: Callable[[str], Callable[[int], Any]], *, warmup: int, iters: int,
               device: torch.device, key: str = "impl", between: Optional[Callable[[], None]] = None) -> dict:
    """The rows of one comparison, timed: ``make_step(row[key])`` builds each implementation's
    step, which runs once untimed (compiling, autotuning, and failing here if it cannot run:
    the row then says why, ``status="failed: ..."``, never dropped); the others are timed with
    :func:`time_alternating` and their rows get ``status="ok"``, ``ms`` (median), ``ms_p20``,
    ``ms_p80``. Returns the per-round times (for :func:`add_paired_speedups`). Built and run
    with ``device`` current, as the timed steps are."""
    steps = {}
    for row in group:
        try:
            with _current(device):
                steps[row[key]] = make_step(row[key])
                steps[row[key]](0)
        except Exception as e:  # noqa: BLE001  (said in the row; a baseline never silently disappears)
            steps.pop(row[key], None)
            row.update(status=f"failed: {type(e).__name__}: {' '.join(str(e).split())[:240]}", ms=None)
    faults: dict = {}
    times = (time_alternating(steps, warmup=warmup, iters=iters, device=device, between=between, faults=faults)
             if steps else {})
    for row in group:
        if row[key] in times:
            s = summarize_ms(times[row[key]])
            row.update(status="ok", ms=round(s["ms_median"], 4), ms_p20=round(s["ms_p20"], 4),
                       ms_p80=round(s["ms_p80"], 4))
            if row[key] in faults:  # CPU: minor page faults per step (median)
                row["page_faults"] = statistics.median(faults[row[key]])
    return times


def add_paired_speedups(group: Sequence[dict], times: Mapping[str, Sequence[float]], fast: str = "vitfast",
                        key: str = "impl") -> None:
    """On ``fast``'s row of a group timed by :func:`time_alternating`: ``speedup_vs_<other>``
    for every other implementation timed, the median of the per-round ratios."""
    for r in group:
        if r.get(key) != fast or r.get("status") != "ok":
            continue
        for other in times:
            speedup = paired_speedup(times, other, fast) if other != fast else None
            if speedup is not None:
                r[f"speedup_vs_{other}"] = round(speedup, 3)


def _quantile(sorted_xs: Sequence[float], q: float) -> float:
    if len(sorted_xs) == 1:
        return sorted_xs[0]
    pos = q * (len(sorted_xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def summarize_ms(times_ms: Sequence[float]) -> dict:
    """Median (the figure we report), min and the 20/80 % quantiles (the spread)."""
    xs = sorted(times_ms)
    return {
        "ms_median": statistics.median(xs),
        "ms_min": xs[0],
        "ms_p20": _quantile(xs, 0.2),
        "ms_p80": _quantile(xs, 0.8),
        "n_timed": len(xs),
    }


def rel_err(got: torch.Tensor, ref: torch.Tensor, unit: float = 1e-12) -> float:
    """max |got - ref| / max(unit, max |ref|), computed in float64."""
    got, ref = got.double(), ref.double()
    return (got - ref).abs().max().item() / max(unit, ref.abs().max().item()) if ref.numel() else 0.0


# ------------------------------------------------------------------------ FLOPs
def vit_forward_flops(model: nn.Module) -> int:
    """Matmul FLOPs of one image's forward pass through a ViT (timm or FastViT).

    Counted: the patch-embedding GEMM, every Linear in the blocks (qkv, proj, fc1, fc2),
    attention's two batched matmuls (4·N²·D per block: q·kᵀ and p·v over all heads) and
    the head on the pooled features. Not counted: LayerNorm, softmax, GELU, adds (the
    usual MFU convention). Equal to ``torch.utils.flop_counter.FlopCounterMode`` on
    timm's model with SDPA.
    """
    pe = model.patch_embed
    proj = pe.proj
    k = proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1]
    num_patches = pe.num_patches
    flops = 2 * num_patches * k * proj.out_channels
    n = num_patches + int(getattr(model, "num_prefix_tokens", 1))
    for blk in model.blocks:
        for m in blk.modules():
            if isinstance(m, nn.Linear):
                flops += 2 * n * m.in_features * m.out_features
        dim = blk.attn.qkv.out_features // 3
        flops += 4 * n * n * dim
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear):
        pool = getattr(model, "global_pool", "token")
        rows = n if pool == "" else 1
        flops += 2 * rows * head.in_features * head.out_features
    return int(flops)


def vit_patch_embed_flops(model: nn.Module) -> int:
    proj = model.patch_embed.proj
    return int(2 * model.patch_embed.num_patches * proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1] * proj.out_channels)


def vit_step_flops(model: nn.Module, mode: str) -> int:
    """FLOPs per image of an inference step or a training step.

    Training = forward + backward, the backward being 2x the forward (input and weight
    gradients), less the patch embedding's input gradient, which images do not need.
    Attention recomputation in a fused backward is not counted (model FLOPs, not
    hardware FLOPs).
    """
    fwd = vit_forward_flops(model)
    if mode == "infer":
        return fwd
    if mode == "train":
        return 3 * fwd - vit_patch_embed_flops(model)
    raise ValueError(f"mode must be 'infer' or 'train', got {mode!r}")


# ------------------------------------------------------------------------ measured peak
def measure_peak_tflops(device: torch.device, dtype: torch.dtype, n: Optional[int] = None, iters: int = 10) -> dict:
    """TFLOP/s of an n×n×n matmul in ``dtype`` on ``device``, median of ``iters`` after warm-up.

    Defaults: n = 8192 on the GPU (about 1 TFLOP a call), 1024 on the CPU (fp32) or 512
    (other dtypes, which CPUs mostly emulate). This is the peak MFU is quoted against: a
    measured figure on the same device, clocks and settings, not a datasheet number.
    """
    if n is None:
        n = 8192 if device.type == "cuda" else (1024 if dtype == torch.float32 else 512)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    out = torch.empty(n, n, device=device, dtype=dtype)
    times = time_steps(lambda i: torch.mm(a, b, out=out), warmup=3, iters=iters, device=device)
    ms = statistics.median(times)
    return {"tflops": 2 * n**3 / (ms * 1e-3) / 1e12, "n": n, "dtype": str(dtype).replace("torch.", ""), "ms": ms}


GPU_PEAK_GEMM = 8192  # about 1.1 TFLOP a call, long enough for the clocks to settle
CPU_PEAK_GEMM = 4096  # 137 GFLOP a call, large enough for every core's vector units to stay busy


def peak_gemm(device: torch.device, measure_cpu: bool = False, iters: Optional[int] = None,
              dtype: Optional[torch.dtype] = None) -> Optional[tuple[int, torch.dtype, int, Optional[bool]]]:
    """What :func:`device_peak` measures: ``(n, dtype, iters, tf32)`` of its n^3 GEMM, or None
    (the CPU without ``measure_cpu``). ``dtype`` is the run's (default bf16 on a GPU, fp32 on
    the CPU); ``tf32`` whether an fp32 GEMM on a GPU may use TF32 (this process's setting, which
    the run's own matmuls follow), None otherwise."""
    if device.type == "cuda":
        dtype = dtype or torch.bfloat16
        tf32 = bool(torch.backends.cuda.matmul.allow_tf32) if dtype == torch.float32 else None
        return GPU_PEAK_GEMM, dtype, iters or 10, tf32
    if measure_cpu:
        return CPU_PEAK_GEMM, dtype or torch.float32, iters or 5, None
    return None


def device_peak(device: torch.device, given: Optional[float] = None, measure_cpu: bool = False,
                iters: Optional[int] = None, dtype: Optional[torch.dtype] = None) -> dict:
    """The peak MFU is quoted against, and where it comes from: ``{"tflops", "source",
    "documented"}``, and for a measured one ``"dtype"`` (the GEMM's) and ``"tf32"`` (fp32 on a
    GPU: whether the process lets matmuls use TF32, as the run's own fp32 matmuls do; else None);
    ``tflops`` is None when there is none (no MFU is then given).

    * ``given`` (``--peak-tflops``, e.g. the datasheet's): used as it is.
    * GPU: the rate of an 8192^3 GEMM (``torch.mm``) in ``dtype``, the run's compute dtype
      (default bf16): an fp32 run is quoted against fp32 (TF32 or not, as set), not against a
      bf16 rate it could never reach; the fastest of ``iters`` calls after warm-up.
    * CPU: none unless ``measure_cpu``; then a 4096^3 GEMM in ``dtype`` (default fp32), the
      fastest of ``iters``. A small GEMM (the 1024^3 one used before) runs far below the cores'
      peak, which gave MFUs above 100%.
    """
    if given:
        return {"tflops": float(given), "source": "given with --peak-tflops", "documented": True}
    plan = peak_gemm(device, measure_cpu, iters, dtype)
    if plan is None:
        return {"tflops": None, "documented": False,
                "source": "no peak measured on the CPU (--measure-peak measures a 4096^3 GEMM in the run's dtype; "
                          "--peak-tflops gives one)"}
    n, dtype, iters, tf32 = plan
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    out = torch.empty(n, n, device=device, dtype=dtype)
    ms = min(time_steps(lambda i: torch.mm(a, b, out=out), warmup=2, iters=iters, device=device))
    name = str(dtype).replace("torch.", "")
    where = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    mode = "" if tf32 is None else (", TF32 on" if tf32 else ", TF32 off")
    return {"tflops": 2 * n**3 / (ms * 1e-3) / 1e12, "documented": True, "dtype": name, "tf32": tf32,
            "source": f"measured {n}^3 {name} GEMM{mode}{where}, fastest of {iters}: {ms:.3f} ms"}


# ------------------------------------------------------------------------ results files
def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def results_path(path: os.PathLike | str, env: Mapping[str, Any], kind: str, ext: str = "json") -> Path:
    """``path`` itself, or, when it is a folder (exists, or ends with '/'), a file in it named
    ``<date>_<device>_<kind>.<ext>``: date and card (or 'cpu') in the name, never overwriting."""
    p = Path(path)
    if not (str(path).endswith(os.sep) or p.is_dir()):
        p.parent.mkdir(parents=True, exist_ok=True)
        return p
    p.mkdir(parents=True, exist_ok=True)
    dev = "cpu" if env.get("device_kind") == "cpu" else _slug(str(env.get("device", "gpu")))
    stamp = str(env.get("date", ""))[:10] or _dt.date.today().isoformat()
    base = f"{stamp}_{dev}_{kind}"
    cand = p / f"{base}.{ext}"
    i = 2
    while cand.exists():
        cand = p / f"{base}_{i}.{ext}"
        i += 1
    return cand


def write_json(path: os.PathLike | str, kind: str, env: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], **extra: Any) -> Path:
    """One file per run: ``{"schema", "kind", "env", ..., "rows"}``; each row repeats the env
    facts so a row read on its own still names the device, versions, date and command."""
    out = results_path(path, env, kind, "json")
    noisy = bool(env.get("noisy"))
    doc = {"schema": SCHEMA, "kind": kind, "env": dict(env), **extra,
           "rows": [{**env, **r, "noisy": noisy or bool(r.get("noisy"))} for r in rows]}
    out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    return out


def write_csv(path: os.PathLike | str, env: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], kind: str = "e2e") -> Path:
    out = results_path(path, env, kind, "csv")
    full = [{**env, **r, "noisy": bool(env.get("noisy") or r.get("noisy"))} for r in rows]
    fields: list[str] = []
    for r in full:
        fields += [k for k in r if k not in fields]
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in full:
            w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    return out


# -- shared by the kernel microbenchmarks (benchmarks/bench_*.py) ---------------------------
def measure_copy_gbps(device: torch.device, nbytes: Optional[int] = None) -> float:
    """GB/s of a large device-to-device copy (read + write counted): the memory roofline."""
    n = nbytes or ((1 << 30) if device.type == "cuda" else (1 << 26))
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    ms = statistics.median(time_steps(lambda i: dst.copy_(src), warmup=3, iters=10, device=device))
    return 2 * n / (ms * 1e-3) / 1e9


def add_microbench_args(p, models: Mapping[str, Any], kind: str) -> None:
    """The options every kernel microbenchmark takes (its own ones are added by the script)."""
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--models", nargs="+", choices=sorted(models), default=None)
    p.add_argument("--batch", type=int, default=None, help="override the batch size of every model")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on the GPU, fp32 on the CPU")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--smoke", action="store_true", help="one tiny shape (checks the script; any device)")
    p.add_argument("--json", default=None, help=f"write the rows here (a folder: <date>_<device>_{kind}.json)")
    add_noise_args(p)
    add_cpu_malloc_arg(p)


def triton_runs_here(prog: str, interpreted: bool) -> bool:
    """False (after saying why) when the Triton kernels cannot run: no GPU and no interpreter."""
    if torch.cuda.is_available() or interpreted:
        return True
    print(f"{prog}: no GPU, and the Triton kernels run on the CPU only under the interpreter: set "
          "TRITON_INTERPRET=1 before vitfast is imported (vitfast bench kernels and benchmarks/bench_*.py do)",
          file=sys.stderr)
    return False


def microbench_settings(device: str, dtype_name: Optional[str], warmup: Optional[int], iters: Optional[int], *,
                        gpu: tuple[int, int], cpu: tuple[int, int]):
    """(device, dtype name, dtype, warm-up steps, timed rounds) of a microbenchmark: bf16 on the
    GPU and fp32 on the CPU unless given; ``gpu``/``cpu`` are the default (warmup, iters)."""
    dev = resolve_device(device)
    on_gpu = dev.type == "cuda"
    dtype_name = dtype_name or ("bf16" if on_gpu else "fp32")
    default_warmup, default_iters = gpu if on_gpu else cpu
    return (dev, dtype_name, DTYPES[dtype_name], default_warmup if warmup is None else warmup,
            default_iters if iters is None else iters)


def measured_rows(kind: str, dev: torch.device, argv: Optional[Sequence[str]], measure: Callable[[dict], list], *,
                  allow_noisy: bool, writes: bool, env_out: Optional[dict]) -> list:
    """``measure(env)`` under the load guard; its rows stamped with the environment facts
    (which ``env_out``, if given, receives too)."""
    env = env_info(dev, argv, prog=f"python -m vitfast.cli.kernels.{kind}")
    with load_guard(env, f"bench {kind}", allow_noisy=allow_noisy, writes=writes, device=dev):
        rows = measure(env)
    if env_out is not None:
        env_out.update(env)
    return [{**env, **r} for r in rows]


def finish_microbench(args, kind: str, collect: Callable[[dict], list], format_table: Callable[[list], str]) -> int:
    """The end every microbenchmark's ``main`` shares: ``collect(env)`` measures (filling ``env``),
    the table is printed and ``--json`` written. Exit codes: 0; 1 when a row failed; 2 for a bad
    option; :data:`EXIT_NOISY` when a busy machine refused the run."""
    env: dict = {}
    steady_cpu_malloc(getattr(args, "cpu_malloc", "default"))
    try:
        rows = collect(env)
    except NoisyMachine as e:
        print(e, file=sys.stderr)
        return EXIT_NOISY
    except ValueError as e:
        print(f"{kind}: error: {e}", file=sys.stderr)
        return 2
    print(format_table(rows))
    if args.json:
        print(f"wrote {write_json(args.json, kind, env, rows, smoke=args.smoke)}")
    return 1 if any(r.get("status") != "ok" for r in rows) else 0


def select_models(all_models: Mapping[str, tuple], names: Optional[Sequence[str]], batch: Optional[int]):
    """``--models``/``--batch`` applied to a script's model table (None: the script's defaults).
    Each entry's 4th and 5th fields are its GPU and CPU batch sizes."""
    if not (names or batch):
        return None
    models = {m: all_models[m] for m in (names or all_models)}
    if batch:
        models = {m: (*v[:3], batch, batch) for m, v in models.items()}
    return models
