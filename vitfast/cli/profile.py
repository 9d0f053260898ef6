"""``vitfast profile`` / ``python -m vitfast.cli profile``: where a ViT step's time goes.

A ``torch.profiler`` run over a few steps of FastViT (or the reference, or timm) with named
ranges -- ``patch_embed``, ``block{i}.attn``, ``block{i}.mlp``, ``head`` and, in training,
``backward`` and ``optimizer`` -- that leave the code path as a user runs it: vitfast's blocks
open their ranges themselves (also inside the fused chain, where no block or sub-module is
called), the rest come from hooks on modules no fusion looks at (:func:`annotate_vit`); on CUDA
the same ranges are NVTX ranges for Nsight Systems / Nsight Compute. Prints the time per
region and the top kernels by self device time (self CPU time on the CPU) with their share
of the step; ``--trace`` writes a Chrome trace (chrome://tracing, Perfetto), ``--ncu`` prints
a ready ``ncu`` command line for the attention kernel.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shlex
import sys
import time
from collections import defaultdict
from typing import Iterator, Optional, Sequence

import torch
import torch.nn as nn

from ..modules import block as vblock
from . import benchmarking as bu
from .bench import IMPLS, build_model, make_inputs, make_step, resolve_config

__all__ = ["annotate_vit", "main", "kernel_table", "region_table", "ncu_kernels", "ncu_command"]

STEP_RANGE = "vitfast.step"
ATTENTION_KERNEL_RE = r"attn|attention|flash|fmha|sdpa|softmax"
# backward kernels: vitfast's _attn_bwd_*, FlashAttention's flash_bwd_*, the memory-efficient
# fmha_cutlassB_*, cuDNN's *_bprop_*, softmax's *_backward*: none runs inside block{i}.attn
BACKWARD_KERNEL_RE = r"bwd|backward|bprop|cutlassB"
# what ncu filters on when the profile saw no attention kernel (a CPU run): each implementation's own
NCU_DEFAULT_KERNELS = {  # impl: (forward, backward)
    "fastvit": (r"_attn_fwd", r"_attn_bwd"),
    "reference": (ATTENTION_KERNEL_RE, r"flash_bwd|fmha_cutlassB|bprop|softmax.*backward"),
    "timm": (ATTENTION_KERNEL_RE, r"flash_bwd|fmha_cutlassB|bprop|softmax.*backward"),
}


# ------------------------------------------------------------------------ ranges
class _Ranges:
    """A stack of ranges opened and closed from hooks: record_function (+ NVTX on CUDA)."""

    def __init__(self, nvtx: bool, profiler: bool = True):
        self.nvtx, self.profiler = nvtx, profiler
        self.stack: list = []

    def push(self, name: str) -> None:
        rf = torch.autograd.profiler.record_function(name) if self.profiler else None
        if rf is not None:
            rf.__enter__()
        if self.nvtx:
            torch.cuda.nvtx.range_push(name)
        self.stack.append((name, rf))

    def pop(self, name: str) -> None:
        """Close ``name`` and whatever is still open inside it (a forward that raised part-way);
        nothing when ``name`` is not open."""
        if all(n != name for n, _ in self.stack):
            return
        while self.stack[-1][0] != name:
            self._pop_one()
        self._pop_one()

    def switch(self, old: str, new: str) -> None:
        self.pop(old)
        self.push(new)

    def _pop_one(self) -> None:
        _, rf = self.stack.pop()
        if self.nvtx:
            torch.cuda.nvtx.range_pop()
        if rf is not None:
            rf.__exit__(None, None, None)

    @contextlib.contextmanager
    def range(self, name: str) -> Iterator[None]:
        self.push(name)
        try:
            yield
        finally:
            self.pop(name)


def _opens_own_ranges(blk: nn.Module) -> bool:
    """Whether ``blk`` runs vitfast's block_forward (a FastViT Block, a timm Block that
    ``patch_timm`` fused), which opens its ``.attn`` / ``.mlp`` ranges itself on every path
    (:func:`vitfast.modules.block.part_range`): a hook on it would stop it from fusing."""
    if isinstance(blk, vblock.Block):
        return True
    timm_patch = sys.modules.get("vitfast.integrations.timm")  # not imported: nothing was patched
    fwd = blk.__dict__.get("forward")
    return timm_patch is not None and getattr(fwd, "__func__", None) is timm_patch._block_forward


@contextlib.contextmanager
def annotate_vit(model: nn.Module, nvtx: bool = False, profiler: bool = True) -> Iterator[_Ranges]:
    """Named ranges over a ViT's forward (timm's and FastViT's module names), none of which
    changes what runs: ``patch_embed`` (the model's entry to ``norm_pre``'s output),
    ``block{i}.attn`` (norm1 to norm2: attention and residual 1), ``block{i}.mlp`` (the MLP and
    residual 2, and on the fused path the next norm1 or final norm it makes), ``head``
    (``fc_norm``'s input to the output). vitfast's blocks open their ranges themselves, named
    from the label set here (:data:`vitfast.modules.block.RANGE_LABEL`), so that they still
    fuse; other blocks (timm's own) get hooks on the block and its ``mlp``. Hooks and labels
    are removed on exit."""
    vit = model[-1] if isinstance(model, nn.Sequential) else model
    if not hasattr(vit, "blocks") or len(vit.blocks) == 0:
        raise ValueError("annotate_vit: the model has no .blocks (expected a timm-style VisionTransformer)")
    r = _Ranges(nvtx, profiler)
    handles = [vit.register_forward_hook(lambda m, a, o: r.pop("head"))]
    embed_end = getattr(vit, "norm_pre", None)
    if isinstance(embed_end, nn.Module):
        handles += [vit.register_forward_pre_hook(lambda m, a: r.push("patch_embed")),
                    embed_end.register_forward_hook(lambda m, a, o: r.pop("patch_embed"))]
    head_start = next((m for m in (getattr(vit, "fc_norm", None), getattr(vit, "head", None))
                       if isinstance(m, nn.Module)), None)
    if head_start is not None:
        handles.append(head_start.register_forward_pre_hook(lambda m, a: r.push("head")))
    labelled = []
    for i, blk in enumerate(vit.blocks):
        if _opens_own_ranges(blk):
            labelled.append((blk, blk.__dict__.get(vblock.RANGE_LABEL)))
            setattr(blk, vblock.RANGE_LABEL, f"block{i}")
            continue
        attn, mlp = f"block{i}.attn", f"block{i}.mlp"
        handles += [blk.register_forward_pre_hook(lambda m, a, n=attn: r.push(n)),
                    blk.mlp.register_forward_pre_hook(lambda m, a, n=attn, k=mlp: r.switch(n, k)),
                    blk.register_forward_hook(lambda m, a, o, n=mlp: r.pop(n))]
    nvtx_before, vblock.NVTX = vblock.NVTX, nvtx
    try:
        yield r
    finally:
        vblock.NVTX = nvtx_before
        for blk, label in labelled:
            if label is None:
                delattr(blk, vblock.RANGE_LABEL)
            else:
                setattr(blk, vblock.RANGE_LABEL, label)
        for h in handles:
            h.remove()
        while r.stack:
            r._pop_one()


# ------------------------------------------------------------------------ tables
REGIONS = ("patch_embed", "attention", "mlp", "head", "forward", "backward", "optimizer")


def _on_device(e) -> bool:
    """A device-side event (kernel, memcpy, or a range's span on the GPU timeline)."""
    return not str(getattr(e, "device_type", "CPU")).endswith("CPU")


def _span_us(e) -> float:
    return float(e.time_range.elapsed_us())


def _is_range(name: str) -> bool:
    return name in ("patch_embed", "head", "forward", "backward", "optimizer", STEP_RANGE) or bool(
        re.fullmatch(r"block\d+\.(attn|mlp)", name)) or name.startswith("ProfilerStep")


def _region_of(name: str) -> Optional[str]:
    m = re.fullmatch(r"block\d+\.(attn|mlp)", name)
    if m:
        return "attention" if m.group(1) == "attn" else "mlp"
    return name if name in REGIONS else None


def kernel_table(events, cuda: bool, total_us: float, top: int) -> list[dict]:
    """Top entries by self time over the profiled steps, from the profiler's raw events: GPU
    kernels (and copies) by device time on CUDA, CPU ops by self CPU time on the CPU.
    ``share`` is of ``total_us``, the steps' wall time."""
    agg: dict = defaultdict(lambda: [0, 0.0])
    for e in events:
        if _is_range(e.name) or getattr(e, "is_user_annotation", False):
            continue
        if cuda != _on_device(e):
            continue
        t = _span_us(e) if cuda else float(e.self_cpu_time_total)
        if t > 0:
            agg[e.name][0] += 1
            agg[e.name][1] += t
    rows = [{"name": k, "calls": n, "self_us": t, "share": t / total_us if total_us else None} for k, (n, t) in agg.items()]
    rows.sort(key=lambda r: -r["self_us"])
    return rows[:top]


def region_table(events, cuda: bool, step_us: float, n_steps: int) -> list[dict]:
    """Time per region, summed over the blocks: patch_embed, attention, mlp, head (and in
    training forward -- the four before plus the loss --, backward, optimizer). On the CPU the
    ranges' CPU time; on CUDA their spans on the GPU timeline (first kernel start to last
    kernel end), or, where the profiler records no GPU-side spans, the device time of the
    kernels launched inside them."""
    groups: dict = defaultdict(lambda: {"calls": 0, "us": 0.0})
    device_spans = cuda and any(_on_device(e) and _region_of(e.name) for e in events)
    for e in events:
        name = _region_of(e.name)
        if name is None:
            continue
        if cuda and device_spans:
            if not _on_device(e):
                continue
            t = _span_us(e)
        elif cuda:
            if _on_device(e):
                continue
            t = float(getattr(e, "device_time_total", 0.0) or 0.0)
        else:
            if _on_device(e):
                continue
            t = _span_us(e)
        groups[name]["calls"] += 1
        groups[name]["us"] += t
    return [{"region": k, "calls": groups[k]["calls"], "us_per_step": groups[k]["us"] / n_steps,
             "share": groups[k]["us"] / n_steps / step_us if step_us else None} for k in REGIONS if k in groups]


def _fmt_share(v) -> str:
    return "-" if v is None else f"{100 * v:5.1f}%"


# ------------------------------------------------------------------------ ncu
def kernel_base_name(name: str) -> str:
    """``void ns::flash_fwd_kernel<Traits>(Params)`` -> ``flash_fwd_kernel``: the part ncu's
    ``-k regex:`` sees by default (the function name without namespace, templates, arguments)."""
    base = re.split(r"[<(]", name.removeprefix("void ").strip(), maxsplit=1)[0]
    return base.rsplit("::", 1)[-1].strip() or name


def ncu_kernels(kernels: Sequence[dict], impl: str) -> tuple[str, str]:
    """The ``-k regex:`` filters for ncu, ``(forward, backward)``: the attention-like kernels
    with the most device time among ``kernels`` (:func:`kernel_table`'s rows, most time first)
    that are forward kernels -- the ones that run inside ``block0.attn`` --, and backward ones
    (they run under ``backward``, outside every block range); where the profile has none (a CPU
    run), ``impl``'s own kernels (:data:`NCU_DEFAULT_KERNELS`)."""
    attn = [k["name"] for k in kernels if re.search(ATTENTION_KERNEL_RE, k["name"], re.I)]
    fwd = next((n for n in attn if not re.search(BACKWARD_KERNEL_RE, n, re.I)), None)
    bwd = next((n for n in attn if re.search(BACKWARD_KERNEL_RE, n, re.I)), None)
    default_fwd, default_bwd = NCU_DEFAULT_KERNELS.get(impl, (ATTENTION_KERNEL_RE, BACKWARD_KERNEL_RE))
    return (re.escape(kernel_base_name(fwd)) if fwd else default_fwd,
            re.escape(kernel_base_name(bwd)) if bwd else default_bwd)


def ncu_command(args: argparse.Namespace, argv: Sequence[str], regex: str, model: str) -> str:
    """An ``ncu`` command that profiles one attention kernel (``-k regex:<regex>``, a forward
    kernel: :func:`ncu_kernels`) of block 0 in a steady-state step.

    The profiled program is this command with ``--nvtx-only``: no torch.profiler (which
    would contend with ncu for CUPTI), NVTX ranges only around the one step after warm-up,
    so the kernel ncu picks is past autotuning."""
    keep, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--trace", "--json", "--steps", "--top"):
            skip = True
            continue
        if a in ("--ncu", "--nvtx-only") or a.startswith(("--trace=", "--json=", "--steps=", "--top=")):
            continue
        keep.append(a)
    target = shlex.join(["vitfast", "profile", *keep, "--nvtx-only", "--steps", "1"])
    return (f"ncu --nvtx --nvtx-include 'block0.attn/' -k 'regex:{regex}' -c 1 --set full "
            f"-o vitfast_attention_{model} {target}")


# ------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vitfast profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model name (CPU default vit_tiny_patch16_224, GPU vit_base_patch16_224)")
    p.add_argument("--batch-size", type=int, help="images per step (CPU 8, GPU 256)")
    p.add_argument("--img-size", type=int, help="override the model's image size")
    p.add_argument("--depth", type=int, help="override the number of blocks")
    p.add_argument("--dtype", choices=sorted(bu.DTYPES), help="compute dtype (CPU fp32, GPU bf16)")
    p.add_argument("--mode", choices=("infer", "train"), default="infer")
    p.add_argument("--impl", choices=[i for i in IMPLS if i != "fastvit_kernels"], default="fastvit", help="which implementation to profile (default fastvit)")
    p.add_argument("--uint8", action="store_true", help="feed raw uint8 images")
    p.add_argument("--device", default="auto", help="auto (GPU when visible), cpu or cuda[:N]")
    p.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--warmup", type=int, help="steps before profiling (CPU 2, GPU 5)")
    p.add_argument("--steps", type=int, default=2, help="profiled steps (default 2); the tables are per step")
    p.add_argument("--top", type=int, default=15, help="how many kernels to list (default 15)")
    p.add_argument("--trace", metavar="PATH", help="write a Chrome trace (.json, or .json.gz)")
    p.add_argument("--json", metavar="PATH", help="write the tables as JSON")
    p.add_argument("--ncu", action="store_true", help="print an ncu command line for the attention kernel")
    p.add_argument("--nvtx-only", action="store_true",
                   help="no torch.profiler: NVTX ranges around the steps after warm-up (what ncu/nsys run)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.steps < 1:
            parser.error(f"--steps must be >= 1, got {args.steps}")
        if args.top < 1:
            parser.error(f"--top must be >= 1, got {args.top}")
        cfg = resolve_config(args, parser, model=[args.model] if args.model else None, impl=[args.impl], compile=False,
                             iters=args.steps, peak_tflops=None, no_check=True)
    except SystemExit as e:
        return int(e.code or 0)
    cuda = cfg.device.type == "cuda"
    if args.model is None:
        cfg.models = ["vit_base_patch16_224"] if cuda else ["vit_tiny_patch16_224"]
    if args.warmup is None:
        cfg.warmup = 5 if cuda else 2
    name, mode = cfg.models[0], args.mode
    torch.manual_seed(0)
    overrides = {k: v for k, v in (("img_size", cfg.img_size), ("depth", cfg.depth)) if v is not None}
    model = build_model(name, args.impl, overrides, cfg.device, cfg.uint8)
    vit = model[-1] if isinstance(model, nn.Sequential) else model
    if mode == "infer":
        model.to(cfg.dtype)
    xs, ys = make_inputs(cfg, model, mode, getattr(vit, "num_classes", 1000))
    ranges = _Ranges(nvtx=False, profiler=False)  # switched on after the warm-up
    # under ncu (--nvtx-only) the forward gets no enclosing range, so that 'block0.attn/' and
    # 'backward/' are whole NVTX stacks: the filter then matches however ncu anchors it
    region = (lambda n: contextlib.nullcontext() if args.nvtx_only and n == "forward" else ranges.range(n))
    step, precision = make_step(model, cfg, mode, xs, ys, region=region)

    def annotated_step(i: int) -> None:
        with contextlib.nullcontext() if args.nvtx_only else ranges.range(STEP_RANGE):
            step(i)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(cfg.device)

    for i in range(cfg.warmup):  # autotuning, cuDNN/cuBLAS heuristics, allocator warm-up
        step(i)
    sync()
    ranges.nvtx, ranges.profiler = cuda, not args.nvtx_only
    if args.nvtx_only:  # under ncu / nsys: ranges only around the steps after warm-up
        with annotate_vit(model, nvtx=cuda, profiler=False):
            for i in range(args.steps):
                annotated_step(cfg.warmup + i)
        sync()
        print(f"ran {args.steps} step(s) of {name} ({args.impl}, {mode}) with NVTX ranges")
        return 0

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with annotate_vit(model, nvtx=cuda):
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            for i in range(args.steps):
                annotated_step(cfg.warmup + i)
            sync()
            wall_us = (time.perf_counter() - t0) * 1e6
    events = list(prof.events())
    step_us = wall_us / args.steps
    kernels = kernel_table(events, cuda, step_us * args.steps, args.top)
    regions = region_table(events, cuda, step_us, args.steps)
    env = bu.env_info(cfg.device, argv, prog="vitfast profile")
    what = "kernels by self device time" if cuda else "ops by self CPU time (CPU: no device kernels)"
    print(f"{env['label']} ({env['device']}) | {name} {args.impl} {mode} | batch {cfg.batch_size}, {precision} | "
          f"{args.steps} profiled step(s), {step_us / 1e3:.2f} ms/step (wall, under the profiler)")
    print(f"\ntime per region ({'device time of its kernels' if cuda else 'CPU time'}), per step:")
    for r in regions:
        print(f"  {r['region']:<12} {r['us_per_step'] / 1e3:10.3f} ms  {_fmt_share(r['share'])}  ({r['calls']} calls)")
    if mode == "train":
        print("  (backward is not split by block: autograd runs it outside the forward's ranges)")
    print(f"\ntop {len(kernels)} {what}, share of the step:")
    width = min(90, max([len(k["name"]) for k in kernels] + [4]))
    for k in kernels:
        print(f"  {_fmt_share(k['share'])}  {k['self_us'] / 1e3 / args.steps:9.3f} ms  {k['calls'] // args.steps:5d}x  "
              f"{k['name'][:width]}")
    if cuda:
        busy = sum(_span_us(e) for e in events if _on_device(e) and not _is_range(e.name)
                   and not getattr(e, "is_user_annotation", False)) / (step_us * args.steps)
        print(f"  device busy {100 * busy:.1f}% of the step's wall time")
    if args.trace:
        prof.export_chrome_trace(args.trace)
        print(f"\nwrote {args.trace} (open in chrome://tracing or https://ui.perfetto.dev)")
    if args.json:
        doc = {"schema": bu.SCHEMA, "kind": "profile", "env": env, "model": name, "impl": args.impl, "mode": mode,
               "batch_size": cfg.batch_size, "precision": precision, "steps": args.steps, "ms_per_step": step_us / 1e3,
               "regions": regions, "kernels": kernels}
        out = bu.results_path(args.json, env, "profile")
        out.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {out}")
    if args.ncu:  # among every kernel of the profile, not only the --top ones listed
        every = kernel_table(events, cuda, step_us * args.steps, len(events)) if cuda else []
        fwd, bwd = ncu_kernels(every, args.impl)
        print("\nNsight Compute, the attention kernel of block 0 in one steady-state step:")
        print("  " + ncu_command(args, argv, fwd, name))
        if mode == "train":
            print(f"  (backward kernels: --nvtx-include 'backward/' -k 'regex:{bwd}' instead)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
