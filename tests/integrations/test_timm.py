"""patch_timm / unpatch_timm on live timm models."""

import copy
import warnings

import pytest
import torch

timm = pytest.importorskip("timm")

import vitfast.modules.attention as vattn  # noqa: E402
from vitfast._dispatch import reset_warnings  # noqa: E402
import vitfast.modules.patch_embed as vpe  # noqa: E402
import vitfast.integrations.timm as vpatch  # noqa: E402
from vitfast.integrations.timm import is_patched, patch_timm, unpatch_timm  # noqa: E402


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _tiny(**kw):
    torch.manual_seed(0)
    args = dict(depth=2, img_size=48, num_classes=5)
    args.update(kw)
    return timm.create_model("vit_small_patch16_224", **args)


def test_live_forward_is_vitfast(monkeypatch):
    """After patching, the modules' forwards are vitfast's functions and the vitfast ops run."""
    m = _tiny().eval()
    patch_timm(m, backend="kernels")
    assert m.blocks[0].attn.forward.__func__ is vpatch._attention_forward
    assert m.forward_features.__func__ is vpatch._vit_forward_features
    assert all(is_patched(b.attn) for b in m.blocks) and is_patched(m)
    calls = {"attention_packed": 0, "patch_embed": 0}

    def spy(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(vattn, "attention_packed", spy("attention_packed", vattn.attention_packed))
    monkeypatch.setattr(vpe, "patch_embed", spy("patch_embed", vpe.patch_embed))
    with torch.no_grad():
        m(torch.randn(1, 3, 48, 48))
    assert calls == {"attention_packed": 2, "patch_embed": 1}
    unpatch_timm(m)
    assert not any(is_patched(mod) for mod in m.modules())
    assert "forward" not in m.blocks[0].attn.__dict__ and m.blocks[0].attn.forward.__func__ is type(m.blocks[0].attn).forward
    with torch.no_grad():
        m(torch.randn(1, 3, 48, 48))
    assert calls == {"attention_packed": 2, "patch_embed": 1}


def test_patch_keeps_parameters_and_outputs():
    m = _tiny(qk_norm=True).eval()
    params = {n: p for n, p in m.named_parameters()}
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        ref = m(x)
    patch_timm(m, backend="kernels")
    assert all(p is params[n] for n, p in m.named_parameters())
    assert opt.param_groups[0]["params"][0] is m.cls_token
    with torch.no_grad():
        assert rel_err(m(x), ref) <= 1e-4
    unpatch_timm(m)
    with torch.no_grad():
        assert torch.equal(m(x), ref)


def test_training_step_through_patch_timm_equals_timm(assert_grads_close):
    """Same seed, same batch: one SGD step through the patched model gives timm's loss, gradients
    and updated weights (kernels forced: interpreted Triton attention + fused patch embedding)."""
    ref = _tiny(drop_path_rate=0.2).train()
    pat = copy.deepcopy(ref)
    patch_timm(pat, backend="kernels")
    x, y = torch.randn(4, 3, 48, 48), torch.tensor([0, 1, 2, 3])
    results = []
    for m in (ref, pat):
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        torch.manual_seed(123)  # drop_path draws the same masks
        loss = torch.nn.functional.cross_entropy(m(x), y)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters()}
        opt.step()
        results.append((loss.detach(), grads, {n: p.detach().clone() for n, p in m.named_parameters()}))
    (l0, g0, w0), (l1, g1, w1) = results
    assert rel_err(l1, l0) <= 1e-5
    assert_grads_close(g1, g0, 1e-4)
    for n in w0:
        assert (w1[n] - w0[n]).abs().max().item() <= 1e-5, n


