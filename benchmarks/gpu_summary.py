"""The results table at the end of benchmarks/gpu_check.sh: what each JSON in OUT says, briefly.

    python benchmarks/gpu_summary.py benchmarks/results/latest

e2e (``vitfast bench``): a row per model, implementation and mode. Attention candidates: per shape,
the best candidate and the worst error of every kernel kind its rows contain (in the order that
``vitfast.cli.kernels.attention_candidates`` writes them, its ``KINDS``; no list of kinds here),
the autotuned kernel against the best SDPA backend, and the backward and forward variants. Kernels
(``vitfast bench kernels``): vitfast's rows with their figures.
"""

from __future__ import annotations

import glob
import json
import sys
from typing import Iterable, List


def kinds_of(rows: Iterable[dict]) -> List[str]:
    """The candidate kernel kinds present in ``rows`` (one shape's), in the order the candidates
    script wrote them: its KINDS, less those that cannot serve the shape."""
    kinds: List[str] = []
    for r in rows:
        if r.get("op") == "attention_candidate" and r.get("kernel") not in kinds:
            kinds.append(r["kernel"])
    return kinds


def e2e(path: str) -> None:
    doc = json.load(open(path))
    env = doc["env"]
    print(f"e2e {env['device']} torch {env['torch']} triton {env['triton']} ({path})")
    print(f"  {'model':<22} {'impl':<18} {'mode':<5} {'img/s':>9} {'ms':>8} {'vs ref':>7} {'TFLOP/s':>8} {'MFU':>6} {'GiB':>6}")
    for r in doc["rows"]:
        impl = r["impl"] + ("+compile" if r.get("compiled") else "")
        if r["status"] != "ok":
            print(f"  {r['model']:<22} {impl:<18} {r['mode']:<5} {r['status'][:60]}")
            continue
        sp = f"{r['speedup_vs_reference']:.2f}x" if r.get("speedup_vs_reference") else "-"
        mem = f"{r['peak_mem_gib']:.1f}" if r.get("peak_mem_gib") is not None else "-"
        print(f"  {r['model']:<22} {impl:<18} {r['mode']:<5} {r['img_per_s']:9.0f} {r['ms_median']:8.2f} {sp:>7} "
              f"{r['tflops']:8.1f} {100 * r['mfu']:5.1f}% {mem:>6}")


def candidates(path: str) -> None:
    doc = json.load(open(path))
    print(f"attention candidates ({path}): {doc.get('precompile', '')}")
    groups: dict = {}
    for r in doc["rows"]:
        groups.setdefault((r["B"], r["H"], r["N"], r["D"], r["dtype"]), []).append(r)
    for key, rs in groups.items():
        parts = []
        for kind in kinds_of(rs):
            ok = [r for r in rs if r["op"] == "attention_candidate" and r["kernel"] == kind and r["status"] == "ok"]
            if ok:
                best = min(ok, key=lambda r: r["ms"])
                worst = max(ok, key=lambda r: r["err"])
                parts.append(f"{kind} best {best['ms']:.3f} ms ({best['config']}) of {len(ok)}, "
                             f"worst err {worst['err']:.1e} (sdpa {worst['sdpa_err']:.1e})")
        tuned = [f"{r['mode']} {r['vs_best_sdpa']:.2f}x {r['best_sdpa']}" for r in rs
                 if r["op"] == "attention" and r["backend"] == "vitfast" and r.get("vs_best_sdpa")]
        print("  " + " ".join(map(str, key)) + ": " + "; ".join(parts)
              + (" | autotuned vs best SDPA: " + ", ".join(tuned) if tuned else ""))
        variants = [f"{r['bwd']}{' (auto)' if r['auto'] else ''} {r['ms']:.3f} ms x{r['x_best']}"
                    for r in rs if r["op"] == "attention_bwd_variant"]
        if variants:
            print("    backward variants (best candidates summed): " + ", ".join(variants))
        fwd = [f"{r['fwd']}{' (auto)' if r['auto'] else ''} {r['ms']:.3f} ms x{r['x_best']}"
               for r in rs if r["op"] == "attention_fwd_variant"]
        if fwd:
            print("    forward variants (best candidate each): " + ", ".join(fwd))


def kernels(path: str) -> None:
    doc = json.load(open(path))
    print(f"kernels ({path}): {doc.get('benchmarks')}")
    for r in doc["rows"]:
        if r.get("backend", r.get("impl")) != "vitfast":
            continue
        keys = [k for k in ("benchmark", "B", "H", "N", "D", "model", "batch", "input", "dtype", "mode") if k in r]
        if r.get("status", "ok") != "ok":
            print("  " + " ".join(str(r[k]) for k in keys) + f"  {r['status'][:70]}")
            continue
        figs = [f"{k}={r[k]}" for k in ("ms", "tflops", "gbps", "vs_best_sdpa", "best_sdpa", "speedup_vs_eager",
                                         "speedup_vs_compile", "x_roofline_floor") if r.get(k) is not None]
        print("  " + " ".join(str(r[k]) for k in keys) + "  " + " ".join(figs))


def main(out: str) -> int:
    shows = (("*_e2e.json", e2e), ("*_attention_candidates.json", candidates), ("*_kernels.json", kernels))
    for pattern, show in shows:
        for path in sorted(glob.glob(f"{glob.escape(out)}/{pattern}")):
            show(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/latest"))
