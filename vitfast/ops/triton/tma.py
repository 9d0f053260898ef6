"""What every kernel that loads tiles by TMA through device-side tensor descriptors
(``tl.make_tensor_descriptor``) needs from the host: the Triton features, triton's allocator for
the descriptors' global scratch, and the checks of what TMA asks of a tensor and of the GPU.
Shared by :mod:`.attention_tma` (the attention forwards) and :mod:`.patch_embed` (its weight tiles).
"""

from __future__ import annotations

import functools
import inspect

import torch
import triton
import triton.language as tl


@functools.lru_cache(maxsize=None)
def triton_features() -> dict:
    """What the installed Triton offers the Hopper kernels (feature tests, not version numbers)."""
    ws = "warp_specialize" in inspect.signature(tl.range.__init__).parameters
    return dict(make_tensor_descriptor=hasattr(tl, "make_tensor_descriptor"),
                set_allocator=hasattr(triton, "set_allocator"), warp_specialize=ws)


def missing_features() -> list[str]:
    """The Triton features the TMA kernels need and this Triton lacks (empty: all present)."""
    f = triton_features()
    return [f"this Triton ({triton.__version__}) has no {name}" for name in
            ("make_tensor_descriptor", "set_allocator") if not f[name]]


def _torch_alloc(size: int, alignment: int, stream):
    """Device-side descriptors' global scratch: a torch allocation on the current stream, so
    CUDA-graph capture and the caching allocator see it."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_allocator() -> None:
    """Set triton's allocator to :func:`_torch_alloc` where none is set. Triton keeps it in a
    ContextVar: a thread (or context) that never set one has the null allocator, and a launch of a
    kernel with device-side descriptors there raises. So this looks every launch (one ContextVar
    read) and sets it lazily in each context; an allocator the user set is left alone."""
    try:
        from triton.runtime import _allocation

        if not isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
            return
    except (ImportError, AttributeError):  # another layout of triton's internals: set it every time
        pass
    triton.set_allocator(_torch_alloc)


def traced(t: torch.Tensor) -> bool:
    """True while torch.compile (Dynamo, AOTAutograd or Inductor) traces the op holding ``t``.
    ``torch.compiler.is_compiling()`` alone does not say so everywhere: the body of a
    ``triton_op`` traced under AOTAutograd's FunctionalTensorMode may see it False (whether it
    does depends on the torch version); its tensors are fake then, which is what this looks at."""
    from torch._subclasses.fake_tensor import is_fake

    return torch.compiler.is_compiling() or is_fake(t)


def base_aligned16(t: torch.Tensor) -> bool:
    """t's first element on a 16-byte boundary. A tensor without storage (a FakeTensor while
    torch.compile traces the op) says it by its offset into a storage the allocator aligned."""
    from torch._subclasses.fake_tensor import is_fake

    if is_fake(t) or t.device.type == "meta":
        return t.storage_offset() * t.element_size() % 16 == 0
    return t.data_ptr() % 16 == 0


def device_reasons(device: torch.device, interpreted: bool, name: str) -> list[str]:
    """Why TMA cannot run on ``device`` (``name``'s): not a CUDA GPU, or one older than sm_90.
    Under the interpreter (which emulates descriptors on the CPU) none."""
    if interpreted:
        return []
    if device.type != "cuda":
        return [f"{name} is on {device}; the TMA kernels need a CUDA GPU"]
    major, minor = torch.cuda.get_device_capability(device)
    return [] if major >= 9 else [f"the GPU is sm_{major}{minor}; TMA needs sm_90 or newer"]
