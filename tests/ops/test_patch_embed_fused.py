"""The fused Triton patch embedding (vitfast::patch_embed_fused and its backward).

On the CPU under the Triton interpreter (fp32 and fp16: the interpreter has no bf16): forward
and every gradient against the float64 reference by the 2x rule (the kernel's error at most
twice eager PyTorch's own error in the same dtype, plus a small floor), uint8 and float images,
with and without mean/std, class token and both position layouts, NCHW (vector loads) and
channels_last; opcheck of both ops; the dispatch between the fused kernel and the C++ op. The
forward and gradients run twice: the weight tiles by TMA (device-side descriptors, which the
interpreter emulates with their zero fill) and by pointer loads. GPU
(``cuda`` mark): the same rule in bf16 at a ViT-B/16 shape for every config the forward
autotunes over, and the fused kernel against the three-kernel C++ path.
"""

from __future__ import annotations

import unittest.mock

import pytest
import torch

from vitfast._dispatch import KernelNotSupported
from vitfast.ops.patch_embed import (_patch_embed_fused, _patch_embed_fused_backward, _stats, patch_embed,
                                     patch_embed_fused_not_supported_reasons)
from vitfast.ops.reference import patch_embed_ref
from vitfast.ops.triton import patch_embed as tk

from test_patch_embed import Case, call, make_inputs, max_err

# the floor on top of 2x PyTorch's own error, relative to max(1, |ref|max)
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
LOW = [torch.float32, torch.float16]  # what the interpreter runs

CASES = [
    Case(B=2, H=32, W=48, p=16, D=48),  # float NCHW, p = 16: 16-wide vector loads
    Case(B=1, H=32, W=32, p=16, D=32, uint8=True),  # raw pixels, ImageNet-normalised
    Case(B=2, H=28, W=28, p=14, D=80, uint8=True, norm=False, pos="patches"),  # p = 14: K tail, no_embed_class
    Case(B=2, H=48, W=32, p=16, D=32, cls=False, pos="full", norm=False, channels_last=True),
    Case(B=1, H=28, W=42, p=14, D=48, bias=False, pos=None),
]


def _fused(a):
    return call(lambda *x, **k: patch_embed(*x, backend="fused", **k), a)


@pytest.fixture(params=[True, False], ids=["w_tma", "w_pointer"])
def weight_tma(request, monkeypatch):
    """The weight's TMA path allowed or not (tk.set_weight_tma) for one test; yields (allowed, the
    W_TMA flag of every fused launch that takes one)."""
    previous = tk.set_weight_tma(request.param)
    seen = []
    wrap = tk._wrap

    def spy(kernel):
        launcher = wrap(kernel)

        def grid(g):
            def run(*args, **kwargs):
                if "W_TMA" in kwargs:
                    seen.append(kwargs["W_TMA"])
                return launcher[g](*args, **kwargs)
            return run
        return type("Spy", (), {"__getitem__": lambda self, g: grid(g)})()

    monkeypatch.setattr(tk, "_wrap", spy)
    yield request.param, seen
    tk.set_weight_tma(previous)


def _tma_readable(case, dtype) -> bool:
    """TMA can read the weight [D, C*p*p]: rows a multiple of 16 bytes (not p = 14 in fp16)."""
    return 3 * case.p * case.p * torch.finfo(dtype).bits // 8 % 16 == 0


def _check_path(weight_tma, case, dtype):
    allowed, seen = weight_tma
    assert seen and set(seen) == {allowed and _tma_readable(case, dtype)}, seen


def _leaves(a, dtype):
    out = dict(a)
    for name in ("images", "weight", "bias", "cls_token", "pos_embed"):
        t = a[name]
        if t is not None and t.is_floating_point():
            out[name] = t.to(dtype).detach().requires_grad_()
    return out


def _grads(fn, a, g):
    out = call(fn, a)
    out.backward(g.to(out.dtype))
    return {k: a[k].grad for k in ("images", "weight", "bias", "cls_token", "pos_embed")
            if isinstance(a[k], torch.Tensor) and a[k].requires_grad}


