"""TrainConfig, every setting of a training run, and the one table of the settings whose
default depends on the device."""
import dataclasses
import os
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
    # On a CPU the loader shares the cores with the step: with 2 cores a worker process costs the
    # step more than loading in the main process does (synthetic people drawn once, then cached).
    "workers": (8, 0 if (os.cpu_count() or 1) <= 4 else 2),
    "channels_last": (False, True),
    # auto: bf16 autocast where the CPU computes bf16 (AMX, AVX512_BF16), float32 elsewhere
    "amp": ("none", "auto"),
}

AMP_MODES = ("none", "bf16", "fp16", "auto")


def resolve_amp(amp: str, device) -> str:
    """The autocast mode (none, bf16, fp16) a setting means on a torch.device: "auto" is bf16 on
    a CPU with bf16 instructions, where oneDNN's bf16 convolutions are faster than float32
    ones, and none elsewhere (without them bf16 is converted to float32 and back: slower)."""
    if amp != "auto":
        return amp
    from fasthg.device import cpu_computes_bf16

    return "bf16" if device.type == "cpu" and cpu_computes_bf16() else "none"


def metric_of(cfg) -> str:
    """The validation metric of a TrainConfig's data: OKS AP for COCO's 17 joints (no head
    boxes), PCKh otherwise (fasthg.evaluate.METRICS)."""
    return "oks" if (cfg.coco_train or cfg.coco_valid) else "pckh"


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
    init: Optional[str] = None           # a checkpoint whose weights start the run (fasthg.train.init)
    stacks: int = _GPU["stacks"]
    features: int = _GPU["features"]
    depth: int = _GPU["depth"]
    blocks: int = 1                      # residual modules at each place (the paper's equal-parameter variants)
    input_size: int = _GPU["input_size"]
    sigma: Optional[float] = _GPU["sigma"]  # heatmap Gaussian std in output pixels (None: output/64)
    backend: str = "auto"
    supervision: str = "all"             # the loss on every stack's heatmaps (the paper's), or on the last only
    memory: str = "default"              # recompute: BN-ReLU-conv units save half the activations (StackedHourglass);
                                         # same numerics up to rounding, so a resumed run may change it
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
    bad_images: str = "stop"               # a bad image file of MPII/COCO people: stop (an error naming it) or skip
                                           # the person (training: the next person takes its place; validation:
                                           # unscored); fasthg.data.dataset.SkipBadImages
    workers: int = _GPU["workers"]
    seed: int = 0
    device: str = "auto"
    amp: str = _GPU["amp"]               # none, bf16, fp16 (CUDA, with a grad scaler), auto (resolve_amp)
    minutes: Optional[float] = None      # time budget: the run stops, checkpointed and validated, after it
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


# Settings a resumed run cannot change, and why: its weights, optimizer state, data order and
# best score all belong to the checkpoint's values.
_FIXED_ON_RESUME = {
    **dict.fromkeys(("stacks", "features", "depth", "blocks"), "the checkpoint's weights have the model shape it names"),
    **dict.fromkeys(("input_size", "sigma"), "the network learned heatmaps of that size and width"),
    "seed": "the data order, augmentation and random streams of the run follow it",
    **dict.fromkeys(("train_size", "mpii_h5_train", "mpii_json_train", "coco_train", "images"),
                    "the run's data order is a permutation of its training people"),
    **dict.fromkeys(("val_size", "mpii_h5_valid", "coco_valid", "valid_images"),
                    "the best score so far (best.pt) was measured on that validation set"),
    "optimizer": "the checkpoint holds that optimizer's state (start a new run to change it)",
}
# Settings a resumed run may change only between epochs (step_in_epoch 0).
_EPOCH_BOUNDARY_ON_RESUME = ("batch_size", "accumulate")


def resume_changes(saved: dict, cfg: TrainConfig) -> dict:
    """{setting: (the checkpoint's value, cfg's)} for each setting of `cfg` that differs from a
    checkpoint's config `saved`. Settings `saved` lacks (an older checkpoint's) count as unchanged."""
    changes = {}
    for name, given in dataclasses.asdict(cfg).items():
        if name in saved:
            old = tuple(saved[name]) if isinstance(given, tuple) else saved[name]
            if old != given:
                changes[name] = (old, given)
    return changes


def check_resume_changes(changes: dict, step_in_epoch: int) -> None:
    """Raises ValueError naming each of `changes` (resume_changes') that a run resumed at step
    `step_in_epoch` of its epoch cannot make: with the checkpoint's value, the given one and why."""
    problems = []
    for name, (old, given) in changes.items():
        why = _FIXED_ON_RESUME.get(name)
        if name == "amp" and "fp16" in (old, given):
            why = "fp16 trains with a grad scaler whose state the other modes do not have (none, bf16 and auto may swap)"
        elif name in _EPOCH_BOUNDARY_ON_RESUME and step_in_epoch:
            why = (f"the checkpoint stopped at step {step_in_epoch} of an epoch, whose data order is in batches of "
                   f"the old size; it may change when resuming from a checkpoint written at an epoch's end")
        if why:
            problems.append(f"{name}: the checkpoint has {old!r}, given {given!r}; {why}")
    if problems:
        raise ValueError("cannot resume with these settings changed:\n  " + "\n  ".join(problems))
