"""timm VisionTransformer APIs training code calls beyond the forward: set_input_size (fine-tune at
another resolution or patch size), patch dropout and _pos_embed, and the device/dtype factory
arguments. Compared with timm's own model on the same weights (float32 on the CPU)."""

import warnings

import pytest
import torch

timm = pytest.importorskip("timm")

from vitfast.models.convert import from_timm, to_timm  # noqa: E402
from vitfast.models.registry import create_model  # noqa: E402
from vitfast.models.vit import FastViT  # noqa: E402
from vitfast.modules.patch_embed import PatchDropout, resample_patch_weight  # noqa: E402

RTOL = 1e-4


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the CPU runs the reference paths, with a one-time warning
        yield


def _pair(name, **kw):
    t = timm.create_model(name, pretrained=False, **kw).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in t.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return t, from_timm(t)


@pytest.mark.parametrize("name,kw,img_size,patch_size", [
    ("vit_small_patch16_224", dict(depth=2, img_size=64), 96, None),           # fine-tune at a higher resolution
    ("vit_small_patch16_224", dict(depth=2, img_size=64), (48, 80), None),     # non-square
    ("vit_small_patch14_reg4_dinov2", dict(depth=1, img_size=56), 84, None),   # no_embed_class, register tokens
    ("vit_small_patch16_224", dict(depth=1, img_size=64), 64, 8),              # FlexiViT: another patch size
    ("vit_small_patch16_224", dict(depth=1, img_size=64, class_token=False, global_pool="avg"), 80, 20),
])
def test_set_input_size_matches_timm(name, kw, img_size, patch_size):
    t, f = _pair(name, **kw)
    t.set_input_size(img_size=img_size if img_size is None or not isinstance(img_size, int) else (img_size,) * 2,
                     patch_size=patch_size)
    f.set_input_size(img_size=img_size, patch_size=patch_size)
    assert f.patch_embed.img_size == t.patch_embed.img_size
    assert f.patch_embed.patch_size == t.patch_embed.patch_size
    assert f.patch_embed.grid_size == t.patch_embed.grid_size and f.pos_embed.shape == t.pos_embed.shape
    assert rel_err(f.pos_embed, t.pos_embed) <= RTOL
    assert rel_err(f.patch_embed.proj.weight, t.patch_embed.proj.weight) <= RTOL
    x = torch.randn(2, 3, *t.patch_embed.img_size)
    with torch.no_grad():
        assert rel_err(f(x), t(x)) <= RTOL
    # the config describes the resized architecture; the resized weights load into it
    g = FastViT(**f.config)
    g.load_state_dict(f.state_dict())
    assert [i["reduction"] for i in f.feature_info] == [f.patch_embed.patch_size[0]] * len(f.blocks)


def test_set_input_size_keeps_what_it_should():
    f = create_model("vit_small_patch16_224", depth=1, img_size=64)
    f.patch_embed.proj.weight.requires_grad_(False)
    f.pos_embed.requires_grad_(False)
    f.train()
    cfg = dict(f.pretrained_cfg)
    f.set_input_size(96, 8)
    assert not f.patch_embed.proj.weight.requires_grad and not f.pos_embed.requires_grad
    assert f.patch_embed.proj.training and f.pretrained_cfg == cfg  # as timm: pretrained_cfg describes the checkpoint
    before = {k: v.clone() for k, v in f.state_dict().items()}
    for bad in (dict(img_size=100), dict(patch_size=(8, 16)), dict(img_size=96, patch_size=10)):
        with pytest.raises(ValueError, match="img_size|patch_size"):
            f.set_input_size(**bad)
    after = f.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert f.patch_embed.img_size == (96, 96) and f.patch_embed.patch_size == (8, 8)


