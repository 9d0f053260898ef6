"""benchmarks/gpu_check.sh without a GPU: its control flow with a stub interpreter (which steps run,
which are left for a second call and the command printed for it), the parallel test step
(benchmarks/gpu_test_shards.py) on a small generated suite, and the results summary
(benchmarks/gpu_summary.py) on synthetic JSON."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STEPS = ["build", "info", "tests", "candidates", "tune", "bench", "kernels", "profile", "ncu"]

needs_shell = pytest.mark.skipif(not (shutil.which("bash") and shutil.which("timeout")),
                                 reason="needs bash and coreutils' timeout")

STUB = """#!/usr/bin/env bash
echo "$*" >> "$STUB_CALLS"
case "$*" in
  *"cli bench --no-progress"*) sleep "${STUB_BENCH_S:-0}" ;;
esac
exit 0
"""


def gpu_check(tmp_path: Path, **env: str) -> tuple:
    """Run the script with a stub PYTHON that records its arguments and returns at once; returns
    (stdout, the stub's calls)."""
    stub = tmp_path / "python"
    stub.write_text(STUB)
    stub.chmod(0o755)
    calls = tmp_path / "calls"
    calls.write_text("")
    base = {k: v for k, v in os.environ.items()
            if not re.match(r"(ONLY|DEADLINE|SKIP_.*|T_.*|MIN_.*|SHARDS|TESTS_FIRST|TEST_LOGS|TUNE_CACHE|OUT)$", k)}
    base.update(PYTHON=str(stub), STUB_CALLS=str(calls), OUT=str(tmp_path / "out"),
                TUNE_CACHE=str(tmp_path / "tune" / "cache.json"), TEST_LOGS=str(tmp_path / "logs"))
    base.update(env)
    res = subprocess.run(["bash", str(SCRIPT)], env=base, capture_output=True, text=True, timeout=120)
    assert (tmp_path / "out" / "log").read_text() == res.stdout  # everything is in the log too
    return res.stdout, calls.read_text().splitlines()


def table(out: str) -> dict:
    rows = out[out.index("\nstep "):].splitlines()[2:]
    cells = [r.split() for r in rows]
    return {c[0]: c[1] for c in cells if len(c) > 1 and c[1] in ("ok", "SKIPPED", "TIMEOUT", "FAILED")}


def second_call(out: str) -> str:
    m = re.search(r"^  ONLY=(\S+) bash benchmarks/gpu_check.sh$", out, re.M)
    return m[1] if m else ""


@needs_shell
def test_everything_runs_in_order_when_there_is_time(tmp_path):
    out, calls = gpu_check(tmp_path)
    t = table(out)
    ran = ["build", "info", "tests", "candidates", "tune-inf", "tune-trn", "bench", "kernels", "profile"]
    assert list(t) == ran + (["ncu"] if "ncu" in t else [])
    assert all(v == "ok" for k, v in t.items() if k != "ncu")
    assert not second_call(out) and "NOT RUN" not in out
    tests = next(c for c in calls if "gpu_test_shards.py" in c)
    assert "--shards 12" in tests and tests.endswith("-m cuda -q -rfE --durations=10 -p no:cacheprovider tests")
    assert "VITFAST_ATTENTION_AUTOTUNE=0" in out and "VITFAST_TEST_FIRST=tests/ops/test_attention.py,tests/ops" in out
    assert calls[-1] == f"benchmarks/gpu_summary.py {tmp_path / 'out'}"  # the summary is printed last


@needs_shell
def test_without_time_for_both_tune_and_bench_wait_for_the_second_call(tmp_path):
    out, calls = gpu_check(tmp_path, DEADLINE="100")  # MIN_BENCH 110 + 2 x T_TUNE 40; MIN_KERNELS 150
    t = table(out)
    assert t["candidates"] == "ok" and t["tune"] == t["bench"] == t["kernels"] == "SKIPPED" and t["profile"] == "ok"
    assert not any("cli tune" in c or "cli bench" in c for c in calls)
    assert second_call(out) == "build,tune,bench,kernels"
    assert "AT ONCE" in out and "still-warm" in out


@needs_shell
def test_a_bench_cut_by_the_deadline_is_rerun_with_its_tune(tmp_path):
    # tune runs (1 s each is enough here), the bench then gets what is left, times out and is listed
    # again, with tune: a fresh machine would not have this call's tune cache. DEADLINE leaves the
    # stub steps before tune many seconds (bash counts whole seconds: DEADLINE=3 failed on a busy host)
    mins = {f"MIN_{s.upper()}": "1" for s in STEPS}
    out, calls = gpu_check(tmp_path, DEADLINE="15", T_TUNE="1", STUB_BENCH_S="120", **mins)
    t = table(out)
    assert t["tune-inf"] == t["tune-trn"] == "ok" and t["bench"] == "TIMEOUT" and "cut by DEADLINE=15s" in out
    assert t["kernels"] == t["profile"] == "SKIPPED"
    assert second_call(out) == "build,tune,bench,kernels,profile"


@needs_shell
def test_only_and_skip_choose_the_steps(tmp_path):
    out, calls = gpu_check(tmp_path, ONLY="build,tune,bench", SKIP_TUNE="1")
    assert list(table(out)) == ["build", "bench"] and not second_call(out)
    assert not any("cli tune" in c for c in calls)


# ---- benchmarks/gpu_test_shards.py

CONFTEST = """
import _sharding


def pytest_configure(config):
    config.pluginmanager.register(_sharding, "vitfast_sharding")
"""

SUITE = """
import os, time
import pytest


def record(name):
    with open(os.path.join(os.environ["RAN"], name), "w") as f:
        f.write(os.environ["VITFAST_TEST_SHARD"])


@pytest.mark.parametrize("i", range(9))
def test_many(i):
    record(f"many{i}")
    if os.environ.get("SLEEP"):
        time.sleep(float(os.environ["SLEEP"]))


def test_fails():
    record("fails")
    assert os.environ.get("FAIL") is None, "told to fail"
"""


def shards(tmp_path: Path, *cmd_prefix: str, **env: str) -> subprocess.CompletedProcess:
    suite = tmp_path / "suite"
    suite.mkdir(exist_ok=True)
    (suite / "conftest.py").write_text(CONFTEST)
    (suite / "test_suite.py").write_text(SUITE)
    (tmp_path / "ran").mkdir(exist_ok=True)
    full = dict(os.environ, RAN=str(tmp_path / "ran"), PYTEST_DISABLE_PLUGIN_AUTOLOAD="1",
                PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]), **env)
    full.pop("VITFAST_TEST_SHARD", None)
    cmd = [*cmd_prefix, sys.executable, str(ROOT / "benchmarks" / "gpu_test_shards.py"), "--shards", "3",
           "--logs", str(tmp_path / "logs"), "--", "-q", "-rfE", "-p", "no:cacheprovider", str(suite)]
    return subprocess.run(cmd, cwd=tmp_path, env=full, capture_output=True, text=True, timeout=120)


