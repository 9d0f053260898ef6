"""blocks_forward runs a plain block in pieces shared with its neighbours (its last residual and
the next norm1 in one add_layer_norm), never calling it; any block whose call does more than its
forward -- hooks (its own or global), activation checkpointing's wrapper, FSDP2's fully_shard,
mod.compile() -- is called, ``blk(x)``, and the chain joins nothing across it. Under the
interpreter with backend="kernel", as a GPU runs "auto"."""

import copy
import functools

import pytest
import torch
import torch.nn.functional as F

import vitfast.modules.block as vblock
from vitfast.models.vit import FastViT
from vitfast.modules.block import Block, blocks_forward

RTOL = 1e-4
FUSED_OPS = ("layer_norm", "add_layer_norm", "linear_bias_gelu", "bias_scale_residual")


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _model(depth=3, backend="kernel"):
    torch.manual_seed(0)
    m = FastViT(img_size=16, patch_size=8, embed_dim=32, depth=depth, num_heads=2, num_classes=4,
                init_values=0.1, backend=backend).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial LayerNorm affine and biases
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return m


IMAGES = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))


def _tokens():
    """Tokens as the embedding gives them ([B, 1 + 4 patches, D]), a leaf that takes a gradient."""
    return torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3)).requires_grad_()


def _features(m, tokens):
    """What FastViT.forward_features does after the embedding."""
    return blocks_forward(m.blocks, tokens, m.norm)[1]


def _spy(monkeypatch):
    calls = dict.fromkeys(FUSED_OPS, 0)
    for name in FUSED_OPS:
        def wrapped(*a, _fn=getattr(vblock, name), _name=name, **k):
            calls[_name] += 1
            return _fn(*a, **k)
        monkeypatch.setattr(vblock, name, wrapped)
    return calls


def _grads(m, prefix=""):
    return {n.replace(prefix, ""): (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad)
            for n, p in m.named_parameters() if p.grad is not None}


def _backward(m, tokens, out):
    out.square().sum().backward()
    return {"tokens": tokens.grad, **_grads(m, "_checkpoint_wrapped_module.")}


# the hooked block does its own norm1 and last residual, as block_forward alone does, and so
# does the block before it; the others chain (3 blocks: one boundary and the final norm joined)
@pytest.mark.parametrize("i,ops", [(0, (2, 5, 1)), (1, (3, 4, 2))], ids=["first_block", "middle_block"])
def test_block_hooks_fire_and_keep_the_numbers(i, ops, monkeypatch):
    m = _model()
    with torch.no_grad():
        plain, ref = m(IMAGES), _model(backend="reference")(IMAGES)
    calls = _spy(monkeypatch)
    fired = []
    m.blocks[i].register_forward_pre_hook(lambda mod, args: fired.append(("pre", mod)))
    m.blocks[i].register_forward_hook(lambda mod, args, out: fired.append(("post", mod)))
    with torch.no_grad():
        out = m(IMAGES)
    assert fired == [("pre", m.blocks[i]), ("post", m.blocks[i])]
    torch.testing.assert_close(out, plain, rtol=1e-6, atol=1e-6)
    assert rel_err(out, ref) <= RTOL
    assert calls == dict(zip(FUSED_OPS, (ops[0], ops[1], 3, ops[2])))


def test_global_forward_hooks_fire_per_block():
    m = _model()
    with torch.no_grad():
        plain = m(IMAGES)
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda mod, args, out: seen.append(mod))
    try:
        with torch.no_grad():
            out = m(IMAGES)
    finally:
        handle.remove()
    assert [s for s in seen if isinstance(s, Block)] == list(m.blocks)
    assert m.norm in seen  # the final norm is called too, not made inside the last block
    torch.testing.assert_close(out, plain, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["blocks", "norm"])
def test_hooks_on_the_blocks_sequential_and_final_norm_fire(name):
    """timm's forward_features calls ``self.blocks(x)`` and ``self.norm(x)``: so does FastViT's when
    that call does more than its forward (a hook; FSDP2 on the Sequential as one unit)."""
    m = _model()
    with torch.no_grad():
        plain = m(IMAGES)
    fired = []
    getattr(m, name).register_forward_pre_hook(lambda mod, args: fired.append(mod))
    with torch.no_grad():
        out = m(IMAGES)
    assert fired == [getattr(m, name)]
    torch.testing.assert_close(out, plain, rtol=1e-6, atol=1e-6)


def test_activation_checkpointing_wrappers_run(assert_grads_close):
    cw = pytest.importorskip("torch.distributed.algorithms._checkpoint.checkpoint_wrapper")
    m = _model()
    plain, ref = copy.deepcopy(m), _model(backend="reference")
    runs = []

    def counting_checkpoint(fn, *args, **kwargs):
        runs.append(fn)
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, **kwargs)

    cw.apply_activation_checkpointing(m, checkpoint_wrapper_fn=functools.partial(
        cw.checkpoint_wrapper, checkpoint_fn=counting_checkpoint), check_fn=lambda mod: isinstance(mod, Block))
    assert all(isinstance(b, cw.CheckpointWrapper) for b in m.blocks)
    got = [_backward(mod, t, _features(mod, t)) for mod, t in ((m, _tokens()), (plain, _tokens()), (ref, _tokens()))]
    assert runs == [b._checkpoint_wrapped_module for b in m.blocks]
    assert_grads_close(got[0], got[1], RTOL)
    assert_grads_close(got[0], got[2], RTOL)


