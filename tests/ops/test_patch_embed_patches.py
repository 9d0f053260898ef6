"""The kept patch matrix of vitfast.patch_embed (``torch.ops.vitfast.patch_embed_patches`` and the
``patches`` argument of ``patch_embed`` / ``patch_embed_backward``).

On the CPU, the autograd path makes the normalised patch matrix once in the forward and hands it
to the backward for the weight gradient instead of re-making it from the images. Checked here:
the matrix itself against an unfold of the normalised images in float64, that passing it
changes no result, that the autograd path really passes it (and only on the CPU with a weight
that needs a gradient), the bad inputs, opcheck.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vitfast  # noqa: F401  (registers the ops)
from vitfast.ops import patch_embed
from vitfast.ops.reference import normalize_images_ref

pytestmark = pytest.mark.skipif(not hasattr(torch.ops.vitfast, "patch_embed_patches"),
                                reason="vitfast._C is not built")

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _inputs(uint8: bool, dtype=torch.float64, B=2, C=3, H=16, W=24, p=8, D=10, channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if uint8:
        images = torch.randint(0, 256, (B, C, H, W), generator=g, dtype=torch.uint8)
    else:
        images = torch.randn(B, C, H, W, generator=g, dtype=torch.float64).to(dtype)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(D, C, p, p, generator=g, dtype=torch.float64) * (C * p * p) ** -0.5).to(dtype)
    bias = torch.randn(D, generator=g, dtype=torch.float64).to(dtype)
    cls = torch.randn(1, 1, D, generator=g, dtype=torch.float64).to(dtype)
    pos = torch.randn(1, (H // p) * (W // p) + 1, D, generator=g, dtype=torch.float64).to(dtype)
    return images, weight, bias, cls, pos


def _stats(mean, std):
    return (None, None) if mean is None else (torch.tensor(mean, dtype=torch.float64),
                                              torch.tensor(std, dtype=torch.float64))


def _unfolded(images, p, mean, std, has_cls):
    """[B*T, C*p*p] in float64: the normalised patches in (c, i, j) order, zero class rows."""
    x = normalize_images_ref(images, mean, std, dtype=torch.float64)
    B, C, H, W = x.shape
    X = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, C * p * p)
    if has_cls:
        X = torch.cat([X.new_zeros(B, 1, C * p * p), X], dim=1)
    return X.reshape(-1, C * p * p)


@pytest.mark.parametrize("has_cls", [True, False])
@pytest.mark.parametrize("uint8,norm,channels_last", [(False, True, False), (True, True, True), (False, False, True),
                                                      (True, False, False)])
def test_patches_are_the_normalised_unfold(uint8, norm, channels_last, has_cls):
    images, weight, *_ = _inputs(uint8, channels_last=channels_last)
    mean, std = (MEAN, STD) if norm else (None, None)
    X = torch.ops.vitfast.patch_embed_patches(images, weight, has_cls, *_stats(mean, std))
    assert X.dtype == torch.float64 and X.is_contiguous()
    torch.testing.assert_close(X, _unfolded(images, 8, mean, std, has_cls), rtol=1e-12, atol=1e-12)
    # float32 (and lower) weights: the CPU kernels' compute dtype, float32
    X32 = torch.ops.vitfast.patch_embed_patches(images, weight.to(torch.float16), has_cls, *_stats(mean, std))
    assert X32.dtype == torch.float32
    torch.testing.assert_close(X32.double(), X, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("uint8", [False, True])
def test_given_patches_change_no_result(uint8):
    images, weight, bias, cls, pos = _inputs(uint8)
    mean, std = _stats(MEAN, STD)
    X = torch.ops.vitfast.patch_embed_patches(images, weight, True, mean, std)
    op = torch.ops.vitfast
    out = op.patch_embed(images, weight, bias, cls, pos, mean, std)
    torch.testing.assert_close(op.patch_embed(images, weight, bias, cls, pos, mean, std, X), out, rtol=0, atol=0)
    g = torch.randn_like(out)
    mask = [not uint8, True, True, True, True]
    plain = op.patch_embed_backward(g, images, weight, mean, std, True, pos.shape[1], mask)
    kept = op.patch_embed_backward(g, images, weight, mean, std, True, pos.shape[1], mask, X)
    for a, b in zip(plain, kept):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=0, atol=0)


class _Calls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((str(func.overloadpacket), args))
        return func(*args, **(kwargs or {}))


def _run(images, weight, bias, cls, pos, mean=MEAN, std=STD):
    with _Calls() as mode:
        out = patch_embed(images, weight, bias, cls_token=cls, pos_embed=pos, mean=mean, std=std, backend="kernel")
        if out.requires_grad:
            out.backward(torch.ones_like(out))
    return {name: args for name, args in mode.calls if name.startswith("vitfast.")}


@pytest.mark.parametrize("cpu_strategy", ["gemm"], indirect=True)
def test_autograd_keeps_the_patch_matrix_for_the_weight_gradient(cpu_strategy):
    images, weight, bias, cls, pos = _inputs(False, dtype=torch.float32)
    weight.requires_grad_()
    calls = _run(images, weight, bias, cls, pos)
    assert "vitfast.patch_embed_patches" in calls
    X = calls["vitfast.patch_embed"][7]
    assert isinstance(X, torch.Tensor) and X.shape == (2 * 7, 3 * 64)
    assert calls["vitfast.patch_embed_backward"][8] is X
    # the weight gradient it gives: G^T X against autograd through float64 conv2d
    ref_w = weight.detach().double().requires_grad_()
    ref = torch.nn.functional.conv2d(normalize_images_ref(images, MEAN, STD, dtype=torch.float64), ref_w, stride=8)
    ref.sum().backward()  # ones over the patch rows; the class row adds nothing to the weight
    torch.testing.assert_close(weight.grad.double(), ref_w.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cpu_strategy", ["conv"], indirect=True)
@pytest.mark.parametrize("uint8", [False, True])
def test_conv_strategy_keeps_nothing_and_its_weight_gradient_is_right(uint8, cpu_strategy):
    """oneDNN's convolution needs no patch matrix: none is made, and its weight gradient (the
    convolution's backward over the normalised image) matches float64 autograd."""
    images, weight, bias, cls, pos = _inputs(uint8, dtype=torch.float32, channels_last=uint8)
    weight.requires_grad_()
    calls = _run(images, weight, bias, cls, pos)
    assert "vitfast.patch_embed_patches" not in calls
    assert len(calls["vitfast.patch_embed"]) < 8 or calls["vitfast.patch_embed"][7] is None
    ref_w = weight.detach().double().requires_grad_()
    ref = torch.nn.functional.conv2d(normalize_images_ref(images, MEAN, STD, dtype=torch.float64), ref_w, stride=8)
    ref.sum().backward()
    torch.testing.assert_close(weight.grad.double(), ref_w.grad, rtol=1e-5, atol=1e-5)


