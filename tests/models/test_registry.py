"""create_model's table against timm, pretrained/checkpoint loading, and clear errors."""

import re

import pytest
import torch

timm = pytest.importorskip("timm")

from vitfast.models.registry import MODEL_CONFIGS, PRETRAINED, create_model, list_models  # noqa: E402

STANDARD = re.compile(r"^vit_(tiny|small|base|large|huge)_patch(8|14|16|32)_(224|384)$")


def _describe(m):
    """What makes two ViTs weight- and numerics-compatible, read off a built model."""
    blk = m.blocks[0]
    norm = next(n for n in (m.norm, m.fc_norm) if not isinstance(n, torch.nn.Identity))
    return dict(
        shapes={k: tuple(v.shape) for k, v in m.state_dict().items()},
        eps=(blk.norm1.eps, norm.eps), act=type(blk.mlp.act).__name__, pool=m.global_pool,
        num_classes=m.num_classes, img_size=tuple(m.patch_embed.img_size),
        prefix=(m.num_prefix_tokens, m.no_embed_class), layerscale=not isinstance(blk.ls1, torch.nn.Identity),
    )


def test_standard_names_cover_timm():
    ours = set(list_models())
    for name in timm.list_models("vit_*"):
        if STANDARD.match(name):
            assert name in ours, name
    for family in ("reg4_gap", "clip", "clip_quickgelu", "reg4_dinov2", "siglip"):
        assert list_models(f"*_{family}*"), family
    assert "vit_huge_patch14_224" in ours and list_models("*clip*") == sorted(n for n in ours if "clip" in n)


@pytest.mark.parametrize("name", sorted(MODEL_CONFIGS))
def test_every_entry_matches_timm(name):
    """Built on the meta device (no memory, no init): same parameters and shapes, eps, activation,
    pooling, tokens, classes, and the default pretrained config's statistics and Hub repo."""
    with torch.device("meta"):
        t = timm.create_model(name)
        f = create_model(name)
    assert _describe(f) == _describe(t)
    cfg = timm.models.get_pretrained_cfg(name)
    assert f.pretrained_cfg["mean"] == pytest.approx(cfg.mean) and f.pretrained_cfg["std"] == pytest.approx(cfg.std)
    assert PRETRAINED[name] == cfg.hf_hub_id


def test_unknown_name_suggests():
    with pytest.raises(ValueError, match=r"unknown model 'vit_base_patch16_244'.*Did you mean vit_base_patch16_224"):
        create_model("vit_base_patch16_244")


def test_pretrained_without_network_says_pass_checkpoint_path(monkeypatch, tmp_path):
    # no network: offline mode with an empty cache (huggingface_hub reads these at import)
    hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"timm/vit_tiny_patch16_224\.augreg_in21k_ft_in1k.*pass checkpoint_path="):
        create_model("vit_tiny_patch16_224", pretrained=True, depth=1)
    with pytest.raises(ValueError, match="no default weights.*checkpoint_path="):
        create_model("vit_base_patch16_reg4_gap_256", pretrained=True, depth=1)


def test_overrides_apply():
    m = create_model("vit_small_patch16_224", depth=1, num_classes=3, img_size=32, drop_path_rate=0.1)
    assert len(m.blocks) == 1 and m.head.out_features == 3 and m.patch_embed.img_size == (32, 32)
    assert m.blocks[0].drop_path1.p == 0.0  # linspace(0, rate, depth): the first block has none


def test_other_in_chans_drops_the_tables_rgb_statistics():
    """The table's 3-channel mean/std (CLIP's) do not fit in_chans=1: the uint8 path uses the
    default 0.5; statistics the caller passes are kept (and checked)."""
    m = create_model("vit_base_patch32_clip_224", depth=1, in_chans=1)
    assert m.in_chans == 1 and m.pixel_mean.tolist() == [0.5] and m.pixel_std.tolist() == [0.5]
    m = create_model("vit_base_patch32_clip_224", depth=1, in_chans=1, mean=(0.25,), std=(0.75,))
    assert m.pixel_mean.tolist() == [0.25] and m.pixel_std.tolist() == [0.75]
    with pytest.raises(ValueError, match="mean must have one value per channel"):
        create_model("vit_base_patch32_clip_224", depth=1, in_chans=1, mean=(0.1, 0.2, 0.3))
