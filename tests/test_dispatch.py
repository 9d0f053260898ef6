"""The measured dispatch table (vitfast.dispatch) on the CPU: lookup and bucketing, the cache file
(versioned; corrupt or foreign ones ignored with a warning), the overrides, the shipped defaults
being what the committed GPU results give, and the ops following the table (the interpreter's
kernels standing in for CUDA ones)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vitfast import dispatch
from vitfast.ops import _fused_common
from vitfast.ops.layer_norm import layer_norm, layer_norm_ref

ROOT = Path(__file__).resolve().parent.parent
DEV = "FAKE GPU sm_90"


def _entry(op="layer_norm", shape=None, choice="torch", mode="train", dtype="float32", device=DEV, **kw):
    return dict(op=op, device=device, dtype=dtype, mode=mode, shape=shape or {"C": 768, "rows": 50432},
                choice=choice, **kw)


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty user cache in tmp_path, a fake GPU name, the table reloaded before and after."""
    monkeypatch.setenv("VITFAST_DISPATCH_CACHE", str(tmp_path / "dispatch.json"))
    monkeypatch.delenv("VITFAST_DISPATCH", raising=False)
    monkeypatch.setattr(dispatch, "device_key", lambda device: DEV)
    dispatch.reload()
    yield tmp_path / "dispatch.json"
    monkeypatch.undo()
    dispatch.reload()


# ------------------------------------------------------------------------- lookup
def test_exact_keys_must_match_and_the_nearest_bucket_wins():
    t = dispatch.Table([("a", [_entry(shape={"C": 768, "rows": 1000}, choice="torch"),
                               _entry(shape={"C": 768, "rows": 64000}, choice="kernel"),
                               _entry(shape={"C": 1024, "rows": 1000}, choice="kernel")])])
    look = lambda C, rows, **kw: t.lookup("layer_norm", DEV, "float32", kw.get("mode", "train"), {"C": C, "rows": rows})  # noqa: E731
    assert look(768, 900)["choice"] == "torch"
    assert look(768, 50000)["choice"] == "kernel"  # log2 distance: nearer 64000 than 1000
    assert look(1024, 10**6)["choice"] == "kernel"
    assert look(1280, 1000) is None  # no measured width 1280: nothing (the kernel)
    assert look(768, 1000, mode="infer") is None
    assert t.lookup("layer_norm", "OTHER sm_80", "float32", "train", {"C": 768, "rows": 1000}) is None


def test_an_earlier_source_wins_a_tie():
    t = dispatch.Table([("cache", [_entry(choice="kernel")]), ("shipped", [_entry(choice="torch")])])
    hit = t.lookup("layer_norm", DEV, "float32", "train", {"C": 768, "rows": 50432})
    assert hit["choice"] == "kernel" and hit["source"] == "cache"


def test_attention_keys_d_exactly():
    t = dispatch.Table([("s", [_entry(op="attention", shape={"D": 80, "N": 257, "BH": 2352}, choice="torch")])])
    assert t.lookup("attention", DEV, "float32", "train", {"D": 80, "N": 197, "BH": 3072})["choice"] == "torch"
    assert t.lookup("attention", DEV, "float32", "train", {"D": 64, "N": 257, "BH": 2352}) is None


# ------------------------------------------------------------------ files, overrides
def test_cache_overrides_the_shipped_defaults_and_round_trips(fresh):
    shipped = dispatch.table().lookup("layer_norm", "NVIDIA H200 sm_90", "bfloat16", "train",
                                      {"C": 768, "rows": 50432})
    assert shipped and shipped["source"].startswith("shipped")
    path = dispatch.write_cache([_entry(device="NVIDIA H200 sm_90", dtype="bfloat16", choice="kernel",
                                        note="tuned here")])
    assert path == fresh and json.loads(fresh.read_text())["schema"] == dispatch.SCHEMA
    hit = dispatch.table().lookup("layer_norm", "NVIDIA H200 sm_90", "bfloat16", "train", {"C": 768, "rows": 50432})
    assert hit["choice"] == "kernel" and hit["source"] == f"cache:{fresh}"
    dispatch.write_cache([_entry(choice="kernel"), _entry(choice="torch", shape={"C": 96, "rows": 8})])
    assert len(json.loads(fresh.read_text())["entries"]) == 3  # merged: same key replaced, new added


