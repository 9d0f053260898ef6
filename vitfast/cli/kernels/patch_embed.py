"""Patch embedding: vitfast's fused op against the chains it replaces.

Implementations (all from raw or float images to finished tokens, cls + pos included):
  vitfast        vitfast.ops.patch_embed as users call it (backend="auto": on CUDA the path the
                 dispatch picks, see vitfast.ops.patch_embed)
  fused          backend="fused": the one-launch Triton implicit GEMM (vitfast::patch_embed_fused),
                 autotuned; with ``fwd`` also one row per config it autotunes over,
                 ``fused[BLOCK_M,BLOCK_N,BLOCK_K,warps,stages]`` (that config launched directly;
                 ``...,tma]``: the same tile with the weight loaded by TMA, on sm_90+ where the
                 weight allows it, so both weight paths are timed)
  gemm           backend="gemm": the C++ op (on CUDA three launches: patchify, bias + pos prefill,
                 cuBLAS GEMM with beta = 1)
  vitfast_gemm, vitfast_conv
                 on the CPU, vitfast with each GEMM strategy forced (vitfast.ops.patch_embed.
                 cpu_strategy: MKL on the patch matrix, oneDNN's convolution), forward and backward,
                 so that every CPU run times both; the JSON's env names the one ``vitfast`` took
  eager          the reference chain: normalise + conv2d + flatten/transpose + cat + add
  compile        that chain under torch.compile
  unfold_linear  normalise + reshape/permute into patches + Linear + cat + add (the approach
                 of flash-attention's PatchEmbed)
Modes: ``fwd`` (no grad) and ``fwd+bwd`` (weight, bias, cls, pos require grad: training).
Inputs: ``uint8`` raw pixels, or ``float`` images in the compute dtype, both normalised with
ImageNet mean/std inside the op; ``float_raw``: float images already normalised by the loader (no
mean/std: how most users call it), where the eager chain is plain conv2d + flatten/transpose +
cat + add; ``uint8_hwc`` (on CUDA by default): raw pixels in channels_last, as a decoder's
[B, H, W, 3] frames permuted to [B, 3, H, W] give them (the three-kernel path's register
de-interleaving kernel; no per-config fused rows, to bound the GPU check's time).

Each row gives the median time, GB/s over the bytes the op must move at least (images in,
tokens out, weight and pos read; in the backward grad_out and images read again, weight and
pos gradients written), TFLOP/s (forward 2*B*N*K*D, the weight gradient as much again), its
distance to the roofline floor (``x_roofline_floor``: ms over max(bytes / measured copy rate,
FLOPs / measured matmul rate) on the same device and dtype), and for vitfast and fused the
speed-ups over every other implementation timed with them (paired, round by round). fused rows
also name the config the autotuner chose (``tuned_config``). fused and gemm run on CUDA only (by
default they are timed on the GPU, not on the CPU).

    python -m vitfast.cli.kernels.patch_embed                         # GPU: ViT-B/16, L/14, S/16@384, bf16
    python -m vitfast.cli.kernels.patch_embed --device cpu --json benchmarks/results/   # CPU, small batches
    python -m vitfast.cli.kernels.patch_embed --smoke --json /tmp/x.json                # tiny, checks the script

``collect_rows(...)`` returns the JSON-able rows (``vitfast bench kernels`` runs this script);
``main(argv)`` prints a table and writes ``--json``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .. import benchmarking as bu
from ...ops.patch_embed import cpu_strategy, patch_embed, set_cpu_strategy
from ...ops.reference import normalize_images_ref, patch_embed_ref

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# name: (patch, dim, image size, batch on the GPU, batch on the CPU)
MODELS = {
    "vit_base_patch16_224": (16, 768, 224, 256, 8),
    "vit_large_patch14_224": (14, 1024, 224, 128, 4),
    "vit_small_patch16_384": (16, 384, 384, 128, 4),
}
SMOKE_MODELS = {"smoke_patch16_32x48": (16, 32, (32, 48), 2, 2)}
IMPLS = ("vitfast", "fused", "gemm", "vitfast_gemm", "vitfast_conv", "eager", "compile", "unfold_linear")
CPU_IMPLS = ("vitfast", "vitfast_gemm", "vitfast_conv", "eager", "compile", "unfold_linear")  # the default off CUDA
CPU_STRATEGY_IMPLS = {"vitfast_gemm": "gemm", "vitfast_conv": "conv"}
MODES = ("fwd", "fwd+bwd")
INPUTS = ("float", "uint8", "float_raw", "uint8_hwc")
CPU_INPUTS = ("float", "uint8", "float_raw")  # the default off CUDA


def unfold_linear(images, weight, bias=None, *, cls_token=None, pos_embed=None, mean=None, std=None):
    x = normalize_images_ref(images, mean, std, dtype=weight.dtype)
    B, C, H, W = x.shape
    p = weight.shape[-1]
    x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, (H // p) * (W // p), C * p * p)
    x = F.linear(x, weight.reshape(weight.shape[0], -1), bias)
    if cls_token is not None:
        x = torch.cat([cls_token.expand(B, -1, -1), x], dim=1)
    return x + pos_embed if pos_embed is not None else x


def _forced(backend: str) -> Callable:
    def fn(*args, **kwargs):
        return patch_embed(*args, backend=backend, **kwargs)
    return fn


def config_name(cfg: dict) -> str:
    name = "fused[{BLOCK_M},{BLOCK_N},{BLOCK_K},{num_warps},{num_stages}".format(**cfg)
    return name + (",tma]" if cfg.get("W_TMA") else "]")


def _fused_config(cfg: dict) -> Callable:
    """The fused forward with this config launched directly (what the op does, minus the autotuner)."""
    from ...ops.patch_embed import _pos_rows, _stats, check_patch_embed_args
    from ...ops.triton import patch_embed as tk

    def fn(images, weight, bias=None, *, cls_token=None, pos_embed=None, mean=None, std=None):
        B, N, T, D = check_patch_embed_args(images, weight, bias, cls_token, pos_embed, mean, std)
        out = weight.new_empty((B, T, D))
        pos, mode = _pos_rows(pos_embed, N, T)
        tk.launch_fwd(images, weight.reshape(D, -1).contiguous(), bias,
                      None if cls_token is None else cls_token.reshape(-1), pos, mode, _stats(mean, images.device),
                      _stats(std, images.device), out, weight.shape[-1], config=cfg)
        return out
    return fn


def _impl(name: str, configs: Optional[dict] = None) -> Callable:
    if name == "vitfast":
        return patch_embed
    if name in ("fused", "gemm"):
        return _forced(name)
    if name.startswith("fused["):
        return _fused_config(configs[name])
    if name == "eager":
        return patch_embed_ref
    if name == "unfold_linear":
        return unfold_linear
    if name == "compile":
        return torch.compile(patch_embed_ref, fullgraph=True, dynamic=False)
    raise ValueError(name)


def make_inputs(model: tuple, batch: int, input_kind: str, dtype: torch.dtype, device: torch.device,
                copies: int) -> dict:
    p, D, size, _, _ = model
    H, W = size if isinstance(size, tuple) else (size, size)
    g = torch.Generator(device=device).manual_seed(0)
    if input_kind == "uint8":
        images = [torch.randint(0, 256, (batch, 3, H, W), generator=g, device=device, dtype=torch.uint8)
                  for _ in range(copies)]
    elif input_kind == "uint8_hwc":  # channels_last strides: [B, H, W, 3] frames as [B, 3, H, W]
        images = [torch.randint(0, 256, (batch, H, W, 3), generator=g, device=device, dtype=torch.uint8)
                  .permute(0, 3, 1, 2) for _ in range(copies)]
    else:
        draw = torch.randn if input_kind == "float_raw" else torch.rand  # normalised / [0, 1] pixels
        images = [draw(batch, 3, H, W, generator=g, device=device, dtype=dtype) for _ in range(copies)]
    N = (H // p) * (W // p)
    params = dict(
        weight=torch.randn(D, 3, p, p, generator=g, device=device, dtype=dtype) * (3 * p * p) ** -0.5,
        bias=torch.randn(D, generator=g, device=device, dtype=dtype) * 0.02,
        cls_token=torch.randn(1, 1, D, generator=g, device=device, dtype=dtype) * 0.02,
        pos_embed=torch.randn(1, N + 1, D, generator=g, device=device, dtype=dtype) * 0.02,
    )
    return dict(images=images, params=params, B=batch, N=N, K=3 * p * p, D=D, T=N + 1, input=input_kind)


def work(x: dict, mode: str, dtype: torch.dtype) -> tuple[float, float]:
    """(bytes, FLOPs) the op must move / do at least."""
    es = torch.finfo(dtype).bits // 8
    img = x["images"][0].numel() * x["images"][0].element_size()
    out = x["B"] * x["T"] * x["D"] * es
    params = (x["D"] * x["K"] + x["T"] * x["D"]) * es
    flops = 2.0 * x["B"] * x["N"] * x["K"] * x["D"]
    if mode == "fwd":
        return img + out + params, flops
    return 2 * (img + out + params), 2 * flops  # backward: grad_out and images read, dW and dpos written


def with_cpu_strategy(step: Callable[[int], None], name: str) -> Callable[[int], None]:
    """``step`` (forward, or forward + backward) under one CPU GEMM strategy, the setting in force
    before restored after each call (the implementations of a group alternate round by round)."""
    def run(i):
        previous = set_cpu_strategy(name)
        try:
            step(i)
        finally:
            set_cpu_strategy(previous)
    return run


def make_step(fn: Callable, x: dict, mode: str, device: torch.device) -> Callable[[int], None]:
    """One call of ``fn`` (forward, or forward + backward) on the i-th image buffer."""
    params = x["params"]
    images = x["images"]
    kw = {} if x["input"] == "float_raw" else dict(mean=MEAN, std=STD)
    if mode == "fwd":
        def step(i):
            with torch.no_grad():
                fn(images[i % len(images)], params["weight"], params["bias"], cls_token=params["cls_token"],
                   pos_embed=params["pos_embed"], **kw)
        return step
    leaves = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    gout = torch.randn(x["B"], x["T"], x["D"], device=device, dtype=params["weight"].dtype)

    def step(i):
        for t in leaves.values():
            t.grad = None
        out = fn(images[i % len(images)], leaves["weight"], leaves["bias"], cls_token=leaves["cls_token"],
                 pos_embed=leaves["pos_embed"], **kw)
        out.backward(gout)
    return step


def collect_rows(models: Optional[dict] = None, impls: Optional[Sequence[str]] = None, modes: Sequence[str] = MODES,
                 inputs: Optional[Sequence[str]] = None, dtype_name: Optional[str] = None, device: str = "auto",
                 warmup: Optional[int] = None, iters: Optional[int] = None, argv: Optional[Sequence[str]] = None,
                 smoke: bool = False, env_out: Optional[dict] = None, allow_noisy: bool = True,
                 writes: bool = False) -> list[dict]:
    """Benchmark every (model, input, mode, impl); JSON-able rows stamped with device, versions,
    date and command line. A failing implementation gets a row saying why, never none.
    The implementations of one (model, input, mode) are timed alternately, round by round.
    ``env_out``, if given, receives those environment facts. With ``writes`` and not
    ``allow_noisy``, a busy machine raises :class:`~vitfast.cli.benchmarking.NoisyMachine`."""
    dev, dtype_name, dtype, warmup, iters = bu.microbench_settings(device, dtype_name, warmup, iters,
                                                                   gpu=(5, 30), cpu=(2, 15))
    models = models or (SMOKE_MODELS if smoke else MODELS)
    impls = impls or (IMPLS if dev.type == "cuda" else CPU_IMPLS)
    inputs = inputs or (INPUTS if dev.type == "cuda" else CPU_INPUTS)
    return bu.measured_rows("patch_embed", dev, argv, lambda env: _measure(
        env, models, impls, modes, inputs, dtype_name, dtype, dev, warmup, iters),
        allow_noisy=allow_noisy, writes=writes, env_out=env_out)


def _measure(env: dict, models: dict, impls, modes, inputs, dtype_name: str, dtype: torch.dtype,
             dev: torch.device, warmup: int, iters: int) -> list[dict]:
    gpu = dev.type == "cuda"
    copy_gbps = bu.measure_copy_gbps(dev, None if dev.type == "cuda" else 1 << 27)
    peak = bu.measure_peak_tflops(dev, dtype)
    from ... import _ext  # not at import: this module loads (and says why not) without the extension
    from ...ops.triton import patch_embed as tk

    ext = _ext.load_extension()
    env.update(copy_gbps_measured=round(copy_gbps, 1), matmul_tflops_measured=round(peak["tflops"], 2),
               vitfast_cuda_kernels=bool(ext is not None and ext.with_cuda),
               cpu_patch_embed_strategy=cpu_strategy())
    fns = {}
    rows = []
    for model_name, model in models.items():
        batch = model[3] if gpu else model[4]
        for input_kind in inputs:
            x = make_inputs(model, batch, input_kind, dtype, dev, copies=3 if gpu else 1)
            for mode in modes:
                nbytes, flops = work(x, mode, dtype)
                floor_ms = 1e3 * max(nbytes / (copy_gbps * 1e9), flops / (peak["tflops"] * 1e12))
                configs = {}
                if "fused" in impls and mode == "fwd" and input_kind != "uint8_hwc":  # every config it autotunes over
                    configs = {config_name(c): c for c in tk.candidate_configs(x["images"][0], x["params"]["weight"])}
                group = [dict(op="patch_embed", impl=impl, backend=impl, model=model_name, batch=batch,
                              input=input_kind, dtype=dtype_name, mode=mode, B=batch, N=x["N"], K=x["K"], D=x["D"],
                              bytes=int(nbytes), flops=int(flops), roofline_floor_ms=round(floor_ms, 4), gbps=None,
                              tflops=None) for impl in list(impls) + list(configs)]

                def make(impl):
                    if impl == "compile":  # a fresh compilation per shape and mode (no recompile limit)
                        torch._dynamo.reset()
                        fns.pop(impl, None)
                    if impl.startswith("fused["):
                        return make_step(_impl(impl, configs), x, mode, dev)
                    if impl in CPU_STRATEGY_IMPLS:
                        return with_cpu_strategy(make_step(patch_embed, x, mode, dev), CPU_STRATEGY_IMPLS[impl])
                    if impl not in fns:
                        fns[impl] = _impl(impl)
                    return make_step(fns[impl], x, mode, dev)

                times = bu.time_group(group, make, warmup=warmup, iters=iters, device=dev)
                for row in group:
                    if row["status"] == "ok":
                        row.update(gbps=round(nbytes / (row["ms"] * 1e-3) / 1e9, 2),
                                   tflops=round(flops / (row["ms"] * 1e-3) / 1e12, 4))
                _add_speedups(group, times)
                for row in group:
                    if row["impl"] == "fused" and row["status"] == "ok":
                        row["tuned_config"] = tk.tuned_config()
                rows += group
            x = None  # free the inputs before the next model's
            if gpu:
                torch.cuda.empty_cache()
    return rows


def _add_speedups(group: list[dict], times: dict) -> None:
    """vitfast's rows: ``speedup_vs_<impl>`` (median of the per-round ratios) and the distance
    to the roofline floor."""
    for fast in ("vitfast", "fused", *CPU_STRATEGY_IMPLS):
        bu.add_paired_speedups(group, times, fast=fast)
    for r in group:
        if r.get("status") == "ok":
            r["x_roofline_floor"] = round(r["ms"] / r["roofline_floor_ms"], 3)


def format_table(rows: list[dict]) -> str:
    head = (f"{'model':<24} {'input':<9} {'mode':<8} {'impl':<26} {'ms':>9} {'GB/s':>8} {'TFLOP/s':>8} "
            f"{'vs eager':>8} {'vs comp':>8} {'vs unf':>7} {'vs gemm':>8} {'x floor':>7}")
    lines = [head, "-" * len(head)]
    f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['model']:<24} {r['input']:<9} {r['mode']:<8} {r['impl']:<26} {r['status'][:80]}")
            continue
        line = (f"{r['model']:<24} {r['input']:<9} {r['mode']:<8} {r['impl']:<26} {r['ms']:9.3f} "
                f"{f(r['gbps'], '8.2f')} {f(r['tflops'], '8.4f')}")
        if r["impl"] in ("vitfast", "fused", *CPU_STRATEGY_IMPLS):
            line += "".join(f" {f(r.get(k), w + '.2f')}x" for k, w in (("speedup_vs_eager", "7"),
                            ("speedup_vs_compile", "7"), ("speedup_vs_unfold_linear", "6"), ("speedup_vs_gemm", "7")))
        else:
            line += " " * 36
        line += f" {f(r.get('x_roofline_floor'), '7.2f')}"
        lines.append(line)
    if rows:
        r = rows[0]
        lines.append(f"{r['label']} ({r['device']}, {r.get('cpu_threads')} threads); torch {r['torch']}, vitfast "
                     f"{r['vitfast']}; copy {r['copy_gbps_measured']} GB/s, matmul {r['matmul_tflops_measured']} "
                     f"TFLOP/s ({r['dtype']}); {r['date']}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bu.add_microbench_args(p, MODELS, "patch_embed")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=None,
                   help=f"default: all on CUDA, {' '.join(CPU_IMPLS)} elsewhere")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--inputs", nargs="+", choices=INPUTS, default=None,
                   help=f"default: all on CUDA, {' '.join(CPU_INPUTS)} elsewhere")
    args = p.parse_args(argv)
    models = bu.select_models(MODELS, args.models, args.batch)
    return bu.finish_microbench(args, "patch_embed", lambda env: collect_rows(
        models, args.impls, args.modes, args.inputs, args.dtype, args.device, args.warmup, args.iters, argv,
        smoke=args.smoke, env_out=env, allow_noisy=args.allow_noisy, writes=bool(args.json)), format_table)


if __name__ == "__main__":
    sys.exit(main())
