"""Property tests for vitfast.ops.attention / attention_packed (Triton kernel under the
interpreter on the CPU, and the SDPA path).

Generated: B in {0, 1, 2, 3}, H in 1..3, N in 1..70 (tails of every size against the
interpreter's 32/16 tiles), head dims the kernel takes (multiples of 8 in [16, 256]) and,
for the SDPA path, any D >= 1; layouts: contiguous, views of a packed [B, N, 3, H, D]
qkv (timm), [B, N, H, D] transposed, every other token, padded rows, and a last dim with
stride 2 (which the kernel refuses by name); values: normal, scaled by 1e4 (the softmax
must not overflow), scaled by 1e-4, and one NaN / +Inf / -Inf in q, k or v (propagated as
the float64 reference does). The answer must match float64 within 2x SDPA's own error.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from _prop_utils import CPU_DTYPES, FAST, SCALE, SLOW, assert_matches, poison, randn
from vitfast._dispatch import KernelNotSupported
from vitfast.ops.attention import attention, attention_not_supported_reasons, attention_packed
from vitfast.ops.reference import attention_ref

KERNEL_D = (16, 24, 40, 64, 72, 80)
ANY_D = (1, 3, 12, 20, 33, 64)
LAYOUTS = ("contiguous", "packed", "bnhd", "every_other_token", "padded_rows", "last_dim_stride2")


def _make(B, H, N, D, dtype, layout, seed, scale=1.0, kind="normal", which=0):
    """q, k, v [B, H, N, D] in ``layout`` (values identical whatever the layout); with a
    special ``kind``, one NaN/+Inf/-Inf in q, k or v (``which``)."""
    base = [randn((B, H, N, D), torch.float64, seed + i, scale=scale) for i in range(3)]
    base[which] = poison(base[which], kind, seed)
    if layout == "contiguous":
        return [t.to(dtype) for t in base]
    if layout == "packed":  # timm: qkv(x).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
        qkv = torch.stack(base, 0).permute(1, 3, 0, 2, 4).contiguous().to(dtype)
        return list(qkv.permute(2, 0, 3, 1, 4).unbind(0))
    if layout == "bnhd":
        return [t.transpose(1, 2).contiguous().to(dtype).transpose(1, 2) for t in base]
    if layout == "every_other_token":
        out = []
        for t in base:
            big = torch.zeros(B, H, 2 * N, D, dtype=dtype)
            big[:, :, ::2] = t.to(dtype)
            out.append(big[:, :, ::2])
        return out
    if layout == "padded_rows":
        out = []
        for t in base:
            big = torch.full((B, H, N, D + 8), 7.0, dtype=dtype)
            big[..., :D] = t.to(dtype)
            out.append(big[..., :D])
        return out
    if layout == "last_dim_stride2":
        out = []
        for t in base:
            big = torch.zeros(B, H, N, 2 * D, dtype=dtype)
            big[..., ::2] = t.to(dtype)
            out.append(big[..., ::2])
        return out
    raise AssertionError(layout)


shapes = st.tuples(st.integers(0, 3), st.integers(1, 3), st.integers(1, 70))


@FAST
@given(shape=shapes, D=st.sampled_from(KERNEL_D), dtype=st.sampled_from(CPU_DTYPES),
       layout=st.sampled_from(LAYOUTS), kind=st.sampled_from(("normal", "huge", "tiny", "nan", "inf", "neg_inf")),
       which=st.integers(0, 2), scale=st.sampled_from((None, 0.5)), seed=st.integers(0, 2**16))
def test_triton_forward_matches_reference(shape, D, dtype, layout, kind, which, scale, seed):
    B, H, N = shape
    if B * H * N * D > 40_000:  # keep the interpreter fast
        N = max(1, 40_000 // (B * H * D + 1))
    q, k, v = _make(B, H, N, D, dtype, layout, seed, SCALE.get(kind, 1.0), kind, which)
    if layout == "last_dim_stride2":
        with pytest.raises(KernelNotSupported, match=r"stride\(-1\)"):
            attention(q, k, v, scale=scale, backend="triton")
        return
    assert attention_not_supported_reasons(q, k, v) == []
    with torch.no_grad():
        got = attention(q, k, v, scale=scale, backend="triton")
        sdpa = attention(q, k, v, scale=scale, backend="sdpa")
        direct = F.scaled_dot_product_attention(q, k, v, scale=scale)  # shares no code with attention()
    ref = attention_ref(q.double(), k.double(), v.double(), scale=scale)
    assert got.dtype == dtype and got.shape == (B, H, N, D)
    assert_matches("out", got, direct, ref, dtype, unit=SCALE.get(kind, 1.0))
    assert_matches("out (sdpa backend)", sdpa, direct, ref, dtype, unit=SCALE.get(kind, 1.0))


@FAST
@given(shape=shapes, D=st.sampled_from(ANY_D + KERNEL_D), dtype=st.sampled_from(CPU_DTYPES + (torch.float64,)),
       layout=st.sampled_from(LAYOUTS), kind=st.sampled_from(("normal", "huge", "tiny", "nan", "inf")),
       which=st.integers(0, 2), seed=st.integers(0, 2**16))
def test_auto_and_sdpa_match_reference(shape, D, dtype, layout, kind, which, seed):
    """backend="auto" on the CPU (SDPA by definition) takes every D >= 1, any strides,
    float64, and gives the reference's answer."""
    B, H, N = shape
    q, k, v = _make(B, H, N, D, dtype, layout, seed, SCALE.get(kind, 1.0), kind, which)
    with torch.no_grad():
        got = attention(q, k, v)
    ref = attention_ref(q.double(), k.double(), v.double())
    same = attention_ref(q, k, v, upcast=False) if dtype != torch.float16 else None
    assert got.shape == (B, H, N, D) and got.dtype == dtype
    # SDPA *is* PyTorch's own answer: compare to float64 with the floor, or 2x eager math
    assert_matches("out", got, same, ref, dtype, unit=SCALE.get(kind, 1.0),
                   atol=None if dtype != torch.float16 else 2e-3)


