"""``vitfast train``: train FastViT (or a timm ViT patched by vitfast) with DDP or FSDP2.

One machine, one process (no launcher)::

    vitfast train --steps 300

Several processes / machines::

    torchrun --nproc_per_node 8 -m vitfast.cli train --dist fsdp --amp bf16 --data-dir /data/imagenet
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m vitfast.cli train --dist fsdp --amp bf16 --data-dir /data/imagenet --output-dir /shared/run1

Without ``--data-dir`` it trains on scikit-learn's digits (real images, no network), upscaled to
32x32 with 4x4 patches. Images go into the model as uint8: FastViT normalises them inside its
patch-embedding op. Exit codes: 0 done, 2 bad arguments/data/checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..integrations.timm import patch_timm
from ..training.checkpoint import CheckpointError, find_latest, resume_checkpoint, save_checkpoint
from ..training.data import (
    DataError, StepBatchSampler, TensorImages, TrainData, eval_indices, load_digits, load_image_folder,
)
from ..training.dist import DistEnv, cleanup, setup, unwrap, wrap_model

__all__ = ["main", "run", "parse_args", "build_model", "evaluate", "lr_lambda", "TrainResult", "UsageError"]

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class UsageError(ValueError):
    """An argument combination, model or device that cannot be used (reported without a traceback)."""


# -- arguments ----------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vitfast train",
        description="Train FastViT (or a timm ViT through vitfast.patch_timm) with DDP or FSDP2; "
        "start with torchrun for several processes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--model", default="vit_tiny_patch16_224",
                   help="a vitfast.list_models() name, or timm:<name> for a timm model patched by vitfast.patch_timm")
    g.add_argument("--backend", choices=("vitfast", "reference"), default="vitfast",
                   help="vitfast's kernels, or plain PyTorch (the baseline)")
    g.add_argument("--img-size", type=int, default=None, help="default: 32 for digits, the model's for --data-dir")
    g.add_argument("--patch-size", type=int, default=None, help="default: 4 for digits, the model's otherwise")
    g.add_argument("--embed-dim", type=int, default=None)
    g.add_argument("--depth", type=int, default=None)
    g.add_argument("--num-heads", type=int, default=None)
    g.add_argument("--mlp-ratio", type=float, default=None)
    g.add_argument("--global-pool", choices=("token", "avg", "max", "avgmax"), default=None,
                   help="how tokens become the head's input (default: the model's)")
    g.add_argument("--qk-norm", action="store_true", help="LayerNorm on q and k (steadier at high learning rates)")
    g.add_argument("--drop-path", type=float, default=0.0)
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute each block in backward")
    g.add_argument("--compile", action="store_true", help="torch.compile the wrapped model")

    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default=None,
                   help="ImageFolder root (<dir>/<class>/<img>, or <dir>/train and <dir>/val); default: digits")
    g.add_argument("--val-fraction", type=float, default=0.1, help="held out when --data-dir has no train/ val/")
    g.add_argument("--workers", type=int, default=4, help="DataLoader workers per process (--data-dir only)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=64, help="per process; the global batch is this x world size")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps (default: --epochs worth)")
    g.add_argument("--epochs", type=float, default=10.0)
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    g.add_argument("--min-lr-ratio", type=float, default=0.01, help="cosine floor, as a fraction of --lr")
    g.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up (default: 5%% of the steps)")
    g.add_argument("--opt-betas", type=float, nargs=2, default=(0.9, 0.999), metavar=("B1", "B2"), help="AdamW betas")
    g.add_argument("--opt-eps", type=float, default=1e-8, help="AdamW epsilon")
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--label-smoothing", type=float, default=0.0)
    g.add_argument("--clip-grad", type=float, default=1.0, help="max global grad norm (0: off)")
    g.add_argument("--seed", type=int, default=0)

    g = p.add_argument_group("distributed and precision")
    g.add_argument("--dist", choices=("ddp", "fsdp"), default="ddp",
                   help="DistributedDataParallel, or FSDP2 fully_shard per block then the root")
    g.add_argument("--amp", choices=tuple(AMP_DTYPES), default="none",
                   help="bf16/fp16 compute (fp16 uses a gradient scaler); master weights stay fp32")
    g.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")

    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--output-dir", default=None, help="checkpoints/ and metrics.jsonl go here")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (and at the end)")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="newest N kept (0: all)")
    g.add_argument("--resume", default=None, help="a step_<N> checkpoint directory, or 'auto' for the newest")
    g.add_argument("--eval-every", type=int, default=0, help="validate every N steps (and at the end)")
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return _parser().parse_args(argv)


def _check_args(a: argparse.Namespace) -> None:
    positive = ("batch_size", "steps", "img_size", "patch_size", "embed_dim", "depth", "num_heads", "log_every")
    for name in positive:
        v = getattr(a, name)
        if v is not None and v <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {v}")
    for name in ("save_every", "eval_every", "keep_checkpoints", "workers", "weight_decay", "clip_grad", "drop_path"):
        if getattr(a, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(a, name)}")
    if a.epochs <= 0 and a.steps is None:
        raise ValueError(f"--epochs must be positive, got {a.epochs}")
    if not 0 <= a.val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {a.val_fraction}")
    if a.save_every and not a.output_dir:
        raise ValueError("--save-every needs --output-dir (checkpoints go to <output-dir>/checkpoints)")
    if a.resume == "auto" and not a.output_dir:
        raise ValueError("--resume auto needs --output-dir (it resumes from <output-dir>/checkpoints)")


# -- model --------------------------------------------------------------------------------------
def build_model(a: argparse.Namespace, data: TrainData) -> Tuple[nn.Module, Optional[Tuple[tuple, tuple]]]:
    """The model on the CPU, and ``(mean, std)`` when the model takes normalised float images
    (timm models) rather than uint8 (FastViT normalises inside its embedding)."""
    import vitfast

    stats = ((0.5,) * data.in_chans, (0.5,) * data.in_chans)
    over: Dict[str, Any] = dict(img_size=data.img_size, in_chans=data.in_chans, num_classes=data.num_classes)
    for k in ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio"):
        if getattr(a, k) is not None:
            over[k] = getattr(a, k)
    if a.drop_path:
        over["drop_path_rate"] = a.drop_path
    if a.qk_norm:
        over["qk_norm"] = True
    if a.global_pool is not None:
        over["global_pool"] = a.global_pool
    if a.model.startswith("timm:"):
        try:
            import timm
        except ImportError as e:
            raise ValueError("--model timm:... needs timm: pip install 'vitfast[timm]'") from e
        model = timm.create_model(a.model[5:], pretrained=False, **over)
        if a.backend == "vitfast":
            model = patch_timm(model)
        return model, stats  # float input: timm's own forward and the patched one both take it
    model = vitfast.create_model(
        a.model, mean=stats[0], std=stats[1], backend="auto" if a.backend == "vitfast" else "reference", **over
    )
    return model, None


def _param_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """No weight decay on biases, norms, and what the model lists in ``no_weight_decay()``."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Linear warm-up from ``1/warmup`` to 1 over ``warmup`` steps, then cosine to ``min_ratio``."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    return f


