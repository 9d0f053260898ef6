"""Building blocks of ``vitfast train`` (``vitfast/cli/train.py``): data (``data``; timm's
transforms and batch augmentation in ``augment``), process groups and model wrapping (``dist``),
stopping on SIGINT/SIGTERM (``interrupt``), training checkpoints (:func:`save_checkpoint` / :func:`resume_checkpoint`: model,
optimizer, schedule, step and RNG; model weights alone load with :func:`vitfast.load_weights`)."""

from .checkpoint import CheckpointError, find_latest, resume_checkpoint, save_checkpoint
from .data import DataError, StepBatchSampler, load_digits, load_image_folder
from .dist import DistEnv, cleanup, setup, unwrap, wrap_model

__all__ = [
    "CheckpointError", "find_latest", "resume_checkpoint", "save_checkpoint",
    "DataError", "StepBatchSampler", "load_digits", "load_image_folder",
    "DistEnv", "cleanup", "setup", "unwrap", "wrap_model",
]
