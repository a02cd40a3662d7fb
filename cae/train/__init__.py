"""Cycle training: losses, the trainer and checkpoints (no MLflow here: see callbacks)."""

from cae.train.checkpoint import TrainedModel, load_checkpoint
from cae.train.trainer import Callback, Trainer, TrainResult, train

__all__ = ["Callback", "TrainResult", "TrainedModel", "Trainer", "load_checkpoint", "train"]
