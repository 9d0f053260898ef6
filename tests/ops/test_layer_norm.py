"""vitfast.ops.layer_norm (residual add + LayerScale + LayerNorm) against a float64
reference with the 2x rule (see _fused_testing), gradients of every input included.

On the CPU the kernels run under the Triton interpreter (fp32, fp16), each program costing
milliseconds, so shapes keep M * C small while covering every hidden-size class (tiny, odd,
ViT widths up to 1664 = ViT-bigG) and several row blocks/chunks. Tests marked ``cuda``
redo the checks in bf16/fp16/fp32 at full ViT sizes and compile with Inductor.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import triton

from _fused_testing import CPU_DTYPES, DEV, GPU_DTYPES, check, randn
from vitfast._dispatch import KernelNotSupported, reset_warnings
from vitfast.ops import _fused_common
from vitfast.ops.triton import fused as _fused_kernels
from vitfast.ops.layer_norm import (MAX_LN_HIDDEN, add_layer_norm, add_layer_norm_not_supported_reasons,
                                    add_layer_norm_ref, layer_norm, layer_norm_not_supported_reasons, layer_norm_ref)

NAMES = ("x", "y", "gamma", "y_bias", "weight", "bias")


def _inputs(lead, C, dtype, parts=NAMES, vec_dtype=None, seed=0, y_dtype=None):
    """x, y and the vectors (None unless in ``parts``); x has a mean offset so the
    centring matters; gamma is LayerScale-sized."""
    shape = (*lead, C)
    vd = vec_dtype or dtype
    make = {
        "x": lambda: randn(shape, dtype, seed, scale=2.0, shift=0.5),
        "y": lambda: randn(shape, y_dtype or dtype, seed + 1),
        "gamma": lambda: randn((C,), vd, seed + 2, scale=0.3, shift=0.1),
        "y_bias": lambda: randn((C,), vd, seed + 3, scale=0.5),
        "weight": lambda: randn((C,), vd, seed + 4, scale=0.5, shift=1.0),
        "bias": lambda: randn((C,), vd, seed + 5, scale=0.5),
    }
    return [make[n]() if n in parts else None for n in NAMES]


def _add_ln(backend, eps=1e-6, out_dtype=None):
    def fn(x, y, gamma, y_bias, weight, bias):
        if backend == "ref":  # the float64 reference keeps float64 h
            od = None if x.dtype == torch.float64 else out_dtype
            return add_layer_norm_ref(x, y, gamma, weight, bias, eps, y_bias=y_bias, out_dtype=od)
        return add_layer_norm(x, y, gamma, weight, bias, eps, y_bias=y_bias, out_dtype=out_dtype, backend=backend)
    return fn


def _check_add_ln(lead, C, dtype, parts=NAMES, backward=True, **kw):
    inputs = _inputs(lead, C, dtype, parts, **{k: v for k, v in kw.items() if k in ("vec_dtype", "y_dtype")})
    out_dtype = kw.get("out_dtype")
    # tolerances of the least precise dtype involved
    tol = max((dtype, kw.get("y_dtype") or dtype, out_dtype or dtype), key=lambda d: torch.finfo(d).eps)
    check(_add_ln("triton", out_dtype=out_dtype), _add_ln("ref", out_dtype=out_dtype), NAMES, inputs, tol,
          ("x_out", "h"), backward=backward)


# ----------------------------------------------------------------- numerics on the CPU
# (leading dims, C): tiny and odd hidden sizes, ViT widths (192 ViT-Ti, 768 ViT-B,
# 1408 ViT-g, 1664 ViT-bigG), 1-D to 4-D inputs, rows not a multiple of the row block.
# Every row is split into up to three power-of-two column chunks (ln_chunks): one (1, 4100 = 4096 + 4
# has two), two (192, 768, 1280 = 1024 + 256, 1408 -> 1024 + 512), three (7, 100, 1664).
SHAPES = [((3, 17), 1), ((3, 17), 7), ((2, 50), 192), ((37,), 768), ((2, 9), 1280), ((1, 23), 1408),
          ((2, 7), 1664), ((2, 3, 5), 100), ((5,), 4100)]


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("lead,C", SHAPES, ids=lambda v: str(v))
def test_add_layer_norm_matches_reference(lead, C, dtype):
    _check_add_ln(lead, C, dtype)


@pytest.mark.parametrize("parts", [
    ("x", "y"),  # plain residual add, LayerNorm without affine parameters
    ("x", "y", "gamma", "weight", "bias"),  # timm Block with LayerScale
    ("x", "y", "y_bias", "weight"),  # projection bias folded in, LN without bias
    ("x", "y", "gamma", "y_bias", "bias"),
], ids=lambda p: "+".join(p))
def test_optional_parts(parts):
    _check_add_ln((2, 29), 200, torch.float16, parts)


@pytest.mark.parametrize("parts", [("x", "y"), ("x", "y", "gamma", "weight", "bias"), ("x", "y", "y_bias", "weight")],
                         ids=lambda p: "+".join(p))
def test_optional_parts_two_chunks(parts):
    """Each optional tensor's gradient in the second column chunk too (1280 = 1024 + 256)."""
    _check_add_ln((3, 5), 1280, torch.float32, parts)


