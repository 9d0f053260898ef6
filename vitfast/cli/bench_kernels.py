"""``vitfast bench kernels``: the kernel microbenchmarks (:mod:`vitfast.cli.kernels`), in one run, one file.

Each microbenchmark (``python -m vitfast.cli.kernels.attention``, ``...patch_embed``, ...)
runs as its own process through its documented command line, ``--json FILE`` writing its
rows; a crash in one (an illegal memory access, a compile error) is reported and cannot
take the others down, and ``TRITON_INTERPRET=1`` can be set for the CPU before Triton loads.
The rows of all of them are then written together, stamped like ``vitfast bench``'s rows
(device, versions, date, command). A microbenchmark that is missing or fails is named in
the summary and makes the exit code 1: a baseline never disappears silently.

``--device`` reaches every microbenchmark (its own scripts included) through
``CUDA_VISIBLE_DEVICES``: ``""`` for ``cpu`` (no GPU to fall back on: a CPU record is a CPU
run), the card for ``cuda:N`` (which each child then sees as its ``cuda:0``); the value set is
recorded as ``child_cuda_visible_devices``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch

from . import benchmarking as bu
from .kernels import NAMES

__all__ = ["KERNEL_BENCHMARKS", "benchmarks_dir", "main"]

KERNEL_BENCHMARKS = NAMES
# benchmarks that only measure on a GPU (peak device memory): left out of the default set on the CPU
GPU_ONLY = ("memory",)
# benchmarks with a --smoke mode (tiny shapes)
HAS_SMOKE = ("attention", "patch_embed", "fused")


def benchmarks_dir() -> Optional[Path]:
    """``$VITFAST_BENCHMARKS_DIR`` (scripts ``bench_<name>.py`` run instead of the package's
    modules: your own variants), else None."""
    env = os.environ.get("VITFAST_BENCHMARKS_DIR")
    return Path(env) if env else None


def command(name: str) -> tuple[list[str], Optional[str]]:
    """The command line of one microbenchmark, or why there is none: the module
    ``vitfast.cli.kernels.<name>`` (works from an installed package), or the script
    ``$VITFAST_BENCHMARKS_DIR/bench_<name>.py``."""
    folder = benchmarks_dir()
    if folder is None:
        return [sys.executable, "-m", f"{__package__}.kernels.{name}"], None
    script = folder / f"bench_{name}.py"
    if not script.is_file():
        return [], f"missing: {script} does not exist"
    return [sys.executable, str(script)], None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vitfast bench kernels",
        description="Run the attention, patch-embedding, fused-epilogue and memory microbenchmarks (vitfast.cli.kernels.*) and "
        "collect their rows. Arguments after `--` go to every microbenchmark.",
    )
    p.add_argument("--only", nargs="+", choices=KERNEL_BENCHMARKS, default=None,
                   help=f"which microbenchmarks (default: all; {', '.join(GPU_ONLY)} only on a GPU)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes, checks the scripts run (the default without a GPU; runs under TRITON_INTERPRET=1)")
    p.add_argument("--json", metavar="PATH", help="write all rows as JSON (a folder: <date>_<device>_kernels.json in it)")
    p.add_argument("--csv", metavar="PATH", help="write all rows as CSV")
    p.add_argument("--device", default="auto",
                   help="auto, cpu or cuda[:N]: where every microbenchmark runs (set through CUDA_VISIBLE_DEVICES: "
                   "'' for cpu, the card for cuda:N)")
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="stop a microbenchmark after S seconds (reported as failed; the others still run)")
    bu.add_noise_args(p)
    for name in KERNEL_BENCHMARKS:
        p.add_argument(f"--{name.replace('_', '-')}-args", default="", metavar="ARGS",
                       help=f"extra arguments for the {name} microbenchmark only, as one string "
                       f"(write --{name.replace('_', '-')}-args='--opt value')")
    return p


def visible_devices(device: torch.device, environ: Mapping[str, str]) -> Optional[str]:
    """``CUDA_VISIBLE_DEVICES`` for the microbenchmarks of a run on ``device``: ``""`` for the
    CPU, the card of ``cuda:N`` (the N-th of this process's own ``CUDA_VISIBLE_DEVICES`` when it
    has one), None to leave it as it is (``auto`` / ``cuda``: the default card, as here)."""
    if device.type == "cpu":
        return ""
    if device.index is None:
        return None
    own = environ.get("CUDA_VISIBLE_DEVICES")
    cards = [c.strip() for c in own.split(",") if c.strip()] if own else []
    if cards and device.index >= len(cards):
        raise ValueError(f"{device} is not one of the {len(cards)} card(s) in CUDA_VISIBLE_DEVICES={own!r}")
    return cards[device.index] if cards else str(device.index)


def child_env(device: torch.device, environ: Mapping[str, str]) -> dict:
    """The environment a microbenchmark runs in: ``environ`` with ``device`` made its only
    visible one (:func:`visible_devices`) and, on the CPU, the Triton interpreter on."""
    env = dict(environ, PYTHONUNBUFFERED="1")
    visible = visible_devices(device, environ)
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    if device.type == "cpu":
        env.setdefault("TRITON_INTERPRET", "1")
    return env


def run_one(name: str, extra: Sequence[str], smoke: bool, device: torch.device,
            timeout: Optional[float] = None) -> tuple[str, list]:
    """(status, rows) of one microbenchmark, run on ``device`` (:func:`child_env`): status is
    'ok', 'missing: ...' or 'failed: ...'."""
    base, missing = command(name)
    if missing:
        return missing, []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{name}.json"
        smoke_flag = ["--smoke"] if smoke and name in HAS_SMOKE else []
        cmd = [*base, *smoke_flag, *extra, "--json", str(out)]
        env = child_env(device, os.environ)
        visible = f"CUDA_VISIBLE_DEVICES={shlex.quote(env['CUDA_VISIBLE_DEVICES'])} " if "CUDA_VISIBLE_DEVICES" in env else ""
        print(f"$ {visible}{' '.join(cmd)}", flush=True)
        try:
            proc = subprocess.run(cmd, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            return f"failed: timed out after {timeout:g} s (--timeout)", []
        if proc.returncode == bu.EXIT_NOISY:
            return "refused: the machine was busy (load average over the core count; see --allow-noisy)", []
        if proc.returncode != 0:
            return f"failed: exit code {proc.returncode}", []
        if not out.is_file():
            return f"failed: it exited 0 but wrote no {out.name} (does it take --json PATH?)", []
        data = json.loads(out.read_text())
    rows = data.get("rows", []) if isinstance(data, dict) else data
    if not isinstance(rows, list) or not rows:
        return "failed: its JSON holds no rows", []
    return "ok", rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = build_parser()
    try:
        args = parser.parse_args(own)
        device = bu.resolve_device(args.device)
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{device}: this process sees {torch.cuda.device_count()} GPU(s)")
        child_visible = visible_devices(device, os.environ)
    except SystemExit as e:
        return int(e.code or 0)
    except ValueError as e:
        print(f"vitfast bench kernels: error: --device: {e}", file=sys.stderr)
        return 2
    if args.timeout is not None and args.timeout <= 0:
        print(f"vitfast bench kernels: error: --timeout must be > 0, got {args.timeout:g}", file=sys.stderr)
        return 2
    cpu = device.type == "cpu"
    smoke = args.smoke or cpu
    env = bu.env_info(device, ["kernels", *argv])
    env["child_cuda_visible_devices"] = child_visible  # None: the microbenchmarks saw what this process sees
    writes = bool(args.json or args.csv)
    try:  # each microbenchmark checks again for itself (the flag is passed on)
        bu.check_load(env, args.allow_noisy, "vitfast bench kernels", writes)
    except bu.NoisyMachine as e:
        print(e, file=sys.stderr)
        return bu.EXIT_NOISY
    if args.allow_noisy:
        extra = [*extra, "--allow-noisy"]
    json_path = bu.results_path(args.json, env, "kernels") if args.json else None
    results: dict = {}
    rows: list = []
    names = args.only or [n for n in KERNEL_BENCHMARKS if not (cpu and n in GPU_ONLY)]
    for name in names:
        own_args = shlex.split(getattr(args, f"{name}_args"))
        results[name] = run_one(name, [*own_args, *extra], smoke, device, args.timeout)
        rows += [{"benchmark": name, **r} for r in results[name][1] if isinstance(r, dict)]
        if json_path and rows:  # rewritten after each microbenchmark: a later crash or kill loses nothing
            bu.write_json(json_path, "kernels", env, rows, smoke=smoke, benchmarks={n: s for n, (s, _) in results.items()})
    print(f"\nkernel microbenchmarks on {env['label']} ({env['device']}){' [smoke: tiny shapes]' if smoke else ''}:")
    for name, (status, rs) in results.items():
        print(f"  {name:<12} {status}{f' ({len(rs)} rows)' if rs else ''}")
    if json_path and rows:
        print(f"wrote {json_path}")
    if args.csv and rows:
        print(f"wrote {bu.write_csv(args.csv, env, rows, kind='kernels')}")
    bad = [n for n, (s, _) in results.items() if s != "ok"]
    if bad:
        print(f"vitfast bench kernels: not measured: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
