"""Compile vitfast's Triton kernels for sm_90 without a GPU (run in a child process with
TRITON_INTERPRET unset, so @triton.jit makes real JITFunctions): catches what only the
compiler rejects (non-constexpr globals, tl.dot shapes, shared memory over the H100's
227 KiB). Prints one JSON line per kernel: name, shared bytes, error (or None).
Used by tests/ops/test_gpu_path.py."""

from __future__ import annotations

import json
import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from vitfast.ops import _attention_kernels as ak  # noqa: E402
from vitfast.ops import _fused_kernels as fk  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64"}


def compile_kernel(fn, consts: dict, types: dict, default: str, warps: int, stages: int) -> dict:
    sig = {n: "constexpr" if n in consts else types.get(n, default) for n in fn.arg_names}
    try:
        ck = triton.compile(ASTSource(fn, sig, consts), target=TARGET,
                            options=dict(num_warps=warps, num_stages=stages))
        return dict(shared=ck.metadata.shared, error=None)
    except Exception as e:  # noqa: BLE001 - reported to the test
        return dict(shared=None, error=f"{type(e).__name__}: {str(e)[-400:]}")


def fused(dtype: torch.dtype, C: int):
    ptr, acc = PTR[dtype], "*fp64" if dtype == torch.float64 else "*fp32"
    fp64 = dtype == torch.float64
    ints = {n: "i32" for n in ("M", "C", "rows_per_prog")}
    ints.update({n: "i32" for fn in (fk._ln_fwd_kernel, fk._ln_bwd_kernel, fk._bias_act_fwd_kernel,
                                     fk._bias_act_bwd_kernel, fk._scale_res_fwd_kernel, fk._scale_res_bwd_kernel)
                 for n in fn.arg_names if n.startswith("stride")})
    accs = {n: acc for n in ("MEAN", "RSTD", "DW_P", "DB_P", "DG_P", "DYB_P")}
    types = {**ints, **accs, "eps": "fp32"}
    bm, bc = fk.ln_block(C)
    yield "ln_fwd", fk._ln_fwd_kernel, dict(HAS_Y=True, HAS_YB=True, HAS_G=True, HAS_W=True, HAS_B=True, FP64=fp64,
                                            BLOCK_M=bm, BLOCK_C=bc), types, ptr, fk._warps(bm * bc)["num_warps"]
    bmb = max(1, bm // 2)
    yield "ln_bwd", fk._ln_bwd_kernel, dict(HAS_DXO=True, HAS_Y=True, NEED_DY=True, HAS_YB=True, HAS_G=True,
                                            HAS_W=True, HAS_B=True, FP64=fp64, BLOCK_M=bmb, BLOCK_C=bc), \
        types, ptr, fk._warps(bmb * bc)["num_warps"]
    bm, bc = fk.ew_block(C)
    w = fk._warps(bm * bc)["num_warps"]
    for act in fk.ACT_CODES.values():
        c = dict(HAS_BIAS=True, ACT=act, FP64=fp64, BLOCK_M=bm, BLOCK_C=bc)
        yield f"bias_act_fwd{act}", fk._bias_act_fwd_kernel, c, types, ptr, w
        yield f"bias_act_bwd{act}", fk._bias_act_bwd_kernel, c, types, ptr, w
    yield "scale_res_fwd", fk._scale_res_fwd_kernel, dict(HAS_BIAS=True, HAS_G=True, FP64=fp64, BLOCK_M=bm,
                                                          BLOCK_C=bc), types, ptr, w
    yield "scale_res_bwd", fk._scale_res_bwd_kernel, dict(HAS_BIAS=True, NEED_DB=True, HAS_G=True, FP64=fp64,
                                                          BLOCK_M=bm, BLOCK_C=bc), types, ptr, w


def attention(dtype: torch.dtype, D: int, N: int):
    """The config each kernel gets with autotuning off (the first survivor of pruning)."""
    types = {n: "i32" for n in ("H", "N", "N_BUCKET")}
    types.update(scale="fp32", LSE="*fp32", DELTA="*fp32")
    for fn in (ak._attn_fwd_kernel, ak._attn_bwd_dkdv_kernel, ak._attn_bwd_dq_kernel, ak._bwd_preprocess_kernel):
        types.update({n: "i32" for n in fn.arg_names if n.startswith("stride")})
    previous = ak.set_autotune(False)
    try:
        for kind, fn, configs in (("fwd", ak._attn_fwd_kernel, ak._FWD_CONFIGS),
                                  ("dkdv", ak._attn_bwd_dkdv_kernel, ak._DKDV_CONFIGS),
                                  ("dq", ak._attn_bwd_dq_kernel, ak._DQ_CONFIGS)):
            (c,) = ak._make_prune(kind)(configs, {"N_BUCKET": ak.n_bucket(N), "Q": torch.empty(0, dtype=dtype)},
                                        BLOCK_D=ak.block_d(D))
            consts = dict(HEAD_DIM=D, BLOCK_D=ak.block_d(D), PRECISION=ak.dot_precision(dtype), **c.kwargs)
            yield f"attn_{kind}", fn, consts, types, PTR[dtype], c.num_warps, c.num_stages
    finally:
        ak.set_autotune(previous)
    yield "attn_pre", ak._bwd_preprocess_kernel, dict(HEAD_DIM=D, BLOCK_D=ak.block_d(D), BLOCK_M=64), \
        types, PTR[dtype], 4, 1


def main(argv: list[str]) -> int:
    for spec in argv:  # fused:<dtype>:<C> or attention:<dtype>:<D>:<N>
        kind, dt, *sizes = spec.split(":")
        dtype = getattr(torch, dt)
        gen = fused(dtype, *map(int, sizes)) if kind == "fused" else attention(dtype, *map(int, sizes))
        for item in gen:
            name, fn, consts, types, ptr, warps, *stages = item
            res = compile_kernel(fn, consts, types, ptr, warps, stages[0] if stages else 3)
            print(json.dumps(dict(spec=spec, kernel=name, **res)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
