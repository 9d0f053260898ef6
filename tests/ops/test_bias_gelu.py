"""vitfast.ops.bias_gelu (bias + exact/tanh GELU) against a float64 reference with the 2x
rule (see _fused_testing), gradients of x and bias included. CPU: Triton interpreter,
fp32/fp16; ``cuda`` tests: bf16/fp16/fp32 at ViT MLP sizes, Inductor, CUDA graphs."""

from __future__ import annotations

import warnings

import pytest
import torch
import triton

from _fused_testing import CPU_DTYPES, DEV, GPU_DTYPES, check, randn
from vitfast._dispatch import KernelNotSupported, reset_warnings
from vitfast.ops import _fused_common
from vitfast.ops.triton import fused as _fused_kernels
from vitfast.ops.bias_gelu import bias_gelu, bias_gelu_not_supported_reasons, bias_gelu_ref


def _inputs(lead, C, dtype, bias=True, bias_dtype=None, seed=0):
    # |x| up to ~6: both tails of GELU and its derivative matter
    x = randn((*lead, C), dtype, seed, scale=2.0)
    return x, randn((C,), bias_dtype or dtype, seed + 1, scale=0.5) if bias else None


def _check(lead, C, dtype, approximate="none", **kw):
    x, b = _inputs(lead, C, dtype, **kw)
    check(lambda x, b: bias_gelu(x, b, approximate, backend="triton"),
          lambda x, b: bias_gelu_ref(x, b, approximate), ("x", "bias"), [x, b], dtype, ("out",))


# ----------------------------------------------------------------- numerics on the CPU
# MLP hidden widths: 4 x (192, 384, 768) and ViT-g's 6144 = 4.36 x 1408, plus odd ones.
# Rows cross several row blocks; widths cross several column tiles and a ragged last one.
SHAPES = [((3, 17), 1), ((3, 7), 5), ((2, 25), 768), ((1, 9), 3072), ((37,), 1000), ((2, 3, 4), 1408),
          ((3,), 6144)]


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("lead,C", SHAPES, ids=str)
def test_bias_gelu_matches_reference(lead, C, dtype):
    _check(lead, C, dtype)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("lead,C", [((2, 25), 768), ((3, 7), 5)], ids=str)
def test_tanh_approximation(lead, C, dtype):
    _check(lead, C, dtype, "tanh")


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_without_bias(approximate):
    _check((2, 21), 300, torch.float16, approximate, bias=False)


def test_fp32_bias_on_fp16_activations():
    """Autocast: fp16 matmul output, fp32 bias parameter; the result stays fp16."""
    _check((2, 21), 300, torch.float16, bias_dtype=torch.float32)


def test_gradcheck_float64():
    for approximate in ("none", "tanh"):
        x, b = (t.requires_grad_() for t in _inputs((2, 3), 11, torch.float64))
        assert torch.autograd.gradcheck(lambda x, b: bias_gelu(x, b, approximate, backend="triton"), (x, b),
                                        fast_mode=True)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # numpy, in the interpreter
def test_large_magnitudes_saturate_exactly():
    x = torch.tensor([[-40.0, -10.0, -3.0, 0.0, 3.0, 10.0, 40.0]], device=DEV)
    for approximate in ("none", "tanh"):
        got = bias_gelu(x, approximate=approximate, backend="triton")
        torch.testing.assert_close(got, torch.nn.functional.gelu(x, approximate=approximate), rtol=1e-6, atol=1e-6)
        assert torch.isfinite(got).all()


# ------------------------------------------------------------------- layouts and grads
def test_strided_input_and_expanded_gradient():
    base = randn((2, 9, 2 * 70), torch.float32, 3)
    x = base[..., ::2]  # last-dim stride 2
    b = randn((70,), torch.float32, 4)
    xs, bs = x.clone().requires_grad_(), b.clone().requires_grad_()
    bias_gelu(xs, bs, backend="triton").sum().backward()
    xr, br = x.double().requires_grad_(), b.double().requires_grad_()
    bias_gelu_ref(xr, br).sum().backward()
    torch.testing.assert_close(xs.grad.double(), xr.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bs.grad.double(), br.grad, rtol=1e-5, atol=1e-5)


