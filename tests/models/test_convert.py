"""Conversions (timm, torchvision, Hugging Face) and checkpoint files reproduce the source model."""

import re

import pytest
import torch

timm = pytest.importorskip("timm")

from vitfast.models.weights import CheckpointMismatch, load_weights, read_state_dict  # noqa: E402
from vitfast.models.convert import detect_layout, from_hf, from_timm, from_torchvision  # noqa: E402
from vitfast.models.registry import create_model  # noqa: E402

RTOL = 1e-4


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm_weight = p.dim() == 1 and re.search(r"(norm|ln_\d|\.ln|layernorm\w*)\.weight$", name)
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if p.dim() == 1 else 0.05) + (1.0 if is_norm_weight else 0.0))


# ----------------------------------------------------------------------------- timm
def test_from_timm_keeps_config_and_weights():
    t = timm.create_model("vit_base_patch16_clip_quickgelu_224", depth=2, img_size=64, drop_path_rate=0.1).eval()
    f = from_timm(t)
    assert f.config["act_layer"] == "quick_gelu" and f.config["norm_eps"] == 1e-5 and f.config["pre_norm"]
    assert f.config["mean"] == pytest.approx(t.pretrained_cfg["mean"]) and f.config["drop_path_rate"] == 0.1
    assert not f.training
    for (kt, vt), (kf, vf) in zip(t.state_dict().items(), f.state_dict().items()):
        assert kt == kf and torch.equal(vt, vf)
    assert f.pos_embed is not t.pos_embed  # a copy: training one does not move the other


def test_from_timm_lists_unsupported_features():
    t = timm.create_model("vit_small_patch16_224", depth=1, img_size=32, global_pool="prr", patch_drop_rate=0.1,
                          dynamic_img_pad=True)
    t.patch_drop.ordered = True  # FastViT's patch dropout is timm's default (unordered) one
    with pytest.raises(ValueError, match=r"(?s)global_pool='prr'.*patch dropout other than.*dynamic_img_pad"):
        from_timm(t)
    with pytest.raises(TypeError, match="expected a timm VisionTransformer"):
        from_timm(torch.nn.Linear(2, 2))


# ----------------------------------------------------------------------- torchvision
torchvision = pytest.importorskip("torchvision")


def _torchvision_vit(depth=2, num_classes=10):
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    m = VisionTransformer(image_size=64, patch_size=16, num_layers=depth, num_heads=12, hidden_dim=768,
                          mlp_dim=3072, num_classes=num_classes).eval()
    _randomize(m)  # torchvision zero-initialises the head: give every weight a value
    return m


def test_from_torchvision_reproduces_outputs():
    tv = _torchvision_vit()
    f = from_torchvision(tv)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(f(x), tv(x)) <= RTOL
    # vit_b_16 itself builds and converts (random weights: nothing is downloaded)
    big = torchvision.models.vit_b_16()
    assert from_torchvision(big).config["depth"] == 12


def test_from_torchvision_state_dict_and_checkpoint_file(tmp_path):
    tv = _torchvision_vit()
    f = from_torchvision(tv.state_dict())  # num_heads: 768 / 64
    x = torch.randn(1, 3, 64, 64)
    path = tmp_path / "tv.pth"
    torch.save({"model": tv.state_dict(), "epoch": 3}, path)
    assert detect_layout(read_state_dict(path)) == "torchvision"
    g = create_model("vit_base_patch16_224", img_size=64, depth=2, num_classes=10, checkpoint_path=str(path))
    with torch.no_grad():
        ref = tv(x)
        assert rel_err(f(x), ref) <= RTOL
        g.pixel_mean.zero_()
        assert rel_err(g(x), ref) <= RTOL


# ----------------------------------------------------------------------- Hugging Face
def _hf():
    return pytest.importorskip("transformers", reason="transformers is a test-only dependency (pip install transformers)")