@pytest.fixture
def one_process_group(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            pytest.skip("a process group of more than one process is already set up")
        yield
        return
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_fsdp2_sharded_blocks_match_unsharded(one_process_group, assert_grads_close):
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        pytest.skip("FSDP2 (torch.distributed.fsdp.fully_shard) is not available")
    m = _model()
    sharded = copy.deepcopy(m)
    mesh = init_device_mesh("cpu", (1,))
    for blk in sharded.blocks:
        fully_shard(blk, mesh=mesh)
    t0, t1 = _tokens(), _tokens()
    out, want = _features(sharded, t1), _features(m, t0)
    assert rel_err(out, want) <= RTOL
    assert_grads_close(_backward(sharded, t1, out), _backward(m, t0, want), RTOL)


def test_hooked_compiled_and_plain_blocks_mixed(monkeypatch, assert_grads_close):
    """Block 2 has a forward hook that changes its output, block 3 a pre-hook, block 4 a stand-in
    for ``mod.compile()``'s compiled call: those are called; 0-1 and 5 stay fused and chained."""
    models = [_model(depth=6), _model(depth=6, backend="reference")]
    fired = []
    for m in models:
        m.blocks[2].register_forward_hook(lambda mod, args, out: out * 1.5)
        m.blocks[3].register_forward_pre_hook(lambda mod, args: fired.append(mod))
    compiled = models[0].blocks[4]
    compiled._compiled_call_impl = lambda *a, **k: (fired.append("compiled"), compiled._call_impl(*a, **k))[1]
    calls = _spy(monkeypatch)
    tokens = [_tokens(), _tokens()]
    out, ref = (_features(m, t) for m, t in zip(models, tokens))
    assert fired == [models[0].blocks[3], "compiled", models[1].blocks[3]]
    assert rel_err(out, ref) <= RTOL
    # block 0: norm1, norm2, its last residual + block 1's norm1; block 1: norm2, its own last
    # residual; blocks 2-4 as block_forward alone; block 5: norm1, norm2, last residual + final norm
    assert calls == {"layer_norm": 5, "add_layer_norm": 2 + 1 + 3 + 2, "linear_bias_gelu": 6, "bias_scale_residual": 4}
    assert_grads_close(_backward(models[0], tokens[0], out), _backward(models[1], tokens[1], ref), RTOL)


def test_patched_timm_hooks_fire(monkeypatch):
    timm = pytest.importorskip("timm")
    from vitfast.integrations.timm import patch_timm

    torch.manual_seed(0)
    t = timm.create_model("vit_small_patch16_224", img_size=16, patch_size=8, embed_dim=32, num_heads=2, depth=3,
                          num_classes=4, init_values=0.1).eval()
    p = patch_timm(copy.deepcopy(t), backend="kernel")
    fired = []
    for m in (t, p):
        m.blocks[1].register_forward_hook(lambda mod, args, out: (fired.append(mod), out * 1.5)[1])
        m.blocks.register_forward_pre_hook(lambda mod, args: fired.append(mod))
    with torch.no_grad():
        out, ref = p(IMAGES), t(IMAGES)
    assert fired == [p.blocks, p.blocks[1], t.blocks, t.blocks[1]]
    assert rel_err(out, ref) <= RTOL
    # without the Sequential's hook, the chain runs around the hooked block only
    p.blocks._forward_pre_hooks.clear()
    calls = _spy(monkeypatch)
    with torch.no_grad():
        assert rel_err(p(IMAGES), ref) <= RTOL
    assert calls == {"layer_norm": 3, "add_layer_norm": 3 + 1, "linear_bias_gelu": 3, "bias_scale_residual": 2}


@pytest.mark.parametrize("sub", ["attn", "attn.proj", "mlp", "mlp.fc1", "norm1", "norm2", "ls1"])
def test_hooks_on_submodules_the_fused_path_does_not_call_fire(sub):
    """The fused block reads norm1/norm2/attn.proj/mlp weights instead of calling those modules:
    a hook on one of them (feature extraction, a user's) makes the block run its own forward,
    with no warning, and the numbers stay those of the reference."""
    import warnings

    torch.manual_seed(0)
    b = Block(32, 2, init_values=0.5, backend="kernel").eval()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        b.attn.backend = "reference"
        ref = b(x)
        b.attn.backend = "kernel"
        mod = functools.reduce(getattr, sub.split("."), b)
        seen = []
        mod.register_forward_hook(lambda m, i, o: seen.append(sub))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = b(x)
    assert seen == [sub]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_timm_blocks_with_other_attention_or_mlp_are_not_fused():
    """patch_timm's fused block rebuilds standard attention and an fc1/GELU/fc2 MLP from their
    weights: a gated attention, a subclass of timm's Attention with its own forward, or a GELU
    GluMlp (fc1/fc2 too, but gated) must be left to timm, with timm's numbers."""
    timm = pytest.importorskip("timm")
    from timm.layers import Attention, GluMlp
    from timm.models.vision_transformer import Block as TimmBlock

    from vitfast.integrations.timm import is_patched, patch_timm

    class Doubled(Attention):
        def forward(self, x, attn_mask=None, is_causal=False):
            return 2 * super().forward(x, attn_mask=attn_mask)

    torch.manual_seed(0)
    x = torch.randn(2, 5, 32)
    blocks = {"gated": TimmBlock(32, 2), "subclass": TimmBlock(32, 2), "glu": TimmBlock(32, 2, mlp_layer=GluMlp,
                                                                                         act_layer=torch.nn.GELU)}
    try:
        blocks["gated"].attn = Attention(32, 2, gated=True)
    except TypeError:  # a timm without gated attention
        del blocks["gated"]
    blocks["subclass"].attn = Doubled(32, 2)
    for name, b in blocks.items():
        b.eval()
        with torch.no_grad():
            ref = b(x)
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                patch_timm(b, backend="kernel")
            assert not is_patched(b), name
            torch.testing.assert_close(b(x), ref, rtol=1e-4, atol=1e-5, msg=name)