# -- data ---------------------------------------------------------------------------------------
def _batches(ds, sampler, env: DistEnv, workers: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    pin = env.device.type == "cuda"
    if isinstance(ds, TensorImages):
        for idx in sampler:
            x, y = ds.batch(idx)
            yield (x.pin_memory(), y.pin_memory()) if pin else (x, y)
        return
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=workers, pin_memory=pin,
                                         persistent_workers=False)
    yield from loader


def _to_input(x: torch.Tensor, env: DistEnv, stats) -> torch.Tensor:
    x = x.to(env.device, non_blocking=True)
    if stats is None:
        return x  # uint8 into FastViT's fused normalise + embed
    from ..ops.reference import normalize_images_ref

    return normalize_images_ref(x, stats[0], stats[1], dtype=torch.float32)


@torch.no_grad()
def evaluate(model, ds, env: DistEnv, batch_size: int, autocast, stats) -> Dict[str, float]:
    """Loss and accuracy on ``ds``, split over the ranks (every rank runs the same number of
    forwards, so FSDP's all-gathers line up)."""
    model.eval()
    idx, n_real = eval_indices(len(ds), env.rank, env.world_size)
    totals = torch.zeros(3, dtype=torch.float64, device=env.device)  # loss sum, correct, count
    for lo in range(0, len(idx), batch_size):
        chunk = idx[lo : lo + batch_size]
        if isinstance(ds, TensorImages):
            x, y = ds.batch(chunk)
        else:
            items = [ds[i] for i in chunk]
            x, y = torch.stack([t for t, _ in items]), torch.tensor([c for _, c in items])
        y = y.to(env.device)
        real = (torch.arange(lo, lo + len(chunk), device=env.device) < n_real)
        with autocast():
            logits = model(_to_input(x, env, stats))
        loss = F.cross_entropy(logits.float(), y, reduction="none")
        totals[0] += (loss * real).sum().double()
        totals[1] += ((logits.argmax(-1) == y) & real).sum().double()
        totals[2] += real.sum().double()
    dist.all_reduce(totals)
    model.train()
    loss_sum, correct, count = totals.tolist()
    return {"val_loss": loss_sum / max(count, 1), "val_acc": correct / max(count, 1)}


