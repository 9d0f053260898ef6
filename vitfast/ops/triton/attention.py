"""Triton kernels behind :mod:`vitfast.ops.attention` (FlashAttention-2 style).

Layout: every tensor is addressed through its own (batch, head, token) strides with the
head dimension contiguous (stride 1), so views of a packed ``[B, N, 3*H*D]`` qkv tensor
are read in place. One program handles one ``BLOCK`` of rows of one (batch, head); the
program id is flattened on grid axis 0 (limit 2**31 - 1) so B*H > 65,535 is fine.

Shape handling (what the Triton tutorial assumes away):

* N is any length >= 1. The loop over the other side runs over full ``BLOCK`` tiles
  without masks, then over the remainder in ``TAIL``-wide masked tiles, so at N = 197 a
  64-wide loop wastes at most TAIL - 1 columns instead of 63.
* The head dim D is any multiple of 8 in [16, 256], computed in one or two power-of-two column
  chunks (``d_chunks``: 80 = 64 + 16, 72 -> 64 + 16, 88 -> 64 + 32); columns past D are masked
  loads (zeros), never copies.

Numerics: the softmax runs in fp32 with ``exp2``; ``log2(e)`` is folded into the scale.
The forward stores the natural-log log-sum-exp ``lse`` (fp32, ``[B, H, N]``) for the
backward, which recomputes P = exp(S - lse) tile by tile (kernels in :mod:`.attention_bwd`,
chosen by :func:`backward_variant`: a deterministic 5-matmul kernel, its atomic-dQ twin, or the
deterministic 7-matmul pair). This module holds the pointer forward, every kernel's configs and
autotuner, the launchers and the variant choices; :mod:`.attention_tma` the Hopper forwards and
:mod:`.attention_tiles` the tile helpers of the pointer forward and the backward.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

import torch
import triton
import triton.language as tl

from . import attention_tma as _tma
# the backward kernels (re-exported: the launchers below, the op registration and the sm_90
# compile check reach them here)
from .attention_bwd import (_attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel, _attn_bwd_fused_kernel,  # noqa: F401
                            _bwd_preprocess_kernel)
from .attention_tiles import _a8, _a8x3, _load, _program_tile, _store  # noqa: F401
from . import tma as _tma_host
from . import device_sms, is_interpreted, wrap

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
# Fixed tiles used under the interpreter (and when autotuning is off): small, uneven
# tail so the masked paths run even at the test shapes.
INTERPRET_CONFIG = dict(BLOCK_M=32, BLOCK_N=32, TAIL=16, num_warps=4, num_stages=1)


# ----------------------------------------------------------------------------- forward
# Head dims are handled in up to two column chunks: BLOCK_D (a power of two) and, with SPLIT_D,
# BLOCK_D1 more columns starting at BLOCK_D (a power of two >= 16, masked past HEAD_DIM). D = 80
# runs as 64 + 16 and D = 72 as 64 + 16 (8 masked) instead of a 128-wide tile: each dot is split
# in two and the padded work drops from 60% / 78% to 0% / 11% (see d_chunks). Without SPLIT_D the
# *1 arguments are unused placeholders and the code is the single-chunk kernel.
@triton.jit
def _fwd_inner(acc, acc1, l_i, m_i, q, q1, K, V, stride_kn, stride_vn, lo, hi, N, qk_scale, offs_d, offs_d1,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK_N: tl.constexpr,
               MASK_D: tl.constexpr, SPLIT_D: tl.constexpr, MASK_D1: tl.constexpr, PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kT = _load(K + offs_n[None, :] * stride_kn + offs_d[:, None],
                   offs_n[None, :] < N, offs_d[:, None] < HEAD_DIM, MASK_N, MASK_D)
        s = tl.dot(q, kT, input_precision=PRECISION)
        if SPLIT_D:
            kT1 = _load(K + offs_n[None, :] * stride_kn + offs_d1[:, None],
                        offs_n[None, :] < N, offs_d1[:, None] < HEAD_DIM, MASK_N, MASK_D1)
            s += tl.dot(q1, kT1, input_precision=PRECISION)
        s = s * qk_scale
        if MASK_N:
            s = tl.where(offs_n[None, :] < N, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load(V + offs_n[:, None] * stride_vn + offs_d[None, :],
                  offs_n[:, None] < N, offs_d[None, :] < HEAD_DIM, MASK_N, MASK_D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        if SPLIT_D:
            v1 = _load(V + offs_n[:, None] * stride_vn + offs_d1[None, :],
                       offs_n[:, None] < N, offs_d1[None, :] < HEAD_DIM, MASK_N, MASK_D1)
            acc1 = acc1 * alpha[:, None] + tl.dot(p.to(v1.dtype), v1, input_precision=PRECISION)
        m_i = m_new
    return acc, acc1, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
    H, N, N_BUCKET, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT_D: tl.constexpr, BLOCK_D1: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL: tl.constexpr,
    STRIDE8: tl.constexpr = False,
):
    MASK_D: tl.constexpr = BLOCK_D > HEAD_DIM  # one chunk wider than D: masked loads (zeros)
    MASK_D1: tl.constexpr = BLOCK_D + BLOCK_D1 > HEAD_DIM
    if STRIDE8:
        stride_qb, stride_qh, stride_qn = _a8x3(stride_qb, stride_qh, stride_qn)
        stride_kb, stride_kh, stride_kn = _a8x3(stride_kb, stride_kh, stride_kn)
        stride_vb, stride_vh, stride_vn = _a8x3(stride_vb, stride_vh, stride_vn)
        stride_ob, stride_oh, stride_on = _a8x3(stride_ob, stride_oh, stride_on)
    b, h, bh, start_m = _program_tile(N, H, BLOCK_M)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    O += b * stride_ob + h * stride_oh
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_d1 = BLOCK_D + tl.arange(0, BLOCK_D1)
    mask_m = offs_m[:, None] < N
    mask_d = offs_d[None, :] < HEAD_DIM
    mask_d1 = offs_d1[None, :] < HEAD_DIM
    q = _load(Q + offs_m[:, None] * stride_qn + offs_d[None, :], mask_m, mask_d, True, MASK_D)
    if SPLIT_D:
        q1 = _load(Q + offs_m[:, None] * stride_qn + offs_d1[None, :], mask_m, mask_d1, True, MASK_D1)
    else:
        q1 = q

    # fp32 even when the caller passes a float64 scalar (Inductor types Python floats given to
    # user Triton kernels as fp64): otherwise the scores, and the loop-carried accumulators, turn fp64
    scale = tl.cast(scale, tl.float32)
    qk_scale = scale * 1.4426950408889634  # exp(x * scale) == exp2(x * scale * log2(e))
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
    n_full = (N // BLOCK_N) * BLOCK_N
    acc, acc1, l_i, m_i = _fwd_inner(acc, acc1, l_i, m_i, q, q1, K, V, stride_kn, stride_vn, 0, n_full, N,
                                     qk_scale, offs_d, offs_d1, HEAD_DIM, BLOCK_N, False, MASK_D, SPLIT_D,
                                     MASK_D1, PRECISION)
    acc, acc1, l_i, m_i = _fwd_inner(acc, acc1, l_i, m_i, q, q1, K, V, stride_kn, stride_vn, n_full, N, N,
                                     qk_scale, offs_d, offs_d1, HEAD_DIM, TAIL, True, MASK_D, SPLIT_D,
                                     MASK_D1, PRECISION)
    acc = acc / l_i[:, None]
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
    _store(O + offs_m[:, None] * stride_on + offs_d[None, :], acc.to(O.dtype.element_ty),
           mask_m, mask_d, MASK_D)
    if SPLIT_D:
        acc1 = acc1 / l_i[:, None]
        _store(O + offs_m[:, None] * stride_on + offs_d1[None, :], acc1.to(O.dtype.element_ty),
               mask_m, mask_d1, MASK_D1)
    tl.store(LSE + bh * N + offs_m, lse, mask=offs_m < N)


# ------------------------------------------------------------------- configs, tuning
INTERPRET = is_interpreted(_attn_fwd_kernel)
# Autotuning on the GPU; off (first surviving config) when VITFAST_ATTENTION_AUTOTUNE=0
# or after set_autotune(False), e.g. in tests. Under the interpreter the fixed
# INTERPRET_CONFIG is launched directly.
_AUTOTUNE = os.environ.get("VITFAST_ATTENTION_AUTOTUNE", "1") != "0"


def set_autotune(enabled: bool) -> bool:
    """Turn autotuning on or off; returns the previous setting."""
    global _AUTOTUNE
    previous, _AUTOTUNE = _AUTOTUNE, bool(enabled)
    return previous


def _cfg(bm: int, bn: int, tail: int, warps: int, stages: int) -> triton.Config:
    return triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, TAIL=tail), num_warps=warps, num_stages=stages)


# (BLOCK_M, BLOCK_N, TAIL, warps, stages). Each kernel has primary configs, the ones the
# autotuner times, and secondary ones, tried only where no primary fits (short N, fp32 at large
# D); the first survivor is the untuned default. The primaries are cut by measurement: on an
# H200 (triton 3.6, bf16 and fp16, N 197/257/577/1025 at D 64 and 80, N 4096 at D 128; every
# candidate timed alone, benchmarks/results/2026-12-01_nvidia-h200_attention_candidates.json)
# they are the configs within 7% of the fastest at one shape at least; the first of each was
# the fastest at 12 (forward), 17 (dK/dV) and 16 (dQ) of the 18 shapes, and the old first
# survivors were 1.1-1.7x slower. Uneven tiles and 16-wide tails suit ViT lengths: a 128x128
# tile does 1.69x the useful work at N = 197, 64x32 with a 16-wide tail 1.21x. The pruning
# limits come from compiling every candidate for sm_90 and reading ptxas's report.
_FWD_CONFIGS = [
    _cfg(64, 64, 16, 4, 3), _cfg(128, 32, 16, 8, 3), _cfg(64, 64, 64, 4, 3), _cfg(128, 64, 16, 8, 3),
    _cfg(64, 32, 16, 4, 4), _cfg(128, 64, 64, 8, 3),
    # secondary
    _cfg(128, 64, 64, 4, 3), _cfg(64, 64, 64, 4, 4), _cfg(128, 128, 128, 8, 2), _cfg(128, 128, 16, 8, 2),
    _cfg(64, 64, 64, 8, 2), _cfg(64, 32, 32, 8, 3), _cfg(64, 128, 128, 8, 3), _cfg(64, 128, 32, 8, 2),
    _cfg(32, 32, 16, 4, 3), _cfg(16, 16, 16, 2, 2),
]
# dK/dV: BLOCK_N keys owned, loop over queries in BLOCK_M (then TAIL).
_DKDV_CONFIGS = [
    _cfg(32, 64, 16, 4, 3), _cfg(32, 64, 32, 4, 3), _cfg(16, 64, 16, 4, 3), _cfg(32, 128, 16, 8, 3),
    _cfg(32, 128, 32, 8, 3),
    # secondary
    _cfg(16, 128, 16, 8, 3), _cfg(64, 128, 64, 8, 2), _cfg(64, 64, 64, 8, 2), _cfg(32, 64, 32, 8, 3),
    _cfg(16, 32, 16, 4, 3), _cfg(16, 16, 16, 2, 2),
]
# dQ: BLOCK_M queries owned, loop over keys in BLOCK_N (then TAIL).
_DQ_CONFIGS = [
    _cfg(64, 32, 16, 4, 3), _cfg(64, 64, 64, 4, 2), _cfg(64, 32, 32, 4, 3),
    # secondary
    _cfg(128, 32, 16, 8, 3), _cfg(128, 32, 32, 8, 3), _cfg(128, 64, 64, 8, 2), _cfg(128, 16, 16, 8, 3),
    _cfg(64, 64, 16, 8, 3), _cfg(64, 32, 32, 8, 2), _cfg(32, 32, 16, 4, 3), _cfg(32, 16, 16, 4, 3),
    _cfg(16, 16, 16, 2, 2),
]
# The 5-matmul backward (fused: one program per (batch, head); atomic: one per key tile): BLOCK_N
# keys owned, loop over queries in BLOCK_M (then TAIL), as dK/dV, plus a [BLOCK_M, D] dQ tile.
# Not yet measured on a GPU: the first is the dK/dV kernel's measured best, the others the tiles
# that compiled for sm_90 without spills (the deterministic kernel needs 40-60 more registers
# than the atomic one: its loop over key tiles; see _fits); cut them by the candidates' JSON.
_FUSED_CONFIGS = [
    _cfg(32, 64, 16, 4, 3), _cfg(16, 64, 16, 4, 3), _cfg(32, 128, 16, 8, 3), _cfg(64, 128, 16, 8, 2),
    _cfg(16, 128, 16, 8, 3), _cfg(64, 64, 16, 8, 2),
    # secondary
    _cfg(32, 128, 16, 8, 2), _cfg(16, 64, 16, 8, 3), _cfg(16, 32, 16, 4, 3), _cfg(16, 16, 16, 2, 2),
]


def _tcfg(bm: int, bn: int, warps: int, stages: int, ws: bool) -> triton.Config:
    return triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, WARP_SPEC=ws), num_warps=warps, num_stages=stages)


def _pcfg(bm: int, bn: int, warps: int, stages: int, per_sm: int) -> triton.Config:
    return triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, PER_SM=per_sm), num_warps=warps, num_stages=stages)


# The TMA forward (attention_tma): (BLOCK_M, BLOCK_N, warps, stages, warp-specialised). No GPU
# timing yet: the tiles are the pointer kernel's measured best shapes and the Hopper tutorial's,
# each with and without warp specialisation, kept where they compile for sm_90 without spills
# (tests/ops/_sm90_compile.py); the 64-row tiles fit two or more programs per SM, which short
# sequences (N = 197, 257: 4 and 5 query tiles per head) need. Cut them by the candidates' JSON.
_FWD_TMA_CONFIGS = [
    _tcfg(64, 64, 4, 3, False), _tcfg(128, 64, 4, 3, True), _tcfg(128, 128, 4, 2, True), _tcfg(64, 64, 4, 3, True),
    _tcfg(128, 64, 8, 3, False), _tcfg(64, 32, 4, 3, False), _tcfg(128, 128, 8, 2, False),
    # secondary
    _tcfg(64, 32, 4, 4, True), _tcfg(32, 32, 4, 3, False), _tcfg(16, 16, 2, 2, False),
]
# The persistent TMA forward: (BLOCK_M, BLOCK_N, warps, stages, programs per SM). PER_SM is what
# the compiled kernel's registers and shared memory let an SM hold (the sm_90 table).
_FWD_TMA_PERSISTENT_CONFIGS = [
    _pcfg(64, 64, 4, 3, 2), _pcfg(128, 64, 8, 3, 1), _pcfg(64, 32, 4, 3, 3), _pcfg(128, 128, 8, 2, 1),
    _pcfg(64, 64, 4, 3, 1), _pcfg(64, 32, 4, 3, 2),
    # secondary
    _pcfg(32, 32, 4, 3, 2), _pcfg(16, 16, 2, 2, 4),
]
def _bcfg(bm: int, bn: int, warps: int, stages: int) -> triton.Config:
    return triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn), num_warps=warps, num_stages=stages)


# The TMA 5-matmul backward (attention_tma: "tma" deterministic, "tma_atomic"): (BLOCK_M queries per
# step, BLOCK_N keys owned, warps, stages). Not yet run on a GPU: the pointer 5-matmul kernel's tiles
# (less TAIL, which zero fill replaces), kept where they compile for sm_90 without spills
# (tests/ops/_sm90_compile.py). Cut them by the candidates' JSON.
_BWD_TMA_CONFIGS = [
    _bcfg(32, 64, 4, 3), _bcfg(16, 64, 4, 3), _bcfg(32, 128, 8, 3), _bcfg(64, 128, 8, 2), _bcfg(16, 128, 8, 3),
    _bcfg(64, 64, 8, 2),
    # secondary
    _bcfg(16, 32, 4, 3), _bcfg(16, 16, 2, 2),
]
PRIMARY = {"fwd": 6, "dkdv": 5, "dq": 3, "fused": 6, "atomic": 6,  # how many configs head each list
           "fwd_tma": 7, "fwd_tma_persistent": 6, "bwd_tma": 6, "bwd_tma_atomic": 6}
# the _fits estimate each kind is pruned by (the TMA kernels hold what their pointer twins do)
_FITS_KIND = {"fwd_tma": "fwd", "fwd_tma_persistent": "fwd", "bwd_tma_atomic": "atomic"}  # "bwd_tma": its own
_OWNS_KEYS = ("dkdv", "fused", "atomic", "bwd_tma", "bwd_tma_atomic")  # BLOCK_N owned, BLOCK_M looped
MIN_TILE = 16  # smallest owned tile in any config (bounds the grid size)
_SMEM_BYTES = 227 * 1024  # H100's per-block limit; configs over it would fail to compile


def _fits(kind: str, own: int, loop: int, block_d: int, warps: int, stages: int, el: int) -> bool:
    """Shared memory and register estimates that match ptxas on sm_90 to ~1%.

    Shared: the owned tiles (q; k and v for dK/dV; q and dO for dQ) plus ``stages`` copies
    of the two streamed tiles. fp32 inputs (TF32 / 3xTF32 dots) hold the owned tiles twice
    (Triton 3.8 for sm_90, every fp32 candidate at D = 64, 128, 256: within 512 bytes,
    never under); without that term the first fp32 candidate at D >= 80 needed up to
    360,960 bytes and failed to launch when autotuning was off. Registers: fp32 elements
    per thread of the accumulators (one [own, D] tile, two for dK/dV) plus one [own, loop]
    score tile. ptxas spilled above 144 per thread for dK/dV, and at 128 per thread with 4
    warps for the other two (16-bit inputs; fp32 inputs spill in every config, see
    ``dot_precision``). The 5-matmul kernels add the [loop, D] dQ tile to the registers, and K
    a second time (the dQ dot's operand, another layout) and the staged dS^T to shared memory
    (16-bit, D = 64-96: within 5% of ptxas, but 10-16% under at BLOCK_M = 64; fp32 over); the
    deterministic one ("fused") has its own register limits (see below).
    """
    if kind == "bwd_tma":  # the deterministic TMA kernel, fitted to its sm_90 compiles (triton 3.6 and 3.8):
        # no spills under the atomic kernel's limits up to 96 columns (TMA's descriptors free the pointer
        # registers that the pointer kernel's stricter limits allow for), but 56 bytes at 128 (64 x 64)
        kind = "atomic" if block_d <= 96 else "fused"
    five = kind in ("fused", "atomic")  # the 5-matmul kernels also hold K a second time (dQ's operand)
    owned = (1 if kind == "fwd" else 3 if five else 2) * own * block_d * (2 if el == 4 else 1)
    smem = (owned + stages * 2 * loop * block_d) * el + 1024
    two = kind in ("dkdv", "fused", "atomic")  # dK and dV accumulators
    per_thread = ((2 if two else 1) * own * block_d + own * loop) / (32 * warps)
    if five:  # + the dQ tile, and dS^T staged for the dQ dot
        per_thread += loop * block_d / (32 * warps)
        smem += own * loop * el
    if kind == "dkdv":
        regs_ok = per_thread <= 144
    elif kind == "fused":  # fitted to 18 bf16 compiles at D = 64, 80, 96 (triton 3.8) of the kernel
        # before its key tiles went through a noinline call (now 10-35 registers fewer, so these
        # limits are conservative): 8 warps over 64 owned rows spill early, a third stage costs
        limit = 98 if warps == 4 else (64 if own < 128 else (112 if stages >= 3 else 124))
        regs_ok = per_thread <= limit
    else:
        regs_ok = per_thread < 128 or (warps == 8 and per_thread <= 128)
    return smem <= _SMEM_BYTES and regs_ok


def _fwd_smem(own: int, loop: int, block_d: int, stages: int, el: int) -> int:
    """The forward's shared-memory estimate of :func:`_fits` (bytes)."""
    return ((2 if el == 4 else 1) * own * block_d + stages * 2 * loop * block_d) * el + 1024


_SMEM_PER_SM = 228 * 1024  # sm_90: what the blocks resident on one SM share
# The TMA kernels' shared memory beyond _fits' estimate (triton 3.6 and 3.8 for sm_90: the
# persistent kernel's rank-4 boxes and barriers, up to 16 KiB more): a persistent config keeps PER_SM
# programs per SM only where that many fit, else it would run in waves.
_TMA_SLACK = 16 * 1024


def _fits_warp_specialized(own: int, loop: int, block_d: int, warps: int, stages: int, el: int) -> bool:
    """A warp-specialised TMA forward config: Triton specialises only at 4 warps (384 threads: the
    consumers get 232 registers by setmaxnreg, none spilled up to 128 x 128 at D = 128 on sm_90); at
    8 it silently does not (256 threads, the plain kernel). Shared memory: the plain kernel's plus a
    128-row [rows, D] buffer (measured: +16 KiB at D = 64, +32 KiB at D = 128, 16-bit). Not for fp32
    inputs: their 3xTF32 dots crash the warp-specialisation pass (triton 3.8, sm_90)."""
    return (warps == 4 and el == 2
            and _fwd_smem(own, loop, block_d, stages, el) + 128 * block_d * el <= _SMEM_BYTES)


def _make_prune(kind: str):
    fits_kind = _FITS_KIND.get(kind, kind)

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        n = args["N_BUCKET"]
        block_d = args["BLOCK_D"] + (args["BLOCK_D1"] if args.get("SPLIT_D") else 0)  # both column chunks
        el = args["Q"].dtype.itemsize
        n_cap = max(16, triton.next_power_of_2(int(n)))
        def survivors(candidates):
            kept = []
            for c in candidates:
                bm, bn, tail = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs.get("TAIL", 0)
                own, loop = (bn, bm) if kind in _OWNS_KEYS else (bm, bn)
                if own > n_cap or loop > n_cap or tail > loop:
                    continue
                if c.kwargs.get("WARP_SPEC"):
                    if _fits_warp_specialized(own, loop, block_d, c.num_warps, c.num_stages, el):
                        kept.append(c)
                elif _fits(fits_kind, own, loop, block_d, c.num_warps, c.num_stages, el) and (
                        c.kwargs.get("PER_SM", 1) * (_fwd_smem(own, loop, block_d, c.num_stages, el) + _TMA_SLACK)
                        <= _SMEM_PER_SM):
                    kept.append(c)
            return kept

        n = PRIMARY[kind] if len(configs) > PRIMARY[kind] else len(configs)
        kept = survivors(configs[:n]) or survivors(configs[n:]) or [configs[-1]]
        return kept if _AUTOTUNE else kept[:1]

    return prune


def _autotune(configs, kind):
    return triton.autotune(
        configs=configs,
        key=["N_BUCKET", "HEAD_DIM", "PRECISION"],  # + the dtypes of the tensor arguments
        prune_configs_by={"early_config_prune": _make_prune(kind)},
        # the atomic kernels add into the dQ scratch: zeroed before each timed run, or the
        # autotuner's runs would add up in the result of the call that tuned them
        reset_to_zero=["DQA"] if kind in ("atomic", "bwd_tma_atomic") else None,
    )


_attn_fwd_tuned = _autotune(_FWD_CONFIGS, "fwd")(_attn_fwd_kernel)
_attn_bwd_dkdv_tuned = _autotune(_DKDV_CONFIGS, "dkdv")(_attn_bwd_dkdv_kernel)
_attn_bwd_dq_tuned = _autotune(_DQ_CONFIGS, "dq")(_attn_bwd_dq_kernel)
_attn_bwd_fused_tuned = _autotune(_FUSED_CONFIGS, "fused")(_attn_bwd_fused_kernel)
_attn_bwd_atomic_tuned = _autotune(_FUSED_CONFIGS, "atomic")(_attn_bwd_fused_kernel)
_attn_fwd_tma_tuned = _autotune(_FWD_TMA_CONFIGS, "fwd_tma")(_tma._attn_fwd_tma_kernel)
_attn_fwd_tma_persistent_tuned = _autotune(_FWD_TMA_PERSISTENT_CONFIGS, "fwd_tma_persistent")(
    _tma._attn_fwd_tma_persistent_kernel)
_attn_bwd_tma_tuned = _autotune(_BWD_TMA_CONFIGS, "bwd_tma")(_tma._attn_bwd_tma_kernel)
_attn_bwd_tma_atomic_tuned = _autotune(_BWD_TMA_CONFIGS, "bwd_tma_atomic")(_tma._attn_bwd_tma_kernel)
_CONFIGS = {"fwd": _FWD_CONFIGS, "dkdv": _DKDV_CONFIGS, "dq": _DQ_CONFIGS, "fused": _FUSED_CONFIGS,
            "atomic": _FUSED_CONFIGS, "fwd_tma": _FWD_TMA_CONFIGS, "fwd_tma_persistent": _FWD_TMA_PERSISTENT_CONFIGS,
            "bwd_tma": _BWD_TMA_CONFIGS, "bwd_tma_atomic": _BWD_TMA_CONFIGS}
_TUNED = {"fwd": _attn_fwd_tuned, "dkdv": _attn_bwd_dkdv_tuned, "dq": _attn_bwd_dq_tuned,
          "fused": _attn_bwd_fused_tuned, "atomic": _attn_bwd_atomic_tuned, "fwd_tma": _attn_fwd_tma_tuned,
          "fwd_tma_persistent": _attn_fwd_tma_persistent_tuned, "bwd_tma": _attn_bwd_tma_tuned,
          "bwd_tma_atomic": _attn_bwd_tma_atomic_tuned}
_RAW = {"fwd_tma": _tma._attn_fwd_tma_kernel, "fwd_tma_persistent": _tma._attn_fwd_tma_persistent_kernel,
        "bwd_tma": _tma._attn_bwd_tma_kernel, "bwd_tma_atomic": _tma._attn_bwd_tma_kernel}


# -------------------------------------------------------------------------- launchers
def n_bucket(n: int) -> int:
    """Autotuning bucket for sequence length ``n``: exact to 16 up to 256 (where tile
    waste is decided), to 64 up to 1024, to 256 beyond."""
    if n <= 256:
        return (n + 15) // 16 * 16
    if n <= 1024:
        return (n + 63) // 64 * 64
    return (n + 255) // 256 * 256


def d_chunks(head_dim: int) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_D1) column chunks covering ``head_dim``: one power-of-two chunk (BLOCK_D1 =
    0), or a power of two plus a second power-of-two chunk >= 16 when the two are narrower than
    the next power of two: 80 = 64 + 16, 72 -> 64 + 16, 88 -> 64 + 32, 96 = 64 + 32, 48 = 32 + 16,
    160 = 128 + 32; 104, 112 and 120 stay 128 (64 + 64 would be no narrower)."""
    full = max(MIN_HEAD_DIM, triton.next_power_of_2(head_dim))
    if full == head_dim or head_dim <= MIN_HEAD_DIM:
        return full, 0
    d0 = full // 2
    d1 = max(MIN_HEAD_DIM, triton.next_power_of_2(head_dim - d0))
    return (full, 0) if d0 + d1 >= full else (d0, d1)


def block_d(head_dim: int) -> int:
    """Columns the kernels compute for ``head_dim`` (both chunks; the rest of a chunk is masked)."""
    return sum(d_chunks(head_dim))


def stride8(*tensors: torch.Tensor) -> bool:
    """True when every (batch, head, token) stride is a multiple of 8 elements and every base
    pointer 16-byte aligned, but some stride is not a multiple of 16 (else Triton's own
    specialisation already knows): then the kernels may round the strides (``_a8``) to tell the
    compiler, which restores 16-byte, pipelined loads at D = 72 and 88."""
    strides = [st for t in tensors for st in t.stride()[:3]]
    if all(st % 16 == 0 for st in strides):
        return False
    # base_aligned16, not data_ptr(): under torch.compile the op body is traced with fake tensors
    return all(st % 8 == 0 for st in strides) and all(_tma_host.base_aligned16(t) for t in tensors)


def _d_meta(head_dim: int) -> dict:
    """The head-dim constexprs of the attention kernels (BLOCK_D1 = 16 is an unused placeholder
    without a second chunk)."""
    d0, d1 = d_chunks(head_dim)
    return dict(HEAD_DIM=head_dim, BLOCK_D=d0, SPLIT_D=d1 > 0, BLOCK_D1=d1 or MIN_HEAD_DIM)


def grid_size(batch_heads: int, n: int, block: int) -> tuple[int]:
    """Launch grid: all (batch, head, tile) programs flattened on axis 0, whose limit
    (2**31 - 1) is far above axes 1 and 2 (65,535)."""
    return (triton.cdiv(n, block) * batch_heads,)


def dot_precision(dtype: torch.dtype) -> str:
    """How fp32 inputs are multiplied (16-bit inputs ignore this).

    TF32 when ``torch.backends.cuda.matmul.allow_tf32`` is set, else 3xTF32: split
    operands on the tensor cores, close to fp32 accuracy. Plain fp32 ("ieee") FMA dots
    spill tens of KiB per thread on sm_90 at these tile sizes (ptxas), so they are not used.
    """
    if dtype != torch.float32:
        return "ieee"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"


def _wrap(kernel):
    return wrap(kernel, INTERPRET)


def _pick(raw, tuned, config: Optional[dict]):
    """Kernel and launch kwargs: a given config (tests), the fixed interpreter config,
    or the autotuner."""
    if config is None and INTERPRET:
        config = INTERPRET_CONFIG
    if config is None:
        return _wrap(tuned), {}
    meta = dict(config)
    if INTERPRET:  # the interpreter takes no launch options
        meta.pop("num_warps", None)
        meta.pop("num_stages", None)
    return _wrap(raw), meta


def _s(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, token) strides of a [B, H, N, D] tensor."""
    return t.stride(0), t.stride(1), t.stride(2)


