"""init_vit_weights: timm's weight_init modes on a FastViT and on timm's VisionTransformer.

Two kinds of check. Bit for bit: from the same seed, every mode gives exactly the tensors of
timm's own ``init_weights(mode)``, on both models, and a FastViT is built with exactly timm's
tensors. By distribution: each parameter is
held against a spec written here from the modes' definitions (constants exactly; random parts
by their bound and their standard deviation, with a tolerance of 6 standard errors of the
sample's std, wide enough for any seed and narrow enough to tell the modes apart, which
``test_spec_tells_modes_apart`` checks).
"""

from __future__ import annotations

import math

import pytest
import torch

timm = pytest.importorskip("timm")

from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from vitfast.models.init import INIT_MODES, TRUNC2_STD, fix_init_weight, init_vit_weights  # noqa: E402
from vitfast.models.vit import FastViT  # noqa: E402

CFG = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)
# register tokens, LayerScale and q/k norms too: the modes must reset them as well
FULL = dict(CFG, reg_tokens=1, init_values=0.1, qk_norm=True)
TIMM_MODES = INIT_MODES  # every mode bit for bit with timm's init_weights
SEEDS = (0, 1, 2)

# std of a standard normal truncated to [-2, 2], from its definition
PHI2 = math.exp(-2.0) / math.sqrt(2 * math.pi)
T2 = math.sqrt(1.0 - 4.0 * PHI2 / math.erf(math.sqrt(2.0)))


def build(kind: str, **overrides) -> torch.nn.Module:
    cfg = dict(CFG, **overrides)
    return FastViT(**cfg) if kind == "fast" else VisionTransformer(**cfg)


