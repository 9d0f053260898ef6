"""Building blocks of ``vitfast train`` (``vitfast/train.py``): data, process groups and model
wrapping, checkpoints."""

from .checkpoint import CheckpointError, find_latest, load_checkpoint, save_checkpoint
from .data import DataError, StepBatchSampler, load_digits, load_image_folder
from .dist import DistEnv, cleanup, setup, unwrap, wrap_model

__all__ = [
    "CheckpointError", "find_latest", "load_checkpoint", "save_checkpoint",
    "DataError", "StepBatchSampler", "load_digits", "load_image_folder",
    "DistEnv", "cleanup", "setup", "unwrap", "wrap_model",
]
