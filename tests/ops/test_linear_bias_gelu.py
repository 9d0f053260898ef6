"""vitfast.ops.bias_gelu.linear_bias_gelu: the whole fc1 (GEMM + bias + GELU), and the cuBLASLt
GELU_BIAS epilogue candidate it may take on CUDA.

The epilogue computes tanh GELU, so it may serve only tanh-GELU calls or a user who opted in,
only in inference, and only where the dispatch table measured it faster. The choice is checked on
the CPU with fake CUDA tensors (FakeTensorMode: the choice is Python on shapes and flags, the
fake ops only carry shapes) and a fake GPU name in the table; the numerics of the default path
under the Triton interpreter by the 2x rule; the epilogue's numerics on a GPU (``cuda`` mark).
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from _fused_testing import CPU_DTYPES, check, randn
from vitfast import dispatch
from vitfast.ops.bias_gelu import GELU_EPILOGUE_ENV, gelu_epilogue_reasons, linear_bias_gelu

DEV = "FAKE GPU sm_90"


def _ref(h, w, b, approximate="none"):
    return torch.nn.functional.gelu(torch.nn.functional.linear(h, w, b), approximate=approximate)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("lead,K,C", [((2, 5), 24, 40), ((7,), 16, 33)], ids=str)
def test_default_path_matches_reference(lead, K, C, approximate, dtype):
    h, w, b = randn((*lead, K), dtype, 0), randn((C, K), dtype, 1, scale=K ** -0.5), randn((C,), dtype, 2)
    check(lambda h, w, b: linear_bias_gelu(h, w, b, approximate, backend="kernel"),
          lambda h, w, b: _ref(h, w, b, approximate), ("h", "weight", "bias"), [h, w, b], dtype, ("out",))


def _cuda(*shape, dtype=torch.float16, grad=False):  # float16: the interpreter's kernels take it
    return torch.empty(*shape, device="cuda", dtype=dtype).requires_grad_(grad)


def test_reasons_say_why_the_epilogue_may_not_serve(monkeypatch):
    monkeypatch.delenv(GELU_EPILOGUE_ENV, raising=False)
    h, w, b = torch.randn(4, 8), torch.randn(16, 8), torch.randn(16)
    assert any("CUDA path" in r for r in gelu_epilogue_reasons(h, w, b, "tanh"))
    with FakeTensorMode():
        h, w, b = _cuda(4, 8), _cuda(16, 8), _cuda(16)
        assert gelu_epilogue_reasons(h, w, b, "tanh") == []
        exact = gelu_epilogue_reasons(h, w, b, "none")
        assert len(exact) == 1 and "tanh approximation" in exact[0] and GELU_EPILOGUE_ENV in exact[0]
        assert gelu_epilogue_reasons(h, w, b, "none", allow_tanh_epilogue=True) == []
        monkeypatch.setenv(GELU_EPILOGUE_ENV, "1")
        assert gelu_epilogue_reasons(h, w, b, "none") == []
        assert any("tanh" in r for r in gelu_epilogue_reasons(h, w, b, "none", allow_tanh_epilogue=False))
        monkeypatch.delenv(GELU_EPILOGUE_ENV)
        assert any("no bias" in r for r in gelu_epilogue_reasons(h, w, None, "tanh"))
        assert any("gradient" in r for r in gelu_epilogue_reasons(h, _cuda(16, 8, grad=True), b, "tanh"))
        with torch.no_grad():
            assert gelu_epilogue_reasons(h, _cuda(16, 8, grad=True), b, "tanh") == []
        assert any("dtype" in r for r in gelu_epilogue_reasons(_cuda(4, 8, dtype=torch.float64), w, b, "tanh"))


@pytest.fixture
def table(monkeypatch, tmp_path):
    """A user cache saying the epilogue ("torch") was faster for C=16, K=8; a fake GPU name."""
    monkeypatch.setenv("VITFAST_DISPATCH_CACHE", str(tmp_path / "dispatch.json"))
    monkeypatch.delenv("VITFAST_DISPATCH", raising=False)
    monkeypatch.delenv(GELU_EPILOGUE_ENV, raising=False)
    monkeypatch.setattr(dispatch, "device_key", lambda device: DEV)
    dispatch.reload()
    dispatch.write_cache([dict(op="linear_bias_gelu", device=DEV, dtype="float16", mode="infer",
                               shape={"C": 16, "K": 8, "rows": 4}, choice="torch")])
    yield
    monkeypatch.undo()
    dispatch.reload()


def _taken(approximate, **kw):
    """The aten ops linear_bias_gelu ran on fake CUDA tensors, and the dispatch choices it made."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Ops.seen.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    Ops.seen = []
    with FakeTensorMode(), dispatch.record() as choices, torch.no_grad():
        h, w, b = _cuda(2, 2, 8), _cuda(16, 8), _cuda(16)
        with Ops():
            out = linear_bias_gelu(h, w, b, approximate, **kw)
        assert out.shape == (2, 2, 16) and out.dtype == torch.float16
    return Ops.seen, choices


def test_tanh_gelu_takes_the_epilogue_where_the_table_says_so(table):
    ops, choices = _taken("tanh")
    assert "aten._addmm_activation" in ops
    assert choices == {("linear_bias_gelu", "torch", f"cache:{dispatch.cache_path()}"): 1}


def test_exact_gelu_never_takes_the_epilogue_silently(table, monkeypatch):
    ops, choices = _taken("none")  # the table says "torch", but the model's GELU is exact
    assert "aten._addmm_activation" not in ops
    assert not any(op == "linear_bias_gelu" for op, _, _ in choices)
    ops, _ = _taken("none", allow_tanh_epilogue=True)  # the user opted in
    assert "aten._addmm_activation" in ops
    monkeypatch.setenv(GELU_EPILOGUE_ENV, "1")
    assert "aten._addmm_activation" in _taken("none")[0]


def test_no_table_entry_keeps_gemm_plus_the_triton_epilogue(table, monkeypatch):
    monkeypatch.setattr(dispatch, "device_key", lambda device: "OTHER GPU sm_80")
    ops, choices = _taken("tanh")
    assert "aten._addmm_activation" not in ops
    assert choices.get(("linear_bias_gelu", "kernel", "default")) == 1


def test_forced_kernel_backend_never_takes_the_epilogue(table):
    ops, _ = _taken("tanh", backend="kernel")
    assert "aten._addmm_activation" not in ops


# ----------------------------------------------------------------------------- GPU
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_epilogue_numerics_against_tanh_gelu(dtype, table):
    from vitfast.ops.bias_gelu import _gelu_epilogue
    from _fused_testing import assert_2x

    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(4 * 197, 768, device="cuda", generator=g).to(dtype)
    w = (torch.randn(3072, 768, device="cuda", generator=g) * 768 ** -0.5).to(dtype)
    b = torch.randn(3072, device="cuda", generator=g).to(dtype)
    with torch.no_grad():
        got = _gelu_epilogue(h, w, b, dtype)
        eager = _ref(h, w, b, "tanh")
        ref = _ref(h.double(), w.double(), b.double(), "tanh")
    assert_2x("out", got, eager, ref, dtype)
