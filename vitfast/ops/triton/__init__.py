"""The Triton kernels behind the ops (one module per kernel family, as flash-attention's
``flash_attn/ops/triton/``): the ``@triton.jit`` functions, their tile configs and launchers.
The ops in :mod:`vitfast.ops` register, check and dispatch; these modules only launch.

What both families share: :func:`is_interpreted` (``TRITON_INTERPRET=1`` was set before the
kernels were defined), :func:`wrap` (a kernel as launched: ``wrap_triton`` for Inductor on
the GPU; under the interpreter, which is not thread-safe, with one global lock held) and
:func:`device_sms` (what the grids are sized by).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from ..._dispatch import serialize_interpreted


def is_interpreted(fn: Any) -> bool:
    return type(fn).__name__ == "InterpretedFunction"


def wrap(kernel, interpreted: bool):
    if interpreted:
        return serialize_interpreted(kernel)
    from torch.library import wrap_triton

    return wrap_triton(kernel)


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def device_sms(device: torch.device) -> int:
    """The streaming multiprocessors of a CUDA device (``cuda`` alone: the current one)."""
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())