@pytest.mark.parametrize("content,why", [
    ("{not json", "JSONDecodeError"),
    (json.dumps({"schema": "someone-else/2", "entries": []}), "not a vitfast-dispatch/1 document"),
    (json.dumps({"schema": "vitfast-dispatch/1", "entries": [{"op": "layer_norm"}]}), "entry 0 is malformed"),
    (json.dumps({"schema": "vitfast-dispatch/1", "entries": [_entry(choice="fastest")]}), "entry 0 is malformed"),
], ids=["corrupt", "foreign", "incomplete", "bad_choice"])
def test_a_bad_cache_is_ignored_with_a_warning(fresh, content, why):
    fresh.write_text(content)
    with pytest.warns(RuntimeWarning, match=why):
        t = dispatch.reload()
    assert t.sources == ["shipped"]  # the shipped defaults still apply


def test_overrides(fresh, monkeypatch):
    dispatch.write_cache([_entry(choice="torch")])
    x = torch.empty(50432, 768)
    assert dispatch.choose("layer_norm", torch.device("cuda"), x.dtype, True, {"C": 768, "rows": 50432}) == "torch"
    assert dispatch.choose("layer_norm", torch.device("cuda"), x.dtype, False, {"C": 768, "rows": 50432}) == "kernel"
    for value, want in (("kernel", "kernel"), ("torch", "torch"), ("table", "torch")):
        monkeypatch.setenv("VITFAST_DISPATCH", value)
        dispatch.reload()
        assert dispatch.choose("layer_norm", torch.device("cuda"), x.dtype, True, {"C": 768, "rows": 50432}) == want
    monkeypatch.setenv("VITFAST_DISPATCH", "fastest")
    with pytest.warns(RuntimeWarning, match="ignoring VITFAST_DISPATCH='fastest'"):
        dispatch.reload()
    assert dispatch.override() == "table"


def test_record_counts_the_choices(fresh):
    dispatch.write_cache([_entry(choice="torch")])
    with dispatch.record() as seen:
        for _ in range(3):
            dispatch.choose("layer_norm", torch.device("cuda"), torch.float32, True, {"C": 768, "rows": 50432})
        dispatch.choose("bias_gelu", torch.device("cuda"), torch.float32, True, {"C": 3072, "rows": 50432})
    assert seen == {("layer_norm", "torch", f"cache:{fresh}"): 3, ("bias_gelu", "kernel", "default"): 1}


def test_record_counts_a_compiled_choice_once_per_trace_without_recompiling(fresh):
    """Compiled code never asks the dispatch again, so a record open while torch.compile traces
    counts the trace's choice (vitfast bench records around the compile); opening or closing a
    record must not recompile (a guard on the record would)."""
    dispatch.write_cache([_entry(choice="torch")])
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    @torch.compile(backend=counting, fullgraph=True)
    def f(x):
        choice = dispatch.choose("layer_norm", x.device, x.dtype, True, {"C": 768, "rows": 50432})
        return x + 1 if choice == "kernel" else x - 1

    x = torch.zeros(3)
    with dispatch.record() as seen:
        assert torch.equal(f(x), x - 1) and torch.equal(f(x), x - 1)
    assert seen == {("layer_norm", "torch", f"cache:{fresh}"): 1}
    f(x)
    with dispatch.record() as again:
        f(x)
    assert again == {} and len(graphs) == 1


def test_shipped_defaults_are_generated_from_the_committed_results():
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_dispatch_table.py"), "--check"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    doc = json.loads(dispatch.DEFAULTS_PATH.read_text())
    entries = dispatch.validate(doc, "shipped")
    assert entries and doc["generated_by"] == "benchmarks/make_dispatch_table.py"
    # the H200 measurements: every fused op's forward stays on the kernel; LayerNorm's training
    # step (fwd+bwd 0.32-0.50x eager there) goes to PyTorch
    h200 = [e for e in entries if e["device"] == "NVIDIA H200 sm_90"]
    assert all(e["choice"] == "kernel" for e in h200 if e["mode"] == "infer" and e["op"] == "add_layer_norm")
    assert all(e["choice"] == "torch" for e in h200 if e["mode"] == "train" and e["op"] == "layer_norm")


