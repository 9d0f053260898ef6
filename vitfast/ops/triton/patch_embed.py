"""Triton kernels behind the fused CUDA path of :mod:`vitfast.ops.patch_embed`: the patch
embedding as one implicit GEMM, and its backward.

The token buffer ``out [B, T, D]`` is seen as rows ``[M, D]``, ``M = B*T``; row ``r`` is token
``t = r % T`` of image ``b = r // T``: the class token when ``t == 0`` and there is one, else
patch ``n = t - HAS_CLS`` at ``(py, px) = divmod(n, W/p)``. The GEMM's ``K = C*p*p`` runs in the
conv weight's order ``(c, ky, kx)`` (``weight [D, C, p, p]`` flattened to ``[D, K]``), so a run of
``p`` consecutive k is ``p`` consecutive pixels of one image row: with NCHW images and p a
multiple of 16 the compiler is told (``VEC``) and loads 16 pixels at once (16 bytes of uint8).

* ``_pe_fwd_kernel`` (one launch): a program owns ``BLOCK_M`` rows and ``BLOCK_N`` columns of
  ``[M, D]`` (column blocks of one row block are neighbours in the launch order, so they share
  the image tile in L2). Its K loop gathers the ``[BLOCK_M, BLOCK_K]`` tile of patches from the
  image (uint8 or float; class-token rows and the K tail read as zero), normalises it in fp32
  (``x * scale[c] + shift[c]``: ``scale = 1/(255 std)``, ``shift = -mean/std`` for uint8), casts it
  to the weight's dtype and multiplies it with the ``[BLOCK_K, BLOCK_N]`` weight tile on the
  tensor cores (``tl.dot``, fp32 accumulation: ``wgmma`` on sm_90). The weight tile comes by
  pointer loads (``cp.async`` on sm_90) or, with ``W_TMA``, by TMA through a device-side tensor
  descriptor over ``[D, K]`` whose out-of-bounds zero fill replaces the column and K-tail masks
  (see *Weight by TMA* below). The epilogue adds bias
  (patch rows), the class token (row 0) and the position embedding (every row, or the patch
  rows only with timm's ``no_embed_class``), read directly from the parameters (a few KiB,
  L2-resident: no precomputed table and so no second launch), and writes finished tokens.
* ``_pe_dw_kernel``: ``dweight [D, K] = dOut^T @ A`` over the patch rows, the patches ``A``
  recomputed from the image as in the forward (no patch matrix in memory); the rows are split
  into ``S`` contiguous chunks, each program writes an fp32 ``[BLOCK_N, BLOCK_K]`` partial and the
  launcher sums the ``S`` partials: a fixed order, bit-identical run to run (no atomics).
* ``_pe_dtok_kernel``: ``G[t] = sum_b dOut[b, t]`` (fp32 ``[T, D]``), the one reduction pass over
  ``dOut`` that the class token (``G[0]``), the position embedding (``G`` or ``G[1:]``) and the
  bias (``G[HAS_CLS:].sum(0)``, ``T x D`` values) gradients come from.
* ``_pe_dx_kernel`` (float images that need a gradient): ``dA = dOut @ W`` per tile, times
  ``1/std[c]``, stored straight into the image gradient: with stride = patch size the patches do
  not overlap, so col2im is a permuted store. Its loop over D streams weight tiles: by TMA where
  the weight allows it (``W_TMA``, set by the launcher), else by pointer loads.

Weight by TMA: on sm_90+ with a Triton that has device-side descriptors
(``tl.make_tensor_descriptor``; triton's allocator is set lazily in each launching thread, as for
the attention TMA forwards: :mod:`.tma`), and a weight TMA can read (contiguous ``[D, K]``, 16-byte
aligned, rows a multiple of 16 bytes: not ``K = 588`` in 16-bit, ViT-L/14), see
:func:`weight_tma_not_supported_reasons`. The forward's autotuner then times every tile both ways
(:data:`FWD_TMA_CONFIGS` beside :data:`FWD_CONFIGS`) and keeps the faster; the image-gradient kernel
takes TMA. :func:`set_weight_tma` (False) turns it off. Under the interpreter (which emulates the
descriptors and their zero fill) the TMA path runs wherever the weight allows it.

Under ``TRITON_INTERPRET=1`` one small fixed config runs (the tests' shapes cross row, column
and K tails); on the GPU the forward is autotuned over :data:`FWD_CONFIGS` (and
:data:`FWD_TMA_CONFIGS`; pruned by :func:`_fits`), the backward kernels use fixed tiles.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from . import device_sms, is_interpreted, wrap
from . import tma as _tma

_SMEM_BYTES = 227 * 1024  # H100/H200 per-block limit


# ----------------------------------------------------------------------------- helpers
@triton.jit
def _rows(start, M, T, GW, HAS_CLS: tl.constexpr, P: tl.constexpr, VEC: tl.constexpr,
          s_b, s_h, s_w, BLOCK_M: tl.constexpr):
    """Rows start.. of [M, D] -> (rows, in range, patch row, token index, image offset of the patch)."""
    rows = start + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    b = rows // T
    t = rows - b * T
    n = t - HAS_CLS
    is_patch = row_ok & (n >= 0)
    n = tl.maximum(n, 0)
    py = n // GW
    px = n - py * GW
    roff = b.to(tl.int64) * s_b + (py * P).to(tl.int64) * s_h + (px * P).to(tl.int64) * s_w
    if VEC > 1:
        roff = tl.multiple_of(roff, VEC)
    return rows, row_ok, is_patch, t, roff


@triton.jit
def _koff(k, s_c, s_h, s_w, P: tl.constexpr, VEC: tl.constexpr):
    """K index (c, ky, kx) -> (channel, offset of the pixel inside a patch)."""
    c = k // (P * P)
    rem = k - c * (P * P)
    ky = rem // P
    kx = rem - ky * P
    koff = c * s_c + ky * s_h + kx * s_w
    if VEC > 1:  # runs of VEC contiguous pixels starting at multiples of VEC (s_w == 1)
        koff = tl.max_contiguous(tl.multiple_of(koff, VEC), VEC)
    return c, koff


@triton.jit
def _norm(c, k_ok, MEAN, STD, U8: tl.constexpr, NORM: tl.constexpr):
    """Per-k (scale, shift): normalised = pixel * scale + shift."""
    if NORM:
        mean = tl.load(MEAN + c, mask=k_ok, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.load(STD + c, mask=k_ok, other=1.0).to(tl.float32)
        if U8:
            scale = rstd * (1.0 / 255.0)
        else:
            scale = rstd
        shift = -mean * rstd
    else:
        scale = tl.full(c.shape, 1.0 / 255.0 if U8 else 1.0, tl.float32)
        shift = tl.zeros(c.shape, tl.float32)
    return scale, shift


@triton.jit
def _patches(IMG, MEAN, STD, roff, is_patch, k, K, s_c, s_h, s_w,
             U8: tl.constexpr, NORM: tl.constexpr, P: tl.constexpr, VEC: tl.constexpr, DT: tl.constexpr):
    """The [BLOCK_M, BLOCK_K] tile of normalised patches in dtype DT (zero off the patches)."""
    k_ok = k < K
    c, koff = _koff(k, s_c, s_h, s_w, P, VEC)
    mask = is_patch[:, None] & k_ok[None, :]
    x = tl.load(IMG + roff[:, None] + koff[None, :], mask=mask, other=0).to(tl.float32)
    if U8 or NORM:
        scale, shift = _norm(c, k_ok, MEAN, STD, U8, NORM)
        x = tl.where(mask, x * scale[None, :] + shift[None, :], 0.0)
    return x.to(DT)


@triton.jit
def _w_desc(W, D, K, ROWS: tl.constexpr, COLS: tl.constexpr):
    """The weight [D, K] (contiguous) as a device-side tensor descriptor of [ROWS, COLS] boxes."""
    return tl.make_tensor_descriptor(W, shape=[D, K], strides=[K, 1], block_shape=[ROWS, COLS])


# ----------------------------------------------------------------------------- forward
@triton.jit
def _pe_fwd_kernel(
    IMG, W, BIAS, CLS, POS, MEAN, STD, OUT,
    M, T, D, K, GW, s_b, s_c, s_h, s_w,
    U8: tl.constexpr, NORM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_CLS: tl.constexpr,
    POS_MODE: tl.constexpr, P: tl.constexpr, VEC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, W_TMA: tl.constexpr,
):
    pid = tl.program_id(0)
    num_n = tl.cdiv(D, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid - pid_m * num_n
    rows, row_ok, is_patch, t, roff = _rows(pid_m * BLOCK_M, M, T, GW, HAS_CLS, P, VEC, s_b, s_h, s_w, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < D
    DT: tl.constexpr = W.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    if W_TMA:
        w_desc = _w_desc(W, D, K, BLOCK_N, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        a = _patches(IMG, MEAN, STD, roff, is_patch, k, K, s_c, s_h, s_w, U8, NORM, P, VEC, DT)
        if W_TMA:  # columns past D and the K tail come in as zeros (TMA fill)
            w = w_desc.load([pid_n * BLOCK_N, k0])
        else:
            w = tl.load(W + cols[:, None].to(tl.int64) * K + k[None, :], mask=col_ok[:, None] & (k < K)[None, :],
                        other=0.0)
        acc = tl.dot(a, tl.trans(w), acc, input_precision=PRECISION)
    # epilogue: + bias (patch rows) + class token (row 0) + position embedding
    if HAS_BIAS:
        bias = tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc += tl.where(is_patch[:, None], bias[None, :], 0.0)
    if HAS_CLS:
        cls = tl.load(CLS + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc += tl.where((row_ok & (t == 0))[:, None], cls[None, :], 0.0)
    if POS_MODE == 1:  # [1, T, D]: every token
        pos = tl.load(POS + t[:, None] * D + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        acc += pos.to(tl.float32)
    if POS_MODE == 2:  # [1, N, D]: the patches only (no_embed_class)
        pos = tl.load(POS + (tl.maximum(t - 1, 0))[:, None] * D + cols[None, :],
                      mask=is_patch[:, None] & col_ok[None, :], other=0.0)
        acc += pos.to(tl.float32)
    out = OUT + rows.to(tl.int64)[:, None] * D + cols[None, :]
    tl.store(out, acc.to(OUT.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# ---------------------------------------------------------------------------- backward
@triton.jit
def _pe_dw_kernel(
    DO, IMG, MEAN, STD, DW_P,
    M, T, D, K, GW, rows_per_prog, s_b, s_c, s_h, s_w,
    U8: tl.constexpr, NORM: tl.constexpr, HAS_CLS: tl.constexpr, P: tl.constexpr, VEC: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Partial s of dweight: [BLOCK_N of D, BLOCK_K of K] over rows [s * rows_per_prog, ...)."""
    pid = tl.program_id(0)
    s = tl.program_id(1)
    num_k = tl.cdiv(K, BLOCK_K)
    pid_n = pid // num_k
    pid_k = pid - pid_n * num_k
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < D
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    DT: tl.constexpr = DO.dtype.element_ty
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    row_start = s * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, M)
    for start in range(row_start, row_end, BLOCK_M):
        rows, row_ok, is_patch, t, roff = _rows(start, row_end, T, GW, HAS_CLS, P, VEC, s_b, s_h, s_w, BLOCK_M)
        a = _patches(IMG, MEAN, STD, roff, is_patch, k, K, s_c, s_h, s_w, U8, NORM, P, VEC, DT)
        do = tl.load(DO + rows.to(tl.int64)[:, None] * D + cols[None, :],
                     mask=is_patch[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(do), a, acc, input_precision=PRECISION)
    out = DW_P + (s.to(tl.int64) * D + cols[:, None]) * K + k[None, :]
    tl.store(out, acc, mask=col_ok[:, None] & (k < K)[None, :])


@triton.jit
def _pe_dtok_kernel(DO, G, B, T, D, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """G[t, d] = sum over the batch of dOut[b, t, d] (fp32), batch in order."""
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (tok < T)[:, None] & (cols < D)[None, :]
    off = tok.to(tl.int64)[:, None] * D + cols[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
    ptr = DO + off
    for _ in range(0, B):  # pointer steps: 64-bit however large B * T * D is
        acc += tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
        ptr += T * D
    tl.store(G + off, acc, mask=mask)


@triton.jit
def _pe_dx_kernel(
    DO, W, STD, DX,
    M, T, D, K, GW, s_b, s_c, s_h, s_w,
    NORM: tl.constexpr, HAS_CLS: tl.constexpr, P: tl.constexpr, VEC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, W_TMA: tl.constexpr,
):
    """dImages for a [BLOCK_M rows, BLOCK_K of K] tile: (dOut @ W) / std, stored in place (the
    image gradient's strides are the images')."""
    pid = tl.program_id(0)
    num_k = tl.cdiv(K, BLOCK_K)
    pid_m = pid // num_k
    pid_k = pid - pid_m * num_k
    rows, row_ok, is_patch, t, roff = _rows(pid_m * BLOCK_M, M, T, GW, HAS_CLS, P, VEC, s_b, s_h, s_w, BLOCK_M)
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = k < K
    acc = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
    if W_TMA:
        w_desc = _w_desc(W, D, K, BLOCK_N, BLOCK_K)
    for n0 in range(0, D, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < D
        do = tl.load(DO + rows.to(tl.int64)[:, None] * D + cols[None, :],
                     mask=is_patch[:, None] & col_ok[None, :], other=0.0)
        if W_TMA:  # rows past D and the K tail come in as zeros (TMA fill)
            w = w_desc.load([n0, pid_k * BLOCK_K])
        else:
            w = tl.load(W + cols.to(tl.int64)[:, None] * K + k[None, :], mask=col_ok[:, None] & k_ok[None, :],
                        other=0.0)
        acc = tl.dot(do, w, acc, input_precision=PRECISION)
    c, koff = _koff(k, s_c, s_h, s_w, P, VEC)
    if NORM:
        acc = acc / tl.load(STD + c, mask=k_ok, other=1.0).to(tl.float32)[None, :]
    tl.store(DX + roff[:, None] + koff[None, :], acc.to(DX.dtype.element_ty), mask=is_patch[:, None] & k_ok[None, :])


# ------------------------------------------------------------------- configs, tuning
INTERPRET = is_interpreted(_pe_fwd_kernel)
# Fixed tiles under the interpreter: few programs (each costs milliseconds of Python), yet small
# enough that the tests' shapes cross row, column and K tails and several dweight row chunks.
INTERPRET_CONFIG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64)
INTERPRET_CHUNKS = 3
# Autotuning on the GPU; off (the first surviving config) with VITFAST_PATCH_EMBED_AUTOTUNE=0 or
# after set_autotune(False).
_AUTOTUNE = os.environ.get("VITFAST_PATCH_EMBED_AUTOTUNE", "1") != "0"


def set_autotune(enabled: bool) -> bool:
    """Turn the forward's autotuning on or off; returns the previous setting."""
    global _AUTOTUNE
    previous, _AUTOTUNE = _AUTOTUNE, bool(enabled)
    return previous


def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int, w_tma: bool = False) -> triton.Config:
    return triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, W_TMA=w_tma), num_warps=warps, num_stages=stages)


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages). Primary tiles first (what the autotuner times; the
# first survivor is the untuned default), then secondary ones for narrow D, tried only where no
# primary fits. ViT widths (384, 768, 1024, 1280) are multiples of 128, and B*T of ViT-B/16 at
# B = 256 is 394 x 128, so 128-row tiles have no tail there. Not yet cut by GPU measurement.
TILES = [
    (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
    (64, 256, 64, 8, 3), (64, 128, 64, 4, 3),
    # secondary: fp32 weights (3xTF32 holds split operands: more shared memory and registers), D < 64
    (64, 64, 32, 4, 3), (64, 32, 64, 4, 3), (32, 16, 32, 4, 2),
]
PRIMARY = 6
# Each tile with the weight by pointer loads (W_TMA=False: cp.async on sm_90) and by TMA (W_TMA=True).
# Where the weight allows TMA (weight_tma_not_supported_reasons) the autotuner times both and keeps
# the faster; untuned, the first pointer config runs (as before TMA: no GPU has timed either yet).
FWD_CONFIGS = [_cfg(*t) for t in TILES]
FWD_TMA_CONFIGS = [_cfg(*t, w_tma=True) for t in TILES]
# Backward tiles (fixed): dweight [BLOCK_N of D, BLOCK_K of K] over BLOCK_M-row steps; dImages
# [BLOCK_M rows, BLOCK_K of K] over BLOCK_N-column steps of D; the token sums [BLOCK_T, BLOCK_D].
DW_CONFIG = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3)
DX_CONFIG = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, num_warps=8, num_stages=3)
DTOK_CONFIG = dict(BLOCK_T=16, BLOCK_D=128, num_warps=4)


