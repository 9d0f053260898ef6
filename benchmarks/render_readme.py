"""Render the README's benchmark section from ``benchmarks/results/*.json``.

Writes only between ``<!-- bench:begin -->`` and ``<!-- bench:end -->`` in README.md, plus the
throughput plot (PNG, one line of panels per card). GPU runs are shown when there are any (the
latest run per card); until then the latest CPU run, labelled CPU, under a line saying that no
GPU end-to-end run exists yet; each kernel table is a GPU run where a card ran it, else a CPU
run with (CPU) in its heading. Every table names its device, versions, date, command and
source file: nothing is typed by hand.

    python benchmarks/render_readme.py            # rewrite README.md and the plot
    python benchmarks/render_readme.py --check    # exit 1 if README.md is not what the results give
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from vitfast.cli.report import NOISY_SPREAD, e2e_display_rows, format_markdown_table, mfu_shown, plot_e2e, spread

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
PLOT_NAME = "e2e_throughput.png"
# generic kernel tables: these columns, in this order, where the rows have them
KERNEL_COLUMNS = ("op", "backend", "impl", "B", "H", "N", "D", "model", "batch", "input", "dtype", "mode", "ms",
                  "tflops", "gbps", "status", "error")


def load(results: Path) -> list[dict]:
    """Every results file in ``results`` (not its subfolders), as {"path", "kind", "env", "rows"}.
    Rows marked ``noisy: true`` (measured on a busy machine with ``--allow-noisy``) are left out,
    and so is a file with nothing else."""
    docs = []
    for p in sorted(results.glob("*.json")):
        try:
            data = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"render_readme: skipping {p}: {e}", file=sys.stderr)
            continue
        if isinstance(data, list):  # a microbenchmark's own list of rows
            rows = [r for r in data if isinstance(r, dict)]
            env = {k: rows[0].get(k) for k in ("device", "torch", "triton", "cuda", "vitfast", "date", "command")} if rows else {}
            env["device_kind"] = "cpu" if str(env.get("device", "")).lower().startswith("cpu") else "cuda"
            docs.append({"path": p, "kind": "kernels", "env": env, "rows": rows, "smoke": False})
        elif isinstance(data, dict) and "rows" in data:
            docs.append({"path": p, "kind": data.get("kind", "unknown"), "env": data.get("env", {}), "rows": data["rows"],
                         "smoke": bool(data.get("smoke")), "peak": data.get("peak")})
    for d in docs:
        d["rows"] = [r for r in d["rows"] if not r.get("noisy")]
    return [d for d in docs if d["rows"]]


def _latest_per_device(docs: Sequence[dict]) -> list[dict]:
    best: dict = {}
    for d in docs:
        key = d["env"].get("device")
        if key not in best or str(d["env"].get("date", "")) >= str(best[key]["env"].get("date", "")):
            best[key] = d
    return sorted(best.values(), key=lambda d: str(d["env"].get("device")))


def _rel(p: Path, readme: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(readme.resolve().parent))
    except ValueError:
        return str(p)


def _caption(doc: dict, readme: Path) -> str:
    env = doc["env"]
    rows = doc["rows"]
    r0 = rows[0] if rows else {}
    label = "CPU" if env.get("device_kind") == "cpu" else env.get("device", "?")
    bits = [f"**{label}**" + (f" ({env.get('device')}, {env.get('cpu_threads')} threads)" if env.get("device_kind") == "cpu" else "")]
    if r0.get("batch_size"):
        bits.append(f"batch {r0['batch_size']}, {r0.get('dtype')}, input {r0.get('input')}")
    bits.append(f"torch {env.get('torch')}, triton {env.get('triton')}, vitfast {env.get('vitfast')}")
    bits.append(str(env.get("date", "")))
    load = env.get("loadavg_1m_start", env.get("loadavg_1m"))
    if env.get("device_kind") == "cpu" and load is not None:
        end = f" at the start, {env['loadavg_1m_end']} at the end" if env.get("loadavg_1m_end") is not None else ""
        bits.append(f"load average {load}{end} on {env.get('cores', '?')} cores; implementations timed alternately")
    text = "; ".join(bits) + "."
    text += f" Command: `{env.get('command')}`; data: [`{_rel(doc['path'], readme)}`]({_rel(doc['path'], readme)})."
    peak = doc.get("peak")
    if peak and peak.get("tflops") and any(mfu_shown(r) is not None for r in rows):
        text += f" MFU against {peak['tflops']:.3g} TFLOP/s ({peak['source']})."
    if any((spread(r) or 0) > NOISY_SPREAD for r in rows if r.get("status", "ok") == "ok"):
        text += (f" Rows marked noisy have a p20-p80 spread above {100 * NOISY_SPREAD:.0f}% of their median time.")
    if any(r.get("cuda_graph") and r.get("peak_mem_gib") is not None and "peak_mem_covers" not in r for r in rows):
        text += (" Peak memory of the CUDA-graph inference rows was read after the capture (a run from before "
                 "`peak_mem_covers` was recorded): it leaves out the activations, which the graph's pool holds.")
    return text


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _attention_table(rows: Sequence[dict]) -> str:
    """One line per (shape, dtype, mode): vitfast against the fastest SDPA backend that ran."""
    key = lambda r: (r.get("B"), r.get("H"), r.get("N"), r.get("D"), r.get("dtype"), r.get("mode"))  # noqa: E731
    best: dict = {}
    for r in rows:
        if r.get("backend") != "vitfast" and r.get("tflops") and r.get("tflops") > best.get(key(r), {}).get("tflops", 0):
            best[key(r)] = r
    headers = ["B", "H", "N", "D", "dtype", "mode", "vitfast ms", "vitfast TFLOP/s", "best SDPA", "its TFLOP/s",
               "vitfast / best"]
    cells = []
    for r in rows:
        if r.get("backend") != "vitfast":
            continue
        b = best.get(key(r), {})
        ok = r.get("status") == "ok"
        ratio = f"{r['tflops'] / b['tflops']:.2f}x" if ok and b else "-"
        cells.append([_cell(r.get(k)) for k in ("B", "H", "N", "D", "dtype", "mode")] +
                     [_cell(r.get("ms")) if ok else r.get("status", "?"), _cell(r.get("tflops")),
                      b.get("backend", "-"), _cell(b.get("tflops")), ratio])
    return format_markdown_table(headers, cells, left=6)


def _patch_embed_table(rows: Sequence[dict]) -> str:
    """vitfast's rows: time, rates, speed-ups over the three chains, distance to the roofline."""
    cols = [("model", "model"), ("batch", "batch"), ("input", "input"), ("dtype", "dtype"), ("mode", "mode"),
            ("ms", "ms"), ("GB/s", "gbps"), ("TFLOP/s", "tflops"), ("vs eager", "speedup_vs_eager"),
            ("vs compile", "speedup_vs_compile"), ("vs unfold+linear", "speedup_vs_unfold_linear"),
            ("vs best chain", "speedup_vs_best_chain"), ("x roofline floor", "x_roofline_floor")]
    chains = ("speedup_vs_eager", "speedup_vs_compile", "speedup_vs_unfold_linear")

    def fmt(r: dict, k: str) -> str:
        if r.get("status", "ok") != "ok" and k not in ("model", "batch", "input", "dtype", "mode"):
            return r.get("status", "?") if k == "ms" else ""
        v = r.get(k)
        if k == "speedup_vs_best_chain":  # the target: >= 1.0x the fastest torch chain timed
            timed = [r[c] for c in chains if isinstance(r.get(c), (int, float))]
            v = min(timed) if timed else None
        return f"{v:.2f}x" if k.startswith(("speedup", "x_")) and isinstance(v, (int, float)) else _cell(v)

    cells = [[fmt(r, k) for _, k in cols] for r in rows if r.get("impl", r.get("backend")) == "vitfast"]
    return format_markdown_table([h for h, _ in cols], cells, left=5)


