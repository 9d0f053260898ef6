"""vitfast.ops.patch_embed (torch.ops.vitfast.patch_embed / patch_embed_backward).

CPU: the C++ op against the eager reference chain (``patch_embed_ref``) in float64, lower
precisions by the 2x rule, gradients (gradcheck and against autograd through the reference),
opcheck, torch.compile, bad input. GPU (``cuda`` mark): the CUDA op against the CPU op.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import pytest
import torch

from vitfast.ops import patch_embed
from vitfast.ops.patch_embed import check_patch_embed_args
from vitfast.ops.reference import patch_embed_ref

MEAN3, STD3 = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
MEAN1, STD1 = (0.5,), (0.25,)


@dataclasses.dataclass(frozen=True)
class Case:
    B: int = 2
    C: int = 3
    H: int = 32
    W: int = 48
    p: int = 16
    D: int = 20
    uint8: bool = False
    bias: bool = True
    cls: bool = True
    pos: Optional[str] = "full"  # "full" (T tokens), "patches" (N tokens) or None
    norm: bool = True  # mean/std
    channels_last: bool = False

    def __str__(self):
        f = dataclasses.fields(self)
        return "-".join(f"{x.name}={getattr(self, x.name)}" for x in f if getattr(self, x.name) != x.default) or "default"


CASES = [
    Case(),
    Case(H=48, W=32, channels_last=True),
    Case(p=8, H=24, W=40, D=12, uint8=True),
    Case(p=8, C=1, H=16, W=16, D=7, uint8=True, channels_last=True),
    Case(p=14, H=28, W=42, D=19, pos="patches"),
    Case(p=14, C=1, H=42, W=28, B=1, cls=False, norm=False),
    Case(p=16, B=1, D=13, uint8=True, pos="patches", channels_last=True),
    Case(p=16, H=64, W=32, uint8=True, norm=False, bias=False),
    Case(p=16, cls=False, pos="full", bias=False, channels_last=True),
    Case(p=32, H=64, W=96, D=24, cls=False, pos=None, uint8=True),
    Case(p=32, C=1, H=32, W=64, D=9, pos=None, norm=False),
    Case(p=32, B=1, H=64, W=64, D=33, channels_last=True, uint8=True, pos="patches"),
    Case(p=8, bias=False, cls=True, pos=None, norm=False, H=8, W=8, B=3),
]


def make_inputs(c: Case, dtype=torch.float64, img_dtype=None, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    Hp, Wp = c.H // c.p, c.W // c.p
    N = Hp * Wp
    T = N + c.cls
    if c.uint8:
        images = torch.randint(0, 256, (c.B, c.C, c.H, c.W), generator=g, dtype=torch.uint8)
    else:
        images = torch.randn(c.B, c.C, c.H, c.W, generator=g, dtype=torch.float64).to(img_dtype or dtype)
    if c.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    scale = (c.C * c.p * c.p) ** -0.5
    weight = (torch.randn(c.D, c.C, c.p, c.p, generator=g, dtype=torch.float64) * scale).to(dtype)
    bias = torch.randn(c.D, generator=g, dtype=torch.float64).to(dtype) if c.bias else None
    cls = torch.randn(1, 1, c.D, generator=g, dtype=torch.float64).to(dtype) if c.cls else None
    pos = None
    if c.pos is not None:
        pos = torch.randn(1, T if c.pos == "full" else N, c.D, generator=g, dtype=torch.float64).to(dtype)
    if c.C == 3:
        mean, std = MEAN3, STD3
    elif c.C == 1:
        mean, std = MEAN1, STD1
    else:  # e.g. RGBA
        mean, std = tuple(0.3 + 0.1 * i for i in range(c.C)), tuple(0.2 + 0.02 * i for i in range(c.C))
    if not c.norm:
        mean = std = None
    move = lambda t: t if t is None else t.to(device)  # noqa: E731
    return dict(
        images=move(images), weight=move(weight), bias=move(bias), cls_token=move(cls), pos_embed=move(pos),
        mean=mean, std=std,
    )


def call(fn, a):
    return fn(a["images"], a["weight"], a["bias"], cls_token=a["cls_token"], pos_embed=a["pos_embed"],
              mean=a["mean"], std=a["std"])


def max_err(x, ref):
    return (x.double() - ref.double()).abs().max().item()


# ---------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_matches_reference_float64(case):
    a = make_inputs(case)
    out = call(patch_embed, a)
    ref = call(patch_embed_ref, a)
    N = (case.H // case.p) * (case.W // case.p)
    assert out.shape == (case.B, N + case.cls, case.D)
    assert out.dtype == torch.float64 and out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-10)


def test_forward_any_strides():
    """Images that are neither NCHW nor channels_last (a transposed view), and an offset view."""
    a = make_inputs(Case(H=48, W=48))
    base = a["images"]
    for images in (base.transpose(2, 3), torch.randn(2, 3, 48, 49, dtype=torch.float64)[..., 1:]):
        a["images"] = images
        torch.testing.assert_close(call(patch_embed, a), call(patch_embed_ref, a), rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("uint8", [False, True])
def test_forward_any_strides_float32(uint8, cpu_strategy):
    """The same views in float32, where the CPU GEMM is MKL's or oneDNN's: within 2x the float32
    eager chain's error against float64."""
    a = make_inputs(Case(H=48, W=48, uint8=uint8), dtype=torch.float32)
    base = a["images"]
    extra = torch.randint(0, 256, (2, 3, 48, 49), dtype=torch.uint8) if uint8 else torch.randn(2, 3, 48, 49)
    for images in (base.transpose(2, 3), extra[..., 1:], base.contiguous(memory_format=torch.channels_last)):
        a["images"] = images
        a64 = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in a.items()}
        ref64 = call(patch_embed_ref, a64)
        out = call(patch_embed, a)
        eps = torch.finfo(torch.float32).eps
        assert max_err(out, ref64) <= 2 * max_err(call(patch_embed_ref, a), ref64) + 4 * eps * ref64.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [Case(), Case(uint8=True, channels_last=True, pos="patches"), Case(p=14, H=42, W=28)],
                         ids=str)
def test_forward_low_precision_2x_rule(case, dtype, cpu_strategy):
    """Error against float64 at most 2x what the eager chain makes in the same dtype."""
    a = make_inputs(case, dtype=dtype)
    ref64 = call(patch_embed_ref, {**a, **{k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point()
                                              else v) for k, v in a.items()}})
    out = call(patch_embed, a)
    assert out.dtype == dtype
    torch_err = max_err(call(patch_embed_ref, a), ref64)
    eps = torch.finfo(dtype).eps
    assert max_err(out, ref64) <= 2 * torch_err + 4 * eps * ref64.abs().max().item()


def test_mixed_dtypes(cpu_strategy):
    """float32 images with bfloat16 weights; float32 bias/pos with half weights."""
    case = Case()
    a = make_inputs(case, dtype=torch.bfloat16, img_dtype=torch.float32)
    out = call(patch_embed, a)
    assert out.dtype == torch.bfloat16
    ref = call(patch_embed_ref, {**a, "weight": a["weight"].float(), "bias": a["bias"].float(),
                                 "cls_token": a["cls_token"].float(), "pos_embed": a["pos_embed"].float()})
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    a = make_inputs(case, dtype=torch.float32)
    a["weight"] = a["weight"].half()
    out = call(patch_embed, a)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), call(patch_embed_ref, {**a, "weight": a["weight"].float()}),
                               rtol=2e-3, atol=2e-3)