@SLOW
@given(B=st.integers(1, 2), H=st.integers(1, 2), N=st.integers(1, 45), D=st.sampled_from((16, 24, 64, 72)),
       dtype=st.sampled_from(CPU_DTYPES), layout=st.sampled_from(("contiguous", "packed", "bnhd")),
       seed=st.integers(0, 2**16))
def test_triton_gradients_match_reference(B, H, N, D, dtype, layout, seed):
    q, k, v = _make(B, H, N, D, dtype, layout, seed)
    dout = randn((B, H, N, D), dtype, seed + 7)

    def grads(fn, inputs):
        leaves = [t.detach().requires_grad_() for t in inputs]
        out = fn(*leaves)
        out.backward(dout.to(out.dtype))
        return [out.detach()] + [t.grad for t in leaves]

    got = grads(lambda a, b, c: attention(a, b, c, backend="triton"), (q, k, v))
    sdpa = grads(lambda a, b, c: attention(a, b, c, backend="sdpa"), (q, k, v))
    direct = grads(F.scaled_dot_product_attention, (q, k, v))  # the bound: shares no code with attention()
    ref = grads(attention_ref, [t.double() for t in (q, k, v)])
    for name, g, s, d, r in zip(("out", "dq", "dk", "dv"), got, sdpa, direct, ref):
        assert g.dtype == dtype
        assert_matches(name, g, d, r, dtype)
        assert_matches(name + " (sdpa backend)", s, d, r, dtype)


@FAST
@given(B=st.integers(0, 2), N=st.integers(1, 60), H=st.integers(1, 3), D=st.sampled_from((16, 24, 40)),
       dtype=st.sampled_from(CPU_DTYPES), layout=st.sampled_from(("contiguous", "row_slice", "token_major")),
       kind=st.sampled_from(("normal", "huge", "nan")), backend=st.sampled_from(("triton", "auto")),
       seed=st.integers(0, 2**16))
