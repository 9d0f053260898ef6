"""Training data as uint8 image tensors, and a step-indexed sampler that makes runs resumable.

Two sources:

* :func:`load_digits` - scikit-learn's 1,797 real 8x8 handwritten digits (shipped inside the
  package, no network), upscaled to ``img_size`` and stored as one uint8 tensor, with a fixed
  train/validation split that does not depend on the training seed.
* :func:`load_image_folder` - the user's ``root/<class>/<image>`` folder through timm's dataset
  factory (files listed, not opened, at start-up), with timm's transforms
  (:mod:`vitfast.training.augment`) producing uint8 ``[3, img_size, img_size]``.

Images stay uint8 up to the model: FastViT normalises them inside its patch-embedding op.

:class:`StepBatchSampler` derives every batch from ``(seed, global step)`` alone: the global
batch of step ``s`` is a slice of a per-epoch permutation, and rank ``r`` takes its
``r``-th part. Resuming at step ``s`` therefore needs no loader state, and ``W`` processes with
batch ``b`` see exactly the images one process with batch ``W*b`` sees.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

__all__ = [
    "DataError",
    "TensorImages",
    "FolderData",
    "TrainData",
    "load_digits",
    "load_image_folder",
    "StepBatchSampler",
    "eval_indices",
]

DIGITS_SPLIT_SEED = 0  # the train/val split is fixed, whatever --seed is
DIGITS_VAL = 297  # 1,500 train / 297 validation images


class DataError(ValueError):
    """The data the user pointed at cannot be used (the message says why and what was expected)."""


class TensorImages(Dataset):
    """Images already in memory: ``images`` uint8 ``[N, C, H, W]``, ``labels`` int64 ``[N]``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be a uint8 [N, C, H, W] tensor, got {images.dtype} {list(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must be [{images.shape[0]}], got {list(labels.shape)}")
        self.images, self.labels = images, labels.long()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])

    def batch(self, indices: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """A whole batch by indexing (no per-item Python for in-memory data)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.images[idx], self.labels[idx]


@dataclass
class TrainData:
    train: Dataset
    val: Dataset
    num_classes: int
    in_chans: int
    img_size: int
    classes: List[str]
    description: str

    def set_transforms(self, train, val) -> None:
        """Per-image transforms of the two splits (folder data; in-memory tensors take none)."""
        for ds, tf in ((self.train, train), (self.val, val)):
            if isinstance(ds, FolderData):
                ds.base.transform = tf


def load_digits(img_size: int = 32) -> TrainData:
    """scikit-learn's digits (16 grey levels, 8x8), bilinearly upscaled to ``img_size`` uint8."""
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise DataError(
            "the digits data set needs scikit-learn: pip install scikit-learn "
            "(or pip install 'vitfast[train]'), or train on your own images with --data-dir"
        ) from e
    d = _sk_load_digits()
    x = torch.from_numpy(d.images).float().unsqueeze(1) * (255.0 / 16.0)  # [N, 1, 8, 8] in 0..255
    if img_size != 8:
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    images = x.round_().clamp_(0, 255).to(torch.uint8).contiguous()
    labels = torch.from_numpy(d.target).long()
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    val_idx, train_idx = perm[:DIGITS_VAL].sort().values, perm[DIGITS_VAL:].sort().values
    return TrainData(
        train=TensorImages(images[train_idx], labels[train_idx]),
        val=TensorImages(images[val_idx], labels[val_idx]),
        num_classes=10,
        in_chans=1,
        img_size=img_size,
        classes=[str(i) for i in range(10)],
        description=f"scikit-learn digits: {len(train_idx)} train / {len(val_idx)} val, 1x{img_size}x{img_size} uint8",
    )


# -- ImageFolder --------------------------------------------------------------------------------
def _check_root(root: str) -> List[str]:
    """The class folders of ``root`` (reading directory entries only, never a file)."""
    if not os.path.exists(root):
        raise DataError(f"--data-dir {root!r} does not exist")
    if not os.path.isdir(root):
        raise DataError(f"--data-dir {root!r} is not a directory (expected {root}/<class>/<image files>)")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(
            f"--data-dir {root!r} has no class sub-folders: expected the ImageFolder layout "
            f"{root}/<class name>/<image files>"
        )
    return classes


def _folder_dataset(root: str, class_map=None):
    """timm's folder dataset (``timm.data.create_dataset``): files listed by name and extension,
    none opened until it is read; an unreadable image is skipped with a warning when read."""
    classes = _check_root(root)
    try:
        from timm.data import create_dataset
    except ImportError as e:
        raise DataError("--data-dir reads images through timm: pip install timm (or 'vitfast[train]')") from e
    try:
        return create_dataset("", root=root, search_split=False, class_map=class_map)
    except RuntimeError as e:  # timm: "Found 0 images in subfolders of ..."
        if "Found 0 images" not in str(e):
            raise
        from timm.data.readers.img_extensions import get_img_extensions

        raise DataError(
            f"--data-dir {root!r} has {len(classes)} class folder(s) ({', '.join(classes[:5])}"
            f"{', ...' if len(classes) > 5 else ''}) but no image files in them "
            f"(looked for {', '.join(sorted(get_img_extensions()))})"
        ) from e


class FolderData(Dataset):
    """Part of a timm folder dataset (``indices``, all of it when None) with its own transform
    (set by :meth:`TrainData.set_transforms` once the model's data config is known)."""

    def __init__(self, base, indices: Optional[Sequence[int]] = None):
        self.base, self.indices = copy.copy(base), None if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.base) if self.indices is None else len(self.indices)

    def __getitem__(self, i: int):
        return self.base[i if self.indices is None else self.indices[i]]


