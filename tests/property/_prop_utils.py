"""Helpers for the property suites: value generation with special values and the 2x rule
extended to non-finite results.

The rule (flash-attention's): against a float64 reference computed from the *same* low
precision inputs, the kernel's error is at most 2x the error PyTorch itself makes in that
dtype, plus a floor of a rounding step or two. Non-finite values must propagate exactly as
the reference's: the NaN masks and the +-Inf masks must be equal, and where the reference
is finite the kernel must be finite too (no overflow), before the finite parts are
compared.
"""

from __future__ import annotations

from typing import Optional

import torch
from hypothesis import settings

DEV = "cpu"
CPU_DTYPES = (torch.float32, torch.float16)  # the Triton interpreter has no bf16
# Floor relative to max(unit, |ref|max): ~2 rounding steps of the output dtype.
ATOL = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-12}
# Value kinds every suite draws from: the magnitude of the inputs and special values.
VALUE_KINDS = ("normal", "huge", "tiny", "nan", "inf", "neg_inf")
SCALE = {"normal": 1.0, "huge": 1e4, "tiny": 1e-4}

# Deterministic in CI (derandomize), no per-example deadline (the interpreter is slow).
FAST = settings(max_examples=40, deadline=None, derandomize=True, print_blob=True)
SLOW = settings(max_examples=15, deadline=None, derandomize=True, print_blob=True)


def randn(shape, dtype, seed: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype)


def poison(t: torch.Tensor, kind: str, seed: int) -> torch.Tensor:
    """Put one NaN / +Inf / -Inf at a seeded position of ``t`` (a copy); other kinds: ``t``."""
    if kind not in ("nan", "inf", "neg_inf") or t.numel() == 0:
        return t
    value = {"nan": float("nan"), "inf": float("inf"), "neg_inf": float("-inf")}[kind]
    t = t.clone()
    flat = t.view(-1) if t.is_contiguous() else None
    idx = int(torch.randint(t.numel(), (1,), generator=torch.Generator().manual_seed(seed)))
    if flat is not None:
        flat[idx] = value
    else:
        t[tuple(torch.tensor(torch.unravel_index(torch.tensor(idx), t.shape)).tolist())] = value
    return t


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref.double()).abs().max().item() if ref.numel() else 0.0


def assert_matches(name: str, got: torch.Tensor, torch_same: Optional[torch.Tensor], ref: torch.Tensor,
                   dtype: torch.dtype, unit: float = 1.0, atol: Optional[float] = None) -> None:
    """``got`` (kernel, low precision) against ``ref`` (float64) with the 2x rule over
    ``torch_same`` (PyTorch in the same dtype; None: floor only), NaN/Inf propagating as
    in ``ref``. ``unit`` is the magnitude the inputs were scaled to (floor = atol x
    max(unit, |ref|max) over the finite part)."""
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)}, reference {tuple(ref.shape)}"
    # The exact answer rounded to the output dtype: overflowing to +-Inf there is correct.
    g, r = got.double(), ref.to(got.dtype).double()
    nan_g, nan_r = g.isnan(), r.isnan()
    assert torch.equal(nan_g, nan_r), (
        f"{name}: NaN at {int(nan_g.sum())} positions, the reference at {int(nan_r.sum())} "
        f"(first mismatch {torch.nonzero(nan_g != nan_r)[:1].tolist()})")
    for sign, label in ((1, "+Inf"), (-1, "-Inf")):
        inf_g, inf_r = g == sign * float("inf"), r == sign * float("inf")
        assert torch.equal(inf_g, inf_r), (
            f"{name}: {label} at {int(inf_g.sum())} positions, the reference at {int(inf_r.sum())} "
            "(an overflow, or a non-finite value lost)")
    finite = r.isfinite()
    g, r = g[finite], ref.double()[finite]
    e_kernel = max_err(g, r)
    e_torch = 0.0
    if torch_same is not None:
        t = torch_same.double()[finite]
        e_torch = max_err(t, r) if t.isfinite().all() else float("inf")
    floor = (ATOL[dtype] if atol is None else atol) * max(unit, r.abs().max().item() if r.numel() else 0.0)
    assert e_kernel <= 2 * e_torch + floor, (
        f"{name}: error {e_kernel:.3g} > 2 x PyTorch's own {e_torch:.3g} + floor {floor:.3g} ({dtype})")


def assert_names_argument(exc: BaseException, *names: str) -> None:
    """The message names at least one of ``names`` (the offending argument)."""
    msg = str(exc)
    assert any(n in msg for n in names), f"message does not name any of {names}: {msg!r}"
    assert "vitfast" in msg, f"message does not say it comes from vitfast: {msg!r}"