def test_shards_run_every_test_once_and_report_each(tmp_path):
    res = shards(tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    ran = {p.name: p.read_text() for p in (tmp_path / "ran").iterdir()}
    assert set(ran) == {f"many{i}" for i in range(9)} | {"fails"}  # each test once (a file per test)
    assert sorted(ran.values()) == sorted(["0/3"] * 4 + ["1/3"] * 3 + ["2/3"] * 3)
    for i in range(3):
        assert f"----- shard {i}/3 (exit 0; " in res.stdout
        assert re.search(rf"shard {i}/3: exit 0  {3 + (i == 0)} passed", res.stdout)
        assert (tmp_path / "logs" / f"shard-{i}.log").is_file()


def test_a_failing_shard_fails_the_step_with_its_failures_printed(tmp_path):
    res = shards(tmp_path, FAIL="1")
    assert res.returncode == 1
    assert "FAILED" in res.stdout and "told to fail" in res.stdout and "1 failed, 3 passed" in res.stdout
    assert res.stdout.count("exit 0  3 passed") == 2


@pytest.mark.skipif(not shutil.which("timeout"), reason="needs coreutils' timeout")
def test_the_step_limit_interrupts_every_shard_and_their_summaries_still_print(tmp_path):
    # as gpu_check.sh runs it: `timeout -s INT` signals the launcher, which passes SIGINT on once
    res = shards(tmp_path, "timeout", "-s", "INT", "--kill-after=20", "4", SLEEP="60")
    assert res.returncode == 124, res.stdout + res.stderr  # timeout's own status: stopped at the limit
    assert "SIGINT: SIGINT to every shard still running" in res.stdout
    assert res.stdout.count("KeyboardInterrupt !!!") == 3
    assert len(re.findall(r"shard \d/3: exit \d+  .*no tests ran|shard \d/3: exit \d+  \d+ ", res.stdout)) == 3


# ---- benchmarks/gpu_summary.py

def load_summary():
    spec = importlib.util.spec_from_file_location("gpu_summary", ROOT / "benchmarks" / "gpu_summary.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_summary_shows_every_candidate_kind_the_script_writes(tmp_path, capsys):
    from vitfast.cli.kernels.attention_candidates import KINDS

    shape = dict(B=2, H=3, N=197, D=64, dtype="bfloat16")
    rows = [dict(shape, op="attention_candidate", kernel=k, status="ok", ms=0.1 + j / 100, err=1e-3, sdpa_err=1e-3,
                 config=f"cfg{j}") for j, k in enumerate(KINDS)]
    rows += [dict(shape, op="attention", backend="vitfast", mode="fwd", vs_best_sdpa=1.1, best_sdpa="cudnn"),
             dict(shape, op="attention_bwd_variant", bwd="tma_atomic", auto=True, ms=0.5, x_best=1.0),
             dict(shape, op="attention_fwd_variant", fwd="tma", auto=False, ms=0.2, x_best=1.2)]
    (tmp_path / "x_attention_candidates.json").write_text(json.dumps(dict(precompile="precompiled 9", rows=rows)))
    (tmp_path / "x_kernels.json").write_text(json.dumps(dict(benchmarks={"fused": "ok"}, rows=[
        dict(benchmark="fused", backend="vitfast", dtype="bf16", mode="fwd", ms=0.5, gbps=900.0)])))
    assert load_summary().main(str(tmp_path)) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("  2 3 197 64 bfloat16: "))
    shown = re.findall(r"(?:^|; )(\w+) best", line.split(": ", 1)[1])
    assert shown == list(KINDS)  # every kind, bwd_tma and bwd_tma_atomic included, in the script's order
    assert "autotuned vs best SDPA: fwd 1.10x cudnn" in line
    assert "tma_atomic (auto) 0.500 ms x1.0" in out and "tma 0.200 ms x1.2" in out
    assert "fused bf16 fwd  ms=0.5 gbps=900.0" in out
