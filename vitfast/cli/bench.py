"""``vitfast bench`` / ``python -m vitfast.cli bench``: end-to-end ViT throughput, side by side.

Every run times, in one process, on the same device and with the same weights:

* ``fastvit``   -- FastViT on vitfast's kernels (``backend="auto"``),
* ``reference`` -- the same model on plain PyTorch ops (``backend="reference"``), the baseline
  every speedup is quoted against,
* ``timm``      -- timm's VisionTransformer (eager, SDPA attention),

and with ``--compile`` each of them again under ``torch.compile``. Modes: ``infer`` (no grad,
weights in the chosen dtype) and ``train`` (forward, cross-entropy, backward, AdamW step; fp32
weights under autocast for fp16/bf16).

Timing: the implementations of one (model, mode) are built and warmed up, then timed
alternately, round by round, ``--iters`` rounds
(CUDA events on the GPU, ``time.perf_counter`` on the CPU), inputs rotating over three
batches. Each row gives the median time and ``speedup_vs_reference``, the median of the
per-round ratios to the eager reference: on a shared machine the ratio of two medians drifts
with the load, the per-round ratio much less. Results are written only from a quiet machine
(1-minute load average at most the number of cores) unless ``--allow-noisy`` is given, which
marks every row ``noisy: true``. FLOPs are analytic
(:func:`vitfast.benchmark_utils.vit_step_flops`). MFU is only given against a documented peak
(:func:`vitfast.cli.benchmarking.device_peak`): on a GPU the rate of an 8192^3 GEMM in the run's
dtype (fp32 with the process's TF32 setting) measured at the start of the run; on the CPU none,
unless ``--measure-peak`` (a 4096^3 GEMM in the run's dtype) or ``--peak-tflops``; each row
records the peak's dtype (``peak_dtype``); an MFU above 100% is flagged and warned about.
``peak_mem_gib`` (GPU) is the highest device memory allocated from the moment the model and
inputs exist until its warm-up ends (compile, CUDA graph warm-up and capture -- the graph's pool
holds the activations, its replays allocate nothing --, output check and warm-up steps), less
what was held before it was built; ``peak_mem_covers`` says which of these ran. A step that fails
while timed (an out-of-memory error) is recorded in its row's ``status`` and the others go on.
Every row shows its p20-p80
spread, and rows whose spread exceeds 10% of the median are marked noisy. ``dispatch`` says which
path each vitfast op took, ``{"op:choice": calls}`` counted from the build through the warm-up: an
eager step counts at every step, a compiled one once (when it is traced), a CUDA graph in its
warm-up and capture (a replay asks nothing).

``vitfast bench kernels`` runs the kernel microbenchmarks instead (:mod:`vitfast.cli.bench_kernels`).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import gc
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import dispatch
from . import benchmarking as bu
from .report import NOISY_SPREAD, e2e_display_rows, format_text_table, impl_label, plot_e2e, spread, table_notes

__all__ = ["main", "run", "build_model", "IMPLS", "CPU_DEFAULTS", "GPU_DEFAULTS"]

# reference first: the others are compared with it. "fastvit" follows the measured dispatch table
# (what users get); "fastvit_kernels" is the same model with every op forced onto vitfast's kernels
# (VITFAST_DISPATCH=kernel for its steps only), so one run shows what the table saves.
IMPLS = ("reference", "fastvit", "fastvit_kernels", "timm")
CPU_DEFAULTS = dict(model=["vit_tiny_patch16_224"], batch_size=8, dtype="fp32", mode="infer", warmup=2, iters=8,
                    impl=["reference", "fastvit", "timm"])  # no table on the CPU: fastvit_kernels == fastvit
GPU_DEFAULTS = dict(
    model=["vit_small_patch16_224", "vit_base_patch16_224", "vit_large_patch16_224"],
    batch_size=256, dtype="bf16", mode="both", warmup=10, iters=30, impl=list(IMPLS),
)
N_INPUT_BUFFERS = 3


# ------------------------------------------------------------------------ options
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vitfast bench",
        description="Throughput of FastViT against the reference (plain PyTorch) and timm. "
        "Defaults: on a GPU ViT-S/16, B/16, L/16 at 224, bf16, batch 256, infer and train; "
        "on a CPU vit_tiny_patch16_224, batch 8, fp32, infer. "
        "`vitfast bench kernels --help` for the kernel microbenchmarks.",
    )
    p.add_argument("--model", nargs="+", metavar="NAME", help="one or several model names (timm's; see vitfast.list_models())")
    p.add_argument("--batch-size", type=int, help="images per step (CPU 8, GPU 256)")
    p.add_argument("--img-size", type=int, help="override the model's image size (e.g. 32 for a quick run)")
    p.add_argument("--depth", type=int, help="override the number of blocks (quick runs)")
    p.add_argument("--dtype", choices=sorted(bu.DTYPES), help="compute dtype (CPU fp32, GPU bf16)")
    p.add_argument("--mode", choices=("infer", "train", "both"), help="inference, training step, or both (CPU infer, GPU both)")
    p.add_argument("--impl", nargs="+", choices=IMPLS, help="implementations to time (default: all on a GPU; on a CPU "
                   "all but fastvit_kernels, which equals fastvit there)")
    p.add_argument("--compile", action="store_true", help="also time each implementation under torch.compile")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="GPU inference: time the plain forward instead of replaying it from a CUDA graph (by default "
                        "every implementation, FastViT, the reference and timm alike, is captured once and replayed)")
    p.add_argument("--uint8", action="store_true",
                   help="feed raw uint8 images: FastViT normalises inside its patch embedding, timm gets a normalisation pass")
    p.add_argument("--warmup", type=int, help="untimed steps before timing (CPU 2, GPU 10)")
    p.add_argument("--iters", type=int, help="timed steps; the median is reported (CPU 8, GPU 30)")
    p.add_argument("--device", default="auto", help="auto (GPU when visible), cpu or cuda[:N]")
    p.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads); reported in every row")
    p.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s for MFU (e.g. the datasheet's), "
                   "instead of measuring it")
    p.add_argument("--measure-peak", action="store_true",
                   help="CPU: measure the peak for MFU with a 4096^3 GEMM in the run's dtype (several seconds); "
                   "without it or --peak-tflops there is no MFU on the CPU. GPU: always measured (8192^3 GEMM in the "
                   "run's dtype, fp32 with the process's TF32 setting)")
    p.add_argument("--no-check", action="store_true", help="skip comparing each implementation's outputs with the reference")
    p.add_argument("--json", metavar="PATH", help="write the rows as JSON (a folder: <date>_<device>_e2e.json in it)")
    p.add_argument("--csv", metavar="PATH", help="write the rows as CSV (a folder: <date>_<device>_e2e.csv in it)")
    p.add_argument("--plot", metavar="PATH.png", help="bar chart of img/s per model and implementation")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--dispatch", choices=dispatch.OVERRIDES, default=None,
                   help="where FastViT's ops run on CUDA: the measured table (default), always the kernels, or "
                        "always PyTorch (sets VITFAST_DISPATCH for this run; each row records the paths taken)")
    bu.add_noise_args(p)
    bu.add_cpu_malloc_arg(p)
    return p


@dataclass
class Config:
    models: list[str]
    batch_size: int
    img_size: Optional[int]
    depth: Optional[int]
    dtype: torch.dtype
    dtype_name: str
    modes: list[str]
    impls: list[str]
    compile: bool
    uint8: bool
    warmup: int
    iters: int
    device: torch.device
    check: bool
    peak_tflops: Optional[float]
    measure_peak: bool = False
    cuda_graphs: bool = False  # inference on CUDA: every implementation replayed from a CUDA graph


def _fail(parser: argparse.ArgumentParser, msg: str) -> None:
    parser.error(msg)  # prints usage + "vitfast bench: error: msg", raises SystemExit(2)


def resolve_config(args: argparse.Namespace, parser: argparse.ArgumentParser, **overrides: Any) -> Config:
    """Fill device-dependent defaults and check every option; a bad one exits with code 2.
    ``overrides`` replace options of ``args`` (another command reusing these rules, e.g.
    ``vitfast profile`` with its single ``impl``)."""
    args = argparse.Namespace(**{**vars(args), **overrides})
    try:
        device = bu.resolve_device(args.device)
    except (ValueError, RuntimeError) as e:
        _fail(parser, f"--device: {e}")
    d = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    val = {k: getattr(args, k) if getattr(args, k) is not None else d[k] for k in d}
    for opt, v, lo in (("--batch-size", val["batch_size"], 1), ("--iters", val["iters"], 1), ("--warmup", val["warmup"], 0)):
        if v < lo:
            _fail(parser, f"{opt} must be >= {lo}, got {v}")
    for opt, v in (("--img-size", args.img_size), ("--depth", args.depth), ("--threads", args.threads)):
        if v is not None and v < 1:
            _fail(parser, f"{opt} must be >= 1, got {v}")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        _fail(parser, f"--peak-tflops must be > 0, got {args.peak_tflops}")
    from ..models import MODEL_CONFIGS

    for name in val["model"]:
        if name not in MODEL_CONFIGS:
            close = difflib.get_close_matches(name, MODEL_CONFIGS, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            _fail(parser, f"--model: unknown model {name!r}{hint}; see vitfast.list_models()")
        patch = MODEL_CONFIGS[name]["patch_size"]
        if args.img_size is not None and args.img_size % patch:
            _fail(parser, f"--img-size {args.img_size} is not divisible by {name}'s patch size {patch}")
    impls = list(dict.fromkeys(val["impl"]))
    if "timm" in impls:
        try:
            import timm
        except ImportError:
            _fail(parser, "--impl timm needs timm (pip install 'vitfast[bench]'), or leave timm out with --impl fastvit reference")
        for name in val["model"]:
            if not timm.is_model(name):
                _fail(parser, f"--model {name!r} is not a timm model; leave timm out with --impl fastvit reference")
    if getattr(args, "plot", None):
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            _fail(parser, "--plot needs matplotlib (pip install 'vitfast[bench]')")
    if args.threads:
        torch.set_num_threads(args.threads)
    return Config(
        models=list(dict.fromkeys(val["model"])), batch_size=val["batch_size"], img_size=args.img_size, depth=args.depth,
        dtype=bu.DTYPES[val["dtype"]], dtype_name=val["dtype"],
        modes=["infer", "train"] if val["mode"] == "both" else [val["mode"]],
        impls=impls, compile=args.compile, uint8=args.uint8, warmup=val["warmup"], iters=val["iters"],
        device=device, check=not args.no_check, peak_tflops=args.peak_tflops,
        measure_peak=bool(getattr(args, "measure_peak", False)),
        cuda_graphs=device.type == "cuda" and not getattr(args, "no_cuda_graphs", True),
    )


# ------------------------------------------------------------------------ models and steps
class Normalize(nn.Module):
    """uint8 images -> (x/255 - mean)/std: the data-loader pass FastViT's fused input removes."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(self.mean.dtype) / 255.0 - self.mean) / self.std