def launch_fwd(q, k, v, out, lse, scale: float, config: Optional[dict] = None,
               variant: Optional[str] = None) -> None:
    """out[b, h] = softmax(q k^T * scale) v and lse[b, h] = logsumexp(q k^T * scale), by the
    forward :func:`forward_variant` picks (``config`` is that variant's)."""
    chosen = forward_variant(q, k, v, out, variant)
    if chosen != "pointer":
        return _launch_fwd_tma(q, k, v, out, lse, scale, config, persistent=chosen == "tma_persistent")
    B, H, N, D = q.shape
    kernel, meta = _pick(_attn_fwd_kernel, _attn_fwd_tuned, config)
    kernel[lambda m: grid_size(B * H, N, m["BLOCK_M"])](
        q, k, v, out, lse, *_s(q), *_s(k), *_s(v), *_s(out), H, N, n_bucket(N), scale,
        PRECISION=dot_precision(q.dtype), STRIDE8=stride8(q, k, v, out), **_d_meta(D), **meta,
    )


def launch_bwd_preprocess(out, dout) -> torch.Tensor:
    """delta[b, h, i] = sum_d out[b, h, i, d] * dout[b, h, i, d] (float32)."""
    B, H, N, D = out.shape
    delta = torch.empty((B, H, N), device=out.device, dtype=torch.float32)
    pre_block = 64 if not INTERPRET else 32
    _wrap(_bwd_preprocess_kernel)[grid_size(B * H, N, pre_block)](
        out, dout, delta, *_s(out), *_s(dout), H, N, HEAD_DIM=D,
        BLOCK_D=max(MIN_HEAD_DIM, triton.next_power_of_2(D)), BLOCK_M=pre_block,
    )
    return delta