def _fits(bm: int, bn: int, bk: int, warps: int, stages: int, img_el: int, el: int) -> bool:
    """Shared memory: ``stages`` copies of the raw image tile and the weight tile, plus the
    converted patch tile; registers: the fp32 accumulator per thread. The producer (addresses,
    normalisation, conversion) runs in the same warps and needs ~110 registers of its own: with
    128 accumulators per thread (128 x 256 on 8 warps, 128 x 128 on 4) ptxas spilled 112-1280
    bytes on sm_90 (triton 3.8, bf16, ViT-B/16), with 64 none (179-225 registers). fp32 weights
    (3xTF32 dots) hold both converted tiles twice and spilled at 64 accumulators per thread
    (triton 3.6), and the 16-bit formula undercounted their shared memory by up to 15%."""
    acc = bm * bn / (32 * warps)
    if el == 4:
        smem = stages * (bm * bk * img_el + bn * bk * el) + 2 * (bm + bn) * bk * el + 1024
        return smem <= _SMEM_BYTES and acc <= 32
    smem = stages * (bm * bk * img_el + bn * bk * el) + bm * bk * el + 1024
    return smem <= _SMEM_BYTES and acc <= 64


def _tile(c: triton.Config) -> tuple:
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages


def _prune(configs, named_args, **kwargs):
    """The configs that fit (both weight paths of a tile alike: the pointer ones first), primary
    tiles where any fits, else the secondary ones, else the smallest pointer config."""
    args = {**named_args, **kwargs}
    d_cap = max(16, triton.next_power_of_2(int(args["D"])))
    k_cap = max(16, triton.next_power_of_2(int(args["K"])))
    img_el, el = args["IMG"].dtype.itemsize, args["W"].dtype.itemsize
    primary = set(TILES[:PRIMARY])

    def survivors(candidates):
        return [c for c in candidates
                if c.kwargs["BLOCK_N"] <= d_cap and c.kwargs["BLOCK_K"] <= k_cap
                and _fits(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages,
                          img_el, el)]

    kept = (survivors([c for c in configs if _tile(c) in primary])
            or survivors([c for c in configs if _tile(c) not in primary]) or [FWD_CONFIGS[-1]])
    return kept if _AUTOTUNE else kept[:1]