def model_overrides(cfg: Config) -> dict:
    return {k: v for k, v in (("img_size", cfg.img_size), ("depth", cfg.depth)) if v is not None}


def build_model(name: str, impl: str, overrides: dict, device: torch.device, uint8: bool = False) -> nn.Module:
    """The model of one implementation, built on ``device``. With ``uint8``, timm's model is
    preceded by a :class:`Normalize` pass (FastViT takes uint8 itself)."""
    with torch.device(device):
        if impl in ("fastvit", "fastvit_kernels", "reference"):
            import vitfast

            return vitfast.create_model(name, backend="reference" if impl == "reference" else "auto", **overrides)
        if impl == "timm":
            import timm

            model = timm.create_model(name, pretrained=False, **overrides)
            if uint8:
                cfg = model.pretrained_cfg
                return nn.Sequential(Normalize(cfg.get("mean", (0.5,) * 3), cfg.get("std", (0.5,) * 3)), model)
            return model
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def _vit_of(model: nn.Module) -> nn.Module:
    return model[-1] if isinstance(model, nn.Sequential) else model


def make_inputs(cfg: Config, model: nn.Module, mode: str, num_classes: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    vit = _vit_of(model)
    h, w = vit.patch_embed.img_size if hasattr(vit.patch_embed, "img_size") else (cfg.img_size,) * 2
    shape = (cfg.batch_size, vit.patch_embed.proj.in_channels, h, w)
    gen = torch.Generator(device=cfg.device).manual_seed(0)
    in_dtype = cfg.dtype if mode == "infer" else torch.float32  # training: fp32 images into autocast
    xs, ys = [], []
    for _ in range(N_INPUT_BUFFERS):
        if cfg.uint8:
            xs.append(torch.randint(0, 256, shape, device=cfg.device, dtype=torch.uint8, generator=gen))
        else:
            xs.append(torch.randn(shape, device=cfg.device, dtype=in_dtype, generator=gen))
        ys.append(torch.randint(0, max(1, num_classes), (cfg.batch_size,), device=cfg.device, generator=gen))
    return xs, ys


def _no_region(name: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def make_step(model: nn.Module, cfg: Config, mode: str, xs, ys, region=_no_region) -> tuple[Callable[[int], Any], str]:
    """The step to time and a description of its precision. ``region(name)`` is entered
    around a training step's forward, backward and optimizer parts (profiler ranges)."""
    n = len(xs)
    if mode == "infer":
        model.eval()

        def infer(i: int):
            with torch.inference_mode():
                return model(xs[i % n])

        return infer, f"{cfg.dtype_name} weights and activations"
    model.train()
    fused = cfg.device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if fused else {"foreach": True}))
    amp = cfg.dtype != torch.float32
    ctx = (lambda: torch.autocast(cfg.device.type, dtype=cfg.dtype)) if amp else contextlib.nullcontext

    def train(i: int):
        with region("forward"), ctx():
            out = model(xs[i % n])
            loss = F.cross_entropy(out.float(), ys[i % n])
        with region("backward"):
            loss.backward()
        with region("optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss

    return train, (f"{cfg.dtype_name} autocast, fp32 weights, AdamW" if amp else "fp32, AdamW")


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def _failure(e: BaseException) -> str:
    """A row's ``status`` for a failure: ``oom``, or ``error: <type>: <first line>`` (with its
    traceback on stderr: an error is a bug to look at, an OOM a size that does not fit)."""
    if _is_oom(e):
        return "oom"
    traceback.print_exception(e, file=sys.stderr)
    return f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _free_device(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------ one group of measurements
@dataclass
class Entry:
    """One implementation of a (model, mode) group: its row, and while it can run, its step."""
    row: dict
    step: Optional[Callable[[int], Any]] = None
    keep: Any = None  # the model and inputs the step uses
    resident: int = 0  # device bytes held before it was built (the other entries' models)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prepare_entry(
    cfg: Config, name: str, impl: str, compiled: bool, mode: str, weights: dict, ref_out: dict,
    on_step: Callable[[], None],
) -> Entry:
    """Build one implementation, compile it (timed apart), check its output against the
    reference and run its warm-up steps, which also measure its peak memory. A failure is
    recorded in the row (``status``), never raised."""
    row: dict = dict(model=name, impl=impl, compiled=compiled, mode=mode, dtype=cfg.dtype_name,
                     batch_size=cfg.batch_size, input="uint8" if cfg.uint8 else ("fp32" if mode == "train" else cfg.dtype_name),
                     warmup=cfg.warmup, iters=cfg.iters, status="ok")
    entry = Entry(row)
    cuda = cfg.device.type == "cuda"
    # fastvit_kernels: every dispatch choice of this entry (build, compile, capture, steps) forced
    # onto the kernels; compile traces and CUDA graphs capture the path chosen inside
    with (dispatch.forced("kernel") if impl == "fastvit_kernels" else contextlib.nullcontext()):
        _prepare(cfg, entry, name, impl, compiled, mode, weights, ref_out, on_step)
    if impl == "fastvit_kernels" and entry.step is not None:
        inner = entry.step

        def forced_step(i: int, _inner=inner):
            with dispatch.forced("kernel"):
                return _inner(i)

        entry.step = forced_step
    return entry


def _prepare(cfg: Config, entry: Entry, name: str, impl: str, compiled: bool, mode: str, weights: dict,
             ref_out: dict, on_step: Callable[[], None]) -> None:
    row = entry.row
    cuda = cfg.device.type == "cuda"
    try:
        if cuda:
            _sync(cfg.device)
            entry.resident = torch.cuda.memory_allocated(cfg.device)
        model = build_model(name, impl, model_overrides(cfg), cfg.device, cfg.uint8)
        vit = _vit_of(model)
        vit.load_state_dict(weights["state"])
        row["img_size"] = int(vit.patch_embed.img_size[0]) if hasattr(vit.patch_embed, "img_size") else cfg.img_size
        row["depth"] = len(vit.blocks)
        row["depth_overridden"] = cfg.depth is not None
        if mode == "infer":
            model.to(cfg.dtype)
        xs, ys = make_inputs(cfg, model, mode, getattr(vit, "num_classes", 1000))
        if cuda:  # the peak from here (weights and inputs in place) to the end of the warm-up
            _sync(cfg.device)
            torch.cuda.reset_peak_memory_stats(cfg.device)
        covers = ["weights and inputs"] + (["compile"] if compiled else [])
        # which path each vitfast op took (the dispatch table's choices), recorded from before the
        # compile and the capture: a compiled step asks the dispatch only while it is traced, and a
        # CUDA graph's replays never ask (its warm-up and capture did)
        with dispatch.record() as seen:
            runner = torch.compile(model) if compiled else model
            step, row["precision"] = make_step(runner, cfg, mode, xs, ys)
            if compiled:  # the first call compiles: time it apart from the warm-up
                t0 = time.perf_counter()
                step(0)
                _sync(cfg.device)
                row["compile_s"] = round(time.perf_counter() - t0, 2)
            row["cuda_graph"] = bool(cfg.cuda_graphs and mode == "infer")
            if row["cuda_graph"]:
                # the same capture for every implementation (fair): warm-up outside the capture, then one
                # graph for the whole forward; each step copies its input into the graph's buffer
                from ..inference import CUDAGraphModule

                runner = CUDAGraphModule(runner.eval(), torch.empty_like(xs[0]).copy_(xs[0]), clone_output=False)
                step, row["precision"] = make_step(runner, cfg, mode, xs, ys)
                row["precision"] += ", CUDA graph"
                covers.append("CUDA graph warm-up and capture")
            if cfg.check and mode == "infer":
                out = step(0)
                key = (name,)
                if impl == "reference" and not compiled:
                    ref_out[key] = out.detach().float().clone()
                if key in ref_out:
                    row["max_rel_err_vs_reference"] = bu.rel_err(out.float(), ref_out[key])
                del out
                covers.append("output check")
            for i in range(max(cfg.warmup, 1)):
                step(i)
                on_step()
            covers.append(f"{max(cfg.warmup, 1)} warm-up step(s)")
        row["dispatch"] = {f"{op}:{choice}": n for (op, choice, _source), n in sorted(seen.items())}
        row["dispatch_mode"] = dispatch.override()
        if cuda:  # less what was held before the build (the other entries' models)
            _sync(cfg.device)
            row["peak_mem_gib"] = (torch.cuda.max_memory_allocated(cfg.device) - entry.resident) / 2**30
            row["peak_mem_covers"] = ", ".join(covers)
        else:
            row["peak_mem_gib"] = row["peak_mem_covers"] = None  # the CPU allocator keeps no peak statistics
        row["flops_per_image"] = bu.vit_step_flops(vit, mode)
        entry.step, entry.keep = step, (model, runner, xs, ys)
    except Exception as e:  # recorded in the row and the table, never dropped
        row["status"] = _failure(e)
        entry.step = entry.keep = None
        _free_device(cfg.device)


def _time_surviving(cfg: Config, entries: dict, on_step: Callable[[], None], faults: Optional[dict] = None) -> dict:
    """:func:`bu.time_alternating` over the entries that can run. A step that raises (an
    out-of-memory error at this batch) puts its status in its row, is dropped, and the others
    are timed again without it; an error no step can be blamed for fails every entry left."""
    live = {k: e for k, e in entries.items() if e.step is not None}
    while live:
        raised: list = []

        def guarded(k, step):
            def run_step(i: int):
                try:
                    return step(i)
                except Exception:
                    raised.append(k)
                    raise

            return run_step

        if faults is not None:
            faults.clear()  # this attempt's, aligned with the times it returns
        try:
            # one untimed round first: building the later entries evicted the earlier ones' caches
            return bu.time_alternating({k: guarded(k, e.step) for k, e in live.items()}, warmup=1, iters=cfg.iters,
                                       device=cfg.device, on_step=on_step, faults=faults)
        except Exception as e:  # noqa: BLE001  (said in the row, the run goes on)
            status = _failure(e)
        for k in raised[:1] or list(live):
            live.pop(k).row["status"] = status
            entries[k].step = entries[k].keep = None
        _free_device(cfg.device)  # out of the except clause: its traceback no longer holds the step's tensors
    return {}


def time_group(cfg: Config, entries: dict, peak: dict, on_step: Callable[[], None]) -> None:
    """Time the entries that run alternately, round by round, and fill their rows: median and
    spread, img/s, TFLOP/s, MFU, and ``speedup_vs_reference`` as the median of the per-round
    ratios to the eager reference (compiled or not, every entry is compared with it). A step
    that fails here leaves its status in its row (:func:`_time_surviving`)."""
    faults: dict = {}
    times = _time_surviving(cfg, entries, on_step, faults)
    for k, e in entries.items():
        if k not in times:
            continue
        row = e.row
        row.update(bu.summarize_ms(times[k]))
        if faults.get(k):  # CPU: minor page faults per step (median; see bu.steady_cpu_malloc)
            row["page_faults"] = statistics.median(faults[k])
        row["img_per_s"] = cfg.batch_size / (row["ms_median"] * 1e-3)
        row["tflops"] = row["flops_per_image"] * row["img_per_s"] / 1e12
        row["peak_tflops"] = peak["tflops"]
        row["peak_source"] = peak["source"]
        row["peak_documented"] = peak["documented"]
        row["peak_dtype"] = peak.get("dtype")  # what the peak GEMM ran in (None: given or none)
        row["peak_tf32"] = peak.get("tf32")
        row["mfu"] = row["tflops"] / peak["tflops"] if peak["tflops"] else None
        row["spread"] = spread(row)
        row["spread_noisy"] = (row["spread"] or 0.0) > NOISY_SPREAD
        row["speedup_vs_reference"] = bu.paired_speedup(times, ("reference", False), k)


def add_speedups(rows: list[dict]) -> None:
    """Rows without a paired figure (the reference failed, or older callers) get None."""
    for r in rows:
        r.setdefault("speedup_vs_reference", None)
        if r["status"] != "ok":
            r["speedup_vs_reference"] = None


def _peak(cfg: Config) -> dict:
    return bu.device_peak(cfg.device, given=cfg.peak_tflops, measure_cpu=cfg.measure_peak, dtype=cfg.dtype)


def run(cfg: Config, progress: bool = True, on_row: Optional[Callable[[list[dict], dict], None]] = None
        ) -> tuple[list[dict], dict]:
    """Time every (model, mode, implementation[, compiled]); rows in that order, and the peak.
    ``on_row(rows, peak)`` is called after each measurement (to save partial results)."""
    from tqdm.auto import tqdm

    plan = [(m, mode, impl, c) for m in cfg.models for mode in cfg.modes for c in ([False, True] if cfg.compile else [False])
            for impl in cfg.impls]
    # the reference goes first in each (model, mode) so its output is there to compare with
    plan.sort(key=lambda p: (cfg.models.index(p[0]), cfg.modes.index(p[1]), p[3], p[2] != "reference"))
    peak = _peak(cfg)
    print(f"peak for MFU: {_peak_text(peak)}", file=sys.stderr)
    rows: list[dict] = []
    bar = tqdm(total=len(plan) * (max(cfg.warmup, 1) + 1 + cfg.iters), unit="step", delay=3, file=sys.stderr,
               disable=not (progress and sys.stderr.isatty()), dynamic_ncols=True)
    weights: dict = {}
    ref_out: dict = {}
    try:
        for name in cfg.models:
            torch.manual_seed(0)
            with torch.device(cfg.device):
                import vitfast

                ref = vitfast.create_model(name, backend="reference", **model_overrides(cfg))
            # kept on the CPU, so that no extra copy of the weights counts in the peak memory
            weights["state"] = {k: v.detach().cpu() for k, v in ref.state_dict().items()}
            del ref
            for mode in cfg.modes:
                group = [p for p in plan if p[0] == name and p[1] == mode]
                entries: dict = {}
                for (m, _, impl, compiled) in group:
                    bar.set_description(f"{m} {impl}{'+compile' if compiled else ''} {mode}: build, warm-up")
                    entries[(impl, compiled)] = prepare_entry(cfg, m, impl, compiled, mode, weights, ref_out, bar.update)
                bar.set_description(f"{name} {mode}: timing {len(entries)} implementations alternately")
                time_group(cfg, entries, peak, bar.update)
                for e in entries.values():
                    row = e.row
                    rows.append(row)
                    msg = f"{row['ms_median']:.2f} ms/batch" if row["status"] == "ok" else row["status"]
                    bar.write(f"  {name:<24} {impl_label(row):<18} {mode:<6} {msg}", file=sys.stderr)
                entries.clear()
                _free_device(cfg.device)
                if on_row:
                    add_speedups(rows)
                    on_row(rows, peak)
            weights.clear()
            ref_out.clear()
            _free_device(cfg.device)
    finally:
        bar.close()
    add_speedups(rows)
    return rows, peak


def _peak_text(peak: dict) -> str:
    return f"{peak['tflops']:.3g} TFLOP/s ({peak['source']})" if peak.get("tflops") else f"{peak['source']}"


def _title(env: dict, cfg: Config) -> str:
    threads = f", {env['cpu_threads']} threads" if cfg.device.type == "cpu" else ""
    return (f"{env['label']} ({env['device']}{threads}) | batch {cfg.batch_size}, {cfg.dtype_name}"
            f"{', uint8 input' if cfg.uint8 else ''} | torch {env['torch']}, triton {env['triton']}, vitfast {env['vitfast']}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        cfg = resolve_config(args, parser)
    except SystemExit as e:  # argparse: 0 for --help, 2 for a bad option
        return int(e.code or 0)
    if cfg.device.type == "cuda":
        # the baselines' patch-embedding convolution gets cuDNN's measured best algorithm
        torch.backends.cudnn.benchmark = True
    if getattr(args, "dispatch", None):
        os.environ["VITFAST_DISPATCH"] = args.dispatch
        dispatch.reload()
    bu.steady_cpu_malloc(args.cpu_malloc)
    env = bu.env_info(cfg.device, argv)
    env["dispatch"] = dispatch.override()
    env["dispatch_sources"] = dispatch.table().sources
    writes = bool(args.json or args.csv or args.plot)
    try:
        bu.check_load(env, args.allow_noisy, "vitfast bench", writes)
    except bu.NoisyMachine as e:
        print(e, file=sys.stderr)
        return bu.EXIT_NOISY
    json_path = bu.results_path(args.json, env, "e2e") if args.json else None

    def save(rows: list[dict], peak: dict) -> None:  # after every row: a killed run keeps what it measured
        if json_path:
            bu.write_json(json_path, "e2e", env, rows, peak=peak)

    rows, peak = run(cfg, progress=not args.no_progress, on_row=save)
    refused = None
    try:
        bu.finish_load_check(env, args.allow_noisy, "vitfast bench", bu.own_threads(cfg.device), writes)
    except bu.NoisyMachine as e:
        refused = e
    print(_title(env, cfg) + (" | NOISY: load average over the core count" if env.get("noisy") else ""))
    headers, cells = e2e_display_rows(rows)
    print(format_text_table(headers, cells))
    if cfg.device.type == "cpu":
        print("CPU figures (labelled CPU): peak memory is not tracked by the CPU allocator (n/a).")
    for note in table_notes(rows, peak):
        print(note)
    over = [r for r in rows if (r.get("mfu") or 0) > 1]
    if over:
        print(f"vitfast bench: warning: MFU above 100% in {len(over)} row(s): the peak ({_peak_text(peak)}) is below "
              "what these steps reached, so it is not this device's peak; give the real one with --peak-tflops",
              file=sys.stderr)
    if refused:
        if json_path and json_path.exists():
            json_path.unlink()  # saved along the way, before the load was known
        print(refused, file=sys.stderr)
        return bu.EXIT_NOISY
    if json_path:
        print(f"wrote {bu.write_json(json_path, 'e2e', env, rows, peak=peak)}")
    if args.csv:
        print(f"wrote {bu.write_csv(args.csv, env, rows)}")
    if args.plot:
        print(f"wrote {plot_e2e(rows, args.plot, title=_title(env, cfg))}")
    failed = [r for r in rows if r["status"].startswith("error")]
    if failed:
        print(f"vitfast bench: {len(failed)} measurement(s) failed (see the table and the tracebacks above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # python -m vitfast.cli.bench [kernels ...]: through the router
    from . import main as cli_main

    sys.exit(cli_main(["bench", *sys.argv[1:]]))
