"""vitfast.ops.attention against a float64 reference, with flash-attention's rule: the
kernel's error is at most 2x the error of torch's SDPA in the same dtype (plus a floor of
one rounding step, see ``_ATOL``).

Without a GPU everything runs on the CPU under the Triton interpreter (fp32 and fp16; the
interpreter has no bf16), which is slow: the forward covers every listed (N, D) with small
B*H, the gradients a representative subset. Tests marked ``cuda`` redo the checks in bf16
and fp16 at full ViT sizes and compile with Inductor.
"""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch
import torch.nn.functional as F

from vitfast._dispatch import KernelNotSupported, reset_warnings
from vitfast.ops.triton import attention as kernels
from vitfast.ops.attention import attention, attention_not_supported_reasons, attention_packed
from vitfast.ops.reference import attention_ref

# the module, not the function that vitfast.ops re-exports under the same name
attention_mod = importlib.import_module("vitfast.ops.attention")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# Floor on top of 2x SDPA's error, relative to the largest reference magnitude: a
# fraction of one output rounding step (fp16 eps = 9.8e-4, bf16 7.8e-3; fp32 1.2e-7, so
# 1e-6 is ~8 eps for a different summation order). Without it a case where SDPA happens to
# round exactly like float64 (error 0, e.g. dq at N = 1 in fp16) would demand a perfect kernel.
_ATOL = {torch.float32: 1e-6, torch.float16: 2.5e-4, torch.bfloat16: 2e-3}
CPU_DTYPES = [torch.float32, torch.float16]


def _qkv(B, H, N, D, dtype, device=DEV, seed=0, requires_grad=False):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=g).to(device=device, dtype=dtype).requires_grad_(requires_grad)
            for _ in range(3)]


def _err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref).abs().max().item() if x.numel() else 0.0


def _assert_close_2x(name, got, sdpa, ref, dtype):
    e_kernel, e_sdpa = _err(got, ref), _err(sdpa, ref)
    floor = _ATOL[dtype] * max(1.0, ref.abs().max().item() if ref.numel() else 0.0)
    assert e_kernel <= 2 * e_sdpa + floor, (
        f"{name}: kernel error {e_kernel:.3g} > 2 x SDPA error {e_sdpa:.3g} + {floor:.3g}")


def _grads(fn, q, k, v, dout):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def _check_fwd_bwd(B, H, N, D, dtype, backward=True, scale=None, seed=0):
    """The kernel and the ``sdpa`` backend, both through ``attention()``, against float64
    ``attention_ref``; each error bounded by twice the error of torch's own
    ``F.scaled_dot_product_attention`` called directly in the same dtype. The bound shares no
    code with the wrapper: a bug there (a wrong default scale, say) moves both backends alike,
    and a bound taken from the ``sdpa`` backend would move with them."""
    q, k, v = _qkv(B, H, N, D, dtype, seed=seed)
    ref_inputs = [t.double() for t in (q, k, v)]
    dout = torch.randn(B, H, N, D, generator=torch.Generator().manual_seed(seed + 1)).to(q.device, dtype)
    run = lambda be: (lambda a, b, c: attention(a, b, c, scale=scale, backend=be))  # noqa: E731
    torch_sdpa = lambda a, b, c: F.scaled_dot_product_attention(a, b, c, scale=scale)  # noqa: E731
    ref_fn = lambda a, b, c: attention_ref(a, b, c, scale=scale)  # noqa: E731
    if not backward:
        with torch.no_grad():
            got, sdpa, direct = run("triton")(q, k, v), run("sdpa")(q, k, v), torch_sdpa(q, k, v)
            ref = ref_fn(*ref_inputs)
        _assert_close_2x("out", got, direct, ref, dtype)
        _assert_close_2x("out (sdpa backend)", sdpa, direct, ref, dtype)
        return
    got, sdpa, direct, ref = (_grads(f, *args, dout) for f, args in (
        (run("triton"), (q, k, v)), (run("sdpa"), (q, k, v)), (torch_sdpa, (q, k, v)), (ref_fn, ref_inputs)))
    for name, g, s, d, r in zip(("out", "dq", "dk", "dv"), got, sdpa, direct, ref):
        assert g.dtype == dtype and g.shape == r.shape
        _assert_close_2x(name, g, d, r, dtype)
        _assert_close_2x(name + " (sdpa backend)", s, d, r, dtype)


# ----------------------------------------------------------------- numerics on the CPU
# (B, H) per N: both batch sizes and 1-3 heads are covered while keeping B*H*N^2 small.
_BH_FOR_N = {1: (2, 3), 50: (2, 3), 197: (1, 2), 257: (2, 1), 577: (1, 1)}


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("D", [32, 64, 72, 80, 128])
@pytest.mark.parametrize("N", [1, 50, 197, 257, 577])
def test_forward_matches_reference(N, D, dtype):
    B, H = _BH_FOR_N[N]
    _check_fwd_bwd(B, H, N, D, dtype, backward=False)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("N,D", [(1, 64), (50, 72), (50, 80), (197, 64), (197, 72), (197, 80),
                                 (257, 32), (50, 128), (577, 80)])
def test_gradients_match_reference(N, D, dtype):
    B, H = (2, 2) if N <= 50 else (1, 1)
    _check_fwd_bwd(B, H, N, D, dtype)


def test_custom_scale_and_head_dims_at_the_limits():
    _check_fwd_bwd(1, 1, 20, 16, torch.float32, scale=0.3)
    _check_fwd_bwd(1, 1, 20, 256, torch.float32, scale=0.05)
    _check_fwd_bwd(1, 1, 20, 104, torch.float16)


def test_lse_is_the_logsumexp_of_the_scores():
    q, k, v = _qkv(2, 2, 50, 72, torch.float32)
    out, lse = torch.ops.vitfast.attention_fwd(q, k, v, 0.2)
    ref = torch.logsumexp(q.double() @ k.double().transpose(-1, -2) * 0.2, dim=-1)
    assert lse.dtype == torch.float32 and lse.shape == (2, 2, 50)
    assert _err(lse, ref) < 1e-5


@pytest.mark.parametrize("config", [
    dict(BLOCK_M=16, BLOCK_N=64, TAIL=16, num_warps=4, num_stages=2),
    dict(BLOCK_M=64, BLOCK_N=16, TAIL=16, num_warps=4, num_stages=2),
    dict(BLOCK_M=32, BLOCK_N=32, TAIL=32, num_warps=4, num_stages=2),  # no narrow tail
    dict(BLOCK_M=128, BLOCK_N=128, TAIL=16, num_warps=8, num_stages=2),  # tile > N
], ids=lambda c: f"{c['BLOCK_M']}x{c['BLOCK_N']}t{c['TAIL']}")
def test_uneven_tiles(config):
    """Every tile shape the autotuner may pick gives the same answer (N = 97, D = 80)."""
    B, H, N, D = 1, 2, 97, 80
    q, k, v = _qkv(B, H, N, D, torch.float32)
    dout = torch.randn(B, H, N, D)
    out, lse = torch.empty_like(q), torch.empty(B, H, N)
    kernels.launch_fwd(q, k, v, out, lse, D**-0.5, config=config)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    kernels.launch_bwd(dout, q, k, v, out, lse, dq, dk, dv, D**-0.5, config=config)
    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    ref = attention_ref(qd, kd, vd)
    ref.backward(dout.double())
    for got, want in ((out, ref.detach()), (dq, qd.grad), (dk, kd.grad), (dv, vd.grad)):
        assert _err(got, want) < 2e-5