def _hf_config(tr, **kw):
    return tr.ViTConfig(hidden_size=160, num_hidden_layers=2, num_attention_heads=2, intermediate_size=320,
                        image_size=64, patch_size=16, **kw)


def _to_v4_keys(sd):
    """transformers v5 key names -> the v4 names found in most Hub checkpoints."""
    rules = [(r"layers\.(\d+)\.attention\.(q|k|v)_proj\.",
              lambda m: f"encoder.layer.{m[1]}.attention.attention.{dict(q='query', k='key', v='value')[m[2]]}."),
             (r"layers\.(\d+)\.attention\.o_proj\.", lambda m: f"encoder.layer.{m[1]}.attention.output.dense."),
             (r"layers\.(\d+)\.mlp\.fc1\.", lambda m: f"encoder.layer.{m[1]}.intermediate.dense."),
             (r"layers\.(\d+)\.mlp\.fc2\.", lambda m: f"encoder.layer.{m[1]}.output.dense."),
             (r"layers\.(\d+)\.", lambda m: f"encoder.layer.{m[1]}.")]
    out = {}
    for k, v in sd.items():
        for pat, rep in rules:
            k2 = re.sub(pat, rep, k, count=1)
            if k2 != k:
                k = k2
                break
        out[k] = v
    return out


def test_from_hf_classification_reproduces_logits():
    tr = _hf()
    torch.manual_seed(0)
    h = tr.ViTForImageClassification(_hf_config(tr, num_labels=7)).eval()
    _randomize(h)
    f = from_hf(h)
    assert f.config["norm_eps"] == 1e-12 and f.config["num_heads"] == 2 and f.head.out_features == 7
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(f(x), h(pixel_values=x).logits) <= RTOL


def test_from_hf_model_features_and_v4_state_dict(tmp_path):
    tr = _hf()
    torch.manual_seed(0)
    cfg = _hf_config(tr, hidden_act="gelu_new")
    h = tr.ViTModel(cfg).eval()
    _randomize(h)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = h(pixel_values=x).last_hidden_state
        f = from_hf(h)
        assert f.num_classes == 0 and f.config["act_layer"] == "gelu_tanh"
        assert rel_err(f.forward_features(x), ref) <= RTOL
        v4 = _to_v4_keys(h.state_dict())
        assert any(".attention.attention.query." in k for k in v4)
        g = from_hf(v4, config=cfg)
        assert rel_err(g.forward_features(x), ref) <= RTOL
    from safetensors.torch import save_file

    path = tmp_path / "hf.safetensors"
    save_file({k: v.contiguous() for k, v in v4.items()}, str(path))
    m = create_model("vit_base_patch16_224", img_size=64, embed_dim=160, num_heads=2, depth=2, mlp_ratio=2.0,
                     num_classes=0, norm_eps=1e-12, act_layer="gelu_tanh", checkpoint_path=str(path))
    with torch.no_grad():
        assert rel_err(m.forward_features(x), ref) <= RTOL


