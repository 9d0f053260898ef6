"""Helpers for the training tests: in-process runs of the trainer and torchrun launches."""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

# A tiny ViT on 32x32 digits, patch 4 (64 tokens), head dim 32: seconds per run on two cores.
TINY = ["--embed-dim", "64", "--depth", "2", "--num-heads", "2", "--no-progress", "--log-every", "1"]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_inprocess(argv):
    """``vitfast.cli.train.run`` in this process (a one-process gloo group), torn down afterwards."""
    from vitfast.cli.train import parse_args, run
    from vitfast.training.dist import cleanup

    threads = torch.get_num_threads()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the kernels' CPU fallback notices
            return run(parse_args(list(argv)))
    finally:
        cleanup()
        torch.set_num_threads(threads)


def torchrun(argv, nproc=2, timeout=240, module=("-m", "vitfast.cli", "train")):
    """``torchrun --standalone --nproc_per_node nproc -m vitfast.cli train argv``; returns the
    completed process (check=True, stdout/stderr captured)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore::RuntimeWarning")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           *module, *argv]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        pytest.fail(f"torchrun failed ({p.returncode}):\n{' '.join(cmd)}\n--- stdout\n{p.stdout[-4000:]}\n"
                    f"--- stderr\n{p.stderr[-6000:]}")
    return p


def read_losses(output_dir):
    """``{step: loss}`` from a run's metrics.jsonl."""
    out = {}
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if "loss" in rec:
                out[rec["step"]] = rec["loss"]
    return out


def assert_close_rel(a, b, rtol, what):
    """Every value of a within rtol (relative to b) of b."""
    assert a.keys() == b.keys(), f"{what}: steps differ: {sorted(a)} vs {sorted(b)}"
    worst = max(abs(a[k] - b[k]) / abs(b[k]) for k in b)
    assert worst <= rtol, f"{what}: worst relative difference {worst:.3e} > {rtol:g}\n{a}\n{b}"
    return worst
