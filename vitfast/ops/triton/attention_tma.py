"""Hopper kernels for :mod:`vitfast.ops.attention`: TMA through device-side tensor descriptors, warp
specialisation, and a persistent variant of the forward; the 5-matmul backward by TMA (at the end,
"tma" and "tma_atomic").

The forward variants (``attention.FWD_VARIANTS``) besides the pointer kernel:

* ``tma``: one program per (batch, head, query tile), as the pointer kernel, but every tile
  moves by TMA (``tl.make_tensor_descriptor``, made on the device: no host-side descriptor,
  which crashed the compiler with warp specialisation at 4 warps and was silently unspecialised
  at 8). The descriptors span the (batch, head)'s own ``[N, D]`` rows with their real strides,
  so the copy engine's out-of-bounds zero fill replaces every row and column mask: one loop
  over ``cdiv(N, BLOCK_N)`` key tiles (no tail loop), with the key columns past N set to -inf
  in the scores (zero-filled keys would otherwise score 0), and the output store drops the
  rows past N by itself. Q is a TMA copy too, straight into shared memory instead of loaded
  through registers and stored there; but as compiled for sm_90 (triton 3.6 and 3.8) the program
  still waits for it before the pipeline's first K/V copies are issued (``tma_before_wait`` = 1 in
  tests/ops/_sm90_compile.py), so at short N each program still pays one copy latency up front;
  configs fitting two or more programs per SM hide it. With ``WARP_SPEC`` the key loop is ``tl.range(..., warp_specialize=True)``: a producer warp
  group issues the copies, the consumer warps do the dots and the softmax.
* ``tma_persistent``: the same tile, with ``PER_SM`` programs per SM (grid = min(tiles,
  SMs x PER_SM)) each walking the flattened (batch, head, query tile) list in steps of the grid
  size. Its descriptors span the whole ``[B, H, N, D]`` tensor (rank 4, block ``[1, 1, rows,
  cols]``, zero fill still at each head's row N), so they are made once per program rather than
  once per tile. No warp specialisation here (not tried nested inside the loop over tiles; the
  ``tma`` kernel's configs carry it).

Head dims are the pointer kernel's column chunks (``attention.d_chunks``): 80 = 64 + 16 through
two descriptors over the same rows, one ``[rows, 64]`` box at column 0 and one ``[rows, 16]``
box at column 64; 72 -> 64 + 16 and 88 -> 64 + 32, the columns past D of the second box
zero-filled by the copy engine (and dropped by the output store), never masked in registers.

TMA needs what the launcher checks (``tma_not_supported_reasons``): 16-byte aligned base
pointers of q, k, v and out, every (batch, head, token) stride a multiple of 16 bytes (D = 72
and 88 in 16-bit: 144 and 176-byte rows, fine), the last stride 1. Device-side descriptors need
a global scratch: ``triton.set_allocator`` is set lazily before a launch wherever the current thread
or context has none (:func:`.tma.ensure_allocator`, shared with the patch embedding's weight tiles).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .attention_tiles import _dq_from_scratch, _program_tile
# the host side shared with the other TMA kernels (re-exported: the launcher and tests use them here)
from .tma import _torch_alloc, ensure_allocator, missing_features, triton_features  # noqa: F401


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _tile_load(desc, b, h, row, col, ROWS: tl.constexpr, COLS: tl.constexpr, RANK4: tl.constexpr):
    """A [ROWS, COLS] tile at (row, col) of one (batch, head): rank-2 descriptors already point at
    the (batch, head), rank-4 ones are indexed by it."""
    if RANK4:
        x = desc.load([b, h, row, col]).reshape(ROWS, COLS)
    else:
        x = desc.load([row, col])
    return x


@triton.jit
def _tile_store(desc, b, h, row, col, x, ROWS: tl.constexpr, COLS: tl.constexpr, RANK4: tl.constexpr):
    if RANK4:
        desc.store([b, h, row, col], x.reshape(1, 1, ROWS, COLS))
    else:
        desc.store([row, col], x)


@triton.jit
def _tma_fwd_tile(dq, dq1, dk, dk1, dv, dv1, do, do1, LSE, b, h, bh, start_m, N, qk_scale,
                  BLOCK_D: tl.constexpr, SPLIT_D: tl.constexpr, BLOCK_D1: tl.constexpr,
                  PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  WARP_SPEC: tl.constexpr, RANK4: tl.constexpr):
    """One query tile of one (batch, head): out rows [start_m, start_m + BLOCK_M) and their lse.
    Rows and columns past N and D come in as zeros (TMA fill) and are dropped by the stores."""
    q = _tile_load(dq, b, h, start_m, 0, BLOCK_M, BLOCK_D, RANK4)
    if SPLIT_D:
        q1 = _tile_load(dq1, b, h, start_m, BLOCK_D, BLOCK_M, BLOCK_D1, RANK4)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in tl.range(0, N, BLOCK_N, warp_specialize=WARP_SPEC):
        k = _tile_load(dk, b, h, start_n, 0, BLOCK_N, BLOCK_D, RANK4)
        s = tl.dot(q, k.T, input_precision=PRECISION)
        if SPLIT_D:
            k1 = _tile_load(dk1, b, h, start_n, BLOCK_D, BLOCK_N, BLOCK_D1, RANK4)
            s += tl.dot(q1, k1.T, input_precision=PRECISION)
        # keys past N were zero-filled: they must not score 0. One select per score in every
        # tile (no separate tail loop); full tiles keep every column.
        s = tl.where((start_n + offs_n)[None, :] < N, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _tile_load(dv, b, h, start_n, 0, BLOCK_N, BLOCK_D, RANK4)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        if SPLIT_D:
            v1 = _tile_load(dv1, b, h, start_n, BLOCK_D, BLOCK_N, BLOCK_D1, RANK4)
            acc1 = acc1 * alpha[:, None] + tl.dot(p.to(v1.dtype), v1, input_precision=PRECISION)
        m_i = m_new
    out_dtype = q.dtype  # q, k, v and out share one dtype (the op checks it)
    _tile_store(do, b, h, start_m, 0, (acc / l_i[:, None]).to(out_dtype), BLOCK_M, BLOCK_D, RANK4)
    if SPLIT_D:
        _tile_store(do1, b, h, start_m, BLOCK_D, (acc1 / l_i[:, None]).to(out_dtype), BLOCK_M, BLOCK_D1, RANK4)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
    tl.store(LSE + bh * N + offs_m, lse, mask=offs_m < N)


@triton.jit
def _desc2(T, N, stride_n, ROWS: tl.constexpr, COLS: tl.constexpr, HEAD_DIM: tl.constexpr):
    return tl.make_tensor_descriptor(T, shape=[N, HEAD_DIM], strides=[stride_n, 1], block_shape=[ROWS, COLS])


@triton.jit
def _desc4(T, B, H, N, stride_b, stride_h, stride_n, ROWS: tl.constexpr, COLS: tl.constexpr,
           HEAD_DIM: tl.constexpr):
    return tl.make_tensor_descriptor(T, shape=[B, H, N, HEAD_DIM], strides=[stride_b, stride_h, stride_n, 1],
                                     block_shape=[1, 1, ROWS, COLS])


@triton.jit
def _attn_fwd_tma_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
    H, N, N_BUCKET, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT_D: tl.constexpr, BLOCK_D1: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WARP_SPEC: tl.constexpr,
):
    """One program per (batch, head, query tile); rank-2 descriptors over the (batch, head)'s rows."""
    pid = tl.program_id(0)
    num_tiles = tl.cdiv(N, BLOCK_M)
    bh = pid // num_tiles
    start_m = (pid % num_tiles) * BLOCK_M
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    O += b * stride_ob + h * stride_oh
    dq = _desc2(Q, N, stride_qn, BLOCK_M, BLOCK_D, HEAD_DIM)
    dk = _desc2(K, N, stride_kn, BLOCK_N, BLOCK_D, HEAD_DIM)
    dv = _desc2(V, N, stride_vn, BLOCK_N, BLOCK_D, HEAD_DIM)
    do = _desc2(O, N, stride_on, BLOCK_M, BLOCK_D, HEAD_DIM)
    if SPLIT_D:  # the second column chunk: its own box width over the same rows
        dq1 = _desc2(Q, N, stride_qn, BLOCK_M, BLOCK_D1, HEAD_DIM)
        dk1 = _desc2(K, N, stride_kn, BLOCK_N, BLOCK_D1, HEAD_DIM)
        dv1 = _desc2(V, N, stride_vn, BLOCK_N, BLOCK_D1, HEAD_DIM)
        do1 = _desc2(O, N, stride_on, BLOCK_M, BLOCK_D1, HEAD_DIM)
    else:  # unused placeholders
        dq1, dk1, dv1, do1 = dq, dk, dv, do
    # fp32 even from a float64 scalar (Inductor types Python floats as fp64; see attention.py)
    qk_scale = tl.cast(scale, tl.float32) * 1.4426950408889634
    _tma_fwd_tile(dq, dq1, dk, dk1, dv, dv1, do, do1, LSE, b, h, bh.to(tl.int64), start_m, N, qk_scale,
                  BLOCK_D, SPLIT_D, BLOCK_D1, PRECISION, BLOCK_M, BLOCK_N, WARP_SPEC, False)


