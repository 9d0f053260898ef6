"""Training data as uint8 image tensors, and a step-indexed sampler that makes runs resumable.

Two sources:

* :func:`load_digits` - scikit-learn's 1,797 real 8x8 handwritten digits (shipped inside the
  package, no network), upscaled to ``img_size`` and stored as one uint8 tensor, with a fixed
  train/validation split that does not depend on the training seed.
* :class:`ImageFolderData` - the user's ``root/<class>/<image>`` folder, decoded with PIL to
  uint8 ``[3, img_size, img_size]`` (shorter side resized, centre crop).

Images stay uint8 up to the model: FastViT normalises them inside its patch-embedding op.

:class:`StepBatchSampler` derives every batch from ``(seed, global step)`` alone: the global
batch of step ``s`` is a slice of a per-epoch permutation, and rank ``r`` takes its
``r``-th part. Resuming at step ``s`` therefore needs no loader state, and ``W`` processes with
batch ``b`` see exactly the images one process with batch ``W*b`` sees.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

__all__ = [
    "DataError",
    "TensorImages",
    "ImageFolderData",
    "TrainData",
    "load_digits",
    "load_image_folder",
    "StepBatchSampler",
    "eval_indices",
    "IMG_EXTENSIONS",
]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
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
def _scan_folder(root: str) -> Tuple[List[str], List[Tuple[str, int]]]:
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
    samples: List[Tuple[str, int]] = []
    for label, cls in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(os.path.join(root, cls), followlinks=True)):
            samples += [(os.path.join(dirpath, f), label) for f in sorted(files) if f.lower().endswith(IMG_EXTENSIONS)]
    if not samples:
        raise DataError(
            f"--data-dir {root!r} has {len(classes)} class folder(s) ({', '.join(classes[:5])}"
            f"{', ...' if len(classes) > 5 else ''}) but no image files in them "
            f"(looked for {', '.join(IMG_EXTENSIONS)})"
        )
    return classes, samples


def _check_headers(samples: Sequence[Tuple[str, int]]) -> None:
    """Open every file's header (PIL reads no pixels here) so that a non-image is reported by
    name before training starts rather than from inside a DataLoader worker."""
    from PIL import Image, UnidentifiedImageError

    bad = []
    for path, _ in samples:
        try:
            with Image.open(path) as im:
                im.size  # noqa: B018 - parsed from the header
        except (UnidentifiedImageError, OSError, ValueError) as e:
            bad.append(f"{path} ({type(e).__name__})")
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise DataError(f"--data-dir: {len(bad)} file(s) are not readable images: {'; '.join(bad[:5])}{more}")


class ImageFolderData(Dataset):
    """``(path, label)`` samples decoded with PIL to uint8 ``[3, size, size]``:
    RGB, shorter side resized to ``size`` (bilinear), centre crop."""

    def __init__(self, samples: Sequence[Tuple[str, int]], img_size: int):
        self.samples, self.img_size = list(samples), img_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        import numpy as np
        from PIL import Image

        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                w, h = im.size
                s = self.img_size / min(w, h)
                im = im.resize((max(self.img_size, round(w * s)), max(self.img_size, round(h * s))), Image.BILINEAR)
                w, h = im.size
                left, top = (w - self.img_size) // 2, (h - self.img_size) // 2
                im = im.crop((left, top, left + self.img_size, top + self.img_size))
                arr = np.asarray(im, dtype=np.uint8).copy()
        except OSError as e:
            raise DataError(f"cannot decode image {path}: {e}") from e
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous(), label


def load_image_folder(root: str, img_size: int, val_fraction: float = 0.1, check_images: bool = True) -> TrainData:
    """``root/<class>/<image>``; ``root/train`` + ``root/val`` when both exist, otherwise a fixed
    ``val_fraction`` split (seeded, stratified by nothing: a random permutation)."""
    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    if os.path.isdir(train_dir) and os.path.isdir(val_dir):
        classes, train = _scan_folder(train_dir)
        val_classes, val = _scan_folder(val_dir)
        if val_classes != classes:
            raise DataError(f"--data-dir {root!r}: train/ and val/ have different class folders")
    else:
        classes, samples = _scan_folder(root)
        perm = torch.randperm(len(samples), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED)).tolist()
        n_val = int(round(len(samples) * val_fraction)) if len(samples) > 1 else 0
        val = [samples[i] for i in sorted(perm[:n_val])]
        train = [samples[i] for i in sorted(perm[n_val:])]
    if check_images:
        _check_headers(train + val)
    return TrainData(
        train=ImageFolderData(train, img_size),
        val=ImageFolderData(val, img_size),
        num_classes=len(classes),
        in_chans=3,
        img_size=img_size,
        classes=classes,
        description=f"ImageFolder {root}: {len(classes)} classes, {len(train)} train / {len(val)} val, "
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
