"""Property tests for the fused Block ops (layer_norm, add_layer_norm, bias_gelu,
bias_scale_residual): Triton kernels under the interpreter, and the reference path.

Generated: 0-3 leading dims of size 0..4 (so zero-size inputs), hidden sizes 1..130 (odd ones
and tails of every block), fp32/fp16 rows with vectors in their own dtype, layouts
contiguous / every-other-column / transposed leading dims; values normal, scaled by 1e4 /
1e-4, one NaN / +Inf / -Inf. Valid inputs match the float64 chain within 2x the eager
chain's own error; NaN/Inf propagate as the reference's.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _prop_utils import CPU_DTYPES, FAST, SCALE, SLOW, assert_matches, poison, randn

# the fused kernels are cheap under the interpreter: more examples for the same time
MANY = settings(FAST, max_examples=120)
SOME = settings(SLOW, max_examples=40)
from vitfast.ops.bias_gelu import bias_gelu, bias_gelu_ref
from vitfast.ops.layer_norm import add_layer_norm, add_layer_norm_ref, layer_norm, layer_norm_ref
from vitfast.ops.bias_scale_residual import bias_scale_residual, bias_scale_residual_ref

LAYOUTS = ("contiguous", "every_other_column", "transposed_lead")
OPS = ("layer_norm", "add_layer_norm", "bias_gelu_none", "bias_gelu_tanh", "bias_scale_residual")


def _rows(lead, C, dtype, layout, seed, scale, kind="normal"):
    x = poison(randn((*lead, C), torch.float64, seed, scale=scale, shift=0.3 * scale), kind, seed).to(dtype)
    if layout == "every_other_column":
        big = torch.zeros(*lead, 2 * C, dtype=dtype)
        big[..., ::2] = x
        return big[..., ::2]
    if layout == "transposed_lead" and len(lead) >= 2:
        return x.transpose(0, 1).contiguous().transpose(0, 1)
    return x


def _call(op, backend, x, y, v, approximate=None):
    """(outputs, reference function with the same signature) for one op."""
    gamma, vb, w, b = v
    if op == "layer_norm":
        return (lambda x, y, g, vb, w, b: layer_norm(x, w, b, backend=backend),
                lambda x, y, g, vb, w, b, upcast=False: layer_norm_ref(x, w, b, upcast=upcast))
    if op == "add_layer_norm":
        return (lambda x, y, g, vb, w, b: add_layer_norm(x, y, g, w, b, y_bias=vb, backend=backend),
                lambda x, y, g, vb, w, b, upcast=False: add_layer_norm_ref(x, y, g, w, b, y_bias=vb, upcast=upcast))
    if op.startswith("bias_gelu"):
        a = op.rsplit("_", 1)[1]
        return (lambda x, y, g, vb, w, b: bias_gelu(x, vb, a, backend=backend),
                lambda x, y, g, vb, w, b, upcast=False: bias_gelu_ref(x, vb, a, upcast=upcast))
    return (lambda x, y, g, vb, w, b: bias_scale_residual(x, y, vb, g, backend=backend),
            lambda x, y, g, vb, w, b, upcast=False: bias_scale_residual_ref(x, y, vb, g, upcast=upcast))


def _as_tuple(o):
    return o if isinstance(o, tuple) else (o,)


@st.composite
def cases(draw, backward=False):
    lead = draw(st.lists(st.integers(1 if backward else 0, 4), min_size=0 if not backward else 1, max_size=3))
    return dict(
        op=draw(st.sampled_from(OPS)), lead=tuple(lead),
        C=draw(st.sampled_from((1, 2, 3, 7, 16, 33, 64, 100, 130))),
        dtype=draw(st.sampled_from(CPU_DTYPES)),
        vec_dtype=draw(st.sampled_from((None, torch.float32))),
        vectors=draw(st.lists(st.booleans(), min_size=4, max_size=4)),
        layout=draw(st.sampled_from(LAYOUTS)),
        kind=draw(st.sampled_from(("normal",) if backward else ("normal", "huge", "tiny", "nan", "inf", "neg_inf"))),
        which=draw(st.integers(0, 1)),
        backend=draw(st.sampled_from(("triton",) if backward else ("triton", "triton", "reference"))),
        seed=draw(st.integers(0, 2**16)),
    )


def _inputs(c):
    lead, C, dt, s = c["lead"], c["C"], c["dtype"], SCALE.get(c["kind"], 1.0)
    kinds = [c["kind"] if c["which"] == i else "normal" for i in range(2)]
    x = _rows(lead, C, dt, c["layout"], c["seed"], s, kinds[0])
    y = _rows(lead, C, dt, c["layout"], c["seed"] + 1, s, kinds[1])
    vd = c["vec_dtype"] or dt
    vec = [randn((C,), vd, c["seed"] + 2 + i, scale=0.5, shift=1.0 if i == 2 else 0.0) if on else None
           for i, on in enumerate(c["vectors"])]
    return x, y, vec


def _unit(c):
    return SCALE.get(c["kind"], 1.0) if not c["op"].endswith("norm") else 1.0


@MANY
@given(c=cases())
def test_forward_matches_reference(c):
    x, y, vec = _inputs(c)
    kernel, ref_fn = _call(c["op"], c["backend"], x, y, vec)
    with torch.no_grad():
        got = _as_tuple(kernel(x, y, *vec))
        eager = _as_tuple(ref_fn(x, y, *vec))
        ref = _as_tuple(ref_fn(*(None if t is None else t.double() for t in (x, y, *vec))))
    for i, (g, e, r) in enumerate(zip(got, eager, ref)):
        assert g.dtype == x.dtype and g.shape == x.shape, (i, g.dtype, g.shape)
        # eager fp16 arithmetic on the CPU is not a fair bar: the floor (2 fp16 steps) is the bound
        assert_matches(f"{c['op']}[{i}]", g, e if x.dtype != torch.float16 else None, r, x.dtype, unit=_unit(c),
                       atol=None if x.dtype != torch.float16 else 2e-3)


@SOME
@given(c=cases(backward=True))
def test_gradients_match_reference(c):
    x, y, vec = _inputs(c)
    kernel, ref_fn = _call(c["op"], c["backend"], x, y, vec)
    names = ("x", "y", "gamma", "y_bias", "weight", "bias")

    def run(fn, cast):
        leaves = [None if t is None else t.detach().to(cast or t.dtype).requires_grad_() for t in (x, y, *vec)]
        outs = _as_tuple(fn(*leaves))
        douts = [randn(o.shape, x.dtype, c["seed"] + 20 + i).to(o.dtype) for i, o in enumerate(outs)]
        torch.autograd.backward(outs, douts)
        return [None if t is None else t.grad for t in leaves]

    got = run(kernel, None)
    ref = run(ref_fn, torch.float64)
    for name, g, r, src in zip(names, got, ref, (x, y, *vec)):
        if src is None or r is None:
            continue
        assert g is not None, f"no gradient for {name}"
        atol = 2e-3 if src.dtype == torch.float16 else 2e-5
        # vector gradients sum over every row: allow for the row count
        rows = max(1, x.numel() // c["C"]) if name not in ("x", "y") else 1
        assert_matches("d" + name, g, None, r, src.dtype, atol=atol * rows ** 0.5)
