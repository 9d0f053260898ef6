"""``vitfast train`` never loses work: a non-empty --output-dir is refused unless --resume or
--overwrite is given; SIGINT/SIGTERM save a checkpoint at the current step and exit 130/143
with one line saying how to continue, and the continued run repeats the uninterrupted one;
bad flags get argparse's one-line error; no progress bar off a terminal."""

import os
import signal
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _train_helpers import REPO, TINY, read_losses, run_inprocess  # noqa: E402

from vitfast.cli import train  # noqa: E402
from vitfast.training.checkpoint import list_checkpoints  # noqa: E402
from vitfast.training.interrupt import Interrupted  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SHORT = TINY + ["--batch-size", "16", "--lr", "3e-3", "--warmup-steps", "2", "--drop-path", "0.2"]


def _losses(res):
    return {h["step"]: h["loss"] for h in res.history}


def _main(argv, capsys):
    capsys.readouterr()  # what earlier runs in the test printed
    rc = train.main(list(argv))
    return rc, capsys.readouterr()


# -- the output folder --------------------------------------------------------------------------
def test_a_non_empty_output_dir_is_refused_then_overwrite_starts_over(tmp_path, capsys):
    out = tmp_path / "run"
    run_inprocess(SHORT + ["--steps", "3", "--output-dir", str(out)])
    before = sorted(os.listdir(out / "checkpoints"))
    rc, io = _main(SHORT + ["--steps", "2", "--output-dir", str(out)], capsys)
    assert rc == 2
    (line,) = io.err.strip().splitlines()
    assert "is not empty" in line and "--resume auto" in line and "--overwrite" in line
    assert sorted(os.listdir(out / "checkpoints")) == before  # nothing touched
    res = run_inprocess(SHORT + ["--steps", "2", "--output-dir", str(out), "--overwrite"])
    assert sorted(os.listdir(out / "checkpoints")) == ["step_00000002"]  # the old run's step 3 is gone
    assert read_losses(out) == _losses(res)  # metrics.jsonl holds this run only
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    rc, io = _main(SHORT + ["--steps", "1", "--output-dir", str(tmp_path / "other")], capsys)
    assert rc == 2 and "notes.txt" in io.err


def test_resume_auto_without_a_checkpoint_and_resume_behind_later_ones_are_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("")
    rc, io = _main(SHORT + ["--steps", "2", "--output-dir", str(out), "--resume", "auto"], capsys)
    assert rc == 2 and "no complete checkpoint" in io.err
    run_inprocess(SHORT + ["--steps", "4", "--save-every", "2", "--output-dir", str(out), "--overwrite"])
    old = str(out / "checkpoints" / "step_00000002")
    rc, io = _main(SHORT + ["--steps", "6", "--output-dir", str(out), "--resume", old], capsys)
    assert rc == 2 and "later checkpoints" in io.err and "step_00000004" in io.err


def test_without_output_dir_it_says_nothing_is_saved_and_draws_a_bar_on_a_terminal_only(monkeypatch, capsys):
    argv = [x for x in SHORT if x != "--no-progress"] + ["--steps", "2"]
    rc, io = _main(argv, capsys)
    assert rc == 0
    notes = [line for line in io.err.splitlines() if "nothing will be saved" in line]
    assert len(notes) == 1 and "--output-dir" in notes[0]
    assert "\r" not in io.err and "\r" not in io.out  # no tqdm bar when stderr is not a terminal
    assert "step      2/2" in io.out  # plain periodic lines instead
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    rc, io = _main(argv, capsys)
    assert rc == 0 and "\r" in io.err and "train:" in io.err  # on a terminal: the bar


@pytest.mark.parametrize("argv, message", [
    (["--lr", "-1"], "argument --lr: must be a positive number, got -1"),
    (["--lr", "0"], "argument --lr: must be a positive number"),
    (["--steps", "0"], "argument --steps: must be a positive integer, got 0"),
    (["--steps", "-5"], "argument --steps: must be a positive integer"),
    (["--batch-size", "0"], "argument --batch-size: must be a positive integer"),
    (["--epochs", "0"], "argument --epochs: must be a positive number"),
    (["--workers", "-1"], "argument --workers: must be an integer >= 0"),
    (["--opt-betas", "0.9", "1.5"], "argument --opt-betas: must be in [0, 1)"),
    (["--label-smoothing", "1"], "argument --label-smoothing: must be in [0, 1)"),
    (["--reprob", "2"], "argument --reprob: must be in [0, 1]"),
    (["--lr", "nan"], "argument --lr: must be a positive number"),
    (["--overwrite"], "--overwrite needs --output-dir"),
    (["--output-dir", "x", "--overwrite", "--resume", "auto"], "give one of them"),
    (["--mixup", "0.8", "--batch-size", "3"], "--batch-size must be even"),
    (["--aa", "rand-m9-mstd0.5"], "--aa augments the images of --data-dir"),
])
def test_bad_flags_get_a_one_line_error_and_exit_2(argv, message, capsys):
    rc, io = _main(argv, capsys)
    assert rc == 2
    (line,) = io.err.strip().splitlines()
    assert line.startswith("vitfast train: error: ") and message in line


