"""FastViT against timm's VisionTransformer: same weights, same numbers (float32 on the CPU)."""

import warnings

import pytest
import torch

timm = pytest.importorskip("timm")

from vitfast.models.convert import from_timm  # noqa: E402
from vitfast.models.vit import FastViT  # noqa: E402
from vitfast.models.registry import create_model  # noqa: E402

RTOL = 1e-4

# (id, timm name, overrides, input H, W). depth is cut to keep the CPU time small: what matters
# is the architecture of a block (widths, head dim, norms, tokens), which every block shares.
CONFIGS = [
    ("tiny16", "vit_tiny_patch16_224", dict(depth=2), 224, 224),
    ("small32_384", "vit_small_patch32_384", dict(depth=2), 384, 384),
    ("base16", "vit_base_patch16_224", dict(depth=2), 224, 224),
    ("huge14_hd80", "vit_huge_patch14_224", dict(depth=1, num_classes=10), 224, 224),
    ("base16_reg4_gap", "vit_base_patch16_reg4_gap_256", dict(depth=2), 256, 256),
    ("qknorm_layerscale", "vit_small_patch16_224", dict(depth=2, qk_norm=True, init_values=0.1), 224, 224),
    ("clip_prenorm", "vit_base_patch16_clip_224", dict(depth=2), 224, 224),
    ("clip_quickgelu", "vit_base_patch32_clip_quickgelu_224", dict(depth=2), 224, 224),
    ("noclass_avg", "vit_small_patch16_224", dict(depth=2, class_token=False, global_pool="avg"), 224, 224),
    ("dynamic_nonsquare", "vit_small_patch16_224", dict(depth=2, dynamic_img_size=True), 160, 272),
    ("dino_reg_noembedclass", "vit_small_patch14_reg4_dinov2", dict(depth=2, img_size=224), 224, 224),
    ("siglip_map", "vit_base_patch16_siglip_224", dict(depth=2, num_classes=10), 224, 224),
    ("so400m_hd72_map", "vit_so400m_patch14_siglip_224", dict(depth=1, img_size=56), 56, 56),
]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial values everywhere (LayerNorm affine, biases, LayerScale, tokens)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name and name.endswith("weight") or name.endswith("gamma")):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.02 if p.dim() > 1 else 0.05))


def _grads(m):
    return {n: p.grad for n, p in m.named_parameters()}


def timm_and_fast(name, overrides, seed=0):
    t = timm.create_model(name, pretrained=False, **overrides).eval()
    _randomize(t, seed)
    return t, from_timm(t)


