"""``vitfast train``: train FastViT (or a timm ViT patched by vitfast) with DDP or FSDP2.

One machine, one process (no launcher)::

    vitfast train --steps 300

Several processes / machines::

    torchrun --nproc_per_node 8 -m vitfast.cli train --dist fsdp --amp bf16 --data-dir /data/imagenet
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m vitfast.cli train --dist fsdp --amp bf16 --data-dir /data/imagenet --output-dir /shared/run1

Without ``--data-dir`` it trains on scikit-learn's digits (real images, no network), upscaled to
32x32 with 4x4 patches; with it, through timm's dataset and transform factories, with timm's
training augmentation (``vitfast.training.augment``). Images go into the model as uint8: FastViT
normalises them inside its patch-embedding op.

Work is never lost: a non-empty ``--output-dir`` is refused unless ``--resume`` or
``--overwrite`` says what to do with it, and SIGINT/SIGTERM save a checkpoint at the current step
before exiting. Exit codes: 0 done, 2 bad arguments/data/checkpoint, 130/143 stopped by
SIGINT/SIGTERM (checkpoint saved when there is an ``--output-dir``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
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
from ..training.augment import AugConfig, BatchAugment, StepKeys, StepSeeded, data_config, image_transforms
from ..training.checkpoint import checkpoint_step, list_checkpoints
from ..training.data import (
    DataError, StepBatchSampler, TensorImages, TrainData, eval_indices, load_digits, load_image_folder,
)
from ..training.dist import DistEnv, cleanup, setup, unwrap, wrap_model
from ..training.interrupt import Interrupted, StopSignals, ignore_stop_signals

__all__ = ["main", "run", "parse_args", "build_model", "evaluate", "lr_lambda", "TrainResult", "UsageError",
           "Interrupted"]

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class UsageError(ValueError):
    """An argument combination, model or device that cannot be used (reported without a traceback)."""


# -- arguments ----------------------------------------------------------------------------------
def _number(kind, test, what):
    """An argparse ``type``: ``kind(text)`` that must pass ``test`` (else "must be <what>")."""

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not test(v):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return v

    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


POS_INT = _number(int, lambda v: v > 0, "a positive integer")
NONNEG_INT = _number(int, lambda v: v >= 0, "an integer >= 0")
POS_FLOAT = _number(float, lambda v: v > 0 and math.isfinite(v), "a positive number")
NONNEG_FLOAT = _number(float, lambda v: v >= 0 and math.isfinite(v), "a number >= 0")
PROB = _number(float, lambda v: 0 <= v <= 1, "in [0, 1]")
FRACTION = _number(float, lambda v: 0 <= v < 1, "in [0, 1)")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """argparse's ``prog: error: message`` and exit code 2, on one line (no 30-line usage)."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
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
    g.add_argument("--img-size", type=POS_INT, default=None, help="default: 32 for digits, the model's for --data-dir")
    g.add_argument("--patch-size", type=POS_INT, default=None, help="default: 4 for digits, the model's otherwise")
    g.add_argument("--embed-dim", type=POS_INT, default=None)
    g.add_argument("--depth", type=POS_INT, default=None)
    g.add_argument("--num-heads", type=POS_INT, default=None)
    g.add_argument("--mlp-ratio", type=POS_FLOAT, default=None)
    g.add_argument("--global-pool", choices=("token", "avg", "max", "avgmax"), default=None,
                   help="how tokens become the head's input (default: the model's)")
    g.add_argument("--qk-norm", action="store_true", help="LayerNorm on q and k (steadier at high learning rates)")
    g.add_argument("--drop-path", type=FRACTION, default=0.0)
    g.add_argument("--weight-init", choices=("", "jax", "jax_nlhb", "moco"), default=None,
                   help="timm's weight_init mode for a model trained from scratch (default: the model's, timm's '')")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute each block in backward")
    g.add_argument("--compile", action="store_true", help="torch.compile the wrapped model")

    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default=None,
                   help="image folder root (<dir>/<class>/<img>, or <dir>/train and <dir>/val), read through timm; "
                   "default: scikit-learn's digits")
    g.add_argument("--val-fraction", type=FRACTION, default=0.1, help="held out when --data-dir has no train/ val/")
    g.add_argument("--workers", type=NONNEG_INT, default=4, help="DataLoader workers per process (--data-dir only)")

    g = p.add_argument_group("augmentation (timm's train.py options and defaults; per image with --data-dir only)")
    g.add_argument("--no-aug", action="store_true", help="no per-image augmentation: resize and centre crop only")
    g.add_argument("--aa", default=None, metavar="POLICY", help="auto-augment policy, e.g. rand-m9-mstd0.5-inc1")
    g.add_argument("--color-jitter", type=NONNEG_FLOAT, default=0.4,
                   help="colour jitter factor (an --aa policy replaces it, as in timm)")
    g.add_argument("--hflip", type=PROB, default=0.5, help="horizontal flip probability")
    g.add_argument("--mixup", type=NONNEG_FLOAT, default=0.0, help="mixup alpha (0: off); soft-target cross-entropy")
    g.add_argument("--cutmix", type=NONNEG_FLOAT, default=0.0, help="cutmix alpha (0: off)")
    g.add_argument("--mixup-prob", type=PROB, default=1.0, help="probability of mixing a batch (mixup or cutmix)")
    g.add_argument("--mixup-switch-prob", type=PROB, default=0.5, help="probability of cutmix when both are on")
    g.add_argument("--reprob", type=PROB, default=0.0, help="random erasing probability (0: off)")
    g.add_argument("--remode", choices=("const", "rand", "pixel"), default="pixel", help="random erasing fill")

    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=POS_INT, default=64, help="per process; the global batch is this x world size")
    g.add_argument("--steps", type=POS_INT, default=None, help="optimizer steps (default: --epochs worth)")
    g.add_argument("--epochs", type=POS_FLOAT, default=10.0)
    g.add_argument("--lr", type=POS_FLOAT, default=1e-3, help="peak learning rate")
    g.add_argument("--min-lr-ratio", type=PROB, default=0.01, help="cosine floor, as a fraction of --lr")
    g.add_argument("--warmup-steps", type=NONNEG_INT, default=None, help="linear warm-up (default: 5%% of the steps)")
    g.add_argument("--opt-betas", type=FRACTION, nargs=2, default=(0.9, 0.999), metavar=("B1", "B2"), help="AdamW betas")
    g.add_argument("--opt-eps", type=POS_FLOAT, default=1e-8, help="AdamW epsilon")
    g.add_argument("--weight-decay", type=NONNEG_FLOAT, default=0.05)
    g.add_argument("--label-smoothing", type=FRACTION, default=0.0)
    g.add_argument("--clip-grad", type=NONNEG_FLOAT, default=1.0, help="max global grad norm (0: off)")
    g.add_argument("--seed", type=int, default=0)

    g = p.add_argument_group("distributed and precision")
    g.add_argument("--dist", choices=("ddp", "fsdp"), default="ddp",
                   help="DistributedDataParallel, or FSDP2 fully_shard per block then the root")
    g.add_argument("--amp", choices=tuple(AMP_DTYPES), default="none",
                   help="bf16/fp16 compute (fp16 uses a gradient scaler); master weights stay fp32")
    g.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")

    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--output-dir", default=None,
                   help="checkpoints/ and metrics.jsonl go here; a non-empty folder needs --resume or --overwrite")
    g.add_argument("--resume", default=None, help="a step_<N> checkpoint directory, or 'auto' for the newest")
    g.add_argument("--overwrite", action="store_true",
                   help="start over in a non-empty --output-dir: deletes its checkpoints/ and metrics.jsonl")
    g.add_argument("--save-every", type=NONNEG_INT, default=0, help="checkpoint every N steps (and at the end)")
    g.add_argument("--keep-checkpoints", type=NONNEG_INT, default=2, help="newest N kept (0: all)")
    g.add_argument("--eval-every", type=NONNEG_INT, default=0, help="validate every N steps (and at the end)")
    g.add_argument("--log-every", type=POS_INT, default=10)
    g.add_argument("--no-progress", action="store_true", help="no progress bar (there is one only on a terminal)")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The parsed arguments; a bad one (or combination) exits with argparse's one-line error, code 2."""
    p = _parser()
    a = p.parse_args(argv)
    problem = _check_args(a)
    if problem:
        p.error(problem)
    return a