def test_mean_std_as_tensors_and_batch_zero():
    a = make_inputs(Case())
    ref = call(patch_embed_ref, a)
    out = patch_embed(a["images"], a["weight"], a["bias"], cls_token=a["cls_token"], pos_embed=a["pos_embed"],
                      mean=torch.tensor(MEAN3), std=torch.tensor(STD3))
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    a["images"] = a["images"][:0]
    assert call(patch_embed, a).shape == (0, 7, 20)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_no_patches_gives_class_rows_only(device):
    a = make_inputs(Case(), device=device)
    a["images"] = a["images"][:, :, :0]
    a["pos_embed"] = a["pos_embed"][:, :1]
    out = call(patch_embed, a)
    assert out.shape == (2, 1, 20)
    torch.testing.assert_close(out, (a["cls_token"] + a["pos_embed"]).expand(2, 1, 20))


# ---------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------

GRAD_CASES = [
    Case(B=2, H=8, W=12, p=4, D=5),
    Case(B=1, H=12, W=8, p=4, D=3, pos="patches", channels_last=True),
    Case(B=2, C=1, H=8, W=8, p=4, D=6, cls=False, norm=False),
    Case(B=2, H=8, W=8, p=8, D=4, bias=False, pos=None),
    Case(B=2, H=8, W=12, p=4, D=5, uint8=True),
]


def _leaves(a, case):
    names = ["images", "weight", "bias", "cls_token", "pos_embed"]
    if case.uint8:
        names = names[1:]
    return [n for n in names if a[n] is not None]


@pytest.mark.parametrize("case", GRAD_CASES, ids=str)
def test_gradcheck_float64(case):
    a = make_inputs(case)
    names = _leaves(a, case)

    def fn(*xs):
        return call(patch_embed, {**a, **dict(zip(names, xs))})

    xs = [a[n].detach().clone().requires_grad_() for n in names]
    assert torch.autograd.gradcheck(fn, xs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", [Case(p=16, D=24), Case(p=14, H=42, W=28, pos="patches", channels_last=True),
                                  Case(p=8, uint8=True, H=24, W=16, cls=False), Case(p=16, B=1, D=13, norm=False)],
                         ids=str)
