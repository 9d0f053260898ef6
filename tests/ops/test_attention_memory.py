"""The attention never materialises an N x N buffer.

On the CPU the Triton kernels run under the interpreter: every allocation made through
torch's CPU allocator during the call is recorded with ``torch.profiler`` (profile_memory),
and every NumPy/Python allocation the interpreter makes for its tiles with ``tracemalloc``.
At N = 512 (B = H = 1, D = 16) an N x N fp32 score matrix is 1 MiB while q, k, v, out are
32 KiB each, so the two are far apart. The control test shows the detector does fire on the
reference (which does build the N x N matrix). On the GPU (cuda-marked) the peak memory at
N = 1024, 2048, 4096 must grow linearly, not quadratically.
"""

from __future__ import annotations

import gc
import tracemalloc

import pytest
import torch

from vitfast.ops.attention import attention, attention_packed
from vitfast.ops.reference import attention_ref


def _largest_torch_allocation(fn, repeats: int = 3) -> int:
    """Bytes of the largest block torch's CPU allocator handed out while ``fn`` ran (or the most
    one op event allocated in all): the most of ``repeats`` profiled runs. The profiler can report
    less than a run allocated (one full-suite run saw the backward's op event at N = 192 at 33,536
    B, where its outputs and scratch alone are 49,920 B and every other run reports exactly that),
    never more; a buffer the call needs is in every run, so the maximum keeps it."""
    largest = 0
    for _ in range(repeats):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        largest = max([largest] + [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0])
    return largest


def _python_peak(fn, repeats: int = 3) -> int:
    """Peak bytes of Python/NumPy allocations (the interpreter's tiles) while ``fn`` ran: the
    least of ``repeats`` runs, each after a full garbage collection. Garbage left by earlier code
    (collected whenever the cyclic GC happens to run) can only raise one run's peak; a buffer the
    call needs is in every run, so the minimum keeps it and drops that noise (one suite run saw a
    124 KB swing at N = 384 that no rerun reproduced)."""
    peaks = []
    for _ in range(repeats):
        gc.collect()
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            fn()
            peaks.append(tracemalloc.get_traced_memory()[1] - base)
        finally:
            tracemalloc.stop()
    return min(peaks)


def _nxn_bytes(N: int, itemsize: int = 4) -> int:
    return N * N * itemsize


def _qkv(N, D=16, requires_grad=False):
    g = torch.Generator().manual_seed(N)
    return [torch.randn(1, 1, N, D, generator=g).requires_grad_(requires_grad) for _ in range(3)]


def test_detector_fires_on_the_reference():
    N = 512
    q, k, v = _qkv(N)
    assert _largest_torch_allocation(lambda: attention_ref(q, k, v)) >= _nxn_bytes(N)


def _measure_forward(N):
    q, k, v = _qkv(N)
    attention(q, k, v, backend="triton")  # warm: kernel definition, caches
    with torch.no_grad():
        return (_largest_torch_allocation(lambda: attention(q, k, v, backend="triton")),
                _python_peak(lambda: attention(q, k, v, backend="triton")))


def _measure_backward(N):
    q, k, v = _qkv(N, requires_grad=True)
    out = attention(q, k, v, backend="triton")
    dout = torch.randn_like(out)
    out.backward(dout, retain_graph=True)  # warm
    return (_largest_torch_allocation(lambda: out.backward(dout, retain_graph=True)),
            _python_peak(lambda: out.backward(dout, retain_graph=True)))


@pytest.mark.parametrize("direction, n1, n2", [("forward", 256, 512), ("backward", 192, 384)])
def test_triton_allocates_no_n_by_n_tensor(direction, n1, n2):
    """torch allocations: each far below N x N. Interpreter (NumPy) allocations: they carry a
    constant overhead of ~200 KB, so the check is on growth from n1 to n2 tokens, which an
    N x N buffer would make >= 4 * (n2^2 - n1^2) bytes."""
    measure = _measure_forward if direction == "forward" else _measure_backward
    (t1, p1), (t2, p2) = measure(n1), measure(n2)
    for N, t in ((n1, t1), (n2, t2)):
        assert 0 < t < _nxn_bytes(N) // 2, f"largest torch allocation {t} B at N={N} (N x N fp32 = {_nxn_bytes(N)} B)"
    assert t2 <= 2.5 * t1, f"torch allocations grow faster than linearly: {t1} B at N={n1}, {t2} B at N={n2}"
    quadratic = _nxn_bytes(n2) - _nxn_bytes(n1)
    assert p2 - p1 < quadratic // 4, (
        f"interpreter peak grew {p2 - p1} B from N={n1} ({p1} B) to N={n2} ({p2} B); an N x N fp32 buffer "
        f"would add {quadratic} B")


def test_triton_packed_allocates_no_n_by_n_tensor():
    N, H, D = 512, 1, 16
    qkv = torch.randn(1, N, 3 * H * D)
    attention_packed(qkv, num_heads=H, backend="triton")
    with torch.no_grad():
        torch_max = _largest_torch_allocation(lambda: attention_packed(qkv, num_heads=H, backend="triton"))
    assert 0 < torch_max < _nxn_bytes(N) // 8, torch_max


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_peak_memory_grows_linearly(dtype):
    """Forward + backward at ViT-L-like heads: the extra peak over the inputs is O(N)."""
    B, H, D = 2, 16, 64
    extra = {}
    for N in (1024, 2048, 4096):
        q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
        dout = torch.randn(B, H, N, D, device="cuda", dtype=dtype)
        attention(q, k, v, backend="triton").backward(dout)  # warm (autotune)
        q.grad = k.grad = v.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        attention(q, k, v, backend="triton").backward(dout)
        torch.cuda.synchronize()
        extra[N] = torch.cuda.max_memory_allocated() - base
        assert extra[N] < B * H * N * N * 2 // 4, (N, extra[N])  # far below one N x N bf16 matrix
        del q, k, v, dout
    assert extra[4096] <= 2.5 * extra[2048] <= 2.5 * 2.5 * extra[1024], extra
