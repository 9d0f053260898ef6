"""Checkpoints that let a run continue exactly where it stopped.

Layout of ``<dir>/step_<N>/`` (written to ``step_<N>.tmp`` and renamed once every rank is done,
so a directory named ``step_<N>`` is always complete):

* ``state.pt`` (DDP): the model's plain ``state_dict`` and the optimizer's, written by rank 0;
* ``dcp/`` (FSDP): ``torch.distributed.checkpoint`` of the sharded model and optimizer
  (``get_state_dict``/``set_state_dict``), each rank writing its own shards;
* ``meta.pt``: step, LR scheduler, grad scaler, the run's arguments, the distributed mode and
  world size;
* ``rng/rank<R>.pt``: each rank's torch (CPU and CUDA) and Python RNG states.

Every file is read back with ``torch.load(weights_only=True)``: resuming never runs code pickled
into a checkpoint (what is saved is tensors, numbers, strings, None and containers of them). The
FSDP ``dcp/`` folder is read with ``torch.distributed.checkpoint``, which unpickles its
``.metadata`` with plain ``pickle`` and its non-tensor items with ``weights_only=False``; so the
``.metadata`` is first checked with an unpickler that only resolves DCP's own metadata classes,
and non-tensor items must load with ``weights_only=True`` before DCP reads them.

Data order needs no state: batches are a function of ``(seed, step)`` (see
``vitfast.training.data.StepBatchSampler``).
"""

from __future__ import annotations

import argparse
import os
import pickle
import random
import re
import shutil
import warnings
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from .dist import DistEnv, unwrap

__all__ = ["save_checkpoint", "resume_checkpoint", "find_latest", "list_checkpoints", "checkpoint_step",
           "CheckpointError"]

_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, or from an incompatible run."""


def _rng_state(env: DistEnv) -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if env.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(env.device)
    return state


def _safe_load(path: str, map_location: Any) -> Any:
    """``torch.load(weights_only=True)``: a file holding anything but tensors and plain data is
    refused with a :class:`CheckpointError` (unpickling it could run arbitrary code)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"checkpoint file {path!r} holds objects other than tensors and plain data; vitfast refuses to "
            f"unpickle it (that could run arbitrary code). torch.load(weights_only=True) said: {e}"
        ) from e


def _refuse(path: str, what: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint file {path!r} holds {what}; vitfast refuses to unpickle it (that could run arbitrary code)"
    )


_PATH_CLASSES = {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"}


class _DcpMetadataUnpickler(pickle.Unpickler):
    """Resolves only what a torch.distributed.checkpoint ``.metadata`` file needs: DCP's metadata
    classes, ``torch.Size``, torch dtypes, layouts and paths. Anything else (``exec``, ``os.system``,
    ...) raises before it is imported or called."""

    def find_class(self, module: str, name: str) -> Any:
        ok = (
            (module.startswith("torch.distributed.checkpoint.") and not name.startswith("__"))
            or (module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)))
            or (module == "torch.serialization" and name == "_get_layout")
            or (module == "pathlib" and name in _PATH_CLASSES)
            or (module == "collections" and name == "OrderedDict")
            or (module == "builtins" and name in ("set", "frozenset", "slice"))
        )
        obj = super().find_class(module, name) if ok else None
        if module.startswith("torch.distributed.checkpoint.") and not isinstance(obj, type):
            ok = False  # DCP's classes only, not its functions
        if not ok:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a DCP .metadata file")
        return obj


def _check_dcp_metadata(dcp_dir: str) -> None:
    path = os.path.join(dcp_dir, ".metadata")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint folder {dcp_dir!r} has no .metadata (an incomplete FSDP checkpoint)")
    with open(path, "rb") as f:
        try:
            _DcpMetadataUnpickler(f).load()
        except pickle.UnpicklingError as e:
            raise _refuse(path, f"objects other than DCP metadata ({e})") from e


def _safe_dcp_planner(path: str):
    """DCP's default load planner, except that non-tensor items must load with weights_only=True
    (DCP itself unpickles them with weights_only=False)."""
    import io

    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class _SafeLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            try:
                torch.load(value, weights_only=True)
            except pickle.UnpicklingError as e:
                raise _refuse(path, f"an item ({read_item.dest_index.fqn}) that is not plain data ({e})") from e
            value.seek(0)  # it is plain data: DCP's own load of it runs no code
            super().load_bytes(read_item, value)

    return _SafeLoadPlanner()


def _plain_args(args: Any) -> Dict[str, Any]:
    """The run's arguments as a dict of plain values (loadable with weights_only=True)."""
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    return {str(k): v if v is None or isinstance(v, (bool, int, float, str, list, tuple, dict, torch.dtype))
            else str(v) for k, v in dict(args).items()}