# ----------------------------------------------------------------- layouts and packing
def _packed_views(qkv, H):
    B, N, C = qkv.shape
    return qkv.view(B, N, 3, H, C // (3 * H)).permute(2, 0, 3, 1, 4).unbind(0)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_strided_views_of_packed_qkv(dtype):
    B, N, H, D = 2, 50, 3, 72
    qkv = torch.randn(B, N, 3 * H * D).to(DEV, dtype)
    q, k, v = _packed_views(qkv, H)
    assert not q.is_contiguous() and q.stride(-1) == 1
    with torch.no_grad():
        got, sdpa = attention(q, k, v, backend="triton"), attention(q, k, v, backend="sdpa")
    _assert_close_2x("out", got, sdpa, attention_ref(q.double(), k.double(), v.double()), dtype)
    # the output is [B, N, H, D] in memory: the reshape to [B, N, H*D] is a view
    assert got.transpose(1, 2).reshape(B, N, H * D).data_ptr() == got.data_ptr()


def test_packed_matches_unpacked_forward_and_backward():
    B, N, H, D = 2, 50, 2, 80
    qkv = torch.randn(B, N, 3 * H * D, device=DEV)
    dout = torch.randn(B, N, H * D, device=DEV)
    a = qkv.clone().requires_grad_()
    out_packed = attention_packed(a, num_heads=H, backend="triton")
    out_packed.backward(dout)
    b = qkv.clone().requires_grad_()
    out = attention(*_packed_views(b, H), backend="triton").transpose(1, 2).reshape(B, N, H * D)
    out.backward(dout)
    assert out_packed.shape == (B, N, H * D)
    torch.testing.assert_close(out_packed, out, rtol=0, atol=0)
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
    c = qkv.clone().requires_grad_()
    out_sdpa = attention_packed(c, num_heads=H, backend="sdpa")
    out_sdpa.backward(dout)
    torch.testing.assert_close(out_packed, out_sdpa, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.grad, c.grad, rtol=1e-5, atol=1e-5)


def test_packed_forward_makes_no_copies():
    """The packed op reads qkv in place: its only allocations are out and lse."""
    B, N, H, D = 1, 20, 2, 16
    qkv = torch.randn(B, N, 3 * H * D)
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Record() as rec:
        torch.ops.vitfast.attention_packed_fwd(qkv, H, 0.25)
    copies = [o for o in rec.ops if any(w in o for w in ("copy", "clone", "contiguous", "cat", "stack"))]
    assert not copies, rec.ops


def test_backward_accepts_expanded_gradients():
    q, k, v = _qkv(1, 2, 30, 64, torch.float32, requires_grad=True)
    attention(q, k, v, backend="triton").sum().backward()  # dout has stride 0 everywhere
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    attention_ref(qd, kd, vd).sum().backward()
    assert _err(q.grad, qd.grad) < 1e-5 and _err(v.grad, vd.grad) < 1e-5


def test_backward_is_deterministic():
    q, k, v = _qkv(2, 3, 197, 72, torch.float32)
    dout = torch.randn_like(q)
    first = _grads(lambda a, b, c: attention(a, b, c, backend="triton"), q, k, v, dout)
    second = _grads(lambda a, b, c: attention(a, b, c, backend="triton"), q, k, v, dout)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_empty_batch():
    q, k, v = _qkv(0, 2, 10, 32, torch.float32)
    assert attention(q, k, v, backend="triton").shape == (0, 2, 10, 32)


# ----------------------------------------------------------------------- grid limits
def test_grid_flattens_batch_heads_onto_axis_0():
    """B*H = 70,000 > 65,535 (the limit of grid axes 1 and 2) must still launch."""
    B, H, N = 5000, 14, 197
    (programs,) = kernels.grid_size(B * H, N, 16)
    assert programs == 13 * B * H and programs < 2**31 - 1
    # the kernel's decomposition of the flat id (see _program_tile) reaches every tile
    tiles = -(-N // 16)
    last = programs - 1
    assert (last // tiles // H, last // tiles % H, last % tiles * 16) == (B - 1, H - 1, 192)


def test_reasons_report_grid_overflow():
    q = torch.empty(1, 1, 1, 64).expand(2**25, 4, 300, 64)  # no memory behind the expand
    reasons = attention_not_supported_reasons(q, q, q)
    assert any("grid limit" in r for r in reasons)


def test_autotune_keys_and_pruning():
    assert kernels.n_bucket(197) == 208 and kernels.n_bucket(577) == 640 and kernels.n_bucket(4097) == 4352
    assert kernels.block_d(72) == 80 and kernels.block_d(16) == 16 and kernels.block_d(80) == 80
    q = torch.empty(1, 1, 1, 1, dtype=torch.float16)
    for kind, configs in kernels._CONFIGS.items():
        prune = kernels._make_prune(kind)
        previous = kernels.set_autotune(True)
        try:
            small = prune(configs, {"Q": q, "N_BUCKET": 16}, BLOCK_D=64)
            big = prune(configs, {"Q": q, "N_BUCKET": 4096}, BLOCK_D=256)
            assert small and all(c.kwargs["BLOCK_M"] <= 16 and c.kwargs["BLOCK_N"] <= 16 for c in small)
            assert big and len(big) < len(configs)
            kernels.set_autotune(False)
            assert len(prune(configs, {"Q": q, "N_BUCKET": 4096}, BLOCK_D=128)) == 1
        finally:
            kernels.set_autotune(previous)


def test_head_dims_split_into_two_power_of_two_chunks():
    """No padding to the next power of two where two chunks are narrower (issue: D = 80 compiled to
    the D = 128 kernel, 37.5% of the dot work wasted)."""
    want = {16: (16, 0), 24: (32, 0), 32: (32, 0), 40: (32, 16), 48: (32, 16), 64: (64, 0), 72: (64, 16),
            80: (64, 16), 88: (64, 32), 96: (64, 32), 104: (128, 0), 112: (128, 0), 120: (128, 0), 128: (128, 0),
            144: (128, 16), 160: (128, 32), 192: (128, 64), 200: (256, 0), 256: (256, 0)}
    for D, chunks in want.items():
        assert kernels.d_chunks(D) == chunks, D
        d0, d1 = chunks
        assert d0 + d1 >= D and (d1 == 0 or d0 < D <= d0 + d1) and kernels.block_d(D) == d0 + d1
    for D in range(16, 257, 8):  # never wider than the single power-of-two tile
        assert kernels.block_d(D) <= max(16, 1 << (D - 1).bit_length())


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("D", [40, 48, 88, 96, 144])
def test_split_head_dims_match_reference(D, dtype):
    """Both chunks, forward and gradients, at head dims the ViT shapes above do not cover."""
    _check_fwd_bwd(1, 2, 37, D, dtype)


def test_stride8_flag_only_where_it_adds_a_hint():
    """STRIDE8 (strides rounded to multiples of 8 inside the kernels) is set only when every
    stride is a multiple of 8, some is not of 16, and the pointers are 16-byte aligned."""
    d72 = torch.empty(2, 3, 50, 72, dtype=torch.float16)
    assert kernels.stride8(d72, d72)
    assert not kernels.stride8(torch.empty(2, 3, 50, 64, dtype=torch.float16))  # already 16-divisible
    packed = torch.empty(2, 50, 3 * 3 * 72, dtype=torch.float16)[..., : 3 * 72].unflatten(-1, (3, 72)).transpose(1, 2)
    assert kernels.stride8(packed)  # token stride 648
    odd = torch.empty(2, 3, 50, 76, dtype=torch.float16)[..., :72]  # token stride 76: not a multiple of 8
    assert not kernels.stride8(odd)
    shifted = torch.empty(2 * 3 * 50 * 72 + 4, dtype=torch.float16)[4:].view(2, 3, 50, 72)  # 8-byte aligned
    assert not kernels.stride8(shifted)


@pytest.mark.parametrize("layout", ["contiguous", "odd_stride", "misaligned"])
def test_d72_every_stride_layout_matches_reference(layout):
    """D = 72 through the rounded-stride path and both of its refusals give the same numerics."""
    q, k, v = _qkv(1, 2, 33, 72, torch.float16)
    if layout == "odd_stride":
        q, k, v = (torch.nn.functional.pad(t, (0, 4))[..., :72] for t in (q, k, v))
    elif layout == "misaligned":
        q, k, v = (torch.cat([t.new_zeros(4), t.flatten()])[4:].view(t.shape) for t in (q, k, v))
    assert kernels.stride8(q, k, v) == (layout == "contiguous")
    ref = attention_ref(*(t.double() for t in (q, k, v)))
    with torch.no_grad():
        got, direct = attention(q, k, v, backend="triton"), F.scaled_dot_product_attention(q, k, v)
    _assert_close_2x("out", got, direct, ref, torch.float16)


def test_secondary_configs_only_where_no_primary_fits():
    """The autotuner times the measured primaries at ViT shapes; the secondary configs serve
    short sequences and fp32 at large head dims, where no primary fits."""
    previous = kernels.set_autotune(True)
    try:
        for kind, configs in kernels._CONFIGS.items():
            prune = kernels._make_prune(kind)
            n = kernels.PRIMARY[kind]
            primary, secondary = configs[:n], configs[n:]
            vit = prune(configs, {"Q": torch.empty(1, dtype=torch.bfloat16), "N_BUCKET": 208}, BLOCK_D=64)
            assert vit and all(c in primary for c in vit) and vit[0] is primary[0]
            tiny = prune(configs, {"Q": torch.empty(1, dtype=torch.bfloat16), "N_BUCKET": 16}, BLOCK_D=64)
            assert tiny and all(c in secondary for c in tiny)
            fp32 = prune(configs, {"Q": torch.empty(1, dtype=torch.float32), "N_BUCKET": 4096}, BLOCK_D=256)
            assert fp32 and all(c in secondary for c in fp32)
    finally:
        kernels.set_autotune(previous)


def test_candidate_configs_are_the_autotuner_survivors():
    q = torch.empty(2, 3, 197, 64, dtype=torch.float16)
    for kind, configs in kernels._CONFIGS.items():
        previous = kernels.set_autotune(True)
        try:
            kept = kernels._make_prune(kind)(configs, {"Q": q, "N_BUCKET": kernels.n_bucket(197)}, BLOCK_D=64)
        finally:
            kernels.set_autotune(previous)
        got = kernels.candidate_configs(kind, q)
        assert len(got) == len(kept) > 1
        assert got == [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in kept]
        assert kernels.set_autotune(previous) == previous  # left as it was


# ------------------------------------------------------------- backward variants
@pytest.fixture
def bwd_variant():
    """Sets the backward variant for one test (kernels.set_backward_variant), then restores it."""
    previous = kernels.set_backward_variant("auto")
    yield kernels.set_backward_variant
    kernels.set_backward_variant(previous)


_VARIANTS = ["fused", "atomic", "split", "tma", "tma_atomic"]


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("N,D", [(1, 64), (50, 80), (197, 72), (33, 88)])
@pytest.mark.parametrize("variant", _VARIANTS)
def test_backward_variants_match_reference(variant, N, D, dtype, bwd_variant):
    """Every backward (5-matmul deterministic and atomic, by pointers and by TMA, 7-matmul split)
    within 2x SDPA's error: one token, a tail, exact chunked head dims (80 = 64 + 16, 72 -> 64 + 16,
    88 -> 64 + 32)."""
    bwd_variant(variant)
    _check_fwd_bwd(1, 2, N, D, dtype, scale=0.3 if N == 33 else None, seed=N)


@pytest.mark.parametrize("variant", _VARIANTS)
def test_backward_variants_on_packed_strides(variant, bwd_variant):
    """Views of a packed qkv at D = 72 (token stride 648: the STRIDE8 path) written straight into
    the packed gradient: every variant equals the 7-matmul pair to rounding, within 2x SDPA."""
    B, N, H, D = 1, 41, 2, 72
    qkv = torch.randn(B, N, 3 * H * D, generator=torch.Generator().manual_seed(3)).to(DEV, torch.float16)
    dout = torch.randn(B, N, H * D, generator=torch.Generator().manual_seed(4)).to(DEV, torch.float16)
    assert kernels.stride8(*_packed_views(qkv, H))
    bwd_variant(variant)
    x = qkv.clone().requires_grad_()
    attention_packed(x, num_heads=H, backend="triton").backward(dout)
    xd = qkv.double().requires_grad_()
    attention_ref(*_packed_views(xd, H)).transpose(1, 2).reshape(B, N, H * D).backward(dout.double())
    xs = qkv.clone().requires_grad_()
    F.scaled_dot_product_attention(*_packed_views(xs, H)).transpose(1, 2).reshape(B, N, H * D).backward(dout)
    _assert_close_2x("dqkv", x.grad, xs.grad, xd.grad, torch.float16)


@pytest.mark.parametrize("variant", ["auto", "fused", "split", "tma"])
def test_deterministic_variants_are_bitwise_reproducible(variant, bwd_variant):
    """The default (the 5-matmul kernel at this N) and both deterministic variants: two backward
    runs give the same bits (N = 97: three key tiles and a tail under the interpreter's tiles)."""
    bwd_variant(variant)
    q, k, v = _qkv(1, 2, 97, 80, torch.float16)
    dout = torch.randn_like(q)
    if variant == "auto":
        assert kernels.backward_variant(q) == "fused"
    run = lambda a, b, c: attention(a, b, c, backend="triton")  # noqa: E731
    first, second = _grads(run, q, k, v, dout), _grads(run, q, k, v, dout)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_backward_variant_choice(bwd_variant):
    """auto: the 5-matmul kernel up to FUSED_MAX_N, the 7-matmul pair beyond; atomic only when
    asked for, and never under torch.use_deterministic_algorithms(True)."""
    at = lambda n: torch.empty(2, 3, n, 64, device="meta")  # noqa: E731
    assert kernels.backward_variant(at(1)) == kernels.backward_variant(at(1025 - 1)) == "fused"
    assert kernels.backward_variant(at(kernels.FUSED_MAX_N + 1)) == "split"
    assert kernels.backward_variant(torch.empty(2, 3, 197, 88, device="meta")) == "fused"  # 64 + 32 columns
    assert kernels.backward_variant(torch.empty(2, 3, 197, 128, device="meta")) == "split"
    assert kernels.backward_variant(torch.empty(2, 3, 197, 128, device="meta"), "fused") == "fused"
    assert kernels.backward_variant(at(4096), "atomic") == "atomic"
    bwd_variant("atomic")
    assert kernels.backward_variant(at(197)) == "atomic"
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert kernels.backward_variant(at(197)) == "fused"
        assert kernels.backward_variant(at(4096)) == "split"
    finally:
        torch.use_deterministic_algorithms(was)
    with pytest.raises(ValueError, match="fused"):
        kernels.set_backward_variant("fast")
    # the TMA twins only when forced; tma_atomic gives way to tma where determinism is asked
    assert kernels.backward_variant(at(197), "tma") == "tma"
    assert kernels.backward_variant(at(197), "tma_atomic") == "tma_atomic"
    assert kernels.backward_variant(at(197), "tma_atomic", deterministic=True) == "tma"


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's exp2 of
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the dropped keys
@pytest.mark.parametrize("variant", _VARIANTS)
def test_backward_with_very_negative_scores(variant, bwd_variant):
    """Scores near -200 everywhere (lse ~ -200): a key past N, zero (masked or TMA zero fill), scores
    0 and exp(0 - lse) overflows to inf, so it must be dropped from P before it reaches dS and dQ
    (inf * 0 = NaN). N = 37: a tail key tile at every tile size."""
    B, H, N, D = 1, 2, 37, 64
    g = torch.Generator().manual_seed(11)
    q = (5 + 0.1 * torch.randn(B, H, N, D, generator=g)).to(DEV, torch.float16)
    k = (-5 + 0.1 * torch.randn(B, H, N, D, generator=g)).to(DEV, torch.float16)
    v = torch.randn(B, H, N, D, generator=g).to(DEV, torch.float16)
    dout = torch.randn(B, H, N, D, generator=g).to(DEV, torch.float16)
    bwd_variant(variant)
    got = _grads(lambda a, b, c: attention(a, b, c, backend="triton"), q, k, v, dout)
    ref = _grads(attention_ref, q.double(), k.double(), v.double(), dout.double())
    sdpa = _grads(F.scaled_dot_product_attention, q, k, v, dout)
    for name, a, s_, r in zip(("out", "dq", "dk", "dv"), got, sdpa, ref):
        assert torch.isfinite(a).all(), name
        _assert_close_2x(name, a, s_, r, torch.float16)


def test_tma_backward_reasons_and_forced_variant(bwd_variant):
    """A forced TMA backward raises with TMA's reasons on a layout it cannot serve (here dout, whose
    token stride is 76 halves: not a multiple of 16 bytes); forced by VITFAST_ATTENTION_BWD it falls
    back to auto's choice with one warning."""
    q, k, v = _qkv(1, 2, 50, 72, torch.float16)
    big = torch.randn(1, 2, 50, 76, generator=torch.Generator().manual_seed(2)).to(DEV, torch.float16)
    dout = big[..., :72]
    reasons = kernels.tma_bwd_not_supported_reasons(q, k, v, dout, torch.empty_like(q), torch.empty_like(q))
    assert len(reasons) == 1 and reasons[0].startswith("dout has strides")
    bwd_variant("tma")
    run = lambda a, b, c: attention(a, b, c, backend="triton")  # noqa: E731
    with pytest.raises(KernelNotSupported, match="dout has strides"):
        _grads(run, q, k, v, dout)
    kernels._BWD_FROM_ENV = True  # as if VITFAST_ATTENTION_BWD=tma
    reset_warnings()
    try:
        with pytest.warns(RuntimeWarning, match="VITFAST_ATTENTION_BWD=tma"):
            got = _grads(run, q, k, v, dout)
    finally:
        kernels._BWD_FROM_ENV = False
    ref = _grads(attention_ref, q.double(), k.double(), v.double(), dout.double())
    sdpa = _grads(F.scaled_dot_product_attention, q, k, v, dout)
    for name, a, s_, r in zip(("out", "dq", "dk", "dv"), got, sdpa, ref):
        _assert_close_2x(name, a, s_, r, torch.float16)


def test_deterministic_argument_choice(bwd_variant):
    """deterministic=False lets auto take the atomic 5-matmul kernel where it would take the
    7-matmul pair, never where the deterministic 5-matmul kernel applies; True undoes a forced
    atomic; torch.use_deterministic_algorithms(True) overrides False."""
    long, wide, short = (torch.empty(2, 3, n, d, device="meta") for n, d in ((4096, 64), (197, 128), (197, 64)))
    assert kernels.backward_variant(long, deterministic=False) == "atomic"
    assert kernels.backward_variant(wide, deterministic=False) == "atomic"
    assert kernels.backward_variant(short, deterministic=False) == "fused"
    for q in (long, wide, short):
        assert kernels.backward_variant(q, deterministic=True) == kernels.backward_variant(q)
    assert kernels.backward_variant(long, "split", deterministic=False) == "split"  # a forced variant stands
    bwd_variant("atomic")
    assert kernels.backward_variant(short) == kernels.backward_variant(short, deterministic=False) == "atomic"
    assert kernels.backward_variant(short, deterministic=True) == "fused"
    assert kernels.backward_variant(long, deterministic=True) == "split"
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert kernels.backward_variant(long, deterministic=False) == "split"
    finally:
        torch.use_deterministic_algorithms(was)


@pytest.mark.parametrize("packed", [False, True], ids=["qkv", "packed"])
@pytest.mark.parametrize("deterministic", [None, True, False])
def test_deterministic_argument_reaches_the_backward(deterministic, packed, bwd_variant, monkeypatch):
    """The argument travels through the registered ops to the backward that runs: at D = 128
    (beyond the deterministic 5-matmul kernel's head dims) False runs the atomic kernel, None and
    True the 7-matmul pair; the gradients are within 2x SDPA's error either way."""
    ran = []
    for name in ("launch_bwd_fused", "launch_bwd_dkdv"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _real=real, _name=name, **kw: (
            ran.append("atomic" if kw.get("atomic") else "split" if _name.endswith("dkdv") else "fused"),
            _real(*a, **kw))[1])
    B, N, H, D, dtype = 1, 37, 2, 128, torch.float16
    qkv = torch.randn(B, N, 3 * H * D, generator=torch.Generator().manual_seed(5)).to(DEV, dtype)
    dout = torch.randn(B, N, H * D, generator=torch.Generator().manual_seed(6)).to(DEV, dtype)
    x = qkv.clone().requires_grad_()
    if packed:
        out = attention_packed(x, num_heads=H, backend="kernel", deterministic=deterministic)
    else:
        out = attention(*_packed_views(x, H), backend="kernel", deterministic=deterministic)
        out = out.transpose(1, 2).reshape(B, N, H * D)
    out.backward(dout)
    assert ran == ["atomic" if deterministic is False else "split"]
    xd = qkv.double().requires_grad_()
    attention_ref(*_packed_views(xd, H)).transpose(1, 2).reshape(B, N, H * D).backward(dout.double())
    xs = qkv.clone().requires_grad_()
    F.scaled_dot_product_attention(*_packed_views(xs, H)).transpose(1, 2).reshape(B, N, H * D).backward(dout)
    _assert_close_2x("dqkv", x.grad, xs.grad, xd.grad, dtype)


# -------------------------------------------------------------- forward variants
@pytest.fixture
def fwd_variant():
    """Sets the forward variant for one test (kernels.set_forward_variant), then restores it."""
    previous = kernels.set_forward_variant("auto")
    yield kernels.set_forward_variant
    kernels.set_forward_variant(previous)
    kernels._FWD_FROM_ENV = False


_FWD_VARIANTS = ["tma", "tma_persistent"]


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("B,H,N,D", [(2, 2, 1, 64), (1, 2, 50, 80), (2, 1, 197, 72), (2, 2, 50, 72),
                                     (1, 1, 197, 80), (1, 2, 197, 64)])
@pytest.mark.parametrize("variant", _FWD_VARIANTS)
def test_tma_forward_variants_match_reference(variant, B, H, N, D, dtype, fwd_variant):
    """The TMA forwards under the interpreter (which emulates device-side tensor descriptors and their
    out-of-bounds zero fill): within 2x SDPA's error at one token, tails of 50 and 197 rows over
    32-row tiles, and head dims in two chunks (80 = 64 + 16, 72 -> 64 + 16, the last 8 columns
    zero-filled); the persistent one walks several tiles per program (3 programs)."""
    fwd_variant(variant)
    q, k, v = _qkv(B, H, N, D, dtype, seed=N + D)
    assert kernels.forward_variant(q, k, v, torch.empty_like(q)) == variant
    _check_fwd_bwd(B, H, N, D, dtype, backward=False, seed=N + D)
    out, lse = torch.ops.vitfast.attention_fwd(q, k, v, 0.3)
    ref = torch.logsumexp(q.double() @ k.double().transpose(-1, -2) * 0.3, dim=-1)
    assert _err(lse, ref) < 1e-5 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("variant", _FWD_VARIANTS)
def test_tma_forward_on_packed_strides(variant, fwd_variant):
    """Views of a packed qkv (token stride 3*H*D = 432 halves: 864 bytes, a multiple of 16) in
    place, and the packed op writing [B, N, H*D]: the same answer as the pointer kernel to rounding,
    within 2x SDPA of float64."""
    B, N, H, D = 2, 41, 2, 72
    qkv = torch.randn(B, N, 3 * H * D, generator=torch.Generator().manual_seed(5)).to(DEV, torch.float16)
    q, k, v = _packed_views(qkv, H)
    assert not kernels.tma_not_supported_reasons(q, k, v, torch.empty_like(q))
    fwd_variant(variant)
    got = attention_packed(qkv, num_heads=H, backend="triton")
    fwd_variant("pointer")
    pointer = attention_packed(qkv, num_heads=H, backend="triton")
    ref = attention_ref(*(t.double() for t in (q, k, v))).transpose(1, 2).reshape(B, N, H * D)
    sdpa = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, H * D)
    _assert_close_2x("out", got, sdpa, ref, torch.float16)
    assert _err(got, pointer.double()) <= 2 * 9.8e-4 * ref.abs().max().item()


@pytest.mark.parametrize("kind", ["bwd_tma", "bwd_tma_atomic"])
def test_every_tma_backward_candidate_config_matches_reference(kind):
    """Every config the autotuner of each TMA backward may pick for 16-bit inputs, at N = 97 and
    D = 80, run in fp32 (the interpreter multiplies in fp32 either way)."""
    B, H, N, D = 1, 2, 97, 80
    q, k, v = _qkv(B, H, N, D, torch.float32, seed=9)
    dout = torch.randn(B, H, N, D, generator=torch.Generator().manual_seed(10))
    ref = _grads(attention_ref, q.double(), k.double(), v.double(), dout.double())
    out, lse = torch.empty_like(q), torch.empty(B, H, N)
    kernels.launch_fwd(q, k, v, out, lse, D**-0.5)
    configs = kernels.candidate_configs(kind, q.half())  # the 16-bit survivors (fp32 keeps one), run in fp32
    assert len(configs) >= 2 and any(c["BLOCK_N"] == 128 for c in configs)
    for c in configs:
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        kernels.launch_bwd(dout, q, k, v, out, lse, dq, dk, dv, D**-0.5, config=c, variant=kind[4:])
        for name, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv), ref[1:]):
            assert _err(got, want) < 2e-5 * max(1.0, want.abs().max().item()), (name, c)


