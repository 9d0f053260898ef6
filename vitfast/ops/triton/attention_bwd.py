"""Backward kernels for :mod:`vitfast.ops.attention` (launched from :mod:`.attention`, which holds
their configs, autotuners and the choice between them, ``backward_variant``).

* ``_bwd_preprocess_kernel``: Delta = rowsum(dO * O), fp32.
* The 7-matmul pair ("split"): ``_attn_bwd_dkdv_kernel`` owns a key tile and accumulates dK, dV
  over all queries; ``_attn_bwd_dq_kernel`` owns a query tile and accumulates dQ over all keys
  (recomputing S and dP). No atomics: bit-identical runs.
* The 5-matmul kernel ``_attn_bwd_fused_kernel``: dK, dV and dQ from one recomputation of P,
  deterministic ("fused": one program per (batch, head), dQ summed in a fixed order) or with
  ``ATOMIC`` ("atomic": one program per key tile, dQ added atomically).

P is recomputed tile by tile from the forward's natural-log ``lse`` (exp2 with log2(e) folded
into the scale). Head dims run in the forward's column chunks (``SPLIT_D``: 80 = 64 + 16).
"""

import triton
import triton.language as tl

from .attention_tiles import _a8, _a8x3, _dq_from_scratch, _load, _program_tile, _store