def _check(name, got, torch_own, ref, dtype):
    err, own = max_err(got, ref), max_err(torch_own, ref)
    bound = 2 * own + ATOL[dtype] * max(1.0, ref.abs().max().item())
    assert err <= bound, f"{name}: error {err:.3g} > 2 x torch's {own:.3g} + floor (bound {bound:.3g})"


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_2x_rule(case, dtype, weight_tma):
    a64 = make_inputs(case)
    a = make_inputs(case, dtype)
    ref = call(patch_embed_ref, a64)
    out = _fused(a)
    assert out.dtype == dtype and out.shape == ref.shape
    _check("tokens", out, call(patch_embed_ref, a), ref, dtype)
    _check_path(weight_tma, case, dtype)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("case", CASES[:3] + CASES[4:], ids=str)
def test_gradients_2x_rule(case, dtype, weight_tma):
    a64 = _leaves(make_inputs(case), torch.float64)
    ref = call(patch_embed_ref, a64)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    want = _grads(patch_embed_ref, a64, g)
    got = _grads(lambda *x, **k: patch_embed(*x, backend="fused", **k), _leaves(make_inputs(case, dtype), dtype), g)
    own = _grads(patch_embed_ref, _leaves(make_inputs(case, dtype), dtype), g)
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == own[k].dtype and got[k].shape == want[k].shape, k
        _check(f"d{k}", got[k], own[k], want[k], dtype)
    _check_path(weight_tma, case, dtype)  # the forward's, and the image gradient's (float images)


