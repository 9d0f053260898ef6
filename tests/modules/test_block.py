"""FastViT's and patch_timm's blocks on the fused epilogue ops (layer_norm, add_layer_norm,
linear_bias_gelu, bias_scale_residual): same numbers and gradients as timm, the ops really run,
and the fallbacks (structure, dropout/drop-path, CPU auto) behave as documented."""

import copy
import warnings

import pytest
import torch

timm = pytest.importorskip("timm")

import vitfast.modules.block as vblock  # noqa: E402
from vitfast._dispatch import KernelNotSupported, reset_warnings  # noqa: E402
from vitfast.models.convert import from_timm  # noqa: E402
from vitfast.integrations.timm import patch_timm  # noqa: E402

RTOL = 1e-4
FUSED_OPS = ("layer_norm", "add_layer_norm", "linear_bias_gelu", "bias_scale_residual")


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _timm(name="vit_small_patch16_224", **kw):
    torch.manual_seed(0)
    args = dict(depth=2, img_size=32, num_classes=5)
    args.update(kw)
    m = timm.create_model(name, **args).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in m.named_parameters():  # non-trivial LayerNorm affine, biases, LayerScale
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g) if p.dim() == 1 and n.endswith(("weight", "gamma"))
                    else torch.randn(p.shape, generator=g) * (0.02 if p.dim() > 1 else 0.05))
    return m


def _spy(monkeypatch):
    calls = dict.fromkeys(FUSED_OPS, 0)
    for name in FUSED_OPS:
        fn = getattr(vblock, name)

        def wrapped(*a, _fn=fn, _name=name, **k):
            calls[_name] += 1
            return _fn(*a, **k)
        monkeypatch.setattr(vblock, name, wrapped)
    return calls


def _grads(m):
    return {n: p.grad for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kw", [dict(), dict(init_values=0.1, qk_norm=True), dict(act_layer="gelu_tanh"),
                                dict(depth=3, global_pool="avg", fc_norm=True, class_token=False)],
                         ids=["plain", "layerscale_qknorm", "gelu_tanh", "depth3_fc_norm"])
def test_fastvit_blocks_run_fused_and_match_timm(kw, monkeypatch, assert_grads_close):
    t = _timm(**kw)
    f = from_timm(t).set_backend("kernels")
    calls = _spy(monkeypatch)
    x = torch.randn(2, 3, 32, 32)
    out, ref = f(x), t(x)
    depth, final_ln = len(f.blocks), isinstance(f.norm, torch.nn.LayerNorm)
    # blocks_forward: norm1 of the first block alone; each block's norm2 with its first residual;
    # each block boundary (last residual + next norm1) and the final norm (when it is a LayerNorm,
    # not the fc_norm of an avg-pool head) in one add_layer_norm
    assert calls == {"layer_norm": 1, "add_layer_norm": depth + (depth - 1) + final_ln, "linear_bias_gelu": depth,
                     "bias_scale_residual": 0 if final_ln else 1}
    assert rel_err(out, ref) <= RTOL
    out.square().sum().backward()
    ref.square().sum().backward()
    assert_grads_close(_grads(f), _grads(t), RTOL)


def test_patch_timm_fuses_blocks(monkeypatch, assert_grads_close):
    t = _timm(init_values=0.1)
    p = patch_timm(copy.deepcopy(t), backend="kernels")
    assert p.blocks[0].forward.__func__ is __import__("vitfast.integrations.timm", fromlist=["_"])._block_forward
    calls = _spy(monkeypatch)
    x = torch.randn(2, 3, 32, 32)
    out, ref = p(x), t(x)
    assert rel_err(out, ref) <= RTOL
    # the patched forward_features chains the blocks as FastViT does (blocks_forward): block
    # boundaries and the final norm each in one add_layer_norm
    assert calls == {"layer_norm": 1, "add_layer_norm": 2 + 1 + 1, "linear_bias_gelu": 2, "bias_scale_residual": 0}
    out.square().sum().backward()
    ref.square().sum().backward()
    assert_grads_close(_grads(p), _grads(t), RTOL)
    # without the patched forward_features (patch_embed=False), timm's own loop: block by block
    calls.update(dict.fromkeys(FUSED_OPS, 0))
    e = patch_timm(copy.deepcopy(t), patch_embed=False, backend="kernels")
    with torch.no_grad():
        assert rel_err(e(x), ref) <= RTOL
    assert calls == dict.fromkeys(FUSED_OPS, 2)
    q = patch_timm(copy.deepcopy(t), fused=False, backend="kernels")
    assert "forward" not in q.blocks[0].__dict__