# -- the run ------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    history: List[Dict[str, float]] = field(default_factory=list)  # one entry per step run
    evals: List[Dict[str, float]] = field(default_factory=list)
    start_step: int = 0
    final_step: int = 0
    checkpoint: Optional[str] = None
    model: Optional[nn.Module] = None


class _Log:
    """Rank 0's tqdm bar, log lines, and ``metrics.jsonl``."""

    def __init__(self, a, env: DistEnv, start: int, total: int):
        self.on = env.is_main
        self.bar = None
        self.file = None
        if not self.on:
            return
        if not a.no_progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True, file=sys.stderr)
        if a.output_dir:
            os.makedirs(a.output_dir, exist_ok=True)
            self.file = open(os.path.join(a.output_dir, "metrics.jsonl"), "a")

    def line(self, text: str) -> None:
        if not self.on:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def record(self, rec: Dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(rec) + "\n")
            self.file.flush()

    def advance(self, n: int, postfix: Dict[str, str]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()


def run(a: argparse.Namespace) -> TrainResult:
    """Train with the parsed arguments (the process group is set up here and torn down by
    :func:`main`). Raises DataError / CheckpointError / ValueError for bad input."""
    try:
        _check_args(a)
        env = setup(a.device)
    except ValueError as e:
        raise UsageError(str(e)) from e
    data = load_image_folder(a.data_dir, a.img_size or _model_img_size(a), a.val_fraction) if a.data_dir \
        else load_digits(a.img_size or 32)
    if a.data_dir is None and a.patch_size is None:
        a.patch_size = 4

    torch.manual_seed(a.seed)  # identical initial weights on every rank (FSDP shards each rank's copy)
    try:
        model, stats = build_model(a, data)
        if a.grad_checkpointing and not hasattr(model, "set_grad_checkpointing"):
            raise ValueError(f"--grad-checkpointing: {type(model).__name__} has no set_grad_checkpointing()")
    except ValueError as e:  # unknown model name, sizes that do not divide, ...
        raise UsageError(f"--model {a.model}: {e}") from e
    if a.grad_checkpointing:
        model.set_grad_checkpointing(True)
    amp_dtype = AMP_DTYPES[a.amp]
    model = wrap_model(model, a.dist, env, param_dtype=amp_dtype if a.dist == "fsdp" else None)
    optimizer = torch.optim.AdamW(_param_groups(unwrap(model), a.weight_decay), lr=a.lr, betas=tuple(a.opt_betas),
                                  eps=a.opt_eps)

    sampler_args = dict(n=len(data.train), batch_size=a.batch_size, rank=env.rank, world_size=env.world_size,
                        seed=a.seed)
    steps_per_epoch = StepBatchSampler(total_steps=0, **sampler_args).steps_per_epoch
    total = a.steps if a.steps is not None else max(1, int(round(a.epochs * steps_per_epoch)))
    warmup = a.warmup_steps if a.warmup_steps is not None else max(1, total // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, total, a.min_lr_ratio))
    scaler = None
    if a.amp == "fp16":
        if a.dist == "fsdp":
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            scaler = ShardedGradScaler(env.device.type)
        else:
            scaler = torch.amp.GradScaler(env.device.type)
    # FSDP runs its mixed precision through the policy; DDP through autocast
    use_autocast = amp_dtype is not None and a.dist == "ddp"

    def autocast():
        return torch.autocast(env.device.type, dtype=amp_dtype, enabled=use_autocast)

    ckpt_root = os.path.join(a.output_dir, "checkpoints") if a.output_dir else None
    start = 0
    resume = a.resume
    if resume == "auto":
        resume = find_latest(ckpt_root)
    if resume:
        start = resume_checkpoint(resume, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                                env=env, mode=a.dist)
    else:
        torch.manual_seed(a.seed + 1 + env.rank)  # per-rank dropout / drop-path streams
    train_model = torch.compile(model) if a.compile else model

    log = _Log(a, env, start, total)
    res = TrainResult(start_step=start, final_step=start, model=model)
    log.line(f"vitfast train: {data.description}; model {a.model} ({a.backend}, "
             f"{sum(p.numel() for p in unwrap(model).parameters()) / 1e6:.2f}M params); {a.dist} x {env.world_size} "
             f"on {env.device.type} ({env.backend}); amp {a.amp}; global batch {a.batch_size * env.world_size}; "
             f"steps {start}->{total} ({steps_per_epoch}/epoch)")
    if resume:
        log.line(f"resumed from {resume} at step {start}")

    sampler = StepBatchSampler(total_steps=total, start_step=start, **sampler_args)
    pending: List[torch.Tensor] = []  # per-step [loss, correct, count] not yet reduced
    t_last, step_last = time.perf_counter(), start
    model.train()
    step = start
    for x, y in _batches(data.train, sampler, env, a.workers):
        y = y.to(env.device, non_blocking=True)
        with autocast():
            logits = train_model(_to_input(x, env, stats))
        loss = F.cross_entropy(logits.float(), y, label_smoothing=a.label_smoothing)
        if scaler is not None:
            scaler.scale(loss).backward()
        else:
            loss.backward()
        if a.clip_grad:
            if scaler is not None:
                scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), a.clip_grad)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        step += 1
        with torch.no_grad():
            pending.append(torch.stack([loss.detach().double() * y.numel(),
                                        (logits.argmax(-1) == y).sum().double(),
                                        torch.tensor(float(y.numel()), dtype=torch.float64, device=env.device)]))
        last = step == total
        if step % a.log_every == 0 or last:
            stats_t = torch.stack(pending)
            dist.all_reduce(stats_t)
            now = time.perf_counter()
            ips = stats_t[:, 2].sum().item() / max(now - t_last, 1e-9)
            for i, (ls, corr, cnt) in enumerate(stats_t.tolist()):
                rec = {"step": step - len(pending) + i + 1, "loss": ls / cnt, "acc": corr / cnt}
                res.history.append(rec)
                log.record(rec)
            rec = res.history[-1]
            log.record({"step": step, "lr": lr, "img_per_s": ips})
            log.line(f"step {step:>6}/{total}  loss {rec['loss']:.4f}  acc {rec['acc']:.3f}  "
                     f"lr {lr:.2e}  {ips:,.0f} img/s")
            log.advance(step - step_last, {"loss": f"{rec['loss']:.3f}", "img/s": f"{ips:,.0f}"})
            pending, t_last, step_last = [], time.perf_counter(), step
        if (a.eval_every and step % a.eval_every == 0) or last:
            ev = {"step": step, **evaluate(train_model, data.val, env, a.batch_size, autocast, stats)}
            res.evals.append(ev)
            log.record(ev)
            log.line(f"step {step:>6}  val loss {ev['val_loss']:.4f}  val acc {ev['val_acc']:.4f}")
            t_last = time.perf_counter()
        if ckpt_root and ((a.save_every and step % a.save_every == 0) or last):
            res.checkpoint = save_checkpoint(ckpt_root, step, model=model, optimizer=optimizer, scheduler=scheduler,
                                             scaler=scaler, env=env, mode=a.dist, args=vars(a),
                                             keep=a.keep_checkpoints)
            log.line(f"saved {res.checkpoint}")
            t_last = time.perf_counter()
    res.final_step = step
    log.close()
    return res


def _model_img_size(a: argparse.Namespace) -> int:
    if a.model.startswith("timm:"):
        return 224
    from ..models.registry import MODEL_CONFIGS

    cfg = MODEL_CONFIGS.get(a.model)
    return int(cfg["img_size"]) if cfg else 224


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = parse_args(argv)
    try:
        run(a)
    except (UsageError, DataError, CheckpointError) as e:
        print(f"vitfast train: error: {_first_message(e)}", file=sys.stderr)
        return 2
    finally:
        cleanup()
    return 0


def _first_message(e: BaseException) -> str:
    """The error's own message (DataLoader workers wrap it in a traceback text)."""
    text = str(e)
    if "Original Traceback" in text:
        text = text.strip().splitlines()[-1].split(": ", 1)[-1]
    return text


if __name__ == "__main__":
    sys.exit(main())