def test_generator_margin_keeps_ties_on_the_kernel(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import make_dispatch_table as gen
    finally:
        sys.path.pop(0)
    base = dict(device="G", device_kind="cuda", compute_capability="9.0", dtype="bf16", benchmark="fused",
                impl="vitfast", op="layer_norm", width=768, M=1000, status="ok", date="2026-12-01")
    rows = [dict(base, mode="fwd", speedup_vs_eager=0.98), dict(base, mode="fwd+bwd", speedup_vs_eager=0.96),
            dict(base, mode="bwd", speedup_vs_eager=0.1), dict(base, mode="fwd", width=1024, speedup_vs_eager=0.5,
                                                               noisy=True)]
    (tmp_path / "r.json").write_text(json.dumps({"kind": "kernels", "env": {"date": "2026-12-01"}, "rows": rows}))
    doc = gen.build(tmp_path)
    got = {(e["mode"], e["shape"]["C"]): e["choice"] for e in doc["entries"]}
    assert got == {("infer", 768): "kernel", ("train", 768): "torch"}  # bwd-only and noisy rows skipped


# ------------------------------------------------------------- the ops follow it
def test_ops_on_auto_follow_the_table(fresh, monkeypatch):
    """As if on CUDA (the interpreter's kernels stand in): auto takes the kernel unless the table
    says PyTorch for this width, rows and mode; the forced backends ignore the table; the answer
    agrees either way."""
    monkeypatch.setattr(_fused_common, "auto_is_reference", lambda device: False)
    import importlib

    ln_mod = importlib.import_module("vitfast.ops.layer_norm")  # the module (vitfast.ops.layer_norm is the function)
    calls, real = [], ln_mod._ln_fwd
    monkeypatch.setattr(ln_mod, "_ln_fwd", lambda *a: (calls.append("kernel"), real(*a))[1])
    x = torch.randn(4, 96, requires_grad=True)
    w, b = torch.randn(96), torch.randn(96)
    dispatch.write_cache([_entry(shape={"C": 96, "rows": 4}, choice="torch", mode="train")])
    out_torch = layer_norm(x, w, b)  # train (x needs grad): the table says PyTorch
    assert calls == []
    with torch.no_grad():
        out_kernel = layer_norm(x, w, b)  # infer: no entry, the kernel
    assert calls == ["kernel"]
    layer_norm(x, w, b, backend="kernel")  # forced: the table is not asked
    assert calls == ["kernel", "kernel"]
    torch.testing.assert_close(out_torch.detach(), layer_norm_ref(x.detach(), w, b))
    torch.testing.assert_close(out_kernel, out_torch.detach(), rtol=1e-5, atol=1e-5)


def test_attention_on_auto_follows_the_table(fresh, monkeypatch):
    import importlib

    att = importlib.import_module("vitfast.ops.attention")
    monkeypatch.setattr(att, "auto_is_reference", lambda device: False)
    monkeypatch.setattr(att, "attention_not_supported_reasons", lambda q, k, v: [])
    used = []
    monkeypatch.setattr(att, "_attention_fwd", lambda q, k, v, s, d=None: (used.append("kernel"), (att._sdpa(q, k, v, s),))[1])
    q = k = v = torch.randn(2, 3, 50, 32)
    dispatch.write_cache([_entry(op="attention", shape={"D": 32, "N": 50, "BH": 6}, choice="torch", mode="infer")])
    att.attention(q, k, v)
    assert used == []
    dispatch.write_cache([_entry(op="attention", shape={"D": 32, "N": 50, "BH": 6}, choice="kernel", mode="infer")])
    att.attention(q, k, v)
    assert used == ["kernel"]


def test_info_and_bench_show_the_table(fresh, capsys):
    from vitfast.cli import info

    assert info.main(["--dispatch", "--no-interpreter"]) == 0
    out = capsys.readouterr().out
    assert "dispatch: VITFAST_DISPATCH=table; sources:" in out and "NVIDIA H200 sm_90" in out
