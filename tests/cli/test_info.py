"""`vitfast info --check`: a PASS line per (device, op), exit code 1 on any failure, a crash
of the interpreter child reported as a FAIL."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from vitfast.cli import info

OPS = ("patch_embed", "attention", "attention_packed", "layer_norm", "add_layer_norm", "bias_gelu",
       "bias_scale_residual")


def test_cli_check_passes_on_every_device():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the command sets it for its child
    proc = subprocess.run([sys.executable, "-m", "vitfast.cli", "info", "--check"], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    devices = ["cpu", "cpu-triton"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for op in OPS:
            if op == "patch_embed" and device == "cpu-triton":
                continue
            assert any(ln.split()[:3] == ["PASS", device, op] for ln in lines if ln.strip().startswith("PASS")), (
                device, op, proc.stdout)
    assert "FAIL" not in proc.stdout and lines[-1].endswith(", 0 failed")


def test_wrong_answer_and_exception_are_failures(monkeypatch, capsys):
    def wrong(device, dtype, backend):
        return info._compare(["out"], [torch.ones(3)], [torch.zeros(3)], dtype)

    def boom(device, dtype, backend):
        raise ValueError("vitfast.attention: something broke")

    info.run_checks("cpu")  # fills info.CHECKS from the op declarations
    monkeypatch.setitem(info.CHECKS, "layer_norm", wrong)
    monkeypatch.setitem(info.CHECKS, "attention", boom)
    assert info.main(["--check", "--no-interpreter"]) == 1
    out = capsys.readouterr().out
    assert any(ln.split()[:3] == ["FAIL", "cpu", "layer_norm"] and "error 1 > 0.0001" in ln for ln in out.splitlines())
    assert any(ln.split()[:3] == ["FAIL", "cpu", "attention"] and "ValueError: vitfast.attention: something broke" in ln
               for ln in out.splitlines())
    assert any(ln.split()[:3] == ["PASS", "cpu", "patch_embed"] for ln in out.splitlines())


def test_interpreter_child_crash_is_a_failure(monkeypatch):
    monkeypatch.setattr(info, "_worker_command", lambda: [sys.executable, "-c", "import os; os.abort()"])
    rows = info.run_interpreter_checks(timeout=60)
    assert len(rows) == 1 and not rows[0]["ok"] and "SIGABRT" in rows[0]["detail"], rows


def test_interpreter_child_hang_is_a_failure(monkeypatch):
    monkeypatch.setattr(info, "_worker_command", lambda: [sys.executable, "-c", "import time; time.sleep(30)"])
    rows = info.run_interpreter_checks(timeout=2)
    assert not rows[0]["ok"] and "did not finish" in rows[0]["detail"]


def test_json_includes_checks(capsys):
    assert info.main(["--check", "--no-interpreter", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {r["op"] for r in data["checks"]} == set(OPS) and all(r["ok"] for r in data["checks"])
    assert "ops" in data and "torch" in data


def test_render_says_why_the_extension_is_not_there(monkeypatch):
    """Without a usable vitfast._C, `vitfast info` says so with the reason and the fix instead of
    a path (the patch embedding then runs its PyTorch reference)."""
    from vitfast import _ext

    facts = info.collect()
    missing = _ext.ExtensionStatus(None, "vitfast._C is not built (no compiled extension was found in the package)",
                                   "build it: `pip install --no-build-isolation ...`", built=False)
    monkeypatch.setattr(_ext, "status", lambda: missing)
    text = info.render({**facts, "extension": info.extension_facts()})
    assert "extension      not built (build it: `pip install --no-build-isolation ...`)" in text.splitlines()
    stale = _ext.ExtensionStatus(None, "vitfast._C was built for torch 2.0.0 but torch 2.1.0 is installed",
                                 "install the torch it was built for", built_for_torch="2.0.0")
    monkeypatch.setattr(_ext, "status", lambda: stale)
    facts = {**facts, "extension": info.extension_facts()}
    assert facts["extension"]["built"] and not facts["extension"]["usable"]
    assert ("extension      not usable (vitfast._C was built for torch 2.0.0 but torch 2.1.0 is installed; "
            "install the torch it was built for)") in info.render(facts).splitlines()


@pytest.mark.parametrize("forced", ["gemm", "conv"])
def test_render_names_the_cpu_patch_embedding_gemm(monkeypatch, forced):
    """With the extension, `vitfast info` says which GEMM the float32 CPU patch embedding runs
    on this host (VITFAST_CPU_PATCH_EMBED forces one; the C++ op reads it at every call)."""
    facts = info.extension_facts()
    if not facts["usable"]:
        pytest.skip("vitfast._C is not built")
    monkeypatch.setenv("VITFAST_CPU_PATCH_EMBED", forced)
    text = info.render({**info.collect(), "extension": info.extension_facts()})
    assert any(line.startswith(f"  CPU patch embedding  {forced} (") for line in text.splitlines()), text


def test_render_names_the_attention_variants_in_force():
    """`vitfast info` says which attention forward and backward run (set_*_variant, or the
    VITFAST_ATTENTION_FWD/_BWD variables read at import) and which there are."""
    from vitfast.ops.triton import attention as K

    previous = K.set_backward_variant("tma")
    try:
        text = info.render(info.collect())
    finally:
        K.set_backward_variant(previous)
    (line,) = [line for line in text.splitlines() if line.startswith("attention ")]
    assert f"forward {K._FWD} (VITFAST_ATTENTION_FWD: auto|pointer|tma|tma_persistent)" in line
    assert "backward tma (VITFAST_ATTENTION_BWD: auto|fused|atomic|split|tma|tma_atomic)" in line
    assert json.loads(json.dumps(info.collect()))["attention_variants"]["backward"] == K._BWD == previous