@triton.jit
def _attn_fwd_tma_persistent_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
    B, H, N, N_BUCKET, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT_D: tl.constexpr, BLOCK_D1: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PER_SM: tl.constexpr,
):
    """A fixed grid (PER_SM programs per SM, set by the launcher) walking every (batch, head,
    query tile) in steps of the grid size; rank-4 descriptors made once per program."""
    dq = _desc4(Q, B, H, N, stride_qb, stride_qh, stride_qn, BLOCK_M, BLOCK_D, HEAD_DIM)
    dk = _desc4(K, B, H, N, stride_kb, stride_kh, stride_kn, BLOCK_N, BLOCK_D, HEAD_DIM)
    dv = _desc4(V, B, H, N, stride_vb, stride_vh, stride_vn, BLOCK_N, BLOCK_D, HEAD_DIM)
    do = _desc4(O, B, H, N, stride_ob, stride_oh, stride_on, BLOCK_M, BLOCK_D, HEAD_DIM)
    if SPLIT_D:
        dq1 = _desc4(Q, B, H, N, stride_qb, stride_qh, stride_qn, BLOCK_M, BLOCK_D1, HEAD_DIM)
        dk1 = _desc4(K, B, H, N, stride_kb, stride_kh, stride_kn, BLOCK_N, BLOCK_D1, HEAD_DIM)
        dv1 = _desc4(V, B, H, N, stride_vb, stride_vh, stride_vn, BLOCK_N, BLOCK_D1, HEAD_DIM)
        do1 = _desc4(O, B, H, N, stride_ob, stride_oh, stride_on, BLOCK_M, BLOCK_D1, HEAD_DIM)
    else:
        dq1, dk1, dv1, do1 = dq, dk, dv, do
    qk_scale = tl.cast(scale, tl.float32) * 1.4426950408889634
    m_tiles = tl.cdiv(N, BLOCK_M)
    for tile in range(tl.program_id(0), B * H * m_tiles, tl.num_programs(0)):
        bh = tile // m_tiles
        start_m = (tile % m_tiles) * BLOCK_M
        _tma_fwd_tile(dq, dq1, dk, dk1, dv, dv1, do, do1, LSE, bh // H, bh % H, bh.to(tl.int64), start_m, N,
                      qk_scale, BLOCK_D, SPLIT_D, BLOCK_D1, PRECISION, BLOCK_M, BLOCK_N, False, True)