def _check_args(a: argparse.Namespace) -> Optional[str]:
    """What is wrong with a combination of arguments (None: nothing)."""
    if a.save_every and not a.output_dir:
        return "--save-every needs --output-dir (checkpoints go to <output-dir>/checkpoints)"
    if a.resume == "auto" and not a.output_dir:
        return "--resume auto needs --output-dir (it resumes from <output-dir>/checkpoints)"
    if a.overwrite and not a.output_dir:
        return "--overwrite needs --output-dir"
    if a.overwrite and a.resume:
        return "--overwrite starts over and --resume continues: give one of them"
    if a.data_dir is None:
        for flag, given in (("--aa", a.aa), ("--no-aug", a.no_aug)):
            if given:
                return f"{flag} augments the images of --data-dir (the digits are used as they are)"
    if a.no_aug and a.aa:
        return "--no-aug turns per-image augmentation off: drop --aa, or --no-aug"
    if (a.mixup or a.cutmix) and a.batch_size % 2:
        return f"--mixup/--cutmix mix each batch with itself reversed: --batch-size must be even, got {a.batch_size}"
    return None


def aug_config(a: argparse.Namespace) -> AugConfig:
    return AugConfig(no_aug=a.no_aug, aa=a.aa, color_jitter=a.color_jitter,
                     hflip=a.hflip, mixup=a.mixup, cutmix=a.cutmix, mixup_prob=a.mixup_prob,
                     mixup_switch_prob=a.mixup_switch_prob, reprob=a.reprob, remode=a.remode,
                     label_smoothing=a.label_smoothing)