# -- stopping on a signal -----------------------------------------------------------------------
def _resume_repeats_the_run(args, out, stopped):
    """--resume auto from the checkpoint at ``stopped`` gives the uninterrupted run's later losses
    bit for bit (both runs in this process: same host, same threads)."""
    resumed = run_inprocess(args + ["--output-dir", str(out), "--resume", "auto"])
    full = run_inprocess(args)
    assert resumed.start_step == stopped
    assert _losses(resumed) == {k: v for k, v in _losses(full).items() if k > stopped}
    return resumed, full


def test_sigint_to_a_child_saves_and_resume_auto_repeats_the_uninterrupted_run(tmp_path):
    """A child `vitfast train` (each step slowed down so that it is still running) gets SIGINT
    once it has logged a step: one line naming --resume auto, exit code 130, no traceback, a
    checkpoint at the step it stopped after. --resume auto then finishes the run, and every
    step's loss is the uninterrupted run's, bit for bit (same host, one process, same threads)."""
    out, total = tmp_path / "run", 8
    args = SHORT + ["--steps", str(total)]
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), PYTHONWARNINGS="ignore::RuntimeWarning")
    child = subprocess.Popen([sys.executable, os.path.join(HERE, "_slow_train.py"), "0.3", *args,
                              "--output-dir", str(out)], cwd=REPO, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for line in iter(child.stdout.readline, ""):
            if line.startswith("step") and f"/{total}" in line:
                child.send_signal(signal.SIGINT)
                break
        stdout, stderr = child.communicate(timeout=240)
    finally:
        child.kill()
    assert child.returncode == 130, stderr
    assert "Traceback" not in stderr
    (note,) = [line for line in stderr.splitlines() if "stopped by SIGINT" in line]
    assert "--resume auto" in note
    (ckpt,) = list_checkpoints(str(out / "checkpoints"))
    stopped = int(ckpt.split("_")[1])
    assert 1 <= stopped < total and f"after step {stopped}/{total}" in note and ckpt in note

    resumed, full = _resume_repeats_the_run(args, out, stopped)
    assert read_losses(out) == _losses(full)  # metrics.jsonl: the two parts make the whole run
    assert resumed.evals[-1] == full.evals[-1]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_sigterm_saves_the_current_step_collectively_and_resumes_exactly(tmp_path, monkeypatch, mode):
    """SIGTERM arriving during step 2 (sent from the log line): the run stops after step 2 with a
    checkpoint (FSDP2: every rank's DCP shards) and exit code 143; resuming repeats steps 3-5."""
    out = tmp_path / "run"
    args = SHORT + ["--steps", "5", "--dist", mode]
    real_line = train._Log.line

    def line(self, text):
        real_line(self, text)
        if text.startswith("step      2/"):
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(train._Log, "line", line)
    with pytest.raises(Interrupted) as stop:
        run_inprocess(args + ["--output-dir", str(out)])
    monkeypatch.setattr(train._Log, "line", real_line)
    assert stop.value.exit_code == 143 and stop.value.step == 2
    assert list_checkpoints(str(out / "checkpoints")) == ["step_00000002"]
    assert os.path.isdir(out / "checkpoints" / "step_00000002" / ("dcp" if mode == "fsdp" else "rng"))
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is gone again
    _resume_repeats_the_run(args, out, 2)


def test_a_signal_without_output_dir_says_nothing_was_saved(monkeypatch, capsys):
    real_line = train._Log.line

    def line(self, text):
        real_line(self, text)
        if text.startswith("step      1/"):
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(train._Log, "line", line)
    rc, io = _main(SHORT + ["--steps", "4"], capsys)
    assert rc == 130
    (note,) = [x for x in io.err.splitlines() if "stopped by SIGINT" in x]
    assert "after step 1/4" in note and "nothing saved (no --output-dir)" in note


def test_dataloader_workers_survive_a_sigterm_to_the_process_group():
    """torchrun, SLURM and `kill -TERM -PGID` signal the whole group, DataLoader workers included:
    the workers must leave SIGTERM to the main process (which then saves), not die on it."""
    child = subprocess.Popen([sys.executable, os.path.join(HERE, "_loader_under_group_sigterm.py")], cwd=REPO,
                             text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        os.killpg(child.pid, signal.SIGTERM)
        stdout, stderr = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 0 and "survived" in stdout, stderr