def _autotuned(configs):
    return triton.autotune(configs=configs, key=["D", "K", "P", "U8", "NORM"],
                           prune_configs_by={"early_config_prune": _prune})(_pe_fwd_kernel)


# Two autotuners, one cache each: the launcher takes the second only for a weight TMA can read, so
# a config with W_TMA=True cached for one weight is never launched on one TMA cannot read (the
# autotuner's key does not see alignment).
_pe_fwd_tuned = _autotuned(FWD_CONFIGS)
_pe_fwd_tma_tuned = _autotuned(FWD_CONFIGS + FWD_TMA_CONFIGS)
_last_tuner = _pe_fwd_tuned


# ---------------------------------------------------------------------- weight by TMA
_WEIGHT_TMA = True


def set_weight_tma(enabled: bool) -> bool:
    """Allow (the default) or forbid the weight tiles by TMA; returns the previous setting."""
    global _WEIGHT_TMA
    previous, _WEIGHT_TMA = _WEIGHT_TMA, bool(enabled)
    return previous


def _tma_device_reasons(device: torch.device) -> list[str]:
    return _tma.device_reasons(device, INTERPRET, "weight")


def weight_tma_not_supported_reasons(w2d: torch.Tensor) -> list[str]:
    """Why the kernels cannot load tiles of ``w2d [D, K]`` by TMA (empty: they can, and the forward
    autotunes over both weight paths, the image-gradient kernel takes TMA): turned off
    (:func:`set_weight_tma`), the installed Triton's features, the GPU (sm_90 or newer; under the
    interpreter, any), and what TMA asks of the layout (contiguous, a 16-byte aligned base, rows a
    multiple of 16 bytes: K = C*p*p = 588 in 16-bit, p = 14, is not)."""
    reasons = [] if _WEIGHT_TMA else ["the weight's TMA path is turned off (set_weight_tma(False))"]
    if _tma.traced(w2d):  # as the attention's TMA forward: Inductor traces this launch
        # and sets up device-side descriptors its own way; not yet run there on a GPU
        reasons.append("inside torch.compile (the TMA weight path is not yet checked under Inductor)")
    reasons += _tma.missing_features() + _tma_device_reasons(w2d.device)
    K, el = w2d.shape[1], w2d.element_size()
    if w2d.stride() != (K, 1):
        reasons.append(f"the weight [D, K] has strides {tuple(w2d.stride())}; the kernels' descriptor is (K, 1)")
    if not _tma.base_aligned16(w2d):
        reasons.append("the weight's data pointer is not 16-byte aligned (TMA)")
    if (K * el) % 16:
        reasons.append(f"the weight's rows are K = C*p*p = {K} x {el} bytes; TMA needs a multiple of 16")
    return reasons


