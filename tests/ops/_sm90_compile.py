"""Compile the Triton kernels that actually run, for sm_90, without a GPU.

Run in a child process with TRITON_INTERPRET unset (so @triton.jit makes real JITFunctions).
Each case calls a registered op (forward, then backward through its autograd) on CPU tensors
laid out as on the GPU; the kernel launches are captured instead of run, and every captured
launch is compiled the way Triton's JIT would compile it on an H100/H200:

* the same specialisation: Triton's own binder sees the real arguments, so pointers and
  integers divisible by 16 get ``tt.divisibility = 16`` and integers equal to 1 become
  constants (without these hints the compiler builds another kernel: no ``cp.async``
  pipelining, other registers and shared memory);
* every config an autotuned kernel can pick: all survivors of its pruning, not only the first;
* the launch options (warps, stages) of the launcher or the config.

One JSON line per compiled kernel: case, kernel, config, shared bytes, registers, spill
bytes (from ``ptxas -v`` on the kernel's PTX), threads per block (the PTX's ``.maxntid``: warp
specialisation adds producer warps), resident blocks per SM (from registers x threads and shared
memory), counts of the instructions that decide speed on Hopper (``wgmma``, ``cp.async``, TMA bulk
copies, 16-byte global loads) and the TMA copies issued before the first barrier wait
(``tma_before_wait``), or the error. ``--table`` prints the same as a table (``--both``: the lines, then the table). Used by tests/ops/test_gpu_path.py.

    python tests/ops/_sm90_compile.py --table                      # every case the ops declare
    python tests/ops/_sm90_compile.py attention:bfloat16:64:197 fused:bfloat16:768 --table
    python tests/ops/_sm90_compile.py attention_fwd:float16:80:4096 --table   # the TMA forwards only
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

import vitfast  # noqa: E402,F401  (registers the ops)
from vitfast.ops.triton import attention as ak  # noqa: E402
from vitfast.ops.triton import fused as fk  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
FP64_SCALARS = False  # --fp64-scalars
FIRST_CONFIG = False  # --first-config
H100_SMS = 132  # H100 SXM and H200: the fused backward kernels size their grids by SMs
INSTRUCTIONS = {  # PTX instruction -> the name reported
    "wgmma": r"\bwgmma\.mma_async",
    "cp_async": r"\bcp\.async\.(?:ca|cg)\.",
    "tma": r"\bcp\.async\.bulk\.tensor",
    "mma_sync": r"\bmma\.sync\.aligned",
    "fp64_math": r"\b(?:add|sub|mul|fma|div|sqrt|rsqrt|rcp|ex2|lg2)(?:\.\w+)*\.f64\b",
    "ld_global_v4": r"\bld\.global(?:\.\w+)*\.v4\.(?:b32|u32|f32|b16)|\bld\.global(?:\.\w+)*\.v2\.(?:b64|u64|f64)",
}


# ------------------------------------------------------------------ capturing launches
class _Launch:
    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append((self.kernel, args, kwargs))


@contextmanager
def captured_launches():
    """Launches made by the ops inside the block are recorded (kernel, args, kwargs), not run."""
    log: list = []
    saved = ak._wrap, fk._wrap, fk._programs_target, ak._tma_device_reasons, ak._device_sms, ak.set_autotune(True)
    ak._wrap = fk._wrap = lambda kernel: _Launch(kernel, log)
    fk._programs_target = lambda device: 4 * H100_SMS
    ak._tma_device_reasons = lambda device: []  # CPU tensors stand in for an sm_90 GPU's
    ak._device_sms = lambda device: H100_SMS
    try:
        yield log
    finally:
        ak._wrap, fk._wrap, fk._programs_target, ak._tma_device_reasons, ak._device_sms = saved[:5]
        ak.set_autotune(saved[5])


def _fwd_bwd(op, *args):
    """Forward of a registered op, then backward through its autograd on every float output."""
    outs = op(*args)
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    outs = [o for o in outs if o.requires_grad]
    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])


def _leaf(shape, dtype):
    return torch.randn(shape, dtype=dtype).requires_grad_()


def _both_layouts(dtype, D, N, B, H, scale, backward=True):
    call = _fwd_bwd if backward else (lambda op, *args: op(*args))
    call(torch.ops.vitfast.attention_packed_fwd, _leaf((B, N, 3 * H * D), dtype), H, scale)
    q, k, v = (_leaf((B, H, N, D), dtype) for _ in range(3))
    call(torch.ops.vitfast.attention_fwd, q, k, v, scale)


def attention_case(dtype: torch.dtype, D: int, N: int, B: int = 2, H: int = 3) -> None:
    """The packed op (FastViT's qkv layout) and the [B, H, N, D] op, forward and backward, with
    every pointer backward variant (ak.BWD_VARIANTS: the 5-matmul kernel deterministic and atomic,
    the 7-matmul pair), all with the pointer forward (``attention_fwd`` cases compile the TMA
    forwards, ``attention_tma_bwd`` the TMA backwards)."""
    scale = D ** -0.5
    previous_fwd = ak.set_forward_variant("pointer")
    try:
        for variant in [v for v in ak.BWD_VARIANTS if v != "auto" and not v.startswith("tma")]:
            previous = ak.set_backward_variant(variant)
            try:
                _both_layouts(dtype, D, N, B, H, scale)
            finally:
                ak.set_backward_variant(previous)
    finally:
        ak.set_forward_variant(previous_fwd)


def attention_fwd_case(dtype: torch.dtype, D: int, N: int, B: int = 2, H: int = 3) -> None:
    """The forward alone, both layouts, with every forward variant but the pointer kernel (which
    ``attention`` cases compile with their backward): the TMA kernels. Kept out of the ``attention``
    cases (the declared ones, already the longest compile) and checked by their own test."""
    previous = ak.set_forward_variant("pointer")
    try:
        with torch.no_grad():
            for variant in [v for v in ak.FWD_VARIANTS if v not in ("auto", "pointer")]:
                ak.set_forward_variant(variant)
                _both_layouts(dtype, D, N, B, H, D ** -0.5, backward=False)
    finally:
        ak.set_forward_variant(previous)


def attention_tma_bwd_case(dtype: torch.dtype, D: int, N: int, B: int = 2, H: int = 3) -> None:
    """Both layouts, forward (pointer) and backward by the TMA backwards ("tma", "tma_atomic")."""
    previous_fwd = ak.set_forward_variant("pointer")
    try:
        for variant in [v for v in ak.BWD_VARIANTS if v.startswith("tma")]:
            previous = ak.set_backward_variant(variant)
            try:
                _both_layouts(dtype, D, N, B, H, D ** -0.5)
            finally:
                ak.set_backward_variant(previous)
    finally:
        ak.set_forward_variant(previous_fwd)


def fused_case(dtype: torch.dtype, C: int, M: int = 2 * 197) -> None:
    """Every fused epilogue op with all its optional tensors, forward and backward."""
    x, y, h = (_leaf((M, C), dtype) for _ in range(3))
    gamma, y_bias, weight, bias = (_leaf((C,), dtype) for _ in range(4))
    ops = torch.ops.vitfast
    _fwd_bwd(ops.add_layer_norm_fwd, x, y, gamma, y_bias, weight, bias, 1e-6, None)
    _fwd_bwd(ops.layer_norm_fwd, x, weight, bias, 1e-6, None)
    for approximate in ("none", "tanh"):
        _fwd_bwd(ops.bias_gelu_fwd, h, bias, approximate)
    _fwd_bwd(ops.bias_scale_residual_fwd, x, y, bias, gamma)


def patch_embed_case(dtype: torch.dtype, image_dtype: torch.dtype, D: int, size: int, p: int, B: int = 16) -> None:
    """The fused patch embedding (vitfast::patch_embed_fused), forward and backward, with ImageNet
    mean/std, class token and positions; float images also get their gradient. B = 16 makes
    B*T a multiple of 16, as at B = 256 (the JIT specialises on it). As on sm_90, the forward's
    candidates include the weight-by-TMA configs (W_TMA=True) and the image gradient takes TMA
    where the weight allows it (not p = 14 in 16-bit: 1176-byte rows); a second pass with
    ``set_weight_tma(False)`` adds the pointer image gradient (the rest it launches is the same)."""
    from vitfast.ops.patch_embed import _stats
    from vitfast.ops.triton import patch_embed as pk

    saved = pk._wrap, pk._programs_target, pk._tma_device_reasons, pk.set_autotune(True), pk.set_weight_tma(True)
    pk._wrap, pk._programs_target = ak._wrap, (lambda device: 2 * H100_SMS)  # ak._wrap: capturing now
    pk._tma_device_reasons = lambda device: []  # CPU tensors stand in for an sm_90 GPU's
    try:
        T = (size // p) ** 2 + 1
        if image_dtype == torch.uint8:
            images = torch.randint(0, 256, (B, 3, size, size), dtype=torch.uint8)
        else:
            images = _leaf((B, 3, size, size), image_dtype)
        mean, std = _stats((0.485, 0.456, 0.406), images.device), _stats((0.229, 0.224, 0.225), images.device)
        for weight_tma in (True, False):
            pk.set_weight_tma(weight_tma)
            _fwd_bwd(torch.ops.vitfast.patch_embed_fused, images, _leaf((D, 3, p, p), dtype), _leaf((D,), dtype),
                     _leaf((1, 1, D), dtype), _leaf((1, T, D), dtype), mean, std)
    finally:
        pk._wrap, pk._programs_target, pk._tma_device_reasons = saved[:3]
        pk.set_autotune(saved[3])
        pk.set_weight_tma(saved[4])


def cases(spec: str):
    """``attention:<dtype>:<D>:<N>`` (the pointer forward and backward variants), ``attention_fwd:<dtype>:<D>:<N>``
    (the TMA forwards only), ``attention_tma_bwd:<dtype>:<D>:<N>`` (the TMA backwards), ``fused:<dtype>:<C>`` or ``patch_embed:<dtype>:<image dtype>:<D>:<size>:<p>``
    -> a function making the launches."""
    kind, dt, *sizes = spec.split(":")
    dtype = getattr(torch, dt)
    if kind == "attention":
        return lambda: attention_case(dtype, *map(int, sizes))
    if kind == "attention_fwd":
        return lambda: attention_fwd_case(dtype, *map(int, sizes))
    if kind == "attention_tma_bwd":
        return lambda: attention_tma_bwd_case(dtype, *map(int, sizes))
    if kind == "fused":
        return lambda: fused_case(dtype, *map(int, sizes))
    if kind == "patch_embed":
        return lambda: patch_embed_case(dtype, getattr(torch, sizes[0]), *map(int, sizes[1:]))
    raise ValueError(f"unknown case {spec!r}: expected attention:<dtype>:<D>:<N>, attention_fwd:<dtype>:<D>:<N>, "
                     "fused:<dtype>:<C> or patch_embed:<dtype>:<image dtype>:<D>:<image size>:<patch>")


def declared_cases() -> list[str]:
    """The sm_90 cases the ops declare (``OpSpec.sm90``), each once."""
    from vitfast.ops.spec import SPECS

    return list(dict.fromkeys(case for spec in SPECS.values() for case in spec.sm90))


# ------------------------------------------------------------------ compiling them
def candidates(kernel, args, kwargs):
    """(JITFunction, kwargs, config label) for each config the launch can run with."""
    if isinstance(kernel, Autotuner):
        fn = kernel.fn
        named = dict(zip(fn.arg_names, args))
        configs = kernel.configs
        if kernel.early_config_prune:
            configs = kernel.early_config_prune(configs, named, **kwargs)
        for c in configs:
            opts = c.all_kwargs()
            label = ",".join(f"{k}={v}" for k, v in opts.items() if k in ("num_warps", "num_stages") or k in c.kwargs)
            yield fn, {**kwargs, **opts}, ("ATOMIC," if kwargs.get("ATOMIC") else "") + label
    else:
        shown = ("num_warps", "num_stages", "W_TMA")  # W_TMA: a launcher's choice (the patch embedding's dx)
        yield kernel, kwargs, ",".join(f"{k}={v}" for k, v in kwargs.items() if k in shown)


def _ptxas() -> str:
    from triton.backends import nvidia

    bundled = os.path.join(os.path.dirname(nvidia.__file__), "bin", "ptxas")
    return bundled if os.path.exists(bundled) else (shutil.which("ptxas") or "ptxas")


def ptxas_usage(ptx: str, arch: str) -> dict:
    """Registers and spill bytes that ptxas reports for this PTX."""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([_ptxas(), f"--gpu-name={arch}", "-v", src, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True)
    text = res.stdout + res.stderr
    num = lambda pat: int(m.group(1)) if (m := re.search(pat, text)) else None  # noqa: E731
    # spills summed over the kernel and the noinline functions it calls (one report each)
    total = lambda pat: sum(map(int, found)) if (found := re.findall(pat, text)) else None  # noqa: E731
    return dict(registers=num(r"Used (\d+) registers"), spill_stores=total(r"(\d+) bytes spill stores"),
                spill_loads=total(r"(\d+) bytes spill loads"), stack=total(r"(\d+) bytes stack frame"))


SM90_REGS, SM90_SMEM, SM90_THREADS, SM90_BLOCKS = 65536, 228 * 1024, 2048, 32  # per SM (H100/H200)


def _threads(ptx: str, num_warps: int) -> int:
    """Threads per block: the PTX's .maxntid/.reqntid (warp specialisation adds warps), else num_warps."""
    m = re.search(r"\.(?:maxntid|reqntid)\s+(\d+)", ptx)
    return int(m.group(1)) if m else 32 * num_warps


def blocks_per_sm(registers, threads: int, shared: int):
    """Resident blocks per SM on sm_90: registers (allocated per warp in units of 256), shared
    memory (+1 KiB reserved per block), threads and the 32-block limit."""
    if not registers:
        return None
    per_warp = -(-registers * 32 // 256) * 256
    by_regs = SM90_REGS // (per_warp * -(-threads // 32))
    return min(by_regs, SM90_SMEM // (shared + 1024), SM90_THREADS // threads, SM90_BLOCKS)


def _tma_before_wait(ptx: str) -> int:
    """TMA copies issued before the first barrier wait in the PTX: 1 where Q's copy is waited for
    before the first K/V copies are issued; Q's and the first K/V tiles' copies in flight together
    would count 3 or more (2-chunk head dims: more)."""
    first_wait = re.search(r"\bmbarrier\.try_wait", ptx)
    head = ptx[:first_wait.start()] if first_wait else ptx
    return len(re.findall(INSTRUCTIONS["tma"], head))


def compile_launch(fn, args, kwargs) -> dict:
    """Compile ``fn`` for sm_90 as the JIT would for ``fn[grid](*args, **kwargs)``."""
    backend = make_backend(TARGET)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    if FP64_SCALARS:  # as Inductor types the Python floats it passes to user-defined Triton kernels
        floats = {name for name, a in zip(fn.arg_names, args) if isinstance(a, float)}
        signature = {k: ("fp64" if k in floats and v == "fp32" else v) for k, v in signature.items()}
    try:
        ck = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET, options=options.__dict__)
    except Exception as e:  # noqa: BLE001 - reported to the test
        return dict(error=f"{type(e).__name__}: {str(e)[-400:]}")
    ptx = ck.asm["ptx"]
    arch = m.group(1) if (m := re.search(r"^\.target\s+(\w+)", ptx, re.M)) else "sm_90a"
    usage = ptxas_usage(ptx, arch)
    threads = _threads(ptx, options.num_warps)
    return dict(error=None, shared=ck.metadata.shared, **usage, threads=threads,
                blocks_per_sm=blocks_per_sm(usage["registers"], threads, ck.metadata.shared),
                tma_before_wait=_tma_before_wait(ptx),
                divisible_16=sum(len(v) for v in attrs.values()) if isinstance(attrs, dict) else None,
                **{name: len(re.findall(pat, ptx)) for name, pat in INSTRUCTIONS.items()})


def compile_case(spec: str):
    """One JSON-able row per (captured launch, candidate config) of the case."""
    with captured_launches() as log:
        cases(spec)()
    seen = set()
    for kernel, args, kwargs in log:
        for i, (fn, kw, label) in enumerate(candidates(kernel, args, kwargs)):
            if FIRST_CONFIG and i:
                break
            key = (fn.__name__, label, tuple(kw.items()), tuple(
                (a.dtype, a.data_ptr() % 16 == 0) + tuple(s % 16 == 0 for s in a.stride()) if isinstance(a, torch.Tensor)
                else (a % 16 == 0, a == 1) if isinstance(a, int) else a for a in args))
            if key in seen:  # the same specialisation twice (e.g. two ops sharing a kernel)
                continue
            seen.add(key)
            yield dict(spec=spec, kernel=fn.__name__, config=label, **compile_launch(fn, args, kw))


def format_table(rows: list[dict]) -> str:
    head = f"{'case':<26} {'kernel':<24} {'config':<44} {'regs':>4} {'thr':>4} {'spill':>5} {'smem':>7} " \
           f"{'blk/SM':>6} {'wgmma':>5} {'cp.as':>5} {'tma':>3} {'tma<w':>5} {'ld.v4':>5}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["error"]:
            lines.append(f"{r['spec']:<26} {r['kernel']:<24} {r['config']:<44} {r['error'][:80]}")
            continue
        spill = (r["spill_stores"] or 0) + (r["spill_loads"] or 0)
        lines.append(f"{r['spec']:<26} {r['kernel']:<24} {r['config']:<44} {r['registers'] or '?':>4} "
                     f"{r['threads']:>4} {spill:>5} {r['shared']:>7} {r['blocks_per_sm'] or '?':>6} {r['wgmma']:>5} "
                     f"{r['cp_async']:>5} {r['tma']:>3} {r['tma_before_wait']:>5} {r['ld_global_v4']:>5}")
    lines.append(f"triton {triton.__version__}, torch {torch.__version__}, target sm_90; "
                 "spill = spill store + load bytes (ptxas -v)")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description="Compile vitfast's Triton kernels for sm_90 as the JIT would.")
    p.add_argument("specs", nargs="*", help="attention:<dtype>:<D>:<N> or fused:<dtype>:<C> (default: every op's "
                   "declared cases, OpSpec.sm90)")
    p.add_argument("--table", action="store_true", help="a table instead of JSON lines")
    p.add_argument("--both", action="store_true", help="JSON lines, then the table")
    p.add_argument("--json", help="also write the rows, with the versions, to this file")
    p.add_argument("--fp64-scalars", action="store_true",
                   help="type float arguments fp64, as Inductor does for user-defined Triton kernels under torch.compile")
    p.add_argument("--first-config", action="store_true", help="only the first surviving config of each autotuned kernel")
    args = p.parse_args(argv)
    global FP64_SCALARS, FIRST_CONFIG
    FP64_SCALARS, FIRST_CONFIG = args.fp64_scalars, args.first_config
    rows = []
    for spec in args.specs or declared_cases():
        for row in compile_case(spec):
            rows.append(row)
            if args.both or not args.table:
                print(json.dumps(row), flush=True)
    if args.table or args.both:
        print(format_table(rows))
    if args.json:
        import datetime

        doc = dict(kind="sm90_compile", triton=triton.__version__, torch=torch.__version__, target="sm_90",
                   date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   command=" ".join(["python", "tests/ops/_sm90_compile.py", *argv]), rows=rows)
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