@triton.jit
def _bwd_preprocess_kernel(
    O, DO, DELTA, stride_ob, stride_oh, stride_on, stride_dob, stride_doh, stride_don,
    H, N, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Delta = rowsum(dO * O) in fp32, ``[B, H, N]``."""
    MASK_D: tl.constexpr = BLOCK_D != HEAD_DIM  # pad a non-power-of-two D with masked loads
    b, h, bh, start_m = _program_tile(N, H, BLOCK_M)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m[:, None] < N
    mask_d = offs_d[None, :] < HEAD_DIM
    o = _load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
              mask_m, mask_d, True, MASK_D)
    do = _load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :],
               mask_m, mask_d, True, MASK_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh * N + offs_m, delta, mask=offs_m < N)


@triton.jit
def _bwd_dkdv_inner(dk, dv, dk1, dv1, k, v, k1, v1, Q, DO, LSE, DELTA, stride_qn, stride_don, lo, hi, N,
                    qk_scale, offs_d, offs_d1, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                    MASK_M: tl.constexpr, MASK_D: tl.constexpr, SPLIT_D: tl.constexpr, MASK_D1: tl.constexpr,
                    PRECISION: tl.constexpr):
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        qT = _load(Q + offs_m[None, :] * stride_qn + offs_d[:, None],
                   offs_m[None, :] < N, offs_d[:, None] < HEAD_DIM, MASK_M, MASK_D)
        if MASK_M:  # rows past N get lse = +inf, hence P = 0
            lse = tl.load(LSE + offs_m, mask=offs_m < N, other=float("inf"))
            delta = tl.load(DELTA + offs_m, mask=offs_m < N, other=0.0)
        else:
            lse = tl.load(LSE + offs_m)
            delta = tl.load(DELTA + offs_m)
        sT = tl.dot(k, qT, input_precision=PRECISION)
        if SPLIT_D:
            qT1 = _load(Q + offs_m[None, :] * stride_qn + offs_d1[:, None],
                        offs_m[None, :] < N, offs_d1[:, None] < HEAD_DIM, MASK_M, MASK_D1)
            sT += tl.dot(k1, qT1, input_precision=PRECISION)
        sT = sT * qk_scale
        pT = tl.math.exp2(sT - lse[None, :] * 1.4426950408889634)
        do = _load(DO + offs_m[:, None] * stride_don + offs_d[None, :],
                   offs_m[:, None] < N, offs_d[None, :] < HEAD_DIM, MASK_M, MASK_D)
        dv += tl.dot(pT.to(do.dtype), do, input_precision=PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        if SPLIT_D:
            do1 = _load(DO + offs_m[:, None] * stride_don + offs_d1[None, :],
                        offs_m[:, None] < N, offs_d1[None, :] < HEAD_DIM, MASK_M, MASK_D1)
            dv1 += tl.dot(pT.to(do1.dtype), do1, input_precision=PRECISION)
            dpT += tl.dot(v1, tl.trans(do1), input_precision=PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT), input_precision=PRECISION)
        if SPLIT_D:
            dk1 += tl.dot(dsT.to(qT1.dtype), tl.trans(qT1), input_precision=PRECISION)
    return dk, dv, dk1, dv1


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
    stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    H, N, N_BUCKET, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT_D: tl.constexpr, BLOCK_D1: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL: tl.constexpr,
    STRIDE8: tl.constexpr = False,
):
    """One program owns BLOCK_N keys and loops over every query (BLOCK_M, then TAIL)."""
    MASK_D: tl.constexpr = BLOCK_D > HEAD_DIM
    MASK_D1: tl.constexpr = BLOCK_D + BLOCK_D1 > HEAD_DIM
    if STRIDE8:  # see _a8
        stride_qb, stride_qh, stride_qn = _a8x3(stride_qb, stride_qh, stride_qn)
        stride_kb, stride_kh, stride_kn = _a8x3(stride_kb, stride_kh, stride_kn)
        stride_vb, stride_vh, stride_vn = _a8x3(stride_vb, stride_vh, stride_vn)
        stride_dob, stride_doh, stride_don = _a8x3(stride_dob, stride_doh, stride_don)
        stride_dkb, stride_dkh, stride_dkn = _a8x3(stride_dkb, stride_dkh, stride_dkn)
        stride_dvb, stride_dvh, stride_dvn = _a8x3(stride_dvb, stride_dvh, stride_dvn)
    b, h, bh, start_n = _program_tile(N, H, BLOCK_N)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_d1 = BLOCK_D + tl.arange(0, BLOCK_D1)
    mask_n = offs_n[:, None] < N
    mask_d = offs_d[None, :] < HEAD_DIM
    mask_d1 = offs_d1[None, :] < HEAD_DIM
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    k = _load(K + offs_n[:, None] * stride_kn + offs_d[None, :], mask_n, mask_d, True, MASK_D)
    v = _load(V + offs_n[:, None] * stride_vn + offs_d[None, :], mask_n, mask_d, True, MASK_D)
    if SPLIT_D:
        k1 = _load(K + offs_n[:, None] * stride_kn + offs_d1[None, :], mask_n, mask_d1, True, MASK_D1)
        v1 = _load(V + offs_n[:, None] * stride_vn + offs_d1[None, :], mask_n, mask_d1, True, MASK_D1)
    else:
        k1, v1 = k, v
    Q += b * stride_qb + h * stride_qh
    DO += b * stride_dob + h * stride_doh
    LSE += bh * N
    DELTA += bh * N
    scale = tl.cast(scale, tl.float32)  # fp32 also from a float64 scalar (see the forward)
    qk_scale = scale * 1.4426950408889634
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dk1 = tl.zeros([BLOCK_N, BLOCK_D1], dtype=tl.float32)
    dv1 = tl.zeros([BLOCK_N, BLOCK_D1], dtype=tl.float32)
    m_full = (N // BLOCK_M) * BLOCK_M
    dk, dv, dk1, dv1 = _bwd_dkdv_inner(dk, dv, dk1, dv1, k, v, k1, v1, Q, DO, LSE, DELTA, stride_qn, stride_don,
                                       0, m_full, N, qk_scale, offs_d, offs_d1, HEAD_DIM, BLOCK_M, False, MASK_D,
                                       SPLIT_D, MASK_D1, PRECISION)
    dk, dv, dk1, dv1 = _bwd_dkdv_inner(dk, dv, dk1, dv1, k, v, k1, v1, Q, DO, LSE, DELTA, stride_qn, stride_don,
                                       m_full, N, N, qk_scale, offs_d, offs_d1, HEAD_DIM, TAIL, True, MASK_D,
                                       SPLIT_D, MASK_D1, PRECISION)
    DK += b * stride_dkb + h * stride_dkh
    DV += b * stride_dvb + h * stride_dvh
    dk *= scale
    _store(DK + offs_n[:, None] * stride_dkn + offs_d[None, :], dk.to(DK.dtype.element_ty), mask_n, mask_d, MASK_D)
    _store(DV + offs_n[:, None] * stride_dvn + offs_d[None, :], dv.to(DV.dtype.element_ty), mask_n, mask_d, MASK_D)
    if SPLIT_D:
        dk1 *= scale
        _store(DK + offs_n[:, None] * stride_dkn + offs_d1[None, :], dk1.to(DK.dtype.element_ty),
               mask_n, mask_d1, MASK_D1)
        _store(DV + offs_n[:, None] * stride_dvn + offs_d1[None, :], dv1.to(DV.dtype.element_ty),
               mask_n, mask_d1, MASK_D1)


@triton.jit
def _bwd_dq_inner(dq, dq1, q, do, q1, do1, lse2, delta, K, V, stride_kn, stride_vn, lo, hi, N, qk_scale,
                  offs_d, offs_d1, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK_N: tl.constexpr,
                  MASK_D: tl.constexpr, SPLIT_D: tl.constexpr, MASK_D1: tl.constexpr, PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kT = _load(K + offs_n[None, :] * stride_kn + offs_d[:, None],
                   offs_n[None, :] < N, offs_d[:, None] < HEAD_DIM, MASK_N, MASK_D)
        vT = _load(V + offs_n[None, :] * stride_vn + offs_d[:, None],
                   offs_n[None, :] < N, offs_d[:, None] < HEAD_DIM, MASK_N, MASK_D)
        s = tl.dot(q, kT, input_precision=PRECISION)
        if SPLIT_D:
            kT1 = _load(K + offs_n[None, :] * stride_kn + offs_d1[:, None],
                        offs_n[None, :] < N, offs_d1[:, None] < HEAD_DIM, MASK_N, MASK_D1)
            vT1 = _load(V + offs_n[None, :] * stride_vn + offs_d1[:, None],
                        offs_n[None, :] < N, offs_d1[:, None] < HEAD_DIM, MASK_N, MASK_D1)
            s += tl.dot(q1, kT1, input_precision=PRECISION)
        s = s * qk_scale
        p = tl.math.exp2(s - lse2[:, None])
        if MASK_N:
            p = tl.where(offs_n[None, :] < N, p, 0.0)
        dp = tl.dot(do, vT, input_precision=PRECISION)
        if SPLIT_D:
            dp += tl.dot(do1, vT1, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=PRECISION)
        if SPLIT_D:
            dq1 += tl.dot(ds.to(kT1.dtype), tl.trans(kT1), input_precision=PRECISION)
    return dq, dq1


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    H, N, N_BUCKET, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT_D: tl.constexpr, BLOCK_D1: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL: tl.constexpr,
    STRIDE8: tl.constexpr = False,
):
    """One program owns BLOCK_M queries and loops over every key (BLOCK_N, then TAIL)."""
    MASK_D: tl.constexpr = BLOCK_D > HEAD_DIM
    MASK_D1: tl.constexpr = BLOCK_D + BLOCK_D1 > HEAD_DIM
    if STRIDE8:  # see _a8
        stride_qb, stride_qh, stride_qn = _a8x3(stride_qb, stride_qh, stride_qn)
        stride_kb, stride_kh, stride_kn = _a8x3(stride_kb, stride_kh, stride_kn)
        stride_vb, stride_vh, stride_vn = _a8x3(stride_vb, stride_vh, stride_vn)
        stride_dob, stride_doh, stride_don = _a8x3(stride_dob, stride_doh, stride_don)
        stride_dqb, stride_dqh, stride_dqn = _a8x3(stride_dqb, stride_dqh, stride_dqn)
    b, h, bh, start_m = _program_tile(N, H, BLOCK_M)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_d1 = BLOCK_D + tl.arange(0, BLOCK_D1)
    mask_m = offs_m[:, None] < N
    mask_d = offs_d[None, :] < HEAD_DIM
    mask_d1 = offs_d1[None, :] < HEAD_DIM
    Q += b * stride_qb + h * stride_qh
    DO += b * stride_dob + h * stride_doh
    q = _load(Q + offs_m[:, None] * stride_qn + offs_d[None, :], mask_m, mask_d, True, MASK_D)
    do = _load(DO + offs_m[:, None] * stride_don + offs_d[None, :], mask_m, mask_d, True, MASK_D)
    if SPLIT_D:
        q1 = _load(Q + offs_m[:, None] * stride_qn + offs_d1[None, :], mask_m, mask_d1, True, MASK_D1)
        do1 = _load(DO + offs_m[:, None] * stride_don + offs_d1[None, :], mask_m, mask_d1, True, MASK_D1)
    else:
        q1, do1 = q, do
    # rows past N: lse = +inf makes P = 0, so they contribute nothing
    lse2 = tl.load(LSE + bh * N + offs_m, mask=offs_m < N, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + bh * N + offs_m, mask=offs_m < N, other=0.0)
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    scale = tl.cast(scale, tl.float32)  # fp32 also from a float64 scalar (see the forward)
    qk_scale = scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
    n_full = (N // BLOCK_N) * BLOCK_N
    dq, dq1 = _bwd_dq_inner(dq, dq1, q, do, q1, do1, lse2, delta, K, V, stride_kn, stride_vn, 0, n_full, N,
                            qk_scale, offs_d, offs_d1, HEAD_DIM, BLOCK_N, False, MASK_D, SPLIT_D, MASK_D1, PRECISION)
    dq, dq1 = _bwd_dq_inner(dq, dq1, q, do, q1, do1, lse2, delta, K, V, stride_kn, stride_vn, n_full, N, N,
                            qk_scale, offs_d, offs_d1, HEAD_DIM, TAIL, True, MASK_D, SPLIT_D, MASK_D1, PRECISION)
    DQ += b * stride_dqb + h * stride_dqh
    dq *= scale
    _store(DQ + offs_m[:, None] * stride_dqn + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask_m, mask_d, MASK_D)
    if SPLIT_D:
        dq1 *= scale
        _store(DQ + offs_m[:, None] * stride_dqn + offs_d1[None, :], dq1.to(DQ.dtype.element_ty),
               mask_m, mask_d1, MASK_D1)



# --------------------------------------------------------------- backward, 5 matmuls
# One kernel computes dK, dV and dQ from one recomputation of P per (key tile, query tile): 5
# matmuls (S^T = K Q^T, dV += P^T dO, dP^T = V dO^T, dK += dS^T Q, dQ += dS K) against the 7 of
# the two kernels above (which recompute S and dP for dQ). dQ is summed over the key tiles in an
# fp32 scratch [B*H, N, DP] (DP = both column chunks, so it needs no column masks):
# * deterministic (ATOMIC=False): one program per (batch, head) walks the key tiles in order and,
#   for each, the query tiles, adding each dQ tile to the scratch by a read-modify-write that no
#   other program makes (a barrier after each key tile orders them), then converts the scratch to
#   dq. Fixed order, no atomics: bit-identical runs. B*H programs, so meant for N up to ~1024
#   with B*H filling the GPU (see backward_variant).
# * ATOMIC: one program per (batch, head, key tile), dQ added with tl.atomic_add (the order of
#   the additions, hence the rounding, varies between runs); the launcher converts the scratch.
# The dQ dot takes dS already multiplied by the softmax scale, so the scratch holds dq itself.
@triton.jit
def _dq_add(ptrs, dq, mask, not_first, MASK_M: tl.constexpr, ATOMIC: tl.constexpr):
    """scratch[ptrs] += dq: atomically, or as this program's own read-modify-write (on the first
    key tile, not_first False, a plain store: the scratch starts uninitialised)."""
    if ATOMIC:
        if MASK_M:
            tl.atomic_add(ptrs, dq, mask=mask, sem="relaxed")
        else:
            tl.atomic_add(ptrs, dq, sem="relaxed")
    else:
        if not_first:
            if MASK_M:
                dq += tl.load(ptrs, mask=mask, other=0.0)
            else:
                dq += tl.load(ptrs)
        if MASK_M:
            tl.store(ptrs, dq, mask=mask)
        else:
            tl.store(ptrs, dq)


@triton.jit
def _bwd_fused_inner(dk, dv, dk1, dv1, k, v, k1, v1, Q, DO, LSE, DELTA, DQA, stride_qn, stride_don, stride_an,
                     lo, hi, N, qk_scale, scale, offs_n, offs_d, offs_d1, not_first,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, MASK_M: tl.constexpr, MASK_N: tl.constexpr,
                     MASK_D: tl.constexpr, SPLIT_D: tl.constexpr, MASK_D1: tl.constexpr, ATOMIC: tl.constexpr,
                     PRECISION: tl.constexpr):
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        qT = _load(Q + offs_m[None, :] * stride_qn + offs_d[:, None],
                   offs_m[None, :] < N, offs_d[:, None] < HEAD_DIM, MASK_M, MASK_D)
        if MASK_M:  # rows past N get lse = +inf, hence P = 0
            lse = tl.load(LSE + offs_m, mask=offs_m < N, other=float("inf"))
            delta = tl.load(DELTA + offs_m, mask=offs_m < N, other=0.0)
        else:
            lse = tl.load(LSE + offs_m)
            delta = tl.load(DELTA + offs_m)
        sT = tl.dot(k, qT, input_precision=PRECISION)
        if SPLIT_D:
            qT1 = _load(Q + offs_m[None, :] * stride_qn + offs_d1[:, None],
                        offs_m[None, :] < N, offs_d1[:, None] < HEAD_DIM, MASK_M, MASK_D1)
            sT += tl.dot(k1, qT1, input_precision=PRECISION)
        sT = sT * qk_scale
        pT = tl.math.exp2(sT - lse[None, :] * 1.4426950408889634)
        if MASK_N:  # keys past N: P = 0 (their zero rows of K give S = 0, and exp(-lse) may overflow)
            pT = tl.where(offs_n[:, None] < N, pT, 0.0)
        do = _load(DO + offs_m[:, None] * stride_don + offs_d[None, :],
                   offs_m[:, None] < N, offs_d[None, :] < HEAD_DIM, MASK_M, MASK_D)
        dv += tl.dot(pT.to(do.dtype), do, input_precision=PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        if SPLIT_D:
            do1 = _load(DO + offs_m[:, None] * stride_don + offs_d1[None, :],
                        offs_m[:, None] < N, offs_d1[None, :] < HEAD_DIM, MASK_M, MASK_D1)
            dv1 += tl.dot(pT.to(do1.dtype), do1, input_precision=PRECISION)
            dpT += tl.dot(v1, tl.trans(do1), input_precision=PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT), input_precision=PRECISION)
        if SPLIT_D:
            dk1 += tl.dot(dsT.to(qT1.dtype), tl.trans(qT1), input_precision=PRECISION)
        ds = tl.trans((dsT * scale).to(k.dtype))
        mask_m = offs_m[:, None] < N
        _dq_add(DQA + offs_m[:, None] * stride_an + offs_d[None, :], tl.dot(ds, k, input_precision=PRECISION),
                mask_m, not_first, MASK_M, ATOMIC)
        if SPLIT_D:
            _dq_add(DQA + offs_m[:, None] * stride_an + offs_d1[None, :], tl.dot(ds, k1, input_precision=PRECISION),
                    mask_m, not_first, MASK_M, ATOMIC)
    return dk, dv, dk1, dv1


@triton.jit
def _bwd_fused_key_tile(Q, K, V, DO, LSE, DELTA, DQA, DK, DV, stride_qn, stride_kn, stride_vn, stride_don,
                        stride_an, stride_dkn, stride_dvn, start_n, N, qk_scale, scale, not_first,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT_D: tl.constexpr,
                        BLOCK_D1: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, TAIL: tl.constexpr, MASK_N: tl.constexpr, ATOMIC: tl.constexpr):
    """dK, dV of the BLOCK_N keys from start_n (stored), and their share of dQ (to the scratch)."""
    MASK_D: tl.constexpr = BLOCK_D > HEAD_DIM
    MASK_D1: tl.constexpr = BLOCK_D + BLOCK_D1 > HEAD_DIM
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_d1 = BLOCK_D + tl.arange(0, BLOCK_D1)
    mask_n = offs_n[:, None] < N
    mask_d = offs_d[None, :] < HEAD_DIM
    mask_d1 = offs_d1[None, :] < HEAD_DIM
    k = _load(K + offs_n[:, None] * stride_kn + offs_d[None, :], mask_n, mask_d, MASK_N, MASK_D)
    v = _load(V + offs_n[:, None] * stride_vn + offs_d[None, :], mask_n, mask_d, MASK_N, MASK_D)
    if SPLIT_D:
        k1 = _load(K + offs_n[:, None] * stride_kn + offs_d1[None, :], mask_n, mask_d1, MASK_N, MASK_D1)
        v1 = _load(V + offs_n[:, None] * stride_vn + offs_d1[None, :], mask_n, mask_d1, MASK_N, MASK_D1)
    else:
        k1, v1 = k, v
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dk1 = tl.zeros([BLOCK_N, BLOCK_D1], dtype=tl.float32)
    dv1 = tl.zeros([BLOCK_N, BLOCK_D1], dtype=tl.float32)
    m_full = (N // BLOCK_M) * BLOCK_M
    dk, dv, dk1, dv1 = _bwd_fused_inner(dk, dv, dk1, dv1, k, v, k1, v1, Q, DO, LSE, DELTA, DQA, stride_qn,
                                        stride_don, stride_an, 0, m_full, N, qk_scale, scale, offs_n, offs_d,
                                        offs_d1, not_first, HEAD_DIM, BLOCK_M, False, MASK_N, MASK_D, SPLIT_D,
                                        MASK_D1, ATOMIC, PRECISION)
    dk, dv, dk1, dv1 = _bwd_fused_inner(dk, dv, dk1, dv1, k, v, k1, v1, Q, DO, LSE, DELTA, DQA, stride_qn,
                                        stride_don, stride_an, m_full, N, N, qk_scale, scale, offs_n, offs_d,
                                        offs_d1, not_first, HEAD_DIM, TAIL, True, MASK_N, MASK_D, SPLIT_D,
                                        MASK_D1, ATOMIC, PRECISION)
    dk *= scale
    _store(DK + offs_n[:, None] * stride_dkn + offs_d[None, :], dk.to(DK.dtype.element_ty), mask_n, mask_d, MASK_D)
    _store(DV + offs_n[:, None] * stride_dvn + offs_d[None, :], dv.to(DV.dtype.element_ty), mask_n, mask_d, MASK_D)
    if SPLIT_D:
        dk1 *= scale
        _store(DK + offs_n[:, None] * stride_dkn + offs_d1[None, :], dk1.to(DK.dtype.element_ty),
               mask_n, mask_d1, MASK_D1)
        _store(DV + offs_n[:, None] * stride_dvn + offs_d1[None, :], dv1.to(DV.dtype.element_ty),
               mask_n, mask_d1, MASK_D1)


# The deterministic kernel calls each key tile through this noinline function: what the compiler
# hoists out of its loop over key tiles otherwise lives through all of it (40-60 more registers
# than the atomic kernel's straight-line key tile: 24-80 bytes of spills at D = 72-88 on sm_90,
# triton 3.6). Axis info (divisibility of strides and pointers) crosses the call: the same
# 16-byte cp.async as inlined. The atomic kernel inlines the key tile.
@triton.jit(noinline=True)
def _bwd_fused_key_tile_call(Q, K, V, DO, LSE, DELTA, DQA, DK, DV, stride_qn, stride_kn, stride_vn, stride_don,
                             stride_an, stride_dkn, stride_dvn, start_n, N, qk_scale, scale, not_first,
                             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT_D: tl.constexpr,
                             BLOCK_D1: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, TAIL: tl.constexpr, MASK_N: tl.constexpr):
    _bwd_fused_key_tile(Q, K, V, DO, LSE, DELTA, DQA, DK, DV, stride_qn, stride_kn, stride_vn, stride_don, stride_an,
                        stride_dkn, stride_dvn, start_n, N, qk_scale, scale, not_first, HEAD_DIM, BLOCK_D, SPLIT_D,
                        BLOCK_D1, PRECISION, BLOCK_M, BLOCK_N, TAIL, MASK_N, False)


@triton.jit
def _attn_bwd_fused_kernel(
    Q, K, V, DO, LSE, DELTA, DQA, DQ, DK, DV,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    stride_an, H, N, N_BUCKET, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT_D: tl.constexpr, BLOCK_D1: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL: tl.constexpr,
    ATOMIC: tl.constexpr = False, STRIDE8: tl.constexpr = False,
):
    """dq, dk, dv in 5 matmuls: one program per (batch, head) walking every key tile (BLOCK_N),
    or with ATOMIC one per (batch, head, key tile); each loops over the queries (BLOCK_M, then
    TAIL). dQ goes through the fp32 scratch DQA (row stride stride_an)."""
    MASK_D: tl.constexpr = BLOCK_D > HEAD_DIM
    MASK_D1: tl.constexpr = BLOCK_D + BLOCK_D1 > HEAD_DIM
    if STRIDE8:  # see _a8
        stride_qb, stride_qh, stride_qn = _a8x3(stride_qb, stride_qh, stride_qn)
        stride_kb, stride_kh, stride_kn = _a8x3(stride_kb, stride_kh, stride_kn)
        stride_vb, stride_vh, stride_vn = _a8x3(stride_vb, stride_vh, stride_vn)
        stride_dob, stride_doh, stride_don = _a8x3(stride_dob, stride_doh, stride_don)
        stride_dqb, stride_dqh, stride_dqn = _a8x3(stride_dqb, stride_dqh, stride_dqn)
        stride_dkb, stride_dkh, stride_dkn = _a8x3(stride_dkb, stride_dkh, stride_dkn)
        stride_dvb, stride_dvh, stride_dvn = _a8x3(stride_dvb, stride_dvh, stride_dvn)
    if ATOMIC:
        b, h, bh, start_n = _program_tile(N, H, BLOCK_N)
    else:
        bh = tl.program_id(0).to(tl.int64)
        b, h = bh // H, bh % H
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    DO += b * stride_dob + h * stride_doh
    DK += b * stride_dkb + h * stride_dkh
    DV += b * stride_dvb + h * stride_dvh
    LSE += bh * N
    DELTA += bh * N
    DQA += bh * N * stride_an
    scale = tl.cast(scale, tl.float32)  # fp32 also from a float64 scalar (see the forward)
    qk_scale = scale * 1.4426950408889634
    if ATOMIC:
        _bwd_fused_key_tile(Q, K, V, DO, LSE, DELTA, DQA, DK, DV, stride_qn, stride_kn, stride_vn, stride_don,
                            stride_an, stride_dkn, stride_dvn, start_n, N, qk_scale, scale, True, HEAD_DIM,
                            BLOCK_D, SPLIT_D, BLOCK_D1, PRECISION, BLOCK_M, BLOCK_N, TAIL, True, True)
    else:
        n_full = (N // BLOCK_N) * BLOCK_N
        for start_n in range(0, n_full, BLOCK_N):
            _bwd_fused_key_tile_call(Q, K, V, DO, LSE, DELTA, DQA, DK, DV, stride_qn, stride_kn, stride_vn, stride_don,
                                     stride_an, stride_dkn, stride_dvn, start_n, N, qk_scale, scale, start_n > 0,
                                     HEAD_DIM, BLOCK_D, SPLIT_D, BLOCK_D1, PRECISION, BLOCK_M, BLOCK_N, TAIL, False)
            tl.debug_barrier()  # this key tile's dQ stores before the next one's loads, across threads
        if n_full < N:
            _bwd_fused_key_tile_call(Q, K, V, DO, LSE, DELTA, DQA, DK, DV, stride_qn, stride_kn, stride_vn, stride_don,
                                     stride_an, stride_dkn, stride_dvn, n_full, N, qk_scale, scale, n_full > 0,
                                     HEAD_DIM, BLOCK_D, SPLIT_D, BLOCK_D1, PRECISION, BLOCK_M, BLOCK_N, TAIL, True)
            tl.debug_barrier()
        # the scratch, complete, to dq in its dtype and strides
        _dq_from_scratch(DQA, DQ + b * stride_dqb + h * stride_dqh, stride_an, stride_dqn, N, HEAD_DIM, BLOCK_D,
                         SPLIT_D, BLOCK_D1, BLOCK_M)
