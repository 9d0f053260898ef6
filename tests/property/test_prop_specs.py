"""Every declared op (``vitfast.ops.spec.SPECS``) under generated conditions: any of its sample
inputs, in fp32 or fp16, with its floating inputs scaled by 1e-3 .. 10 (fp16 keeps its range), through the kernel
against the float64 reference by the 2x rule (outputs and gradients). The per-op property
suites go further (layouts, zero sizes, NaN/Inf); this one covers every op, new ones included."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _prop_utils import CPU_DTYPES, FAST
from _spec_checks import check_sample
from vitfast.ops.spec import SPECS, Sample

import vitfast  # noqa: F401  (declares the ops)


def _scaled(sample: Sample, scale: float) -> Sample:
    def s(x):
        return x * scale if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    return Sample(sample.name, tuple(s(a) for a in sample.args), {k: s(v) for k, v in sample.kwargs.items()},
                  sample.grad)


@settings(FAST, max_examples=30)
@given(name=st.sampled_from(sorted(SPECS)), index=st.integers(0, 5), dtype=st.sampled_from(CPU_DTYPES),
       log_scale=st.sampled_from([-3, -1, 0, 1]))
def test_every_op_within_2x_of_pytorch_at_every_scale(name, index, dtype, log_scale):
    spec = SPECS[name]
    samples = spec.sample_inputs("cpu", torch.float32)
    sample = _scaled(samples[index % len(samples)], 10.0 ** log_scale)
    check_sample(spec, sample, dtype)
