"""Tuning (vitfast.tune, `vitfast tune`) on the CPU: the interpreter's Triton kernels stand in for
CUDA ones and a fake GPU name keys the table, so the whole loop runs here: capture a model's
dispatch calls, time both paths of each through the op, write the cache, and the ops then follow
it. The timings themselves are CPU timings and mean nothing; the choices are checked against the
timings the entries carry."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
import torch.nn as nn

from vitfast import dispatch
from vitfast import tuning as tune
from vitfast.ops import _fused_common
from vitfast.ops.attention import attention
from vitfast.ops.bias_gelu import bias_gelu
from vitfast.ops.layer_norm import layer_norm

att = importlib.import_module("vitfast.ops.attention")
DEV = "FAKE GPU sm_90"


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """CPU tensors take the dispatch as CUDA ones would (the kernels interpreted), an empty user
    cache in tmp_path; the table reloaded before and after."""
    monkeypatch.setenv("VITFAST_DISPATCH_CACHE", str(tmp_path / "dispatch.json"))
    monkeypatch.delenv("VITFAST_DISPATCH", raising=False)
    monkeypatch.setattr(dispatch, "device_key", lambda device: DEV)
    monkeypatch.setattr(_fused_common, "auto_is_reference", lambda device: False)
    monkeypatch.setattr(att, "auto_is_reference", lambda device: False)
    dispatch.reload()
    yield tmp_path / "dispatch.json"
    monkeypatch.undo()
    dispatch.reload()


class Tiny(nn.Module):
    """The ops a ViT block asks the dispatch about, on backend="auto"."""

    def __init__(self, C=32, heads=2):
        super().__init__()
        self.ln = nn.LayerNorm(C)
        self.fc = nn.Linear(C, 2 * C)
        self.heads = heads

    def forward(self, x):  # x [B, N, C]
        B, N, C = x.shape
        h = layer_norm(x, self.ln.weight, self.ln.bias, self.ln.eps)
        q = h.view(B, N, self.heads, C // self.heads).transpose(1, 2)
        o = attention(q, q, q).transpose(1, 2).reshape(B, N, C)
        return bias_gelu(nn.functional.linear(o, self.fc.weight), self.fc.bias)


def test_capture_collects_each_distinct_call_once(fake_gpu):
    m = Tiny()
    x = torch.randn(2, 9, 32)
    calls = tune.captured_calls(m, x, train=False)
    assert sorted((c["op"], tuple(sorted(c["shape"].items())), c["training"]) for c in calls) == [
        ("attention", (("BH", 4), ("D", 16), ("N", 9)), False),
        ("bias_gelu", (("C", 64), ("rows", 18)), False),
        ("layer_norm", (("C", 32), ("rows", 18)), False),
    ]
    calls = tune.captured_calls(m, x, train=True)
    assert {c["op"] for c in calls} == {"attention", "bias_gelu", "layer_norm"} and all(c["training"] for c in calls)
    assert all(p.grad is None for p in m.parameters())  # the step's gradients are not left behind
    with dispatch.capture() as outer:  # nothing leaks out of a capture, nothing is captured outside one
        pass
    assert outer == {} and dispatch._CAPTURE is None


@pytest.mark.parametrize("train", [False, True], ids=["infer", "train"])
def test_tune_times_both_paths_writes_the_cache_and_the_ops_follow_it(fake_gpu, train, monkeypatch):
    m = Tiny()
    x = torch.randn(2, 9, 32)
    forced_paths = []
    real_forced = dispatch.forced.__enter__

    def spy(self):
        forced_paths.append(self.mode)
        return real_forced(self)
    monkeypatch.setattr(dispatch.forced, "__enter__", spy)
    # tune() itself refuses CPU inputs (next test): its two steps, on the interpreted kernels
    calls = tune.captured_calls(m, x, train=train)
    entries = [tune.time_call(c, warmup=1, iters=3) for c in calls]
    assert {"kernel", "torch"} <= set(forced_paths)  # each path really forced in turn
    for e in entries:
        assert e["device"] == DEV and e["mode"] == ("train" if train else "infer") and e["dtype"] == "float32"
        ratio = float(e["note"].split("x torch")[0].split()[-1])
        assert e["choice"] == dispatch.decide(ratio)
    dispatch.write_cache(entries)
    doc = json.loads(fake_gpu.read_text())
    assert doc["schema"] == dispatch.SCHEMA and len(doc["entries"]) == 3
    # flip every entry to the torch path: the ops then take it (the table is what they follow)
    dispatch.write_cache([{**e, "choice": "torch"} for e in entries])
    with dispatch.record() as seen, torch.set_grad_enabled(train):
        m(x)
    assert {(op, choice) for op, choice, source in seen} == {("attention", "torch"), ("bias_gelu", "torch"),
                                                             ("layer_norm", "torch")}
    assert all(source.startswith("tuned:") for _, _, source in seen)  # the entries tuning wrote


def test_tune_refuses_a_cpu_input_with_the_reason():
    with pytest.raises(ValueError, match="CUDA only"):
        tune.tune(Tiny(), torch.randn(1, 4, 32))
    with pytest.raises(TypeError, match="example_input must be a torch.Tensor"):
        tune.tune(Tiny(), [1, 2])


def test_forced_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match="kernel, torch"):
        dispatch.forced("fastest")


def test_cli_without_a_gpu_says_so(capsys):
    from vitfast.cli import tune as cli

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert cli.main(["--model", "vit_tiny_patch16_224", "--batch-size", "2"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["--model", "no_such_model"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        cli.main(["--model", "vit_tiny_patch16_224", "--batch-size", "0"])


@pytest.mark.cuda
def test_tune_on_the_gpu(tmp_path):
    """A real tuning run (small model and batch): every captured call gets an entry and the cache
    round-trips through vitfast.dispatch."""
    from vitfast.models import create_model

    m = create_model("vit_tiny_patch16_224").cuda().to(torch.bfloat16)
    x = torch.randn(8, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    entries = tune.tune(m, x, cache=tmp_path / "d.json", warmup=2, iters=5)
    assert entries and {e["op"] for e in entries} >= {"attention_packed", "layer_norm"}
    assert len(json.loads((tmp_path / "d.json").read_text())["entries"]) == len(entries)


def test_each_entry_is_in_the_cache_once_measured_and_an_interrupt_keeps_them(fake_gpu, monkeypatch):
    """vitfast.tuning.measure (what tune() and `vitfast tune` run): the cache is rewritten (whole, by
    a rename) after every entry, so a run stopped part-way (Ctrl-C, gpu_check's `timeout -s INT`)
    leaves the entries measured so far and no half-written file."""
    calls = [dict(op="layer_norm", C=32, rows=r) for r in (8, 16, 24)]

    def fake_time_call(call, warmup, iters):
        if call["rows"] == 24:
            raise KeyboardInterrupt
        return dict(op="layer_norm", device=DEV, dtype="float32", mode="infer", shape=dict(C=32, rows=call["rows"]),
                    choice="torch", source="tuned:test", note="")
    monkeypatch.setattr(tune, "time_call", fake_time_call)
    got = []
    with pytest.raises(KeyboardInterrupt):
        for entry in tune.measure(calls):
            got.append(entry)
            doc = json.loads(fake_gpu.read_text())  # already there when the entry is handed out
            assert [e["shape"]["rows"] for e in doc["entries"]] == [e["shape"]["rows"] for e in got]
    assert len(got) == 2 and [p.name for p in fake_gpu.parent.iterdir()] == [fake_gpu.name]  # no temporary left
    assert dispatch.table().lookup("layer_norm", DEV, "float32", "infer", dict(C=32, rows=16))["choice"] == "torch"
    assert list(tune.measure(calls[:1], write=False)) and len(json.loads(fake_gpu.read_text())["entries"]) == 2


def test_patch_embed_is_timed_as_the_model_calls_it(monkeypatch):
    """The tuning call of patch_embed passes what FastViT passes: mean/std only with uint8 images
    (float images are taken as normalised: modules.patch_embed.embed_images); a half-precision
    training call runs as `vitfast tune --train` runs the model: float32 images and parameters
    under autocast (the dispatch key, with the parameters' autocast dtype, is the same)."""
    from vitfast.models import FastViT

    mpe = importlib.import_module("vitfast.modules.patch_embed")
    ope = importlib.import_module("vitfast.ops.patch_embed")
    seen = []

    def spy(real):
        def patch_embed(images, weight, bias=None, **kw):
            seen.append(dict(u8=images.dtype == torch.uint8, images=images.dtype, weight=weight.dtype,
                             stats=None if kw.get("mean") is None else (len(kw["mean"]), len(kw["std"])),
                             amp=torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None))
            return real(images, weight, bias, **kw) if real else None
        return patch_embed
    monkeypatch.setattr(mpe, "patch_embed", spy(mpe.patch_embed))
    model = FastViT(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=0).eval()
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
        model(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    model_calls, seen[:] = list(seen), []
    assert [(c["u8"], c["stats"]) for c in model_calls] == [(False, None), (True, (3, 3))]

    monkeypatch.setattr(ope, "patch_embed", spy(None))
    for training, dtype in ((False, torch.float32), (False, torch.bfloat16), (True, torch.bfloat16)):
        for u8 in (1, 2):
            call = dict(op="patch_embed", device=torch.device("cpu"), dtype=dtype, training=training,
                        shape=dict(D=32, C=3, p=8, T=17, B=2, u8=u8))
            tune._inputs(call)()
    assert [(c["u8"], c["stats"]) for c in seen] == [(c["u8"], c["stats"]) for c in model_calls] * 3
    infer, train = seen[2:4], seen[4:]
    assert [c["images"] for c in infer] == [torch.bfloat16, torch.uint8] and {c["amp"] for c in infer} == {None}
    assert [c["images"] for c in train] == [torch.float32, torch.uint8]
    assert {(c["weight"], c["amp"]) for c in train} == {(torch.float32, torch.bfloat16)}