@pytest.mark.parametrize("kind", ["fwd_tma", "fwd_tma_persistent"])
def test_every_tma_candidate_config_matches_reference(kind):
    """Every config the autotuner of each TMA forward may pick (warp-specialised ones included: the
    interpreter runs the loop plainly), at N = 97 (tiles of 128 rows survive the pruning) and D = 80."""
    B, H, N, D = 1, 2, 97, 80
    q, k, v = _qkv(B, H, N, D, torch.float32, seed=9)
    ref = attention_ref(q.double(), k.double(), v.double())
    configs = kernels.candidate_configs(kind, q)
    assert len(configs) >= 2 and any(c["BLOCK_M"] == 128 for c in configs)
    for c in configs:
        out, lse = torch.empty_like(q), torch.empty(B, H, N)
        kernels.launch_fwd(q, k, v, out, lse, D**-0.5, config=c, variant=kind[4:])
        assert _err(out, ref) < 2e-6, c


def test_tma_warp_specialised_configs_only_at_4_warps_in_16_bit():
    """Triton specialises only at 4 warps (at 8 it silently runs the plain loop) and its pass crashes
    on fp32's 3xTF32 dots: such configs are pruned."""
    half = kernels.candidate_configs("fwd_tma", torch.empty(2, 12, 197, 64, dtype=torch.float16))
    ws = [c for c in half if c["WARP_SPEC"]]
    assert ws and all(c["num_warps"] == 4 for c in ws) and len(ws) < len(half)
    assert not any(c["WARP_SPEC"] for c in kernels.candidate_configs("fwd_tma", torch.empty(2, 12, 197, 64)))