def test_autocast_style_mixed_dtypes():
    """fp32 residual stream and parameters, fp16 branch, fp16 h (what autocast feeds)."""
    _check_add_ln((2, 19), 192, torch.float32, y_dtype=torch.float16, out_dtype=torch.float16)
    _check_add_ln((2, 19), 192, torch.float16, vec_dtype=torch.float32)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("lead,C", [((2, 50), 192), ((2, 9), 1280), ((1, 23), 1408), ((3, 17), 7)], ids=str)
def test_layer_norm_matches_reference(lead, C, dtype):
    x, _, _, _, w, b = _inputs(lead, C, dtype)
    check(lambda x, w, b: layer_norm(x, w, b, 1e-5, backend="triton"),
          lambda x, w, b: layer_norm_ref(x, w, b, 1e-5), ("x", "weight", "bias"), [x, w, b], dtype, ("h",))


def test_layer_norm_without_affine_and_out_dtype():
    x = _inputs((2, 11), 96, torch.float32)[0]
    check(lambda x: layer_norm(x, out_dtype=torch.float16, backend="triton"),
          lambda x: layer_norm_ref(x, out_dtype=None if x.dtype == torch.float64 else torch.float16),
          ("x",), [x], torch.float16, ("h",))


def test_gradcheck_float64():
    """The kernels compute in fp64 for fp64 inputs, so gradcheck runs on them."""
    ins = [t.requires_grad_() for t in _inputs((2, 3), 9, torch.float64)]
    assert torch.autograd.gradcheck(_add_ln("triton", eps=1e-5), ins, fast_mode=True)
    x, _, _, _, w, b = ins
    assert torch.autograd.gradcheck(lambda x, w, b: layer_norm(x, w, b, backend="triton"), (x, w, b),
                                    fast_mode=True)


def test_statistics_are_returned_and_fp32():
    x, y, g, yb, w, b = _inputs((4, 10), 64, torch.float16)
    x_out, h, mean, rstd = torch.ops.vitfast.add_layer_norm_fwd(x, y, g, yb, w, b, 1e-6, None)
    ref = x_out.double().reshape(-1, 64)
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == (40,)
    torch.testing.assert_close(mean.double(), ref.mean(-1), rtol=0, atol=1e-5)
    torch.testing.assert_close(rstd.double(), (ref.var(-1, unbiased=False) + 1e-6).rsqrt(), rtol=1e-5, atol=0)


# ------------------------------------------- inputs where eps decides the answer (issue 19)
# (x scale, x shift, eps): near-constant rows (variance 1e-6 beside eps 1e-6), tiny-scale rows
# (variance 1e-10: eps dominates), and a large eps on ordinary rows. eps inside the square root
# (1 / sqrt(var + eps)) and eps outside it (1 / (sqrt(var) + eps)) differ by 1.4x to 100x here.
_EPS_REGIMES = {"near_constant": (1e-3, 3.0, 1e-6), "tiny_scale": (1e-5, 0.0, 1e-6), "large_eps": (1.0, 0.5, 0.1)}


