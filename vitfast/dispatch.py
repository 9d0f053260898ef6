"""Measured dispatch: on CUDA, ``backend="auto"`` takes the path that was measured faster.

Every op with a Triton kernel and a plain-PyTorch path asks :func:`choose` before it runs, once
it knows the kernel could serve the input. The answer comes from a table keyed by

    (op, GPU name and compute capability, dtype, mode "infer" or "train", shape signature)

where the signature holds what decides speed: the width ``C`` and the row count ``rows`` for the
fused epilogues, the head dim ``D``, the length ``N`` and batch x heads ``BH`` for attention.
``C`` and ``D`` must match; ``rows``, ``N`` and ``BH`` take the nearest measured entry (in log2).
The patch embedding chooses between two vitfast implementations on CUDA: ``kernel`` is the fused
Triton kernel, ``torch`` the C++ three-kernel cuBLAS path; its signature is the width ``D``,
channels ``C``, patch ``p`` and ``u8`` (2: uint8 images, 1: float), which must match, and the
tokens per image ``T`` and batch ``B``.

Sources, first match wins:

1. the user's cache, ``~/.cache/vitfast/dispatch.json`` (``VITFAST_DISPATCH_CACHE`` moves it),
   written by tuning runs;
2. the defaults shipped in ``vitfast/data/dispatch_defaults.json``, generated from the committed
   GPU results by ``python benchmarks/make_dispatch_table.py`` (never edited by hand);
3. otherwise the kernel.

``VITFAST_DISPATCH=table`` (the default), ``kernel`` or ``torch`` overrides every choice. The
table is read when vitfast is imported and the choice is plain Python on shapes, so
``torch.compile`` and CUDA-graph capture see one fixed path; nothing is timed here. A cache file
that cannot be read, or has another schema, is ignored with a warning, never an error.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

SCHEMA = "vitfast-dispatch/1"
# a measured kernel is kept unless it was more than MARGIN slower than the torch path (a paired
# per-round ratio below 1 - MARGIN): a tie stays on the kernel (tuning and the shipped table)
MARGIN = 0.03
CHOICES = ("kernel", "torch")
MODES = ("infer", "train")
OVERRIDES = ("table", "kernel", "torch")
DEFAULTS_PATH = Path(__file__).resolve().parent / "data" / "dispatch_defaults.json"
# per op: the signature entries that must match exactly; the others are matched by nearest log2
# patch_embed: "kernel" is the fused Triton kernel, "torch" the C++ three-kernel cuBLAS path (both vitfast's, CUDA)
EXACT = {"patch_embed": ("D", "C", "p", "u8"),
         "attention": ("D",), "attention_packed": ("D",), "layer_norm": ("C",), "add_layer_norm": ("C",),
         "bias_gelu": ("C",), "bias_scale_residual": ("C",), "linear_bias_gelu": ("C", "K")}


def cache_path() -> Path:
    return Path(os.environ.get("VITFAST_DISPATCH_CACHE") or Path.home() / ".cache" / "vitfast" / "dispatch.json")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# filled when the table is loaded (at import), so that choose() is plain dictionary work that
# torch.compile traces without calling into CUDA
_DEVICE_KEYS: Dict[int, str] = {}


def _fill_device_keys() -> None:
    try:
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                major, minor = torch.cuda.get_device_capability(i)
                _DEVICE_KEYS[i] = f"{torch.cuda.get_device_name(i)} sm_{major}{minor}"
    except Exception:  # a broken CUDA setup: no key, every choice falls to the kernel
        pass


def device_key(device: torch.device) -> Optional[str]:
    """``"<GPU name> sm_<capability>"`` of a CUDA device (None off CUDA)."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _DEVICE_KEYS:
        _fill_device_keys()
    return _DEVICE_KEYS.get(index)


def validate(doc: Any, where: str) -> List[dict]:
    """The entries of a dispatch document; ValueError saying what is wrong otherwise."""
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise ValueError(f"{where}: not a {SCHEMA} document (schema {doc.get('schema') if isinstance(doc, dict) else None!r})")
    entries = doc.get("entries")
    if not isinstance(entries, list):
        raise ValueError(f"{where}: 'entries' must be a list")
    for i, e in enumerate(entries):
        ok = (isinstance(e, dict) and isinstance(e.get("op"), str) and isinstance(e.get("device"), str)
              and isinstance(e.get("dtype"), str) and e.get("mode") in MODES and e.get("choice") in CHOICES
              and isinstance(e.get("shape"), dict)
              and all(isinstance(v, (int, float)) and v > 0 for v in e["shape"].values()))
        if not ok:
            raise ValueError(f"{where}: entry {i} is malformed: {e!r}")
    return entries


