"""vitfast.ops.bias_scale_residual (bias + LayerScale + residual add) against a float64 reference with
the 2x rule (see _fused_testing), gradients of x, y, bias and gamma included. CPU: Triton
interpreter, fp32/fp16; ``cuda`` tests: bf16/fp16/fp32 at ViT sizes, Inductor."""

from __future__ import annotations

import warnings

import pytest
import torch

from _fused_testing import CPU_DTYPES, DEV, GPU_DTYPES, check, randn
from vitfast._dispatch import reset_warnings
from vitfast.ops.bias_scale_residual import bias_scale_residual, bias_scale_residual_not_supported_reasons, bias_scale_residual_ref

NAMES = ("x", "y", "bias", "gamma")


def _inputs(lead, C, dtype, parts=NAMES, vec_dtype=None, x_dtype=None, seed=0):
    shape = (*lead, C)
    make = {
        "x": lambda: randn(shape, x_dtype or dtype, seed, scale=3.0),
        "y": lambda: randn(shape, dtype, seed + 1),
        "bias": lambda: randn((C,), vec_dtype or dtype, seed + 2, scale=0.5),
        "gamma": lambda: randn((C,), vec_dtype or dtype, seed + 3, scale=0.3, shift=0.1),
    }
    return [make[n]() if n in parts else None for n in NAMES]


def _check(lead, C, dtype, parts=NAMES, **kw):
    ins = _inputs(lead, C, dtype, parts, **kw)
    check(lambda *a: bias_scale_residual(*a, backend="triton"), bias_scale_residual_ref, NAMES, ins, dtype, ("out",))


SHAPES = [((3, 17), 1), ((3, 7), 7), ((2, 25), 192), ((37,), 768), ((1, 9), 1408), ((2, 3, 4), 1664),
          ((3,), 5000)]


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("lead,C", SHAPES, ids=str)
def test_bias_scale_residual_matches_reference(lead, C, dtype):
    _check(lead, C, dtype)


@pytest.mark.parametrize("parts", [("x", "y"), ("x", "y", "bias"), ("x", "y", "gamma")], ids="+".join)
def test_optional_parts(parts):
    _check((2, 21), 300, torch.float16, parts)


def test_autocast_style_mixed_dtypes():
    """fp32 residual stream and parameters, fp16 matmul output: the result is fp32."""
    _check((2, 21), 300, torch.float16, x_dtype=torch.float32, vec_dtype=torch.float32)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("gamma_scale", [1e-5, 1.0, 30.0], ids=["dinov2_init", "one", "large"])
def test_layer_scale_magnitudes(gamma_scale, dtype):
    """LayerScale from DINOv2's 1e-5 initialisation to large trained values: gamma is applied
    once, to (y + bias), and its gradient is sum(dout * (y + bias)) at every magnitude."""
    x, y, b, _ = _inputs((2, 21), 300, dtype)
    g = randn((300,), dtype, 9, scale=0.2 * gamma_scale, shift=gamma_scale)
    check(lambda *a: bias_scale_residual(*a, backend="triton"), bias_scale_residual_ref, NAMES, [x, y, b, g], dtype,
          ("out",))


def test_gradcheck_float64():
    ins = [t.requires_grad_() for t in _inputs((2, 3), 11, torch.float64)]
    assert torch.autograd.gradcheck(lambda *a: bias_scale_residual(*a, backend="triton"), ins, fast_mode=True)


def test_residual_gradient_is_the_output_gradient():
    x, y, b, g = (t.requires_grad_() for t in _inputs((2, 5), 16, torch.float32))
    dout = torch.randn(2, 5, 16, device=DEV)
    bias_scale_residual(x, y, b, g, backend="triton").backward(dout)
    assert torch.equal(x.grad, dout)
    torch.testing.assert_close(y.grad, dout * g.detach())


def test_strided_inputs_and_expanded_gradient():
    x = randn((2, 2 * 70, 9), torch.float32, 5)[:, :70].transpose(1, 2)
    y = randn((9, 70), torch.float32, 6).expand(2, 9, 70)
    b, g = randn((70,), torch.float32, 7), randn((70,), torch.float32, 8)
    leaves = [t.clone().requires_grad_() for t in (x, y, b, g)]
    bias_scale_residual(*leaves, backend="triton").sum().backward()
    refs = [t.double().requires_grad_() for t in (x, y, b, g)]
    bias_scale_residual_ref(*refs).sum().backward()
    for a, r in zip(leaves, refs):
        torch.testing.assert_close(a.grad.double(), r.grad, rtol=1e-5, atol=1e-5)