def _eps_inputs(regime, op, dtype, lead=(2, 13), C=96):
    scale, shift, eps = _EPS_REGIMES[regime]
    x = randn((*lead, C), dtype, 11, scale=scale, shift=shift)
    w, b = randn((C,), dtype, 12, scale=0.5, shift=1.0), randn((C,), dtype, 13, scale=0.5)
    if op == "layer_norm":
        return eps, [x, w, b]
    # add_layer_norm normalises x + gamma * (y + y_bias): the sum carries the regime
    y = randn((*lead, C), dtype, 14, scale=scale)
    return eps, [x, y, randn((C,), dtype, 15, scale=0.1, shift=1.0), randn((C,), dtype, 16, scale=scale), w, b]


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("regime", list(_EPS_REGIMES))
@pytest.mark.parametrize("op", ["layer_norm", "add_layer_norm"])
def test_eps_regimes_match_reference(op, regime, dtype):
    """Outputs and gradients by the 2x rule where eps matters."""
    eps, ins = _eps_inputs(regime, op, dtype)
    if op == "layer_norm":
        check(lambda x, w, b: layer_norm(x, w, b, eps, backend="triton"),
              lambda x, w, b: layer_norm_ref(x, w, b, eps), ("x", "weight", "bias"), ins, dtype, ("h",))
    else:
        check(lambda x, y, g, yb, w, b: add_layer_norm(x, y, g, w, b, eps, y_bias=yb, backend="triton"),
              lambda x, y, g, yb, w, b: add_layer_norm_ref(x, y, g, w, b, eps, y_bias=yb),
              ("x", "y", "gamma", "y_bias", "weight", "bias"), ins, dtype, ("x_out", "h"))


@pytest.mark.parametrize("dtype", CPU_DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("regime", list(_EPS_REGIMES))
@pytest.mark.parametrize("op", ["layer_norm", "add_layer_norm"])
def test_rstd_is_one_over_sqrt_of_var_plus_eps(op, regime, dtype):
    """The saved statistics themselves, tightly: rstd = 1 / sqrt(var + eps) of the normalised
    rows (fp32 statistics, fp64 for fp64 inputs) to a few ulps."""
    eps, ins = _eps_inputs(regime, op, dtype)
    if op == "layer_norm":
        x, w, b = ins
        h, mean, rstd = torch.ops.vitfast.layer_norm_fwd(x, w, b, eps, None)
        rows = x.double().reshape(-1, x.shape[-1])
    else:
        x, y, g, yb, w, b = ins
        x_out, h, mean, rstd = torch.ops.vitfast.add_layer_norm_fwd(x, y, g, yb, w, b, eps, None)
        rows = x_out.double().reshape(-1, x.shape[-1])
    want = (rows.var(-1, unbiased=False) + eps).rsqrt()
    # fp64: eps reaches the kernel as an fp32 scalar (Triton's JIT types Python floats fp32), 7e-10 off
    rtol = 1e-8 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(rstd.double(), want, rtol=rtol, atol=0)
    torch.testing.assert_close(mean.double(), rows.mean(-1), rtol=rtol, atol=rtol * rows.abs().max().item())


# ------------------------------------------------------------------- layouts and grads
def test_strided_inputs_and_expanded_gradients():
    C = 130
    base = randn((2, 2 * C, 9), torch.float32, 1)
    x = base[:, :C].transpose(1, 2)  # [2, 9, C], last-dim stride 9
    y = randn((9, C), torch.float32, 2).expand(2, 9, C)  # stride 0 over the batch
    w = randn((2 * C,), torch.float32, 3)[::2]  # stride 2
    xs, ys, ws = (t.clone().requires_grad_() for t in (x, y, w))
    x_out, h = add_layer_norm(xs, ys, None, ws, None, backend="triton")
    (x_out.sum() + h.sum()).backward()  # gradients of stride 0 everywhere
    xr, yr, wr = (t.detach().double().requires_grad_() for t in (x, y, w))
    x_ref, h_ref = add_layer_norm_ref(xr, yr, None, wr, None)
    (x_ref.sum() + h_ref.sum()).backward()
    assert x_out.is_contiguous() and h.is_contiguous()
    for got, want in ((x_out, x_ref), (h, h_ref), (xs.grad, xr.grad), (ys.grad, yr.grad), (ws.grad, wr.grad)):
        torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-5)


