"""The test step of benchmarks/gpu_check.sh: one pytest run split into N parallel processes.

    python benchmarks/gpu_test_shards.py --shards 4 --logs .gpu_check/tests -- -m cuda -q tests

Shard i runs ``python -m pytest ARGS`` with ``VITFAST_TEST_SHARD=i/N`` (tests/_sharding.py: every
N-th of the tests that would run), its output in ``LOGS/shard-i.log``. Triton's compiles dominate
the GPU tests and are CPU-bound, so N processes on a many-core GPU machine get through N times as
many tests in the same time (pytest-xdist is not installed there). Afterwards each shard's log is
printed (capped at --max-lines, head and tail) with a one-line result per shard; the exit status is
0 only when every shard passed (a shard that had no test to run counts as passed).

SIGINT or SIGTERM (``timeout -s INT`` at the step's limit) is passed on to every shard once (each
runs in its own process group, so a group-wide signal does not hit it twice): pytest then stops and
still prints its failures and summary, which are printed here as above; a shard still running
--grace seconds later is killed.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

SUMMARY = re.compile(r"^=*\s*(?:\d+ (?:passed|failed|errors?|skipped|deselected|xfailed|xpassed|warnings?)\b"
                     r"|no tests ran).*$")


class Interrupted(Exception):
    pass


def _interrupt(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def summary_line(text: str) -> str:
    """pytest's last result line (``3 passed, 1 failed in 9.1s``), or ''."""
    lines = [ln.strip("= ") for ln in text.splitlines() if SUMMARY.match(ln.strip())]
    return lines[-1] if lines else ""


def capped(text: str, max_lines: int, path: Path) -> str:
    lines = text.splitlines()
    if len(lines) <= max_lines:
        return text.rstrip("\n")
    head = max_lines // 8
    tail = max_lines - head
    cut = len(lines) - head - tail
    return "\n".join(lines[:head] + [f"[... {cut} lines left out here; the whole log: {path}]"] + lines[-tail:])


def _signal_all(procs: Sequence[subprocess.Popen], sig: int) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass


def run(shards: int, pytest_args: Sequence[str], logs: Path, python: str = sys.executable, grace: float = 7.0,
        max_lines: int = 400) -> int:
    logs.mkdir(parents=True, exist_ok=True)
    procs: List[subprocess.Popen] = []
    paths = [logs / f"shard-{i}.log" for i in range(shards)]
    interrupted: Optional[str] = None
    old = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    t0 = time.monotonic()
    try:
        for i, path in enumerate(paths):
            env = dict(os.environ, VITFAST_TEST_SHARD=f"{i}/{shards}")
            with open(path, "wb") as log:
                procs.append(subprocess.Popen([python, "-m", "pytest", *pytest_args], stdout=log,
                                              stderr=subprocess.STDOUT, env=env, start_new_session=True))
        print(f"{shards} pytest shards started (VITFAST_TEST_SHARD=i/{shards}), logs in {logs}/", flush=True)
        for p in procs:
            p.wait()
    except Interrupted as e:
        interrupted = str(e)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # no second interrupt while the shards finish
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if interrupted or any(p.poll() is None for p in procs):
            print(f"{interrupted or 'stopped'}: SIGINT to every shard still running, {grace:.0f} s to finish",
                  flush=True)
            _signal_all(procs, signal.SIGINT)
            deadline = time.monotonic() + grace
            while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
                time.sleep(0.1)
            _signal_all(procs, signal.SIGKILL)
            for p in procs:
                p.wait()
        for s, h in old.items():
            signal.signal(s, h)

    results = []
    for i, (p, path) in enumerate(zip(procs, paths)):
        text = path.read_text(errors="replace")
        print(f"\n----- shard {i}/{shards} (exit {p.returncode}; {path})", flush=True)
        print(capped(text, max_lines, path), flush=True)
        results.append((i, p.returncode, summary_line(text)))
    print(f"\n----- {shards} shards, {time.monotonic() - t0:.0f} s" + (f" ({interrupted})" if interrupted else ""))
    for i, rc, line in results:
        print(f"  shard {i}/{shards}: exit {rc}  {line or '(no pytest summary line)'}")
    if interrupted:
        return 130
    ok = [rc in (0, 5) for _, rc, _ in results]
    if all(rc == 5 for _, rc, _ in results):
        return 5  # pytest's "no tests collected", in every shard
    return 0 if all(ok) else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                usage="%(prog)s [--shards N] [--logs DIR] -- PYTEST_ARGS...")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--logs", type=Path, default=Path(".gpu_check/tests"))
    p.add_argument("--python", default=sys.executable, help="the interpreter that runs pytest")
    p.add_argument("--grace", type=float, default=7.0, help="seconds the shards get to stop after SIGINT")
    p.add_argument("--max-lines", type=int, default=400, help="lines of each shard's log printed at most")
    p.add_argument("pytest_args", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    if args.shards < 1:
        p.error(f"--shards must be >= 1, got {args.shards}")
    rest = args.pytest_args[1:] if args.pytest_args[:1] == ["--"] else args.pytest_args
    return run(args.shards, rest, args.logs, args.python, args.grace, args.max_lines)


if __name__ == "__main__":
    sys.exit(main())
