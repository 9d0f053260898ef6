"""Every op, from its declaration (``vitfast.ops.spec.SPECS``): each sample input through the
kernel against the float64 reference by flash-attention's 2x rule (outputs and gradients), the
kernel's reasons empty for inputs it serves, and torch.library.opcheck on every registered op
the kernel path calls. What is special about an op lives in its own test file."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

import vitfast  # noqa: F401  (declares the ops)
from vitfast.ops.spec import SPECS, OpSpec, Sample, randn

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
DTYPES = [torch.bfloat16, torch.float16, torch.float32] if CUDA else [torch.float32, torch.float16]  # no bf16 interpreted


def _kernel_runs_here(spec: OpSpec) -> bool:
    return DEV in spec.kernel_devices or spec.triton  # Triton kernels run interpreted on the CPU


def _cases():
    for name, spec in SPECS.items():
        for dtype in DTYPES:
            for i, sample in enumerate(spec.sample_inputs("cpu", torch.float32)):
                yield pytest.param(name, dtype, i, id=f"{name}-{str(dtype)[6:]}-{sample.name}")


def _cast(x, dtype):
    return x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def _run(fn, sample: Sample, dtype, douts, **kw):
    """Outputs and the gradients of ``sample.grad``'s arguments, inputs cast to ``dtype``."""
    args = [_cast(a, dtype) for a in sample.args]
    kwargs = {k: _cast(v, dtype) for k, v in sample.kwargs.items()}
    for i in sample.grad if douts is not None else ():
        args[i] = args[i].detach().requires_grad_()
    outs = fn(*args, **kwargs, **kw)
    outs = outs if isinstance(outs, tuple) else (outs,)
    if douts is None:
        return [o.detach() for o in outs], []
    leaves = [args[i] for i in sample.grad]
    grads = torch.autograd.grad(outs, leaves, [d.to(o.dtype) for d, o in zip(douts, outs)]) if leaves else ()
    return [o.detach() for o in outs], list(grads)


def _err(x, ref) -> float:
    return (x.double() - ref.double()).abs().max().item() if ref.numel() else 0.0


@pytest.mark.parametrize("name,dtype,index", list(_cases()))
def test_kernel_within_2x_of_pytorch_against_float64(name, dtype, index):
    spec = SPECS[name]
    if not _kernel_runs_here(spec):
        pytest.skip(f"{name}'s kernel does not run on {DEV}")
    sample = spec.sample_inputs(DEV, dtype)[index]
    assert spec.not_supported_reasons(*sample.args, **sample.kwargs) == [], "the kernel refuses a sample it serves"
    with torch.no_grad():
        out_shapes = [o.shape for o in _run(spec.ref, sample, dtype, None)[0]]
    # rounded once to the low precision, so every path sees the same gradient values
    douts = [randn(s, dtype, 1000 + i, DEV).double() for i, s in enumerate(out_shapes)]
    got, g_got = _run(spec.fn, sample, dtype, douts, backend=spec.kernel_backend)
    torch_, g_torch = _run(spec.ref, sample, dtype, douts)
    ref, g_ref = _run(spec.ref, Sample(sample.name, [_cast(a, dtype) for a in sample.args],
                                        {k: _cast(v, dtype) for k, v in sample.kwargs.items()}, sample.grad),
                      torch.float64, douts)
    names = [f"out{i}" for i in range(len(got))] + [f"d(arg {i})" for i in sample.grad]
    for n, a, b, c in zip(names, got + g_got, torch_ + g_torch, ref + g_ref):
        assert a.shape == c.shape and a.dtype == b.dtype, (n, a.shape, c.shape, a.dtype, b.dtype)
        floor = spec.atol[dtype] * max(1.0, c.abs().max().item() if c.numel() else 0.0)
        e_kernel, e_torch = _err(a, c), _err(b, c)
        assert e_kernel <= 2 * e_torch + floor, f"{n}: kernel error {e_kernel:.3g} > 2 x PyTorch's {e_torch:.3g} + {floor:.3g}"


class _OpRecorder(TorchDispatchMode):
    """The vitfast ops called, with their arguments (the first call of each)."""

    def __init__(self):
        super().__init__()
        self.calls = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "vitfast" and func not in self.calls:
            # called by autograd's backward (grad mode off): no graph through it, as in real use
            detach = (lambda t: t.detach() if isinstance(t, torch.Tensor) else t) if not torch.is_grad_enabled() \
                else (lambda t: t)
            self.calls[func] = (tree_map(detach, args), tree_map(detach, kwargs or {}))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", list(SPECS))
def test_opcheck_every_registered_op_the_kernel_path_calls(name):
    spec = SPECS[name]
    if not _kernel_runs_here(spec):
        pytest.skip(f"{name}'s kernel does not run on {DEV}")
    sample = spec.sample_inputs(DEV, torch.float32)[0]
    rec = _OpRecorder()
    with rec:
        args = [a.detach().requires_grad_() if i in sample.grad else a for i, a in enumerate(sample.args)]
        outs = spec.fn(*args, **sample.kwargs, backend=spec.kernel_backend)
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    assert rec.calls, f"{name}: the kernel path called no vitfast op"
    for op, (args, kwargs) in rec.calls.items():
        torch.library.opcheck(op, args, kwargs)
