"""Tile helpers shared by the attention kernels (:mod:`.attention`'s forward, :mod:`.attention_bwd`'s
backward): masked loads and stores only along the axes that need masks, the 8-aligned stride hint,
and the flat program id split into (batch, head, tile)."""

import triton
import triton.language as tl


@triton.jit
def _load(ptrs, mask_a, mask_b, USE_A: tl.constexpr, USE_B: tl.constexpr):
    """Load a tile, masking (with zeros) only along the axes that need it."""
    if USE_A:
        if USE_B:
            x = tl.load(ptrs, mask=mask_a & mask_b, other=0.0)
        else:
            x = tl.load(ptrs, mask=mask_a, other=0.0)
    else:
        if USE_B:
            x = tl.load(ptrs, mask=mask_b, other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _store(ptrs, x, mask_a, mask_b, USE_B: tl.constexpr):
    if USE_B:
        tl.store(ptrs, x, mask=mask_a & mask_b)
    else:
        tl.store(ptrs, x, mask=mask_a)


@triton.jit
def _a8(stride):
    """``stride`` rounded down to a multiple of 8: a no-op where the launcher checked it is one
    (STRIDE8), and the way to tell the compiler so. At D = 72 or 88 the token strides are
    multiples of 8 but not of 16, so Triton's specialisation gives no divisibility hint and every
    load becomes scalar and unpipelined; tl.multiple_of does not restore it (sm_90 builds)."""
    return (stride // 8) * 8


@triton.jit
def _a8x3(stride_b, stride_h, stride_n):
    """One tensor's (batch, head, token) strides through :func:`_a8`."""
    return _a8(stride_b), _a8(stride_h), _a8(stride_n)


@triton.jit
def _program_tile(N, H, BLOCK: tl.constexpr):
    """Split the flat program id into (batch, head, first row of this tile)."""
    pid = tl.program_id(0)
    num_tiles = tl.cdiv(N, BLOCK)
    bh = pid // num_tiles  # consecutive programs share (b, h): K/V stay in L2
    start = (pid % num_tiles) * BLOCK
    return (bh // H).to(tl.int64), (bh % H).to(tl.int64), bh.to(tl.int64), start


@triton.jit
def _dq_from_scratch(DQA, DQ, stride_an, stride_dqn, N, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                     SPLIT_D: tl.constexpr, BLOCK_D1: tl.constexpr, BLOCK_M: tl.constexpr):
    """One (batch, head)'s fp32 dQ scratch (rows of both column chunks, stride_an apart) to dq in
    its dtype and strides (the columns past HEAD_DIM dropped): the 5-matmul backwards' last step."""
    MASK_D: tl.constexpr = BLOCK_D > HEAD_DIM
    MASK_D1: tl.constexpr = BLOCK_D + BLOCK_D1 > HEAD_DIM
    offs_d = tl.arange(0, BLOCK_D)
    offs_d1 = BLOCK_D + tl.arange(0, BLOCK_D1)
    mask_d = offs_d[None, :] < HEAD_DIM
    mask_d1 = offs_d1[None, :] < HEAD_DIM
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m[:, None] < N
        dq = tl.load(DQA + offs_m[:, None] * stride_an + offs_d[None, :], mask=mask_m, other=0.0)
        _store(DQ + offs_m[:, None] * stride_dqn + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask_m, mask_d, MASK_D)
        if SPLIT_D:
            dq1 = tl.load(DQA + offs_m[:, None] * stride_an + offs_d1[None, :], mask=mask_m, other=0.0)
            _store(DQ + offs_m[:, None] * stride_dqn + offs_d1[None, :], dq1.to(DQ.dtype.element_ty),
                   mask_m, mask_d1, MASK_D1)
