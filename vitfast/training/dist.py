"""Process group set-up and model wrapping (DDP, or FSDP2 ``fully_shard`` per block then root).

Under ``torchrun`` the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``) says where we are; without it a one-process group is created in memory so that
the same DDP/FSDP code path runs on a laptop. NCCL is used when the processes run on CUDA
devices, gloo otherwise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["DistEnv", "setup", "cleanup", "wrap_model", "unwrap", "fully_shard", "MixedPrecisionPolicy"]

try:  # torch >= 2.6 public path
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
except ImportError:  # pragma: no cover - torch 2.4/2.5 composable path
    from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.device_mesh import init_device_mesh


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    launched: bool  # by torchrun (or another launcher that set RANK/WORLD_SIZE)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: Optional[str] = None, timeout_s: float = 600.0) -> DistEnv:
    """Initialise the default process group (once) and pick this process's device.

    ``device``: ``"cuda"``, ``"cpu"`` or ``None`` (CUDA when available).
    """
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but torch.cuda.is_available() is False")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s) are visible: "
                "start at most one process per GPU (torchrun --nproc_per_node)"
            )
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    elif device == "cpu":
        dev, backend = torch.device("cpu"), "gloo"
    else:
        raise ValueError(f"--device must be 'cuda' or 'cpu', got {device!r}")
    if not dist.is_initialized():
        kwargs = dict(backend=backend, timeout=timedelta(seconds=timeout_s))
        if backend == "nccl":
            kwargs["device_id"] = dev  # eager NCCL init, and lets barrier() know the device
        if launched:
            dist.init_process_group(**kwargs)
        else:  # one process, no launcher: an in-memory store
            dist.init_process_group(store=dist.HashStore(), rank=0, world_size=1, **kwargs)
    return DistEnv(rank, world_size, local_rank, dev, backend, launched)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _fsdp_mesh(env: DistEnv):
    """FSDP2's 1-D mesh over all processes on ``env.device``'s type. Without ``mesh=``,
    ``fully_shard`` builds one on the process's accelerator (CUDA on a GPU host) whatever
    ``--device`` says, and moves the parameters there. On CUDA it shards onto the current device,
    so that is made ``env.device`` (``setup`` already did; a no-op then)."""
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    return init_device_mesh(env.device.type, (env.world_size,))


def wrap_model(model: nn.Module, mode: str, env: DistEnv, param_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """``mode="ddp"``: ``DistributedDataParallel``. ``mode="fsdp"``: FSDP2 ``fully_shard`` on each
    transformer block (``model.blocks``), then on the root (the embedding, final norm and head).

    ``param_dtype`` (FSDP only): compute/all-gather dtype of FSDP's mixed-precision policy;
    gradients are reduced in float32 and the sharded parameters stay float32.
    """
    model = model.to(env.device)
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [env.device.index] if env.device.type == "cuda" else None
        # A ViT's buffers are constants (pixel mean/std, no batch norm): broadcasting them every
        # forward would only cost a collective and a torch.compile graph break.
        import inspect

        params = inspect.signature(DDP.__init__).parameters
        sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
        return DDP(model, device_ids=ids, **sync)
    if mode == "fsdp":
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
        blocks = getattr(model, "blocks", None)
        if blocks is None:
            raise ValueError(f"--dist fsdp shards each block of model.blocks; {type(model).__name__} has no .blocks")
        kw = {"mesh": _fsdp_mesh(env)}
        if mp is not None:
            kw["mp_policy"] = mp
        for block in blocks:
            fully_shard(block, **kw)
        root_kw = dict(kw)
        if mp is not None:  # logits back in float32 for the loss
            root_kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32,
                                                        output_dtype=torch.float32)
        fully_shard(model, **root_kw)
        return model
    raise ValueError(f"--dist must be 'ddp' or 'fsdp', got {mode!r}")


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module under DDP / torch.compile wrappers (FSDP2 wraps in place)."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)