def launch_bwd_dkdv(dout, q, k, v, lse, delta, dk, dv, scale: float, config: Optional[dict] = None) -> None:
    """dk and dv (one program per BLOCK_N keys, looping over the queries)."""
    B, H, N, D = q.shape
    kernel, meta = _pick(_attn_bwd_dkdv_kernel, _attn_bwd_dkdv_tuned, config)
    kernel[lambda m: grid_size(B * H, N, m["BLOCK_N"])](
        q, k, v, dout, lse, delta, dk, dv, *_s(q), *_s(k), *_s(v), *_s(dout), *_s(dk), *_s(dv),
        H, N, n_bucket(N), scale, PRECISION=dot_precision(q.dtype), STRIDE8=stride8(q, k, v, dout, dk, dv),
        **_d_meta(D), **meta,
    )


def launch_bwd_dq(dout, q, k, v, lse, delta, dq, scale: float, config: Optional[dict] = None) -> None:
    """dq (one program per BLOCK_M queries, looping over the keys)."""
    B, H, N, D = q.shape
    kernel, meta = _pick(_attn_bwd_dq_kernel, _attn_bwd_dq_tuned, config)
    kernel[lambda m: grid_size(B * H, N, m["BLOCK_M"])](
        q, k, v, dout, lse, delta, dq, *_s(q), *_s(k), *_s(v), *_s(dout), *_s(dq),
        H, N, n_bucket(N), scale, PRECISION=dot_precision(q.dtype), STRIDE8=stride8(q, k, v, dout, dq),
        **_d_meta(D), **meta,
    )