FUSED_OPS = ("add_layer_norm", "layer_norm", "bias_gelu", "bias_scale_residual")


def _fused_table(rows: Sequence[dict]) -> str:
    """vitfast's rows of one fused op: time, bandwidth against the measured copy rate, and the
    per-round speed-ups over eager PyTorch and torch.compile timed in the same run."""
    cols = [("model", "model"), ("batch", "batch"), ("width", "width"), ("dtype", "dtype"), ("mode", "mode"),
            ("ms", "ms"), ("GB/s", "gbps"), ("of copy", "frac_of_copy"), ("vs eager", "speedup_vs_eager"),
            ("vs compile", "speedup_vs_compile")]

    def fmt(r: dict, k: str) -> str:
        if r.get("status", "ok") != "ok" and k not in ("model", "batch", "width", "dtype", "mode"):
            return r.get("status", "?") if k == "ms" else ""
        v = r.get(k)
        if k == "frac_of_copy" and isinstance(v, (int, float)):
            return f"{100 * v:.0f}%"
        return f"{v:.2f}x" if k.startswith("speedup") and isinstance(v, (int, float)) else _cell(v)

    cells = [[fmt(r, k) for _, k in cols] for r in rows if r.get("impl", r.get("backend")) == "vitfast"]
    return format_markdown_table([h for h, _ in cols], cells, left=5)