# --------------------------------------------------------------------- checkpoint files
def test_timm_checkpoint_files_load(tmp_path):
    from safetensors.torch import save_file

    t = timm.create_model("vit_small_patch16_224", depth=1, img_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    for name, save in (("m.safetensors", lambda p: save_file(t.state_dict(), p)),
                       ("m.bin", lambda p: torch.save({f"module.{k}": v for k, v in t.state_dict().items()}, p))):
        path = str(tmp_path / name)
        save(path)
        f = create_model("vit_small_patch16_224", depth=1, img_size=64, checkpoint_path=path).eval()
        with torch.no_grad():
            assert rel_err(f(x), t(x)) <= RTOL


def test_checkpoint_from_another_resolution_resamples_pos_embed(tmp_path):
    t = timm.create_model("vit_small_patch16_224", depth=1, img_size=32)
    path = str(tmp_path / "m.pth")
    torch.save(t.state_dict(), path)
    f = create_model("vit_small_patch16_224", depth=1, img_size=64, checkpoint_path=path)
    assert f.pos_embed.shape == (1, 17, 384)
    assert torch.equal(f.pos_embed[:, :1], t.pos_embed[:, :1])  # the class token's entry is kept


def test_num_classes_override_keeps_body_drops_head(tmp_path):
    t = timm.create_model("vit_small_patch16_224", depth=1, img_size=32)
    path = str(tmp_path / "m.pth")
    torch.save(t.state_dict(), path)
    f = create_model("vit_small_patch16_224", depth=1, img_size=32, num_classes=5, checkpoint_path=path)
    assert f.head.out_features == 5 and torch.equal(f.blocks[0].attn.qkv.weight, t.blocks[0].attn.qkv.weight)


def test_bad_checkpoints_list_every_key(tmp_path):
    t = timm.create_model("vit_small_patch16_224", depth=2, img_size=32)
    sd = t.state_dict()
    del sd["blocks.1.norm2.bias"]
    sd["blocks.0.attn.qkv.weight"] = sd["blocks.0.attn.qkv.weight"][:-1]
    sd["extra.weight"] = torch.zeros(1)
    f = create_model("vit_small_patch16_224", depth=2, img_size=32)
    with pytest.raises(CheckpointMismatch) as e:
        load_weights(f, sd)
    msg = str(e.value)
    assert "missing keys (1): blocks.1.norm2.bias" in msg
    assert "unexpected keys (1): extra.weight" in msg
    assert "blocks.0.attn.qkv.weight (checkpoint [1151, 384], model [1152, 384])" in msg
    with pytest.raises(ValueError, match="cannot tell the layout"):
        load_weights(f, {"foo": torch.zeros(1)})
    bad = tmp_path / "m.npz"
    bad.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"must end in \.safetensors"):
        load_weights(f, str(bad))
    with pytest.raises(FileNotFoundError):
        create_model("vit_small_patch16_224", checkpoint_path=str(tmp_path / "nope.pth"))
    pickled = tmp_path / "code.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": object()}, pickled)
    with pytest.raises(ValueError, match="weights_only=True"):
        read_state_dict(pickled)


# ------------------------------------------- keys a converter must drop or rename (issue 19)
@pytest.mark.parametrize("as_state_dict", [False, True])
def test_from_hf_drops_the_mask_token(as_state_dict):
    """ViTModel(use_mask_token=True) (masked-image-modelling backbones) carries
    ``embeddings.mask_token``, used only by bool_masked_pos: dropped, the rest reproduces the model."""
    tr = _hf()
    torch.manual_seed(0)
    h = tr.ViTModel(_hf_config(tr), use_mask_token=True).eval()
    _randomize(h)
    sd = h.state_dict()
    assert "embeddings.mask_token" in sd
    f = from_hf(_to_v4_keys(sd), config=h.config) if as_state_dict else from_hf(h)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(f.forward_features(x), h(pixel_values=x).last_hidden_state) <= RTOL


@pytest.mark.parametrize("legacy", [False, True], ids=["mlp.0/3", "mlp.linear_1/2"])
def test_from_torchvision_reads_both_mlp_key_names(legacy):
    """torchvision named the MLP layers mlp.linear_1/linear_2 before 0.13 (mlp.0/mlp.3 since);
    checkpoints of both ages convert to the same model."""
    tv = _torchvision_vit()
    sd = tv.state_dict()
    if legacy:
        sd = {re.sub(r"\.mlp\.0\.", ".mlp.linear_1.", re.sub(r"\.mlp\.3\.", ".mlp.linear_2.", k)): v for k, v in sd.items()}
        assert any(".mlp.linear_1." in k for k in sd) and not any(".mlp.0." in k for k in sd)
    f = from_torchvision(sd)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(f(x), tv(x)) <= RTOL


