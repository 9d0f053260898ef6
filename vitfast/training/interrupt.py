"""Stopping a run cleanly on SIGINT / SIGTERM.

:class:`StopSignals` replaces the two handlers while training: a signal only sets a flag, which
the loop reads after each optimizer step. Every rank must stop at the same step (a checkpoint
may be collective: FSDP2 saves its shards through ``torch.distributed.checkpoint``), so the flag is
agreed on with an all-reduce (MAX) over a gloo group, which costs no device synchronisation. A
second signal while stopping restores the default handler and re-raises it (the usual "press
Ctrl-C twice"). The exit code is the shell's: 128 + the signal number (130 SIGINT, 143 SIGTERM).
"""

from __future__ import annotations

import signal
from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["StopSignals", "Interrupted", "ignore_stop_signals", "ignore_sigint"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """Training stopped on a signal after ``step`` steps; ``checkpoint`` is what was saved (None:
    nothing, no ``--output-dir``). ``exit_code`` is 128 + the signal number."""

    def __init__(self, signum: int, step: int, total: int, checkpoint: Optional[str], result=None):
        self.signum, self.step, self.total, self.checkpoint, self.result = signum, step, total, checkpoint, result
        super().__init__(f"{signal.Signals(signum).name} at step {step}/{total}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopSignals:
    """Context manager: SIGINT/SIGTERM set :attr:`signum` instead of ending the process."""

    def __init__(self, group=None):
        self.signum = 0
        self.group = group
        self._old: dict = {}

    def _handler(self, signum, frame) -> None:
        if self.signum:  # the second one: stop waiting for the checkpoint
            signal.signal(signum, self._old.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.signum = signum

    def __enter__(self) -> "StopSignals":
        for s in SIGNALS:
            self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)

    def agreed(self, world_size: int) -> int:
        """The signal any rank received (0: none). Collective when ``world_size > 1``."""
        if world_size == 1:
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return int(flag.item())


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: SIGINT and SIGTERM sent to the whole process group (Ctrl-C;
    torchrun's shutdown, SLURM, ``timeout`` and ``kill -TERM -PGID`` signal the group) are left to
    the main process, which stops after the current step, saves, and shuts the workers down.
    SIGTERM matters most: the DataLoader installs its own SIGTERM handler in each worker (before
    this function runs), which kills the worker, and the main process then fails mid-step
    ("DataLoader worker ... is killed by signal: Terminated") without saving."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


ignore_sigint = ignore_stop_signals  # the earlier name (SIGINT only then)