def test_only_one_output_used():
    x, y, g, yb, w, b = (t.requires_grad_() for t in _inputs((3, 8), 40, torch.float32))
    x_out, _ = add_layer_norm(x, y, g, w, b, y_bias=yb, backend="triton")
    (x_out * 2).sum().backward()  # h unused
    torch.testing.assert_close(y.grad, (2 * g).detach().expand(3, 8, 40))
    assert w.grad is not None and torch.count_nonzero(w.grad) == 0


def test_backward_is_deterministic():
    ins = _inputs((3, 97), 768, torch.float32)
    douts = [randn((3, 97, 768), torch.float32, 7), randn((3, 97, 768), torch.float32, 8)]
    results = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in ins]
        torch.autograd.backward(_add_ln("triton")(*leaves), douts)
        results.append([t.grad for t in leaves])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_empty_rows():
    x, y, g, yb, w, b = (t.requires_grad_() for t in _inputs((0, 5), 32, torch.float32))
    x_out, h = add_layer_norm(x, y, g, w, b, y_bias=yb, backend="triton")
    assert x_out.shape == h.shape == (0, 5, 32)
    (x_out.sum() + h.sum()).backward()
    assert w.grad.shape == (32,) and torch.count_nonzero(w.grad) == 0
    assert layer_norm(x.detach(), w, b, backend="triton").shape == (0, 5, 32)


def test_tile_heuristics_cover_all_sizes():
    for C in (1, 7, 192, 768, 1408, 1664, 4100, MAX_LN_HIDDEN):
        for itemsize in (2, 4):
            bm, chunks, warps = _fused_kernels.ln_fwd_config(C, itemsize)
            assert chunks == _fused_kernels.ln_chunks(C) and bm >= 1 and bm & (bm - 1) == 0 and warps in (4, 8, 16)
        bm, bc = _fused_kernels.ew_block(C)
        assert bc >= 1 and bm >= 1
    for C in list(range(1, 2100)) + [4100, 8191, MAX_LN_HIDDEN]:
        chunks = _fused_kernels.ln_chunks(C)
        used = [c for c in chunks if c]
        # powers of two, largest first, zeros only at the end, covering C with at most 1/8 of the
        # lanes idle (or C's own power of two, when that wastes no more)
        assert len(chunks) == 3 and used == list(chunks[:len(used)]) and used == sorted(used, reverse=True), C
        assert all(c & (c - 1) == 0 for c in used) and sum(used) >= C, (C, chunks)
        assert 8 * (sum(used) - C) <= sum(used) or sum(used) <= triton.next_power_of_2(C), (C, chunks)
        assert sum(used) - used[-1] < C, (C, chunks)  # the last chunk is needed
        for itemsize in (2, 4, 8):
            bm, ch, warps = _fused_kernels.ln_bwd_config(C, itemsize)
            assert ch == chunks and bm >= 1 and bm & (bm - 1) == 0 and warps in (4, 8, 16)
    assert _fused_kernels.ln_chunks(1280) == (1024, 256, 0) and _fused_kernels.ln_chunks(768) == (512, 256, 0)
    assert _fused_kernels.ln_chunks(1408) == (1024, 512, 0) and _fused_kernels.ln_chunks(1664) == (1024, 512, 128)
    assert _fused_kernels.ln_chunks(1024) == (1024, 0, 0) and _fused_kernels.ln_chunks(1000) == (1024, 0, 0)
    assert _fused_kernels._row_chunks(10, 4, 3) == (3, 4)
    P, per = _fused_kernels._row_chunks(1000, 16, 3)
    assert P * per >= 1000 and per % 16 == 0 and (P - 1) * per < 1000


# ------------------------------------------------------------------ dispatch, errors
def test_auto_on_cpu_is_reference_without_warning():
    x, y, g, yb, w, b = [t.cpu() for t in _inputs((2, 5), 16, torch.float64)]
    reset_warnings()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = add_layer_norm(x, y, g, w, b, y_bias=yb)
        h = layer_norm(x, w, b)
    want = add_layer_norm_ref(x, y, g, w, b, y_bias=yb)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(h, layer_norm_ref(x, w, b))


