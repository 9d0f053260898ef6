"""Test sharding and ordering by environment, for running the suite as parallel pytest processes
(benchmarks/gpu_check.sh runs the ``cuda`` tests as four; pytest-xdist is not on the GPU machine).

``VITFAST_TEST_FIRST="tests/ops/test_attention.py,tests/ops"``: the tests whose node id starts with
one of these prefixes run first, in the order of the prefixes (stable otherwise), so that a run
stopped at its time limit has run the ones that matter most.

``VITFAST_TEST_SHARD="i/n"`` (0 <= i < n): of the tests that would run (after ``-m``, ``-k`` and
``--deselect``, and after the ordering above), this process keeps those whose position modulo n
is i and reports the rest as deselected; round robin, so that the heavy parametrisations of one
test spread over the shards. The n shards together run every test exactly once.

A plugin (``tests/conftest.py`` registers it; ``-p _sharding`` with ``tests/`` on the path
elsewhere). Its hook runs last, after pytest's own deselection.
"""

from __future__ import annotations

import os
import re
from typing import List, Sequence, Tuple

import pytest

SHARD_ENV = "VITFAST_TEST_SHARD"
FIRST_ENV = "VITFAST_TEST_FIRST"


def parse_shard(value: str) -> Tuple[int, int]:
    """``"i/n"`` -> ``(i, n)``; a clear UsageError for anything else."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", value)
    if not m or int(m[2]) < 1 or int(m[1]) >= int(m[2]):
        raise pytest.UsageError(f"{SHARD_ENV}={value!r}: expected 'i/n' with 0 <= i < n, e.g. '0/4' for the first "
                                "of four shards")
    return int(m[1]), int(m[2])


def order_first(items: Sequence, prefixes: Sequence[str]) -> List:
    """``items`` with those whose node id starts with ``prefixes[0]`` first, then ``prefixes[1]``,
    ..., then the rest; stable within each group."""
    def rank(item) -> int:
        return next((k for k, p in enumerate(prefixes) if item.nodeid.startswith(p)), len(prefixes))

    return sorted(items, key=rank)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items) -> None:
    prefixes = [p.strip() for p in os.environ.get(FIRST_ENV, "").split(",") if p.strip()]
    if prefixes:
        items[:] = order_first(items, prefixes)
    value = os.environ.get(SHARD_ENV, "").strip()
    if not value:
        return
    i, n = parse_shard(value)
    dropped = [item for k, item in enumerate(items) if k % n != i]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = items[i::n]
