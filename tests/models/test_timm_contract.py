"""The timm model contract, for FastViT (vitfast.create_model) and timm models patched by
vitfast.patch_timm alike, across six registered names: what timm's own model tests check,
feature extraction (feature_info, forward_intermediates, prune_intermediate_layers,
features_only) and pretrained weights through timm's machinery (offline, from a local Hub cache)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

timm = pytest.importorskip("timm")

import vitfast  # noqa: E402
from vitfast.models.registry import create_model  # noqa: E402

# plain, register tokens + avg pool, DINOv2 style (no_embed_class, LayerScale, no head), CLIP
# pre-norm, patch 32, 384 pixels, SigLIP; each at a small image size and depth 2 (kept fast on the CPU)
NAMES = {
    "vit_small_patch16_224": dict(img_size=48),
    "vit_base_patch16_reg4_gap_256": dict(img_size=32, embed_dim=96, num_heads=2),
    "vit_small_patch14_reg4_dinov2": dict(img_size=42),
    "vit_base_patch16_clip_224": dict(img_size=32, embed_dim=96, num_heads=2),
    "vit_small_patch32_224": dict(img_size=64),
    "vit_tiny_patch16_384": dict(img_size=48),
    "vit_base_patch16_siglip_224": dict(img_size=32, embed_dim=96, num_heads=2),  # attention-pooling head
}
KINDS = ["fastvit", "patched_timm"]


def _make(kind: str, name: str, **kw):
    kw = {"depth": 2, **NAMES[name], **kw}
    if kind == "fastvit":
        return create_model(name, **kw)
    return vitfast.patch_timm(timm.create_model(name, **kw))


def _images(m, batch=2, seed=0):
    size = m.patch_embed.img_size
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.fixture(autouse=True)
def _quiet():
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("ignore")  # patched models on the CPU: the reference paths
        yield


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(NAMES))
def test_model_contract(kind, name):
    torch.manual_seed(0)
    m = _make(kind, name).eval()
    t = timm.create_model(name, depth=2, **NAMES[name])
    # the configuration timm gives for that name, under both names
    assert m.pretrained_cfg == t.pretrained_cfg and m.default_cfg is m.pretrained_cfg
    for key in ("first_conv", "classifier", "input_size", "mean", "std", "crop_pct", "interpolation", "num_classes",
                "fixed_input_size"):
        assert key in m.pretrained_cfg, key
    assert (m.num_classes, m.num_features, m.head_hidden_size) == (t.num_classes, t.num_features, t.head_hidden_size)
    x = _images(m)
    with torch.no_grad():
        feats = m.forward_features(x)
        T = m.patch_embed.num_patches + m.num_prefix_tokens
        assert feats.shape == (2, T, m.num_features)
        pre = m.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, m.head_hidden_size)
        logits = m(x)
        assert logits.shape == ((2, m.num_classes) if m.num_classes else (2, m.head_hidden_size))
        m.set_grad_checkpointing(True)
        assert torch.equal(m(x), logits)
        m.set_grad_checkpointing(False)
        m.reset_classifier(0)
        assert torch.equal(m(x), pre)  # no head: the pre-logits exactly
        m.reset_classifier(0, "")
        t.load_state_dict(m.state_dict(), strict=False)  # timm with the same weights, same head changes
        t.eval().reset_classifier(0, "")
        tokens, t_tokens = m(x), t(x)
        # no pooling: every token (through fc_norm where the model has one, as in timm)
        assert tokens.shape == feats.shape and _err(tokens, t_tokens) <= 1e-4 * t_tokens.abs().max().item()
    unpooled = _make(kind, name, num_classes=0, global_pool="").eval()
    with torch.no_grad():
        assert unpooled(x).shape == feats.shape
    # data config and transforms from the model
    cfg = timm.data.resolve_data_config(model=m)
    assert cfg["input_size"] == t.pretrained_cfg["input_size"] and cfg["mean"] == tuple(t.pretrained_cfg["mean"])
    assert callable(timm.data.create_transform(**cfg))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(NAMES))
def test_every_parameter_gets_a_gradient(kind, name):
    m = _make(kind, name, num_classes=3).train()
    m(_images(m)).square().mean().backward()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    # timm's own (and FastViT's) class-token-less pooled models leave no parameter unused
    assert not missing, missing


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(NAMES))
def test_features(kind, name):
    m = _make(kind, name).eval()
    t = timm.create_model(name, depth=2, **NAMES[name])
    assert m.feature_info == t.feature_info
    assert [f["module"] for f in m.feature_info] == ["blocks.0", "blocks.1"]
    x = _images(m)
    with torch.no_grad():
        feats = m.forward_features(x)
        final, inter = m.forward_intermediates(x)
        # FastViT: the same code path, bit-equal. Patched timm: forward_features embeds through the
        # fused op while timm's forward_intermediates keeps its own conv: equal to rounding.
        same = torch.equal if kind == "fastvit" else (lambda a, b: _err(a, b) <= 1e-5 * b.abs().max().item())
        assert same(final, feats) and len(inter) == 2
        gh, gw = m.patch_embed.grid_size
        assert inter[0].shape == (2, m.num_features, gh, gw)
        m.set_grad_checkpointing(True)
        final_ckpt, inter_ckpt = m.forward_intermediates(x, indices=[0])
        assert same(final_ckpt, feats) and torch.equal(inter_ckpt[0], inter[0])
        m.set_grad_checkpointing(False)
        tokens = m.forward_intermediates(x, indices=1, output_fmt="NLC", intermediates_only=True)
        assert tokens[0].shape == (2, gh * gw, m.num_features)
    kept = m.prune_intermediate_layers([0])
    assert kept == [0] and len(m.blocks) == 1


@pytest.mark.parametrize("name", list(NAMES))
def test_features_only_matches_timm(name):
    f = create_model(name, depth=2, features_only=True, out_indices=(0, 1), **NAMES[name]).eval()
    t = timm.create_model(name, depth=2, features_only=True, out_indices=(0, 1), **NAMES[name]).eval()
    f.load_state_dict(t.state_dict())
    assert f.feature_info.channels() == t.feature_info.channels()
    assert f.feature_info.reduction() == t.feature_info.reduction()
    assert f.pretrained_cfg == t.pretrained_cfg
    x = torch.randn(2, 3, *t.model.patch_embed.img_size)
    with torch.no_grad():
        fo, to = f(x), t(x)
    assert [o.shape for o in fo] == [o.shape for o in to]
    assert max(_err(a, b) for a, b in zip(fo, to)) <= 1e-4 * max(o.abs().max().item() for o in to)
    default = create_model(name, depth=4, features_only=True, **NAMES[name])
    assert len(default(x)) == 3  # timm's ViT default: the last 3 blocks


def test_features_only_refuses_other_wrappers():
    with pytest.raises(ValueError, match="feature_cls='hook'.*'getter'"):
        create_model("vit_small_patch16_224", depth=1, img_size=32, features_only=True, feature_cls="hook")


# ------------------------------------------------------------------ pretrained weights
def _hub_cache(root, repo: str, state_dict) -> None:
    """A Hugging Face Hub cache holding ``repo``'s model.safetensors, as a download leaves it."""
    from safetensors.torch import save_file

    commit = "0" * 40
    base = os.path.join(root, "models--" + repo.replace("/", "--"))
    os.makedirs(os.path.join(base, "refs"))
    os.makedirs(os.path.join(base, "snapshots", commit))
    with open(os.path.join(base, "refs", "main"), "w") as f:
        f.write(commit)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, os.path.join(base, "snapshots", commit,
                                                                              "model.safetensors"))