def _weight_tma(w2d: torch.Tensor) -> bool:
    """True where the weight tiles may come by TMA; then triton's allocator is set in this thread
    (the descriptors' scratch; the interpreter needs none)."""
    if weight_tma_not_supported_reasons(w2d):
        return False
    if not INTERPRET:
        _tma.ensure_allocator()
    return True


# -------------------------------------------------------------------------- launchers
def _wrap(kernel):
    return wrap(kernel, INTERPRET)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 weights: TF32 if ``torch.backends.cuda.matmul.allow_tf32``, else 3xTF32 (close to
    fp32; plain fp32 FMA dots would spill); 16-bit weights ignore this."""
    if dtype != torch.float32:
        return "ieee"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"


def vec_width(images: torch.Tensor, p: int) -> int:
    """Pixels the kernels may load as one vector: the largest power of two <= 16 dividing p,
    when image rows are contiguous and every other stride is a multiple of it (else 1)."""
    sb, sc, sh, sw = images.stride()
    if sw != 1 and images.shape[3] > 1:
        return 1
    vec = 16
    while vec > 1 and (p % vec or sb % vec or sc % vec or sh % vec):
        vec //= 2
    return vec


def _meta(images, p: int, has_cls: bool):
    B, C, H, W = images.shape
    sb, sc, sh, sw = images.stride()
    return dict(GW=max(W // p, 1), strides=(sb, sc, sh, sw if W > 1 else 1)), dict(
        U8=images.dtype == torch.uint8, HAS_CLS=bool(has_cls), P=p, VEC=vec_width(images, p))


def _launch_opts(config: dict) -> dict:
    if INTERPRET:  # the interpreter takes no launch options
        return {k: v for k, v in config.items() if k not in ("num_warps", "num_stages")}
    return dict(config)


def _programs_target(device: torch.device) -> int:
    """Programs the dweight grid aims for: two per SM on the GPU."""
    if INTERPRET or device.type != "cuda":
        return INTERPRET_CHUNKS
    return 2 * device_sms(device)


def launch_fwd(images, w2d, bias, cls, pos, pos_mode: int, mean, std, out, p: int,
               config: Optional[dict] = None) -> None:
    """out [B, T, D] (contiguous) = the patch embedding. w2d [D, K] contiguous; cls [D] or None;
    pos [T or N, D] contiguous (pos_mode 1: every token, 2: the patches only) or None;
    mean/std [C] or None. ``config``: launch this config (benchmarks), not the autotuner's."""
    B, T, D = out.shape
    K = w2d.shape[1]
    M = B * T
    global _last_tuner
    sizes, flags = _meta(images, p, cls is not None)
    norm = mean is not None
    w_tma = _weight_tma(w2d)
    if config is None and INTERPRET:
        config = dict(INTERPRET_CONFIG, W_TMA=w_tma)
    if config is None:
        _last_tuner = _pe_fwd_tma_tuned if w_tma else _pe_fwd_tuned
        kernel, meta = _wrap(_last_tuner), {}
    else:
        if config.get("W_TMA") and not w_tma:
            raise ValueError(f"config {config} loads the weight by TMA, which cannot read this weight: "
                             + "; ".join(weight_tma_not_supported_reasons(w2d)))
        kernel, meta = _wrap(_pe_fwd_kernel), dict(_launch_opts(config), W_TMA=bool(config.get("W_TMA")))
    kernel[lambda m: (triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(D, m["BLOCK_N"]),)](
        images, w2d, bias if bias is not None else w2d, cls if cls is not None else w2d,
        pos if pos is not None else w2d, mean if norm else w2d, std if norm else w2d, out,
        M, T, D, K, sizes["GW"], *sizes["strides"],
        NORM=norm, HAS_BIAS=bias is not None, POS_MODE=pos_mode if pos is not None else 0,
        PRECISION=dot_precision(w2d.dtype), **flags, **meta,
    )


