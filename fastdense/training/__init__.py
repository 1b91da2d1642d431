"""Training machinery behind ``fastdense-train``: config, optimisers and schedules, checkpoints, the loop."""

from fastdense.training.checkpoint import CheckpointError, RunDirError, load_checkpoint, save_checkpoint
from fastdense.training.loop import NonFiniteLossError, Trainer
from fastdense.training.optim import LARS, Schedule, build_optimizer, param_groups, scaled_lr
from fastdense.training.sync_batchnorm import CPUSyncBatchNorm

__all__ = [
    "CheckpointError", "LARS", "NonFiniteLossError", "RunDirError", "Schedule", "CPUSyncBatchNorm", "Trainer", "build_optimizer", "load_checkpoint",
    "param_groups", "save_checkpoint", "scaled_lr",
]