def test_float64_weights_keep_the_patch_matrix_under_either_strategy(cpu_strategy):
    """float64 has no oneDNN convolution: the GEMM, and its kept matrix, whatever the strategy."""
    images, weight, bias, cls, pos = _inputs(False, dtype=torch.float64)
    weight.requires_grad_()
    assert "vitfast.patch_embed_patches" in _run(images, weight, bias, cls, pos)


def _x86_vendor():
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), None)
    except OSError:
        return None


def test_cpu_strategy_auto_env_and_bad_name(monkeypatch):
    """auto: oneDNN's convolution on x86 CPUs that are not Intel's (MKL's generic paths there),
    the GEMM elsewhere; VITFAST_CPU_PATCH_EMBED forces one, read at every call."""
    import platform
    from vitfast.ops.patch_embed import _C, set_cpu_strategy

    read = _C.cpu_patch_embed_strategy
    monkeypatch.delenv("VITFAST_CPU_PATCH_EMBED", raising=False)
    vendor = _x86_vendor() if platform.machine() in ("x86_64", "AMD64", "i686") else None
    if vendor is not None:
        amd_like = vendor != "GenuineIntel" and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
        assert read() == ("conv" if amd_like else "gemm"), vendor
    for name in ("gemm", "conv"):
        monkeypatch.setenv("VITFAST_CPU_PATCH_EMBED", name)
        assert read() == name
    with pytest.raises(ValueError, match="name must be one of"):
        set_cpu_strategy("fast")


@pytest.mark.parametrize("why", ["no_grad", "weight_frozen"])
def test_no_patch_matrix_without_a_weight_gradient(why):
    images, weight, bias, cls, pos = _inputs(True, dtype=torch.float32)
    bias.requires_grad_()
    if why == "no_grad":
        weight.requires_grad_()
        with torch.no_grad():
            calls = _run(images, weight, bias, cls, pos)
    else:
        calls = _run(images, weight, bias, cls, pos)
    assert "vitfast.patch_embed_patches" not in calls
    assert len(calls["vitfast.patch_embed"]) < 8 or calls["vitfast.patch_embed"][7] is None


def test_bad_patches_name_the_argument():
    images, weight, bias, cls, pos = _inputs(False, dtype=torch.float32)
    X = torch.ops.vitfast.patch_embed_patches(images, weight, True)
    op = torch.ops.vitfast
    with pytest.raises(ValueError, match="patches must be \\[14, 192\\]"):
        op.patch_embed(images, weight, bias, cls, pos, None, None, X[1:])
    with pytest.raises(ValueError, match="patches must be \\[12, 192\\]"):  # made with a class row, used without
        op.patch_embed(images, weight, bias, None, None, None, None, X)
    with pytest.raises(TypeError, match="patches must be Double"):
        op.patch_embed(images, weight.double(), None, cls, None, None, None, X)
    with pytest.raises(ValueError, match="patches must be contiguous"):
        op.patch_embed(images, weight, bias, cls, pos, None, None, X.t().contiguous().t())
    g = torch.randn(2, 7, 10)
    with pytest.raises(ValueError, match="patches must be"):
        op.patch_embed_backward(g, images, weight, None, None, True, 7, [False, True, False, False, False], X[:3])
    with pytest.raises(ValueError, match="images must be"):
        op.patch_embed_patches(images[0], weight, True)


@pytest.mark.parametrize("has_cls", [True, False])
def test_opcheck(has_cls):
    images, weight, *_ = _inputs(True, dtype=torch.float32)
    torch.library.opcheck(torch.ops.vitfast.patch_embed_patches, (images, weight, has_cls, *_stats(MEAN, STD)))
    images, weight, bias, cls, pos = _inputs(False, dtype=torch.float32)
    X = torch.ops.vitfast.patch_embed_patches(images, weight, True)
    torch.library.opcheck(torch.ops.vitfast.patch_embed,
                          (images, weight.requires_grad_(), bias, cls, pos, None, None, X))


def test_torch_compile_fullgraph_training_step_matches_eager():
    torch._dynamo.reset()
    images, weight, bias, cls, pos = _inputs(False, dtype=torch.float32)
    params = [t.requires_grad_() for t in (weight, bias, cls, pos)]

    def step(images):
        return patch_embed(images, *params[:2], cls_token=params[2], pos_embed=params[3], mean=MEAN, std=STD)

    eager = step(images)
    (eager * eager).sum().backward()
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    compiled = torch.compile(step, fullgraph=True)(images)
    (compiled * compiled).sum().backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for p, g in zip(params, grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-5)