def test_packed_matches_reference(B, N, H, D, dtype, layout, kind, backend, seed):
    C = 3 * H * D
    s = SCALE.get(kind, 1.0)
    base = randn((B, N, C), torch.float64, seed, scale=s)
    if kind == "nan":  # one NaN anywhere in q, k or v
        base = poison(base, "nan", seed)
    if layout == "contiguous":
        qkv = base.to(dtype)
    elif layout == "row_slice":  # qkv is a slice of a wider buffer: row stride C + 16
        qkv = torch.zeros(B, N, C + 16, dtype=dtype)
        qkv[..., :C] = base.to(dtype)
        qkv = qkv[..., :C]
    else:  # [N, B, C] storage seen as [B, N, C]
        qkv = base.transpose(0, 1).contiguous().to(dtype).transpose(0, 1)
    with torch.no_grad():
        got = attention_packed(qkv, num_heads=H, backend=backend)
    q, k, v = qkv.double().unflatten(-1, (3, H, D)).permute(2, 0, 3, 1, 4).unbind(0)
    ref = attention_ref(q, k, v).transpose(1, 2).reshape(B, N, H * D)
    ql, kl, vl = qkv.unflatten(-1, (3, H, D)).permute(2, 0, 3, 1, 4).unbind(0)
    same = F.scaled_dot_product_attention(ql, kl, vl).transpose(1, 2).reshape(B, N, H * D)
    assert got.shape == (B, N, H * D) and got.dtype == dtype
    assert_matches("out", got, same, ref, dtype, unit=s)


@FAST
@given(B=st.integers(0, 2), H=st.integers(1, 3), N=st.integers(0, 9), D=st.integers(1, 40),
       bad=st.sampled_from(("k_tokens", "v_batch", "q_heads", "v_dim", "k_dtype", "v_int", "rank5", "triton_odd_D")),
       seed=st.integers(0, 2**16))
def test_invalid_shapes_raise_naming_the_argument(B, H, N, D, bad, seed):
    q = k = v = randn((B, H, N, D), torch.float32, seed)
    name = {"k_tokens": "k", "v_batch": "v", "q_heads": "k", "v_dim": "v", "k_dtype": "k", "v_int": "v",
            "rank5": "q", "triton_odd_D": "q.shape[-1]"}[bad]
    backend, exc = "auto", ValueError
    if bad == "k_tokens":
        k = randn((B, H, N + 1, D), torch.float32, seed)
    elif bad == "v_batch":
        v = randn((B + 1, H, N, D), torch.float32, seed)
    elif bad == "q_heads":
        q = randn((B, H + 1, N, D), torch.float32, seed)
    elif bad == "v_dim":
        v = randn((B, H, N, D + 1), torch.float32, seed)
    elif bad == "k_dtype":
        k, exc = k.half(), TypeError
    elif bad == "v_int":
        v, exc = v.to(torch.int32), TypeError
    elif bad == "rank5":
        q = q.unsqueeze(0)
    elif bad == "triton_odd_D":
        if D % 8 == 0 and 16 <= D <= 256:
            D += 1
        q = k = v = randn((B, H, N, D), torch.float32, seed)
        backend = "triton"
    with pytest.raises(exc) as info:
        attention(q, k, v, backend=backend)
    assert name in str(info.value) and "vitfast.attention" in str(info.value), str(info.value)


@FAST
@given(B=st.integers(0, 2), N=st.integers(0, 9), H=st.integers(1, 4), D=st.integers(1, 20),
       extra=st.integers(1, 2), heads_bad=st.booleans())
def test_packed_invalid_raises_naming_the_argument(B, N, H, D, extra, heads_bad):
    C = 3 * H * D + (0 if heads_bad else extra)
    qkv = torch.zeros(B, N, C)
    num_heads = -H if heads_bad else H
    with pytest.raises(ValueError) as info:
        attention_packed(qkv, num_heads=num_heads)
    assert ("num_heads" if heads_bad else "qkv") in str(info.value)