def test_gradients_match_reference(case, dtype, cpu_strategy):
    a = make_inputs(case, dtype=dtype)
    names = _leaves(a, case)
    grads = []
    for fn in (patch_embed, patch_embed_ref):
        xs = {n: a[n].detach().clone().requires_grad_() for n in names}
        out = call(fn, {**a, **xs})
        gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
        out.backward(gout)
        grads.append({n: xs[n].grad for n in names})
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    for n in names:
        assert grads[0][n].dtype == a[n].dtype and grads[0][n].shape == a[n].shape, n
        torch.testing.assert_close(grads[0][n], grads[1][n], **tol, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("case", [Case(B=2, p=4, H=36, W=40, D=70), Case(B=3, p=4, H=36, W=40, D=70, cls=False,
                                                                         pos="patches", channels_last=True),
                                  Case(B=1, p=4, H=132, W=4, D=35, uint8=True)], ids=str)
def test_backward_over_several_tiles(case, cpu_strategy):
    """Shapes past the conv strategy's 32 x 32 tiles of grad_out (N = 90: two tiles and a tail
    that is not a multiple of 4; D = 70 and 35 likewise; N = 33 with a class token): every
    gradient within 2x the error of the eager chain in float32, both against float64."""
    a = make_inputs(case)
    names = _leaves(a, case)
    gout = torch.randn(case.B, (case.H // case.p) * (case.W // case.p) + case.cls, case.D,
                       generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = {}
    for fn, dtype in ((patch_embed_ref, torch.float64), (patch_embed_ref, torch.float32), (patch_embed, torch.float32)):
        cast = {n: (t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t) for n, t in a.items()}
        xs = {n: cast[n].detach().clone().requires_grad_() for n in names}
        call(fn, {**cast, **xs}).backward(gout.to(dtype))
        ref[fn, dtype] = {n: xs[n].grad.double() for n in names}
    exact, eager, ours = ref[patch_embed_ref, torch.float64], ref[patch_embed_ref, torch.float32], ref[patch_embed,
                                                                                                      torch.float32]
    for n in names:
        err_ours = (ours[n] - exact[n]).abs().max().item()
        err_eager = (eager[n] - exact[n]).abs().max().item()
        assert err_ours <= 2 * err_eager + 1e-6 * exact[n].abs().max().item(), (n, err_ours, err_eager)


def test_partial_requires_grad():
    """Only the inputs that require grad get one, and the backward op is asked only for those."""
    a = make_inputs(Case())
    w = a["weight"].clone().requires_grad_()
    out = call(patch_embed, {**a, "weight": w})
    out.sum().backward()
    assert w.grad is not None
    x = a["images"].clone().requires_grad_()
    out = call(patch_embed, {**a, "images": x})
    (gx,) = torch.autograd.grad(out.sum(), x)
    xr = a["images"].clone().requires_grad_()
    (gr,) = torch.autograd.grad(call(patch_embed_ref, {**a, "images": xr}).sum(), xr)
    torch.testing.assert_close(gx, gr)
    assert gx.is_contiguous()
    cl = a["images"].contiguous(memory_format=torch.channels_last).requires_grad_()
    (gcl,) = torch.autograd.grad(call(patch_embed, {**a, "images": cl}).sum(), cl)
    assert gcl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(gcl, gr)


def test_backward_op_output_mask():
    a = make_inputs(Case())
    mean, std = torch.tensor(MEAN3, dtype=torch.float64), torch.tensor(STD3, dtype=torch.float64)
    g = torch.randn(2, 7, 20, dtype=torch.float64)
    outs = torch.ops.vitfast.patch_embed_backward(g, a["images"], a["weight"], mean, std, True, 7,
                                                  [False, True, False, True, False])
    assert [o is not None for o in outs] == [False, True, False, True, False]
    torch.testing.assert_close(outs[3], g[:, 0].sum(0))
    _, _, gb, gcls, gpos = torch.ops.vitfast.patch_embed_backward(g, a["images"], a["weight"], mean, std, True, 6,
                                                                  [False, False, True, False, True])
    assert gcls is None
    torch.testing.assert_close(gb, g[:, 1:].sum((0, 1)))
    torch.testing.assert_close(gpos, g[:, 1:].sum(0, keepdim=True))


def test_zero_width_embedding_forward_and_backward(cpu_strategy):
    """D = 0 (no embedding channels): empty tokens forward, and a backward of zeros and empty
    gradients under both CPU GEMMs (oneDNN's convolution refuses a weight with no output
    channels: the weight gradient takes the GEMM there)."""
    a = make_inputs(Case(p=4, H=8, W=12, D=0), dtype=torch.float32)
    leaves = {n: a[n].clone().requires_grad_() for n in ("images", "weight", "bias", "cls_token", "pos_embed")}
    for frozen in (False, True):  # with and without the kept patch matrix ("gemm" keeps it for a weight gradient)
        xs = dict(leaves, weight=leaves["weight"].detach()) if frozen else leaves
        out = call(patch_embed, {**a, **xs})
        assert out.shape == (2, 7, 0)
        grads = torch.autograd.grad(out.sum(), [t for t in xs.values() if t.requires_grad])
        for g, t in zip(grads, [t for t in xs.values() if t.requires_grad]):
            assert g.shape == t.shape and g.dtype == t.dtype and not g.any()
    mean, std = torch.tensor(MEAN3, dtype=torch.float64), torch.tensor(STD3, dtype=torch.float64)
    gi, gw, gb, gc, gp = torch.ops.vitfast.patch_embed_backward(
        torch.empty(2, 7, 0), a["images"], a["weight"], mean, std, True, 7, [True] * 5)
    assert gi.shape == a["images"].shape and not gi.any()
    assert gw.shape == (0, 3, 4, 4) and gb.shape == gc.shape == (0,) and gp.shape == (1, 7, 0)


# ---------------------------------------------------------------------------------------------
# registration: opcheck, torch.compile
# ---------------------------------------------------------------------------------------------


def _op_args(a):
    stat = lambda x: None if x is None else torch.tensor(x, dtype=torch.float64)  # noqa: E731
    return (a["images"], a["weight"], a["bias"], a["cls_token"], a["pos_embed"], stat(a["mean"]), stat(a["std"]))


@pytest.mark.parametrize("case", [Case(p=4, H=8, W=12, D=5), Case(p=4, H=8, W=8, D=3, uint8=True, pos="patches",
                                                                 channels_last=True),
                                  Case(p=4, H=8, W=8, D=3, cls=False, bias=False, norm=False)], ids=str)
def test_opcheck_forward(case, cpu_strategy):
    a = make_inputs(case, dtype=torch.float32)
    args = list(_op_args(a))
    if not case.uint8:
        args[0] = args[0].requires_grad_()
    args[1] = args[1].requires_grad_()
    torch.library.opcheck(torch.ops.vitfast.patch_embed, tuple(args))


@pytest.mark.parametrize("mask", [[True, True, True, True, True], [False, True, False, False, True],
                                  [True, False, False, False, False]])
def test_opcheck_backward(mask, cpu_strategy):
    a = make_inputs(Case(p=4, H=8, W=12, D=5, channels_last=True), dtype=torch.float32)
    images, weight, _, _, _, mean, std = _op_args(a)
    g = torch.randn(2, 7, 5)
    torch.library.opcheck(torch.ops.vitfast.patch_embed_backward, (g, images, weight, mean, std, True, 7, mask))


def test_torch_compile_fullgraph_matches_eager(cpu_strategy):
    torch._dynamo.reset()
    a = make_inputs(Case(p=8, H=16, W=24, D=12), dtype=torch.float32)
    names = ["images", "weight", "bias", "cls_token", "pos_embed"]

    def fn(images, weight, bias, cls_token, pos_embed):
        x = patch_embed(images, weight, bias, cls_token=cls_token, pos_embed=pos_embed, mean=MEAN3, std=STD3)
        return (x * x).sum(-1).tanh()

    compiled = torch.compile(fn, fullgraph=True)
    results = []
    for f in (fn, compiled):
        xs = [a[n].detach().clone().requires_grad_() for n in names]
        out = f(*xs)
        out.sum().backward()
        results.append([out] + [x.grad for x in xs])
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# bad input: a ValueError/TypeError naming the argument, from Python before any kernel
# ---------------------------------------------------------------------------------------------


def _bad_inputs():
    a = make_inputs(Case(), dtype=torch.float32)
    x, w, b, cls, pos = a["images"], a["weight"], a["bias"], a["cls_token"], a["pos_embed"]
    ok = dict(images=x, weight=w, bias=b, cls_token=cls, pos_embed=pos, mean=MEAN3, std=STD3)
    return [
        ("images 3d", dict(ok, images=x[0]), ValueError, r"images must be a \[B, C, H, W\]"),
        ("weight 2d", dict(ok, weight=w.flatten(1)), ValueError, r"weight must be a \[D, C, p, p\]"),
        ("H not divisible", dict(ok, images=x[:, :, :30]), ValueError, r"image size 30x48 is not divisible by the patch size 16"),
        ("W not divisible", dict(ok, images=x[..., :40]), ValueError, r"image size 32x40"),
        ("channels", dict(ok, images=x[:, :2], mean=MEAN3[:2], std=STD3[:2]), ValueError, r"images have 2 channels but weight expects 3"),
        ("non-square kernel", dict(ok, weight=w[..., :8]), ValueError, r"square kernel"),
        ("pos length", dict(ok, pos_embed=pos[:, :5]), ValueError, r"pos_embed must be \[1, 7, 20\] \(or \[1, 6, 20\]"),
        ("pos dim", dict(ok, pos_embed=pos[..., :19]), ValueError, r"pos_embed must be"),
        ("mean length", dict(ok, mean=MEAN3[:2]), ValueError, r"mean must have one value per channel \(3\)"),
        ("std length", dict(ok, std=STD3 + (0.2,)), ValueError, r"std must have one value per channel \(3\)"),
        ("std missing", dict(ok, std=None), ValueError, r"std is missing"),
        ("mean missing", dict(ok, mean=None), ValueError, r"mean is missing"),
        ("std zero", dict(ok, std=(0.2, 0.0, 0.2)), ValueError, r"std must be non-zero"),
        ("mean not a sequence", dict(ok, mean=0.5), TypeError, r"mean must be a tensor or a sequence of 3 floats"),
        ("int32 images", dict(ok, images=x.to(torch.int32)), TypeError, r"images must be uint8 or floating point"),
        ("int8 images", dict(ok, images=x.to(torch.int8)), TypeError, r"images must be uint8 or floating point"),
        ("int weight", dict(ok, weight=w.to(torch.int64)), TypeError, r"weight must be floating point"),
        ("bias shape", dict(ok, bias=b[:19]), ValueError, r"bias must be \[20\]"),
        ("bias dtype", dict(ok, bias=b.to(torch.int32)), TypeError, r"bias must be floating point"),
        ("cls shape", dict(ok, cls_token=cls[..., :3]), ValueError, r"cls_token must be \[1, 1, 20\]"),
        ("weight device", dict(ok, weight=w.to("meta")), ValueError, r"weight is on meta but images are on cpu"),
        ("pos device", dict(ok, pos_embed=pos.to("meta")), ValueError, r"pos_embed is on meta"),
        ("mean device", dict(ok, mean=torch.tensor(MEAN3, device="meta")), ValueError, r"mean is on meta"),
        ("zero patch", dict(ok, weight=w[..., :0, :0]), ValueError, r"p >= 1"),
    ]


BAD = _bad_inputs()


@pytest.mark.parametrize("kw,exc,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_raises_in_python(kw, exc, match):
    with pytest.raises(exc, match=match):
        check_patch_embed_args(kw["images"], kw["weight"], kw["bias"], kw["cls_token"], kw["pos_embed"],
                               kw["mean"], kw["std"])
    with pytest.raises(exc, match=match):
        patch_embed(kw["images"], kw["weight"], kw["bias"], cls_token=kw["cls_token"], pos_embed=kw["pos_embed"],
                    mean=kw["mean"], std=kw["std"])


def test_bad_input_second_line_in_cpp():
    """The C++ op checks too (called directly, without the Python wrapper)."""
    a = make_inputs(Case(), dtype=torch.float32)
    x, w, b, cls, pos, mean, std = _op_args(a)
    op = torch.ops.vitfast.patch_embed
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        op(x[:, :, :30], w, b, cls, pos, mean, std)
    with pytest.raises(ValueError, match="pos_embed must be"):
        op(x, w, b, cls, pos[:, :5], mean, std)
    with pytest.raises(ValueError, match="std is missing"):
        op(x, w, b, cls, pos, mean, None)
    with pytest.raises(TypeError, match="images must be uint8 or floating point"):
        op(x.to(torch.int16), w, b, cls, pos, mean, std)
    with pytest.raises(ValueError, match="mean must have one value per channel"):
        op(x, w, b, cls, pos, mean[:2], std)
    with pytest.raises(ValueError, match="grad_out must be"):
        torch.ops.vitfast.patch_embed_backward(torch.randn(2, 6, 20), x, w, mean, std, True, 7, [True] * 5)
    with pytest.raises(ValueError, match="no gradient for uint8 images"):
        torch.ops.vitfast.patch_embed_backward(torch.randn(2, 7, 20), x.to(torch.uint8), w, mean, std, True, 7,
                                               [True] * 5)


def _fake_check_cases():
    """(id, op, args, exception, message) for calls the C++ kernels refuse: each must be refused
    the same way by the fake (meta) implementation."""
    a = make_inputs(Case(p=4, H=8, W=12, D=5), dtype=torch.float32)
    x, w, b, cls, pos, mean, std = _op_args(a)
    X = torch.ops.vitfast.patch_embed_patches(x, w, True, mean, std)  # [14, 48]
    g = torch.randn(2, 7, 5)
    fwd, bwd = torch.ops.vitfast.patch_embed, torch.ops.vitfast.patch_embed_backward
    m5 = [True] * 5
    return [
        ("patches_shape", fwd, (x, w, b, cls, pos, mean, std, X[1:]), ValueError, r"patches must be \[14, 48\]"),
        ("patches_rank", fwd, (x, w, b, cls, pos, mean, std, X.flatten()), ValueError, r"patches must be \[14, 48\]"),
        ("patches_dtype", fwd, (x, w, b, cls, pos, mean, std, X.double()), TypeError, r"patches must be"),
        ("patches_strided", fwd, (x, w, b, cls, pos, mean, std, X.t().contiguous().t()), ValueError, "contiguous"),
        ("out_dtype_int", fwd, (x, w, b, cls, pos, mean, std, None, torch.int32), TypeError, "out_dtype"),
        ("cls_0dim", fwd, (x, w[:1], b[:1], cls[0, 0, :1].reshape(()), None), ValueError, "cls_token"),
        ("grad_shape", bwd, (g[:, 1:], x, w, mean, std, True, 7, m5), ValueError, r"grad_out must be \[2, 7, 5\]"),
        ("grad_int", bwd, (g.long(), x, w, mean, std, True, 7, m5), TypeError, "grad_out must be floating point"),
        ("pos_tokens", bwd, (g, x, w, mean, std, True, 5, m5), ValueError, "pos_tokens must be 0, 6 or 7"),
        ("uint8_images", bwd, (g, x.to(torch.uint8), w, mean, std, True, 7, m5), ValueError, "uint8 images"),
        ("cls_mask", bwd, (g[:, 1:], x, w, mean, std, False, 6, m5), ValueError, r"output_mask\[3\]"),
        ("pos_mask", bwd, (g, x, w, mean, std, True, 0, [False, True, False, False, True]), ValueError,
         r"output_mask\[4\]"),
        ("bwd_patches_dtype", bwd, (g, x, w, mean, std, True, 7, m5, X.double()), TypeError, "patches must be"),
        ("bwd_patches_shape", bwd, (g, x, w, mean, std, True, 7, m5, X[:3]), ValueError, "patches must be"),
    ]


FAKE_CASES = _fake_check_cases()


def _to_meta(args):
    return tuple(t.to("meta") if isinstance(t, torch.Tensor) else t for t in args)


@pytest.mark.parametrize("op,args,exc,match", [c[1:] for c in FAKE_CASES], ids=[c[0] for c in FAKE_CASES])
def test_fake_checks_as_the_cpp_checks(op, args, exc, match):
    """The fake (meta) implementations refuse what the C++ kernels refuse, with the same
    exception class (ValueError/TypeError, not torch._check's RuntimeError): on CPU tensors (the
    C++ kernel), on meta tensors and under FakeTensorMode (the fake)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with pytest.raises(exc, match=match):
        op(*args)
    with pytest.raises(exc, match=match):
        op(*_to_meta(args))
    with FakeTensorMode() as mode, pytest.raises(exc, match=match):
        op(*(mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in args))


def test_a_meta_patches_or_grad_out_beside_cpu_tensors_raises():
    """One meta tensor among CPU ones sends the call to the fake implementation (Meta outranks
    CPU in the dispatch key set): it raises naming the argument instead of returning
    uninitialised CPU memory."""
    a = make_inputs(Case(p=4, H=8, W=12, D=5), dtype=torch.float32)
    x, w, b, cls, pos, mean, std = _op_args(a)
    X = torch.ops.vitfast.patch_embed_patches(x, w, True, mean, std)
    with pytest.raises(ValueError, match="patches is on meta but images are on cpu"):
        torch.ops.vitfast.patch_embed(x, w, b, cls, pos, mean, std, X.to("meta"))
    with pytest.raises(ValueError, match="grad_out is on meta but images are on cpu"):
        torch.ops.vitfast.patch_embed_backward(torch.empty(2, 7, 5, device="meta"), x, w, mean, std, True, 7,
                                               [True] * 5)
    with pytest.raises(ValueError, match="patches is on meta but images are on cpu"):
        torch.ops.vitfast.patch_embed_backward(torch.randn(2, 7, 5), x, w, mean, std, True, 7, [True] * 5,
                                               X.to("meta"))


def test_opcheck_backward_with_patches(cpu_strategy):
    """The backward's fake with a patch matrix, under opcheck's dynamic-shape tracing too."""
    a = make_inputs(Case(p=4, H=8, W=12, D=5), dtype=torch.float32)
    images, weight, _, _, _, mean, std = _op_args(a)
    X = torch.ops.vitfast.patch_embed_patches(images, weight, True, mean, std)
    mask = [False, True, True, True, True]
    torch.library.opcheck(torch.ops.vitfast.patch_embed_backward,
                          (torch.randn(2, 7, 5), images, weight, mean, std, True, 7, mask, X))


def test_zero_dim_cls_token_is_a_value_error():
    """A 0-dim class token (numel 1 = D) is refused naming cls_token (was an IndexError)."""
    a = make_inputs(Case(p=4, H=8, W=12, D=1), dtype=torch.float32)
    with pytest.raises(ValueError, match=r"cls_token must be \[1, 1, 1\], got \[\]"):
        patch_embed(a["images"], a["weight"], cls_token=torch.tensor(0.5))
    with pytest.raises(ValueError, match=r"cls_token must be \[1, 1, 1\]"):
        torch.ops.vitfast.patch_embed(a["images"], a["weight"], None, torch.tensor(0.5))


@pytest.mark.parametrize("bad", [0.0, float("nan")], ids=["zero", "nan"])
@pytest.mark.parametrize("form", ["list", "tensor", "float32_tensor"])
def test_std_zero_or_nan_raises_for_lists_and_cpu_tensors(form, bad):
    """A zero or NaN std is a ValueError whether given as a sequence or a CPU tensor (before, the
    tensor form, and NaN in any form, passed silently: inf or NaN tokens)."""
    a = make_inputs(Case(p=4, H=8, W=12, D=5), dtype=torch.float32)
    std = [0.2, bad, 0.3]
    std = std if form == "list" else torch.tensor(std, dtype=torch.float64 if form == "tensor" else torch.float32)
    with pytest.raises(ValueError, match="std must be non-zero and not NaN"):
        patch_embed(a["images"], a["weight"], mean=[0.5] * 3, std=std)
    with pytest.raises(ValueError, match="std must be non-zero and not NaN"):
        check_patch_embed_args(a["images"], a["weight"], None, None, None, [0.5] * 3, std)


def test_std_tensor_values_not_read_on_meta_nor_under_compile():
    """The value check reads only plain CPU tensors: meta tensors pass (their values are unknown,
    as those of CUDA tensors, which would need a host sync), and under torch.compile the check is
    skipped without a graph break."""
    a = make_inputs(Case(p=4, H=8, W=12, D=5), dtype=torch.float32)
    meta_std = torch.zeros(3, device="meta")
    out = patch_embed(a["images"].to("meta"), a["weight"].to("meta"), mean=torch.zeros(3, device="meta"),
                      std=meta_std, backend="kernel")
    assert out.device.type == "meta" and out.shape == (2, 6, 5)
    torch._dynamo.reset()
    mean, std = torch.tensor(MEAN3), torch.tensor(STD3)
    fn = lambda x, w: patch_embed(x, w, mean=mean, std=std)  # noqa: E731
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(a["images"], a["weight"]),
                               fn(a["images"], a["weight"]))


# ---------------------------------------------------------------------------------------------
# GPU: the CUDA op against the CPU op on the same inputs
# ---------------------------------------------------------------------------------------------

GPU_CASES = CASES + [
    Case(B=256, H=224, W=224, p=16, D=768),  # ViT-B/16
    Case(B=64, H=224, W=224, p=16, D=768, uint8=True, channels_last=True),
    Case(B=8, H=224, W=224, p=14, D=1024, uint8=True),  # ViT-L/14
    Case(B=3, H=384, W=128, p=16, D=384, pos="patches"),
    Case(B=2, H=64, W=4096 + 64, p=32, D=40),  # too wide for one tile per patch row
    Case(B=2, C=3, H=128, W=256, p=128, D=10),  # one patch row exceeds the shared-memory tile: fallback
    # RGBA channels_last: 16-byte chunks of (w, c) that straddle patch boundaries (p*C = 56, 32)
    Case(B=2, C=4, H=28, W=56, p=14, D=12, uint8=True, channels_last=True),
    Case(B=1, C=4, H=16, W=40, p=8, D=11, channels_last=True, pos="patches"),
]


def _cpu64(a):
    return {k: (v.detach().cpu().double() if isinstance(v, torch.Tensor) and v.is_floating_point()
                else (v.cpu() if isinstance(v, torch.Tensor) else v)) for k, v in a.items()}


def _cpu_op_args(a):
    out = _cpu64(a)
    out["images"] = a["images"].cpu()  # the image itself at its own dtype (float64 math in the op)
    if out["images"].is_floating_point():
        out["images"] = out["images"].double()
    return out


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_cuda_forward_matches_cpu(case, dtype):
    a = make_inputs(case, dtype=dtype, device="cuda")
    out = call(patch_embed, a)
    torch.cuda.synchronize()
    ref64 = call(patch_embed, _cpu_op_args(a))
    torch_err = max_err(call(patch_embed_ref, a).cpu(), ref64)
    eps = torch.finfo(dtype).eps
    assert out.dtype == dtype and out.shape == ref64.shape
    assert max_err(out.cpu(), ref64) <= 2 * torch_err + 4 * eps * ref64.abs().max().item()


@pytest.mark.cuda
def test_cuda_unaligned_and_strided_images():
    """Storage offsets that break 16-byte alignment and non-standard strides take the scalar paths."""
    case = Case(B=2, H=48, W=64, p=16, D=24)
    a = make_inputs(case, dtype=torch.float32, device="cuda")
    big = torch.randn(2 * 3 * 48 * 64 + 1, device="cuda")[1:].view(2, 3, 48, 64)
    raw = torch.randint(0, 256, (2, 3, 48, 65), dtype=torch.uint8, device="cuda")[..., 1:]
    raw_cl = torch.randint(0, 256, (2, 48, 65, 3), dtype=torch.uint8, device="cuda")[:, :, 1:].permute(0, 3, 1, 2)
    for images in (big, a["images"].transpose(2, 3).contiguous().transpose(2, 3), raw, raw_cl):
        b = {**a, "images": images, "mean": MEAN3, "std": STD3}
        ref = call(patch_embed, {**_cpu64(b), "images": images.cpu()})
        torch.testing.assert_close(call(patch_embed, b).cpu().double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [Case(), Case(p=14, H=42, W=28, pos="patches", channels_last=True),
                                  Case(uint8=True, cls=False, D=13), Case(B=64, H=224, W=224, p=16, D=768)], ids=str)
def test_cuda_gradients_match_cpu(case, dtype):
    a = make_inputs(case, dtype=dtype, device="cuda")
    names = _leaves(a, case)
    g = torch.Generator().manual_seed(1)

    def grads(inputs, gout):
        xs = {n: inputs[n].detach().clone().requires_grad_() for n in names}
        out = call(patch_embed, {**inputs, **xs})
        out.backward(gout.to(out.device, out.dtype))
        return {n: xs[n].grad for n in names}

    N = (case.H // case.p) * (case.W // case.p)
    gout = torch.randn(case.B, N + case.cls, case.D, generator=g, dtype=torch.float64)
    got = grads(a, gout.to(dtype))
    want = grads(_cpu_op_args(a), gout.to(dtype).double())
    # PyTorch's own error in this dtype: autograd through the reference on the GPU
    xs = {n: a[n].detach().clone().requires_grad_() for n in names}
    call(patch_embed_ref, {**a, **xs}).backward(gout.to("cuda", dtype))
    for n in names:
        assert got[n].dtype == a[n].dtype and got[n].shape == a[n].shape, n
        torch_err = max_err(xs[n].grad.cpu(), want[n])
        scale = want[n].abs().max().item()
        assert max_err(got[n].cpu(), want[n]) <= 2 * torch_err + 8 * torch.finfo(dtype).eps * scale, n


# channels_last images on the C++ path (backend="gemm"): the register de-interleaving kernels
# (C = 3 or 4, p a multiple of the 16-byte run: 8 for 16-bit matrices, 4 for fp32), a padded row
# stride, and cases they leave to the tile kernel (p = 14 with 16-bit matrices, C = 1)
HWC_CASES = [
    Case(B=3, H=32, W=48, p=16, D=24, uint8=True, channels_last=True),
    Case(B=2, H=16, W=40, p=8, D=12, channels_last=True, pos="patches"),
    Case(B=2, C=4, H=16, W=32, p=16, D=10, uint8=True, channels_last=True, cls=False),
    Case(B=1, C=4, H=28, W=28, p=14, D=9, channels_last=True),
    Case(B=2, C=1, H=16, W=16, p=8, D=7, uint8=True, channels_last=True),
]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", HWC_CASES, ids=str)
def test_cuda_gemm_path_channels_last(case, dtype):
    a = make_inputs(case, dtype=dtype, device="cuda")
    gemm = lambda *x, **k: patch_embed(*x, backend="gemm", **k)  # noqa: E731
    ref64 = call(patch_embed, _cpu_op_args(a))
    torch_err = max_err(call(patch_embed_ref, a).cpu(), ref64)
    eps = torch.finfo(dtype).eps
    assert a["images"].is_contiguous(memory_format=torch.channels_last)
    out = call(gemm, a)
    assert max_err(out.cpu(), ref64) <= 2 * torch_err + 4 * eps * ref64.abs().max().item()
    # a row stride beyond W * C (a crop of a wider channels_last image)
    wide = torch.zeros(case.B, case.H, case.W + 8, case.C, dtype=a["images"].dtype, device="cuda")
    wide[:, :, :case.W] = a["images"].permute(0, 2, 3, 1)
    out = call(gemm, {**a, "images": wide[:, :, :case.W].permute(0, 3, 1, 2)})
    assert max_err(out.cpu(), ref64) <= 2 * torch_err + 4 * eps * ref64.abs().max().item()
    if case.uint8:
        return
    names = ["images", "weight"]
    xs = {n: a[n].detach().clone().requires_grad_() for n in names}
    out = call(gemm, {**a, **xs})
    gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out.backward(gout.to("cuda", dtype))
    c64 = _cpu_op_args(a)
    x64 = {n: c64[n].detach().clone().requires_grad_() for n in names}
    call(patch_embed, {**c64, **x64}).backward(gout)
    xt = {n: a[n].detach().clone().requires_grad_() for n in names}
    call(patch_embed_ref, {**a, **xt}).backward(gout.to("cuda", dtype))
    assert xs["images"].grad.is_contiguous(memory_format=torch.channels_last)
    for n in names:
        want = x64[n].grad
        torch_err = max_err(xt[n].grad.cpu(), want)
        assert max_err(xs[n].grad.cpu(), want) <= 2 * torch_err + 8 * eps * want.abs().max().item(), n


@pytest.mark.cuda
def test_cuda_opcheck_and_compile():
    a = make_inputs(Case(p=8, H=16, W=24, D=12), dtype=torch.float32, device="cuda")
    args = list(_op_args(a))
    args[5], args[6] = args[5].cuda(), args[6].cuda()
    args[1] = args[1].requires_grad_()
    torch.library.opcheck(torch.ops.vitfast.patch_embed, tuple(args))
    g = torch.randn(2, 7, 12, device="cuda")
    torch.library.opcheck(torch.ops.vitfast.patch_embed_backward,
                          (g, args[0], args[1].detach(), args[5], args[6], True, 7, [True] * 5))
    fn = lambda x, w: patch_embed(x, w, cls_token=a["cls_token"], pos_embed=a["pos_embed"])  # noqa: E731
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(a["images"], a["weight"]), fn(a["images"], a["weight"]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("uint8", [False, True])
def test_autocast_as_the_eager_chain_under_autocast(dtype, uint8):
    """Under torch.autocast the op behaves like the eager chain (a conv, then cat and add): the
    GEMM in the autocast dtype (weight and bias cast to it), the float32 class token and positions
    added in float32, float32 tokens (timm's residual stream; the old all-autocast-dtype tokens put a
    16-bit residual through every block), gradients in the parameters' dtype. Without class token
    and positions the tokens are in the autocast dtype, as the conv's. Error within 2x that of
    the eager chain under the same autocast, against float64 from the same cast weight and bias."""
    g = torch.Generator().manual_seed(0)
    if uint8:
        images = torch.randint(0, 256, (2, 3, 32, 48), dtype=torch.uint8, generator=g)
        stats = dict(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    else:
        images = torch.randn(2, 3, 32, 48, generator=g)
        stats = {}
    w = (torch.randn(24, 3, 16, 16, generator=g) * 0.05).requires_grad_()
    b = torch.randn(24, generator=g).requires_grad_()
    cls = torch.randn(1, 1, 24, generator=g).requires_grad_()
    pos = torch.randn(1, 7, 24, generator=g).requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        out = patch_embed(images, w, b, cls_token=cls, pos_embed=pos, **stats)
        eager = patch_embed_ref(images, w, b, cls_token=cls, pos_embed=pos, **stats)
        bare = patch_embed(images, w, b, **stats)
    assert out.dtype == eager.dtype == torch.float32 and bare.dtype == dtype
    cast = [t.detach().to(dtype).double() for t in (w, b)]
    exact = patch_embed_ref(images, *cast, cls_token=cls.detach().double(), pos_embed=pos.detach().double(), **stats)
    err, ref_err = (out.double() - exact).abs().max(), (eager.double() - exact).abs().max()
    assert err <= 2 * ref_err + 1e-6, (err, ref_err)
    out.sum().backward()
    assert w.grad is not None and w.grad.dtype == torch.float32
    assert torch.isfinite(w.grad).all() and b.grad.dtype == torch.float32
    torch.testing.assert_close(pos.grad, torch.full_like(pos, 2.0), rtol=0, atol=0)  # float32 all the way
    torch.testing.assert_close(cls.grad, torch.full_like(cls, 2.0), rtol=0, atol=0)


def _eager_chain(images, w, b, cls, pos):
    """timm's chain, as a model runs it (conv, cat, add): under autocast the conv casts."""
    tokens = torch.nn.functional.conv2d(images, w, b, stride=w.shape[-1]).flatten(2).transpose(1, 2)
    return torch.cat([cls.expand(tokens.shape[0], -1, -1), tokens], dim=1) + pos


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("wdtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_autocast_every_weight_dtype_as_eager(wdtype, autocast_dtype, cpu_strategy):
    """Under autocast, a model in any dtype: the tokens' dtype is the eager chain's. float64 is
    never cast (ATen's autocast leaves float64 alone: a float64 model gives float64 tokens, its GEMM
    in float64), the others compute in the autocast dtype. With a weight gradient the wrapper keeps
    the patch matrix made from the uncast weight; its dtype is what the op expects for the cast
    one (before, a float64 weight was cast to the autocast dtype and the kept float64 patches were
    refused: "patches must be Float ... got Double", an argument the user never passed). A 16-bit
    model under the other 16-bit autocast dtype (where eager's cat refuses to mix bf16 and fp16)
    gives their type promotion, float32."""
    g = torch.Generator().manual_seed(0)
    cross = wdtype in (torch.float16, torch.bfloat16) and wdtype != autocast_dtype
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(wdtype)  # noqa: E731
    images = r(2, 3, 8, 12)
    leaves = [r(5, 3, 4, 4, scale=0.2), r(5), r(1, 1, 5), r(1, 7, 5)]
    for grad in (False, True):
        ps = [t.clone().requires_grad_(grad) for t in leaves]
        qs = [t.clone().requires_grad_(grad) for t in leaves]
        with torch.autocast("cpu", dtype=autocast_dtype):
            out = patch_embed(images, ps[0], ps[1], cls_token=ps[2], pos_embed=ps[3])
            eager = _eager_chain(images, *(q.float() if cross else q for q in qs))
            bare = patch_embed(images, ps[0], ps[1])
        assert out.dtype == (torch.float32 if cross else eager.dtype), (out.dtype, eager.dtype)
        assert bare.dtype == (torch.float64 if wdtype == torch.float64 else autocast_dtype)
        if wdtype == torch.float64:
            torch.testing.assert_close(out, eager, rtol=1e-12, atol=1e-12)
        else:
            cast = [t.to(autocast_dtype).double() for t in leaves[:2]]
            exact = _eager_chain(images.to(autocast_dtype).double(), *cast, *(t.double() for t in leaves[2:]))
            assert max_err(out, exact) <= 2 * max_err(eager, exact) + 1e-6
        if grad:
            gout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
            got = torch.autograd.grad(out, ps, gout)
            want = torch.autograd.grad(eager, qs, gout.to(eager.dtype))
            for n, x, y in zip(("weight", "bias", "cls_token", "pos_embed"), got, want):
                assert x.dtype == y.dtype == wdtype and torch.isfinite(x).all(), n
                if wdtype == torch.float64:
                    torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_autocast_params_of_the_fused_op_as_the_cpp_autocast_kernel(autocast_dtype):
    """_autocast_params (what the fused Triton op is given under autocast) makes the C++ op's
    Autocast kernel's choices: weight and bias cast unless float64, tokens in the cast weight's
    dtype promoted with the class token's and positions'."""
    from vitfast.ops.patch_embed import _autocast_params

    images = torch.randn(1, 3, 8, 8)
    F64, F32, F16 = torch.float64, torch.float32, torch.float16
    for wd, bd, cd in [(F64, F64, F64), (F64, F64, F32), (F64, F32, None), (F32, F64, F32), (F32, F32, None),
                       (F16, F32, F32), (F16, F16, F16), (F32, None, F64)]:
        w = torch.randn(4, 3, 4, 4, dtype=wd)
        b = None if bd is None else torch.randn(4, dtype=bd)
        cls = None if cd is None else torch.randn(1, 1, 4, dtype=cd)
        pos = None if cd is None else torch.randn(1, 5, 4, dtype=cd)
        with torch.autocast("cpu", dtype=autocast_dtype):
            (w2, b2, cls2, pos2), out_dtype = _autocast_params(images.device, w, b, cls, pos)
            tokens = torch.ops.vitfast.patch_embed(images, w, b, cls, pos)
        assert out_dtype == tokens.dtype, (wd, bd, cd)
        assert w2.dtype == (F64 if wd == F64 else autocast_dtype)
        assert b2 is None or b2.dtype == (F64 if bd == F64 else autocast_dtype)
        assert cls2 is cls and pos2 is pos


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["gemm", "fused"])
def test_cuda_autocast_as_the_eager_chain(backend):
    """The CUDA paths under bf16 autocast: float32 tokens from a bf16 GEMM (the three-kernel path
    adds the GEMM's result onto a float32 prefill), within 2x the eager chain's error."""
    g = torch.Generator(device="cuda").manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 64, 96), dtype=torch.uint8, device="cuda", generator=g)
    stats = dict(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    w = (torch.randn(64, 3, 16, 16, device="cuda", generator=g) * 0.05).requires_grad_()
    b, cls = (torch.randn(s, device="cuda", generator=g).requires_grad_() for s in ((64,), (1, 1, 64)))
    pos = torch.randn(1, 25, 64, device="cuda", generator=g).requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = patch_embed(images, w, b, cls_token=cls, pos_embed=pos, backend=backend, **stats)
        eager = patch_embed_ref(images, w, b, cls_token=cls, pos_embed=pos, **stats)
    assert out.dtype == eager.dtype == torch.float32
    cast = [t.detach().bfloat16().double() for t in (w, b)]
    exact = patch_embed_ref(images, *cast, cls_token=cls.detach().double(), pos_embed=pos.detach().double(), **stats)
    assert (out.double() - exact).abs().max() <= 2 * (eager.double() - exact).abs().max() + 1e-6
    out.sum().backward()
    torch.testing.assert_close(pos.grad, torch.full_like(pos, 4.0), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# GPU edge cases of the CUDA kernels (review of csrc/cuda/patch_embed.cu)
# ---------------------------------------------------------------------------------------------

_IMG_DTYPES = [torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64]
_W_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _tol(dtype):
    return {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]


@pytest.mark.cuda
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_every_image_and_weight_dtype(channels_last):
    """Every (image dtype, weight dtype) instantiation of the patchify and unpatchify kernels,
    vector and scalar paths (p = 16 vectorises, p = 14 does not), against the CPU op in float64."""
    for p, H, W in ((16, 32, 48), (14, 28, 42)):
        for it in _IMG_DTYPES:
            for wt in _W_DTYPES:
                case = Case(p=p, H=H, W=W, D=13, uint8=it == torch.uint8, channels_last=channels_last)
                a = make_inputs(case, dtype=wt, img_dtype=None if it == torch.uint8 else it, device="cuda")
                names = ["weight", "bias", "cls_token", "pos_embed"] + ([] if it == torch.uint8 else ["images"])
                xs = {n: a[n].detach().clone().requires_grad_() for n in names}
                out = call(patch_embed, {**a, **xs})
                gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
                out.backward(gout.to("cuda", wt))
                ref_in = _cpu_op_args(a)
                rs = {n: ref_in[n].detach().clone().requires_grad_() for n in names}
                ref = call(patch_embed, {**ref_in, **rs})
                ref.backward(gout)
                tol, msg = _tol(wt), f"images {it}, weight {wt}, p={p}"
                assert out.dtype == wt
                torch.testing.assert_close(out.cpu().double(), ref, rtol=tol, atol=tol * ref.abs().max().item(),
                                           msg=lambda m: f"{msg}: {m}")
                for n in names:
                    assert xs[n].grad.dtype == a[n].dtype, (msg, n)
                    want = rs[n].grad
                    gtol = max(tol, _tol(a[n].dtype))
                    torch.testing.assert_close(xs[n].grad.cpu().double(), want, rtol=gtol,
                                               atol=gtol * want.abs().max().item(), msg=lambda m: f"{msg} {n}: {m}")


@pytest.mark.cuda
def test_cuda_batch_zero_and_no_patches_backward():
    """B = 0 and H = 0 (no patch rows) forward and backward: no launch reads or writes anything."""
    for cut in ("batch", "height"):
        a = make_inputs(Case(), dtype=torch.float32, device="cuda")
        if cut == "batch":
            a["images"] = a["images"][:0]
        else:
            a["images"] = a["images"][:, :, :0]
            a["pos_embed"] = a["pos_embed"][:, :1]
        names = ["images", "weight", "bias", "cls_token", "pos_embed"]
        got, want = {}, {}
        for inputs, store in ((a, got), (_cpu_op_args(a), want)):
            xs = {n: inputs[n].detach().clone().requires_grad_() for n in names}
            out = call(patch_embed, {**inputs, **xs})
            out.backward(torch.ones_like(out))
            store.update({n: xs[n].grad for n in names}, out=out)
        torch.cuda.synchronize()
        assert got["out"].shape == want["out"].shape
        for k in want:
            torch.testing.assert_close(got[k].cpu().double(), want[k].double(), rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"{cut} {k}: {m}")


@pytest.mark.cuda
def test_cuda_strided_views_and_offsets_vector_paths():
    """Views whose strides and storage offsets keep (or just break) the 16-byte vector paths,
    and zero-stride (expanded) images, forward and image gradient, against the CPU op."""
    g = torch.Generator(device="cuda").manual_seed(0)
    u8 = lambda *s: torch.randint(0, 256, s, generator=g, device="cuda", dtype=torch.uint8)  # noqa: E731
    f32 = lambda *s: torch.randn(*s, generator=g, device="cuda")  # noqa: E731
    views = {
        "u8 offset 16 B, rows 80 B (vector)": u8(2, 3, 48, 80)[..., 16:],
        "u8 offset 1 B (scalar)": u8(2, 3, 48, 80)[..., 1:65],
        "u8 channels_last offset 48 B (vector)": u8(2, 48, 80, 3)[:, :, 16:].permute(0, 3, 1, 2),
        "f32 offset 16 B, rows 272 B (vector)": f32(2, 3, 48, 68)[..., 4:],
        "f32 offset 8 B (scalar)": f32(2, 3, 48, 68)[..., 2:66],
        "f32 channel-expanded": f32(2, 1, 48, 64).expand(-1, 3, -1, -1),
        "f32 batch-expanded": f32(1, 3, 48, 64).expand(2, -1, -1, -1),
        "f32 odd batch stride": f32(2 * 3 * 48 * 64 + 5)[:-5].as_strided((2, 3, 48, 64), (3 * 48 * 64 + 5, 48 * 64, 64, 1)),
    }
    case = Case(B=2, H=48, W=64, p=16, D=24)
    a = make_inputs(case, dtype=torch.float32, device="cuda")
    for name, images in views.items():
        b = {**a, "images": images}
        ref_in = {**_cpu64(b), "images": images.cpu() if images.dtype == torch.uint8 else images.cpu().double()}
        torch.testing.assert_close(call(patch_embed, b).cpu().double(), call(patch_embed, ref_in),
                                   rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
        if images.is_floating_point():
            x = images.detach().requires_grad_()  # the view itself: same strides and offset
            (gx,) = torch.autograd.grad(call(patch_embed, {**b, "images": x}).sum(), x)
            xr = ref_in["images"].detach().clone().requires_grad_()
            (gr,) = torch.autograd.grad(call(patch_embed, {**ref_in, "images": xr}).sum(), xr)
            torch.testing.assert_close(gx.cpu().double(), gr, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name} grad: {m}")


@pytest.mark.cuda
@pytest.mark.parametrize("case", [Case(p=16, channels_last=True), Case(C=4, p=14, H=28, W=56, channels_last=True),
                                  Case(B=2, C=3, H=128, W=256, p=128, D=10)], ids=str)
def test_cuda_image_gradient_layout_paths(case):
    """Image gradients through the vectorised channels_last unpatchify (p*C = 48, 56) and the
    elementwise fallback for patches too large for shared memory (p = 128), float32 and bfloat16."""
    for dtype in (torch.float32, torch.bfloat16):
        a = make_inputs(case, dtype=dtype, device="cuda")
        x = a["images"].detach().clone().requires_grad_()
        out = call(patch_embed, {**a, "images": x})
        gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        (gx,) = torch.autograd.grad(out, x, gout.to("cuda", dtype))
        assert gx.stride() == x.stride()
        ref_in = _cpu_op_args(a)
        xr = ref_in["images"].detach().clone().requires_grad_()
        (gr,) = torch.autograd.grad(call(patch_embed, {**ref_in, "images": xr}), xr, gout)
        tol = _tol(dtype)
        torch.testing.assert_close(gx.cpu().double(), gr, rtol=tol, atol=tol * gr.abs().max().item())


@pytest.mark.cuda
def test_cuda_more_than_2_31_elements():
    """Images, patch matrix and token buffer beyond 2**31 elements (int64 indexing in every
    kernel): the first and last image against the CPU op on those images alone."""
    free, _ = torch.cuda.mem_get_info()
    if free < 40 * 2**30:
        pytest.skip("needs ~30 GiB of free GPU memory")
    B, D = 14300, 768  # images 3*224*224*B > 2**31, tokens B*197*D > 2**31
    g = torch.Generator(device="cuda").manual_seed(0)
    images = torch.randint(0, 256, (B, 3, 224, 224), generator=g, device="cuda", dtype=torch.uint8)
    cpu = torch.Generator().manual_seed(0)
    weight = (torch.randn(D, 3, 16, 16, generator=cpu) * 768 ** -0.5).to("cuda", torch.bfloat16)
    bias = torch.randn(D, generator=cpu).to("cuda", torch.bfloat16)
    cls = torch.randn(1, 1, D, generator=cpu).to("cuda", torch.bfloat16)
    pos = torch.randn(1, 197, D, generator=cpu).to("cuda", torch.bfloat16)
    out = patch_embed(images, weight, bias, cls_token=cls, pos_embed=pos, mean=MEAN3, std=STD3)
    assert out.numel() > 2**31
    for i in (0, B - 1):
        ref = patch_embed(images[i:i + 1].cpu(), weight.cpu().double(), bias.cpu().double(),
                          cls_token=cls.cpu().double(), pos_embed=pos.cpu().double(), mean=MEAN3, std=STD3)
        torch.testing.assert_close(out[i:i + 1].cpu().double(), ref, rtol=5e-2, atol=5e-2 * ref.abs().max().item())
    del out
    # image gradient beyond 2**31 elements (bfloat16 images, a narrow weight to keep memory down)
    x = images.to(torch.bfloat16).requires_grad_()
    del images
    w = weight[:16]
    out = patch_embed(x, w, mean=MEAN3, std=STD3)
    gout = torch.randn(out.shape, generator=g, device="cuda", dtype=torch.bfloat16)
    (gx,) = torch.autograd.grad(out, x, gout)
    for i in (0, B - 1):
        xi = x[i:i + 1].detach().cpu().double().requires_grad_()
        (gr,) = torch.autograd.grad(patch_embed(xi, w.cpu().double(), mean=MEAN3, std=STD3), xi,
                                    gout[i:i + 1].cpu().double())
        torch.testing.assert_close(gx[i:i + 1].cpu().double(), gr, rtol=5e-2, atol=5e-2 * gr.abs().max().item())
