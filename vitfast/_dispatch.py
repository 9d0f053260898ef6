"""Kernel dispatch shared by every vitfast op and module.

One vocabulary everywhere (ops, modules, FastViT, ``patch_timm``): ``backend="kernel"``
forces vitfast's kernel, ``"reference"`` runs plain PyTorch (SDPA for attention, the eager
chain for the fused ops and the patch embedding), ``"auto"`` runs the kernel where it can.
Each kernel states why it cannot serve an input (``not_supported_reasons``): ``auto`` then
falls back to the reference path with a one-time warning listing the reasons, and a forced
``kernel`` raises :class:`KernelNotSupported` with every reason instead. The names from
before 0.2 (``"triton"``, ``"kernels"``, ``"sdpa"``) keep working (:data:`BACKEND_ALIASES`).
"""

from __future__ import annotations

import threading
import warnings
from typing import Iterable, Sequence

__all__ = ["BACKENDS", "BACKEND_ALIASES", "canonical_backend", "KernelNotSupported", "warn_fallback_once", "resolve_backend", "reset_warnings", "module_uses_kernel",
           "auto_is_reference", "raise_first", "shape_of", "triton_op_registrar", "on_tensors_device", "interpreter_lock",
           "serialize_interpreted", "record_triton_kernels"]


BACKENDS = ("auto", "kernel", "reference")
BACKEND_ALIASES = {"triton": "kernel", "kernels": "kernel", "sdpa": "reference"}  # the names before 0.2


def canonical_backend(op: str, backend) -> str:
    """``backend`` in the one vocabulary (:data:`BACKENDS`), older names mapped; ValueError
    naming ``backend`` otherwise."""
    b = BACKEND_ALIASES.get(backend, backend) if isinstance(backend, str) else backend
    if b not in BACKENDS:
        raise ValueError(f"vitfast.{op}: backend must be one of {list(BACKENDS)} (older names: "
                         f"{', '.join(sorted(BACKEND_ALIASES))}), got {backend!r}")
    return b


class KernelNotSupported(ValueError):
    """A kernel was forced for an input it cannot serve."""

    def __init__(self, op: str, backend: str, reasons: Sequence[str]):
        self.op, self.backend, self.reasons = op, backend, list(reasons)
        lines = "\n".join(f"  - {r}" for r in self.reasons)
        super().__init__(f"vitfast.{op}: backend={backend!r} cannot serve these inputs:\n{lines}")


_warned: set[tuple[str, tuple[str, ...]]] = set()
_lock = threading.Lock()


def warn_fallback_once(op: str, reasons: Iterable[str], fallback: str = "reference") -> None:
    """Warn once per (op, reasons) that ``op`` fell back to ``fallback``."""
    key = (op, tuple(reasons))
    with _lock:
        if key in _warned:
            return
        _warned.add(key)
    lines = "; ".join(key[1])
    warnings.warn(
        f"vitfast.{op}: falling back to the {fallback} path because: {lines}",
        RuntimeWarning,
        stacklevel=3,
    )


def reset_warnings() -> None:
    """Forget which fallbacks were warned about (for tests)."""
    with _lock:
        _warned.clear()


def resolve_backend(op: str, backend, reasons: Sequence[str]) -> str:
    """``"kernel"`` or ``"reference"``: what runs for ``backend`` (any name of the vocabulary)
    given ``reasons``, why the kernel cannot serve this input (empty when it can)."""
    b = canonical_backend(op, backend)
    if b == "reference":
        return b
    if reasons:
        if b == "kernel":
            raise KernelNotSupported(op, backend, reasons)
        import torch

        if not torch.compiler.is_compiling():  # (Dynamo cannot trace the warning's lock: fullgraph failed)
            warn_fallback_once(op, reasons)
        return "reference"
    return "kernel"


def auto_is_reference(device) -> bool:
    """``backend="auto"`` on a non-CUDA tensor is the plain-PyTorch path by definition (not a
    fallback: no warning). The Triton ops' rule; the C++ patch embedding also runs on the CPU."""
    return device.type != "cuda"


def raise_first(problems: Sequence[tuple[type, str]]) -> None:
    """Raise the first of ``(exception type, message)`` problems, naming the others too."""
    if problems:
        exc, msg = problems[0]
        raise exc(msg if len(problems) == 1 else msg + "; also: " + "; ".join(m for _, m in problems[1:]))


def shape_of(t) -> list[int]:
    """A tensor's shape as a plain list (for messages)."""
    return list(t.shape)


def triton_op_registrar(interpreted: bool):
    """``torch.library.triton_op`` on the GPU, so Inductor sees into the kernels; ``custom_op``
    under the interpreter, because ``wrap_triton`` cannot trace an interpreted kernel. Either way
    the op's body runs under :func:`on_tensors_device`."""
    import torch

    register = torch.library.custom_op if interpreted else torch.library.triton_op

    def registrar(name: str, **kwargs):
        decorate = register(name, **kwargs)
        return lambda fn: decorate(on_tensors_device(fn))

    return registrar