class Table:
    """Dispatch entries from several sources; :meth:`lookup` finds the one for a call."""

    def __init__(self, sources: Sequence[Tuple[str, List[dict]]] = ()):
        self.sources = [name for name, _ in sources]
        self._by_key: Dict[tuple, List[dict]] = {}
        for name, entries in sources:  # earlier sources first: they win ties
            for e in entries:
                self._by_key.setdefault((e["op"], e["device"], e["dtype"], e["mode"]), []).append(
                    {**e, "source": e.get("source") or name})

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_key.values())

    def entries(self) -> List[dict]:
        return [e for v in self._by_key.values() for e in v]

    def lookup(self, op: str, device: str, dtype: str, mode: str, shape: Mapping[str, float]) -> Optional[dict]:
        """The entry for this call: same op, device, dtype, mode and exact keys; the nearest (sum of
        |log2| ratios) of the other keys; the first source on a tie. None: nothing measured."""
        best, best_d = None, math.inf
        for e in self._by_key.get((op, device, dtype, mode), ()):
            s = e["shape"]
            if any(s.get(k) != shape.get(k) for k in EXACT.get(op, ())):
                continue
            if set(s) != set(shape):
                continue
            d = sum(abs(math.log2(shape[k] / s[k])) for k in s if k not in EXACT.get(op, ()))
            if d < best_d:
                best, best_d = e, d
        return best


def _read(path: Path, quiet_missing: bool = True) -> Optional[List[dict]]:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        if not quiet_missing:
            warnings.warn(f"vitfast.dispatch: {path} does not exist", RuntimeWarning, stacklevel=3)
        return None
    except (OSError, ValueError) as e:
        warnings.warn(f"vitfast.dispatch: ignoring {path}: {type(e).__name__}: {e}", RuntimeWarning, stacklevel=3)
        return None
    try:
        return validate(doc, str(path))
    except ValueError as e:
        warnings.warn(f"vitfast.dispatch: ignoring {e}", RuntimeWarning, stacklevel=3)
        return None


def load_table() -> Table:
    """The user's cache (if any), then the shipped defaults."""
    sources = []
    user = cache_path()
    entries = _read(user)
    if entries:
        sources.append((f"cache:{user}", entries))
    entries = _read(DEFAULTS_PATH)
    if entries:
        sources.append(("shipped", entries))
    return Table(sources)


_TABLE: Optional[Table] = None
_OVERRIDE = "table"


def _read_override() -> str:
    v = os.environ.get("VITFAST_DISPATCH", "table").strip().lower() or "table"
    if v not in OVERRIDES:
        warnings.warn(f"vitfast.dispatch: ignoring VITFAST_DISPATCH={v!r} (expected one of {', '.join(OVERRIDES)})",
                      RuntimeWarning, stacklevel=3)
        return "table"
    return v


def table() -> Table:
    global _TABLE, _OVERRIDE
    if _TABLE is None:
        _TABLE, _OVERRIDE = load_table(), _read_override()
        _fill_device_keys()
    return _TABLE


def reload() -> Table:
    """Read the sources and VITFAST_DISPATCH again (after writing the cache, or changing either)."""
    global _TABLE
    _TABLE = None
    return table()


def override() -> str:
    """VITFAST_DISPATCH as read when the table was loaded: "table", "kernel" or "torch"."""
    table()
    return _OVERRIDE


_RECORD: Optional[Dict[tuple, int]] = None


class record:
    """``with dispatch.record() as seen:`` counts the choices made inside, as
    ``{(op, choice, source): count}`` (what ``vitfast bench`` stores with its rows). Eager calls
    count each time; under torch.compile a choice counts once, when it is traced."""

    def __enter__(self) -> Dict[tuple, int]:
        global _RECORD
        self._saved, _RECORD = _RECORD, {}
        return _RECORD

    def __exit__(self, *exc) -> None:
        global _RECORD
        _RECORD = self._saved


_CAPTURE: Optional[Dict[tuple, dict]] = None


class capture:
    """``with dispatch.capture() as calls:`` collects the distinct calls that asked for a choice
    inside, ``{key: dict(op, device, dtype, training, shape)}`` (what :mod:`vitfast.tuning` times)."""

    def __enter__(self) -> Dict[tuple, dict]:
        global _CAPTURE
        self._saved, _CAPTURE = _CAPTURE, {}
        return _CAPTURE

    def __exit__(self, *exc) -> None:
        global _CAPTURE
        _CAPTURE = self._saved