def perturb(model: torch.nn.Module, seed: int = 123) -> None:
    """Values no mode gives (so a parameter the init leaves alone shows)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 + 0.5 * torch.randn(p.shape, generator=g))


def snapshot(model: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- the spec -------------------------------------------------------------------------------------
# ("const", c) | ("normal", std) | ("trunc", std, bound) | ("uniform", bound)


def _linear_spec(mode: str, name: str, fan_in: int, fan_out: int, num_classes: int) -> tuple:
    is_w = name.endswith("weight")
    if mode == "":  # timm's: N(0, .02), bounds at +-2 absolute
        return ("normal", 0.02) if is_w else ("const", 0.0)
    if mode.startswith("jax"):
        if name.startswith("head"):
            return ("const", 0.0) if is_w or mode == "jax" else ("const", -math.log(num_classes))
        if is_w:
            return ("uniform", math.sqrt(6.0 / (fan_in + fan_out)))
        return ("normal", 1e-6) if "mlp" in name else ("const", 0.0)
    if mode == "moco":
        if not is_w:
            return ("const", 0.0)
        if "qkv" in name:
            return ("uniform", math.sqrt(6.0 / (fan_out // 3 + fan_in)))
        return ("uniform", math.sqrt(6.0 / (fan_in + fan_out)))
    assert mode == "reset"  # nn.Linear's reset_parameters: weight and bias U(+-1/sqrt(fan_in))
    return ("uniform", 1.0 / math.sqrt(fan_in))


def _conv_spec(mode: str, name: str, fan_in: int) -> tuple:
    s = 1.0 / math.sqrt(fan_in)
    if mode.startswith("jax"):  # lecun-normal: std exactly 1/sqrt(fan_in), truncated at 2/T2 of it
        return ("trunc", s, 2 * s / T2) if name.endswith("weight") else ("const", 0.0)
    return ("uniform", s)  # PyTorch's default (kaiming-uniform, a = sqrt(5)) for weight and bias


def spec(mode: str, name: str, layer: torch.nn.Module, num_classes: int, init_values: float = 0.1) -> tuple:
    """What ``mode`` gives the parameter ``name`` (of the module ``layer``) of a ViT, before
    fix_init."""
    if name in ("cls_token", "reg_token"):
        return ("normal", 1e-6)
    if name == "pos_embed":
        return ("normal", 0.02)
    if name.endswith(".gamma"):
        return ("const", init_values)
    if "norm" in name:
        return ("const", 1.0 if name.endswith("weight") else 0.0)
    if isinstance(layer, torch.nn.Conv2d):
        return _conv_spec(mode, name, fan_in=layer.in_channels * math.prod(layer.kernel_size))
    assert isinstance(layer, torch.nn.Linear), name
    return _linear_spec(mode, name, layer.in_features, layer.out_features, num_classes)


def fix_scale(name: str, fix_init: bool) -> float:
    if not fix_init or not (name.endswith("attn.proj.weight") or name.endswith("mlp.fc2.weight")):
        return 1.0
    return 1.0 / math.sqrt(2.0 * (int(name.split(".")[1]) + 1))


def spec_failures(model: torch.nn.Module, mode: str, fix_init: bool = False) -> list:
    """Every parameter that does not fit the spec, with why (empty: all fit)."""
    failures = []
    num_classes = getattr(model, "num_classes", 0)
    for name, p in model.named_parameters():
        x = p.detach().double().flatten()
        layer = model.get_submodule(name.rpartition(".")[0])
        kind, *args = spec(mode, name, layer, num_classes)
        k = fix_scale(name, fix_init)
        if kind == "const":
            if not torch.equal(p.detach(), torch.full_like(p, args[0])):
                failures.append(f"{name}: not all {args[0]}")
            continue
        n = x.numel()
        std = (args[0] if kind != "uniform" else args[0] / math.sqrt(3.0)) * k
        bound = (args[-1] if kind != "normal" else math.inf) * k
        rms = x.pow(2).mean().sqrt().item()
        # 6 standard errors of a sample std (kurtosis 3: at least that of these distributions)
        rtol = 6.0 * math.sqrt(1.0 / (2 * n))
        if abs(rms / std - 1.0) > rtol:
            failures.append(f"{name}: std {rms:.5g}, expected {std:.5g} (+-{rtol:.1%})")
        if abs(x.mean().item()) > 6.0 * std / math.sqrt(n):
            failures.append(f"{name}: mean {x.mean().item():.3g}, expected 0 (std {std:.3g}, n {n})")
        if x.abs().max().item() > bound * (1 + 1e-5):
            failures.append(f"{name}: max |x| {x.abs().max().item():.5g} beyond {bound:.5g}")
        # an untruncated normal passes 2 std somewhere in 500 draws (all inside: p < 1e-10)
        if kind == "normal" and n >= 500 and x.abs().max().item() <= 2 * std:
            failures.append(f"{name}: max |x| {x.abs().max().item():.5g} within 2 std: truncated")
    return failures


# -- bit for bit ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fix_init", [False, True])
@pytest.mark.parametrize("mode", TIMM_MODES)
def test_same_tensors_as_timm_init_weights(mode, fix_init):
    """timm's init_weights(mode) and ours draw the same numbers in the same order: on the timm
    model itself and on a FastViT (same module names, same order), every tensor is equal."""
    ref_model = VisionTransformer(**FULL, fix_init=fix_init)
    perturb(ref_model, seed=1)
    torch.manual_seed(7)
    ref_model.init_weights(mode)
    ref = snapshot(ref_model)
    for model in (VisionTransformer(**FULL), FastViT(**FULL)):
        perturb(model, seed=2)
        torch.manual_seed(7)
        init_vit_weights(model, mode, fix_init=fix_init)
        got = snapshot(model)
        assert got.keys() == ref.keys()
        bad = [k for k in ref if not torch.equal(got[k], ref[k])]
        assert not bad, f"{type(model).__name__}: {bad}"


@pytest.mark.parametrize("cfg", [CFG, FULL, dict(CFG, weight_init="jax", fix_init=True),
                                 dict(CFG, class_token=False, global_pool="avg", weight_init="moco")])
def test_construction_is_timm_construction(cfg):
    """From the same seed, FastViT(**cfg) holds exactly the tensors timm's VisionTransformer(**cfg)
    is built with: a run from scratch starts where timm's would."""
    torch.manual_seed(0)
    ref = snapshot(VisionTransformer(**cfg))
    torch.manual_seed(0)
    got = snapshot(FastViT(**cfg))
    assert got.keys() == ref.keys()
    bad = [k for k in ref if not torch.equal(got[k], ref[k])]
    assert not bad, bad


def test_skip_and_the_constructors_mode():
    """weight_init="skip" leaves the modules' own initialisation; init_weights() then uses
    "reset", as timm's; init_weights("") uses the constructor's mode."""
    torch.manual_seed(0)
    ref = snapshot(VisionTransformer(**CFG, weight_init="skip"))
    torch.manual_seed(0)
    f = FastViT(**CFG, weight_init="skip")
    got = snapshot(f)
    # timm leaves its tokens torch.empty (any bits) under "skip"; FastViT's are zeros
    assert not [k for k in ref if k not in ("pos_embed", "cls_token") and not torch.equal(got[k], ref[k])]
    assert not f.pos_embed.any() and not f.cls_token.any()
    assert f.weight_init_mode == "reset"
    j = FastViT(**CFG, weight_init="jax")
    torch.manual_seed(5)
    j.init_weights()
    assert spec_failures(j, "jax") == []
    with pytest.raises(ValueError, match="weight_init"):
        FastViT(**CFG, weight_init="xavier")


# -- by distribution ------------------------------------------------------------------------------


@pytest.mark.parametrize("fix_init", [False, True])
@pytest.mark.parametrize("mode", INIT_MODES)
@pytest.mark.parametrize("kind", ["fast", "timm"])
def test_distribution(kind, mode, fix_init):
    for seed in SEEDS:
        model = build(kind, reg_tokens=1, init_values=0.1, qk_norm=True)
        perturb(model, seed=seed + 10)
        torch.manual_seed(seed)
        init_vit_weights(model, mode, fix_init=fix_init)
        assert spec_failures(model, mode, fix_init) == [], f"seed {seed}"