def on_tensors_device(fn):
    """``fn`` run with the current CUDA device set to its first CUDA tensor argument's.

    A Triton launch goes to the *current* device with the current device's stream, wherever its
    tensors live (C++ ops take a ``CUDAGuard`` for this): a model on ``cuda:1`` in a process whose
    current device is ``cuda:0`` would otherwise launch there on foreign pointers (an illegal
    memory access, or a wrong stream). Costs one ``current_device()`` call where the devices match.
    """
    import functools
    import inspect

    import torch

    @functools.wraps(fn)
    def run(*args, **kwargs):
        device = next((a.device for a in args if isinstance(a, torch.Tensor) and a.device.type == "cuda"), None)
        if device is None or device.index is None or device.index == torch.cuda.current_device():
            return fn(*args, **kwargs)
        with torch.cuda.device(device):
            return fn(*args, **kwargs)

    # the schema is inferred from the signature: with its annotations evaluated in fn's module
    # (under `from __future__ import annotations` they are strings, which the wrapper's module
    # could not resolve)
    run.__signature__ = inspect.signature(fn, eval_str=True)
    return run


# The Triton interpreter (TRITON_INTERPRET=1, the CPU path of the Triton kernels) is not
# thread-safe: while a kernel runs it patches triton.language's module globals, so two launches
# from two threads at once break each other ("Did you forget to add @triton.jit ?"). Every
# interpreted launch in vitfast holds this one lock (shared by all ops, since the state patched
# is global); compiled GPU launches take no lock.
interpreter_lock = threading.RLock()


class _SerializedLaunch:
    """``kernel[grid](*args)`` with :data:`interpreter_lock` held for the launch."""

    __slots__ = ("kernel",)

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            with interpreter_lock:
                return launch(*args, **kwargs)

        return run

    def __getattr__(self, name):
        return getattr(self.kernel, name)


_index_patched = False


def _patch_interpreter_index() -> None:
    """Triton <= 3.6's interpreter turns a scalar into a Python index with
    ``int(handle.data)``, but its scalars are 1-element arrays and NumPy >= 2.4 refuses
    ``int()`` of an array with ndim > 0, so every ``range(lo, hi)`` over a runtime bound fails
    ("only 0-dimensional arrays can be converted to Python scalars"). Later Triton squeezes
    first; do the same on the interpreter's per-launch patch of ``tl.tensor`` (once, and only
    when NumPy refuses the conversion)."""
    global _index_patched
    if _index_patched:
        return
    _index_patched = True
    import numpy as np

    try:
        int(np.zeros(1, dtype=np.int32))
        return  # NumPy < 2.4: the interpreter's own __index__ works
    except TypeError:
        pass
    try:
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover - no Triton
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:  # pragma: no cover - a Triton this shim does not know
        return

    def _index(self):
        return int(self.handle.data.squeeze())

    def _patch_lang_tensor(tensor, *args, **kwargs):
        out = original(tensor, *args, **kwargs)
        scope = args[0] if args else kwargs.get("scope")
        if hasattr(scope, "set_attr"):  # restored with the rest of the launch's patches
            scope.set_attr(tensor, "__index__", _index)
        else:  # pragma: no cover - older interpreters patch tl.tensor for good
            tensor.__index__ = _index
        return out

    interpreter._patch_lang_tensor = _patch_lang_tensor


def serialize_interpreted(kernel):
    """An interpreted Triton kernel whose launches hold :data:`interpreter_lock`."""
    _patch_interpreter_index()
    return _SerializedLaunch(kernel)


def record_triton_kernels(op: str, kernels: Sequence) -> None:
    """Tell torch which Triton kernels the ``torch.library.triton_op`` ``op`` launches.

    ``triton_op`` finds them by parsing the op function's source for
    ``wrap_triton(<kernel>)`` calls (``torch._library.triton.get_inner_triton_kernels``);
    vitfast's ops launch through helpers in the kernel modules (``_k.launch_fwd(...)``),
    which that parser does not follow, so it finds none. torch's AOTAutograd cache keys a
    compiled graph on those kernels' source (``get_triton_kernels_for_op``): without them
    an edited or upgraded kernel could be served from a stale cache entry. Best effort:
    a no-op on a torch without that table.
    """
    try:
        from torch._library import triton as library_triton
    except ImportError:  # pragma: no cover
        return
    table = getattr(library_triton, "triton_ops_to_kernels", None)
    if not isinstance(table, dict):
        return
    known = table.setdefault(op, [])
    for kernel in kernels:
        if all(kernel is not k for k in known):
            known.append(kernel)


def module_uses_kernel(op: str, backend: str, reasons: Sequence[str]) -> bool:
    """The model-level choice (FastViT's ``backend``, the caller having handled ``reference``):
    True when the kernels can serve the input; otherwise ``kernel`` raises with every reason and
    ``auto`` warns once (not while torch.compile traces) and returns False."""
    if not reasons:
        return True
    if BACKEND_ALIASES.get(backend, backend) == "kernel":
        raise KernelNotSupported(op, backend, reasons)
    import torch

    if not torch.compiler.is_compiling():
        warn_fallback_once(op, reasons)
    return False