@pytest.mark.parametrize("cid,name,overrides,H,W", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_matches_timm(cid, name, overrides, H, W):
    t, f = timm_and_fast(name, overrides)
    f.set_backend("reference")
    x = torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ft, ff = t.forward_features(x), f.forward_features(x)
        assert ff.shape == ft.shape
        assert rel_err(ff, ft) <= RTOL
        assert rel_err(f.forward_head(ff, pre_logits=True), t.forward_head(ft, pre_logits=True)) <= RTOL
        assert rel_err(f(x), t(x)) <= RTOL
    # the auto backend (CPU: fused patch embedding; attention falls back with a warning) agrees too
    f.set_backend("auto")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            assert rel_err(f(x), t(x)) <= RTOL
    assert f.state_dict().keys() == t.state_dict().keys()


def test_gradients_match_timm(assert_grads_close):
    t, f = timm_and_fast("vit_small_patch16_224", dict(depth=2, qk_norm=True, init_values=0.1, img_size=64))
    t.train(), f.train()
    x = torch.randn(3, 3, 64, 64)
    y = torch.tensor([1, 5, 7])
    for m in (t, f):
        torch.nn.functional.cross_entropy(m(x), y).backward()
    assert_grads_close(_grads(f), _grads(t), RTOL)


def test_attention_kernel_matches_timm_with_grads(assert_grads_close):
    """backend="kernels": the Triton attention kernel (interpreted on the CPU) and the fused patch
    embedding give timm's outputs and gradients; head dims 64 and 80, qk_norm through the unpacked op."""
    for name, ov in (("vit_small_patch16_224", dict(depth=1, img_size=48)),
                     ("vit_huge_patch14_224", dict(depth=1, img_size=28, qk_norm=True, num_classes=4))):
        t, f = timm_and_fast(name, ov)
        f.set_backend("kernels")  # attention and the fused patch embedding (with its backward) forced
        x = torch.randn(2, 3, *t.patch_embed.img_size)
        out = f(x)
        ref = t(x)
        assert rel_err(out, ref) <= RTOL
        out.square().sum().backward()
        ref.square().sum().backward()
        assert_grads_close(_grads(f), _grads(t), RTOL)


def test_forward_intermediates_match_timm():
    t, f = timm_and_fast("vit_base_patch16_reg4_gap_256", dict(depth=3, img_size=64))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for kw in (dict(), dict(indices=2, norm=True, output_fmt="NLC"),
                   dict(indices=[0, -1], return_prefix_tokens=True, stop_early=True)):
            ft, it = t.forward_intermediates(x, **kw)
            ff, iff = f.forward_intermediates(x, **kw)
            assert rel_err(ff, ft) <= RTOL
            assert len(iff) == len(it)
            for a, b in zip(iff, it):
                for u, v in zip(a, b) if isinstance(a, tuple) else [(a, b)]:
                    assert u.shape == v.shape and rel_err(u, v) <= RTOL
        only = f.forward_intermediates(x, indices=1, intermediates_only=True)
        assert len(only) == 1 and only[0].shape == (2, 768, 4, 4)
    with pytest.raises(ValueError, match="out of range"):
        f.forward_intermediates(x, indices=[5])


def test_dynamic_size_resamples_pos_embed_like_timm():
    t, f = timm_and_fast("vit_base_patch16_reg4_gap_256", dict(depth=1, dynamic_img_size=True))
    for H, W in ((128, 320), (256, 256), (16, 48)):
        x = torch.randn(1, 3, H, W)
        with torch.no_grad():
            assert rel_err(f(x), t(x)) <= RTOL


def test_uint8_equals_normalised_float():
    f = create_model("vit_small_patch16_224", depth=1, img_size=64, mean=(0.485, 0.456, 0.406),
                     std=(0.229, 0.224, 0.225)).eval()
    u = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    xf = (u.float() / 255 - mean) / std
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for backend in ("auto", "reference"):
            f.set_backend(backend)
            with torch.no_grad():
                assert rel_err(f(u), f(xf)) <= RTOL
    # default statistics come from the pretrained config (CLIP's for a CLIP tower) and stay
    # float32 when the model is cast
    clip = create_model("vit_base_patch16_clip_224", depth=1).to(torch.bfloat16)
    assert clip.pretrained_cfg["mean"] == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert clip.pixel_mean.dtype == torch.float32
    assert clip.pixel_mean.tolist() == pytest.approx([0.48145466, 0.4578275, 0.40821073], rel=1e-7)
    assert clip.pos_embed.dtype == torch.bfloat16


def test_config_round_trip_and_reset_classifier():
    f = create_model("vit_base_patch16_reg4_gap_256", depth=2, img_size=(64, 96), drop_path_rate=0.1,
                     qk_norm=True, init_values=1e-4)
    g = FastViT(**f.config)
    assert g.config == f.config
    g.load_state_dict(f.state_dict())
    f.eval(), g.eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(f(x), g(x))
    f.reset_classifier(7, global_pool="max")
    assert f.head.out_features == 7 and f(x).shape == (1, 7)
    h = FastViT(**f.config)
    assert h.head.out_features == 7 and h.global_pool == "max"
    assert [k for k in h.state_dict()] == [k for k in f.state_dict()]
    f.reset_classifier(0)
    assert f(x).shape == (1, 768)
    assert f.no_weight_decay() == {"pos_embed", "cls_token", "reg_token"}


@pytest.mark.parametrize(
    "x,err,match",
    [
        (torch.randn(1, 3, 64, 64), ValueError, "does not match the model's img_size 32x32"),
        (torch.randn(1, 1, 32, 32), ValueError, "1 channels, the model expects in_chans=3"),
        (torch.randn(3, 32, 32), ValueError, r"\[B, C, H, W\]"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.int32), TypeError, "uint8 .* or floating point"),
    ],
)
def test_bad_images_raise(x, err, match):
    f = FastViT(img_size=32, patch_size=16, embed_dim=64, depth=1, num_heads=2)
    with pytest.raises(err, match=match):
        f(x)