def launch_bwd_fused(dout, q, k, v, lse, delta, dq, dk, dv, scale: float, config: Optional[dict] = None,
                     atomic: bool = False) -> None:
    """dq, dk and dv in one 5-matmul kernel: one program per (batch, head), deterministic, or with
    ``atomic`` one per BLOCK_N keys adding dq atomically (see _attn_bwd_fused_kernel)."""
    B, H, N, D = q.shape
    dp = block_d(D)
    # fp32 dq scratch: the deterministic kernel's first key tile stores, the atomic one only adds
    dqa = (torch.zeros if atomic else torch.empty)((B * H, N, dp), device=q.device, dtype=torch.float32)
    kind = "atomic" if atomic else "fused"
    kernel, meta = _pick(_attn_bwd_fused_kernel, _TUNED[kind], config)
    grid = (lambda m: grid_size(B * H, N, m["BLOCK_N"])) if atomic else (lambda m: (B * H,))
    kernel[grid](
        q, k, v, dout, lse, delta, dqa, dq, dk, dv, *_s(q), *_s(k), *_s(v), *_s(dout), *_s(dq), *_s(dk), *_s(dv),
        dp, H, N, n_bucket(N), scale, PRECISION=dot_precision(q.dtype), ATOMIC=atomic,
        STRIDE8=stride8(q, k, v, dout, dq, dk, dv), **_d_meta(D), **meta,
    )
    if atomic:
        dq.copy_(dqa.view(B, H, N, dp)[..., :D])


