"""Tables and plots from benchmark rows: the console table of ``vitfast bench``, the README's
markdown tables (``benchmarks/render_readme.py``) and the throughput PNG. One formatter for all,
so the README shows exactly what the command printed."""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Optional, Sequence

__all__ = ["E2E_COLUMNS", "impl_label", "model_label", "e2e_display_rows", "table_notes", "mfu_shown", "spread", "NOISY_SPREAD",
           "format_text_table", "format_markdown_table", "plot_e2e"]

NOISY_SPREAD = 0.10  # a row whose p20-p80 spread exceeds 10% of its median time is marked noisy


def impl_label(row: Mapping[str, Any]) -> str:
    return f"{row['impl']}+compile" if row.get("compiled") else str(row["impl"])


def model_label(row: Mapping[str, Any], short: bool = False) -> str:
    """The model name, with the image size and depth when a run overrode them."""
    name = str(row["model"])
    img, depth = row.get("img_size"), row.get("depth")
    text = name.replace("vit_", "").replace("_patch", "/") if short else name
    if img and not name.endswith(f"_{img}"):
        text += f" @{img}px"
    if depth and row.get("depth_overridden"):
        text += f" depth {depth}"
    return text


def _num(fmt: str) -> Callable[[Any], str]:
    return lambda v: "-" if v is None else format(v, fmt)


def _speedup(v: Any) -> str:
    return "-" if v is None else f"{v:.2f}x"


def mfu_shown(row: Mapping[str, Any]) -> Optional[float]:
    """The row's MFU when its peak is a documented one (new rows say so in ``peak_documented``;
    older files: GPU peaks were an 8192^3 GEMM, CPU peaks a 1024^3 one, far below the cores' peak)
    in a dtype the row could reach: a GPU row in fp32 from before ``peak_dtype`` was recorded was
    quoted against a bf16 GEMM, and gets none."""
    if not row.get("peak_documented", row.get("device_kind") == "cuda"):
        return None
    if (row.get("device_kind") == "cuda" and row.get("dtype") == "fp32" and "peak_dtype" not in row
            and "--peak-tflops" not in str(row.get("peak_source", ""))):
        return None
    return row.get("mfu")


def _mfu(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.1f}%" + (" (>100%!)" if v > 1 else "")


def spread(row: Mapping[str, Any]) -> Optional[float]:
    """``(p80 - p20) / median`` of a timed row (None without timings)."""
    lo, mid, hi = row.get("ms_p20"), row.get("ms_median"), row.get("ms_p80")
    return None if lo is None or hi is None or not mid else (hi - lo) / mid


def _spread(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.1f}%" + (" noisy" if v > NOISY_SPREAD else "")


def _mem(v: Any) -> str:
    return "n/a" if v is None else f"{v:.2f}"


# (header, row key or callable, formatter)
E2E_COLUMNS: Sequence[tuple[str, Any, Callable[[Any], str]]] = (
    ("model", model_label, str),
    ("implementation", impl_label, str),
    ("mode", "mode", str),
    ("img/s", "img_per_s", _num(",.1f")),
    ("ms/batch", "ms_median", _num(".2f")),
    ("spread p20-p80", spread, _spread),
    ("speedup vs reference", "speedup_vs_reference", _speedup),
    ("TFLOP/s", "tflops", _num(".3g")),
    ("MFU", mfu_shown, _mfu),
    ("peak mem GiB", "peak_mem_gib", _mem),
)


def e2e_display_rows(rows: Sequence[Mapping[str, Any]], columns=E2E_COLUMNS) -> tuple[list[str], list[list[str]]]:
    """Headers and cells; the MFU column only when some row has a documented peak."""
    if not any(mfu_shown(r) is not None for r in rows):
        columns = [c for c in columns if c[0] != "MFU"]
    headers = [c[0] for c in columns]
    out = []
    for r in rows:
        status = r.get("status", "ok")
        cells = []
        for header, key, fmt in columns:
            v = key(r) if callable(key) else r.get(key)
            if status != "ok" and header not in ("model", "implementation", "mode"):
                cells.append(status.split(":")[0].upper() if header == "img/s" else "")
            else:
                cells.append(fmt(v))
        out.append(cells)
    return headers, out


def table_notes(rows: Sequence[Mapping[str, Any]], peak: Optional[Mapping[str, Any]]) -> list[str]:
    """The lines under an end-to-end table: what MFU is against (or why there is none), noisy rows."""
    notes = []
    if peak and peak.get("tflops") and any(mfu_shown(r) is not None for r in rows):
        notes.append(f"MFU against {peak['tflops']:.3g} TFLOP/s ({peak['source']}).")
    elif peak:
        notes.append(f"No MFU: {peak.get('source')}.")
    if any((mfu_shown(r) or 0) > 1 for r in rows):
        notes.append("MFU above 100% (marked !): the peak is below what the step reached, so it is not the device's "
                     "real peak.")
    noisy = [r for r in rows if (spread(r) or 0) > NOISY_SPREAD and r.get("status", "ok") == "ok"]
    if noisy:
        notes.append(f"{len(noisy)} row(s) marked noisy: their p20-p80 spread exceeds {100 * NOISY_SPREAD:.0f}% of the "
                     "median; treat their times and speed-ups with care (more --iters, a quieter machine).")
    notes.append("Speed-up against the eager reference: the median of the per-round ratios.")
    return notes


def format_text_table(headers: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    left = {0, 1, 2}

    def line(vals):
        return "  ".join(v.ljust(w) if i in left else v.rjust(w) for i, (v, w) in enumerate(zip(vals, widths)))

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in cells)])


def format_markdown_table(headers: Sequence[str], cells: Sequence[Sequence[str]], left: int = 3) -> str:
    align = [":--" if i < left else "--:" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in cells]
    return "\n".join(lines)


def plot_e2e(rows: Sequence[Mapping[str, Any]], path: os.PathLike | str, title: Optional[str] = None) -> str:
    """Grouped bars: img/s per model, one bar per implementation, one panel per mode; rows from
    several devices get one line of panels per device (each bar is one row's figure, never one
    card's standing in for another's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status", "ok") == "ok" and r.get("img_per_s")]
    devices = list(dict.fromkeys(r.get("device") for r in rows)) or [None]
    modes = list(dict.fromkeys(r["mode"] for r in rows)) or ["infer"]
    models = list(dict.fromkeys(model_label(r, short=True) for r in rows))
    impls = list(dict.fromkeys(impl_label(r) for r in rows))
    fig, axes = plt.subplots(len(devices), len(modes), squeeze=False,
                             figsize=(max(5.0, 1.6 + 1.9 * len(models)) * len(modes), 4.2 * len(devices)))
    width = 0.8 / max(1, len(impls))
    for line, device in zip(axes, devices):
        for ax, mode in zip(line, modes):
            for j, impl in enumerate(impls):
                xs, ys = [], []
                for i, model in enumerate(models):
                    hit = [r for r in ok if r["mode"] == mode and r.get("device") == device
                           and model_label(r, short=True) == model and impl_label(r) == impl]
                    if hit:
                        xs.append(i + (j - (len(impls) - 1) / 2) * width)
                        ys.append(hit[0]["img_per_s"])
                bars = ax.bar(xs, ys, width, label=impl)
                ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
            ax.set_xticks(range(len(models)))
            ax.set_xticklabels(models, fontsize=8)
            ax.set_ylabel("images / s (higher is better)")
            if len(devices) > 1:
                ax.set_title(f"{device}: {mode}", fontsize=9)
            else:
                ax.set_title(mode)
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
