"""vitfast.inference: optimize_for_inference / CUDAGraphModule.

On the CPU: argument checks, the documented no-CUDA behaviour, input-shape inference, and
the wrapper's logic (padding a smaller batch, slicing, cloning, refusing to be moved) with
the graph replaced by an eager call. Tests marked ``cuda`` capture a real graph of a small
FastViT and check replays with new inputs against eager.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves

from vitfast.inference import CUDAGraphModule, infer_input_shape, optimize_for_inference

HAS_CUDA = torch.cuda.is_available()


def _tiny_vit(**kw):
    from vitfast import FastViT

    torch.manual_seed(0)
    return FastViT(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10, **kw)


class _EagerGraph(CUDAGraphModule):
    """The wrapper with 'capture' and 'replay' done eagerly (what a graph replays)."""

    def _capture(self, warmup):
        self.replays = 0
        with torch.no_grad():
            return self.model(self.static_input)

    def _replay(self):
        self.replays += 1
        with torch.no_grad():
            new = self.model(self.static_input)
        for dst, src in zip(tree_leaves(self.static_output), tree_leaves(new)):
            if isinstance(dst, torch.Tensor):
                dst.copy_(src)


class _PerRow(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 5))

    def forward(self, x):  # [B, 3] -> [B, 5], rows independent
        return torch.tanh(x @ self.w)


# ------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("kw,exc,match", [
    (dict(model="vit"), TypeError, r"model must be a torch.nn.Module, got str"),
    (dict(batch_size=0), ValueError, r"batch_size must be a positive int, got 0"),
    (dict(batch_size=2.0), ValueError, r"batch_size must be a positive int"),
    (dict(dtype=torch.int8), TypeError, r"dtype must be a floating-point torch.dtype"),
    (dict(dtype="bf16"), TypeError, r"dtype must be a floating-point torch.dtype"),
    (dict(input_shape=(3, 0, 32)), ValueError, r"input_shape must be a tuple of positive ints"),
    (dict(warmup=0), ValueError, r"warmup must be a positive int"),
    (dict(input_dtype=torch.complex64), TypeError, r"input_dtype must be a real torch.dtype"),
])
def test_bad_arguments(kw, exc, match):
    args = {"model": _PerRow(), "batch_size": 4, "dtype": torch.float32, **kw}
    with pytest.raises(exc, match=match):
        optimize_for_inference(args.pop("model"), args.pop("batch_size"), **args)


def test_meta_model_is_rejected():
    with pytest.raises(ValueError, match="model is on meta"):
        optimize_for_inference(_PerRow().to("meta"), 2, torch.float32)


@pytest.mark.skipif(HAS_CUDA, reason="the documented behaviour without CUDA")
def test_without_cuda_returns_the_model_in_eval_mode_with_a_warning():
    model = _tiny_vit().train()
    with pytest.warns(RuntimeWarning, match="CUDA graphs need a CUDA GPU"):
        out = optimize_for_inference(model, 4, torch.bfloat16)
    assert out is model and not model.training
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA GPU"):
        optimize_for_inference(model, 4, torch.bfloat16, strict=True)


def test_infer_input_shape():
    assert infer_input_shape(_tiny_vit()) == (3, 32, 32)
    m = nn.Linear(2, 2)
    m.pretrained_cfg = {"input_size": (3, 384, 384)}
    assert infer_input_shape(m) == (3, 384, 384)
    with pytest.raises(ValueError, match=r"cannot tell the input shape of Linear; pass input_shape=\(C, H, W\)"):
        infer_input_shape(nn.Linear(2, 2))


def test_infer_input_shape_timm():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=64)
    assert infer_input_shape(model) == (3, 64, 64)


# ----------------------------------------------------------- wrapper logic, on the CPU
def test_wrapper_pads_smaller_batches_and_clones():
    model = _PerRow()
    wrapped = _EagerGraph(model, torch.zeros(4, 3))
    for n in (4, 1, 3):
        x = torch.randn(n, 3)
        out = wrapped(x)
        torch.testing.assert_close(out, model(x).detach())
        assert out.shape == (n, 5) and out.data_ptr() != wrapped.static_output.data_ptr()
    first = wrapped(torch.ones(2, 3))
    kept = first.clone()
    wrapped(torch.zeros(2, 3))
    assert torch.equal(first, kept)  # a later call does not overwrite an earlier result
    assert wrapped.replays == 5


def test_wrapper_without_clone_returns_the_static_output():
    wrapped = _EagerGraph(_PerRow(), torch.zeros(4, 3), clone_output=False)
    assert wrapped(torch.randn(4, 3)).data_ptr() == wrapped.static_output.data_ptr()


def test_wrapper_casts_inputs_and_handles_tuple_outputs():
    class Two(_PerRow):
        def forward(self, x):
            y = super().forward(x)
            return {"logits": y, "features": (y * 2, 7)}

    model = Two().double()
    wrapped = _EagerGraph(model, torch.zeros(3, 3, dtype=torch.float64))
    x = torch.randn(2, 3)  # fp32 into the fp64 buffer
    out = wrapped(x)
    torch.testing.assert_close(out["logits"], model(x.double())["logits"].detach())
    assert out["features"][0].shape == (2, 5) and out["features"][1] == 7


@pytest.mark.parametrize("x,exc,match", [
    (torch.randn(5, 3), ValueError, r"x has batch 5; the graph was captured for batch_size=4"),
    (torch.randn(0, 3), ValueError, r"x has batch 0"),
    (torch.randn(4, 2), ValueError, r"x has shape \[4, 2\]; the graph was captured for \[<= 4, 3\]"),
    (torch.randn(4, 3, 1), ValueError, r"x has shape \[4, 3, 1\]"),
    (torch.ones(4, 3, dtype=torch.int64), TypeError, r"x has dtype torch.int64; the graph takes torch.float32"),
    ([[0.0] * 3] * 4, TypeError, r"x must be a torch.Tensor, got list"),
])
def test_wrapper_rejects_other_shapes(x, exc, match):
    wrapped = _EagerGraph(_PerRow(), torch.zeros(4, 3))
    with pytest.raises(exc, match=match):
        wrapped(x)


def test_wrapper_refuses_to_move_but_loads_state_dicts():
    model = _PerRow()
    wrapped = _EagerGraph(model, torch.zeros(2, 3))
    with pytest.raises(RuntimeError, match="invalidate"):
        wrapped.half()
    new = {"model.w": torch.randn(3, 5)}
    ptr = model.w.data_ptr()
    wrapped.load_state_dict(new)
    assert model.w.data_ptr() == ptr  # copied in place: a captured graph sees it
    x = torch.randn(2, 3)
    torch.testing.assert_close(wrapped(x), torch.tanh(x @ new["model.w"]))


class _Cuda1Tensor(torch.Tensor):
    """A CPU tensor that says it is on cuda:1 (the wrapper takes the model's device from its input)."""

    @property
    def device(self):
        return torch.device("cuda", 1)


def test_capture_and_replay_run_on_the_models_device(monkeypatch):
    """A model on cuda:1 while cuda:0 is current: its kernels go to cuda:1's current stream, so
    that stream must be the one being captured. torch.cuda.graph() without a stream captures on
    a side stream made on the device current at its first use (cuda:0 here): the graph would hold
    nothing and replay the warm-up's output for any input. Stand-ins for torch.cuda's device and
    stream state (tests/_fake_cuda.py) log where each forward's work went."""
    from _fake_cuda import FakeCuda

    cuda = FakeCuda(count=2, current=0).install(monkeypatch)

    class OnCuda1(_PerRow):
        def forward(self, x):
            cuda.work(1)
            return super().forward(x)

    wrapped = CUDAGraphModule(OnCuda1(), torch.zeros(4, 3).as_subclass(_Cuda1Tensor), warmup=2)
    captured_on = wrapped.graph.capture_stream
    assert captured_on.device == torch.device("cuda", 1)
    *warm_up, captured = cuda.logged("work")
    assert captured is captured_on  # the captured forward's kernels went to the stream being captured
    assert len(warm_up) == 2 and all(s.index == 1 and s is not cuda.default[1] for s in warm_up)  # a side stream
    side = warm_up[0]
    waits = cuda.logged("wait")
    assert waits[0] == (side, cuda.default[1]) and waits[1] == (cuda.default[1], side)  # torch's warm-up pattern
    assert 1 in cuda.logged("synchronize") and 0 not in cuda.logged("synchronize")
    assert cuda.current == 0 and cuda.streams == dict(enumerate(cuda.default))  # the caller's state restored
    wrapped(torch.randn(2, 3))
    assert [(device, graph) for device, graph in cuda.logged("replay")] == [(1, wrapped.graph)]  # cuda:1 current
    assert cuda.current == 0


# -------------------------------------------------------------------------- GPU
def _close(dtype):
    # eager and the replay run the same kernels; the slack only covers a library choosing
    # another algorithm during capture
    return dict(rtol=0, atol=0) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_graph_replay_matches_eager_cuda(dtype):
    model = _tiny_vit()
    reference = _tiny_vit().cuda().to(dtype).eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="vitfast")  # no kernel falls back
        graphed = optimize_for_inference(model, 8, dtype)
    assert isinstance(graphed, CUDAGraphModule) and next(model.parameters()).dtype == dtype
    outs = []
    for seed in range(3):
        x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(seed)).cuda()
        with torch.no_grad():
            want = reference(x.to(dtype))
        outs.append(graphed(x))
        torch.testing.assert_close(outs[-1], want, **_close(dtype))
    assert not torch.equal(outs[0], outs[1])  # new inputs, new outputs
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)).cuda()
    assert torch.equal(graphed(x), outs[0])  # a replay is deterministic
    assert torch.equal(graphed(x[:3]), outs[0][:3])  # a smaller batch: padded, rows independent


@pytest.mark.cuda
def test_graph_sees_new_weights_cuda():
    model = _tiny_vit()
    graphed = optimize_for_inference(model, 4, torch.bfloat16)
    x = torch.randn(4, 3, 32, 32, device="cuda")
    before = graphed(x)
    other = _tiny_vit()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1)
    graphed.model.load_state_dict(other.state_dict())
    after = graphed(x)
    with torch.no_grad():
        want = other.cuda().bfloat16().eval()(x.bfloat16())
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, want, **_close(torch.bfloat16))


@pytest.mark.cuda
def test_uint8_images_and_cpu_inputs_cuda():
    model = _tiny_vit()
    graphed = optimize_for_inference(model, 2, torch.bfloat16, input_dtype=torch.uint8)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)  # on the CPU
    with torch.no_grad():
        want = model(images.cuda())
    torch.testing.assert_close(graphed(images), want, **_close(torch.bfloat16))