# ---------------------------------------------------------------- forward variant
FWD_VARIANTS = ("auto", "pointer", "tma", "tma_persistent")
TMA_MAX_BLOCK_D = 128  # widest head dim (both chunks) the TMA kernels are compiled and checked for
# "auto" takes no TMA forward yet: no GPU has run the TMA kernels (neither numerics nor timings),
# three of the seven primary configs are warp-specialised, which the interpreter cannot check
# (Triton's own attention tutorial tests warp specialisation on Blackwell only), and an autotuner
# picks by speed, never by result. AUTO_TMA_MIN_N = None keeps it so; the GPU check's tests
# (test_every_tma_config_cuda, test_tma_forward_variants_cuda) and its candidates JSON decide when
# to set it. Set, auto would take "tma" for long sequences only (N >= AUTO_TMA_MIN_N: a pipelined,
# warp-specialised loop over many key tiles is what Hopper rewards; 1024 was the plan) and keep the
# pointer kernel, whose configs were measured, at the ViT lengths; never for fp32 inputs (3xTF32
# dots: every TMA config at D = 128 spills, 1460 bytes at 64 x 32, triton 3.8), never
# "tma_persistent", and never while torch.compile traces the op (Inductor's launch of device-side
# descriptors is unverified). VITFAST_ATTENTION_FWD=tma or set_forward_variant("tma") opts in now.
AUTO_TMA_MIN_N: Optional[int] = None
_FWD = os.environ.get("VITFAST_ATTENTION_FWD", "auto")
if _FWD not in FWD_VARIANTS:
    warnings.warn(f"VITFAST_ATTENTION_FWD={_FWD!r} is not one of {', '.join(FWD_VARIANTS)}; using 'auto'",
                  RuntimeWarning, stacklevel=1)
    _FWD = "auto"