# -- model --------------------------------------------------------------------------------------
def build_model(a: argparse.Namespace, data: TrainData) -> Tuple[nn.Module, Optional[Tuple[tuple, tuple]]]:
    """The model on the CPU, and ``(mean, std)`` when the model takes normalised float images
    (timm models) rather than uint8 (FastViT normalises inside its embedding). On the digits
    every model normalises with 0.5; on ``--data-dir`` with its pretrained config's statistics."""
    import vitfast

    stats = ((0.5,) * data.in_chans, (0.5,) * data.in_chans) if a.data_dir is None else None
    over: Dict[str, Any] = dict(img_size=data.img_size, in_chans=data.in_chans, num_classes=data.num_classes)
    for k in ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio"):
        if getattr(a, k) is not None:
            over[k] = getattr(a, k)
    if a.drop_path:
        over["drop_path_rate"] = a.drop_path
    if a.qk_norm:
        over["qk_norm"] = True
    if a.weight_init is not None:
        over["weight_init"] = a.weight_init
    if a.global_pool is not None:
        over["global_pool"] = a.global_pool
    if a.model.startswith("timm:"):
        try:
            import timm
        except ImportError as e:
            raise ValueError("--model timm:... needs timm: pip install 'vitfast[timm]'") from e
        model = timm.create_model(a.model[5:], pretrained=False, **over)
        if stats is None:
            cfg = data_config(model, data.img_size)
            stats = (tuple(cfg["mean"]), tuple(cfg["std"]))
        if a.backend == "vitfast":
            model = patch_timm(model)
        return model, stats  # float input: timm's own forward and the patched one both take it
    if stats is not None:
        over.update(mean=stats[0], std=stats[1])
    model = vitfast.create_model(a.model, backend="auto" if a.backend == "vitfast" else "reference", **over)
    return model, None


