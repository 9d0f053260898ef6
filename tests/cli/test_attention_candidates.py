"""The attention candidate benchmark on the CPU (Triton interpreter): every autotune survivor of
every kernel gets a row with its time and its error, and the parallel precompile plumbing works."""

from __future__ import annotations

import json

import pytest

from vitfast.cli.kernels import attention_candidates as ac
from vitfast.ops.triton import attention as K

import torch


def test_smoke_rows_cover_every_candidate_of_every_kernel(tmp_path):
    assert ac.main(["--smoke", "--allow-noisy", "--json", str(tmp_path) + "/"]) == 0
    (path,) = tmp_path.glob("*_attention_candidates.json")
    rows = json.loads(path.read_text())["rows"]
    cand = [r for r in rows if r["op"] == "attention_candidate"]
    q = torch.empty(ac.SMOKE_SHAPES[0], dtype=torch.float32)
    for kind in ac.KINDS:
        mine = [r for r in cand if r["kernel"] == kind]
        assert [r["config"] for r in mine] == [ac._config_str(c) for c in K.candidate_configs(kind, q)]
        assert all(r["status"] == "ok" and r["ms"] > 0 and r["x_best"] >= 1.0 for r in mine)
        assert sum(r["best"] for r in mine) == 1 and sum(r["first"] for r in mine) == 1
        # fp32 kernels against the fp32 reference: a few float32 ulps of values of size ~1
        assert all(r["err"] < 1e-4 for r in mine), [(r["config"], r["err"]) for r in mine]
    tuned = [r for r in rows if r["op"] == "attention"]
    assert {(r["backend"], r["mode"]) for r in tuned} == {(b, m) for b in ("vitfast", "math") for m in ac.ab.MODES}


def test_a_wrong_candidate_shows_in_its_error(monkeypatch):
    """The error column is real: a dq kernel launched with a wrong scale is far off."""
    real = K.launch_bwd_dq
    monkeypatch.setattr(K, "launch_bwd_dq", lambda *a, **k: real(*a[:7], a[7] * 1.5, **k))
    rows = ac.candidate_rows(ac.SMOKE_SHAPES[0], torch.float32, "cpu", warmup=0, iters=1)
    rows = [r for r in rows if r["op"] == "attention_candidate"]
    assert all(r["err"] > 1e-2 for r in rows if r["kernel"] == "dq")
    assert all(r["err"] < 1e-4 for r in rows if r["kernel"] != "dq")


def test_every_backward_variant_is_timed():
    """The 5-matmul backward (deterministic and atomic, by pointers and by TMA: the interpreter
    emulates the descriptors) beside the 7-matmul pair: candidates of each, and one summary row per
    variant naming the one auto takes."""
    rows = ac.candidate_rows(ac.SMOKE_SHAPES[0], torch.float32, "cpu", warmup=0, iters=1)
    cand = [r for r in rows if r["op"] == "attention_candidate"]
    assert {r["bwd"] for r in cand} == {None, "split", "fused", "atomic", "tma", "tma_atomic"}
    variants = {r["bwd"]: r for r in rows if r["op"] == "attention_bwd_variant"}
    assert set(variants) == {"split", "fused", "atomic", "tma", "tma_atomic"}
    best = lambda kind: min(r["ms"] for r in cand if r["kernel"] == kind)  # noqa: E731
    assert variants["split"]["ms"] == round(best("dkdv") + best("dq"), 4)
    assert variants["fused"]["auto"] and sum(r["auto"] for r in variants.values()) == 1
    assert sum(r["best"] for r in variants.values()) == 1 and min(r["x_best"] for r in variants.values()) == 1.0


def test_every_forward_variant_is_timed():
    """The TMA forwards (the interpreter emulates their descriptors) beside the pointer kernel: every
    candidate of each, checked against the reference, and one summary row per forward variant."""
    rows = ac.candidate_rows(ac.SMOKE_SHAPES[0], torch.float32, "cpu", warmup=0, iters=1)
    cand = [r for r in rows if r["op"] == "attention_candidate" and r["bwd"] is None]
    q = torch.empty(ac.SMOKE_SHAPES[0])
    for kind, variant in ac.FWD.items():
        mine = [r for r in cand if r["kernel"] == kind]
        assert [r["config"] for r in mine] == [ac._config_str(c) for c in K.candidate_configs(kind, q)]
        assert mine and all(r["fwd"] == variant and r["status"] == "ok" and r["err"] < 1e-4 for r in mine)
    assert all("/SM," in r["config"] for r in cand if r["kernel"] == "fwd_tma_persistent")
    variants = {r["fwd"]: r for r in rows if r["op"] == "attention_fwd_variant"}
    assert set(variants) == {"pointer", "tma", "tma_persistent"}
    assert variants["pointer"]["ms"] == min(r["ms"] for r in cand if r["kernel"] == "fwd")
    assert variants["pointer"]["auto"] and sum(r["auto"] for r in variants.values()) == 1  # auto on the CPU
    assert sum(r["best"] for r in variants.values()) == 1


def test_tma_kernels_are_left_out_where_they_cannot_run(monkeypatch):
    monkeypatch.setattr(K, "tma_bwd_not_supported_reasons", lambda *a: ["no TMA here"])
    assert ac._kinds(torch.empty(ac.SMOKE_SHAPES[0])) == ["fwd", "dkdv", "dq", "fused", "atomic"]


def test_shapes_in_priority_order_fill_the_gpu():
    assert ac.SHAPES[0] == (256, 12, 197, 64) and ac.SHAPES[-1] == (8, 16, 4096, 128)
    assert {(N, D) for _, _, N, D in ac.SHAPES[:-1]} == {(N, D) for N in (197, 257, 577, 1025) for D in (64, 80)}
    for B, H, N, D in ac.SHAPES[:-1]:
        assert 0.8 < B * H * N / (256 * 12 * 197) < 1.25


@pytest.mark.slow
def test_precompile_runs_every_kernel_once_in_worker_processes():
    """Two spawned workers (interpreter: nothing is compiled, the launches run), each kernel once:
    groups sharing a specialisation share it."""
    groups = [((2, 2, 50, 32), "fp32"), ((1, 2, 50, 32), "fp32")]
    msg = ac.precompile(groups, jobs=2, deadline=None, device="cpu")
    q = torch.empty(1, 2, 50, 32)
    n = sum(len(K.candidate_configs(kind, q)) for kind in ac.KINDS)
    assert msg.startswith(f"precompiled {n} of {n} kernels on 2 processes") and "failed" not in msg