def test_patched_timm_takes_uint8():
    m = _tiny().eval()
    patch_timm(m)
    u = torch.randint(0, 256, (2, 3, 48, 48), dtype=torch.uint8)
    mean = torch.tensor(m.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(m.pretrained_cfg["std"]).view(1, 3, 1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            assert rel_err(m(u), m((u / 255.0 - mean) / std)) <= 1e-4


def test_partial_patch_and_errors():
    m = _tiny()
    patch_timm(m, patch_embed=False)
    assert is_patched(m.blocks[0].attn) and not is_patched(m)
    with pytest.raises(TypeError, match="holds no timm module to patch"):
        patch_timm(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="backend must be one of"):
        patch_timm(m, backend="fast")
    # a wrapper holding the ViT is patched too
    wrapper = torch.nn.Sequential(_tiny())
    patch_timm(wrapper)
    assert is_patched(wrapper[0]) and is_patched(wrapper[0].blocks[1].attn)
    # deepcopy of a patched model stays patched and bound to the copy
    c = copy.deepcopy(wrapper)
    assert c[0].blocks[0].attn.forward.__self__ is c[0].blocks[0].attn


def test_unsuitable_modules_are_left_alone_with_a_warning():
    m = timm.create_model("vit_small_patch16_224", depth=1, img_size=32, pos_embed="none", class_token=False,
                          global_pool="avg")
    reset_warnings()
    with pytest.warns(RuntimeWarning, match="no learned pos_embed"):
        patch_timm(m)
    assert not is_patched(m) and is_patched(m.blocks[0].attn)


def _small_vit(**kw):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=5, reg_tokens=1)
    args.update(kw)
    return VisionTransformer(**args).eval()


def test_patched_model_pickles_and_deep_copies():
    """torch.save(model) of a patched model loads back patched (a bound method would pickle as
    getattr(module, "_attention_forward"), which does not exist at load); deepcopy rebinds."""
    import io
    import pickle

    m = _small_vit(init_values=0.1)
    x = torch.randn(2, 3, 32, 32)
    patch_timm(m, backend="reference")
    with torch.no_grad():
        ref = m(x)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    for c in (pickle.loads(pickle.dumps(m)), torch.load(buf, weights_only=False), copy.deepcopy(m)):
        patched = [mod for mod in c.modules() if is_patched(mod)]
        assert len(patched) == 1 + 2 * len(c.blocks)  # the ViT, each Block and each Attention
        for mod in patched:
            for method in mod.__dict__[vpatch._MARK]:
                assert getattr(mod, method).__self__ is mod  # bound to the copy, not to m
        assert c.blocks[0].forward.__func__ is vpatch._block_forward
        with torch.no_grad():
            assert torch.equal(c(x), ref)
        unpatch_timm(c)
        assert not any(is_patched(mod) or "forward" in mod.__dict__ for mod in c.modules())


def test_hooks_on_patch_embed_fire_when_patched(monkeypatch):
    """A hook on patch_embed or its proj is not skipped by the fused patch embedding: timm's own
    forward_features runs then (uint8 images too), and the fused op again once it is removed."""
    m = _small_vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = m(x)
    patch_timm(m, backend="kernels")
    calls, op = [], vpe.patch_embed

    def spy(*a, **k):
        calls.append(1)
        return op(*a, **k)

    monkeypatch.setattr(vpe, "patch_embed", spy)
    seen = []
    for sub in (m.patch_embed, m.patch_embed.proj):
        handle = sub.register_forward_hook(lambda mod, i, o: seen.append(type(mod).__name__))
        with torch.no_grad():
            assert rel_err(m(x), ref) <= 1e-4
        assert seen == [type(sub).__name__] and not calls
        u = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
        with torch.no_grad():
            assert rel_err(m(u), m((u / 255.0 - 0.5) / 0.5)) <= 1e-4
        handle.remove()
        seen.clear()
    with torch.no_grad():
        m(x)
    assert calls == [1] and not seen


def test_feature_extractor_on_patched_model():
    """torchvision's create_feature_extractor finds timm's node names on a patched model."""
    fx = pytest.importorskip("torchvision.models.feature_extraction")
    m = _small_vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = fx.create_feature_extractor(m, ["patch_embed", "blocks.1", "norm"])(x)
        patch_timm(m, backend="reference")
        got = fx.create_feature_extractor(m, ["patch_embed", "blocks.1", "norm"])(x)
    assert got.keys() == ref.keys()
    for k in ref:
        assert rel_err(got[k], ref[k]) <= 1e-5, k


def test_instance_level_methods_are_left_to_their_owner():
    """An instance whose method was replaced before patching (Accelerate's add_hook_to_module
    sets module.forward) is skipped with a warning; unpatch deletes only what patch set."""
    m = _small_vit()
    x = torch.randn(1, 3, 32, 32)
    calls = []
    timm_ff, timm_fwd = m.forward_features, m.blocks[0].forward

    def wrapper(*a, **k):
        calls.append("ff")
        return timm_ff(*a, **k)

    m.forward_features = wrapper
    m.blocks[0].forward = lambda *a, **k: calls.append("blk") or timm_fwd(*a, **k)
    reset_warnings()
    with pytest.warns(RuntimeWarning, match="forward_features is already replaced on the instance"):
        patch_timm(m, backend="reference")
    assert m.forward_features is wrapper and not is_patched(m) and not is_patched(m.blocks[0])
    assert is_patched(m.blocks[1]) and is_patched(m.blocks[0].attn)
    with torch.no_grad():
        m(x)
    assert calls == ["ff", "blk"]
    unpatch_timm(m)
    assert m.forward_features is wrapper and "forward" in m.blocks[0].__dict__
    # a wrapper set after patching (around the patched method) survives unpatch and still runs
    m = _small_vit()
    with torch.no_grad():
        ref = m(x)
    patch_timm(m, backend="reference")
    patched_fwd = m.blocks[1].forward
    m.blocks[1].forward = lambda *a, **k: calls.append("late") or patched_fwd(*a, **k)
    unpatch_timm(m)
    calls.clear()
    with torch.no_grad():
        assert torch.equal(m(x), ref)
    assert calls == ["late"] and "forward" in m.blocks[1].__dict__