_FWD_FROM_ENV = _FWD != "auto"  # forced by the environment: an input it cannot serve warns once


def set_forward_variant(variant: str) -> str:
    """Choose the forward ("auto", "pointer", "tma" or "tma_persistent"; VITFAST_ATTENTION_FWD sets
    it at import); returns the previous choice. A variant forced here raises on an input it cannot
    serve (one forced by the environment falls back to the pointer kernel with one warning)."""
    global _FWD, _FWD_FROM_ENV
    if variant not in FWD_VARIANTS:
        raise ValueError(f"forward variant must be one of {', '.join(FWD_VARIANTS)}, got {variant!r}")
    previous, _FWD, _FWD_FROM_ENV = _FWD, variant, False
    return previous


def tma_not_supported_reasons(q, k, v, out) -> list[str]:
    """Why the TMA forwards cannot serve q, k, v -> out (empty: they can): the installed Triton's
    features, the GPU (sm_90 or newer; under the interpreter, any), the head dim, and what TMA
    asks of the layout (16-byte aligned base pointers, (batch, head, token) strides multiples of
    16 bytes, the last stride 1)."""
    return _tma_reasons(q, {"q": q, "k": k, "v": v, "out": out})


def tma_bwd_not_supported_reasons(q, k, v, dout, dk, dv) -> list[str]:
    """Why the TMA backwards cannot serve these tensors (empty: they can): as
    :func:`tma_not_supported_reasons`, for every tensor they move by TMA (dq goes through the
    pointer-addressed fp32 scratch)."""
    return _tma_reasons(q, {"q": q, "k": k, "v": v, "dout": dout, "dk": dk, "dv": dv})