@pytest.mark.parametrize("old,new", [(16, 8), (8, 16), (14, 16), (16, 14)])
def test_resample_patch_weight_preserves_projections(old, new):
    """FlexiViT's property: a patch resized to the new size projects as the original patch did.
    Exact (up to float error) when upsampling, where the resize is injective; the least-squares
    fit otherwise, checked against a direct float64 solve."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 3, old, old, generator=g, dtype=torch.float64)
    w2 = resample_patch_weight(w, (new, new))
    assert w2.shape == (6, 3, new, new) and w2.dtype == torch.float64
    x = torch.randn(5, 3, old, old, generator=g, dtype=torch.float64)
    xr = torch.nn.functional.interpolate(x, size=(new, new), mode="bicubic", antialias=True, align_corners=False)
    a = torch.einsum("bchw,dchw->bd", x, w)
    b = torch.einsum("bchw,dchw->bd", xr, w2)
    if new >= old:
        assert (a - b).abs().max() <= 1e-8 * a.abs().max()
    else:  # w2 minimises ||R^T w2 - w||: R^T (w2 - that minimiser) is zero
        basis = torch.eye(old * old, dtype=torch.float64).reshape(-1, 1, old, old)
        R = torch.nn.functional.interpolate(basis, size=(new, new), mode="bicubic", antialias=True,
                                            align_corners=False).reshape(old * old, -1)  # rows: R^T
        sol = torch.linalg.lstsq(R, w.reshape(18, -1).t()).solution.t()
        assert (R @ (w2.reshape(18, -1) - sol).t()).abs().max() <= 1e-8 * w.abs().max()
    w32 = resample_patch_weight(w.float(), (new, new))
    assert w32.dtype == torch.float32 and rel_err(w32, w2) <= 1e-4


@pytest.mark.parametrize("reg", [0, 4])
def test_patch_dropout_matches_timm(reg):
    t, f = _pair("vit_small_patch16_224", depth=2, img_size=64, reg_tokens=reg, patch_drop_rate=0.25)
    assert isinstance(f.patch_drop, PatchDropout) and f.config["patch_drop_rate"] == 0.25
    t.train(), f.train()
    x = torch.randn(3, 3, 64, 64)
    torch.manual_seed(1)
    ft = t.forward_features(x)
    torch.manual_seed(1)
    ff = f.forward_features(x)
    # 16 patches, 12 kept (int(16 * 0.75)), the prefix tokens always
    assert ff.shape == ft.shape == (3, 1 + reg + 12, 384)
    assert rel_err(ff, ft) <= RTOL
    t.eval(), f.eval()
    with torch.no_grad():
        assert f.forward_features(x).shape[1] == 1 + reg + 16
        assert rel_err(f(x), t(x)) <= RTOL
    # and back to timm with it
    assert to_timm(f).patch_drop.prob == 0.25


def test_patch_dropout_keeps_prefix_and_draws_patches():
    pd = PatchDropout(0.5, num_prefix_tokens=2, ordered=True).train()
    x = torch.arange(2 * 10, dtype=torch.float32).reshape(1, 10, 2).expand(4, -1, -1).contiguous()
    y = pd(x)
    assert y.shape == (4, 2 + 4, 2)
    assert torch.equal(y[:, :2], x[:, :2])
    kept = y[:, 2:, 0] / 2  # the token indices kept, in order
    assert torch.all(kept[:, 1:] > kept[:, :-1]) and torch.all(kept >= 2)
    assert torch.equal(pd.eval()(x), x)
    with pytest.raises(ValueError, match="patch_drop_rate"):
        PatchDropout(1.0)


def test_pos_embed_method_matches_timm():
    t, f = _pair("vit_small_patch14_reg4_dinov2", depth=1, img_size=56)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        tok = t.patch_embed(x)
        assert rel_err(f._pos_embed(f.patch_embed(x)), t._pos_embed(tok)) <= RTOL
    # timm's forward_features, spelled out, runs on FastViT too
    with torch.no_grad():
        y = f.norm(f.blocks(f.norm_pre(f.patch_drop(f._pos_embed(f.patch_embed(x))))))
        assert rel_err(y, t.forward_features(x)) <= RTOL


def test_device_and_dtype_factory_arguments():
    m = FastViT(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10, device="meta")
    assert all(p.device.type == "meta" for p in m.parameters())
    assert "device" not in m.config and "dtype" not in m.config
    m.to_empty(device="cpu")
    assert m.pixel_mean.device.type == "cpu" and torch.equal(m.pixel_mean, torch.full((3,), 0.5))
    h = FastViT(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in h.parameters()) and h.pixel_mean.dtype == torch.float32
    with torch.no_grad():
        assert h(torch.randn(1, 3, 32, 32, dtype=torch.float64)).dtype == torch.float64
    c = create_model("vit_small_patch16_224", depth=1, img_size=32, device="meta")
    assert c.pos_embed.device.type == "meta"
    with pytest.raises(ValueError, match="dtype"):
        FastViT(depth=1, dtype=torch.int32)


def test_forward_intermediates_output_dict_matches_timm():
    t, f = _pair("vit_small_patch14_reg4_dinov2", depth=2, img_size=56)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        for kw in (dict(), dict(return_prefix_tokens=True, indices=1), dict(intermediates_only=True, output_fmt="NLC")):
            dt = t.forward_intermediates(x, output_dict=True, **kw)
            df = f.forward_intermediates(x, output_dict=True, **kw)
            assert df.keys() == dt.keys()
            for k in dt:
                a, b = df[k], dt[k]
                for u, v in zip(a, b) if isinstance(b, list) else [(a, b)]:
                    assert u.shape == v.shape and rel_err(u, v) <= RTOL


def test_map_pool_gradients_and_head_rules_match_timm():
    """SigLIP's attention-pooling head ("map"): gradients as timm's, and timm's rules for it in
    reset_classifier / prune_intermediate_layers; a state dict with attn_pool.* builds a "map" model."""
    from vitfast.models.convert import config_from_state_dict

    t, f = _pair("vit_base_patch16_siglip_224", depth=1, img_size=32, num_classes=5)
    assert f.global_pool == "map" and f.attn_pool is not None
    t.train(), f.train()
    x = torch.randn(3, 3, 32, 32)
    y = torch.tensor([1, 4, 0])
    for m in (t, f):
        torch.nn.functional.cross_entropy(m(x), y).backward()
    tg = dict(t.named_parameters())
    for n, p in f.named_parameters():
        assert p.grad is not None and rel_err(p.grad, tg[n].grad) <= 1e-3, n
    cfg = config_from_state_dict(t.state_dict(), num_heads=12)
    assert cfg["global_pool"] == "map" and not cfg["class_token"]
    FastViT(**cfg).load_state_dict(t.state_dict())
    with pytest.raises(ValueError, match="cannot add attention pooling"):
        create_model("vit_small_patch16_224", depth=1, img_size=32).reset_classifier(3, "map")
    f.reset_classifier(7)  # keeps the pool, as timm's
    assert f.attn_pool is not None and f(x).shape == (3, 7)
    f.reset_classifier(7, "avg")  # removes it
    t.reset_classifier(7, "avg")
    assert f.attn_pool is None and t.attn_pool is None and f(x).shape == (3, 7)
    g = create_model("vit_base_patch16_siglip_224", depth=2, img_size=32)
    g.prune_intermediate_layers(1)
    assert g.attn_pool is None and g.num_classes == 0
    with pytest.raises(ValueError, match="pool_type='map'"):
        g.pool(torch.randn(1, 4, 768), "map")


def test_bf16_and_meta_init_draw_in_float32():
    """Initialised in bfloat16 (meta device, to_empty, init_weights): the draws are made in float32
    and rounded once (in 16 bits erfinv of a uniform rounded to +-1 is +-inf: values at the +-2
    bounds, 100 std out)."""
    m = FastViT(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10,
                device="meta", dtype=torch.bfloat16)
    m.to_empty(device="cpu")
    torch.manual_seed(0)
    m.init_weights()
    for name in ("pos_embed", "blocks.0.attn.qkv.weight", "head.weight"):
        p = m.get_parameter(name).float()
        assert p.abs().max() < 0.15 and abs(p.std().item() / 0.02 - 1) < 0.1, name


def test_meta_load_with_assign_then_move():
    """device='meta' + load_state_dict(assign=True): the uint8 path's statistics follow the
    weights (they are constants, not in the state dict)."""
    src = FastViT(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2, num_classes=3).eval()
    m = FastViT(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2, num_classes=3, device="meta")
    m.load_state_dict(src.state_dict(), assign=True)
    assert m.pixel_mean.device.type == "cpu"
    u = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(m.eval()(u), src(u))
    m.to(torch.float64)
    assert m.pixel_mean.dtype == torch.float32 and m.pos_embed.dtype == torch.float64


def test_timm_input_traits_follow_set_input_size():
    from timm.data.model_config import resolve_input_data_config

    f = create_model("vit_tiny_patch16_224", depth=1)
    f.set_input_size(img_size=96)
    assert resolve_input_data_config(f)["input_size"] == (3, 96, 96)


def test_init_conversions_and_compat():
    """from_timm/to_timm keep how init_weights() re-initialises (mode, fix_init, init_values);
    timm's _init_weights(m) works; "reset" reaches the attention pool's latent."""
    t = timm.create_model("vit_small_patch16_224", depth=2, img_size=32, init_values=0.1, weight_init="jax",
                          fix_init=True, num_classes=4)
    f = from_timm(t)
    assert (f.weight_init_mode, f.fix_init, f.config["init_values"]) == ("jax", True, 0.1)
    f.init_weights()
    assert not f.head.weight.any() and torch.equal(f.blocks[0].ls1.gamma, torch.full((384,), 0.1))
    b = to_timm(f)
    assert (b.weight_init_mode, b.fix_init, b.blocks[0].ls1.init_values) == ("jax", True, 0.1)
    lin = torch.nn.Linear(300, 300)
    f._init_weights(lin)
    assert not lin.bias.any() and abs(lin.weight.std().item() / 0.02 - 1) < 0.05
    s = FastViT(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2, class_token=False,
                global_pool="map", weight_init="skip", device="meta")
    s.to_empty(device="cpu")
    s.init_weights()  # "reset", as timm's: every module's reset_parameters, the latent's included
    assert torch.isfinite(s(torch.randn(1, 3, 32, 32))).all()


def test_patch_dropout_fx_and_nchw_intermediates():
    f = create_model("vit_small_patch16_224", depth=1, img_size=32, patch_drop_rate=0.5).train()
    g = torch.fx.symbolic_trace(f)  # the draw is a graph leaf: traceable in training too
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    a = g(x)
    torch.manual_seed(0)
    assert rel_err(a, f(x)) <= RTOL  # the same tokens dropped (the graph calls each block, eager fuses them)
    with pytest.raises(ValueError, match="output_fmt='NLC'"):
        f.forward_intermediates(x)
    assert f.forward_intermediates(x, output_fmt="NLC")[1][0].shape == (2, 2, 384)


def test_old_pickles_and_size_errors(tmp_path):
    f = create_model("vit_small_patch16_224", depth=1, img_size=32).eval()
    for name in ("weight_init_mode", "fix_init", "attn_pool"):  # as a vitfast before them pickled it
        f.__dict__.pop(name, None)
        f._modules.pop(name, None)
    del f._modules["patch_drop"]
    torch.save(f, tmp_path / "m.pt")
    g = torch.load(tmp_path / "m.pt", weights_only=False)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert g(x).shape == (1, 1000) and g.weight_init_mode == "" and g.attn_pool is None
    for bad in (dict(img_size=0), dict(img_size=(32, 32, 3)), dict(img_size=32.0), dict(patch_size=(8, 8, 8))):
        with pytest.raises(ValueError, match="must be a positive int or a pair"):
            g.set_input_size(**bad)