# Regression: PyTorch's CPU SDPA returned finite values where q or k held NaN (flash kernel),
# and 0 instead of NaN for rows whose scores are all -Inf (math kernel's safe softmax, e.g.
# N = 1 with an Inf in q); the CPU SDPA path now computes non-finite q/k explicitly.
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("which, N, D", [(0, 1, 8), (0, 5, 8), (1, 1, 1), (1, 5, 8), (0, 37, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cpu_sdpa_path_propagates_non_finite_qk(which, N, D, value, dtype):
    t = [randn((1, 2, N, D), dtype, i) for i in range(3)]
    t[which][0, 1, 0, 0] = value
    ref = attention_ref(*(x.double() for x in t))
    if value != value:
        assert ref[0, 1].isnan().any()
    for backend in ("sdpa", "auto"):
        assert_matches(f"out[{backend}]", attention(*t, backend=backend), None, ref, dtype)
    qkv = torch.stack(t, 0).permute(1, 3, 0, 2, 4).flatten(2)  # [B, N, 3*H*D], timm's split
    got = attention_packed(qkv, num_heads=2)
    assert_matches("packed", got, None, ref.transpose(1, 2).flatten(2), dtype)


def test_cpu_sdpa_path_non_finite_gradients_flow():
    q, k, v = (randn((1, 2, 5, 8), torch.float32, i).requires_grad_() for i in range(3))
    with torch.no_grad():
        q[0, 0, 1, 2] = float("nan")
    attention(q, k, v).sum().backward()
    assert q.grad[0, 1].isfinite().all() and q.grad[0, 0, 1].isnan().all()


@pytest.mark.parametrize("scale", [0.25, 2, "np_float32", "tensor_0d"])
def test_scale_types(scale):
    import numpy as np

    value = {"np_float32": np.float32(0.25), "tensor_0d": torch.tensor(0.25)}.get(scale, scale)
    q, k, v = (randn((1, 2, 5, 16), torch.float32, i) for i in range(3))
    ref = attention_ref(q.double(), k.double(), v.double(), scale=float(value))
    assert_matches("out", attention(q, k, v, scale=value), None, ref, torch.float32)


def test_triton_propagates_non_finite_q():
    for value in (float("nan"), float("inf")):
        q, k, v = (randn((1, 2, 5, 16), torch.float32, i) for i in range(3))
        q[0, 1, 0, 3] = value
        ref = attention_ref(q.double(), k.double(), v.double())
        assert_matches("out", attention(q, k, v, backend="triton"), None, ref, torch.float32)


# Regression: attention_packed on the SDPA path used .reshape(B, N, -1), which cannot infer -1
# for 0 elements (B = 0 or N = 0).
@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_zero_size_batch_returns_empty_with_gradients(backend):
    q, k, v = (torch.zeros(0, 2, 5, 16, requires_grad=True) for _ in range(3))
    out = attention(q, k, v, backend=backend)
    assert out.shape == (0, 2, 5, 16)
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape
    qkv = torch.zeros(0, 5, 96, requires_grad=True)
    o = attention_packed(qkv, num_heads=2, backend=backend)
    assert o.shape == (0, 5, 32)
    o.sum().backward()
    assert qkv.grad.shape == qkv.shape


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kind", ["normal", "huge", "nan"])
def test_cuda_forward_values_and_layouts(dtype, kind):
    for layout in ("contiguous", "packed", "every_other_token"):
        for N in (1, 197, 577):
            q, k, v = [t.cuda() for t in _make(2, 3, N, 64, dtype, layout, N, SCALE.get(kind, 1.0), kind, 1)]
            got = attention(q, k, v, backend="triton")
            sdpa = attention(q, k, v, backend="sdpa")
            ref = attention_ref(q.double(), k.double(), v.double())
            assert_matches(f"{layout} N={N}", got, sdpa, ref, dtype, unit=SCALE.get(kind, 1.0))


@pytest.mark.parametrize("scale", [None, 0.3])
def test_cpu_sdpa_path_compiles_fullgraph(scale):
    # The non-finite check on the CPU SDPA path is a data-dependent branch: it is skipped while
    # torch.compile traces, so the graph stays whole (and gradients match eager).
    torch._dynamo.reset()
    q, k, v = (randn((2, 2, 7, 16), torch.float32, i).requires_grad_() for i in range(3))
    qkv = randn((2, 7, 96), torch.float32, 9).requires_grad_()

    def fn(a, b, c, x):
        return attention(a, b, c, scale=scale).square().sum() + attention_packed(x, num_heads=2, scale=scale).sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(q, k, v, qkv), (q, k, v, qkv))
    want = torch.autograd.grad(fn(q, k, v, qkv), (q, k, v, qkv))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
