"""Every known bad input raises ValueError/TypeError naming the argument, in-process.

The same list runs in a child process in tests/property/test_bad_inputs_subprocess.py (signals and
hangs). Hypothesis drives the shape-dependent invalid inputs in the per-op property files;
this file pins the catalogue of argument errors, one case each.
"""

from __future__ import annotations

import pytest

from _bad_cases import KNOWN_DEFECTS, all_cases, check

CASES = all_cases()


def _param(case):
    marks = ()
    if case.id in KNOWN_DEFECTS:
        marks = pytest.mark.xfail(strict=True, reason=KNOWN_DEFECTS[case.id])
    return pytest.param(case, id=case.id, marks=marks)


def test_catalogue_is_consistent():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    assert set(KNOWN_DEFECTS) <= set(ids), f"defects without a case: {set(KNOWN_DEFECTS) - set(ids)}"


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_bad_input_raises_clear_error(case):
    problem = check(case)
    assert not problem, f"{case.id}: {problem}"
