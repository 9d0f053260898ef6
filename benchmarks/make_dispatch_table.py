"""Generate vitfast/data/dispatch_defaults.json (the shipped dispatch table) from the committed
GPU results in benchmarks/results/: never edit that file by hand.

For every GPU row of vitfast's kernel with a timed plain-PyTorch counterpart in the same run:

* the fused epilogues (``vitfast bench kernels``, benchmark "fused"): against eager PyTorch (the
  ops' reference path), ``speedup_vs_eager``; key C = width, rows = M;
* attention (``python -m vitfast.cli.kernels.attention_candidates``, the autotuned rows): against
  SDPA's flash backend, the one ``F.scaled_dot_product_attention`` (the reference path) takes first
  on sm_90 by PyTorch's priority order (flash, efficient, math, cuDNN); key D, N, BH = B * H, for
  ``attention`` and ``attention_packed`` (the same kernels).

Mode "infer" comes from forward rows, "train" from forward+backward rows. The kernel is kept
unless it was more than ``MARGIN`` slower (a per-round paired ratio below 1 - MARGIN): a tie stays
on the kernel. Noisy and smoke rows are skipped; the latest run per (device, op, key) wins.

    python benchmarks/make_dispatch_table.py            # rewrite the shipped table
    python benchmarks/make_dispatch_table.py --check    # exit 1 if it is not what the results give
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vitfast.dispatch import DEFAULTS_PATH, MARGIN, SCHEMA, decide, validate  # noqa: E402

FUSED_OPS = ("layer_norm", "add_layer_norm", "bias_gelu", "bias_scale_residual")
MODES = {"fwd": "infer", "fwd+bwd": "train"}
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _device(row: dict) -> Optional[str]:
    cc = row.get("compute_capability")
    if row.get("device_kind") != "cuda" or not cc:
        return None
    return f"{row['device']} sm_{str(cc).replace('.', '')}"


def _entry(op, device, row, shape, ratio, versus, source) -> dict:
    choice = decide(ratio, MARGIN)
    return dict(op=op, device=device, dtype=DTYPES.get(row["dtype"], row["dtype"]), mode=MODES[row["mode"]],
                shape=shape, choice=choice, source=f"shipped:{source}",
                note=f"kernel {ratio:.2f}x {versus}, {str(row.get('date', ''))[:10]}")


def entries_from(doc: dict, name: str) -> list[dict]:
    out = []
    if doc.get("smoke"):
        return out
    for r in doc.get("rows", []):
        if r.get("noisy") or r.get("smoke") or r.get("status", "ok") != "ok" or r.get("mode") not in MODES:
            continue
        device = _device(r)
        if device is None:
            continue
        if r.get("op") in FUSED_OPS and r.get("impl") == "vitfast" and r.get("speedup_vs_eager"):
            out.append(_entry(r["op"], device, r, {"C": r["width"], "rows": r["M"]}, r["speedup_vs_eager"],
                              "eager", name))
        elif r.get("op") == "attention" and r.get("backend") == "vitfast" and r.get("speedup_vs_flash"):
            shape = {"D": r["D"], "N": r["N"], "BH": r["B"] * r["H"]}
            for op in ("attention", "attention_packed"):
                out.append(_entry(op, device, r, dict(shape), r["speedup_vs_flash"], "SDPA flash", name))
    return out


def build(results: Path) -> dict:
    latest: dict = {}
    for path in sorted(results.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(doc, dict):
            continue
        date = str(doc.get("env", {}).get("date", ""))
        for e in entries_from(doc, path.name):
            key = (e["op"], e["device"], e["dtype"], e["mode"], tuple(sorted(e["shape"].items())))
            if key not in latest or date >= latest[key][0]:
                latest[key] = (date, e)
    entries = [e for _, (_, e) in sorted(latest.items())]
    doc = {"schema": SCHEMA, "generated_by": "benchmarks/make_dispatch_table.py", "margin": MARGIN, "entries": entries}
    validate(doc, "generated table")
    return doc


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--out", type=Path, default=DEFAULTS_PATH)
    p.add_argument("--check", action="store_true", help="exit 1 if --out differs from what the results give")
    args = p.parse_args(argv)
    text = json.dumps(build(args.results), indent=1) + "\n"
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != text:
            print(f"make_dispatch_table: {args.out} is stale; run python benchmarks/make_dispatch_table.py",
                  file=sys.stderr)
            return 1
        print(f"make_dispatch_table: {args.out} is up to date")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    n = len(json.loads(text)["entries"])
    torch_n = text.count('"choice": "torch"')
    print(f"make_dispatch_table: wrote {args.out} ({n} entries, {torch_n} on the torch path)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
