"""How far the vitfast and reference trainings of test_train_convergence.py drift apart on
different hosts: the data behind that test's tolerances.

Each cell of the host matrix (``ATEN_CPU_CAPABILITY``, ``MKL_CBWR``, threads; the cells of
``make test-matrix``) trains both paths in a child process; the table gives, per cell, the
largest per-step relative loss gap over the first 10/20/30/40/50/100 steps, the first step
over 1e-4 and 1e-3, and the gaps of what the test compares at the end (mean loss of the last
10 steps, validation loss and accuracy).

    python tests/training/measure_parity_spread.py                  # the 9 cells of make test-matrix
    python tests/training/measure_parity_spread.py --full --json /tmp/spread.json   # all 27

About 45 s a cell on two cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from host_matrix import cells, cell_env, cell_name  # noqa: E402

STEPS = (10, 20, 30, 40, 50, 100)

CHILD = """
import json, sys, torch
sys.path.insert(0, {here!r})
from test_train_convergence import train_both
fast, ref = train_both()
print(json.dumps(dict(capability=torch.backends.cpu.get_cpu_capability(), threads=torch.get_num_threads(),
                      fast=[h["loss"] for h in fast.history], ref=[h["loss"] for h in ref.history],
                      fast_eval=fast.evals[-1], ref_eval=ref.evals[-1])))
"""


def run_cell(cell: dict) -> dict:
    env = cell_env(cell, dict(os.environ, TRITON_INTERPRET="1"))
    p = subprocess.run([sys.executable, "-c", CHILD.format(here=str(HERE))], env=env, capture_output=True, text=True,
                       cwd=ROOT)
    if p.returncode != 0:
        raise RuntimeError(f"{cell_name(cell)} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def summarize(d: dict) -> dict:
    fl, rl = d["fast"], d["ref"]
    rel = [abs(a - b) / abs(b) for a, b in zip(fl, rl)]
    first = lambda t: next((i + 1 for i, r in enumerate(rel) if r > t), None)  # noqa: E731
    tail = lambda xs: sum(xs[-10:]) / 10  # noqa: E731
    fe, re_ = d["fast_eval"], d["ref_eval"]
    return dict(**{f"max_{k}": max(rel[:k]) for k in STEPS}, first_over_1e4=first(1e-4), first_over_1e3=first(1e-3),
                last10_rel=abs(tail(fl) - tail(rl)) / tail(rl),
                val_loss_rel=abs(fe["val_loss"] - re_["val_loss"]) / re_["val_loss"],
                val_acc_diff=abs(fe["val_acc"] - re_["val_acc"]), val_acc=(fe["val_acc"], re_["val_acc"]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="all 27 cells instead of the 9 of make test-matrix")
    p.add_argument("--json", help="write the per-cell losses and summaries here")
    args = p.parse_args(argv)
    out = []
    print(f"{'cell':<28} {'cap':<7} " + " ".join(f"{'max' + str(k):>8}" for k in STEPS) +
          f" {'>1e-4':>5} {'>1e-3':>5} {'last10':>8} {'vloss':>8} {'vacc':>6}", flush=True)
    for cell in cells(full=args.full):
        d = run_cell(cell)
        s = summarize(d)
        out.append(dict(cell=cell_name(cell), **d, summary=s))
        print(f"{cell_name(cell):<28} {d['capability']:<7} " + " ".join(f"{s[f'max_{k}']:8.1e}" for k in STEPS) +
              f" {s['first_over_1e4'] or '-':>5} {s['first_over_1e3'] or '-':>5} {s['last10_rel']:8.1e} "
              f"{s['val_loss_rel']:8.1e} {s['val_acc_diff']:6.4f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
