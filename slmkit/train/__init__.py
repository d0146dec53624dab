"""Training: the loop (`train`), optimizers and schedules."""

from slmkit.train.loop import TrainResult, train

__all__ = ["TrainResult", "train"]