def _pixel_stats(model: nn.Module, stats) -> Tuple[List[float], List[float]]:
    """The mean/std (0..1 scale) the model's input is normalised with."""
    if stats is not None:
        return list(stats[0]), list(stats[1])
    return unwrap(model).pixel_mean.tolist(), unwrap(model).pixel_std.tolist()


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
def _batches(ds, sampler, env: DistEnv, workers: int, seed: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    pin = env.device.type == "cuda"
    if isinstance(ds, TensorImages):
        for idx in sampler:
            x, y = ds.batch(idx)
            yield (x.pin_memory(), y.pin_memory()) if pin else (x, y)
        return
    # every image's augmentation is seeded by (seed, step, index), and the loader draws its worker
    # seeds from its own generator: the training's random streams do not depend on the workers
    loader = torch.utils.data.DataLoader(StepSeeded(ds, seed), batch_sampler=StepKeys(sampler), num_workers=workers,
                                         pin_memory=pin, worker_init_fn=ignore_stop_signals,
                                         generator=torch.Generator().manual_seed(seed))
    yield from loader


def _eval_batches(ds, idx: List[int], batch_size: int, workers: int):
    if isinstance(ds, TensorImages):
        for lo in range(0, len(idx), batch_size):
            yield ds.batch(idx[lo : lo + batch_size])
        return
    yield from torch.utils.data.DataLoader(torch.utils.data.Subset(ds, idx), batch_size=batch_size,
                                           num_workers=workers, worker_init_fn=ignore_stop_signals)


def _to_input(x: torch.Tensor, env: DistEnv, stats) -> torch.Tensor:
    x = x.to(env.device, non_blocking=True)
    if stats is None:
        return x  # uint8 into FastViT's fused normalise + embed
    from ..ops.reference import normalize_images_ref

    return normalize_images_ref(x, stats[0], stats[1], dtype=torch.float32)


@torch.no_grad()
def evaluate(model, ds, env: DistEnv, batch_size: int, autocast, stats, workers: int = 0) -> Dict[str, float]:
    """Loss and accuracy on ``ds``, split over the ranks (every rank runs the same number of
    forwards, so FSDP's all-gathers line up)."""
    model.eval()
    idx, n_real = eval_indices(len(ds), env.rank, env.world_size)
    totals = torch.zeros(3, dtype=torch.float64, device=env.device)  # loss sum, correct, count
    lo = 0
    for x, y in _eval_batches(ds, idx, batch_size, workers):
        y = y.to(env.device)
        real = (torch.arange(lo, lo + len(y), device=env.device) < n_real)
        lo += len(y)
        with autocast():
            logits = model(_to_input(x, env, stats))
        loss = F.cross_entropy(logits.float(), y, reduction="none")
        totals[0] += (loss * real).sum().double()
        totals[1] += ((logits.argmax(-1) == y) & real).sum().double()
        totals[2] += real.sum().double()
    dist.all_reduce(totals)
    model.train()
    loss_sum, correct, count = totals.tolist()
    if not count:  # no validation images (--val-fraction 0): no figures, not a perfect 0.0 loss
        return {"val_loss": float("nan"), "val_acc": float("nan")}
    return {"val_loss": loss_sum / count, "val_acc": correct / count}


# -- output folder ------------------------------------------------------------------------------
def _output_dir_problem(a: argparse.Namespace) -> Optional[str]:
    """Why training into ``--output-dir`` could lose work (None: it cannot)."""
    out = a.output_dir
    if not out or not os.path.exists(out):
        return None
    if not os.path.isdir(out):
        return f"--output-dir {out!r} is a file, not a folder"
    entries = sorted(os.listdir(out))
    if not entries or a.overwrite:
        return None
    ckpt_root = os.path.join(out, "checkpoints")
    found = list_checkpoints(ckpt_root)
    if not a.resume:
        held = f"checkpoints up to {found[-1]}" if found else ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        return (f"--output-dir {out!r} is not empty ({held}): continue that run with --resume auto, start over "
                f"with --overwrite (deletes its checkpoints and metrics.jsonl), or choose another --output-dir")
    if a.resume == "auto":
        if not found:
            return (f"--resume auto: {out!r} is not empty but holds no complete checkpoint: start over with "
                    f"--overwrite, or choose another --output-dir")
        return None
    step = checkpoint_step(a.resume)
    later = [d for d in found if step is not None and checkpoint_step(d) > step]
    if later:
        return (f"--resume {a.resume}: {ckpt_root!r} already holds later checkpoints (up to {later[-1]}), which "
                f"checkpoint rotation would keep over this run's: continue from the newest with --resume auto, "
                f"or choose another --output-dir")
    return None


def _prepare_output_dir(a: argparse.Namespace, env: DistEnv) -> None:
    """Refuse an --output-dir that would lose work (every rank agrees on it); with --overwrite,
    delete the previous run's checkpoints and metrics."""
    problem = _output_dir_problem(a)
    if env.world_size > 1:  # every rank looks before any writes; they must take the same way
        seen: List[Optional[str]] = [None] * env.world_size
        dist.all_gather_object(seen, problem)
        problem = next((p for p in seen if p), None)
    if problem:
        raise UsageError(problem)
    if a.overwrite and env.is_main and os.path.isdir(a.output_dir):
        gone = [p for p in ("checkpoints", "metrics.jsonl") if os.path.exists(os.path.join(a.output_dir, p))]
        shutil.rmtree(os.path.join(a.output_dir, "checkpoints"), ignore_errors=True)
        if "metrics.jsonl" in gone:
            os.remove(os.path.join(a.output_dir, "metrics.jsonl"))
        if gone:
            print(f"vitfast train: --overwrite: deleted {' and '.join(gone)} in {a.output_dir}", file=sys.stderr)
    if not a.output_dir and env.is_main:
        print("vitfast train: no --output-dir: nothing will be saved (no checkpoints, no metrics.jsonl)",
              file=sys.stderr, flush=True)
    dist.barrier()


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
    """Rank 0's progress bar (on a terminal only), log lines, and ``metrics.jsonl``."""

    def __init__(self, a, env: DistEnv, start: int, total: int):
        self.on = env.is_main
        self.bar = None
        self.file = None
        if not self.on:
            return
        if not a.no_progress and sys.stderr.isatty():  # in a log file a bar is carriage-return noise
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
    :func:`main`). Raises DataError / CheckpointError / UsageError for bad input, and
    :class:`Interrupted` after saving a checkpoint when SIGINT/SIGTERM stops the run."""
    problem = _check_args(a)
    if problem:
        raise UsageError(problem)
    try:
        env = setup(a.device)
    except ValueError as e:
        raise UsageError(str(e)) from e
    _prepare_output_dir(a, env)
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
    aug = aug_config(a)
    if a.data_dir:  # timm's transforms from the model's data config; images stay uint8
        data.set_transforms(*image_transforms(data_config(model, data.img_size), aug))
    amp_dtype = AMP_DTYPES[a.amp]
    model = wrap_model(model, a.dist, env, param_dtype=amp_dtype if a.dist == "fsdp" else None)
    optimizer = torch.optim.AdamW(_param_groups(unwrap(model), a.weight_decay), lr=a.lr, betas=tuple(a.opt_betas),
                                  eps=a.opt_eps)
    try:
        batch_aug = BatchAugment(aug, data.num_classes, *_pixel_stats(model, stats), env.device, a.seed, env.rank)
    except ImportError as e:
        raise UsageError(f"--mixup/--cutmix/--reprob use timm's Mixup and RandomErasing: pip install timm ({e})") from e

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
    if a.data_dir or batch_aug.active:
        log.line(f"augmentation: {aug.describe()}")
    if resume:
        log.line(f"resumed from {resume} at step {start}")

    def save(step: int) -> str:
        path = save_checkpoint(ckpt_root, step, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                               env=env, mode=a.dist, args=vars(a), keep=a.keep_checkpoints)
        log.line(f"saved {path}")
        return path

    sampler = StepBatchSampler(total_steps=total, start_step=start, **sampler_args)
    # per step, not yet reduced: [loss * count, correct] on the device (no host sync), count on the host
    pending: List[torch.Tensor] = []
    pending_counts: List[int] = []
    t_last, step_last = time.perf_counter(), start
    state = {"lr": a.lr}

    def flush(step: int) -> None:
        nonlocal pending, pending_counts, t_last, step_last
        if not pending:
            return
        # the counts go to the device once per log interval, where the .tolist() below syncs anyway
        counts = torch.tensor(pending_counts, dtype=torch.float64).to(pending[0].device).unsqueeze(1)
        stats_t = torch.cat([torch.stack(pending), counts], dim=1)
        dist.all_reduce(stats_t)
        now = time.perf_counter()
        ips = stats_t[:, 2].sum().item() / max(now - t_last, 1e-9)
        for i, (ls, corr, cnt) in enumerate(stats_t.tolist()):
            rec = {"step": step - len(pending) + i + 1, "loss": ls / cnt, "acc": corr / cnt}
            res.history.append(rec)
            log.record(rec)
        rec = res.history[-1]
        log.record({"step": step, "lr": state["lr"], "img_per_s": ips})
        log.line(f"step {step:>6}/{total}  loss {rec['loss']:.4f}  acc {rec['acc']:.3f}  "
                 f"lr {state['lr']:.2e}  {ips:,.0f} img/s")
        log.advance(step - step_last, {"loss": f"{rec['loss']:.3f}", "img/s": f"{ips:,.0f}"})
        pending, pending_counts, t_last, step_last = [], [], time.perf_counter(), step

    # a gloo group for the per-step stop flag: agreeing on it costs no device synchronisation
    flag_group = dist.new_group(backend="gloo") if env.world_size > 1 and env.backend != "gloo" else None
    model.train()
    step = start
    batches = _batches(data.train, sampler, env, a.workers, a.seed)
    try:
        with StopSignals(flag_group) as stop:
            for x, y in batches:
                x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
                x, target = batch_aug(x, y, step)
                with autocast():
                    logits = train_model(_to_input(x, env, stats))
                if target.dim() == 2:  # mixup/cutmix: soft targets (timm's SoftTargetCrossEntropy)
                    loss = torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
                else:
                    loss = F.cross_entropy(logits.float(), target, label_smoothing=a.label_smoothing)
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
                state["lr"] = scheduler.get_last_lr()[0]
                scheduler.step()
                step += 1
                with torch.no_grad():  # no host-to-device copy per step: the count stays a Python int
                    pending.append(torch.stack([loss.detach().double() * y.numel(),
                                                (logits.argmax(-1) == y).sum().double()]))
                    pending_counts.append(int(y.numel()))
                last = step == total
                if step % a.log_every == 0 or last:
                    flush(step)
                if (a.eval_every and step % a.eval_every == 0) or last:
                    ev = {"step": step, **evaluate(train_model, data.val, env, a.batch_size, autocast, stats,
                                                   a.workers)}
                    res.evals.append(ev)
                    log.record(ev)
                    log.line(f"step {step:>6}  val loss {ev['val_loss']:.4f}  val acc {ev['val_acc']:.4f}")
                    t_last = time.perf_counter()
                if ckpt_root and ((a.save_every and step % a.save_every == 0) or last):
                    res.checkpoint = save(step)
                    t_last = time.perf_counter()
                signum = stop.agreed(env.world_size) if not last else 0
                if signum:  # every rank stops here, after the same step
                    flush(step)
                    if ckpt_root and checkpoint_step(res.checkpoint or "") != step:
                        res.checkpoint = save(step)
                    res.final_step = step
                    raise Interrupted(signum, step, total, res.checkpoint if ckpt_root else None, res)
    finally:
        batches.close()
        log.close()
    res.final_step = step
    return res


def _model_img_size(a: argparse.Namespace) -> int:
    if a.model.startswith("timm:"):
        return 224
    from ..models.registry import MODEL_CONFIGS

    cfg = MODEL_CONFIGS.get(a.model)
    return int(cfg["img_size"]) if cfg else 224


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        a = parse_args(argv)
    except SystemExit as e:  # argparse: 0 for --help, 2 for a bad option (already said in one line)
        return int(e.code or 0)
    try:
        run(a)
    except (UsageError, DataError, CheckpointError) as e:
        print(f"vitfast train: error: {_first_message(e)}", file=sys.stderr)
        return 2
    except Interrupted as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(_interrupted_message(e), file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:  # before the first step (the handlers are installed for the loop)
        print("vitfast train: interrupted before training started; nothing to save", file=sys.stderr)
        return 130
    finally:
        cleanup()
    return 0


def _interrupted_message(e: Interrupted) -> str:
    import signal

    head = f"vitfast train: stopped by {signal.Signals(e.signum).name} after step {e.step}/{e.total}"
    if e.checkpoint is None:
        return f"{head}; nothing saved (no --output-dir)"
    return f"{head}; saved {e.checkpoint}; continue with the same command and --resume auto"


def _first_message(e: BaseException) -> str:
    """The error's own message (DataLoader workers wrap it in a traceback text)."""
    text = str(e)
    if "Original Traceback" in text:
        text = text.strip().splitlines()[-1].split(": ", 1)[-1]
    return text


if __name__ == "__main__":
    sys.exit(main())
