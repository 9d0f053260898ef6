"""Training features: autocast, grad checkpointing, drop_path, torch.compile, DDP/FSDP2; GPU checks."""

import copy
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")

from vitfast.models.convert import from_timm  # noqa: E402
from vitfast.models.vit import FastViT  # noqa: E402


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _pair(name="vit_small_patch16_224", **kw):
    torch.manual_seed(0)
    args = dict(depth=2, img_size=48, num_classes=5)
    args.update(kw)
    t = timm.create_model(name, **args)
    return t, from_timm(t)


def _grads(m):
    return {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}


def _step(m, x, y, **autocast):
    m.zero_grad(set_to_none=True)
    with torch.autocast(**autocast) if autocast else _null():
        loss = F.cross_entropy(m(x), y)
    loss.backward()
    return loss.detach().float(), _grads(m)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


X, Y = torch.randn(4, 3, 48, 48, generator=torch.Generator().manual_seed(5)), torch.tensor([0, 1, 2, 3])


def test_bf16_autocast_error_within_2x_timm():
    """CPU bf16 autocast (reference path): FastViT's error against timm in float32 is at most
    twice timm's own bf16 error, for the loss and for every gradient."""
    t, f = _pair()
    f.set_backend("reference")
    l32, g32 = _step(t, X, Y)
    lt, gt = _step(t, X, Y, device_type="cpu", dtype=torch.bfloat16)
    lf, gf = _step(f, X, Y, device_type="cpu", dtype=torch.bfloat16)
    assert abs(lf - l32) <= 2 * abs(lt - l32) + 1e-6
    for n in g32:
        assert (gf[n] - g32[n]).abs().max() <= 2 * (gt[n] - g32[n]).abs().max() + 1e-6 * g32[n].abs().max(), n


def test_grad_checkpointing_same_grads():
    _, f = _pair(init_values=0.1)
    f.train()
    l0, g0 = _step(f, X, Y)
    f.set_grad_checkpointing(True)
    l1, g1 = _step(f, X, Y)
    assert torch.equal(l0, l1)
    for n in g0:
        assert torch.allclose(g0[n], g1[n], rtol=1e-5, atol=1e-7), n


def test_drop_path_draws_like_timm():
    """drop_path and dropout consume the RNG as timm does: same seed, same masks, same loss."""
    t, f = _pair(drop_path_rate=0.5, drop_rate=0.2, proj_drop_rate=0.1)
    t.train(), f.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(7)
        lt, _ = _step(t, X, Y)
        torch.manual_seed(7)
        lf, _ = _step(f, X, Y)
        torch.manual_seed(8)
        lf2, _ = _step(f, X, Y)
    assert rel_err(lf, lt) <= 1e-5
    assert lf2 != lf  # the masks do depend on the RNG


_DROP_SITES = ["pos_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_rate", "drop_path_rate"]
_DROP_MODELS = [("vit_small_patch16_224", {}), ("vit_base_patch16_clip_224", dict(embed_dim=128, num_heads=2)),
                ("vit_small_patch14_reg4_dinov2", dict(img_size=28, init_values=0.1))]