def test_auto_falls_back_with_one_warning(monkeypatch):
    """What a CUDA input the kernel cannot serve does (a hidden size over the limit)."""
    monkeypatch.setattr(_fused_common, "auto_is_reference", lambda device: False)
    reset_warnings()
    x = torch.randn(2, MAX_LN_HIDDEN + 1)
    with pytest.warns(RuntimeWarning, match="hidden size"):
        x_out, h = add_layer_norm(x, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        add_layer_norm(x, x)  # warned once only
    torch.testing.assert_close(h, layer_norm_ref(2 * x))


def test_forced_backends():
    x = torch.randn(2, MAX_LN_HIDDEN + 1)
    with pytest.raises(KernelNotSupported, match=r"x.shape\[-1\] \(hidden size\) is 16385"):
        add_layer_norm(x, x, backend="triton")
    with pytest.raises(KernelNotSupported, match="hidden size"):
        layer_norm(x, backend="triton")
    torch.testing.assert_close(layer_norm(x, backend="reference"), layer_norm_ref(x))
    with pytest.raises(ValueError, match="backend must be one of"):
        add_layer_norm(x, x, backend="apex")


def test_reasons():
    x = torch.randn(2, 3, 64, device=DEV)
    w = torch.randn(64, device=DEV)
    assert add_layer_norm_not_supported_reasons(x, x, w, w, w, y_bias=w) == []
    assert layer_norm_not_supported_reasons(x, w, w) == []
    if _fused_kernels.INTERPRET:
        r = add_layer_norm_not_supported_reasons(x, x.bfloat16())
        assert any("y has dtype torch.bfloat16" in m and "interpreter" in m for m in r)
        r = layer_norm_not_supported_reasons(x, out_dtype=torch.bfloat16)
        assert any("out_dtype" in m for m in r)
    assert any("x.shape[-1] (hidden size)" in m for m in layer_norm_not_supported_reasons(torch.empty(1, 20000)))
    assert any("y has shape" in m for m in add_layer_norm_not_supported_reasons(x, x[0]))


def _bad_cases():
    x, y, g = torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.randn(8)
    return {
        "x_not_tensor": (dict(x=x.tolist()), TypeError, r"x must be a torch.Tensor"),
        "y_int": (dict(y=y.long()), TypeError, r"y has dtype torch.int64; expected a floating-point dtype"),
        "y_shape": (dict(y=y[:, :4]), ValueError, r"y has shape \[2, 4, 8\] but x has \[2, 5, 8\]"),
        "gamma_shape": (dict(gamma=torch.randn(7)), ValueError, r"gamma has shape \[7\]; expected \[8\]"),
        "weight_2d": (dict(weight=g[None]), ValueError, r"weight has shape \[1, 8\]; expected \[8\]"),
        "bias_type": (dict(bias=[0.0] * 8), TypeError, r"bias must be a torch.Tensor or None, got list"),
        "y_bias_device": (dict(y_bias=g.to("meta")), ValueError, r"y_bias is on meta but x is on cpu"),
        "scalar_x": (dict(x=torch.tensor(1.0), y=torch.tensor(1.0)), ValueError,
                     r"x must have a hidden \(last\) dimension of size >= 1"),
        "empty_hidden": (dict(x=x[..., :0], y=y[..., :0]), ValueError, r"hidden \(last\) dimension"),
        "eps": (dict(eps=-1.0), ValueError, r"eps must be a non-negative float, got -1.0"),
        "out_dtype": (dict(out_dtype=torch.int32), TypeError, r"out_dtype must be None or a floating-point"),
    }, dict(x=x, y=y, gamma=g, weight=g, bias=g, y_bias=g)


@pytest.mark.parametrize("backend", ["auto", "triton", "reference"])
@pytest.mark.parametrize("case", list(_bad_cases()[0]))
def test_bad_inputs_raise_naming_the_argument(case, backend):
    cases, good = _bad_cases()
    change, exc, match = cases[case]
    with pytest.raises(exc, match=match):
        add_layer_norm(**{**good, **change}, backend=backend)
    if not set(change) & {"y", "gamma", "y_bias"}:
        kw = {k: v for k, v in {**good, **change}.items() if k in ("x", "weight", "bias", "eps", "out_dtype")}
        with pytest.raises(exc, match=match.replace("add_layer_norm", "layer_norm")):
            layer_norm(**kw, backend=backend)


# ------------------------------------------------------------------- registration
def test_opcheck_all_ops():
    x, y, g, yb, w, b = _inputs((2, 9), 40, torch.float32)
    x_out, h, mean, rstd = torch.ops.vitfast.add_layer_norm_fwd(x, y, g, yb, w, b, 1e-6, None)
    dxo, dh = torch.randn_like(x_out), torch.randn_like(h)
    _, m2, r2 = torch.ops.vitfast.layer_norm_fwd(x, w, b, 1e-6, None)
    cases = [
        (torch.ops.vitfast.add_layer_norm_fwd.default, (x.requires_grad_(), y, g, yb, w, b, 1e-6, None)),
        (torch.ops.vitfast.add_layer_norm_fwd.default, (x, y.requires_grad_(), None, None, None, None, 1e-5,
                                                        torch.float16)),
        (torch.ops.vitfast.add_layer_norm_bwd.default, (dxo, dh, x_out, y.detach(), g.detach(), yb, w.detach(),
                                                        torch.float32, mean, rstd, torch.float32)),
        (torch.ops.vitfast.add_layer_norm_bwd.default, (None, dh, x_out, None, None, None, None, None,
                                                        mean, rstd, None)),
        (torch.ops.vitfast.layer_norm_fwd.default, (x.detach(), w.requires_grad_(), b, 1e-6, None)),
        (torch.ops.vitfast.layer_norm_bwd.default, (dh, x.detach(), w.detach(), torch.float32, m2, r2)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compile_backend):
    """On the CPU the ops are opaque custom_ops (interpreted kernels cannot be traced by
    wrap_triton); test_compiled_block_cuda compiles the triton_ops with Inductor."""
    torch._dynamo.reset()
    C = 48
    lin = torch.nn.Linear(C, C).to(DEV)
    ln = torch.nn.LayerNorm(C).to(DEV)
    gamma = torch.nn.Parameter(torch.full((C,), 0.5, device=DEV))

    def block(x):
        y = torch.nn.functional.linear(layer_norm(x, ln.weight, ln.bias, backend="triton"), lin.weight)
        x, h = add_layer_norm(x, y, gamma, ln.weight, ln.bias, 1e-5, y_bias=lin.bias, backend="triton")
        return (x.square().mean() + h.square().mean())

    params = [lin.weight, lin.bias, ln.weight, ln.bias, gamma]
    x = torch.randn(2, 10, C, device=DEV)
    compiled = torch.compile(block, fullgraph=True, backend=compile_backend)
    loss_c = compiled(x)
    grads_c = torch.autograd.grad(loss_c, params)
    loss_e = block(x)
    grads_e = torch.autograd.grad(loss_e, params)
    torch.testing.assert_close(loss_c, loss_e)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b)


# -------------------------------------------------------------------------- GPU
# ViT widths at 224 px (197 tokens): Ti 192, S 384, B 768, L 1024, H 1280, g 1408,
# G 1664, plus odd ones.
# Every width in bf16, two in fp16 and fp32 (each width/dtype compiles its own kernels).
GPU_WIDTHS = [192, 384, 768, 1024, 1280, 1408, 1664, 100, 1000, 4100, 8192]
GPU_CASES = [(C, torch.bfloat16) for C in GPU_WIDTHS] + [(C, dt) for dt in GPU_DTYPES[1:] for C in (768, 1408)]


@pytest.mark.cuda
@pytest.mark.parametrize("C,dtype", GPU_CASES, ids=str)
def test_vit_widths_cuda(C, dtype):
    _check_add_ln((8, 197), C, dtype)
    x, _, _, _, w, b = _inputs((8, 197), C, dtype)
    check(lambda x, w, b: layer_norm(x, w, b, backend="triton"), lambda x, w, b: layer_norm_ref(x, w, b),
          ("x", "weight", "bias"), [x, w, b], dtype, ("h",))


@pytest.mark.cuda
def test_autocast_mixed_dtypes_cuda():
    _check_add_ln((16, 197), 768, torch.float32, y_dtype=torch.bfloat16, out_dtype=torch.bfloat16)
    _check_add_ln((16, 197), 1024, torch.bfloat16, vec_dtype=torch.float32)


@pytest.mark.cuda
def test_many_rows_cuda():
    """256 x 197 rows: ViT-B/16's batch 256."""
    _check_add_ln((256, 197), 768, torch.bfloat16)


@pytest.mark.cuda
def test_64bit_row_offsets_cuda():
    """M * C > 2**31: the last rows (compared with an fp32 chain on just those rows) are right."""
    M, C = 2**21 + 3, 1040
    x = torch.randn(M, C, device="cuda", dtype=torch.bfloat16)
    y = torch.randn_like(x)
    w, b = torch.rand(C, device="cuda") + 0.5, torch.randn(C, device="cuda")
    with torch.no_grad():
        x_out, h = add_layer_norm(x, y, None, w, b)
        tail = slice(M - 777, M)
        want_x, want_h = add_layer_norm_ref(x[tail], y[tail], None, w, b, upcast=True)
        torch.testing.assert_close(x_out[tail], want_x, rtol=0, atol=0)
        torch.testing.assert_close(h[tail].float(), want_h.float(), rtol=1.6e-2, atol=1.6e-2)


@pytest.mark.cuda
def test_opcheck_cuda():
    test_opcheck_all_ops()
    x, y, g, yb, w, b = _inputs((2, 9), 40, torch.bfloat16)
    torch.library.opcheck(torch.ops.vitfast.add_layer_norm_fwd.default, (x, y, g, yb, w, b, 1e-6, None))


@pytest.mark.cuda
def test_compiled_block_cuda():
    """Inductor sees the triton_ops' kernels; compiled and eager agree (fwd and bwd)."""
    test_torch_compile_fullgraph("inductor")
    torch._dynamo.reset()
    x, y, g, yb, w, b = (t.requires_grad_() for t in _inputs((8, 197), 768, torch.bfloat16))
    fn = lambda *a: add_layer_norm(*a[:2], a[2], a[4], a[5], y_bias=a[3])  # noqa: E731
    eager = fn(x, y, g, yb, w, b)
    compiled = torch.compile(fn, fullgraph=True)(x, y, g, yb, w, b)
    for a, e in zip(compiled, eager):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


@pytest.mark.cuda
def test_cuda_graph_replay_cuda():
    x, y, g, yb, w, b = _inputs((4, 197), 768, torch.bfloat16)
    fn = lambda x, y: add_layer_norm(x, y, g, w, b, y_bias=yb)  # noqa: E731
    sx, sy = x.clone(), y.clone()
    fn(sx, sy)  # compile the kernels outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = fn(sx, sy)
    for seed in (10, 20):
        nx, ny = _inputs((4, 197), 768, torch.bfloat16, seed=seed)[:2]
        sx.copy_(nx)
        sy.copy_(ny)
        graph.replay()
        for got, want in zip(outs, fn(nx, ny)):
            assert torch.equal(got, want)


# --------------------------------------------------------------------- benchmark
def test_benchmark_rows_smoke():
    """The fused-epilogue microbenchmark (vitfast.cli.kernels.fused) runs and its rows carry what
    the results files need."""
    from vitfast.cli.kernels import fused as bench

    rows = bench.collect_rows(ops=["add_layer_norm", "bias_scale_residual"], impls=["vitfast", "eager"],
                              modes=["fwd", "fwd+bwd"], device=DEV, warmup=0, iters=1, smoke=True)
    assert [(r["op"], r["mode"], r["impl"]) for r in rows[:4]] == [
        ("add_layer_norm", "fwd", "vitfast"), ("add_layer_norm", "fwd", "eager"),
        ("add_layer_norm", "fwd+bwd", "vitfast"), ("add_layer_norm", "fwd+bwd", "eager")]
    C, H, N, B, _ = bench.SMOKE_MODELS["smoke"]
    es = 4 if DEV == "cpu" else 2
    assert rows[0]["bytes"] == 4 * B * N * C * es and rows[2]["bytes"] == 10 * B * N * C * es
    for r in rows:
        assert r["status"] == "ok" and r["ms"] > 0 and r["gbps"] >= 0
        assert {"device", "torch", "triton", "vitfast", "date", "command", "copy_gbps_measured"} <= set(r)
    assert "speedup_vs_eager" in rows[0] and "GB/s" in bench.format_table(rows)