def _candidates_table(rows: Sequence[dict]) -> str:
    """One line per (shape, dtype): for each attention kernel, the fastest candidate config, its
    time, how much slower the untuned default (the first survivor) is, and the number timed."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["B"], r["H"], r["N"], r["D"], r["dtype"]), []).append(r)
    headers = ["B", "H", "N", "D", "dtype"]
    for kind in ("fwd", "dkdv", "dq"):
        headers += [f"{kind} best config", f"{kind} ms", f"{kind} default / best"]
    headers.append("max error vs SDPA's")
    cells = []
    for key, rs in groups.items():
        line = [_cell(k) for k in key]
        worst = 0.0
        for kind in ("fwd", "dkdv", "dq"):
            ok = [r for r in rs if r.get("kernel") == kind and r.get("status") == "ok"]
            if not ok:
                line += ["-", "-", "-"]
                continue
            best = min(ok, key=lambda r: r["ms"])
            first = next((r for r in ok if r.get("first")), best)
            line += [f"{best['config']} (of {len(ok)})", _cell(best["ms"]), f"{first['ms'] / best['ms']:.2f}x"]
            worst = max([worst] + [r["err"] / r["sdpa_err"] for r in ok if r.get("sdpa_err")])
        line.append(f"{worst:.2f}x")
        cells.append(line)
    return format_markdown_table(headers, cells, left=5)


def _memory_status(r: dict) -> str:
    """``ok``, or why the row has no figure (older rows carry only ``error``)."""
    status = r.get("status") or ("ok" if r.get("error") is None and r.get("peak_extra_bytes") is not None else "failed")
    if status != "ok" and r.get("error"):
        return f"{status}: {r['error']}" if not str(r["error"]).startswith(status) else str(r["error"])
    return status


def _memory_table(rows: Sequence[dict]) -> str:
    """Peak attention memory (``vitfast.cli.kernels.memory``): the extra peak above the inputs,
    in MiB and in N x N score matrices of the batch (~0: scores kept on chip; >= 1:
    materialised), and its growth from the previous N (2 linear, 4 quadratic); a failed row
    says why instead."""
    cols = [("impl", "impl"), ("mode", "mode"), ("B", "B"), ("H", "H"), ("N", "N"), ("D", "D"), ("dtype", "dtype"),
            ("extra peak MiB", "peak_extra_bytes"), ("x one N×N", "extra_per_nxn"),
            ("growth vs previous N", "growth_vs_prev_N"), ("status", None)]
    keys = ("impl", "mode", "B", "H", "N", "D", "dtype")

    def fmt(r: dict, k: Optional[str]) -> str:
        status = _memory_status(r)
        if k is None:
            return status
        if status != "ok" and k not in keys:
            return ""
        v = r.get(k)
        if k == "peak_extra_bytes" and isinstance(v, (int, float)):
            return f"{v / 2**20:,.1f}"
        if k == "growth_vs_prev_N" and isinstance(v, (int, float)):
            return f"{v:.2f}x"
        return _cell(v)

    return format_markdown_table([h for h, _ in cols], [[fmt(r, k) for _, k in cols] for r in rows], left=7)


def _plot_title(doc: dict) -> str:
    env, r0 = doc["env"], (doc["rows"] or [{}])[0]
    where = f"CPU, {env.get('cpu_threads')} thread(s)" if env.get("device_kind") == "cpu" else str(env.get("device"))
    return f"{where}, batch {r0.get('batch_size')}, {r0.get('dtype')}, {str(env.get('date', ''))[:10]}"


def _kernel_table(name: str, rows: Sequence[dict]) -> str:
    if name == "attention" and any(r.get("backend") == "vitfast" for r in rows):
        return _attention_table(rows)
    if name == "patch_embed" and any(r.get("impl") == "vitfast" for r in rows):
        return _patch_embed_table(rows)
    if name in FUSED_OPS and any(r.get("impl") == "vitfast" for r in rows):
        return _fused_table(rows)
    if name == "attention_candidate":
        return _candidates_table(rows)
    if any("peak_extra_bytes" in r for r in rows):
        return _memory_table(rows)
    cols = [c for c in KERNEL_COLUMNS if any(c in r for r in rows)]
    return format_markdown_table(cols, [[_cell(r.get(c)) for c in cols] for r in rows], left=0)


def render(docs: Sequence[dict], readme: Path, plot_path: Path, write_plot: bool = True) -> str:
    """The markdown between the markers; the plot is written to ``plot_path`` if ``write_plot``."""
    e2e = [d for d in docs if d["kind"] == "e2e" and d["rows"]]
    gpu = [d for d in e2e if d["env"].get("device_kind") == "cuda"]
    cpu = [d for d in e2e if d["env"].get("device_kind") == "cpu"]
    out: list[str] = []
    if gpu:
        shown = _latest_per_device(gpu)
    else:
        shown = _latest_per_device(cpu)[-1:]
        out.append("No GPU end-to-end run has been recorded yet: the end-to-end figures below were measured on a CPU "
                   "and are labelled CPU; each kernel table names the device it ran on. GPU figures come from "
                   "`benchmarks/gpu_check.sh` on a GPU machine.")
    if not shown:
        out.append("No end-to-end results yet (`vitfast bench --json benchmarks/results/`).")
    out.append("")
    for doc in shown:
        out.append("### End to end: `vitfast bench`" + (" (CPU)" if doc["env"].get("device_kind") == "cpu" else ""))
        out.append("")
        out.append(_caption(doc, readme))
        out.append("")
        headers, cells = e2e_display_rows(doc["rows"])
        out.append(format_markdown_table(headers, cells))
        out.append("")
    if shown:
        if write_plot:
            plot_e2e([r for d in shown for r in d["rows"]], plot_path,
                     title=" | ".join(_plot_title(d) for d in shown))
        out.append(f"![throughput]({_rel(plot_path, readme)})")
        out.append("")
    # kernel results: `vitfast bench kernels` files, or a microbenchmark's own JSON. GPU runs, the
    # latest per (benchmark, card); a benchmark with no GPU run shows its latest CPU run, labelled
    # CPU. Smoke runs (tiny shapes that only check a script) are never shown.
    latest: dict = {}
    for d in docs:
        if d["kind"] in ("e2e", "profile") or d["smoke"]:
            continue
        by_bench: dict = {}
        for r in d["rows"]:
            if not r.get("smoke"):
                by_bench.setdefault(r.get("op") or r.get("benchmark") or d["kind"], []).append(r)
        for name, rows in by_bench.items():
            k = (name, d["env"].get("device_kind") == "cuda", d["env"].get("device"))
            if k not in latest or str(d["env"].get("date", "")) >= str(latest[k][0]["env"].get("date", "")):
                latest[k] = (d, rows)
    gpu_benches = {name for (name, on_gpu, _) in latest if on_gpu}
    cpu_latest: dict = {}
    for (name, on_gpu, _), (d, rows) in latest.items():
        if not on_gpu and name not in gpu_benches:
            if name not in cpu_latest or str(d["env"].get("date", "")) >= str(cpu_latest[name][0]["env"].get("date", "")):
                cpu_latest[name] = (d, rows)
    shown_kernels = sorted([(k[0], k[2] or "", v) for k, v in latest.items() if k[1]] +
                           [(name, "", v) for name, v in cpu_latest.items()], key=lambda t: (t[0], t[1]))
    for name, _, (doc, rows) in shown_kernels:
        cpu_label = " (CPU)" if doc["env"].get("device_kind") != "cuda" else ""
        out.append(f"### Kernels: {name}{cpu_label}")
        out.append("")
        out.append(_caption(doc, readme))
        out.append("")
        out.append(_kernel_table(name, rows))
        out.append("")
    if not gpu_benches:
        out.append("Kernel microbenchmarks (`vitfast bench kernels`): no GPU run recorded yet.")
        out.append("")
    out.append("Regenerate: `vitfast bench --json benchmarks/results/` (or `bash benchmarks/gpu_check.sh` on a GPU, "
               "then copy its JSON from `benchmarks/results/latest/`), then `python benchmarks/render_readme.py`.")
    return "\n".join(out).strip() + "\n"


def splice(text: str, body: str) -> str:
    if BEGIN not in text or END not in text or text.index(BEGIN) > text.index(END):
        raise ValueError(f"README has no {BEGIN} ... {END} section to fill")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{body}{END}{tail}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--readme", type=Path, default=ROOT / "README.md")
    p.add_argument("--plot", type=Path, default=None, help=f"PNG to write (default: <results>/{PLOT_NAME})")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if README.md is out of date")
    args = p.parse_args(argv)
    plot = args.plot or args.results / PLOT_NAME
    docs = load(args.results)
    try:
        old = args.readme.read_text()
        new = splice(old, render(docs, args.readme, plot, write_plot=not args.check))
    except (OSError, ValueError) as e:
        print(f"render_readme: {args.readme}: {e}", file=sys.stderr)
        return 1
    if args.check:
        if new != old:
            print("render_readme: README.md is out of date: run python benchmarks/render_readme.py", file=sys.stderr)
            return 1
        print("render_readme: README.md is up to date")
        return 0
    if new != old:
        args.readme.write_text(new)
    print(f"render_readme: wrote {args.readme} from {len(docs)} results file(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