@pytest.mark.parametrize("name,kw", _DROP_MODELS, ids=["plain", "pre_norm", "reg4"])
@pytest.mark.parametrize("site", _DROP_SITES)
def test_every_dropout_site_draws_where_timm_does(site, name, kw):
    """Each dropout site on its own (p = 0.25), in training, on a plain, a pre-norm (CLIP: the
    position dropout comes before norm_pre) and a register-token model: the same seed gives
    timm's outputs, so each mask is drawn at the same place in the same order."""
    t, f = _pair(name, **{"img_size": 48, **kw, site: 0.25})
    t.train(), f.train()
    x = torch.randn(2, 3, t.patch_embed.img_size[0], t.patch_embed.img_size[1], generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # attention dropout: the reference path, with its warning
        torch.manual_seed(3)
        out_t = t(x)
        torch.manual_seed(3)
        out_f = f(x)
        torch.manual_seed(4)
        out_f2 = f(x)
    assert rel_err(out_f, out_t) <= 1e-5, site
    assert rel_err(out_f2, out_t) > 1e-3  # the masks matter: a different seed moves the output


def test_auto_on_the_cpu_is_the_reference_path_without_a_warning():
    """backend="auto" off CUDA is the plain-PyTorch path by definition, for the model as for the
    ops: no fallback warning (it said "input is on cpu" on every CPU forward)."""
    from vitfast._dispatch import reset_warnings

    f = FastViT(img_size=32, patch_size=16, embed_dim=64, depth=2, num_heads=2, num_classes=3)
    reset_warnings()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = f(torch.randn(2, 3, 32, 32))
        out.sum().backward()
    assert out.shape == (2, 3)


def test_attention_dropout_falls_back_with_warning():
    from vitfast._dispatch import reset_warnings

    f = FastViT(img_size=32, patch_size=16, embed_dim=64, depth=1, num_heads=2, attn_drop_rate=0.1).train()
    reset_warnings()
    if torch.cuda.is_available():  # auto on CUDA: a fallback, said once; off CUDA auto is the reference path
        f.cuda()
        with pytest.warns(RuntimeWarning, match="attention dropout p=0.1 in training"):
            f(torch.randn(1, 3, 32, 32, device="cuda"))
        f.cpu()
    f.set_backend("kernels")
    with pytest.raises(ValueError, match="attention dropout p=0.1 in training"):
        f(torch.randn(1, 3, 32, 32))
    # a head dim the kernel does not take (10): forced -> every reason listed; auto -> reference
    g = FastViT(img_size=32, patch_size=16, embed_dim=20, depth=1, num_heads=2, num_classes=3, backend="kernels")
    with pytest.raises(ValueError, match=r"head dim D\) is 10"):
        g(torch.randn(1, 3, 32, 32))
    g.set_backend("auto")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert g(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_compile_fullgraph_matches_eager(assert_grads_close):
    """fullgraph=True: no graph break through the fused patch embedding (forward and backward),
    the dispatch and the attention; float and uint8 inputs."""
    torch._dynamo.reset()
    f = FastViT(img_size=32, patch_size=16, embed_dim=64, depth=1, num_heads=2, num_classes=3, qk_norm=True)
    x = torch.randn(2, 3, 32, 32)
    c = torch.compile(f, fullgraph=True)
    out = c(x)
    out.square().sum().backward()
    gc = _grads(f)
    f.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eager = f(x)
    eager.square().sum().backward()
    assert rel_err(out, eager) <= 1e-5
    assert_grads_close(gc, _grads(f), 1e-4)
    u = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        assert rel_err(c(u), f(u)) <= 1e-5


def _single_process_group():
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.init_process_group("gloo", rank=0, world_size=1)
    return True


def test_ddp_and_fsdp2_step_match_plain():
    """DDP and FSDP2 (fully_shard per block, then the root) train like the plain model (world size 1, gloo)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    _, f = _pair()
    f.set_backend("reference")
    l0, g0 = _step(f, X, Y)
    owned = _single_process_group()
    try:
        ddp = DDP(copy.deepcopy(f))
        l1, _ = _step(ddp, X, Y)
        assert torch.allclose(l0, l1)
        for n, g in _grads(ddp.module).items():
            assert torch.allclose(g, g0[n], rtol=1e-5, atol=1e-7), n
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:
            pytest.skip("FSDP2 (torch.distributed.fsdp.fully_shard) is not available")
        sharded = copy.deepcopy(f)
        for blk in sharded.blocks:
            fully_shard(blk)
        fully_shard(sharded)
        l2, g2 = _step(sharded, X, Y)
        assert torch.allclose(l0, l2)
        for n, g in g2.items():
            g = g.full_tensor() if hasattr(g, "full_tensor") else g
            assert torch.allclose(g, g0[n], rtol=1e-5, atol=1e-7), n
    finally:
        if owned:
            dist.destroy_process_group()


# --------------------------------------------------------------------------------- GPU
def _err(a, b):
    return (a.float() - b.float()).abs().max().item()


GPU_CONFIGS = [
    ("vit_base_patch16_224", dict(depth=4)),
    ("vit_huge_patch14_224", dict(depth=2, num_classes=1000)),  # head dim 80
    ("vit_small_patch16_224", dict(depth=4, qk_norm=True, init_values=0.1)),
    ("vit_base_patch16_reg4_gap_256", dict(depth=4)),
]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,kw", GPU_CONFIGS, ids=[c[0] for c in GPU_CONFIGS])
def test_gpu_low_precision_within_2x_timm(name, kw, dtype):
    """On the kernels: FastViT in bf16/fp16 against timm in float32, error <= 2x timm's own in that dtype."""
    torch.manual_seed(0)
    t = timm.create_model(name, **kw).cuda().eval()
    f = from_timm(t).eval()
    f.set_backend("kernels")
    H, W = t.patch_embed.img_size
    x = torch.randn(8, 3, H, W, device="cuda")
    with torch.no_grad():
        ref = t(x)
        ref_feat = t.forward_features(x)
        tl = copy.deepcopy(t).to(dtype)
        fl = copy.deepcopy(f).to(dtype)
        timm_err = _err(tl(x.to(dtype)), ref)
        assert _err(fl(x.to(dtype)), ref) <= 2 * timm_err + 1e-6
        assert _err(fl.forward_features(x.to(dtype)), ref_feat) <= 2 * _err(tl.forward_features(x.to(dtype)), ref_feat) + 1e-6
        with torch.autocast("cuda", dtype=dtype):
            timm_ac = _err(t(x), ref)
            assert _err(f(x), ref) <= 2 * timm_ac + 1e-6


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_training_step_under_autocast(dtype):
    """One autocast step (fp16 with GradScaler): FastViT on the kernels and patched timm, against
    timm in float32, loss and gradients within 2x timm's own autocast error."""
    from vitfast.integrations.timm import patch_timm

    torch.manual_seed(0)
    t = timm.create_model("vit_base_patch16_224", depth=4, drop_path_rate=0.0).cuda().train()
    f = from_timm(t)
    f.set_backend("kernels")
    p = patch_timm(copy.deepcopy(t), backend="kernels")
    x = torch.randn(8, 3, 224, 224, device="cuda")
    y = torch.randint(0, 1000, (8,), device="cuda")
    l32, g32 = _step(t, x, y)
    results = {}
    for key, m in (("timm", t), ("fast", f), ("patched", p)):
        scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
        m.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype):
            loss = F.cross_entropy(m(x), y)
        scaler.scale(loss).backward()
        scaler.unscale_(torch.optim.SGD(m.parameters(), lr=0.1))
        results[key] = (loss.detach().float(), _grads(m))
    lt, gt = results["timm"]
    for key in ("fast", "patched"):
        lk, gk = results[key]
        assert abs(lk - l32) <= 2 * abs(lt - l32) + 1e-4, key
        for n in g32:
            assert _err(gk[n], g32[n]) <= 2 * _err(gt[n], g32[n]) + 1e-6 * g32[n].abs().max().item(), (key, n)


@pytest.mark.cuda
def test_gpu_compile_fullgraph_on_kernels(assert_grads_close):
    torch._dynamo.reset()
    torch.manual_seed(0)
    f = FastViT(embed_dim=384, depth=2, num_heads=6, backend="kernels").cuda()
    x = torch.randn(4, 3, 224, 224, device="cuda")
    c = torch.compile(f, fullgraph=True)
    out = c(x)
    out.sum().backward()
    gc = _grads(f)
    f.zero_grad()
    eager = f(x)
    eager.sum().backward()
    assert rel_err(out, eager) <= 1e-4
    assert_grads_close(gc, _grads(f), 1e-3)