def test_bad_constructor_args_raise():
    with pytest.raises(ValueError, match="global_pool='token' needs class_token"):
        FastViT(class_token=False, global_pool="token")
    with pytest.raises(ValueError, match="global_pool must be one of"):
        FastViT(global_pool="prr")  # timm's other attention pool: not in FastViT
    with pytest.raises(ValueError, match="backend must be one of"):
        FastViT(backend="cuda")
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        FastViT(img_size=100, patch_size=16)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        FastViT(embed_dim=100, num_heads=3)
    dyn = FastViT(img_size=32, patch_size=16, embed_dim=64, depth=1, num_heads=2, dynamic_img_size=True)
    with pytest.raises(ValueError, match="not a positive multiple of the patch size 16"):
        dyn(torch.randn(1, 3, 40, 32))


@pytest.mark.parametrize("dynamic", [False, True])
def test_hooks_on_patch_embed_fire(dynamic):
    """Hooks on patch_embed / patch_embed.proj fire (the module is called, with timm's output:
    [B, N, D], NHWC with a dynamic image size) and change nothing; FX traces keep their names."""
    t, f = timm_and_fast("vit_small_patch16_224", dict(depth=1, img_size=32, reg_tokens=1, dynamic_img_size=dynamic))
    f.set_backend("reference")
    x = torch.randn(2, 3, 32, 48) if dynamic else torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = t(x)
        assert rel_err(f(x), ref) <= RTOL
        outs = {}
        for name, sub in (("patch_embed", f.patch_embed), ("proj", f.patch_embed.proj)):
            sub.register_forward_hook(lambda mod, i, o, name=name: outs.setdefault(name, []).append(o))
        assert rel_err(f(x), ref) <= RTOL
        assert [len(v) for v in outs.values()] == [1, 1]
        assert torch.equal(f.patch_embed(x), t.patch_embed(x))  # timm's PatchEmbed.forward
        assert outs["patch_embed"][0].shape == t.patch_embed(x).shape
        u = torch.randint(0, 256, (2, 3, *x.shape[-2:]), dtype=torch.uint8)
        assert rel_err(f(u), f((u / 255.0 - 0.5) / 0.5)) <= RTOL
        fx = pytest.importorskip("torchvision.models.feature_extraction")
        got = fx.create_feature_extractor(f, ["patch_embed", "blocks.0", "norm"])(x)
        want = {}
        for k in got:  # timm's outputs of those modules (its dynamic-size model does not FX-trace)
            t.get_submodule(k).register_forward_hook(lambda mod, i, o, k=k: want.setdefault(k, o))
        t(x)
        for k in got:
            assert rel_err(got[k], want[k]) <= RTOL, k


def test_get_intermediate_layers_matches_timm():
    t, f = timm_and_fast("vit_base_patch16_reg4_gap_256", dict(depth=3, img_size=64))
    x = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(20, 20, dtype=torch.bool).fill_diagonal_(True) | (torch.rand(20, 20) > 0.5)
    with torch.no_grad():
        for args, kw in (((x,), {}), ((x, 2), dict(reshape=True, norm=True)), ((x, [0, 2], True, True), {}),
                         ((x,), dict(n=[1], attn_mask=mask))):
            got, want = f.get_intermediate_layers(*args, **kw), t.get_intermediate_layers(*args, **kw)
            assert len(got) == len(want)
            for a, b in zip(got, want):
                for u, v in zip(a, b) if isinstance(a, tuple) else [(a, b)]:
                    assert u.shape == v.shape and rel_err(u, v) <= RTOL


def test_unknown_pool_type_raises():
    f = FastViT(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match=r"pool_type must be one of .*'avgmax'.*got 'mean'"):
        f.pool(torch.randn(1, 5, 32), "mean")