def _find_cause(e: BaseException, kind: type) -> Optional[BaseException]:
    """The first ``kind`` exception in e's cause/context chain or, for DCP's
    CheckpointException, among its per-rank failures."""
    seen = set()
    todo = [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, kind):
            return x
        todo += [x.__cause__, x.__context__]
        failures = getattr(x, "failures", None)
        for f in failures.values() if isinstance(failures, dict) else ():
            todo += [y for y in (f if isinstance(f, tuple) else (f,)) if isinstance(y, BaseException)]
    return None


def _set_rng_state(state: Dict[str, Any], env: DistEnv) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if env.device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], env.device)


def save_checkpoint(
    root: str,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Optional[Any],
    env: DistEnv,
    mode: str,
    args: Dict[str, Any],
    keep: int = 0,
) -> str:
    """Save after ``step`` optimizer steps; returns the checkpoint directory. Collective: every
    rank must call it. ``keep > 0`` deletes all but the newest ``keep`` checkpoints."""
    final = os.path.join(root, f"step_{step:08d}")
    tmp = final + ".tmp"
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
    dist.barrier()
    if mode == "fsdp":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(model, optimizer)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=os.path.join(tmp, "dcp"))
    elif env.is_main:
        torch.save({"model": unwrap(model).state_dict(), "optim": optimizer.state_dict()},
                   os.path.join(tmp, "state.pt"))
    torch.save(_rng_state(env), os.path.join(tmp, "rng", f"rank{env.rank}.pt"))
    dist.barrier()
    if env.is_main:
        meta = {
            "step": step,
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "mode": mode,
            "world_size": env.world_size,
            "args": _plain_args(args),
            "format": 1,
        }
        torch.save(meta, os.path.join(tmp, "meta.pt"))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if keep > 0:
            for old in list_checkpoints(root)[:-keep]:
                shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    dist.barrier()
    return final


def list_checkpoints(root: str) -> list:
    """The complete ``step_<N>`` directory names under ``root``, oldest first."""
    if not root or not os.path.isdir(root):
        return []
    found = [d for d in os.listdir(root) if _STEP_DIR.match(d) and os.path.isfile(os.path.join(root, d, "meta.pt"))]
    return sorted(found, key=lambda d: int(_STEP_DIR.match(d).group(1)))


def find_latest(root: str) -> Optional[str]:
    """The newest complete ``step_<N>`` directory under ``root`` (None when there is none)."""
    found = list_checkpoints(root)
    return os.path.join(root, found[-1]) if found else None


def checkpoint_step(name: str) -> Optional[int]:
    """N of a ``step_<N>`` directory name or path (None for anything else)."""
    m = _STEP_DIR.match(os.path.basename(os.path.normpath(name)))
    return int(m.group(1)) if m else None


def read_meta(path: str) -> Dict[str, Any]:
    meta_path = os.path.join(path, "meta.pt")
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"--resume {path!r} is not a complete checkpoint (no meta.pt in it)")
    return _safe_load(meta_path, "cpu")


def resume_checkpoint(
    path: str,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Optional[Any],
    env: DistEnv,
    mode: str,
) -> int:
    """Restore everything :func:`save_checkpoint` wrote; returns the step to continue from."""
    meta = read_meta(path)
    if meta["mode"] != mode:
        raise CheckpointError(
            f"checkpoint {path!r} was saved with --dist {meta['mode']}; resume it with --dist {meta['mode']}"
        )
    if mode == "fsdp":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        dcp_dir = os.path.join(path, "dcp")
        _check_dcp_metadata(dcp_dir)
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optim": osd}
        try:
            dcp.load(state, checkpoint_id=dcp_dir, planner=_safe_dcp_planner(dcp_dir))
        except CheckpointError:
            raise
        except (Exception, dcp.CheckpointException) as e:  # DCP wraps the refusal (a BaseException)
            refusal = _find_cause(e, CheckpointError)
            if refusal is None:
                raise
            raise refusal from e
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        # Onto the CPU: load_state_dict copies the model's tensors to its parameters' device, and the
        # optimizer's to theirs except AdamW's `step` counters, which stay where they are loaded (on
        # CUDA they would cost a host sync per parameter per step of a non-fused AdamW).
        state = _safe_load(os.path.join(path, "state.pt"), "cpu")
        try:
            unwrap(model).load_state_dict(state["model"])
        except RuntimeError as e:
            raise CheckpointError(f"checkpoint {path!r} does not fit this model: {e}") from e
        optimizer.load_state_dict(state["optim"])
    scheduler.load_state_dict(meta["scheduler"])
    if scaler is not None and meta["scaler"] is not None:
        scaler.load_state_dict(meta["scaler"])
    rng_path = os.path.join(path, "rng", f"rank{env.rank}.pt")
    if meta["world_size"] == env.world_size and os.path.isfile(rng_path):
        _set_rng_state(_safe_load(rng_path, "cpu"), env)
    elif env.is_main:
        warnings.warn(
            f"checkpoint {path!r} was saved by {meta['world_size']} process(es), resuming with {env.world_size}: "
            "model, optimizer and schedule are restored, the random number streams are not (dropout and "
            "drop-path draws will differ from an uninterrupted run)",
            RuntimeWarning,
        )
    return int(meta["step"])