def _tma_reasons(q, tensors: dict) -> list[str]:
    reasons = list(_tma.missing_features()) + _tma_device_reasons(q.device)
    D = q.shape[-1]
    if block_d(D) > TMA_MAX_BLOCK_D:
        reasons.append(f"head dim {D} is computed {block_d(D)} wide; the TMA kernels are checked up to "
                       f"{TMA_MAX_BLOCK_D}")
    for name, t in tensors.items():
        el = t.element_size()
        if t.stride(-1) != 1:
            reasons.append(f"{name}.stride(-1) is {t.stride(-1)}; TMA needs 1")
        if not _base_aligned16(t):
            reasons.append(f"{name}'s data pointer is not 16-byte aligned (TMA)")
        bad = [st for st in t.stride()[:3] if (st * el) % 16 or st <= 0]
        if bad:
            reasons.append(f"{name} has strides {tuple(t.stride()[:3])} ({el}-byte elements); TMA needs the "
                           "batch, head and token strides positive multiples of 16 bytes")
    return reasons


_base_aligned16 = _tma_host.base_aligned16


def _tma_device_reasons(device: torch.device) -> list[str]:
    return _tma_host.device_reasons(device, INTERPRET, "q")


def forward_variant(q, k, v, out, variant: Optional[str] = None) -> str:
    """The forward that runs for q, k, v -> out ([B, H, N, D]): "pointer" (the kernel above),
    "tma" or "tma_persistent" (attention_tma).

    ``variant`` (default: set_forward_variant / VITFAST_ATTENTION_FWD) "auto" takes "pointer" until
    a GPU run has checked the TMA kernels (:data:`AUTO_TMA_MIN_N` is None); then "tma" on a CUDA
    GPU of sm_90 or newer for 16-bit inputs where :func:`tma_not_supported_reasons` has none and
    N >= AUTO_TMA_MIN_N, outside torch.compile, else "pointer", silently. A forced TMA variant that cannot serve the input raises
    :class:`~vitfast._dispatch.KernelNotSupported` listing every reason; forced by the environment
    it falls back to "pointer" with a one-time warning instead."""
    from ..._dispatch import KernelNotSupported, warn_fallback_once

    forced_by_env = variant is None and _FWD_FROM_ENV
    variant = variant or _FWD
    if variant not in FWD_VARIANTS:
        raise ValueError(f"forward variant must be one of {', '.join(FWD_VARIANTS)}, got {variant!r}")
    if variant == "pointer":
        return "pointer"
    if variant == "auto":
        if (AUTO_TMA_MIN_N is None or INTERPRET or q.device.type != "cuda" or q.shape[2] < AUTO_TMA_MIN_N
                or q.dtype == torch.float32
                or _tma_host.traced(q) or tma_not_supported_reasons(q, k, v, out)):
            return "pointer"
        return "tma"
    reasons = tma_not_supported_reasons(q, k, v, out)
    if not reasons:
        return variant
    if forced_by_env:
        warn_fallback_once("attention", [f"VITFAST_ATTENTION_FWD={variant}: {r}" for r in reasons],
                           fallback="pointer-kernel forward")
        return "pointer"
    raise KernelNotSupported("attention", f"kernel (forward variant {variant!r})", reasons)


def _pick_tma(kind: str, config: Optional[dict]):
    """A TMA kernel and its launch kwargs (as :func:`_pick`, with the TMA kernels' interpreter
    configs); their device-side descriptors need triton's allocator, set here where none is."""
    if config is None and INTERPRET:
        config = INTERPRET_TMA_CONFIGS[kind]
    if not INTERPRET:
        _tma.ensure_allocator()
    if config is None:
        return _wrap(_TUNED[kind]), {}
    return _pick(_RAW[kind], _TUNED[kind], config)


def _launch_fwd_tma(q, k, v, out, lse, scale: float, config: Optional[dict], persistent: bool) -> None:
    """The TMA forwards (attention_tma); their descriptors need triton's allocator (set once)."""
    B, H, N, D = q.shape
    kernel, meta = _pick_tma("fwd_tma_persistent" if persistent else "fwd_tma", config)
    args = (q, k, v, out, lse, *_s(q), *_s(k), *_s(v), *_s(out))
    if persistent:
        sms = INTERPRET_PROGRAMS if INTERPRET else _device_sms(q.device)
        grid = lambda m: (min(grid_size(B * H, N, m["BLOCK_M"])[0], sms * m["PER_SM"]),)  # noqa: E731
        args += (B,)
    else:
        grid = lambda m: grid_size(B * H, N, m["BLOCK_M"])  # noqa: E731
    kernel[grid](*args, H, N, n_bucket(N), scale, PRECISION=dot_precision(q.dtype), **_d_meta(D), **meta)


def _launch_bwd_tma(dout, q, k, v, lse, delta, dq, dk, dv, scale: float, config: Optional[dict],
                    atomic: bool) -> None:
    """The TMA 5-matmul backward (attention_tma._attn_bwd_tma_kernel): one program per (batch, head),
    or with ``atomic`` one per key tile adding dq atomically."""
    B, H, N, D = q.shape
    dp = block_d(D)
    # fp32 dq scratch: the deterministic kernel's first key tile stores, the atomic one only adds
    dqa = (torch.zeros if atomic else torch.empty)((B * H, N, dp), device=q.device, dtype=torch.float32)
    kernel, meta = _pick_tma("bwd_tma_atomic" if atomic else "bwd_tma", config)
    grid = (lambda m: grid_size(B * H, N, m["BLOCK_N"])) if atomic else (lambda m: (B * H,))
    kernel[grid](
        q, k, v, dout, lse, delta, dqa, dq, dk, dv, *_s(q), *_s(k), *_s(v), *_s(dout), *_s(dq), *_s(dk), *_s(dv),
        dp, H, N, n_bucket(N), scale, PRECISION=dot_precision(q.dtype), ATOMIC=atomic, **_d_meta(D), **meta,
    )
    if atomic:
        dq.copy_(dqa.view(B, H, N, dp)[..., :D])


# Under the interpreter: small tiles (several per head at the test lengths), and a persistent grid of
# INTERPRET_PROGRAMS programs each walking several tiles.
INTERPRET_TMA_CONFIGS = {"fwd_tma": dict(BLOCK_M=32, BLOCK_N=32, WARP_SPEC=False, num_warps=4, num_stages=1),
                         "fwd_tma_persistent": dict(BLOCK_M=32, BLOCK_N=32, PER_SM=1, num_warps=4, num_stages=1),
                         "bwd_tma": dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1),
                         "bwd_tma_atomic": dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1)}
INTERPRET_PROGRAMS = 3


