"""One declaration per op, read by everything that needs to know the ops.

Each op module ends with an :class:`OpSpec` (``declare(OpSpec(...))``): its public function,
its plain-PyTorch reference, why its kernel cannot serve an input, sample inputs (the awkward
shapes included), tolerances per dtype, the sm_90 compile cases and the bad inputs. Readers:

* ``vitfast info --check`` -- a forward + backward self-test of every op on every device;
* ``tests/ops/test_op_specs.py`` -- every sample against the float64 reference (the 2x rule),
  gradients, torch.library.opcheck on the registered ops, the fallback reasons;
* ``tests/property/_bad_cases.py`` -- every bad input, in-process and in a child process;
* ``tests/ops/_sm90_compile.py`` / ``make sm90-compile`` -- the Triton kernels for sm_90.

Adding an op: its kernel, its ``ops/<name>.py`` ending with a spec, one test file for what is
special about it (CONTRIBUTING.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import torch

__all__ = ["Sample", "BadInput", "OpSpec", "SPECS", "declare", "randn"]


class Sample(NamedTuple):
    """One call: ``fn(*args, **kwargs)`` and ``ref(*args, **kwargs)``. ``grad`` names the
    positions of ``args`` whose gradients are checked (floating tensors only)."""

    name: str
    args: tuple
    kwargs: dict
    grad: tuple = ()


class BadInput(NamedTuple):
    """``call()`` must raise one of ``exc`` with a message naming one of ``names`` (the
    offending argument), before any kernel runs."""

    id: str
    call: Callable[[], Any]
    exc: tuple
    names: tuple


@dataclass(frozen=True)
class OpSpec:
    name: str
    fn: Callable  # the public function; takes backend= (kernel_backend, "reference", "auto")
    ref: Callable  # plain PyTorch, same arguments but no backend; float64 inputs give the reference
    not_supported_reasons: Callable[..., list]  # (*sample.args, **sample.kwargs) -> why the kernel cannot serve
    kernel_backend: str  # the backend= name that forces the kernel ("triton" or "kernel")
    sample_inputs: Callable[[str, torch.dtype], Sequence[Sample]]  # (device, dtype) -> samples
    # the check floor on top of 2x PyTorch's own error, relative to max(1, |ref|max), and the
    # self-test tolerance (a smoke test: a broken build or kernel, not a last-bit change)
    atol: Mapping[torch.dtype, float]
    check_tol: Mapping[torch.dtype, float]
    kernel_devices: tuple = ("cuda",)  # where the kernel runs compiled (plus the Triton interpreter on the CPU)
    dtypes: tuple = (torch.float32, torch.float16, torch.bfloat16)
    sm90: tuple = ()  # tests/ops/_sm90_compile.py cases ("fused:bfloat16:768", "attention:bfloat16:80:257")
    bad_inputs: Callable[[], Sequence[BadInput]] = field(default=lambda: ())
    opcheck: Optional[Callable[[str, torch.dtype], Sequence[tuple]]] = None  # -> (op overload, args, kwargs)
    triton: bool = True  # its kernel is Triton (runs under the interpreter without a GPU)


SPECS: dict[str, OpSpec] = {}


def declare(spec: OpSpec) -> OpSpec:
    if spec.name in SPECS:
        raise ValueError(f"vitfast.ops.spec: {spec.name!r} is declared twice")
    SPECS[spec.name] = spec
    return spec


def randn(shape, dtype: torch.dtype, seed: int, device="cpu", scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    """Seeded normal values made in float64 on the CPU, then cast: the same values on every
    device and host."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift).to(device=device, dtype=dtype)
