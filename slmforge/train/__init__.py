"""Training: one loop (loop.py) shared by pretraining, finetuning and distillation."""

from slmforge.train.loop import TrainConfig, TrainingInterrupted, TrainResult, plot_loss_curve, train

__all__ = ["TrainConfig", "TrainResult", "TrainingInterrupted", "plot_loss_curve", "train"]
