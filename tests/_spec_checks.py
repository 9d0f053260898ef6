"""The 2x rule applied to an op's declared samples (tests/ops/test_op_specs.py and
tests/property/test_prop_specs.py)."""

from __future__ import annotations

import torch

from vitfast.ops.spec import OpSpec, Sample, randn


def _cast(x, dtype):
    return x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def run(fn, sample: Sample, dtype, douts, **kw):
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


def check_sample(spec: OpSpec, sample: Sample, dtype: torch.dtype, device: str = "cpu") -> None:
    """The op's kernel on ``sample`` (inputs cast to ``dtype``) against its reference in float64:
    outputs and the gradients of ``sample.grad`` within 2x PyTorch's own error in that dtype (the
    reference run in ``dtype``) plus the declared floor. The kernel must accept the sample."""
    assert spec.not_supported_reasons(*sample.args, **sample.kwargs) == [], "the kernel refuses a sample it serves"
    with torch.no_grad():
        out_shapes = [o.shape for o in run(spec.ref, sample, dtype, None)[0]]
    # rounded once to the low precision, so every path sees the same gradient values
    douts = [randn(s, dtype, 1000 + i, device).double() for i, s in enumerate(out_shapes)]
    got, g_got = run(spec.fn, sample, dtype, douts, backend=spec.kernel_backend)
    torch_, g_torch = run(spec.ref, sample, dtype, douts)
    ref, g_ref = run(spec.ref, Sample(sample.name, [_cast(a, dtype) for a in sample.args],
                                        {k: _cast(v, dtype) for k, v in sample.kwargs.items()}, sample.grad),
                      torch.float64, douts)
    names = [f"out{i}" for i in range(len(got))] + [f"d(arg {i})" for i in sample.grad]
    for n, a, b, c in zip(names, got + g_got, torch_ + g_torch, ref + g_ref):
        assert a.shape == c.shape and a.dtype == b.dtype, (n, a.shape, c.shape, a.dtype, b.dtype)
        floor = spec.atol[dtype] * max(1.0, c.abs().max().item() if c.numel() else 0.0)
        e_kernel, e_torch = _err(a, c), _err(b, c)
        assert e_kernel <= 2 * e_torch + floor, f"{n}: kernel error {e_kernel:.3g} > 2 x PyTorch's {e_torch:.3g} + {floor:.3g}"