def test_training_with_drop_path_fuses_what_it_can(monkeypatch):
    """Active drop-path: the residual steps run eagerly, the LayerNorms and GELU stay fused;
    same seed, same numbers as timm."""
    t = _timm(drop_path_rate=0.5).train()
    f = from_timm(t).set_backend("kernels").train()
    calls = _spy(monkeypatch)
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(5)
    out = f(x)
    torch.manual_seed(5)
    ref = t(x)
    assert rel_err(out, ref) <= RTOL
    # drop-path rates are linspace(0, 0.5, depth): block 0 has none (all fused, its last residual
    # and block 1's norm1 in one add_layer_norm); in block 1 the two residual steps run eagerly,
    # norm2 becomes a plain layer_norm and the final norm runs eagerly
    assert calls == {"layer_norm": 2, "add_layer_norm": 2, "linear_bias_gelu": 2, "bias_scale_residual": 0}


def test_blocks_forward_chains_only_fused_neighbours(monkeypatch, assert_grads_close):
    """A block that cannot run fused (here: QuickGELU) between fused ones breaks the chain: its
    neighbours end and start with their own residual / norm1, and the numbers still match."""
    t = _timm(depth=3, init_values=0.1)
    f = from_timm(t).set_backend("kernels")
    for m in (t, f):
        m.blocks[1].mlp.act = timm.layers.QuickGELU()
    f.blocks[1].attn.backend = "reference"  # this block runs eagerly, the others fused
    calls = _spy(monkeypatch)
    x = torch.randn(2, 3, 32, 32)
    out, ref = f(x), t(x)
    # block 0: norm1, norm2, its own last residual; block 2: norm1, norm2 + the final norm
    assert calls == {"layer_norm": 2, "add_layer_norm": 3, "linear_bias_gelu": 2, "bias_scale_residual": 1}
    assert rel_err(out, ref) <= RTOL
    out.square().sum().backward()
    ref.square().sum().backward()
    assert_grads_close(_grads(f), _grads(t), RTOL)


def test_grad_checkpointing_runs_block_by_block(monkeypatch):
    t = _timm(depth=2)
    f = from_timm(t).set_backend("kernels").train()
    f.set_grad_checkpointing(True)
    calls = _spy(monkeypatch)
    out = f(torch.randn(2, 3, 32, 32))
    assert calls == dict.fromkeys(FUSED_OPS, 2)  # one of each per block, no chain across checkpoints
    out.sum().backward()


def test_unsupported_structure_falls_back():
    t = _timm("vit_base_patch32_clip_quickgelu_224", img_size=64, depth=1)
    f = from_timm(t)
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(KernelNotSupported, match="QuickGELU"):
        f.set_backend("kernels")(x)
    reset_warnings()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the attention's CPU warning
        f.set_backend("auto")
        with torch.no_grad():
            assert rel_err(f(x), t(x)) <= RTOL  # CPU auto: the eager block, silently
    assert vblock.block_structure_problems(f.blocks[0]) == [
        "mlp.act is QuickGELU; the fused epilogue is GELU (exact or tanh)"]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_blocks_autocast_cuda(dtype):
    t = _timm("vit_base_patch16_224", img_size=224, depth=2, init_values=0.1).cuda()
    f = from_timm(t).cuda()
    x = torch.randn(8, 3, 224, 224, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        out, ref = f(x), t(x)
    ref32 = t(x)
    assert (out.float() - ref32).abs().max() <= 2 * (ref.float() - ref32).abs().max() + 1e-2