def test_image_gradient_channels_last_and_weight_gradient_deterministic():
    case = CASES[3]
    a64 = _leaves(make_inputs(case), torch.float64)
    g = torch.randn(call(patch_embed_ref, a64).shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    want = _grads(patch_embed_ref, a64, g)
    runs = [_grads(lambda *x, **k: patch_embed(*x, backend="fused", **k),
                   _leaves(make_inputs(case, torch.float32), torch.float32), g) for _ in range(2)]
    own = _grads(patch_embed_ref, _leaves(make_inputs(case, torch.float32), torch.float32), g)
    assert runs[0]["images"].is_contiguous(memory_format=torch.channels_last)
    for k in want:
        _check(f"d{k}", runs[0][k], own[k], want[k], torch.float32)
        assert torch.equal(runs[0][k], runs[1][k]), f"d{k} differs between two runs"


def test_mixed_dtypes_and_mean_std_tensors():
    """fp32 images with fp16 parameters and fp32 bias/pos (an fp32 parameter under autocast),
    mean/std as tensors: as the reference in the weight's dtype."""
    case = Case(B=2, H=32, W=32, p=16, D=32)
    a64 = make_inputs(case)
    a = make_inputs(case, torch.float16, img_dtype=torch.float32)
    a["bias"], a["pos_embed"] = a64["bias"].float(), a64["pos_embed"].float()
    a["mean"], a["std"] = torch.tensor(a64["mean"]), torch.tensor(a64["std"], dtype=torch.float64)
    out = _fused(a)
    assert out.dtype == torch.float16
    _check("tokens", out, call(patch_embed_ref, a), call(patch_embed_ref, a64), torch.float16)


def test_strided_parameters_and_channel_stats():
    """bias, class token and mean/std given as strided or expanded views (shape-checked only): the
    kernels read dense vectors, so the op makes them contiguous. Without that: errors of 3-4 in the
    tokens, a wrong image gradient, and an expanded float64 mean read past its one-element storage."""
    case = Case(B=2, H=32, W=32, p=16, D=32)
    base = make_inputs(case, torch.float32)
    D, C = base["weight"].shape[:2]
    base["bias"] = torch.randn(2 * D)[::2]
    base["cls_token"] = torch.randn(1, 1, 2 * D)[..., ::2]
    table = torch.tensor([list(base["mean"]), list(base["std"])], dtype=torch.float64).t()  # columns: strided
    half = torch.tensor([0.5], dtype=torch.float64)
    g = torch.randn(2, 5, D)
    for mean, std in ((table[:, 0], table[:, 1]), (half.expand(C), (half / 2).expand(C))):
        a = _leaves(dict(base, mean=mean, std=std), torch.float32)
        a64 = _leaves(dict(base, mean=mean.tolist(), std=std.tolist()), torch.float64)
        out, want = _fused(a), call(patch_embed_ref, a64)
        assert max_err(out, want) < 1e-4, max_err(out, want)
        out.backward(g)
        want.backward(g.double())
        for k in ("images", "weight", "bias", "cls_token", "pos_embed"):
            assert max_err(a[k].grad, a64[k].grad) < 1e-4, (k, max_err(a[k].grad, a64[k].grad))


def test_image_offsets_must_fit_32_bits():
    """A channel-major view ([C, B, H, W] permuted) has a channel stride of B*H*W: 32-bit offsets
    inside one image wrap long before the image has 2**31 elements."""
    w = torch.empty(8, 3, 16, 16, device="meta")
    ok = torch.empty_strided((1, 3, 16, 16), (768, 256, 16, 1), dtype=torch.uint8, device="meta")
    assert not any("32-bit" in r for r in patch_embed_fused_not_supported_reasons(ok, w))
    wide = torch.empty_strided((1, 3, 16, 16), (256, 2**30, 16, 1), dtype=torch.uint8, device="meta")
    assert any("offsets inside an image are 32-bit" in r for r in patch_embed_fused_not_supported_reasons(wide, w))


def test_autocast_as_the_eager_chain_under_autocast():
    """Under autocast (fp16 here: the interpreter has no bf16) the fused op runs its GEMM in the
    autocast dtype and adds the float32 class token and positions in float32: float32 tokens, as
    the eager chain's cat and add give; without them, tokens in the autocast dtype."""
    case = Case(B=2, H=32, W=48, p=16, D=32)
    a = _leaves(make_inputs(case, torch.float32), torch.float32)
    with torch.autocast("cpu", dtype=torch.float16):
        out = _fused(a)
        eager = call(patch_embed_ref, a)
        bare = patch_embed(a["images"], a["weight"], a["bias"], mean=a["mean"], std=a["std"], backend="fused")
    assert out.dtype == eager.dtype == torch.float32 and bare.dtype == torch.float16
    cast = {k: a[k].detach().half().double() for k in ("weight", "bias")}
    exact = call(patch_embed_ref, dict(a, images=a["images"].detach().double(), **cast,
                                       cls_token=a["cls_token"].detach().double(),
                                       pos_embed=a["pos_embed"].detach().double()))
    assert max_err(out, exact) <= 2 * max_err(eager, exact) + 1e-6
    out.sum().backward()
    assert a["weight"].grad.dtype == torch.float32
    torch.testing.assert_close(a["pos_embed"].grad, torch.full_like(a["pos_embed"], 2.0), rtol=0, atol=0)


def test_batch_zero_and_class_rows_only():
    a = make_inputs(Case(B=0, H=32, W=32, p=16, D=32), torch.float32)
    assert _fused(a).shape == (0, 5, 32)
    a = _leaves(make_inputs(Case(B=2, H=0, W=32, p=16, D=16, pos="full"), torch.float32), torch.float32)
    out = _fused(a)  # no patches: the class token rows only
    torch.testing.assert_close(out, (a["cls_token"] + a["pos_embed"]).expand(2, 1, 16), rtol=0, atol=0)
    out.sum().backward()
    assert torch.equal(a["weight"].grad, torch.zeros_like(a["weight"]))
    assert torch.equal(a["cls_token"].grad, torch.full_like(a["cls_token"], 2.0))


def test_zero_width_embedding_backward():
    """D = 0: empty tokens, and a backward of zeros and empty gradients (the weight gradient's
    launch had no tiles: a ZeroDivisionError splitting the rows over them)."""
    a = _leaves(make_inputs(Case(B=2, H=32, W=32, p=16, D=0), torch.float32), torch.float32)
    out = _fused(a)
    assert out.shape == (2, 5, 0)
    out.sum().backward()
    for n in ("images", "weight", "bias", "cls_token", "pos_embed"):
        g = a[n].grad
        assert g is not None and g.shape == a[n].shape and not g.any(), n


# ------------------------------------------------------------------ registration, dispatch
def _op_args(a):
    return (a["images"], a["weight"], a["bias"], a["cls_token"], a["pos_embed"],
            _stats(a["mean"], a["images"].device), _stats(a["std"], a["images"].device))


@pytest.mark.parametrize("case", [Case(B=1, H=16, W=32, p=16, D=16),
                                  Case(B=2, H=14, W=14, p=14, D=16, uint8=True, pos="patches")], ids=str)
def test_opcheck(case):
    a = _leaves(make_inputs(case, torch.float32), torch.float32)
    args = _op_args(a)
    torch.library.opcheck(_patch_embed_fused, args)
    out = _patch_embed_fused(*args)
    g = torch.randn_like(out)
    mask = [a["images"].is_floating_point(), True, True, True, True]
    P = a["pos_embed"].shape[1]
    torch.library.opcheck(_patch_embed_fused_backward, (g, args[0].detach(), args[1].detach(), args[5], args[6],
                                                        True, P, mask))


def test_torch_compile_fullgraph():
    case = Case(B=1, H=16, W=32, p=16, D=16, uint8=True)
    a = make_inputs(case, torch.float32)
    f = torch.compile(lambda *x, **k: patch_embed(*x, backend="fused", **k), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(call(f, a), _fused(a), rtol=0, atol=0)


def test_dispatch_names_and_reasons():
    a = make_inputs(Case(B=1, H=16, W=16, p=16, D=16))  # float64
    reasons = patch_embed_fused_not_supported_reasons(a["images"], a["weight"], a["bias"], cls_token=a["cls_token"],
                                                      pos_embed=a["pos_embed"], mean=a["mean"], std=a["std"])
    assert any("weight has dtype torch.float64" in r for r in reasons)
    with pytest.raises(KernelNotSupported, match="float64"):
        _fused(a)
    # "gemm" forces the C++ op (on the CPU: its CPU kernel), "auto" on CPU tensors takes it too
    a32 = make_inputs(Case(B=1, H=16, W=16, p=16, D=16), torch.float32)
    ref = call(patch_embed_ref, make_inputs(Case(B=1, H=16, W=16, p=16, D=16)))
    for backend in ("gemm", "auto", "kernel"):
        out = call(lambda *x, **k: patch_embed(*x, backend=backend, **k), a32)
        assert max_err(out, ref) < 1e-4, backend
    with pytest.raises(ValueError, match="backend"):
        call(lambda *x, **k: patch_embed(*x, backend="cuda", **k), a32)


def test_vec_width():
    x = torch.zeros(2, 3, 32, 48)
    assert tk.vec_width(x, 16) == 16 and tk.vec_width(x, 14) == 2 and tk.vec_width(x, 8) == 8
    assert tk.vec_width(x.contiguous(memory_format=torch.channels_last), 16) == 1
    assert tk.vec_width(torch.zeros(2, 3, 30, 30), 15) == 1
    assert tk.vec_width(torch.zeros(2, 3, 40, 40)[..., 4:36], 16) == 8  # row stride 40


def test_candidate_configs_fit_and_cover_narrow_widths():
    """Each primary tile twice where TMA can read the weight (the interpreter stands in for sm_90):
    the weight by pointer loads first, then by TMA; once (pointer loads) where it cannot."""
    uint8 = torch.empty(1, 3, 224, 224, dtype=torch.uint8)
    vit_b = tk.candidate_configs(uint8, torch.empty(768, 3, 16, 16, dtype=torch.bfloat16))
    assert len(vit_b) == 2 * tk.PRIMARY
    assert [c["W_TMA"] for c in vit_b] == [False] * tk.PRIMARY + [True] * tk.PRIMARY
    assert [{**c, "W_TMA": False} for c in vit_b[tk.PRIMARY:]] == vit_b[:tk.PRIMARY]
    vit_l = tk.candidate_configs(uint8, torch.empty(1024, 3, 14, 14, dtype=torch.bfloat16))  # 1176-byte rows
    assert len(vit_l) == tk.PRIMARY and not any(c["W_TMA"] for c in vit_l)
    previous = tk.set_weight_tma(False)
    try:
        assert tk.candidate_configs(uint8, torch.empty(768, 3, 16, 16, dtype=torch.bfloat16)) == vit_b[:tk.PRIMARY]
    finally:
        tk.set_weight_tma(previous)
    narrow = tk.candidate_configs(torch.empty(1, 3, 32, 32), torch.empty(24, 3, 16, 16))
    assert narrow and all(c["BLOCK_N"] <= 32 for c in narrow)


def test_weight_tma_reasons():
    """What TMA asks of the weight [D, K], as reasons: contiguous, a 16-byte aligned base, rows a
    multiple of 16 bytes; turned off by set_weight_tma(False). A config forcing TMA on a weight it
    cannot read raises."""
    w = torch.empty(64, 768, dtype=torch.float16)
    assert tk.weight_tma_not_supported_reasons(w) == []
    assert any("16-byte aligned" in r for r in tk.weight_tma_not_supported_reasons(
        torch.empty(64 * 768 + 1, dtype=torch.float16)[1:].view(64, 768)))
    assert any("strides (1, 64)" in r for r in tk.weight_tma_not_supported_reasons(torch.empty(768, 64).t()))
    assert any("588 x 2 bytes" in r for r in tk.weight_tma_not_supported_reasons(w[:, :588].contiguous()))
    assert tk.weight_tma_not_supported_reasons(w[:, :588].float().contiguous()) == []
    previous = tk.set_weight_tma(False)
    try:
        assert any("set_weight_tma(False)" in r for r in tk.weight_tma_not_supported_reasons(w))
    finally:
        tk.set_weight_tma(previous)
    # not inside torch.compile (Inductor traces the launch there), as the attention's TMA forward
    with unittest.mock.patch.object(torch.compiler, "is_compiling", return_value=True):
        assert any("torch.compile" in r for r in tk.weight_tma_not_supported_reasons(w))
    a = make_inputs(Case(B=1, H=28, W=28, p=14, D=16), torch.float16)
    out = torch.empty(1, 5, 16, dtype=torch.float16)
    with pytest.raises(ValueError, match="588 x 2 bytes"):
        tk.launch_fwd(a["images"], a["weight"].reshape(16, -1), None, None, None, 0, None, None, out, 14,
                      config=dict(tk.INTERPRET_CONFIG, W_TMA=True))


# ------------------------------------------------------------------------------- GPU
VIT_B = Case(B=4, H=224, W=224, p=16, D=768, uint8=True)


@pytest.mark.cuda
@pytest.mark.parametrize("uint8", [True, False])
def test_cuda_every_config_2x_rule(uint8):
    case = Case(B=4, H=224, W=224, p=16, D=768, uint8=uint8)
    a64 = make_inputs(case, device="cuda")
    a = make_inputs(case, torch.bfloat16, device="cuda")
    ref, own = call(patch_embed_ref, a64), call(patch_embed_ref, a)
    B, N, T, D = 4, 196, 197, 768
    args = _op_args(a)
    for cfg in tk.candidate_configs(a["images"], a["weight"]):
        out = torch.empty((B, T, D), device="cuda", dtype=torch.bfloat16)
        pos, mode = a["pos_embed"].reshape(T, D), 1
        tk.launch_fwd(args[0], args[1].reshape(D, -1), args[2], args[3].reshape(-1), pos, mode, args[5], args[6],
                      out, 16, config=cfg)
        _check(f"tokens {cfg}", out, own, ref, torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("case", [VIT_B, Case(B=3, H=28, W=42, p=14, D=80, pos="patches", channels_last=True)], ids=str)
def test_cuda_fused_gradients_2x_rule_and_gemm_path(case, dtype):
    a64 = _leaves(make_inputs(case, device="cuda"), torch.float64)
    ref = call(patch_embed_ref, a64)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).cuda()
    want = _grads(patch_embed_ref, a64, g)
    fused = lambda *x, **k: patch_embed(*x, backend="fused", **k)  # noqa: E731
    gemm = lambda *x, **k: patch_embed(*x, backend="gemm", **k)  # noqa: E731
    got = _grads(fused, _leaves(make_inputs(case, dtype, device="cuda"), dtype), g)
    own = _grads(patch_embed_ref, _leaves(make_inputs(case, dtype, device="cuda"), dtype), g)
    a = make_inputs(case, dtype, device="cuda")
    _check("tokens", call(fused, a), call(patch_embed_ref, a), ref, dtype)
    _check("tokens (gemm)", call(gemm, a), call(patch_embed_ref, a), ref, dtype)
    for k in want:
        _check(f"d{k}", got[k], own[k], want[k], dtype)


def test_dispatch_table_routes_and_tuning_builds_the_call(monkeypatch):
    """On CUDA, auto/kernel ask the measured table (op "patch_embed": "kernel" = fused, "torch" =
    the three-kernel path); a captured call is what `vitfast tune` re-creates and times."""
    from vitfast import dispatch, tuning
    from vitfast.ops.patch_embed import _fused_chosen

    a = make_inputs(Case(B=2, H=16, W=32, p=16, D=16, uint8=True), torch.float32)
    args = (a["images"], a["weight"], a["bias"], a["cls_token"], a["pos_embed"])
    with dispatch.capture() as calls:
        assert _fused_chosen(*args)  # nothing measured (a CPU tensor has no device key): the fused kernel
    (call,) = calls.values()
    assert call["op"] == "patch_embed" and call["shape"] == dict(D=16, C=3, p=16, T=3, B=2, u8=2)
    with dispatch.forced("torch"):
        assert not _fused_chosen(*args)
    assert "patch_embed" in tuning.TUNABLE
    out = tuning._inputs(call)()  # on CPU tensors: the C++ op
    assert out.shape == (2, 3, 16)


def test_without_the_extension_cuda_images_take_the_fused_kernel(monkeypatch):
    """vitfast._C missing (not built, or built for another torch, as on a GPU image whose torch
    differs): on CUDA the fused Triton kernel still serves the op and FastViT's patch embedding
    (auto: the kernel, no fallback warning; backend="kernel": no error). Fake CUDA tensors."""
    import importlib
    import warnings

    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    from vitfast.models.vit import FastViT

    pe = importlib.import_module("vitfast.ops.patch_embed")  # (vitfast.ops.patch_embed is also the function)

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.name())
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(pe, "_C", None)
    monkeypatch.setattr(tk, "INTERPRET", False)  # as on the GPU (nothing launches: fake tensors)
    monkeypatch.setattr(pe._tk, "INTERPRET", False)
    m = FastViT(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2, num_classes=3)
    with FakeTensorMode(allow_non_fake_inputs=True):
        m = m.to_empty(device="cuda")
        x = torch.empty(2, 3, 32, 32, device="cuda")
        assert pe.patch_embed_not_supported_reasons(x, m.patch_embed.proj.weight)  # the C++ op cannot
        for backend in ("auto", "kernel"):
            m.set_backend(backend)
            ops = Ops()
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                with ops:
                    m._embed(x)
            assert "vitfast::patch_embed_fused" in ops.names, (backend, ops.names)
