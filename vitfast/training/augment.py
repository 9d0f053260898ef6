"""Training augmentation through timm's factories, on uint8 images.

* Per image (in the DataLoader workers): ``timm.data.create_transform`` with the model's data
  config (``timm.data.resolve_data_config`` of its ``pretrained_cfg``: size, interpolation,
  crop_pct, mean/std for auto-augment's fill colour) and ``normalize=False``, so images leave
  the workers as uint8 ``[3, H, W]`` tensors and FastViT normalises them inside its fused patch
  embedding. Training: random-resized crop, flip, colour jitter or ``--aa`` (timm's rule: an
  auto-augment policy replaces the jitter), as timm's train.py;
  validation: resize and centre crop by ``crop_pct``.
* Per batch (on the device, :class:`BatchAugment`): Mixup/CutMix (``timm.data.Mixup``, soft
  targets for a soft-target cross-entropy) and random erasing (``timm.data.RandomErasing``),
  done where timm's train.py does them with its prefetcher. The batch stays uint8: mixup is
  computed in float pixel space (normalisation is affine per channel, so mixing before or after
  it is the same) and rounded back (at most 0.5/255 off); erasing runs in normalised space, as
  timm's, and comes back clamped to 0..255.

Every random draw is seeded by ``(seed, step, image index)`` (:class:`StepSeeded`) or
``(seed, step, rank)`` (:class:`BatchAugment`): an augmented run resumed from a checkpoint repeats
the uninterrupted run exactly, whatever the number of DataLoader workers.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

__all__ = ["AugConfig", "data_config", "image_transforms", "BatchAugment", "StepSeeded", "StepKeys", "seeded"]

_MIX = 1_000_003


@dataclass
class AugConfig:
    """The augmentation options of ``vitfast train`` (timm's train.py names and defaults)."""

    no_aug: bool = False
    aa: Optional[str] = None
    color_jitter: float = 0.4
    hflip: float = 0.5
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    reprob: float = 0.0
    remode: str = "pixel"
    label_smoothing: float = 0.0

    @property
    def mixes(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    def describe(self) -> str:
        if self.no_aug:
            per_image = "no augmentation"
        else:
            per_image = f"random-resized crop, flip {self.hflip:g}, " + (
                f"auto-augment {self.aa}" if self.aa else f"colour jitter {self.color_jitter:g}")
        batch = [f"mixup {self.mixup:g}"] * (self.mixup > 0) + [f"cutmix {self.cutmix:g}"] * (self.cutmix > 0)
        batch += [f"random erasing {self.reprob:g}"] * (self.reprob > 0)
        return per_image + "".join(f", {b}" for b in batch)


@contextlib.contextmanager
def seeded(seed: int, device: Optional[torch.device] = None) -> Iterator[None]:
    """Python's, NumPy's and torch's generators (the CPU's and ``device``'s) seeded with ``seed``
    inside the block and restored after it: the training streams are left as they were."""
    seed = seed % (2**63)
    devices = [device] if device is not None and device.type == "cuda" else []
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        if devices:
            torch.cuda.default_generators[devices[0].index or 0].manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % (2**32))
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def data_config(model: torch.nn.Module, img_size: int) -> Dict[str, Any]:
    """timm's data config of ``model`` (its ``pretrained_cfg``) at ``img_size``."""
    from timm.data import resolve_data_config

    return resolve_data_config({"input_size": (3, img_size, img_size)}, model=model)


def image_transforms(cfg: Dict[str, Any], aug: AugConfig) -> Tuple[Any, Any]:
    """(training, evaluation) transforms from timm's factory: PIL image -> uint8 ``[3, H, W]``."""
    from timm.data import create_transform

    common = dict(input_size=cfg["input_size"], interpolation=cfg["interpolation"], mean=cfg["mean"],
                  std=cfg["std"], normalize=False)
    train = create_transform(is_training=True, no_aug=aug.no_aug, hflip=aug.hflip, color_jitter=aug.color_jitter,
                             auto_augment=aug.aa, re_prob=0.0, **common)
    val = create_transform(is_training=False, crop_pct=cfg["crop_pct"], crop_mode=cfg.get("crop_mode", "center"),
                           **common)
    return train, val


class BatchAugment:
    """Mixup/CutMix and random erasing of a uint8 batch on its device (see the module docstring).
    ``active`` is False when neither is asked for; then batches pass through unchanged."""

    def __init__(self, aug: AugConfig, num_classes: int, mean: Sequence[float], std: Sequence[float],
                 device: torch.device, seed: int, rank: int):
        self.aug, self.device, self.seed, self.rank = aug, device, seed, rank
        self.mix = self.erase = None
        if aug.mixes:
            from timm.data import Mixup

            self.mix = Mixup(mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix, prob=aug.mixup_prob,
                             switch_prob=aug.mixup_switch_prob, label_smoothing=aug.label_smoothing,
                             num_classes=num_classes)
        if aug.reprob > 0:
            from timm.data.random_erasing import RandomErasing

            self.erase = RandomErasing(aug.reprob, mode=aug.remode, device=str(device))
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1) * 255.0
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1) * 255.0

    @property
    def active(self) -> bool:
        return self.mix is not None or self.erase is not None

    def __call__(self, x: torch.Tensor, y: torch.Tensor, step: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(images, targets)``: uint8 images, and soft targets ``[B, classes]`` when mixing."""
        if not self.active:
            return x, y
        with seeded((self.seed * _MIX + step) * _MIX + self.rank, self.device):
            xf = x.float()
            if self.mix is not None:
                xf, y = self.mix(xf, y)
            if self.erase is not None:
                xf = self.erase((xf - self.mean) / self.std) * self.std + self.mean
            return xf.round_().clamp_(0, 255).to(torch.uint8), y


class StepKeys(Sampler[List[Tuple[int, int]]]):
    """A step-indexed batch sampler's batches as ``(step, index)`` keys (for :class:`StepSeeded`)."""

    def __init__(self, sampler):
        self.sampler = sampler

    def __iter__(self):
        for step, batch in enumerate(self.sampler, self.sampler.start_step):
            yield [(step, i) for i in batch]

    def __len__(self) -> int:
        return len(self.sampler)


class StepSeeded(Dataset):
    """``dataset[i]`` for the key ``(step, i)``, its random transforms seeded by ``(seed, step, i)``."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Tuple[int, int]):
        step, i = key
        with seeded((self.seed * _MIX + step) * _MIX + i):
            return self.dataset[i]
