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