def test_tma_reasons_and_forced_variant(fwd_variant):
    """TMA's layout rules are reasons: a base pointer off 16 bytes, a token stride that is not a
    multiple of 16 bytes, a head dim beyond 128; a forced variant raises with every reason, auto
    takes the pointer kernel silently, a variant forced by VITFAST_ATTENTION_FWD warns once."""
    base = torch.randn(1, 2, 50, 76, dtype=torch.float16)
    q = base[..., 4:]  # D = 72 from column 4: 8 bytes off, token stride 152 bytes
    k, v = _qkv(1, 2, 50, 72, torch.float16)[:2]
    reasons = kernels.tma_not_supported_reasons(q, k, v, torch.empty_like(k))
    assert len(reasons) == 2 and "q's data pointer" in reasons[0] and "multiples of 16 bytes" in reasons[1]
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:  # as torch.compile traces the op: no data pointer, the same reasons
        fq, fk = mode.from_tensor(base)[..., 4:], mode.from_tensor(k)
        assert kernels.tma_not_supported_reasons(fq, fk, fk, fk) == reasons
        assert kernels.tma_not_supported_reasons(fk, fk, fk, fk) == []
    wide = torch.empty(1, 1, 4, 256)
    assert any("checked up to 128" in r for r in kernels.tma_not_supported_reasons(wide, wide, wide, wide))
    assert kernels.forward_variant(q, k, v, torch.empty_like(k)) == "pointer"  # auto, on the CPU
    fwd_variant("tma")
    with pytest.raises(KernelNotSupported, match="16-byte aligned") as info:
        attention(q, k, v, backend="triton")
    assert len(info.value.reasons) == 2
    kernels._FWD_FROM_ENV = True  # as if VITFAST_ATTENTION_FWD=tma
    reset_warnings()
    with pytest.warns(RuntimeWarning, match="VITFAST_ATTENTION_FWD=tma"):
        got = attention(q, k, v, backend="triton")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attention(q, k, v, backend="triton")  # once only
    _assert_close_2x("out", got, F.scaled_dot_product_attention(q, k, v),
                     attention_ref(q.double(), k.double(), v.double()), torch.float16)
    with pytest.raises(ValueError, match="tma_persistent"):
        kernels.set_forward_variant("hopper")