# --------------------------------------------------------------- backward variant
BWD_VARIANTS = ("auto", "fused", "atomic", "split", "tma", "tma_atomic")
# dq by atomic adds: run-to-run rounding differences; never automatic, refused where determinism is asked
_ATOMIC_VARIANTS = ("atomic", "tma_atomic")
_TMA_BWD_VARIANTS = ("tma", "tma_atomic")
FUSED_MAX_N = 1024  # longest N the one-program-per-(batch, head) backward takes under "auto"
# widest head dim (both column chunks) it takes under "auto": beyond, only a 16 x 32 tile without
# wgmma compiles without spills (sm_90, D = 128: 213-219 registers)
FUSED_MAX_BLOCK_D = 96
_BWD = os.environ.get("VITFAST_ATTENTION_BWD", "auto")
if _BWD not in BWD_VARIANTS:
    warnings.warn(f"VITFAST_ATTENTION_BWD={_BWD!r} is not one of {', '.join(BWD_VARIANTS)}; using 'auto'",
                  RuntimeWarning, stacklevel=1)
    _BWD = "auto"
_BWD_FROM_ENV = _BWD != "auto"  # forced by the environment: a TMA variant that cannot serve warns once


def set_backward_variant(variant: str) -> str:
    """Choose the backward (one of BWD_VARIANTS; VITFAST_ATTENTION_BWD sets it at import); returns
    the previous choice. A TMA variant forced here raises on an input it cannot serve (one forced by
    the environment falls back to "auto"'s choice with one warning)."""
    global _BWD, _BWD_FROM_ENV
    if variant not in BWD_VARIANTS:
        raise ValueError(f"backward variant must be one of {', '.join(BWD_VARIANTS)}, got {variant!r}")
    previous, _BWD, _BWD_FROM_ENV = _BWD, variant, False
    return previous


def _device_sms(device: torch.device) -> int:  # a module-level name: the sm_90 compile check sets it
    return device_sms(device)


def backward_variant(q: torch.Tensor, variant: Optional[str] = None, deterministic: Optional[bool] = None) -> str:
    """The backward that runs for q ([B, H, N, D]): "fused" (5 matmuls, one program per
    (batch, head), deterministic), "atomic" (5 matmuls, dq by atomic adds: run-to-run rounding
    differences), "split" (7 matmuls: a dK/dV kernel and a dQ kernel, deterministic), or the TMA
    twins of the first two, "tma" and "tma_atomic" (attention_tma; only when forced, until GPU
    timings say where they pay; :func:`launch_bwd` checks that TMA can serve the tensors).

    ``variant`` (default: set_backward_variant / VITFAST_ATTENTION_BWD) "auto" takes "fused" where
    N <= FUSED_MAX_N, the head dim's chunks are at most FUSED_MAX_BLOCK_D wide and, on a GPU,
    B*H >= 2 programs per SM (fewer leave SMs idle: a guess, not yet measured), else "split".
    ``deterministic`` (the ``attention(..., deterministic=)`` argument): None leaves the choice
    above; True never takes "atomic" (a forced "atomic" becomes "auto"'s choice); False lets
    "auto" take "atomic" (5 matmuls, one program per key tile) where it would take "split".
    "atomic" is refused (replaced by "auto"'s deterministic choice; "tma_atomic" by "tma") under
    torch.use_deterministic_algorithms(True), whatever ``deterministic`` says."""
    variant = variant or _BWD
    if torch.are_deterministic_algorithms_enabled():
        deterministic = True
    if variant in _ATOMIC_VARIANTS and deterministic:
        variant = "tma" if variant == "tma_atomic" else "auto"
    if variant != "auto":
        return variant
    B, H, N, D = q.shape
    fused = N <= FUSED_MAX_N and block_d(D) <= FUSED_MAX_BLOCK_D
    if fused and q.device.type == "cuda" and not INTERPRET:
        fused = B * H >= 2 * _device_sms(q.device)
    if fused:
        return "fused"
    return "atomic" if deterministic is False else "split"


def launch_bwd(dout, q, k, v, out, lse, dq, dk, dv, scale: float,
               config: Optional[dict] = None, dq_config: Optional[dict] = None, variant: Optional[str] = None,
               deterministic: Optional[bool] = None) -> None:
    """dq, dk, dv of attention given dout, the forward's out and lse, by :func:`backward_variant`
    (``config`` is the dK/dV kernel's or the fused kernel's, ``dq_config`` the dQ kernel's)."""
    delta = launch_bwd_preprocess(out, dout)
    chosen = backward_variant(q, variant, deterministic)
    if chosen in _TMA_BWD_VARIANTS:
        reasons = tma_bwd_not_supported_reasons(q, k, v, dout, dk, dv)
        if not reasons:
            return _launch_bwd_tma(dout, q, k, v, lse, delta, dq, dk, dv, scale, config, atomic=chosen == "tma_atomic")
        if variant is not None or not _BWD_FROM_ENV:
            from ..._dispatch import KernelNotSupported

            raise KernelNotSupported("attention", f"kernel (backward variant {chosen!r})", reasons)
        from ..._dispatch import warn_fallback_once

        warn_fallback_once("attention", [f"VITFAST_ATTENTION_BWD={chosen}: {r}" for r in reasons],
                           fallback="pointer-kernel backward")
        chosen = backward_variant(q, "auto", deterministic)
    if chosen == "split":
        launch_bwd_dkdv(dout, q, k, v, lse, delta, dk, dv, scale, config)
        launch_bwd_dq(dout, q, k, v, lse, delta, dq, scale, dq_config or config)
    else:
        launch_bwd_fused(dout, q, k, v, lse, delta, dq, dk, dv, scale, config, atomic=chosen == "atomic")


def candidate_configs(kind: str, q: torch.Tensor) -> list[dict]:
    """Every config of kernel ``kind`` ("fwd", "fwd_tma", "fwd_tma_persistent", "dkdv", "dq", "fused", "atomic")
    that the autotuner would try for
    ``q`` ([B, H, N, D]): the survivors of its pruning, as launch dicts (benchmarks)."""
    configs = _CONFIGS[kind]
    B, H, N, D = q.shape
    previous = set_autotune(True)
    try:
        kept = _make_prune(kind)(configs, {"N_BUCKET": n_bucket(N), "Q": q, **_d_meta(D)})
    finally:
        set_autotune(previous)
    return [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in kept]


def tuned_config(kind: str) -> Optional[dict]:
    """The config the autotuner of ``kind`` chose last (None before the first tuned launch)."""
    tuner = _TUNED[kind]
    c = getattr(tuner, "best_config", None)
    return None if c is None else dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