@pytest.mark.parametrize("name", ["vit_small_patch16_224", "vit_small_patch14_reg4_dinov2"])
def test_pretrained_resolves_like_timm_offline(tmp_path, name):
    """pretrained=True goes through timm's machinery: in offline mode, from a Hub cache built here
    from a random timm model, vitfast.create_model and timm.create_model load the same file;
    pretrained_cfg_overlay=dict(file=...) too; a num_classes override keeps the body."""
    pytest.importorskip("safetensors")
    cache = tmp_path / "hub"
    src = timm.create_model(name)
    with torch.no_grad():
        for p in src.parameters():
            p.normal_(0, 0.02)
    repo = src.pretrained_cfg["hf_hub_id"]
    _hub_cache(str(cache), repo, src.state_dict())
    local = tmp_path / "weights.pth"
    torch.save(src.state_dict(), local)
    script = textwrap.dedent(f"""
        import json, torch, timm, vitfast
        name = {name!r}
        f = vitfast.create_model(name, pretrained=True).eval()
        t = timm.create_model(name, pretrained=True).eval()
        same = all(torch.equal(a, b) for a, b in zip(f.state_dict().values(), t.state_dict().values()))
        x = torch.randn(1, 3, *t.pretrained_cfg["input_size"][1:])
        with torch.no_grad():
            err = (f.forward_features(x) - t.forward_features(x)).abs().max().item()
        o = vitfast.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file={str(local)!r}))
        overlay = all(torch.equal(a, b) for a, b in zip(o.state_dict().values(), t.state_dict().values()))
        h = vitfast.create_model(name, pretrained=True, num_classes=7)
        body = torch.equal(h.blocks[0].attn.qkv.weight, t.blocks[0].attn.qkv.weight) and h.head.out_features == 7
        print(json.dumps(dict(same=same, err=err, overlay=overlay, body=body)))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf")}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["same"] and got["overlay"] and got["body"], got
    assert got["err"] <= 1e-4, got


# ------------------------------------------------------------------------- tracing
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(NAMES))
def test_fx_trace_feature_extractor_and_export(kind, name):
    """torch.fx graphs (train and eval) and torchvision's create_feature_extractor run the model's
    own calls as graph leaves: the same outputs and gradients as eager (to rounding: the graph
    calls patch_embed's modules, where eager runs the fused op, so that timm's node names are
    there); torch.export still works."""
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    m = _make(kind, name, drop_path_rate=0.1, proj_drop_rate=0.1)
    x = _images(m)
    for train in (True, False):
        m.train(train)
        g = torch.fx.symbolic_trace(m)
        out = []
        for fn in (m, g):
            m.zero_grad(set_to_none=True)
            torch.manual_seed(3)
            y = fn(x)
            y.square().mean().backward()
            out.append((y.detach(), [p.grad.clone() for p in m.parameters()]))
        (y_m, g_m), (y_g, g_g) = out
        assert _err(y_g, y_m) <= 1e-5 * y_m.abs().max().item(), train
        for a, b in zip(g_g, g_m):
            assert _err(a, b) <= 1e-4 * max(b.abs().max().item(), 1e-6), train
    m.eval()
    nodes = get_graph_node_names(m)[1]
    blocks = [n for n in nodes if n.startswith("blocks.")]
    assert len(blocks) == 2, nodes  # one node per block
    fe = create_feature_extractor(m, return_nodes={"patch_embed": "pe", blocks[0]: "b0", blocks[1]: "b1"})
    with torch.no_grad():
        feats = fe(x)
        assert torch.equal(feats["pe"], m.patch_embed(x))
        _, inter = m.forward_intermediates(x, output_fmt="NLC", return_prefix_tokens=False)
    n = m.num_prefix_tokens
    for got, want in zip((feats["b0"], feats["b1"]), inter):
        assert _err(got[:, n:], want) <= 1e-5 * want.abs().max().item()
    ep = torch.export.export(m, (x,))
    with torch.no_grad():
        y, y_ep = m(x), ep.module()(x)
    assert _err(y_ep, y) <= 1e-5 * y.abs().max().item()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(NAMES))
def test_torchscript(kind, name):
    """torch.jit.script works in eval: FastViT scripts the timm model its reference path computes
    (vitfast.to_timm), a patched timm model an unpatched copy; the original stays as it was."""
    m = _make(kind, name).eval()
    x = _images(m)
    s = torch.jit.script(m)
    with torch.no_grad():
        y, y_s = m(x), s(x)
    assert _err(y_s, y) <= 1e-5 * y.abs().max().item()
    if kind == "patched_timm":
        assert vitfast.integrations.timm.is_patched(m)
    else:
        assert isinstance(m, vitfast.FastViT)
        m.set_backend("kernel")
        with pytest.raises(RuntimeError, match=r"torch\.export\.export"):
            torch.jit.script(m)


@pytest.mark.parametrize("name", list(NAMES))
def test_unpatch_restores_exactly(name):
    """patch_timm then unpatch_timm: no attribute left behind on any module, the same parameters
    (the same objects), bit-equal outputs to a model never patched."""
    torch.manual_seed(0)
    t = timm.create_model(name, depth=2, **NAMES[name]).eval()
    plain = __import__("copy").deepcopy(t)
    before = {n: set(mod.__dict__) for n, mod in t.named_modules()}
    params = [id(p) for p in t.parameters()]
    vitfast.unpatch_timm(vitfast.patch_timm(t))
    assert {n: set(mod.__dict__) for n, mod in t.named_modules()} == before
    assert [id(p) for p in t.parameters()] == params
    x = _images(t)
    with torch.no_grad():
        assert torch.equal(t(x), plain(x))
