"""Training: the settings (fasthg.train.config) and the loop (fasthg.train.trainer)."""
from fasthg.train.config import DEVICE_DEFAULTS, TrainConfig, device_defaults
from fasthg.train.trainer import Trainer, heatmap_loss

__all__ = ["DEVICE_DEFAULTS", "TrainConfig", "Trainer", "device_defaults", "heatmap_loss"]
