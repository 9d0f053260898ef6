"""Helpers shared by the fused-epilogue op tests (test_layer_norm, test_bias_gelu,
test_bias_scale_residual): run a kernel, the eager chain in the same dtype and a float64 reference
on the same inputs and gradients, and apply flash-attention's rule: the kernel's error
against float64 is at most 2x eager PyTorch's own error in that dtype, plus a floor."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"
CPU_DTYPES = [torch.float32, torch.float16]  # the interpreter has no bf16
GPU_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# Floor on top of 2x eager's error, relative to the largest reference magnitude: the fused ops'
# declared tolerance (a couple of rounding steps of the dtype). Without it a case eager rounds
# exactly would demand a perfect kernel.
from vitfast.ops._fused_common import ATOL  # noqa: E402,F401


def randn(shape, dtype, seed: int, device=DEV, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift).to(device=device, dtype=dtype)


def err(x: Optional[torch.Tensor], ref: Optional[torch.Tensor]) -> float:
    if x is None or ref is None or not ref.numel():
        return 0.0
    return (x.double() - ref.double()).abs().max().item()


def assert_2x(name: str, got, eager, ref, dtype: torch.dtype) -> None:
    assert (got is None) == (ref is None), f"{name}: got {got is None and 'no' or 'a'} gradient, reference disagrees"
    if got is None:
        return
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert got.dtype == eager.dtype, f"{name}: dtype {got.dtype}, eager gives {eager.dtype}"
    e_kernel, e_eager = err(got, ref), err(eager, ref)
    floor = ATOL[dtype] * max(1.0, ref.abs().max().item() if ref.numel() else 0.0)
    assert e_kernel <= 2 * e_eager + floor, (
        f"{name}: kernel error {e_kernel:.3g} > 2 x eager error {e_eager:.3g} + {floor:.3g}")


def run(fn: Callable, inputs: Sequence[Optional[torch.Tensor]], douts: Optional[Sequence[torch.Tensor]],
        cast_to: Optional[torch.dtype] = None):
    """outputs and the gradients of every tensor input (None for None inputs). ``douts``
    (one per output, in float64) are cast to each output's dtype; with ``cast_to`` the
    inputs are cast first (float64 for the reference)."""
    leaves = [None if t is None else t.detach().to(cast_to or t.dtype).requires_grad_(douts is not None)
              for t in inputs]
    with torch.set_grad_enabled(douts is not None):
        outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    if douts is None:
        return [o.detach() for o in outs], []
    torch.autograd.backward(outs, [d.to(o.dtype) for d, o in zip(douts, outs)])
    return [o.detach() for o in outs], [None if t is None else t.grad for t in leaves]


def check(kernel: Callable, eager: Callable, names: Sequence[str], inputs: Sequence[Optional[torch.Tensor]],
          dtype: torch.dtype, out_names: Sequence[str], backward: bool = True, seed: int = 100) -> None:
    """The 2x rule on every output and on the gradient of every tensor input. ``eager``
    is the plain-PyTorch chain: run in the inputs' dtypes it measures PyTorch's own error,
    run on float64 copies it is the reference."""
    douts = None
    if backward:
        with torch.no_grad():
            shapes = [o.shape for o in run(eager, inputs, None)[0]]
        # rounded once to the low precision, so every path sees the same values
        douts = [randn(s, dtype, seed + i).double() for i, s in enumerate(shapes)]
    got, g_got = run(kernel, inputs, douts)
    ref, g_ref = run(eager, inputs, douts, cast_to=torch.float64)
    eag, g_eag = run(eager, inputs, douts)
    for n, a, b, c in zip(out_names, got, eag, ref):
        assert_2x(n, a, b, c, dtype)
    for n, a, b, c in zip(names, g_got, g_eag, g_ref):
        assert_2x("d" + n, a, b, c, dtype)
