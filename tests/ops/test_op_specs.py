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
from _spec_checks import check_sample
from vitfast.ops.spec import SPECS, OpSpec

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


@pytest.mark.parametrize("name,dtype,index", list(_cases()))
def test_kernel_within_2x_of_pytorch_against_float64(name, dtype, index):
    spec = SPECS[name]
    if not _kernel_runs_here(spec):
        pytest.skip(f"{name}'s kernel does not run on {DEV}")
    check_sample(spec, spec.sample_inputs(DEV, dtype)[index], dtype, DEV)


def _strided_vector(x):
    """A parameter vector ([C], or [1, 1, C] like a class token) as a view with element stride 2
    (every other element of a larger tensor): shape checks pass it, a kernel indexing it as a
    dense vector reads the wrong values. Other arguments are returned as they are."""
    if not (isinstance(x, torch.Tensor) and x.is_floating_point() and 1 <= x.dim() <= 3 and x.numel() > 1
            and x.numel() == x.shape[-1]):  # (not a [1, 1, 1, D] attention input)
        return x
    big = x.new_zeros(*x.shape[:-1], 2 * x.shape[-1])
    big[..., ::2] = x
    return big[..., ::2]


@pytest.mark.parametrize("name", list(SPECS))
def test_parameter_vectors_given_as_strided_views(name):
    """Every op's first sample with its bias/gamma/weight/class-token/mean/std vectors passed as
    strided views: the same 2x rule (the fused ops and the fused patch embedding once read them as
    dense, with errors of 3-10)."""
    spec = SPECS[name]
    if not _kernel_runs_here(spec):
        pytest.skip(f"{name}'s kernel does not run on {DEV}")
    sample = spec.sample_inputs(DEV, torch.float32)[0]
    strided = sample._replace(args=tuple(_strided_vector(a) for a in sample.args),
                              kwargs={k: _strided_vector(v) for k, v in sample.kwargs.items()})
    if all(a is b for a, b in zip(strided.args + tuple(strided.kwargs.values()),
                                  sample.args + tuple(sample.kwargs.values()))):
        pytest.skip(f"{name}'s sample has no parameter vector")
    check_sample(spec, strided, torch.float32, DEV)


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


@pytest.mark.parametrize("name", list(SPECS))
def test_gradcheck_in_float64_where_the_kernel_takes_it(name):
    """torch.autograd.gradcheck of the kernel path in float64 on the op's smallest sample: the
    registered backward against finite differences (kernels without a float64 path say so in
    their reasons and are skipped)."""
    spec = SPECS[name]
    if not _kernel_runs_here(spec):
        pytest.skip(f"{name}'s kernel does not run on {DEV}")
    sample = spec.sample_inputs(DEV, torch.float64)[0]
    reasons = spec.not_supported_reasons(*sample.args, **sample.kwargs)
    if reasons:
        pytest.skip(f"{name}'s kernel takes no float64 input: {reasons}")
    args = [a.detach().requires_grad_() if i in sample.grad else a for i, a in enumerate(sample.args)]

    def fn(*leaves):
        full = list(args)
        for i, t in zip(sample.grad, leaves):
            full[i] = t
        return spec.fn(*full, **sample.kwargs, backend=spec.kernel_backend)

    assert torch.autograd.gradcheck(fn, tuple(args[i] for i in sample.grad), eps=1e-6, atol=1e-5, rtol=1e-4)