def test_backward_is_deterministic():
    x, b = _inputs((5, 41), 3072, torch.float32)
    dout = randn((5, 41, 3072), torch.float32, 9)
    grads = []
    for _ in range(2):
        xs, bs = x.clone().requires_grad_(), b.clone().requires_grad_()
        bias_gelu(xs, bs, backend="triton").backward(dout)
        grads.append((xs.grad, bs.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_empty_rows():
    x, b = (t.requires_grad_() for t in _inputs((0, 3), 16, torch.float32))
    out = bias_gelu(x, b, backend="triton")
    out.sum().backward()
    assert out.shape == (0, 3, 16) and b.grad.shape == (16,) and torch.count_nonzero(b.grad) == 0


# ------------------------------------------------------------------ dispatch, errors
def test_auto_on_cpu_is_reference_without_warning():
    x, b = (t.cpu() for t in _inputs((2, 5), 16, torch.float64))
    reset_warnings()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(bias_gelu(x, b), bias_gelu_ref(x, b))


@pytest.mark.skipif(not _fused_kernels.INTERPRET, reason="needs an input the kernel refuses (bf16 interpreted)")
def test_auto_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(_fused_common, "auto_is_reference", lambda device: False)
    reset_warnings()
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="interpreter"):
        out = bias_gelu(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bias_gelu(x)
    assert torch.equal(out, bias_gelu_ref(x))
    with pytest.raises(KernelNotSupported, match="bfloat16"):
        bias_gelu(x, backend="triton")


def test_reasons():
    x, b = _inputs((2, 3), 64, torch.float32)
    assert bias_gelu_not_supported_reasons(x, b) == []
    assert any("bias has shape [3]" in r for r in bias_gelu_not_supported_reasons(x, b[:3]))


@pytest.mark.parametrize("backend", ["auto", "triton", "reference"])
@pytest.mark.parametrize("kw,exc,match", [
    (dict(x=[1.0, 2.0]), TypeError, r"x must be a torch.Tensor, got list"),
    (dict(x=torch.ones(2, 4, dtype=torch.int32)), TypeError, r"x has dtype torch.int32"),
    (dict(bias=torch.ones(5)), ValueError, r"bias has shape \[5\]; expected \[4\]"),
    (dict(bias=torch.ones(4, dtype=torch.int64)), TypeError, r"bias has dtype torch.int64"),
    (dict(bias=torch.ones(4, device="meta")), ValueError, r"bias is on meta but x is on cpu"),
    (dict(x=torch.tensor(1.0)), ValueError, r"x must have a hidden \(last\) dimension"),
    (dict(approximate="erf"), ValueError, r"approximate must be one of \['none', 'tanh'\], got 'erf'"),
], ids=["list", "int", "bias_shape", "bias_int", "bias_device", "scalar", "approximate"])
def test_bad_inputs_raise_naming_the_argument(kw, exc, match, backend):
    args = {"x": torch.randn(2, 4), "bias": torch.randn(4), **kw}
    with pytest.raises(exc, match=match):
        bias_gelu(**args, backend=backend)
    with pytest.raises(ValueError, match="backend must be one of"):
        bias_gelu(torch.randn(2, 4), backend="cublas")


# ------------------------------------------------------------------- registration
def test_opcheck_all_ops():
    x, b = _inputs((2, 9), 40, torch.float32)
    dout = torch.randn_like(x)
    for approximate in ("none", "tanh"):
        torch.library.opcheck(torch.ops.vitfast.bias_gelu_fwd.default, (x.requires_grad_(), b, approximate))
        torch.library.opcheck(torch.ops.vitfast.bias_gelu_fwd.default, (x.detach(), None, approximate))
        torch.library.opcheck(torch.ops.vitfast.bias_gelu_bwd.default, (dout, x.detach(), b, approximate))


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compile_backend):
    torch._dynamo.reset()
    fc1 = torch.nn.Linear(24, 96).to(DEV)
    fc2 = torch.nn.Linear(96, 24).to(DEV)

    def mlp(x):
        return fc2(bias_gelu(torch.nn.functional.linear(x, fc1.weight), fc1.bias, backend="triton")).square().mean()

    x = torch.randn(2, 10, 24, device=DEV)
    params = list(fc1.parameters()) + list(fc2.parameters())
    loss_c = torch.compile(mlp, fullgraph=True, backend=compile_backend)(x)
    grads_c = torch.autograd.grad(loss_c, params)
    loss_e = mlp(x)
    grads_e = torch.autograd.grad(loss_e, params)
    torch.testing.assert_close(loss_c, loss_e)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b)


# -------------------------------------------------------------------------- GPU
# MLP widths in bf16 with both GELUs; fp16 and fp32 on two widths.
GPU_CASES = [(C, torch.bfloat16, a) for C in (768, 1536, 3072, 4096, 5120, 6144, 8192, 1000, 100)
             for a in ("none", "tanh")] + [(C, dt, "none") for dt in GPU_DTYPES[1:] for C in (3072, 6144)]


@pytest.mark.cuda
@pytest.mark.parametrize("C,dtype,approximate", GPU_CASES, ids=str)
def test_mlp_widths_cuda(C, dtype, approximate):
    _check((8, 197), C, dtype, approximate)


@pytest.mark.cuda
def test_many_rows_cuda():
    _check((256, 197), 3072, torch.bfloat16, bias_dtype=torch.float32)


@pytest.mark.cuda
def test_opcheck_and_compile_cuda():
    test_opcheck_all_ops()
    test_torch_compile_fullgraph("inductor")
    torch._dynamo.reset()
    x, b = _inputs((8, 197), 3072, torch.bfloat16)
    fn = lambda x, b: bias_gelu(x, b)  # noqa: E731
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(x, b), fn(x, b), rtol=0, atol=0)


def test_column_blocks_fit_cuda_grid_axis_1():
    """The column-tiled kernels put their column blocks on grid axis 1 (CUDA: at most 65535):
    wider rows are refused with a reason (auto falls back), never launched into a CUDA error."""
    from vitfast.ops.bias_gelu import bias_gelu_not_supported_reasons
    from vitfast.ops.bias_scale_residual import bias_scale_residual_not_supported_reasons
    from vitfast.ops.triton import fused as fk

    ok = torch.empty(fk.MAX_EW_COLUMNS, device="meta")
    wide = torch.empty(fk.MAX_EW_COLUMNS + 1, device="meta")
    assert not any("grid axis 1" in r for r in bias_gelu_not_supported_reasons(ok))
    assert any("grid axis 1" in r for r in bias_gelu_not_supported_reasons(wide))
    assert any("grid axis 1" in r for r in bias_scale_residual_not_supported_reasons(wide, wide))
    for C in (257, 4096, 1_000_003, fk.MAX_EW_COLUMNS):  # the GPU's tiles (ew_block off the interpreter)
        interp, fk.INTERPRET = fk.INTERPRET, False
        try:
            assert triton.cdiv(C, fk.ew_block(C)[1]) <= 65535, C
        finally:
            fk.INTERPRET = interp
