"""Two processes on gloo (torchrun --standalone): DDP gradients against one process, FSDP2 losses
against DDP, and FSDP2 (torch.distributed.checkpoint) resume."""

import os
import signal
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _grad_worker import step_grads  # noqa: E402
from _train_helpers import REPO, TINY, assert_close_rel, read_losses, torchrun  # noqa: E402

from vitfast.training.data import StepBatchSampler  # noqa: E402
from vitfast.training.dist import cleanup  # noqa: E402


def test_sampler_two_ranks_see_one_process_batch():
    """W processes with batch b see exactly the images of one process with batch W*b, every step,
    across epoch boundaries, and a resumed sampler continues the same sequence."""
    n, b, steps = 103, 8, 15  # 6 steps per epoch: crosses two epoch boundaries
    one = list(StepBatchSampler(n, 2 * b, 0, 1, seed=3, total_steps=steps))
    r0 = list(StepBatchSampler(n, b, 0, 2, seed=3, total_steps=steps))
    r1 = list(StepBatchSampler(n, b, 1, 2, seed=3, total_steps=steps))
    assert [x + y for x, y in zip(r0, r1)] == one
    assert all(len(set(x)) == 2 * b for x in one)
    assert list(StepBatchSampler(n, 2 * b, 0, 1, seed=3, total_steps=steps, start_step=7)) == one[7:]
    assert one[:6] != one[6:12]  # a new permutation each epoch
    assert list(StepBatchSampler(n, 2 * b, 0, 1, seed=4, total_steps=steps)) != one


def test_ddp_two_processes_grads_equal_one_process(tmp_path):
    argv = TINY + ["--seed", "5"]
    out = str(tmp_path / "grads.pt")
    torchrun([out, "8", *argv], module=(os.path.join(REPO, "tests", "training", "_grad_worker.py"),))
    ddp = torch.load(out)
    try:
        _, single = step_grads(argv, batch_size=16, wrap=False)
    finally:
        cleanup()
    assert ddp.keys() == single.keys()
    for name, g in single.items():
        rel = ((ddp[name] - g).norm() / g.norm().clamp_min(1e-30)).item()
        assert rel <= 1e-5, f"{name}: DDP grad differs from the one-process grad by {rel:.2e} (relative)"
    assert any(g.abs().max() > 0 for g in single.values())


def test_fsdp_matches_ddp_and_a_signalled_run_resumes_exactly(tmp_path):
    """FSDP2 (fully_shard per block, then the root) against DDP on the same two processes. Then an
    FSDP run in which only rank 1 gets SIGTERM: both ranks stop after the same step, save one DCP
    checkpoint together (each its shards), exit 143; --resume auto repeats the rest exactly."""
    common = TINY + ["--steps", "6", "--batch-size", "8", "--lr", "3e-3", "--warmup-steps", "2"]
    ddp_dir, fsdp_dir, stopped_dir = (str(tmp_path / d) for d in ("ddp", "fsdp", "stopped"))
    torchrun(common + ["--dist", "ddp", "--output-dir", ddp_dir])
    torchrun(common + ["--dist", "fsdp", "--output-dir", fsdp_dir])
    ddp, fsdp = read_losses(ddp_dir), read_losses(fsdp_dir)
    assert sorted(ddp) == list(range(1, 7))
    assert_close_rel(fsdp, ddp, 1e-4, "FSDP2 vs DDP losses")
    assert len(set(ddp.values())) == 6  # the steps really trained (different batches, changing weights)

    pids = tmp_path / "pids"
    pids.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore::RuntimeWarning", SLOW_TRAIN_PIDS=str(pids))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(REPO, "tests", "training", "_slow_train.py"), "0.3",
           *common, "--dist", "fsdp", "--output-dir", stopped_dir]
    launcher = subprocess.Popen(cmd, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for line in iter(launcher.stdout.readline, ""):
            if line.startswith("step      1/6"):
                os.kill(int((pids / "rank1").read_text()), signal.SIGTERM)
                break
        _, err = launcher.communicate(timeout=240)
    finally:
        launcher.kill()
    (note,) = [x for x in err.splitlines() if "stopped by SIGTERM" in x]  # rank 0's line, once
    (ckpt,) = os.listdir(os.path.join(stopped_dir, "checkpoints"))
    stopped = int(ckpt.split("_")[1])
    assert 1 <= stopped < 6 and f"after step {stopped}/6" in note and "--resume auto" in note
    shards = os.listdir(os.path.join(stopped_dir, "checkpoints", ckpt, "dcp"))
    assert ".metadata" in shards and len([f for f in shards if f.endswith(".distcp")]) == 2, shards

    torchrun(common + ["--dist", "fsdp", "--output-dir", stopped_dir, "--resume", "auto"])
    resumed = read_losses(stopped_dir)
    assert sorted(resumed) == list(range(1, 7))
    assert resumed == fsdp