class forced:
    """``with dispatch.forced("kernel" | "torch"):`` every choice inside takes that path, as
    ``VITFAST_DISPATCH`` would (tuning times both paths of an op through the op itself)."""

    def __init__(self, mode: str):
        if mode not in OVERRIDES:
            raise ValueError(f"dispatch.forced: mode must be one of {', '.join(OVERRIDES)}, got {mode!r}")
        self.mode = mode

    def __enter__(self) -> None:
        global _OVERRIDE
        table()
        self._saved, _OVERRIDE = _OVERRIDE, self.mode

    def __exit__(self, *exc) -> None:
        global _OVERRIDE
        _OVERRIDE = self._saved


def decide(speedup: float, margin: float = MARGIN) -> str:
    """The choice for a kernel measured ``speedup`` times as fast as the torch path."""
    return "torch" if speedup < 1 - margin else "kernel"


def choose(op: str, device: torch.device, dtype: torch.dtype, training: bool, shape: Mapping[str, float]) -> str:
    """``"kernel"`` or ``"torch"`` for a call the kernel can serve (see the module docstring)."""
    if _CAPTURE is not None and not torch.compiler.is_compiling():
        ckey = (op, str(device), dtype, bool(training), tuple(sorted(shape.items())))
        _CAPTURE.setdefault(ckey, dict(op=op, device=device, dtype=dtype, training=bool(training), shape=dict(shape)))
    mode = override()
    source = "VITFAST_DISPATCH"
    if mode == "table":
        dev = device_key(device)
        hit = table().lookup(op, dev, dtype_name(dtype), "train" if training else "infer", shape) if dev else None
        mode, source = (hit["choice"], hit["source"]) if hit else ("kernel", "default")
    if torch.compiler.is_compiling():  # tested first, so that Dynamo never reads (guards on) _RECORD
        _record_traced(op, mode, source)
    elif _RECORD is not None:
        _count(op, mode, source)
    return mode


def _count(op: str, mode: str, source: str) -> None:
    if _RECORD is not None:
        key = (op, mode, source)
        _RECORD[key] = _RECORD.get(key, 0) + 1


@torch.compiler.assume_constant_result
def _record_traced(op: str, mode: str, source: str) -> str:
    """:func:`_count` for a choice torch.compile traces: compiled code never asks again, so the
    trace's choice is counted, once per trace. Dynamo calls a constant-result function for real
    at trace time instead of tracing into it (a traced write to the global dict would be replayed
    at run time and guard on the dict: a recompile whenever a record opens or closes)."""
    _count(op, mode, source)
    return mode


def training_call(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether a call builds a graph for backward (the "train" entries apply)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def describe(tbl: Optional[Table] = None, device: Optional[str] = None) -> str:
    """The table in force, one line per entry (``vitfast info``)."""
    tbl = tbl or table()
    lines = [f"dispatch: VITFAST_DISPATCH={override()}; sources: {', '.join(tbl.sources) or 'none'}; "
             f"{len(tbl)} entries" + (f" (showing {device})" if device else "")]
    for e in sorted(tbl.entries(), key=lambda e: (e["device"], e["op"], e["dtype"], e["mode"], sorted(e["shape"].items()))):
        if device and e["device"] != device:
            continue
        shape = ",".join(f"{k}={v}" for k, v in sorted(e["shape"].items()))
        why = f" ({e['note']})" if e.get("note") else ""
        lines.append(f"  {e['device']:<24} {e['op']:<20} {e['dtype']:<9} {e['mode']:<5} {shape:<28} -> "
                     f"{e['choice']:<6} [{e['source']}]{why}")
    return "\n".join(lines)


def write_cache(entries: Iterable[dict], path: Optional[Path] = None) -> Path:
    """Merge ``entries`` into the user's cache (same key and shape replaced) and reload."""
    path = Path(path) if path else cache_path()
    old = _read(path) or []
    new = list(entries)
    validate({"schema": SCHEMA, "entries": new}, "new entries")
    key = lambda e: (e["op"], e["device"], e["dtype"], e["mode"], tuple(sorted(e["shape"].items())))  # noqa: E731
    merged = {key(e): e for e in old}
    merged.update({key(e): e for e in new})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"schema": SCHEMA, "entries": list(merged.values())}, indent=1) + "\n")
    tmp.replace(path)
    reload()
    return path
