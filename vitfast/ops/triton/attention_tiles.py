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
