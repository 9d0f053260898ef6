"""Property tests for vitfast.ops.patch_embed (the C++ CPU kernels).

Generated: B in 0..3, C in 1..4, patch sizes 1..8 and 16, grids 1..4 x 1..4, D in 1..24;
images uint8 / float16 / float32 / float64 with weights float16 / float32 / float64; layouts
NCHW, channels_last, every-other-pixel views, a batch-expanded (stride 0) view; optional
bias, class token, positional embedding (both timm layouts), mean/std as lists or tensors;
values normal, scaled by 1e4 / 1e-4, one NaN / +Inf / -Inf pixel. The answer must match the
float64 eager chain within 2x the eager chain's own error in the weight's dtype.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from _prop_utils import FAST, SCALE, SLOW, assert_matches, poison, randn
from vitfast.ops.patch_embed import patch_embed
from vitfast.ops.reference import patch_embed_ref

IMAGE_DTYPES = (torch.uint8, torch.float16, torch.float32, torch.float64)
WEIGHT_DTYPES = (torch.float16, torch.float32, torch.float64)
LAYOUTS = ("nchw", "channels_last", "every_other_pixel", "batch_expanded")


def _images(B, C, H, W, dtype, layout, kind, seed):
    s = SCALE.get(kind, 1.0)
    if dtype == torch.uint8:
        g = torch.Generator().manual_seed(seed)
        x = torch.randint(0, 256, (B, C, H, W), generator=g, dtype=torch.uint8)
    else:
        x = poison(randn((B, C, H, W), torch.float64, seed, scale=s), kind, seed).to(dtype)
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "every_other_pixel":
        big = torch.zeros(B, C, 2 * H, 2 * W, dtype=dtype)
        big[:, :, ::2, ::2] = x
        return big[:, :, ::2, ::2]
    if layout == "batch_expanded":
        return x[:1].expand(B, C, H, W) if B else x
    return x


@st.composite
def cases(draw, backward=False):
    p = draw(st.sampled_from((1, 2, 3, 4, 5, 7, 8, 16)))
    gh, gw = draw(st.integers(1, 4)), draw(st.integers(1, 4 if p < 16 else 2))
    case = dict(
        B=draw(st.integers(1 if backward else 0, 3)), C=draw(st.integers(1, 4)), p=p, H=gh * p, W=gw * p,
        D=draw(st.integers(1, 24)),
        img_dtype=draw(st.sampled_from(IMAGE_DTYPES[1:] if backward else IMAGE_DTYPES)),
        w_dtype=draw(st.sampled_from(WEIGHT_DTYPES)),
        layout=draw(st.sampled_from(LAYOUTS)),
        bias=draw(st.booleans()), cls=draw(st.booleans()),
        pos=draw(st.sampled_from(("none", "all", "patches"))),
        stats=draw(st.sampled_from(("none", "list", "tensor"))),
        kind=draw(st.sampled_from(("normal",) if backward else ("normal", "huge", "tiny", "nan", "inf", "neg_inf"))),
        seed=draw(st.integers(0, 2**16)),
    )
    if backward:
        case["pos"] = "all"  # trailing None arguments: test_backward_without_trailing_optionals
    return case


def _build(c):
    B, C, H, W, D, p, seed = c["B"], c["C"], c["H"], c["W"], c["D"], c["p"], c["seed"]
    wd = c["w_dtype"]
    images = _images(B, C, H, W, c["img_dtype"], c["layout"], c["kind"], seed)
    weight = randn((D, C, p, p), wd, seed + 1, scale=(C * p * p) ** -0.5)
    N = (H // p) * (W // p)
    kw = dict(bias=randn((D,), wd, seed + 2) if c["bias"] else None)
    kw["cls_token"] = randn((1, 1, D), wd, seed + 3) if c["cls"] else None
    if c["pos"] != "none":
        T = N + (1 if c["cls"] and c["pos"] == "all" else 0)
        kw["pos_embed"] = randn((1, T, D), wd, seed + 4)
    else:
        kw["pos_embed"] = None
    if c["stats"] != "none":
        mean = [0.1 * (i + 1) for i in range(C)]
        std = [0.2 + 0.1 * i for i in range(C)]
        if c["stats"] == "tensor":
            mean, std = torch.tensor(mean), torch.tensor(std)
        kw.update(mean=mean, std=std)
    return images, weight, kw


def _ref(images, weight, kw, dtype=None):
    cast = (lambda t: t if t is None or not isinstance(t, torch.Tensor) or not t.is_floating_point()
            else t.to(dtype)) if dtype else (lambda t: t)
    # the eager chain computes in the weight's dtype (float64 here: the reference)
    return patch_embed_ref(cast(images), cast(weight), cast(kw["bias"]), cls_token=cast(kw["cls_token"]),
                           pos_embed=cast(kw["pos_embed"]), mean=kw.get("mean"), std=kw.get("std"))


def _unit(c):
    return SCALE.get(c["kind"], 1.0) if c["img_dtype"] != torch.uint8 else 1.0


@FAST
@given(c=cases())
def test_forward_matches_reference(c):
    images, weight, kw = _build(c)
    got = patch_embed(images, weight, **kw)
    B, D = c["B"], c["D"]
    T = (c["H"] // c["p"]) * (c["W"] // c["p"]) + int(c["cls"])
    assert got.shape == (B, T, D) and got.dtype == c["w_dtype"]
    ref = _ref(images, weight, kw, torch.float64)
    eager = _ref(images, weight, kw) if c["w_dtype"] != torch.float16 else None  # fp16 conv: CPU-dependent
    # fp16 weights: the kernel computes in fp32 and rounds once, so one fp16 step is the bound
    assert_matches("tokens", got, eager, ref, c["w_dtype"], unit=max(_unit(c), 1.0))


@SLOW
@given(c=cases(backward=True))
def test_gradients_match_reference(c):
    images, weight, kw = _build(c)
    images = images.contiguous() if c["layout"] == "batch_expanded" else images
    leaves = {"images": images, "weight": weight, **{k: v for k, v in kw.items()
                                                     if isinstance(v, torch.Tensor) and k not in ("mean", "std")}}

    def run(dtype):
        ls = {k: v.detach().to(dtype or v.dtype).requires_grad_() for k, v in leaves.items()}
        args = {k: ls.get(k, v) for k, v in kw.items()}
        if dtype is None:
            out = patch_embed(ls["images"], ls["weight"], **args)
        else:
            out = _ref(ls["images"], ls["weight"], args)
        g = torch.Generator().manual_seed(c["seed"] + 9)
        # rounded to the kernel's output dtype first, so both runs see the same gradient
        dout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(c["w_dtype"])
        out.backward(dout.to(out.dtype))
        return out.detach(), {k: v.grad for k, v in ls.items()}

    got, g_got = run(None)
    ref, g_ref = run(torch.float64)
    wd = c["w_dtype"]
    for name in leaves:
        assert g_got[name] is not None, f"no gradient for {name}"
        assert g_got[name].dtype == leaves[name].dtype, name
        # eager same-dtype gradients are not a fair bar in fp16 on the CPU; the floor is one fp16 step
        dt = leaves[name].dtype
        # computed in fp32 (fp64 only when the weight is fp64), rounded to the leaf's dtype
        atol = 4e-3 if dt == torch.float16 else 1e-10 if dt == wd == torch.float64 else 1e-5
        assert_matches("d" + name, g_got[name], None, g_ref[name], dt, atol=atol)
    assert_matches("tokens", got, None, ref, wd, atol={torch.float16: 1e-3, torch.float32: 1e-5,
                                                       torch.float64: 1e-10}[wd])


@FAST
@given(B=st.integers(0, 2), C=st.integers(1, 4), p=st.integers(2, 6), gh=st.integers(1, 3), D=st.integers(1, 9),
       bad=st.sampled_from(("H_not_multiple", "W_not_multiple", "channels", "bias_len", "pos_len", "cls_len",
                            "stats_len", "weight_not_square")))
def test_invalid_shapes_raise_naming_the_argument(B, C, p, gh, D, bad):
    H = W = gh * p
    w = torch.zeros(D, C, p, p)
    images = torch.zeros(B, C, H, W)
    kw = {}
    names = {"H_not_multiple": "divisible", "W_not_multiple": "divisible", "channels": "channels",
             "bias_len": "bias", "pos_len": "pos_embed", "cls_len": "cls_token", "stats_len": "mean",
             "weight_not_square": "square"}
    if bad == "H_not_multiple":
        images = torch.zeros(B, C, H + 1, W)
    elif bad == "W_not_multiple":
        images = torch.zeros(B, C, H, W + p - 1)
    elif bad == "channels":
        w = torch.zeros(D, C + 1, p, p)
    elif bad == "bias_len":
        kw["bias"] = torch.zeros(D + 1)
    elif bad == "pos_len":
        kw["pos_embed"] = torch.zeros(1, gh * gh + 2, D)
    elif bad == "cls_len":
        kw["cls_token"] = torch.zeros(1, 1, D + 1)
    elif bad == "stats_len":
        kw.update(mean=[0.5] * (C + 1), std=[0.5] * C)
    else:
        w = torch.zeros(D, C, p, p - 1)
    with pytest.raises(ValueError) as info:
        patch_embed(images, w, **kw)
    assert names[bad] in str(info.value) and "vitfast.patch_embed" in str(info.value), str(info.value)


def test_zero_size_inputs_return_empty_results():
    w = torch.randn(6, 3, 4, 4)
    assert patch_embed(torch.zeros(0, 3, 8, 8), w).shape == (0, 4, 6)
    assert patch_embed(torch.zeros(2, 3, 0, 8), w).shape == (2, 0, 6)
    out = patch_embed(torch.zeros(2, 3, 0, 8), w, cls_token=torch.ones(1, 1, 6))
    assert out.shape == (2, 1, 6) and torch.equal(out, torch.ones(2, 1, 6))
    assert patch_embed(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(0, 3, 4, 4)).shape == (2, 4, 0)


# Regression: the dispatcher drops trailing None arguments, so ctx.needs_input_grad is shorter
# than the op's 7 inputs when pos_embed (and cls_token, bias) are not given; the backward used
# to index it past its end (IndexError; broke FastViT(reg_tokens>0) training, whose
# patch_embed call has no pos_embed).
@pytest.mark.parametrize("args", ["none", "bias", "bias_cls"])
def test_backward_without_trailing_optionals(args):
    w = torch.randn(6, 3, 4, 4, requires_grad=True)
    images = torch.randn(2, 3, 8, 8, requires_grad=True)
    kw = {}
    if args != "none":
        kw["bias"] = torch.zeros(6, requires_grad=True)
    if args == "bias_cls":
        kw["cls_token"] = torch.zeros(1, 1, 6, requires_grad=True)
    patch_embed(images, w, **kw).sum().backward()
    ref_w, ref_i = w.detach().clone().requires_grad_(), images.detach().clone().requires_grad_()
    patch_embed_ref(ref_i, ref_w, kw.get("bias"), cls_token=kw.get("cls_token")).sum().backward()
    torch.testing.assert_close(w.grad, ref_w.grad)
    torch.testing.assert_close(images.grad, ref_i.grad)


def test_backward_zero_size_batch():
    w = torch.randn(6, 3, 4, 4, requires_grad=True)
    patch_embed(torch.zeros(0, 3, 8, 8, requires_grad=True), w).sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w))


def test_fastvit_with_register_tokens_trains():
    # FastViT(reg_tokens>0) without no_embed_class calls patch_embed with no cls_token, pos_embed,
    # mean or std (it adds the prefix tokens and positions itself): the trailing-None backward case.
    from vitfast.models.vit import FastViT

    torch.manual_seed(0)
    model = FastViT(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=3,
                    reg_tokens=2)
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    assert model.patch_embed.proj.weight.grad is not None and model.reg_token.grad is not None
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters() if p.requires_grad)