def _bwd_config(cfg: dict, dtype: torch.dtype) -> dict:
    """fp32 (3xTF32 dots): half the K tile and two stages (the 16-bit tiles took 229,376 of the
    232,448 bytes of shared memory on sm_90, and two stages alone still spilled 44 bytes in dx)."""
    return dict(cfg, BLOCK_K=cfg["BLOCK_K"] // 2, num_stages=2) if dtype == torch.float32 else cfg


def launch_dweight(dout, images, mean, std, has_cls: bool, p: int, D: int, K: int) -> torch.Tensor:
    """dweight [D, K] in fp32 (the fixed-order sum of the row chunks' partials)."""
    B, T = dout.shape[0], dout.shape[1]
    M = B * T
    cfg = INTERPRET_CONFIG if INTERPRET else _bwd_config(DW_CONFIG, dout.dtype)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    tiles = triton.cdiv(D, bn) * triton.cdiv(K, bk)
    chunks = max(1, min(triton.cdiv(max(M, 1), bm), triton.cdiv(_programs_target(dout.device), tiles)))
    per = triton.cdiv(triton.cdiv(max(M, 1), chunks), bm) * bm
    S = triton.cdiv(max(M, 1), per)
    part = torch.empty((S, D, K), dtype=torch.float32, device=dout.device)
    sizes, flags = _meta(images, p, has_cls)
    norm = mean is not None
    _wrap(_pe_dw_kernel)[(tiles, S)](
        dout, images, mean if norm else dout, std if norm else dout, part,
        M, T, D, K, sizes["GW"], per, *sizes["strides"],
        NORM=norm, PRECISION=dot_precision(dout.dtype), **flags, **_launch_opts(cfg),
    )
    return part[0] if S == 1 else part.sum(0)


def launch_token_sums(dout) -> torch.Tensor:
    """G [T, D] fp32: dOut summed over the batch (in batch order)."""
    B, T, D = dout.shape
    g = torch.empty((T, D), dtype=torch.float32, device=dout.device)
    cfg = dict(BLOCK_T=16, BLOCK_D=32) if INTERPRET else DTOK_CONFIG
    _wrap(_pe_dtok_kernel)[(triton.cdiv(T, cfg["BLOCK_T"]), triton.cdiv(D, cfg["BLOCK_D"]))](
        dout, g, B, T, D, **_launch_opts(cfg))
    return g


def launch_dimages(dout, w2d, std, dx, has_cls: bool, p: int) -> None:
    """dx (the images' shape and strides) = the image gradient: (dOut @ W) / std, col2im."""
    B, T, D = dout.shape
    K = w2d.shape[1]
    M = B * T
    cfg = INTERPRET_CONFIG if INTERPRET else _bwd_config(DX_CONFIG, dout.dtype)
    sizes, flags = _meta(dx, p, has_cls)
    flags.pop("U8")
    _wrap(_pe_dx_kernel)[(triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(K, cfg["BLOCK_K"]),)](
        dout, w2d, std if std is not None else w2d, dx,
        M, T, D, K, sizes["GW"], *sizes["strides"],
        NORM=std is not None, PRECISION=dot_precision(w2d.dtype), W_TMA=_weight_tma(w2d), **flags,
        **_launch_opts(cfg),
    )


def candidate_configs(images: torch.Tensor, weight: torch.Tensor) -> list[dict]:
    """Every forward config the autotuner would try for these inputs (the survivors of its
    pruning), as launch dicts: the benchmark times each."""
    D = weight.shape[0]
    K = weight[0].numel()
    configs = FWD_CONFIGS + (FWD_TMA_CONFIGS if not weight_tma_not_supported_reasons(weight.reshape(D, K)) else [])
    previous = set_autotune(True)
    try:
        kept = _prune(configs, {"D": D, "K": K, "IMG": images, "W": weight})
    finally:
        set_autotune(previous)
    return [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in kept]


def tuned_config() -> Optional[dict]:
    """The forward config the autotuner chose last (None before the first tuned launch)."""
    c = getattr(_last_tuner, "best_config", None)
    return None if c is None else dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)


KERNELS = {"fwd": [_pe_fwd_kernel], "bwd": [_pe_dw_kernel, _pe_dtok_kernel, _pe_dx_kernel]}