def test_backward_is_deterministic():
    ins = _inputs((5, 41), 768, torch.float32)
    dout = randn((5, 41, 768), torch.float32, 9)
    grads = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in ins]
        bias_scale_residual(*leaves, backend="triton").backward(dout)
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_only_some_inputs_need_grad():
    x, y, b, g = _inputs((3, 4), 32, torch.float32)
    g.requires_grad_()
    bias_scale_residual(x, y, b, g, backend="triton").sum().backward()
    torch.testing.assert_close(g.grad, (y + b).sum((0, 1)), rtol=1e-5, atol=1e-5)


def test_empty_rows():
    x, y, b, g = (t.requires_grad_() for t in _inputs((0, 2), 8, torch.float32))
    out = bias_scale_residual(x, y, b, g, backend="triton")
    out.sum().backward()
    assert out.shape == (0, 2, 8) and g.grad.shape == (8,) and torch.count_nonzero(b.grad) == 0


def test_auto_on_cpu_is_reference_without_warning():
    ins = [t.cpu() for t in _inputs((2, 5), 16, torch.float64)]
    reset_warnings()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(bias_scale_residual(*ins), bias_scale_residual_ref(*ins))


def test_reasons():
    x, y, b, g = _inputs((2, 3), 64, torch.float32)
    assert bias_scale_residual_not_supported_reasons(x, y, b, g) == []
    assert any("gamma has shape [2]" in r for r in bias_scale_residual_not_supported_reasons(x, y, b, g[:2]))


@pytest.mark.parametrize("backend", ["auto", "triton", "reference"])
@pytest.mark.parametrize("kw,exc,match", [
    (dict(x=None), TypeError, r"x must be a torch.Tensor, got NoneType"),
    (dict(y=torch.ones(2, 4, dtype=torch.int32)), TypeError, r"y has dtype torch.int32"),
    (dict(y=torch.ones(4)), ValueError, r"y has shape \[4\] but x has \[2, 4\]"),
    (dict(bias=torch.ones(2, 4)), ValueError, r"bias has shape \[2, 4\]; expected \[4\]"),
    (dict(gamma=torch.ones(3)), ValueError, r"gamma has shape \[3\]; expected \[4\]"),
    (dict(gamma=torch.ones(4, device="meta")), ValueError, r"gamma is on meta but x is on cpu"),
], ids=["none", "int", "y_shape", "bias_shape", "gamma_shape", "gamma_device"])
def test_bad_inputs_raise_naming_the_argument(kw, exc, match, backend):
    args = {"x": torch.randn(2, 4), "y": torch.randn(2, 4), "bias": torch.randn(4), "gamma": torch.randn(4), **kw}
    with pytest.raises(exc, match=match):
        bias_scale_residual(**args, backend=backend)


def test_opcheck_all_ops():
    x, y, b, g = _inputs((2, 9), 40, torch.float32)
    dout = torch.randn_like(x)
    torch.library.opcheck(torch.ops.vitfast.bias_scale_residual_fwd.default, (x.requires_grad_(), y, b, g))
    torch.library.opcheck(torch.ops.vitfast.bias_scale_residual_fwd.default, (x.detach(), y.requires_grad_(), None,
                                                                             None))
    torch.library.opcheck(torch.ops.vitfast.bias_scale_residual_bwd.default,
                          (dout, y.detach(), b, g, torch.float32, True))
    torch.library.opcheck(torch.ops.vitfast.bias_scale_residual_bwd.default,
                          (dout, None, b, None, torch.float16, False))


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compile_backend):
    torch._dynamo.reset()
    fc = torch.nn.Linear(32, 32).to(DEV)
    gamma = torch.nn.Parameter(torch.full((32,), 0.1, device=DEV))

    def step(x):
        y = torch.nn.functional.linear(torch.tanh(x), fc.weight)
        return bias_scale_residual(x, y, fc.bias, gamma, backend="triton").square().mean()

    x = torch.randn(2, 10, 32, device=DEV)
    params = [fc.weight, fc.bias, gamma]
    loss_c = torch.compile(step, fullgraph=True, backend=compile_backend)(x)
    grads_c = torch.autograd.grad(loss_c, params)
    loss_e = step(x)
    grads_e = torch.autograd.grad(loss_e, params)
    torch.testing.assert_close(loss_c, loss_e)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b)


GPU_CASES = [(C, torch.bfloat16) for C in (192, 384, 768, 1024, 1280, 1408, 1664, 100, 1000)] + [
    (C, dt) for dt in GPU_DTYPES[1:] for C in (768, 1408)]


@pytest.mark.cuda
@pytest.mark.parametrize("C,dtype", GPU_CASES, ids=str)
def test_vit_widths_cuda(C, dtype):
    _check((8, 197), C, dtype)


@pytest.mark.cuda
def test_autocast_and_many_rows_cuda():
    _check((256, 197), 768, torch.bfloat16, x_dtype=torch.float32, vec_dtype=torch.float32)


@pytest.mark.cuda
def test_opcheck_and_compile_cuda():
    test_opcheck_all_ops()
    test_torch_compile_fullgraph("inductor")
