import os

# The Triton interpreter must be on before any @triton.jit function is defined, i.e. before
# vitfast's kernel modules are imported. Without a GPU that is the only way Triton runs.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import _sharding  # noqa: E402  (tests/ is on sys.path: this conftest's folder)


def pytest_configure(config):
    # VITFAST_TEST_SHARD / VITFAST_TEST_FIRST (benchmarks/gpu_check.sh's parallel test step)
    if not config.pluginmanager.is_registered(_sharding):
        config.pluginmanager.register(_sharding, "vitfast_sharding")


def _assert_grads_close(got: dict, ref: dict, rtol: float) -> None:
    """Each gradient within rtol of its reference tensor's largest entry, or of 1e-3 of the largest
    reference gradient in the model where a gradient is zero in exact arithmetic (k_norm.bias:
    softmax ignores a per-row shift, so only rounding is left there)."""
    scale = max(g.abs().max().item() for g in ref.values())
    assert got.keys() == ref.keys()
    for n, r in ref.items():
        err = (got[n].double() - r.double()).abs().max().item()
        assert err <= rtol * max(r.abs().max().item(), 1e-3 * scale), (n, err)


@pytest.fixture(params=["gemm", "conv"])
def cpu_strategy(request):
    """The test runs under each GEMM of the float32 CPU patch embedding (MKL on a patch matrix,
    oneDNN's convolution: vitfast.ops.patch_embed.cpu_strategy), whichever this host picks."""
    from vitfast.ops.patch_embed import _C, cpu_strategy, set_cpu_strategy

    previous = set_cpu_strategy(request.param)
    try:
        if getattr(_C, "cpu_patch_embed_strategy", None) is not None:
            assert cpu_strategy() == request.param
        yield request.param
    finally:
        set_cpu_strategy(previous)


@pytest.fixture
def assert_grads_close():
    return _assert_grads_close


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marked cuda)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