def test_stride8_and_auto_forward_while_torch_compile_traces(monkeypatch):
    """Under torch.compile the op bodies run on fake tensors (FunctionalTensors under AOTAutograd):
    no data pointer to read, and is_compiling() is not always True there. stride8 (every pointer
    launch at D = 72 or 88 asks it) must say from the storage offset what it says of real tensors,
    and auto must not take the TMA forward, even once AUTO_TMA_MIN_N is set."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode

    real = torch.empty(2, 4, 197, 72, dtype=torch.float16)
    assert kernels.stride8(real, real) and not kernels.stride8(real[..., 1:], real)
    packed = torch.empty(2, 197, 3, 4, 72, dtype=torch.float16)  # split qkv: token stride 864
    assert kernels.stride8(*(packed[:, :, i].transpose(1, 2) for i in range(3)))
    monkeypatch.setattr(kernels, "AUTO_TMA_MIN_N", 1024)
    monkeypatch.setattr(kernels, "INTERPRET", False)  # forward_variant as on a GPU (nothing launches here)
    monkeypatch.setattr(kernels, "_tma_device_reasons", lambda device: [])  # as on an sm_90 GPU
    with FakeTensorMode():
        base = torch.empty(2, 4, 197, 72, dtype=torch.float16)
        long = torch.empty(2, 4, 1024, 64, device="cuda", dtype=torch.bfloat16)
        with FunctionalTensorMode():
            ft = FunctionalTensor.to_functional(base)
            assert kernels.stride8(ft, ft, ft, ft)
            assert not kernels.stride8(ft[..., 1:], ft)
            fl = FunctionalTensor.to_functional(long)
            assert kernels.forward_variant(fl, fl, fl, fl, "auto") == "pointer"
        assert kernels.forward_variant(long, long, long, long, "auto") == "pointer"
    if kernels._tma_host.missing_features():
        return
    monkeypatch.setattr(kernels._tma_host, "traced", lambda t: False)  # so the fake tensors pass as real
    with FakeTensorMode():
        long = torch.empty(2, 4, 1024, 64, device="cuda", dtype=torch.bfloat16)
        assert kernels.forward_variant(long, long, long, long, "auto") == "tma"  # the rule itself
        assert kernels.forward_variant(long[:, :, :1000], long, long, long, "auto") == "pointer"
        monkeypatch.setattr(kernels, "AUTO_TMA_MIN_N", None)
        assert kernels.forward_variant(long, long, long, long, "auto") == "pointer"  # not yet checked


def test_tma_allocator_is_set_in_every_thread_but_never_replaced():
    """triton keeps its allocator in a ContextVar: a thread that never set one would launch the
    descriptor kernels with the null allocator and fail. ensure_allocator sets ours there, and
    leaves an allocator someone else set alone (each check in a fresh thread: fresh context)."""
    import threading

    from triton.runtime import _allocation

    seen = {}

    def fresh():
        seen["before"] = _allocation._allocator.get()
        kernels._tma.ensure_allocator()
        seen["after"] = _allocation._allocator.get()

    def users_own():
        import triton

        mine = lambda size, alignment, stream: None  # noqa: E731
        triton.set_allocator(mine)
        kernels._tma.ensure_allocator()
        seen["kept"] = _allocation._allocator.get() is mine

    for fn in (fresh, users_own):
        t = threading.Thread(target=fn)
        t.start()
        t.join()
    assert isinstance(seen["before"], _allocation.NullAllocator)
    assert seen["after"] is kernels._tma._torch_alloc and seen["kept"]


def test_tma_kernels_need_the_features_they_use(monkeypatch):
    """A Triton without device-side descriptors is a reason, named with its version."""
    monkeypatch.setitem(kernels._tma.triton_features(), "make_tensor_descriptor", False)
    q = torch.empty(1, 1, 8, 64)
    assert any("no make_tensor_descriptor" in r for r in kernels.tma_not_supported_reasons(q, q, q, q))


def test_split_backward_launchers_match_launch_bwd():
    q, k, v = _qkv(1, 2, 50, 32, torch.float32)
    dout = torch.randn_like(q)
    out, lse = torch.empty_like(q), torch.empty(1, 2, 50)
    kernels.launch_fwd(q, k, v, out, lse, 0.3)
    whole = [torch.empty_like(q) for _ in range(3)]
    kernels.launch_bwd(dout, q, k, v, out, lse, *whole, 0.3, variant="split")
    delta = kernels.launch_bwd_preprocess(out, dout)
    torch.testing.assert_close(delta, (out.double() * dout.double()).sum(-1).float())
    dq, dk, dv = (torch.empty_like(q) for _ in range(3))
    kernels.launch_bwd_dkdv(dout, q, k, v, lse, delta, dk, dv, 0.3)
    kernels.launch_bwd_dq(dout, q, k, v, lse, delta, dq, 0.3)
    for a, b in zip((dq, dk, dv), whole):
        assert torch.equal(a, b)


@pytest.mark.parametrize("packed", [False, True])
def test_autocast_casts_mixed_inputs_like_sdpa(packed):
    """Under autocast, q and k from an fp32 LayerNorm (qk_norm) beside an fp16 v run in the
    autocast dtype, as SDPA does, on the kernel and on the reference path alike."""
    q, k, v = _qkv(1, 2, 50, 32, torch.float32)
    ref = attention_ref(q.double(), k.double(), v.double())
    for backend in ("kernel", "reference"):
        with torch.autocast(DEV, dtype=torch.float16):
            if packed:
                qkv = torch.cat([t.transpose(1, 2).flatten(2) for t in (q, k, v)], -1)
                out = attention_packed(qkv, num_heads=2, backend=backend).unflatten(-1, (2, 32)).transpose(1, 2)
            else:
                out = attention(q, k, v.half(), backend=backend)
        assert out.dtype == torch.float16
        assert _err(out, ref) < 2e-3
    with pytest.raises(TypeError, match="v has dtype torch.float16 but q has torch.float32"):
        attention(q, k, v.half(), backend="kernel")  # outside autocast: still one dtype expected


# ------------------------------------------------------------------ dispatch, errors
def test_auto_on_cpu_is_sdpa_without_warning():
    q, k, v = _qkv(1, 2, 10, 32, torch.float64, device="cpu")
    reset_warnings()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = attention(q, k, v)
        out_packed = attention_packed(torch.randn(1, 10, 96, dtype=torch.float64), num_heads=1)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    assert out_packed.shape == (1, 10, 32)


def test_auto_falls_back_with_one_warning(monkeypatch):
    """What a CUDA input the kernel cannot serve does (float64 here)."""
    monkeypatch.setattr(attention_mod, "auto_is_reference", lambda device: False)
    reset_warnings()
    q, k, v = _qkv(1, 2, 10, 32, torch.float64, device="cpu")
    with pytest.warns(RuntimeWarning, match="float64"):
        out = attention(q, k, v)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attention(q, k, v)  # warned once only
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))


def test_forced_backends():
    q, k, v = _qkv(1, 1, 10, 32, torch.float64, device="cpu")
    with pytest.raises(KernelNotSupported, match="float64"):
        attention(q, k, v, backend="triton")
    torch.testing.assert_close(attention(q, k, v, backend="sdpa"), attention_ref(q, k, v))
    with pytest.raises(ValueError, match="backend must be one of"):
        attention(q, k, v, backend="flash")
    q, k, v = _qkv(1, 1, 10, 300, torch.float32, device="cpu")  # D > 256: SDPA only
    with pytest.raises(KernelNotSupported, match="head dim"):
        attention(q, k, v, backend="triton")
    torch.testing.assert_close(attention(q, k, v, backend="sdpa"), attention_ref(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("D", [8, 36, 264, 512])
def test_forced_triton_rejects_unsupported_head_dims(D):
    q, k, v = _qkv(1, 1, 4, D, torch.float32, device="cpu")
    with pytest.raises(ValueError, match=r"q\.shape\[-1\] \(head dim D\) is " + str(D)):
        attention(q, k, v, backend="triton")


def test_reasons():
    q, k, v = _qkv(1, 2, 10, 64, torch.float32)
    assert attention_not_supported_reasons(q, k, v) == []
    if kernels.INTERPRET:
        r = attention_not_supported_reasons(*(t.bfloat16() for t in (q, k, v)))
        assert any("interpreter" in x for x in r)
    strided = torch.randn(1, 2, 10, 128, device=DEV)[..., ::2]
    assert any("q.stride(-1) is 2" in x for x in attention_not_supported_reasons(strided, k, v))
    assert any("q must have 4 dimensions" in x for x in attention_not_supported_reasons(q[0], k, v))
    assert any("float64" in x for x in attention_not_supported_reasons(q.double(), k.double(), v.double()))


_BAD = {
    "rank": (lambda q, k, v: (q[0], k, v), ValueError, r"q must have 4 dimensions"),
    "batch": (lambda q, k, v: (q, k[:1], v), ValueError, r"k has shape \[1, 3, 8, 32\] but q has \[2, 3, 8, 32\]"),
    "heads": (lambda q, k, v: (q, k, v[:, :2]), ValueError, r"v has shape \[2, 2, 8, 32\]"),
    "tokens": (lambda q, k, v: (q, k[:, :, :5], v), ValueError, r"k has shape \[2, 3, 5, 32\]"),
    "head_dim": (lambda q, k, v: (q, k, v[..., :16]), ValueError, r"v has shape \[2, 3, 8, 16\]"),
    "int": (lambda q, k, v: (q.long(), k.long(), v.long()), TypeError, r"q has dtype torch.int64"),
    "mixed_dtype": (lambda q, k, v: (q, k, v.half()), TypeError, r"v has dtype torch.float16 but q has torch.float32"),
    "mixed_device": (lambda q, k, v: (q, k.to("meta"), v), ValueError, r"k is on meta but q is on cpu"),
    "not_tensor": (lambda q, k, v: (q, k, v.tolist()), TypeError, r"v must be a torch.Tensor"),
}


@pytest.mark.parametrize("backend", ["auto", "triton", "sdpa"])
@pytest.mark.parametrize("case", list(_BAD))
def test_bad_inputs_raise_naming_the_argument(case, backend):
    make, exc, match = _BAD[case]
    q, k, v = _qkv(2, 3, 8, 32, torch.float32, device="cpu")
    with pytest.raises(exc, match=match):
        attention(*make(q, k, v), backend=backend)


@pytest.mark.parametrize("qkv,num_heads,exc,match", [
    (torch.randn(2, 8, 96), 5, ValueError, r"qkv must be \[B, N, 3\*H\*D\] with H = num_heads = 5"),
    (torch.randn(2, 8, 3, 32), 1, ValueError, r"got shape \[2, 8, 3, 32\]"),
    (torch.randn(2, 8, 96), 0, ValueError, r"num_heads must be a positive int"),
    (torch.ones(2, 8, 96, dtype=torch.int32), 1, TypeError, r"qkv has dtype torch.int32"),
])
def test_bad_packed_inputs(qkv, num_heads, exc, match):
    with pytest.raises(exc, match=match):
        attention_packed(qkv, num_heads=num_heads, backend="triton")


# ------------------------------------------------------------------- registration
def test_opcheck_all_ops():
    q, k, v = _qkv(1, 2, 20, 32, torch.float32)
    qkv = torch.randn(1, 20, 3 * 2 * 32, device=DEV)
    out, lse = torch.ops.vitfast.attention_fwd(q, k, v, 0.2)
    pout, plse = torch.ops.vitfast.attention_packed_fwd(qkv, 2, 0.2)
    dout, pdout = torch.randn_like(out), torch.randn_like(pout)
    cases = [
        (torch.ops.vitfast.attention_fwd.default, (q.requires_grad_(), k, v, 0.2)),
        (torch.ops.vitfast.attention_bwd.default, (dout, q.detach(), k, v, out, lse, 0.2)),
        (torch.ops.vitfast.attention_packed_fwd.default, (qkv.requires_grad_(), 2, 0.2)),
        (torch.ops.vitfast.attention_packed_bwd.default, (pdout, qkv.detach(), pout, plse, 2, 0.2)),
        (torch.ops.vitfast.attention_fwd.default, (q, k, v, 0.2, False)),
        (torch.ops.vitfast.attention_bwd.default, (dout, q.detach(), k, v, out, lse, 0.2, False)),
        (torch.ops.vitfast.attention_packed_fwd.default, (qkv, 2, 0.2, True)),
        (torch.ops.vitfast.attention_packed_bwd.default, (pdout, qkv.detach(), pout, plse, 2, 0.2, False)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("deterministic", [None, False])
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compile_backend, deterministic):
    """On the CPU the ops are opaque custom_ops (the interpreter's kernels cannot be
    traced by wrap_triton); test_compiled_matches_eager_cuda compiles the triton_ops.
    deterministic=False at D = 128: the atomic backward inside the compiled graph."""
    torch._dynamo.reset()
    B, N, H, D = 2, 20, 2, (32 if deterministic is None else 128)
    lin = torch.nn.Linear(H * D, 3 * H * D).to(DEV)

    def block(x):
        return attention_packed(lin(x), num_heads=H, backend="triton", deterministic=deterministic).square().mean()

    x = torch.randn(B, N, H * D, device=DEV)
    compiled = torch.compile(block, fullgraph=True, backend=compile_backend)
    loss_c = compiled(x)
    grads_c = torch.autograd.grad(loss_c, list(lin.parameters()))
    loss_e = block(x)
    grads_e = torch.autograd.grad(loss_e, list(lin.parameters()))
    torch.testing.assert_close(loss_c, loss_e)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b)


# -------------------------------------------------------------------------- GPU
@pytest.fixture
def fixed_config():
    previous = kernels.set_autotune(False)
    yield
    kernels.set_autotune(previous)


GPU_DTYPES = [torch.bfloat16, torch.float16]
VIT_SHAPES = [  # (B, H, N, D): ViT-B/16 224, ViT-L/14 224 style 257/D=80, 384-res, 448-res, long
    (8, 12, 197, 64), (4, 16, 257, 80), (4, 16, 577, 64), (2, 16, 1025, 64), (1, 16, 4097, 128),
    (4, 16, 145, 72), (2, 16, 785, 88), (4, 8, 50, 104),
]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("B,H,N,D", VIT_SHAPES)
def test_vit_shapes_cuda(B, H, N, D, dtype, fixed_config):
    _check_fwd_bwd(B, H, N, D, dtype)


# HEAD_DIM is a constexpr (masks on a known D keep the loads vectorised and pipelined), so
# each D compiles its own kernels: every D in bf16, a few in fp16 and fp32 (TF32 off).
_HEAD_DIM_CASES = [(D, torch.bfloat16) for D in range(16, 257, 8)] + [
    (D, dt) for dt in (torch.float16, torch.float32) for D in (16, 72, 80, 128, 256)]


@pytest.mark.cuda
@pytest.mark.parametrize("D,dtype", _HEAD_DIM_CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_every_head_dim_cuda(D, dtype, fixed_config):
    _check_fwd_bwd(2, 3, 197, D, dtype)


@pytest.mark.cuda
def test_fp32_with_tf32_allowed_cuda(fixed_config, monkeypatch):
    """allow_tf32 switches fp32 dots to TF32 (10-bit mantissa): close, not 2x-SDPA close."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    assert kernels.dot_precision(torch.float32) == "tf32"
    q, k, v = _qkv(2, 3, 197, 80, torch.float32)
    ref = attention_ref(q.double(), k.double(), v.double())
    assert _err(attention(q, k, v, backend="triton"), ref) < 1e-2 * ref.abs().max().item()


