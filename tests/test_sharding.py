"""tests/_sharding.py: VITFAST_TEST_SHARD=i/n splits the tests that would run (after -m) into n
disjoint round-robin parts that together are all of them; VITFAST_TEST_FIRST moves tests first.
Each case runs pytest in a subprocess on a small generated test file (collection only, no torch)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import _sharding

TESTS = Path(__file__).resolve().parent

SAMPLE = '''
import pytest

@pytest.mark.parametrize("i", range(7))
def test_a(i):
    pass

@pytest.mark.slow
@pytest.mark.parametrize("i", range(2))
def test_slow(i):
    pass

def test_b():
    pass

@pytest.mark.parametrize("i", range(4))
def test_c(i):
    pass
'''


CONFTEST = '''
import _sharding


def pytest_configure(config):
    config.pluginmanager.register(_sharding, "vitfast_sharding")
'''


@pytest.fixture
def sample(tmp_path):
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    slow: a marker to deselect by\n")
    (tmp_path / "conftest.py").write_text(CONFTEST)  # registered late, as tests/conftest.py does
    return tmp_path


def collect(where: Path, *args: str, shard: str = "", first: str = "") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in (_sharding.SHARD_ENV, _sharding.FIRST_ENV)}
    env.update(PYTHONPATH=os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]), PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    if shard:
        env[_sharding.SHARD_ENV] = shard
    if first:
        env[_sharding.FIRST_ENV] = first
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only",
                           "-q", *args, str(where)], cwd=where, env=env, capture_output=True, text=True, timeout=120)


def ids(res: subprocess.CompletedProcess) -> list:
    assert res.returncode in (0, 5), res.stdout + res.stderr  # 5: no test left to run
    return [ln for ln in res.stdout.splitlines() if "::" in ln]


def test_the_shards_partition_the_selected_tests_round_robin(sample):
    everything = ids(collect(sample, "-m", "not slow"))
    assert len(everything) == 12 and not any("test_slow" in t for t in everything)  # -m applied first
    shards = [collect(sample, "-m", "not slow", shard=f"{i}/3") for i in range(3)]
    parts = [ids(r) for r in shards]
    assert [p == everything[i::3] for i, p in enumerate(parts)] == [True] * 3  # round robin after -m, in order
    assert sorted(sum(parts, [])) == sorted(everything)  # union = all, and no test twice
    for r, p in zip(shards, parts):  # the rest reported as deselected, beside -m's
        assert f"{len(p)}/14 tests collected ({14 - len(p)} deselected)" in r.stdout
    assert ids(collect(sample, "-m", "not slow", shard="0/1")) == everything
    many = [ids(collect(sample, "-k", "test_b", shard=f"{i}/2")) for i in range(2)]
    assert sorted(len(p) for p in many) == [0, 1]  # more shards than tests: some run nothing


def test_first_moves_tests_ahead_stably_before_the_split(sample):
    order = ids(collect(sample, first="test_sample.py::test_c, test_sample.py::test_b"))
    names = [t.split("::")[1] for t in order]
    assert names == ([f"test_c[{i}]" for i in range(4)] + ["test_b"] + [f"test_a[{i}]" for i in range(7)]
                     + [f"test_slow[{i}]" for i in range(2)])
    first_c = ids(collect(sample, first="test_sample.py::test_c"))
    assert ids(collect(sample, shard="1/2", first="test_sample.py::test_c")) == first_c[1::2]


@pytest.mark.parametrize("value", ["4/4", "1", "a/b", "-1/2", "0/0", "1/2/3"])
def test_a_malformed_shard_is_a_usage_error(sample, value):
    res = collect(sample, shard=value)
    assert res.returncode == 4, res.stdout + res.stderr
    assert "expected 'i/n' with 0 <= i < n" in res.stdout + res.stderr
    with pytest.raises(pytest.UsageError, match=_sharding.SHARD_ENV):
        _sharding.parse_shard(value)


def test_parse_shard():
    assert _sharding.parse_shard("0/4") == (0, 4) and _sharding.parse_shard(" 3 / 4 ") == (3, 4)


def test_this_suite_registers_the_plugin(request):
    assert request.config.pluginmanager.get_plugin("vitfast_sharding") is _sharding
