"""`fasthg train --init CKPT`: a new run whose model starts from a checkpoint's weights
(fasthg's, or one fasthg.models.from_checkpoint converts), with a fresh optimizer, schedule
and epoch count. The model is the checkpoint's: the command line adopts its stack count,
width and depth where they are not given, and a run whose settings name another shape, or
whose data has another joint count, is refused (no weights are cut or padded to fit)."""
from typing import Optional

from fasthg.models import StackedHourglass
from fasthg.models.convert import Checkpoint, build, read_checkpoint
from fasthg.models.hourglass import complete_config

# TrainConfig's settings of the model's shape, and the model config's names for them.
SHAPE = {"stacks": "num_stacks", "features": "num_features", "depth": "depth", "blocks": "num_blocks"}


def init_model(cfg, joints: int, ckpt: Optional[Checkpoint] = None, trust: bool = False) -> StackedHourglass:
    """cfg.init's model with its weights, in training mode; ValueError naming the settings
    where cfg (a TrainConfig) or the data's `joints` ask for another shape. `ckpt`: the
    checkpoint as read_checkpoint(cfg.init) gave it, for a caller that read it already.
    `trust`: read it by full unpickling instead of safely (only for a file you trust)."""
    ckpt = read_checkpoint(cfg.init, trust=trust) if ckpt is None else ckpt
    config = complete_config(ckpt.config)
    differ = [f"--{name} {getattr(cfg, name)} (it has {config[key]})"
              for name, key in SHAPE.items() if getattr(cfg, name) != config[key]]
    if differ:
        raise ValueError(f"--init {cfg.init}: the run asks for another model than the checkpoint's: "
                         f"{', '.join(differ)}; leave those out to take the checkpoint's")
    if ckpt.config["num_joints"] != joints:
        raise ValueError(f"--init {cfg.init}: a model of {ckpt.config['num_joints']} joints, and the training data "
                         f"has {joints}")
    return build(ckpt, backend=cfg.backend, memory=cfg.memory).train()
