"""A block's profiler ranges (vitfast.modules.block.part_range): ``block{i}.attn`` and
``block{i}.mlp`` on every path (fused chain, fused alone, eager) while a profiler records; no
record_function at all without one; none under torch.compile, which still takes the model whole.
Under the interpreter with backend="kernel", as a GPU runs "auto"."""

import pytest
import torch

import vitfast.modules.block as vblock
from vitfast.models.vit import FastViT

DEPTH = 3
IMAGES = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))


def _model(backend="kernel"):
    torch.manual_seed(0)
    m = FastViT(img_size=16, patch_size=8, embed_dim=32, depth=DEPTH, num_heads=2, num_classes=4,
                init_values=0.1, backend=backend).eval()
    for i, blk in enumerate(m.blocks):
        setattr(blk, vblock.RANGE_LABEL, f"block{i}")
    return m


def _count_record_function(monkeypatch):
    entered = []
    real = torch.autograd.profiler.record_function

    def counting(name, *a, **k):
        entered.append(name)
        return real(name, *a, **k)
    monkeypatch.setattr(torch.autograd.profiler, "record_function", counting)
    return entered


def _block_ranges(prof):
    return sorted(e.name for e in prof.events() if e.name.startswith("block"))


WANT = sorted(f"block{i}.{p}" for i in range(DEPTH) for p in ("attn", "mlp"))


@pytest.mark.parametrize("backend", ["kernel", "reference"])
def test_ranges_only_while_a_profiler_records(backend, monkeypatch):
    m = _model(backend)
    entered = _count_record_function(monkeypatch)
    with torch.no_grad():
        plain = m(IMAGES)
        assert entered == []  # no profiler: not one range
        assert vblock.part_range(m.blocks[0], "attn") is vblock._NO_RANGE
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            profiled = m(IMAGES)
        assert sorted(entered) == WANT and _block_ranges(prof) == WANT
        entered.clear()
        m(IMAGES)
        assert entered == []
    torch.testing.assert_close(profiled, plain, rtol=0, atol=0)


def test_ranges_on_every_path():
    """A hooked block (called alone, fused) between chained ones; a block with active drop-path
    (its residual eager) and no label: every block opens both ranges, each once."""
    m = _model()
    m.blocks[1].register_forward_hook(lambda *a: None)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        m(IMAGES).sum().backward()
    assert _block_ranges(prof) == WANT
    unlabelled = _model()
    delattr(unlabelled.blocks[0], vblock.RANGE_LABEL)
    unlabelled.blocks[0].drop_path1.drop_prob = 0.5
    unlabelled.train()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        unlabelled(IMAGES)
    assert _block_ranges(prof) == sorted(["block.attn", "block.mlp"] + WANT[2:])


def test_label_is_a_plain_attribute():
    m = _model()
    assert not any(k.endswith(vblock.RANGE_LABEL) for k in m.state_dict())
    assert all(vblock.calls_only_forward(b) and vblock._plain_block(b) for b in m.blocks)


def test_compile_fullgraph_has_no_ranges(monkeypatch):
    """The profiler check is behind torch.compiler.is_compiling(): no graph break, and the
    compiled graph holds no range, profiled or not."""
    torch._dynamo.reset()
    m = _model()
    entered = _count_record_function(monkeypatch)
    c = torch.compile(m, fullgraph=True, backend="eager")
    with torch.no_grad():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out = c(IMAGES)
        assert _block_ranges(prof) == [] and not [n for n in entered if n.startswith("block")]
        torch.testing.assert_close(c(IMAGES), m(IMAGES))
    torch.testing.assert_close(out, m(IMAGES).detach())
