"""Triton kernels behind :mod:`vitfast.ops.layer_norm`, :mod:`vitfast.ops.bias_gelu` and
:mod:`vitfast.ops.bias_scale_residual`: the memory-bound steps around a ViT block's matmuls.

Every tensor is seen as rows ``[M, C]`` (all leading dims flattened) with the last
dimension contiguous; row offsets are 64-bit, so M * C may exceed 2**31.

* ``_ln_fwd_kernel``: ``x_out = x + gamma * (y + y_bias)`` (each term optional) and
  ``h = LayerNorm(x_out) * weight + bias`` in one pass. A program owns ``BLOCK_M`` whole
  rows, each as up to three power-of-two column chunks (``ln_chunks``: 1280 = 1024 + 256,
  1408 -> 1024 + 512; the last one masked). The statistics are taken
  from ``x_out`` *as stored* (rounded to its dtype), exactly like eager PyTorch, so the
  backward, which re-reads ``x_out``, sees the same normalised values as the forward.
* ``_ln_bwd_kernel``: the LayerNorm backward plus the residual branch's gradients. Each
  program walks a contiguous chunk of rows and keeps the column sums (dweight, dbias,
  dgamma, dy_bias) in registers, then writes one row of a ``[P, C]`` partial buffer; the
  launcher sums the P rows. No atomics: results are bit-identical run to run. A row is held
  as up to three power-of-two column chunks (``ln_chunks``: 1280 = 1024 + 256, not 2048 with
  37.5% of the lanes masked off), and weight, gamma and y_bias are re-read from L1 for each
  row tile rather than held, so that with ``ln_bwd_config``'s warps and rows per tile every
  ViT width stays under 128 registers on sm_90 (16+ resident warps per SM, no spills).
* ``_bias_gelu_*``: ``act(x + bias)`` (exact or tanh GELU) and its backward with dbias;
  ``_bias_scale_residual_*``: ``residual + gamma * (y + bias)`` and its backward. These tile the
  columns too (``BLOCK_C`` < C is fine), on a 2-D grid (row blocks, column blocks).

Arithmetic is fp32 (fp64 for fp64 inputs, so ``gradcheck`` can run on the real kernels);
fp16/bf16 are only the storage formats. Block sizes come from size heuristics (these
kernels are bandwidth-bound, nothing to autotune but the tile shape); under
``TRITON_INTERPRET=1`` small fixed tiles keep the CPU tests fast and exercise the masks.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import device_sms, is_interpreted, wrap

# LayerNorm rows must fit one program's registers: BLOCK_C = next_power_of_2(C) <= this.
MAX_LN_HIDDEN = 16384
ACT_CODES = {"none": 0, "tanh": 1}  # GELU approximations, as in torch.nn.functional.gelu

# Globals read inside @triton.jit code must be tl.constexpr: the compiler rejects plain
# Python floats ("Cannot access global variable ..."), though the interpreter accepts them.
_SQRT1_2 = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)


# ----------------------------------------------------------------------------- helpers
@triton.jit
def _up(x, FP64: tl.constexpr):
    """Storage dtype -> arithmetic dtype."""
    if FP64:
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


@triton.jit
def _vec(ptr, cols, mask_c, HAS: tl.constexpr, default: tl.constexpr, FP64: tl.constexpr):
    """A per-channel parameter as a [1, BLOCK_C] row (``default`` when absent)."""
    if HAS:
        v = _up(tl.load(ptr + cols, mask=mask_c, other=default), FP64)
    else:
        v = _up(tl.full(cols.shape, default, tl.float32), FP64)
    return v[None, :]


@triton.jit
def _gelu(x, ACT: tl.constexpr):
    if ACT == 0:
        return 0.5 * x * (1.0 + tl.math.erf(x * _SQRT1_2))
    else:  # tanh approximation: 0.5 x (1 + tanh(u)) = x * sigmoid(2u)
        u = _SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
        return x * tl.sigmoid(2.0 * u)


@triton.jit
def _gelu_grad(x, ACT: tl.constexpr):
    if ACT == 0:
        return 0.5 * (1.0 + tl.math.erf(x * _SQRT1_2)) + x * _INV_SQRT_2PI * tl.exp(-0.5 * x * x)
    else:
        u = _SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
        s = tl.sigmoid(2.0 * u)  # = (1 + tanh(u)) / 2
        du = _SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * x * x)
        return s + 2.0 * x * s * (1.0 - s) * du


@triton.jit
def _tile(pid_m, pid_c, M, C, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_m, mask_c = rows < M, cols < C
    return rows.to(tl.int64)[:, None], cols, mask_m, mask_c, mask_m[:, None] & mask_c[None, :]


# ------------------------------------------------------------ residual + LayerNorm
@triton.jit
def _ln_fwd_load(X, Y, YB, G, XO, r, mask_m, C, stride_x, stride_y, stride_xo,
                 OFF: tl.constexpr, CH: tl.constexpr, HAS_Y: tl.constexpr, HAS_YB: tl.constexpr,
                 HAS_G: tl.constexpr, FP64: tl.constexpr):
    """Columns [OFF, OFF + CH) of a row tile: x, or x_out = x + gamma * (y + y_bias) stored and
    read back as stored; zero outside the rows."""
    cols = OFF + tl.arange(0, CH)
    mask_c = cols < C
    mask = mask_m[:, None] & mask_c[None, :]
    x = _up(tl.load(X + r * stride_x + cols[None, :], mask=mask, other=0.0), FP64)
    if HAS_Y:
        y = _up(tl.load(Y + r * stride_y + cols[None, :], mask=mask, other=0.0), FP64)
        if HAS_YB:
            y += _vec(YB, cols, mask_c, True, 0.0, FP64)
        if HAS_G:
            y *= _vec(G, cols, mask_c, True, 0.0, FP64)
        xo = (x + y).to(XO.dtype.element_ty)
        tl.store(XO + r * stride_xo + cols[None, :], xo, mask=mask)
        x = _up(xo, FP64)  # normalise what was stored, as eager does
    return x


@triton.jit
def _ln_fwd_center(x, mean, mask_m, C, OFF: tl.constexpr, CH: tl.constexpr):
    cols = OFF + tl.arange(0, CH)
    return tl.where(mask_m[:, None] & (cols < C)[None, :], x - mean[:, None], 0.0)


@triton.jit
def _ln_fwd_store(W, B, H, xc, rstd, r, mask_m, C, stride_h, OFF: tl.constexpr, CH: tl.constexpr,
                  HAS_W: tl.constexpr, HAS_B: tl.constexpr, FP64: tl.constexpr):
    cols = OFF + tl.arange(0, CH)
    mask_c = cols < C
    h = xc * rstd[:, None] * _vec(W, cols, mask_c, HAS_W, 1.0, FP64) + _vec(B, cols, mask_c, HAS_B, 0.0, FP64)
    tl.store(H + r * stride_h + cols[None, :], h.to(H.dtype.element_ty), mask=mask_m[:, None] & mask_c[None, :])


@triton.jit
def _ln_fwd_kernel(
    X, Y, YB, G, W, B, XO, H, MEAN, RSTD,
    M, C, stride_x, stride_y, stride_xo, stride_h, eps,
    HAS_Y: tl.constexpr, HAS_YB: tl.constexpr, HAS_G: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, FP64: tl.constexpr,
    BLOCK_M: tl.constexpr, CHUNK0: tl.constexpr, CHUNK1: tl.constexpr, CHUNK2: tl.constexpr,
):
    # rows as up to three power-of-two column chunks (ln_chunks), like the backward
    OFF1: tl.constexpr = CHUNK0
    OFF2: tl.constexpr = CHUNK0 + CHUNK1
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rows < M
    r = rows.to(tl.int64)[:, None]
    x0 = _ln_fwd_load(X, Y, YB, G, XO, r, mask_m, C, stride_x, stride_y, stride_xo, 0, CHUNK0,
                      HAS_Y, HAS_YB, HAS_G, FP64)
    total = tl.sum(x0, axis=1)
    if CHUNK1 > 0:
        x1 = _ln_fwd_load(X, Y, YB, G, XO, r, mask_m, C, stride_x, stride_y, stride_xo, OFF1, CHUNK1,
                          HAS_Y, HAS_YB, HAS_G, FP64)
        total += tl.sum(x1, axis=1)
    if CHUNK2 > 0:
        x2 = _ln_fwd_load(X, Y, YB, G, XO, r, mask_m, C, stride_x, stride_y, stride_xo, OFF2, CHUNK2,
                          HAS_Y, HAS_YB, HAS_G, FP64)
        total += tl.sum(x2, axis=1)
    mean = total / C
    xc0 = _ln_fwd_center(x0, mean, mask_m, C, 0, CHUNK0)
    sq = tl.sum(xc0 * xc0, axis=1)
    if CHUNK1 > 0:
        xc1 = _ln_fwd_center(x1, mean, mask_m, C, OFF1, CHUNK1)
        sq += tl.sum(xc1 * xc1, axis=1)
    if CHUNK2 > 0:
        xc2 = _ln_fwd_center(x2, mean, mask_m, C, OFF2, CHUNK2)
        sq += tl.sum(xc2 * xc2, axis=1)
    eps = tl.cast(eps, tl.float32)  # fp32 also from a float64 scalar (Inductor types Python floats fp64)
    rstd = 1.0 / tl.sqrt(sq / C + eps)
    _ln_fwd_store(W, B, H, xc0, rstd, r, mask_m, C, stride_h, 0, CHUNK0, HAS_W, HAS_B, FP64)
    if CHUNK1 > 0:
        _ln_fwd_store(W, B, H, xc1, rstd, r, mask_m, C, stride_h, OFF1, CHUNK1, HAS_W, HAS_B, FP64)
    if CHUNK2 > 0:
        _ln_fwd_store(W, B, H, xc2, rstd, r, mask_m, C, stride_h, OFF2, CHUNK2, HAS_W, HAS_B, FP64)
    tl.store(MEAN + rows, mean, mask=mask_m)
    tl.store(RSTD + rows, rstd, mask=mask_m)


@triton.jit
def _ln_bwd_load(XO, DH, W, r, mask_m, mean, rstd, C, stride_xo, stride_dh,
                 OFF: tl.constexpr, CH: tl.constexpr, HAS_W: tl.constexpr, FP64: tl.constexpr):
    """Columns [OFF, OFF + CH) of a row tile: (xhat, dh, weight * dh), zero outside the rows."""
    cols = OFF + tl.arange(0, CH)
    mask_c = cols < C
    mask = mask_m[:, None] & mask_c[None, :]
    xo = _up(tl.load(XO + r * stride_xo + cols[None, :], mask=mask, other=0.0), FP64)
    xhat = tl.where(mask, (xo - mean[:, None]) * rstd[:, None], 0.0)
    dh = _up(tl.load(DH + r * stride_dh + cols[None, :], mask=mask, other=0.0), FP64)
    return xhat, dh, dh * _vec(W, cols, mask_c, HAS_W, 1.0, FP64)


@triton.jit
def _ln_bwd_store(DXO, Y, YB, G, DX, DY, r, mask_m, C, stride_dxo, stride_y, stride_dx, stride_dy,
                  xhat, dh, wdh, c1, c2, rstd, acc_dw, acc_db, acc_dg, acc_dyb,
                  OFF: tl.constexpr, CH: tl.constexpr, HAS_DXO: tl.constexpr, HAS_Y: tl.constexpr,
                  NEED_DY: tl.constexpr, HAS_YB: tl.constexpr, HAS_G: tl.constexpr, HAS_W: tl.constexpr,
                  HAS_B: tl.constexpr, FP64: tl.constexpr):
    """Columns [OFF, OFF + CH) of a row tile: dx (and dy) stored, the column sums accumulated."""
    cols = OFF + tl.arange(0, CH)
    mask_c = cols < C
    mask = mask_m[:, None] & mask_c[None, :]
    dx = tl.where(mask, (wdh - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None], 0.0)
    if HAS_DXO:
        dx += _up(tl.load(DXO + r * stride_dxo + cols[None, :], mask=mask, other=0.0), FP64)
    tl.store(DX + r * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    if HAS_Y:
        g = _vec(G, cols, mask_c, HAS_G, 1.0, FP64)
        if NEED_DY:
            tl.store(DY + r * stride_dy + cols[None, :], (dx * g).to(DY.dtype.element_ty), mask=mask)
        if HAS_G:
            y = _up(tl.load(Y + r * stride_y + cols[None, :], mask=mask, other=0.0), FP64)
            acc_dg += tl.sum(dx * (y + _vec(YB, cols, mask_c, HAS_YB, 0.0, FP64)), axis=0)
        if HAS_YB:
            acc_dyb += tl.sum(dx * g, axis=0)
    if HAS_W:
        acc_dw += tl.sum(dh * xhat, axis=0)
    if HAS_B:
        acc_db += tl.sum(dh, axis=0)
    return acc_dw, acc_db, acc_dg, acc_dyb


@triton.jit
def _ln_bwd_partials(DW_P, DB_P, DG_P, DYB_P, pid, C, acc_dw, acc_db, acc_dg, acc_dyb,
                     OFF: tl.constexpr, CH: tl.constexpr, HAS_Y: tl.constexpr, HAS_YB: tl.constexpr,
                     HAS_G: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """Columns [OFF, OFF + CH) of this program's row of the [P, C] partial sums."""
    cols = OFF + tl.arange(0, CH)
    mask_c = cols < C
    out = pid.to(tl.int64) * C + cols
    if HAS_W:
        tl.store(DW_P + out, acc_dw, mask=mask_c)
    if HAS_B:
        tl.store(DB_P + out, acc_db, mask=mask_c)
    if HAS_Y:
        if HAS_G:
            tl.store(DG_P + out, acc_dg, mask=mask_c)
        if HAS_YB:
            tl.store(DYB_P + out, acc_dyb, mask=mask_c)


