"""The ops called from two Python threads at once give the answers they give alone.

Each thread runs its own inputs (different shapes, so any shared scratch or cache keyed
wrongly shows up) several times, starting together at a barrier; every result is compared
with the single-threaded one. Covers patch_embed (forward and backward), attention on SDPA
and on the Triton interpreter, and the fused Block ops (Triton and reference). A cuda-marked
test runs the kernels on a non-default CUDA stream.
"""

from __future__ import annotations

import threading

import pytest
import torch

from vitfast.ops.attention import attention, attention_packed
from vitfast.ops.bias_gelu import bias_gelu
from vitfast.ops.layer_norm import add_layer_norm, layer_norm
from vitfast.ops.patch_embed import patch_embed
from vitfast.ops.bias_scale_residual import bias_scale_residual

ROUNDS = 3


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _patch_embed_job(seed):
    g = _gen(seed)
    p = 4 + 4 * (seed % 2)
    images = torch.randn(2 + seed % 2, 3, 4 * p, 2 * p, generator=g, requires_grad=True)
    w = torch.randn(12, 3, p, p, generator=g, requires_grad=True)
    b = torch.randn(12, generator=g, requires_grad=True)
    pos = torch.randn(1, 9, 12, generator=g, requires_grad=True)
    cls = torch.randn(1, 1, 12, generator=g, requires_grad=True)

    def run():
        for t in (images, w, b, pos, cls):
            t.grad = None
        out = patch_embed(images, w, b, cls_token=cls, pos_embed=pos, mean=[0.4, 0.5, 0.6], std=[0.2, 0.3, 0.4])
        out.backward(torch.ones_like(out))
        return [out.detach()] + [t.grad.clone() for t in (images, w, b, pos, cls)]

    return run


def _attention_job(backend):
    def make(seed):
        g = _gen(seed)
        N, D = 37 + 11 * seed, 16 + 8 * (seed % 2)
        q, k, v = (torch.randn(1, 2, N, D, generator=g, requires_grad=True) for _ in range(3))
        qkv = torch.randn(1, N, 3 * 2 * D, generator=g)

        def run():
            for t in (q, k, v):
                t.grad = None
            out = attention(q, k, v, backend=backend)
            out.backward(torch.ones_like(out))
            return [out.detach(), q.grad.clone(), k.grad.clone(), v.grad.clone(),
                    attention_packed(qkv, num_heads=2, backend=backend)]

        return run

    return make


def _fused_job(backend):
    def make(seed):
        g = _gen(seed)
        C = 24 + 9 * seed
        x = torch.randn(3, 5, C, generator=g, requires_grad=True)
        y = torch.randn(3, 5, C, generator=g)
        v = [torch.randn(C, generator=g) for _ in range(4)]

        def run():
            x.grad = None
            outs = [layer_norm(x, v[0], v[1], backend=backend), *add_layer_norm(x, y, v[2], v[0], v[1], backend=backend),
                    bias_gelu(x, v[3], backend=backend), bias_scale_residual(x, y, v[3], v[2], backend=backend)]
            sum(o.sum() for o in outs).backward()
            return [o.detach() for o in outs] + [x.grad.clone()]

        return run

    return make


# Regression: the Triton interpreter (TRITON_INTERPRET=1, the CPU path for backend='triton') is
# not thread-safe: it patches triton.language globally while a kernel runs, so two threads
# launching at once failed with InterpreterError('Did you forget to add @triton.jit ?') in about
# half the runs. Every interpreted launch now holds vitfast._dispatch.interpreter_lock.

JOBS = {
    "patch_embed": _patch_embed_job,
    "attention_sdpa": _attention_job("sdpa"),
    "attention_triton": _attention_job("triton"),
    "fused_triton": _fused_job("triton"),
    "fused_reference": _fused_job("reference"),
}
FREE_JOBS = list(JOBS)


def _expected(job):
    runs = [JOBS[job](seed) for seed in (1, 2)]
    return runs, [run() for run in runs]  # alone, one after the other


def _compare(job, results, expected):
    for i in range(2):
        for r, got in enumerate(results[i]):
            for j, (a, b) in enumerate(zip(got, expected[i])):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6,
                                           msg=lambda m: f"{job} thread {i} round {r} output {j}: {m}")


@pytest.fixture
def one_intra_op_thread():
    """Each call on one intra-op thread, alone and in the worker threads (which do not inherit
    the main thread's setting: OpenMP's thread count is per thread, taken from OMP_NUM_THREADS):
    otherwise the two runs split the GEMM's reduction differently and round differently
    (3.8e-5 apart in patch_embed's output with MKL_CBWR=COMPATIBLE and 4 threads): rounding, not
    a race, and host-dependent. With one thread per call the answers must agree to the last
    bits, so a race still shows."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("job", FREE_JOBS)
def test_two_threads_at_once_match_single_thread(job, one_intra_op_thread):
    runs, expected = _expected(job)
    barrier = threading.Barrier(2)
    results: dict = {}
    errors: list = []

    def worker(i):
        try:
            torch.set_num_threads(1)  # this thread's OpenMP setting (see one_intra_op_thread)
            barrier.wait(timeout=60)
            results[i] = [runs[i]() for _ in range(ROUNDS)]
        except BaseException as e:  # noqa: BLE001  (re-raised in the main thread)
            errors.append((i, e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), f"{job}: a thread hung"
    assert not errors, f"{job}: {errors}"
    _compare(job, results, expected)


@pytest.mark.cuda
def test_cuda_ops_on_a_non_default_stream():
    """Every op on a side stream, with the inputs made on it, matches the default stream's
    answer: the kernels launch on the current stream, not stream 0."""
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 224, 224), device=dev, dtype=torch.uint8, generator=g)
    w = torch.randn(384, 3, 16, 16, device=dev, generator=g) * 0.02
    q, k, v = (torch.randn(4, 6, 197, 64, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3))
    x = torch.randn(4, 197, 384, device=dev, dtype=torch.bfloat16, generator=g)

    def run():
        return [patch_embed(images, w, mean=[0.5] * 3, std=[0.5] * 3), attention(q, k, v, backend="triton"),
                layer_norm(x, backend="triton"), bias_gelu(x, backend="triton"),
                bias_scale_residual(x, x, backend="triton")]

    expected = run()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        # a long kernel first, so a launch on the default stream would read unfinished inputs
        big = torch.randn(4096, 4096, device=dev)
        for _ in range(8):
            big = big @ big / 64
        images2, q2 = images.clone(), q.clone()
        got = [patch_embed(images2, w, mean=[0.5] * 3, std=[0.5] * 3), attention(q2, k, v, backend="triton"),
               layer_norm(x, backend="triton"), bias_gelu(x, backend="triton"),
               bias_scale_residual(x, x, backend="triton")]
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