@pytest.mark.cuda
@pytest.mark.parametrize("N", [1, 50, 145, 197, 257, 577, 785, 1025, 4097])
def test_every_length_cuda(N, fixed_config):
    _check_fwd_bwd(1, 4, N, 80, torch.bfloat16)


@pytest.mark.cuda
def test_autotuned_cuda():
    previous = kernels.set_autotune(True)
    try:
        _check_fwd_bwd(4, 12, 197, 64, torch.bfloat16)
    finally:
        kernels.set_autotune(previous)


@pytest.mark.cuda
def test_batch_heads_above_grid_axis_limit_cuda(fixed_config):
    _check_fwd_bwd(4100, 16, 8, 16, torch.float16)  # B*H = 65,600


@pytest.mark.cuda
def test_deterministic_and_packed_cuda(fixed_config):
    B, N, H, D = 8, 197, 12, 64
    qkv = torch.randn(B, N, 3 * H * D, device="cuda", dtype=torch.bfloat16)
    dout = torch.randn(B, N, H * D, device="cuda", dtype=torch.bfloat16)
    results = []
    for _ in range(2):
        x = qkv.clone().requires_grad_()
        out = attention_packed(x, num_heads=H)
        out.backward(dout)
        results.append((out, x.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.cuda
@pytest.mark.parametrize("variant", _VARIANTS)
@pytest.mark.parametrize("B,H,N,D", [(8, 12, 197, 64), (4, 16, 257, 80), (2, 16, 577, 72), (2, 8, 1025, 88),
                                     (1, 3, 1, 64)])
def test_backward_variants_cuda(variant, B, H, N, D, bwd_variant, fixed_config):
    """Every backward variant, forced, at ViT shapes in bf16 (auto would pick split at these B*H)."""
    if variant.startswith("tma") and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA needs sm_90")
    bwd_variant(variant)
    _check_fwd_bwd(B, H, N, D, torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.parametrize("variant", ["tma", "tma_persistent"])
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("B,H,N,D", [(8, 12, 197, 64), (4, 16, 257, 80), (4, 16, 145, 72), (2, 16, 785, 88),
                                     (1, 16, 4097, 128), (1, 3, 1, 64)])
def test_tma_forward_variants_cuda(variant, B, H, N, D, dtype, fwd_variant, fixed_config):
    """The TMA forwards on an sm_90+ GPU (skipped below), forced, at ViT shapes and one long one."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA needs sm_90")
    fwd_variant(variant)
    _check_fwd_bwd(B, H, N, D, dtype, backward=False)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["fwd_tma", "fwd_tma_persistent"])
def test_every_tma_config_cuda(kind):
    """Every candidate config of each TMA forward (warp-specialised ones really specialised here)."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA needs sm_90")
    for B, H, N, D in ((4, 12, 197, 80), (1, 8, 1100, 128)):
        q, k, v = _qkv(B, H, N, D, torch.bfloat16)
        ref = attention_ref(q.double(), k.double(), v.double())
        bound = 2 * _err(F.scaled_dot_product_attention(q, k, v), ref) + 2e-3 * ref.abs().max().item()
        for c in kernels.candidate_configs(kind, q):
            out, lse = torch.empty_like(q), torch.empty(B, H, N, device="cuda")
            kernels.launch_fwd(q, k, v, out, lse, D**-0.5, config=c, variant=kind[4:])
            assert _err(out, ref) <= bound, (c, _err(out, ref), bound)


@pytest.mark.cuda
@pytest.mark.parametrize("kind,variant", [("bwd_tma", "tma"), ("bwd_tma_atomic", "tma_atomic"), ("atomic", "atomic")])
def test_every_5_matmul_backward_config_cuda(kind, variant):
    """Every candidate config of the TMA backwards and of the atomic one, then each autotuned (the
    atomic kernels' dQ scratch is zeroed before each timed run: the tuned call's dq must come out
    right too, and the GPU check runs tests with autotuning off, so it is forced on here)."""
    if variant.startswith("tma") and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA needs sm_90")
    for B, H, N, D in ((4, 12, 197, 80), (1, 8, 1100, 128)):
        q, k, v = _qkv(B, H, N, D, torch.bfloat16)
        dout = torch.randn_like(q)
        ref = _grads(attention_ref, q.double(), k.double(), v.double(), dout.double())
        sdpa = _grads(F.scaled_dot_product_attention, q, k, v, dout)
        out, lse = torch.empty_like(q), torch.empty(B, H, N, device="cuda")
        kernels.launch_fwd(q, k, v, out, lse, D**-0.5)
        previous = kernels.set_autotune(True)
        try:
            for c in kernels.candidate_configs(kind, q) + [None]:  # None: the autotuner
                dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
                kernels.launch_bwd(dout, q, k, v, out, lse, dq, dk, dv, D**-0.5, config=c, variant=variant)
                for name, got, s_, r in zip(("dq", "dk", "dv"), (dq, dk, dv), sdpa[1:], ref[1:]):
                    _assert_close_2x(f"{name} {c}", got, s_, r, torch.bfloat16)
        finally:
            kernels.set_autotune(previous)


@pytest.mark.cuda
def test_auto_forward_variant_cuda(monkeypatch):
    q = torch.empty(1, 2, 1024, 64, device="cuda", dtype=torch.bfloat16)
    assert kernels.AUTO_TMA_MIN_N is not None or kernels.forward_variant(q, q, q, q, "auto") == "pointer"
    monkeypatch.setattr(kernels, "AUTO_TMA_MIN_N", kernels.AUTO_TMA_MIN_N or 1024)  # the rule once set
    q = torch.empty(1, 2, kernels.AUTO_TMA_MIN_N, 64, device="cuda", dtype=torch.bfloat16)
    short = q[:, :, :197]
    want = "tma" if torch.cuda.get_device_capability() >= (9, 0) and not kernels._tma.missing_features() else "pointer"
    assert kernels.forward_variant(q, q, q, q, "auto") == want
    assert kernels.forward_variant(short, short, short, short, "auto") == "pointer"
    f32 = q.float()
    assert kernels.forward_variant(f32, f32, f32, f32, "auto") == "pointer"


@pytest.mark.cuda
def test_fused_backward_bitwise_reproducible_cuda(bwd_variant, fixed_config):
    """The deterministic 5-matmul kernel's dq goes through its own read-modify-write in a fixed
    order (a barrier between key tiles): the same bits on every run, on the GPU too."""
    bwd_variant("fused")
    q, k, v = _qkv(8, 12, 577, 80, torch.bfloat16, device="cuda")
    dout = torch.randn_like(q)
    run = lambda a, b, c: attention(a, b, c, backend="triton")  # noqa: E731
    first = _grads(run, q, k, v, dout)
    for _ in range(3):
        for a, b in zip(first, _grads(run, q, k, v, dout)):
            assert torch.equal(a, b)


@pytest.mark.cuda
def test_fallback_warns_once_cuda():
    reset_warnings()
    q, k, v = _qkv(1, 2, 10, 32, torch.float64, device="cuda")
    with pytest.warns(RuntimeWarning, match="float64"):
        attention(q, k, v)


@pytest.mark.cuda
def test_opcheck_cuda(fixed_config):
    test_opcheck_all_ops()
    qb = _qkv(1, 2, 20, 64, torch.bfloat16)
    torch.library.opcheck(torch.ops.vitfast.attention_fwd.default, (*qb, 0.125))


@pytest.mark.cuda
def test_compiled_matches_eager_cuda(fixed_config):
    torch._dynamo.reset()
    B, N, H, D = 4, 197, 6, 64
    lin = torch.nn.Linear(H * D, 3 * H * D, device="cuda", dtype=torch.bfloat16)
    proj = torch.nn.Linear(H * D, H * D, device="cuda", dtype=torch.bfloat16)

    def block(x):
        return proj(attention_packed(lin(x), num_heads=H)).float().square().mean()

    x = torch.randn(B, N, H * D, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(block, fullgraph=True)
    loss_c = compiled(x)
    grads_c = torch.autograd.grad(loss_c, list(lin.parameters()))
    loss_e = block(x)
    grads_e = torch.autograd.grad(loss_e, list(lin.parameters()))
    torch.testing.assert_close(loss_c, loss_e, rtol=2e-2, atol=2e-3)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-3)


# --------------------------------------------------------------------- benchmark
def test_benchmark_rows_smoke():
    """The attention microbenchmark (vitfast.cli.kernels.attention) runs and its rows carry what
    the CLI needs."""
    from vitfast.cli.kernels import attention as bench

    rows = bench.collect_rows([(1, 1, 20, 16)], ["fp32"], ["fwd", "fwd+bwd"], ["vitfast", "math"])
    assert [(r["backend"], r["mode"]) for r in rows] == [
        ("vitfast", "fwd"), ("vitfast", "fwd+bwd"), ("math", "fwd"), ("math", "fwd+bwd")]
    for r in rows:
        assert r["status"] == "ok" and r["ms"] > 0 and r["tflops"] > 0
        assert {"device", "torch", "triton", "vitfast", "date", "command"} <= set(r)
    assert "vs_best_sdpa" in rows[0] and "TFLOP/s" in bench.format_table(rows)
    assert bench.attention_flops(2, 3, 10, 8, "fwd+bwd") == 3.5 * 4 * 2 * 3 * 100 * 8


def test_wrapper_edges_autocast_float64_meta_scale_and_fallback_under_compile(monkeypatch):
    """The public wrapper: float64 inputs stay float64 under autocast (as SDPA's), meta tensors
    (no autocast there) give a meta output, a scale tensor that requires grad is refused (its
    gradient would be dropped), and a fallback (the kernel cannot serve the input) traces under
    torch.compile(fullgraph=True): the one-time warning's lock is not entered while compiling."""
    import importlib

    A = importlib.import_module("vitfast.ops.attention")
    q = torch.randn(1, 2, 5, 16, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert attention(q, q, q).dtype == torch.float64
        assert attention_packed(torch.randn(1, 5, 96, dtype=torch.float64), num_heads=2).dtype == torch.float64
        assert attention(q.float(), q.float(), q.float()).dtype == torch.bfloat16
    m = torch.empty(1, 2, 5, 16, device="meta")
    assert attention(m, m, m).device.type == "meta"
    with pytest.raises(TypeError, match="scale"):
        attention(q, q, q, scale=torch.tensor(0.3, dtype=torch.float64, requires_grad=True))
    monkeypatch.setattr(A, "auto_is_reference", lambda device: False)  # as for a CUDA input
    x = torch.randn(1, 2, 5, 12)  # D = 12: the kernel cannot serve it (auto falls back)
    reset_warnings()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = torch.compile(lambda t: attention(t, t, t), fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(x, x, x))


@pytest.mark.parametrize("qk_norm", [False, True])
def test_module_paths_agree_on_a_changed_scale(qk_norm):
    """attn.scale set by a user: the reference path (SDPA) takes it as the kernel path does (and as
    timm's non-fused path), so CPU and GPU, kernel and fallback give the same attention."""
    from vitfast.modules.attention import Attention

    torch.manual_seed(0)
    a = Attention(32, num_heads=2, qk_norm=qk_norm)
    a.scale = 0.05
    x = torch.randn(2, 7, 32)
    a.backend = "reference"
    ref = a(x)
    a.backend = "kernel"
    torch.testing.assert_close(a(x), ref, rtol=1e-5, atol=1e-5)