def load_image_folder(root: str, img_size: int, val_fraction: float = 0.1) -> TrainData:
    """``root/<class>/<image>`` through timm's dataset factory; ``root/train`` + ``root/val`` when
    both exist, otherwise a fixed ``val_fraction`` split (a seeded random permutation). Start-up
    lists the files and opens none of them. Images come out as PIL images until
    :meth:`TrainData.set_transforms` gives the splits their transforms."""
    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    if os.path.isdir(train_dir) and os.path.isdir(val_dir):
        base = _folder_dataset(train_dir)
        class_to_idx = dict(base.reader.class_to_idx)
        val_base = _folder_dataset(val_dir, class_map=class_to_idx)
        train, val = FolderData(base), FolderData(val_base)
    else:
        base = _folder_dataset(root)
        class_to_idx = dict(base.reader.class_to_idx)
        n = len(base)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED)).tolist()
        n_val = int(round(n * val_fraction)) if n > 1 else 0
        train, val = FolderData(base, sorted(perm[n_val:])), FolderData(base, sorted(perm[:n_val]))
    classes = sorted(class_to_idx, key=class_to_idx.__getitem__)
    return TrainData(
        train=train,
        val=val,
        num_classes=len(classes),
        in_chans=3,
        img_size=img_size,
        classes=classes,
        description=f"image folder {root} (timm): {len(classes)} classes, {len(train)} train / {len(val)} val, "
        f"3x{img_size}x{img_size} uint8",
    )


# -- sampling -----------------------------------------------------------------------------------
class StepBatchSampler(Sampler[List[int]]):
    """Yields this rank's batch of indices for steps ``start_step .. total_steps - 1``.

    Each epoch is a permutation of ``range(n)`` seeded by ``(seed, epoch)``, cut into
    ``n // (batch_size * world_size)`` global batches (the tail is dropped so that every step
    has a full batch); rank ``r`` takes elements ``[r*b, (r+1)*b)`` of the global batch.
    """

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int, seed: int,
                 total_steps: int, start_step: int = 0):
        self.global_batch = batch_size * world_size
        if n < self.global_batch:
            raise DataError(
                f"the training set has {n} images, fewer than one global batch "
                f"({batch_size} per process x {world_size} processes = {self.global_batch})"
            )
        self.n, self.batch_size, self.rank, self.seed = n, batch_size, rank, seed
        self.total_steps, self.start_step = total_steps, start_step
        self.steps_per_epoch = n // self.global_batch

    def _perm(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def batch_indices(self, step: int) -> List[int]:
        epoch, i = divmod(step, self.steps_per_epoch)
        lo = i * self.global_batch + self.rank * self.batch_size
        return self._perm(epoch)[lo : lo + self.batch_size].tolist()

    def __iter__(self) -> Iterator[List[int]]:
        perm_epoch, perm = -1, None
        for step in range(self.start_step, self.total_steps):
            epoch, i = divmod(step, self.steps_per_epoch)
            if epoch != perm_epoch:
                perm_epoch, perm = epoch, self._perm(epoch)
            lo = i * self.global_batch + self.rank * self.batch_size
            yield perm[lo : lo + self.batch_size].tolist()

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step)


def eval_indices(n: int, rank: int, world_size: int) -> Tuple[List[int], int]:
    """This rank's share of ``range(n)`` for evaluation: ``indices[rank::world]`` padded with
    index 0 to the same length on every rank (so that FSDP's collectives line up), and how many
    of them are real (the padding is not counted)."""
    mine = list(range(rank, n, world_size))
    per_rank = -(-n // world_size)
    return mine + [0] * (per_rank - len(mine)), len(mine)
