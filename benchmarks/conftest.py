"""pytest-benchmark suite: ``pytest benchmarks --benchmark-only``.

Small sizes on the CPU (a check that every benchmark runs, figures labelled CPU), full sizes on
a GPU (ViT-B/16 at 224, batch 256, bf16). Each benchmark records its device, versions and rates
in ``extra_info``, so ``--benchmark-json`` output is self-describing like ``vitfast bench``'s.
GPU timings synchronise inside the timed function; warm-up rounds run before measuring.

Each test times one implementation: this suite tracks each one across runs
(``--benchmark-compare``). Speed-ups between implementations come from the scripts
(``vitfast bench``, ``benchmarks/bench_*.py``), which time them alternately, round by round.
Like those, the suite refuses to save results (``--benchmark-json``, ``--benchmark-autosave``,
``--benchmark-save``) when the 1-minute load average exceeds the number of cores, unless
``--allow-noisy`` is given; every result then carries ``noisy: true`` in ``extra_info``.
"""

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:  # Triton kernels run interpreted without a GPU; must be set before vitfast loads
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if CUDA else "cpu")


def pytest_addoption(parser):
    parser.addoption("--allow-noisy", action="store_true",
                     help="save benchmark results even when the 1-minute load average exceeds the number of cores "
                     "(each result is marked noisy: true)")


def _saves(config) -> bool:
    return any(config.getoption(o, default=None) for o in ("benchmark_json", "benchmark_autosave", "benchmark_save"))


def pytest_configure(config):
    from vitfast.cli.benchmarking import EXIT_NOISY, NoisyMachine, check_load

    config._vitfast_load = {}
    try:
        check_load(config._vitfast_load, config.getoption("allow_noisy"), "benchmarks", writes=_saves(config))
    except NoisyMachine as e:
        pytest.exit(str(e), returncode=EXIT_NOISY)


def pytest_collection_modifyitems(config, items):
    if CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marked cuda)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def env(pytestconfig):
    from vitfast.cli.benchmarking import env_info

    info = env_info(DEVICE, None)
    info.pop("command", None)
    info.update(pytestconfig._vitfast_load)
    return info


@pytest.fixture
def run(benchmark, env):
    """``run(fn, flops=None, nbytes=None, rounds=None)``: time ``fn`` (synchronised on the GPU)
    after warm-up and record TFLOP/s and GB/s from the median in ``extra_info``."""

    def _run(fn, flops=None, nbytes=None, rounds=None, warmup=None):
        if CUDA:
            def timed():
                fn()
                torch.cuda.synchronize()
        else:
            timed = fn
        rounds = rounds or (20 if CUDA else 3)
        warmup = warmup if warmup is not None else (5 if CUDA else 1)
        benchmark.extra_info.update({k: env[k] for k in ("label", "device", "torch", "triton", "vitfast", "cpu_threads")})
        benchmark.extra_info.update({k: env.get(k) for k in ("noisy", "loadavg_1m_start", "cores")})
        result = benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=warmup)
        median = benchmark.stats.stats.median
        if flops:
            benchmark.extra_info["tflops"] = flops / median / 1e12
        if nbytes:
            benchmark.extra_info["gbps"] = nbytes / median / 1e9
        return result

    return _run