def test_timm_own_modes_fit_the_spec():
    """The spec is timm's too: its own init_weights(mode) fits it (the spec is not written from
    our code alone)."""
    for mode in TIMM_MODES:
        t = build("timm", reg_tokens=1, init_values=0.1, qk_norm=True)
        perturb(t)
        t.init_weights(mode)
        assert spec_failures(t, mode) == [], mode


@pytest.mark.parametrize("got", INIT_MODES)
def test_spec_tells_modes_apart(got):
    """The checks can fail: a model initialised with one mode fails every other mode's spec, and
    fix_init is seen."""
    model = build("fast")
    torch.manual_seed(0)
    init_vit_weights(model, got)
    for other in INIT_MODES:
        if other != got:
            assert spec_failures(model, other) != [], f"{got} passes as {other}"
    assert spec_failures(model, got, fix_init=True) != []


def test_jax_nlhb_head_bias():
    for n in (1, 3, 1000):
        model = build("fast", num_classes=n)
        init_vit_weights(model, "jax_nlhb")
        assert torch.equal(model.head.bias, torch.full((n,), -math.log(n)))
        assert torch.equal(model.head.weight, torch.zeros(n, CFG["embed_dim"]))
        init_vit_weights(model, "jax")
        assert torch.equal(model.head.bias, torch.zeros(n))


def test_moco_qkv_is_three_layers():
    """moco's qkv weight: xavier-uniform of a (dim, dim) layer, not of the (3 dim, dim) one."""
    model = build("fast", embed_dim=64)
    torch.manual_seed(0)
    init_vit_weights(model, "moco")
    w = model.blocks[0].attn.qkv.weight
    per_layer = math.sqrt(6.0 / (64 + 64))
    assert w.abs().max() <= per_layer
    assert w.abs().max() > math.sqrt(6.0 / (64 + 192))  # beyond the fused layer's bound


def test_trunc2_constant():
    assert TRUNC2_STD == pytest.approx(T2, rel=1e-12)


# -- fix_init -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fast", "timm"])
def test_fix_init_weight(kind):
    model = build(kind, depth=3)
    before = snapshot(model)
    fix_init_weight(model)
    after = snapshot(model)
    scaled = {f"blocks.{i}.{m}.weight": math.sqrt(2.0 * (i + 1)) for i in range(3) for m in ("attn.proj", "mlp.fc2")}
    for k, v in before.items():
        expected = v / scaled[k] if k in scaled else v
        assert torch.equal(after[k], expected), k
    assert scaled["blocks.2.attn.proj.weight"] == math.sqrt(6.0)


@pytest.mark.parametrize("mode", INIT_MODES)
def test_fix_init_flag_is_init_then_fix(mode):
    a, b = build("fast"), build("fast")
    torch.manual_seed(5)
    init_vit_weights(a, mode, fix_init=True)
    torch.manual_seed(5)
    init_vit_weights(b, mode)
    fix_init_weight(b)
    sa, sb = snapshot(a), snapshot(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# -- edges ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["skip", "JAX", "xavier", " jax", "nlhb", None, 0])
def test_bad_mode(bad):
    model = build("fast")
    before = snapshot(model)
    with pytest.raises(ValueError, match="weight_init") as info:
        init_vit_weights(model, bad)
    for mode in INIT_MODES:
        assert repr(mode) in str(info.value)
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # refused before touching anything


@pytest.mark.parametrize("kind", ["fast", "timm"])
def test_meta_device(kind):
    with torch.device("meta"):
        model = build(kind, reg_tokens=1, init_values=0.1)
    rng = torch.get_rng_state()
    for mode in INIT_MODES:
        init_vit_weights(model, mode, fix_init=True)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert torch.equal(rng, torch.get_rng_state())  # nothing drawn


@pytest.mark.parametrize("mode", INIT_MODES)
@pytest.mark.parametrize("kind", ["fast", "timm"])
def test_no_classifier(kind, mode):
    """num_classes=0: the head is an Identity, every mode works (timm's own jax_nlhb takes
    log(0) there) and the rest fits the spec."""
    model = build(kind, num_classes=0)
    assert isinstance(model.head, torch.nn.Identity)
    perturb(model)
    torch.manual_seed(0)
    init_vit_weights(model, mode, fix_init=True)
    assert spec_failures(model, mode, fix_init=True) == []


def test_parameters_stay_trainable_leaves():
    """Called with grad enabled: no in-place error on leaves, and they stay leaves that train."""
    model = build("fast")
    assert torch.is_grad_enabled()
    for mode in INIT_MODES:
        init_vit_weights(model, mode, fix_init=True)
    assert all(p.is_leaf and p.requires_grad and p.grad is None for p in model.parameters())
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