# ----------------------------------------------------------------------------- backward
# The 5-matmul backward (attention_bwd's _attn_bwd_fused_kernel) with its K, V, Q and dO tiles
# moved by TMA and dK, dV stored by it. The copy engine's zero fill replaces the tail loop and the
# row and column masks: one loop of cdiv(N, BLOCK_M) query tiles per key tile; query rows past N
# get lse = +inf (so P = 0) and keys past N a P of 0 by one select. The fp32 dQ scratch stays on
# pointers (atomic adds, or this program's read-modify-write ordered by a barrier), as does the
# final scratch -> dq conversion. Variants "tma" (deterministic: one program per (batch, head)) and
# "tma_atomic" (one per (batch, head, key tile)); no GPU has run them yet.
@triton.jit
def _bwd_tma_key_tile(tq, tq1, tk, tk1, tv, tv1, tdo, tdo1, tdk, tdk1, tdv, tdv1, LSE, DELTA, DQA, stride_an,
                      start_n, N, qk_scale, scale, not_first,
                      BLOCK_D: tl.constexpr, SPLIT_D: tl.constexpr, BLOCK_D1: tl.constexpr,
                      PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ATOMIC: tl.constexpr):
    """dK, dV of the BLOCK_N keys from start_n (stored by TMA) and their share of dQ (to the scratch)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_d1 = BLOCK_D + tl.arange(0, BLOCK_D1)
    k = tk.load([start_n, 0])
    v = tv.load([start_n, 0])
    if SPLIT_D:
        k1 = tk1.load([start_n, BLOCK_D])
        v1 = tv1.load([start_n, BLOCK_D])
    else:
        k1, v1 = k, v
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dk1 = tl.zeros([BLOCK_N, BLOCK_D1], dtype=tl.float32)
    dv1 = tl.zeros([BLOCK_N, BLOCK_D1], dtype=tl.float32)
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        in_m = offs_m < N
        q = tq.load([start_m, 0])
        lse = tl.load(LSE + offs_m, mask=in_m, other=float("inf"))  # rows past N: P = 0
        delta = tl.load(DELTA + offs_m, mask=in_m, other=0.0)
        sT = tl.dot(k, tl.trans(q), input_precision=PRECISION)
        if SPLIT_D:
            q1 = tq1.load([start_m, BLOCK_D])
            sT += tl.dot(k1, tl.trans(q1), input_precision=PRECISION)
        pT = tl.math.exp2(sT * qk_scale - lse[None, :] * 1.4426950408889634)
        pT = tl.where(offs_n[:, None] < N, pT, 0.0)  # zero-filled keys past N: S = 0, not P = 0
        do = tdo.load([start_m, 0])
        dv += tl.dot(pT.to(do.dtype), do, input_precision=PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        if SPLIT_D:
            do1 = tdo1.load([start_m, BLOCK_D])
            dv1 += tl.dot(pT.to(do1.dtype), do1, input_precision=PRECISION)
            dpT += tl.dot(v1, tl.trans(do1), input_precision=PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(q.dtype), q, input_precision=PRECISION)
        if SPLIT_D:
            dk1 += tl.dot(dsT.to(q1.dtype), q1, input_precision=PRECISION)
        ds = tl.trans((dsT * scale).to(k.dtype))
        rows = in_m[:, None]
        _tma_dq_add(DQA + offs_m[:, None] * stride_an + offs_d[None, :], tl.dot(ds, k, input_precision=PRECISION),
                    rows, not_first, ATOMIC)
        if SPLIT_D:
            _tma_dq_add(DQA + offs_m[:, None] * stride_an + offs_d1[None, :],
                        tl.dot(ds, k1, input_precision=PRECISION), rows, not_first, ATOMIC)
    out_dtype = k.dtype  # q, k, v and the gradients share one dtype (the op checks it)
    tdk.store([start_n, 0], (dk * scale).to(out_dtype))
    tdv.store([start_n, 0], dv.to(out_dtype))
    if SPLIT_D:
        tdk1.store([start_n, BLOCK_D], (dk1 * scale).to(out_dtype))
        tdv1.store([start_n, BLOCK_D], dv1.to(out_dtype))


@triton.jit
def _tma_dq_add(ptrs, dq, rows, not_first, ATOMIC: tl.constexpr):
    """scratch[ptrs] += dq for the rows in range: atomically, or as this program's own
    read-modify-write (a plain store on its first key tile: the scratch starts uninitialised)."""
    if ATOMIC:
        tl.atomic_add(ptrs, dq, mask=rows, sem="relaxed")
    else:
        if not_first:
            dq += tl.load(ptrs, mask=rows, other=0.0)
        tl.store(ptrs, dq, mask=rows)


@triton.jit
def _attn_bwd_tma_kernel(
    Q, K, V, DO, LSE, DELTA, DQA, DQ, DK, DV,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    stride_an, H, N, N_BUCKET, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT_D: tl.constexpr, BLOCK_D1: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ATOMIC: tl.constexpr,
):
    """dq, dk, dv in 5 matmuls by TMA: one program per (batch, head) walking every key tile in
    order (deterministic), or with ATOMIC one per (batch, head, key tile). dQ goes through the fp32
    scratch DQA ([B*H, N, BLOCK_D + BLOCK_D1], row stride stride_an); the deterministic program
    converts it to dq itself, the launcher does for ATOMIC."""
    if ATOMIC:
        b, h, bh, first_n = _program_tile(N, H, BLOCK_N)
    else:
        bh = tl.program_id(0).to(tl.int64)
        b, h, first_n = bh // H, bh % H, 0
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    DO += b * stride_dob + h * stride_doh
    DK += b * stride_dkb + h * stride_dkh
    DV += b * stride_dvb + h * stride_dvh
    LSE += bh * N
    DELTA += bh * N
    DQA += bh * N * stride_an
    tq = _desc2(Q, N, stride_qn, BLOCK_M, BLOCK_D, HEAD_DIM)
    tdo = _desc2(DO, N, stride_don, BLOCK_M, BLOCK_D, HEAD_DIM)
    tk = _desc2(K, N, stride_kn, BLOCK_N, BLOCK_D, HEAD_DIM)
    tv = _desc2(V, N, stride_vn, BLOCK_N, BLOCK_D, HEAD_DIM)
    tdk = _desc2(DK, N, stride_dkn, BLOCK_N, BLOCK_D, HEAD_DIM)
    tdv = _desc2(DV, N, stride_dvn, BLOCK_N, BLOCK_D, HEAD_DIM)
    if SPLIT_D:  # the second column chunk: its own box width over the same rows
        tq1 = _desc2(Q, N, stride_qn, BLOCK_M, BLOCK_D1, HEAD_DIM)
        tdo1 = _desc2(DO, N, stride_don, BLOCK_M, BLOCK_D1, HEAD_DIM)
        tk1 = _desc2(K, N, stride_kn, BLOCK_N, BLOCK_D1, HEAD_DIM)
        tv1 = _desc2(V, N, stride_vn, BLOCK_N, BLOCK_D1, HEAD_DIM)
        tdk1 = _desc2(DK, N, stride_dkn, BLOCK_N, BLOCK_D1, HEAD_DIM)
        tdv1 = _desc2(DV, N, stride_dvn, BLOCK_N, BLOCK_D1, HEAD_DIM)
    else:  # unused placeholders
        tq1, tdo1, tk1, tv1, tdk1, tdv1 = tq, tdo, tk, tv, tdk, tdv
    scale = tl.cast(scale, tl.float32)  # fp32 also from a float64 scalar (see the forward)
    qk_scale = scale * 1.4426950408889634
    if ATOMIC:
        _bwd_tma_key_tile(tq, tq1, tk, tk1, tv, tv1, tdo, tdo1, tdk, tdk1, tdv, tdv1, LSE, DELTA, DQA, stride_an,
                          first_n, N, qk_scale, scale, True, BLOCK_D, SPLIT_D, BLOCK_D1, PRECISION, BLOCK_M,
                          BLOCK_N, True)
    else:
        for start_n in range(0, N, BLOCK_N):
            _bwd_tma_key_tile(tq, tq1, tk, tk1, tv, tv1, tdo, tdo1, tdk, tdk1, tdv, tdv1, LSE, DELTA, DQA,
                              stride_an, start_n, N, qk_scale, scale, start_n > 0, BLOCK_D, SPLIT_D, BLOCK_D1,
                              PRECISION, BLOCK_M, BLOCK_N, False)
            tl.debug_barrier()  # this key tile's dQ stores before the next one's loads, across threads
        # the scratch, complete, to dq in its dtype and strides
        _dq_from_scratch(DQA, DQ + b * stride_dqb + h * stride_dqh, stride_an, stride_dqn, N, HEAD_DIM, BLOCK_D,
                         SPLIT_D, BLOCK_D1, BLOCK_M)
