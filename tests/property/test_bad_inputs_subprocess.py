"""Every bad input from tests/property/_bad_cases.py, run in a child process.

The child must exit normally (return code 0) having raised the expected ValueError/TypeError
for each case: a segfault, abort (SIGSEGV, SIGABRT, ...), illegal memory access or hang
fails here with the name of the case that was running, instead of killing pytest.
The Triton kernels run under TRITON_INTERPRET=1 in the child, as in the rest of the suite.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _bad_cases import KNOWN_DEFECTS, all_cases  # noqa: E402

TIMEOUT_S = 240


def _run_child(code: str, env_extra=None, timeout=TIMEOUT_S) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if not _has_cuda():
        env["TRITON_INTERPRET"] = "1"
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=str(HERE.parents[1]))


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit code {rc}"


@pytest.fixture(scope="module")
def child_results():
    code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); "
            "import _bad_cases; sys.exit(_bad_cases.main())")
    try:
        proc = _run_child(code)
    except subprocess.TimeoutExpired as e:
        started = [ln for ln in (e.stdout or b"").decode(errors="replace").splitlines() if ln.startswith("START")]
        pytest.fail(f"the child hung (> {TIMEOUT_S} s); last case started: {started[-1:] or 'none'}")
    lines = proc.stdout.splitlines()
    results = {}
    last_started = None
    for ln in lines:
        if ln.startswith("START "):
            last_started = ln[6:]
        elif ln.startswith("RESULT "):
            r = json.loads(ln[7:])
            results[r["id"]] = r["problem"]
    assert proc.returncode == 0 and lines and lines[-1] == "DONE", (
        f"the child process died ({_describe_exit(proc.returncode)}) while running case {last_started!r}\n"
        f"stderr tail:\n{proc.stderr[-3000:]}")
    return results


def _param(case):
    marks = ()
    if case.id in KNOWN_DEFECTS:
        marks = pytest.mark.xfail(strict=True, reason=KNOWN_DEFECTS[case.id])
    return pytest.param(case.id, id=case.id, marks=marks)


@pytest.mark.parametrize("case_id", [_param(c) for c in all_cases()])
def test_bad_input_in_child_process(child_results, case_id):
    assert case_id in child_results, f"{case_id} was never reported by the child"
    assert not child_results[case_id], f"{case_id}: {child_results[case_id]}"


def test_child_process_harness_reports_a_crash():
    """The harness itself: a child that aborts is reported as killed by a signal."""
    proc = _run_child("import os; os.abort()", timeout=60)
    assert proc.returncode < 0 and "SIGABRT" in _describe_exit(proc.returncode)


def test_backward_of_bad_grad_shape_in_child_process():
    """Autograd through the ops with a wrongly shaped upstream gradient: a clean error, no crash."""
    code = """
import torch, vitfast
from vitfast.ops.attention import attention
from vitfast.ops.patch_embed import patch_embed
q = torch.randn(1, 2, 5, 16, requires_grad=True)
out = attention(q, q, q, backend="triton")
try:
    out.backward(torch.randn(1, 2, 4, 16))
except RuntimeError as e:
    assert "shape" in str(e), e
else:
    raise SystemExit("no error")
w = torch.randn(6, 3, 4, 4, requires_grad=True)
t = patch_embed(torch.randn(2, 3, 8, 8), w, torch.zeros(6), pos_embed=torch.zeros(1, 4, 6))
try:
    t.backward(torch.randn(2, 3, 6))
except RuntimeError as e:
    assert "shape" in str(e), e
else:
    raise SystemExit("no error")
print("OK")
"""
    proc = _run_child(code, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), (
        f"{_describe_exit(proc.returncode)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
