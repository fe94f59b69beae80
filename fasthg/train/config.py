"""TrainConfig, every setting of a training run, and the one table of the settings whose
default depends on the device."""
import dataclasses
from typing import Optional

# setting: (GPU, CPU). The GPU column is the paper's setting. The CPU one makes the default
# run end in minutes on 2 cores: 128x128 input (32x32 heatmaps) with sigma 2 px (sigma 1 px
# left the net predicting near-zero maps for minutes), Adam on batches of 8 (twice the
# updates of 16 per image, faster per minute), channels_last (a quarter faster per step).
DEVICE_DEFAULTS = {
    "input_size": (256, 128),
    "stacks": (8, 2),
    "features": (256, 64),
    "depth": (4, 3),
    "sigma": (None, 2.0),
    "optimizer": ("rmsprop", "adam"),
    "lr": (2.5e-4, 2e-3),
    "lr_drops": ((), (12,)),
    "epochs": (100, 16),
    "batch_size": (16, 8),
    "train_size": (20000, 1600),
    "val_size": (500, 300),
    "workers": (8, 1),
    "channels_last": (False, True),
}


def device_defaults(device_type: str) -> dict:
    """The DEVICE_DEFAULTS column of a device type ("cuda": the GPU's, anything else: the CPU's)."""
    col = 0 if device_type == "cuda" else 1
    return {k: v[col] for k, v in DEVICE_DEFAULTS.items()}


_GPU = device_defaults("cuda")


@dataclasses.dataclass
class TrainConfig:
    """A field's default is the GPU column of DEVICE_DEFAULTS where it has one;
    `TrainConfig.for_device("cpu", ...)` starts from the CPU column instead."""
    out: str = "runs/train"
    stacks: int = _GPU["stacks"]
    features: int = _GPU["features"]
    depth: int = _GPU["depth"]
    input_size: int = _GPU["input_size"]
    sigma: Optional[float] = _GPU["sigma"]  # heatmap Gaussian std in output pixels (None: output/64)
    backend: str = "auto"
    epochs: int = _GPU["epochs"]
    batch_size: int = _GPU["batch_size"]  # per process (the global batch is batch_size x processes)
    accumulate: int = 1                  # optimizer step every `accumulate` batches
    check_every: int = 16                # the host waits for the device's losses (log, non-finite check,
                                         # progress bar, agreeing to stop) every this many batches
    optimizer: str = _GPU["optimizer"]   # rmsprop (the paper's), adam, sgd (momentum 0.9)
    lr: float = _GPU["lr"]
    lr_drops: tuple = _GPU["lr_drops"]   # epochs at which the learning rate is multiplied by lr_gamma
    lr_gamma: float = 0.1
    train_size: int = _GPU["train_size"]  # synthetic people per epoch
    val_size: int = _GPU["val_size"]
    mpii_h5_train: Optional[str] = None
    mpii_json_train: Optional[str] = None  # MPII JSON list (bearpaw: its training people; HRNet: all)
    mpii_h5_valid: Optional[str] = None    # validation needs the HDF5's head sizes for PCKh
    coco_train: Optional[str] = None       # COCO person_keypoints JSON: 17 joints, validated by OKS AP
    coco_valid: Optional[str] = None
    images: Optional[str] = None
    valid_images: Optional[str] = None     # the validation file's image folder, if not `images` (COCO's val2017)
    workers: int = _GPU["workers"]
    seed: int = 0
    device: str = "auto"
    amp: str = "none"                    # none, bf16, fp16 (fp16: CUDA, with a grad scaler)
    channels_last: bool = _GPU["channels_last"]
    compile: bool = False
    sync_bn: bool = False                # BN-ReLU statistics over all processes (torchrun)
    cuda_graphs: bool = False            # capture the whole step once, replay it (static shapes)
    flip_test: bool = False
    tensorboard: bool = False
    progress: bool = True

    @classmethod
    def for_device(cls, device_type: str, **settings) -> "TrainConfig":
        """The defaults of `device_type` ("cuda" or "cpu"), overridden by `settings`."""
        return cls(**{**device_defaults(device_type), **settings})