# --------------------------------------- pos_embed resampled on load, every prefix layout
_PREFIX_LAYOUTS = [  # (timm name, image size saved, image size loaded, kwargs): class token and/or
    # registers, with the position embedding covering the prefix tokens or not (no_embed_class)
    ("vit_small_patch16_224", 32, 64, {}),                                       # cls, embedded
    ("vit_small_patch16_224", 32, 64, dict(class_token=False, global_pool="avg")),  # no prefix
    ("vit_small_patch14_reg4_dinov2", 56, 112, {}),                              # cls + 4 reg, not embedded
    ("vit_base_patch16_reg4_gap_256", 32, 64, {}),                               # 4 reg only, not embedded
]


@pytest.mark.parametrize("name,saved,loaded,kw", _PREFIX_LAYOUTS, ids=[f"{n}-{s}to{l}" + ("-gap" if k else "")
                                                                       for n, s, l, k in _PREFIX_LAYOUTS])
def test_checkpoint_from_another_resolution_loads_as_timm_does(tmp_path, name, saved, loaded, kw):
    """A checkpoint saved at one resolution loads at another exactly as timm's own loader
    (checkpoint_filter_fn) resamples it: the same pos_embed, the same outputs."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    kw = dict(depth=1, **kw)
    src = timm.create_model(name, img_size=saved, **kw)
    _randomize(src)
    path = str(tmp_path / "m.pth")
    torch.save(src.state_dict(), path)
    f = create_model(name, img_size=loaded, checkpoint_path=path, **kw).eval()
    t = timm.create_model(name, img_size=loaded, **kw).eval()
    t.load_state_dict(checkpoint_filter_fn(src.state_dict(), t))
    assert f.pos_embed.shape == t.pos_embed.shape != src.pos_embed.shape
    assert rel_err(f.pos_embed, t.pos_embed) <= 1e-6
    x = torch.randn(2, 3, loaded, loaded)
    with torch.no_grad():
        f.pixel_mean.zero_(), f.pixel_std.fill_(1.0)  # timm takes normalised images
        assert rel_err(f.forward_features(x), t.forward_features(x)) <= RTOL


def test_class_token_checkpoint_with_fc_norm_pools_avg():
    """A class-token model with fc_norm (timm global_pool="avg", MAE-style fine-tunes) rebuilt from
    its state dict alone pools like timm, not from the class token."""
    from vitfast.models.convert import config_from_state_dict
    from vitfast.models.vit import FastViT

    t = timm.create_model("vit_small_patch16_224", depth=1, img_size=32, num_classes=4, global_pool="avg").eval()
    _randomize(t)
    cfg = config_from_state_dict(t.state_dict(), num_heads=6)
    assert cfg["global_pool"] == "avg"
    f = FastViT(**cfg, backend="reference").eval()
    load_weights(f, t.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(f(x), t(x)) <= RTOL
    assert config_from_state_dict(t.state_dict(), num_heads=6, global_pool="max")["global_pool"] == "max"


def test_mlp_ratio_rebuilds_the_checkpoints_hidden_width():
    """int(D * mlp_ratio) (timm's and FastViT's) gives back every hidden width h, e.g. D=176, h=240."""
    import math

    from vitfast.models.convert import config_from_state_dict
    from vitfast.models.vit import FastViT

    t = timm.create_model("vit_small_patch16_224", depth=1, img_size=32, embed_dim=176, num_heads=4,
                          mlp_ratio=math.nextafter(240 / 176, math.inf))
    assert t.blocks[0].mlp.fc1.out_features == 240 and int(176 * (240 / 176)) == 239
    f = FastViT(**config_from_state_dict(t.state_dict(), num_heads=4))
    load_weights(f, t.state_dict())  # no CheckpointMismatch
    assert from_timm(t).blocks[0].mlp.fc1.out_features == 240

    from vitfast.models.convert import mlp_ratio_for

    bad = [(h, d) for d in range(1, 513) for h in range(1, 6 * d + 1) if int(d * mlp_ratio_for(h, d)) != h]
    assert not bad, bad[:10]
    assert mlp_ratio_for(768 * 4, 768) == 4.0  # exact ratios stay as they are
