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