@triton.jit
def _ln_bwd_kernel(
    DH, DXO, XO, Y, YB, G, W, MEAN, RSTD, DX, DY,
    DW_P, DB_P, DG_P, DYB_P,
    M, C, rows_per_prog, stride_dh, stride_dxo, stride_xo, stride_y, stride_dx, stride_dy,
    HAS_DXO: tl.constexpr, HAS_Y: tl.constexpr, NEED_DY: tl.constexpr, HAS_YB: tl.constexpr,
    HAS_G: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, FP64: tl.constexpr,
    BLOCK_M: tl.constexpr, CHUNK0: tl.constexpr, CHUNK1: tl.constexpr, CHUNK2: tl.constexpr,
):
    # A row is up to three power-of-two column chunks (ln_chunks), each its own tiles: e.g.
    # 1280 = 1024 + 256, not one 2048-wide tile with 37.5% of its lanes masked off.
    pid = tl.program_id(0)
    OFF1: tl.constexpr = CHUNK0
    OFF2: tl.constexpr = CHUNK0 + CHUNK1
    dw0 = _up(tl.zeros([CHUNK0], tl.float32), FP64)
    db0, dg0, dyb0 = dw0, dw0, dw0
    if CHUNK1 > 0:
        dw1 = _up(tl.zeros([CHUNK1], tl.float32), FP64)
        db1, dg1, dyb1 = dw1, dw1, dw1
    if CHUNK2 > 0:
        dw2 = _up(tl.zeros([CHUNK2], tl.float32), FP64)
        db2, dg2, dyb2 = dw2, dw2, dw2
    row_start = pid * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, M)
    for start in range(row_start, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        mask_m = rows < row_end
        r = rows.to(tl.int64)[:, None]
        mean = tl.load(MEAN + rows, mask=mask_m, other=0.0)
        rstd = tl.load(RSTD + rows, mask=mask_m, other=0.0)
        # the row sums of xhat * w * dh and w * dh, over every chunk
        xhat0, dh0, wdh0 = _ln_bwd_load(XO, DH, W, r, mask_m, mean, rstd, C, stride_xo, stride_dh, 0, CHUNK0,
                                        HAS_W, FP64)
        s1 = tl.sum(xhat0 * wdh0, axis=1)
        s2 = tl.sum(wdh0, axis=1)
        if CHUNK1 > 0:
            xhat1, dh1, wdh1 = _ln_bwd_load(XO, DH, W, r, mask_m, mean, rstd, C, stride_xo, stride_dh, OFF1,
                                            CHUNK1, HAS_W, FP64)
            s1 += tl.sum(xhat1 * wdh1, axis=1)
            s2 += tl.sum(wdh1, axis=1)
        if CHUNK2 > 0:
            xhat2, dh2, wdh2 = _ln_bwd_load(XO, DH, W, r, mask_m, mean, rstd, C, stride_xo, stride_dh, OFF2,
                                            CHUNK2, HAS_W, FP64)
            s1 += tl.sum(xhat2 * wdh2, axis=1)
            s2 += tl.sum(wdh2, axis=1)
        c1 = s1 / C
        c2 = s2 / C
        dw0, db0, dg0, dyb0 = _ln_bwd_store(
            DXO, Y, YB, G, DX, DY, r, mask_m, C, stride_dxo, stride_y, stride_dx, stride_dy,
            xhat0, dh0, wdh0, c1, c2, rstd, dw0, db0, dg0, dyb0,
            0, CHUNK0, HAS_DXO, HAS_Y, NEED_DY, HAS_YB, HAS_G, HAS_W, HAS_B, FP64)
        if CHUNK1 > 0:
            dw1, db1, dg1, dyb1 = _ln_bwd_store(
                DXO, Y, YB, G, DX, DY, r, mask_m, C, stride_dxo, stride_y, stride_dx, stride_dy,
                xhat1, dh1, wdh1, c1, c2, rstd, dw1, db1, dg1, dyb1,
                OFF1, CHUNK1, HAS_DXO, HAS_Y, NEED_DY, HAS_YB, HAS_G, HAS_W, HAS_B, FP64)
        if CHUNK2 > 0:
            dw2, db2, dg2, dyb2 = _ln_bwd_store(
                DXO, Y, YB, G, DX, DY, r, mask_m, C, stride_dxo, stride_y, stride_dx, stride_dy,
                xhat2, dh2, wdh2, c1, c2, rstd, dw2, db2, dg2, dyb2,
                OFF2, CHUNK2, HAS_DXO, HAS_Y, NEED_DY, HAS_YB, HAS_G, HAS_W, HAS_B, FP64)
    _ln_bwd_partials(DW_P, DB_P, DG_P, DYB_P, pid, C, dw0, db0, dg0, dyb0, 0, CHUNK0,
                     HAS_Y, HAS_YB, HAS_G, HAS_W, HAS_B)
    if CHUNK1 > 0:
        _ln_bwd_partials(DW_P, DB_P, DG_P, DYB_P, pid, C, dw1, db1, dg1, dyb1, OFF1, CHUNK1,
                         HAS_Y, HAS_YB, HAS_G, HAS_W, HAS_B)
    if CHUNK2 > 0:
        _ln_bwd_partials(DW_P, DB_P, DG_P, DYB_P, pid, C, dw2, db2, dg2, dyb2, OFF2, CHUNK2,
                         HAS_Y, HAS_YB, HAS_G, HAS_W, HAS_B)


# ----------------------------------------------------------------------- bias + GELU
@triton.jit
def _bias_gelu_fwd_kernel(
    X, BIAS, OUT, M, C, stride_x, stride_o,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, FP64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    r, cols, mask_m, mask_c, mask = _tile(tl.program_id(0), tl.program_id(1), M, C, BLOCK_M, BLOCK_C)
    x = _up(tl.load(X + r * stride_x + cols[None, :], mask=mask, other=0.0), FP64)
    x += _vec(BIAS, cols, mask_c, HAS_BIAS, 0.0, FP64)
    tl.store(OUT + r * stride_o + cols[None, :], _gelu(x, ACT).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(
    DOUT, X, BIAS, DX, DB_P, M, C, rows_per_prog, stride_do, stride_x, stride_dx,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, FP64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid, pid_c = tl.program_id(0), tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = cols < C
    b = _vec(BIAS, cols, mask_c, HAS_BIAS, 0.0, FP64)
    acc = _up(tl.zeros([BLOCK_C], tl.float32), FP64)
    row_start = pid * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, M)
    for start in range(row_start, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        mask = (rows < row_end)[:, None] & mask_c[None, :]
        r = rows.to(tl.int64)[:, None]
        x = _up(tl.load(X + r * stride_x + cols[None, :], mask=mask, other=0.0), FP64) + b
        do = _up(tl.load(DOUT + r * stride_do + cols[None, :], mask=mask, other=0.0), FP64)
        dx = tl.where(mask, do * _gelu_grad(x, ACT), 0.0)
        tl.store(DX + r * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_BIAS:
            acc += tl.sum(dx, axis=0)
    if HAS_BIAS:
        tl.store(DB_P + pid.to(tl.int64) * C + cols, acc, mask=mask_c)


# ------------------------------------------------------- bias + LayerScale + residual
@triton.jit
def _bias_scale_residual_fwd_kernel(
    Y, BIAS, G, R, OUT, M, C, stride_y, stride_r, stride_o,
    HAS_BIAS: tl.constexpr, HAS_G: tl.constexpr, FP64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    r, cols, mask_m, mask_c, mask = _tile(tl.program_id(0), tl.program_id(1), M, C, BLOCK_M, BLOCK_C)
    y = _up(tl.load(Y + r * stride_y + cols[None, :], mask=mask, other=0.0), FP64)
    y = (y + _vec(BIAS, cols, mask_c, HAS_BIAS, 0.0, FP64)) * _vec(G, cols, mask_c, HAS_G, 1.0, FP64)
    res = _up(tl.load(R + r * stride_r + cols[None, :], mask=mask, other=0.0), FP64)
    tl.store(OUT + r * stride_o + cols[None, :], (res + y).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _bias_scale_residual_bwd_kernel(
    DOUT, Y, BIAS, G, DY, DB_P, DG_P, M, C, rows_per_prog, stride_do, stride_y, stride_dy,
    HAS_BIAS: tl.constexpr, NEED_DB: tl.constexpr, HAS_G: tl.constexpr, FP64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid, pid_c = tl.program_id(0), tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = cols < C
    b = _vec(BIAS, cols, mask_c, HAS_BIAS, 0.0, FP64)
    g = _vec(G, cols, mask_c, HAS_G, 1.0, FP64)
    zero = _up(tl.zeros([BLOCK_C], tl.float32), FP64)
    acc_db, acc_dg = zero, zero
    row_start = pid * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, M)
    for start in range(row_start, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        mask = (rows < row_end)[:, None] & mask_c[None, :]
        r = rows.to(tl.int64)[:, None]
        do = _up(tl.load(DOUT + r * stride_do + cols[None, :], mask=mask, other=0.0), FP64)
        dy = do * g
        tl.store(DY + r * stride_dy + cols[None, :], dy.to(DY.dtype.element_ty), mask=mask)
        if NEED_DB:
            acc_db += tl.sum(dy, axis=0)
        if HAS_G:
            y = _up(tl.load(Y + r * stride_y + cols[None, :], mask=mask, other=0.0), FP64)
            acc_dg += tl.sum(tl.where(mask, do * (y + b), 0.0), axis=0)
    out = pid.to(tl.int64) * C + cols
    if NEED_DB:
        tl.store(DB_P + out, acc_db, mask=mask_c)
    if HAS_G:
        tl.store(DG_P + out, acc_dg, mask=mask_c)


# ------------------------------------------------------------------------ launchers
INTERPRET = is_interpreted(_ln_fwd_kernel)
# Fixed tiles under the interpreter, where each program costs milliseconds of Python
# whatever its size: few programs, yet small enough that the test shapes cross several
# row blocks, column blocks and row chunks (and hit every mask).
INTERPRET_ROWS, INTERPRET_COLS, INTERPRET_CHUNKS = 16, 256, 3


def _wrap(kernel):
    return wrap(kernel, INTERPRET)


def _warps(tile: int) -> dict:
    if INTERPRET:  # the interpreter takes no launch options
        return {}
    return {"num_warps": min(16, max(4, tile // 512))}


def _programs_target(device: torch.device) -> int:
    """How many programs a reduction grid aims for (a few per SM on the GPU)."""
    if INTERPRET or device.type != "cuda":
        return INTERPRET_CHUNKS
    return 4 * device_sms(device)


def _row_chunks(M: int, block_m: int, target: int) -> tuple[int, int]:
    """(programs, rows per program) splitting M rows into contiguous chunks of whole
    ``block_m`` tiles, about ``target`` chunks."""
    per = triton.cdiv(triton.cdiv(max(M, 1), max(target, 1)), block_m) * block_m
    return triton.cdiv(max(M, 1), per), per


def ew_block(C: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_C) for the column-tiled kernels: the column tile (256, 128 or 64)
    that wastes least on C, then rows up to ~4K elements."""
    if INTERPRET:
        return INTERPRET_ROWS, min(INTERPRET_COLS, triton.next_power_of_2(C))
    if C <= 256:
        block_c = triton.next_power_of_2(C)
    else:
        block_c = min((256, 128, 64), key=lambda b: (triton.cdiv(C, b) * b - C, -b))
    return max(1, 4096 // block_c), block_c


# CUDA's limit on grid axis 1, where the column-tiled kernels put their column blocks (at least
# 64 columns each beyond C = 256: ew_block)
MAX_EW_COLUMNS = 65535 * 64


def ew_grid_reasons(C: int) -> list[str]:
    """Why the column-tiled kernels (bias+GELU, bias+LayerScale+residual) cannot launch for rows
    of ``C`` columns (empty: they can)."""
    if C > MAX_EW_COLUMNS:
        return [f"rows of {C} columns: more than 65535 column blocks of 64 on the kernel's grid axis 1 "
                f"(CUDA's limit; at most {MAX_EW_COLUMNS} columns)"]
    return []


def acc_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _floor_pow2(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def ln_chunks(C: int) -> tuple[int, int, int]:
    """A row of C columns as up to three power-of-two chunks (zeros for absent ones): the
    fewest whose padding leaves at most 1/8 of the lanes idle (three chunks when none do).
    1280 = 1024 + 256, 1408 -> 1024 + 512, 1664 = 1024 + 512 + 128, 768 = 512 + 256."""
    for n in (1, 2, 3):
        chunks, rest = [], C
        while len(chunks) < n - 1 and rest & (rest - 1):  # rest not a power of two: split off the top
            top = 1 << (rest.bit_length() - 1)
            chunks.append(top)
            rest -= top
        chunks.append(triton.next_power_of_2(rest))
        if 8 * (sum(chunks) - C) <= sum(chunks) or n == 3:
            return tuple(chunks + [0] * (3 - len(chunks)))
    raise AssertionError("unreachable")


def ln_bwd_config(C: int, itemsize: int) -> tuple[int, tuple[int, int, int], int]:
    """(BLOCK_M, chunks, num_warps) of the LayerNorm backward. Each thread holds its part of
    a row tile of every input plus four column sums, all in fp32, so the warps grow with the
    padded row: 4 up to 768 columns, then 8, and 16 beyond 1536 columns (beyond 1280 for
    fp32 rows: 8 warps at 1408-1536 need 128 registers, 16 need 60; 16-bit rows of 1664
    spill 24 bytes at 8 warps under triton 3.6). A tile holds about 4
    values per thread and tensor (one row from 384 columns on). Measured on sm_90 (``make
    sm90-compile``, triton 3.6 and 3.8): every ViT width 192-1664, every dtype and every
    combination of optional tensors at most 128 registers and no spills, so 16 or more
    warps resident per SM (2-3x what one whole 2048-column tile at 4 warps allowed)."""
    chunks = ln_chunks(C)
    padded = sum(chunks)
    if INTERPRET:
        return max(2, min(INTERPRET_ROWS, _floor_pow2(16384 // padded))), chunks, 4
    warps = 4 if padded <= 768 else 8 if padded <= (1536 if itemsize <= 2 else 1280) else 16
    return _floor_pow2(max(1, min(16, 32 * warps * 4 // padded))), chunks, warps


def ln_fwd_config(C: int, itemsize: int) -> tuple[int, tuple[int, int, int], int]:
    """(BLOCK_M, chunks, num_warps) of the LayerNorm forward: whole rows, up to 2K elements
    per tile (one row from 1025 padded columns on), 4-16 warps at about 8 (16-bit) or 16
    (fp32) elements per thread. Checked on sm_90 with ``make sm90-compile``: ptxas spilled
    8-16 bytes (at 32-40 registers) in some specialisations with 4K-element tiles (triton
    3.8) and with 8 warps for fp32 rows of 1408-1536 (triton 3.6)."""
    chunks = ln_chunks(C)
    padded = sum(chunks)
    if INTERPRET:
        return max(2, min(INTERPRET_ROWS, _floor_pow2(16384 // padded))), chunks, 4
    block_m = _floor_pow2(max(1, min(16, 2048 // padded)))
    per_thread = 8 if itemsize <= 2 else 16
    return block_m, chunks, min(16, max(4, triton.next_power_of_2(block_m * padded // (32 * per_thread))))


def _vectors(*ts: Optional[torch.Tensor]) -> tuple:
    """The [C] parameter vectors (bias, gamma, weight) as the kernels read them: dense (a strided
    view, e.g. every other element of a larger tensor, passes the shape checks)."""
    return tuple(None if t is None else t.contiguous() for t in ts)


def launch_ln_fwd(x, y, y_bias, gamma, weight, bias, x_out, h, mean, rstd, eps: float) -> None:
    """All tensors as rows [M, C] (x, y, x_out, h) or [C] / [M] vectors. y may be None."""
    y_bias, gamma, weight, bias = _vectors(y_bias, gamma, weight, bias)
    M, C = x.shape
    block_m, chunks, warps = ln_fwd_config(C, x.element_size())
    has_y = y is not None
    _wrap(_ln_fwd_kernel)[(triton.cdiv(M, block_m),)](
        x, y if has_y else x, y_bias if y_bias is not None else x, gamma if gamma is not None else x,
        weight if weight is not None else x, bias if bias is not None else x,
        x_out if has_y else x, h, mean, rstd,
        M, C, x.stride(0), y.stride(0) if has_y else 0, x_out.stride(0) if has_y else 0, h.stride(0), eps,
        HAS_Y=has_y, HAS_YB=y_bias is not None, HAS_G=gamma is not None,
        HAS_W=weight is not None, HAS_B=bias is not None, FP64=mean.dtype == torch.float64,
        BLOCK_M=block_m, CHUNK0=chunks[0], CHUNK1=chunks[1], CHUNK2=chunks[2],
        **({} if INTERPRET else {"num_warps": warps}),
    )


def launch_ln_bwd(dh, dx_out, x_out, y, y_bias, gamma, weight, has_bias: bool, mean, rstd, dx, dy,
                  has_y: bool) -> dict:
    """LayerNorm (+ residual branch) backward. Rows: dh, dx_out, x_out, y, dx, dy. Returns
    the column sums as {"dweight", "dbias", "dgamma", "dy_bias"} in the arithmetic dtype
    (only the ones that exist)."""
    y_bias, gamma, weight = _vectors(y_bias, gamma, weight)
    M, C = x_out.shape
    block_m, chunks, warps = ln_bwd_config(C, x_out.element_size())
    P, per = _row_chunks(M, block_m, _programs_target(x_out.device))
    adt = mean.dtype
    want = {"dweight": weight is not None, "dbias": has_bias,
            "dgamma": has_y and gamma is not None, "dy_bias": has_y and y_bias is not None}
    part = {k: torch.empty((P, C), dtype=adt, device=x_out.device) if v else mean for k, v in want.items()}
    need_dy = dy is not None
    _wrap(_ln_bwd_kernel)[(P,)](
        dh, dx_out if dx_out is not None else dh, x_out, y if y is not None else dh,
        y_bias if y_bias is not None else mean, gamma if gamma is not None else mean,
        weight if weight is not None else mean, mean, rstd, dx, dy if need_dy else dx,
        part["dweight"], part["dbias"], part["dgamma"], part["dy_bias"],
        M, C, per, dh.stride(0), dx_out.stride(0) if dx_out is not None else 0, x_out.stride(0),
        y.stride(0) if y is not None else 0, dx.stride(0), dy.stride(0) if need_dy else 0,
        HAS_DXO=dx_out is not None, HAS_Y=has_y, NEED_DY=need_dy, HAS_YB=y_bias is not None,
        HAS_G=gamma is not None, HAS_W=weight is not None, HAS_B=has_bias, FP64=adt == torch.float64,
        BLOCK_M=block_m, CHUNK0=chunks[0], CHUNK1=chunks[1], CHUNK2=chunks[2],
        **({} if INTERPRET else {"num_warps": warps}),
    )
    return {k: part[k].sum(0) for k, v in want.items() if v}


def launch_bias_gelu_fwd(x, bias, out, act: str) -> None:
    (bias,) = _vectors(bias)
    M, C = x.shape
    block_m, block_c = ew_block(C)
    _wrap(_bias_gelu_fwd_kernel)[(triton.cdiv(M, block_m), triton.cdiv(C, block_c))](
        x, bias if bias is not None else x, out, M, C, x.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, ACT=ACT_CODES[act], FP64=acc_dtype(x, bias) == torch.float64,
        BLOCK_M=block_m, BLOCK_C=block_c, **_warps(block_m * block_c),
    )


def launch_bias_gelu_bwd(dout, x, bias, dx, act: str) -> Optional[torch.Tensor]:
    """dx = dout * act'(x + bias) into ``dx``; returns dbias (arithmetic dtype) or None."""
    (bias,) = _vectors(bias)
    M, C = x.shape
    block_m, block_c = ew_block(C)
    col_blocks = triton.cdiv(C, block_c)
    P, per = _row_chunks(M, block_m, max(1, _programs_target(x.device) // col_blocks))
    adt = acc_dtype(x, bias)
    part = torch.empty((P, C), dtype=adt, device=x.device) if bias is not None else dx
    _wrap(_bias_gelu_bwd_kernel)[(P, col_blocks)](
        dout, x, bias if bias is not None else x, dx, part, M, C, per,
        dout.stride(0), x.stride(0), dx.stride(0),
        HAS_BIAS=bias is not None, ACT=ACT_CODES[act], FP64=adt == torch.float64,
        BLOCK_M=block_m, BLOCK_C=block_c, **_warps(block_m * block_c),
    )
    return part.sum(0) if bias is not None else None


def launch_bias_scale_residual_fwd(y, bias, gamma, residual, out) -> None:
    bias, gamma = _vectors(bias, gamma)
    M, C = y.shape
    block_m, block_c = ew_block(C)
    _wrap(_bias_scale_residual_fwd_kernel)[(triton.cdiv(M, block_m), triton.cdiv(C, block_c))](
        y, bias if bias is not None else y, gamma if gamma is not None else y, residual, out,
        M, C, y.stride(0), residual.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, HAS_G=gamma is not None,
        FP64=acc_dtype(y, bias, gamma, residual) == torch.float64,
        BLOCK_M=block_m, BLOCK_C=block_c, **_warps(block_m * block_c),
    )


def launch_bias_scale_residual_bwd(dout, y, bias, gamma, dy, need_dbias: bool) -> dict:
    """dy = gamma * dout into ``dy``; returns {"dbias", "dgamma"} (those requested/existing)."""
    bias, gamma = _vectors(bias, gamma)
    M, C = dout.shape
    block_m, block_c = ew_block(C)
    col_blocks = triton.cdiv(C, block_c)
    P, per = _row_chunks(M, block_m, max(1, _programs_target(dout.device) // col_blocks))
    adt = acc_dtype(dout, y, bias, gamma)
    has_g = gamma is not None
    part_b = torch.empty((P, C), dtype=adt, device=dout.device) if need_dbias else dy
    part_g = torch.empty((P, C), dtype=adt, device=dout.device) if has_g else dy
    _wrap(_bias_scale_residual_bwd_kernel)[(P, col_blocks)](
        dout, y if has_g else dout, bias if bias is not None else dout, gamma if has_g else dout, dy,
        part_b, part_g, M, C, per, dout.stride(0), y.stride(0) if has_g else 0, dy.stride(0),
        HAS_BIAS=bias is not None, NEED_DB=need_dbias, HAS_G=has_g, FP64=adt == torch.float64,
        BLOCK_M=block_m, BLOCK_C=block_c, **_warps(block_m * block_c),
    )
    out = {}
    if need_dbias:
        out["dbias"] = part_b.sum(0)
    if has_g:
        out["dgamma"] = part_g.sum(0)
    return out
