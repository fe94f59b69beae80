"""`fasthg train`: the README's main job."""
import dataclasses

from fasthg.cli import args as types
from fasthg.data.dataset import BAD_IMAGES
from fasthg.device import resolve as resolve_device
from fasthg.train import DEVICE_DEFAULTS, TrainConfig, Trainer, device_defaults
from fasthg.train.config import check_resume_changes, resume_changes


def config_from_args(args, state=None) -> TrainConfig:
    """Device defaults (or, when resuming, the checkpoint's config), then the flags given.
    When resuming, raises ValueError for a flag given that a run cannot change mid-way
    (Trainer.resume's rules), before a Trainer is built with it. With --init, the model's
    shape is the init checkpoint's where no flag gives it. `state`: the resumed checkpoint,
    for a caller that read it already."""
    gpu = resolve_device(args.device or "auto").type == "cuda"
    if args.resume and getattr(args, "init", None):
        raise types.UsageError("--init starts a new run from a checkpoint's weights and --resume continues a run "
                               "(with the weights it started from): give one of them")
    if args.resume:
        from fasthg import checkpoint

        state = checkpoint.read(args.resume, args.trust_checkpoint) if state is None else state
        values = dict(state["config"])
        values["lr_drops"] = tuple(values["lr_drops"])
        values.pop("minutes", None)  # a time budget is the invocation's, not the run's
    else:
        values = device_defaults("cuda" if gpu else "cpu")
        if getattr(args, "init", None):
            values.update(init_shape(args.init, args.trust_checkpoint))
    for f in dataclasses.fields(TrainConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    cfg = TrainConfig(**values)
    if args.resume:
        check_resume_changes(resume_changes(state["config"], cfg), state["step_in_epoch"])
    return cfg


def init_shape(path: str, trust: bool = False) -> dict:
    """The model shape settings (stacks, features, depth) of an --init checkpoint."""
    import warnings

    from fasthg.models.convert import read_checkpoint
    from fasthg.models.hourglass import complete_config
    from fasthg.train.init import SHAPE

    with warnings.catch_warnings():  # the Trainer's reading of it says the same again
        warnings.simplefilter("ignore")
        config = read_checkpoint(path, trust=trust).config
    return {name: complete_config(config)[key] for name, key in SHAPE.items()}


def run_train(args) -> int:
    state = None
    if args.resume and not getattr(args, "init", None):
        from fasthg import checkpoint

        state = checkpoint.read(args.resume, args.trust_checkpoint)
    cfg = config_from_args(args, state)
    if args.keep_freed_memory and resolve_device(cfg.device).type == "cpu":
        # Fresh activations otherwise page-fault every step. The process is ours: its memory
        # stays at its peak, which a training run reaches at the first step anyway.
        from fasthg.bench import malloc

        malloc.keep_freed_memory()
    trainer = Trainer(cfg, model_config=state["model_config"] if state else None,
                      trust_checkpoint=args.trust_checkpoint)
    try:
        if args.resume:
            trainer.resume(args.resume, args.trust_checkpoint)
        if trainer.is_main:
            print(f"training on {trainer.device} x {trainer.world} process(es): {dataclasses.asdict(trainer.cfg)}")
        trainer.fit()
        if trainer.is_main:
            print(trainer.summary())
    finally:
        trainer.close()
    return 0


def _shown(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def default(name: str) -> str:
    """A setting's default as help text: "GPU x, CPU y" where DEVICE_DEFAULTS gives one per device."""
    if name in DEVICE_DEFAULTS:
        gpu, cpu = ("output size/64" if v is None else _shown(v) for v in DEVICE_DEFAULTS[name])
        return f"default: GPU {gpu}, CPU {cpu}"
    return f"default: {_shown(TrainConfig.__dataclass_fields__[name].default)}"


# setting: (type, help); the help gets its default appended.
_SETTINGS = {
    "input_size": (types.positive_int, "network input size in pixels (the heatmaps are a quarter of it)"),
    "stacks": (types.positive_int, "hourglasses stacked"),
    "features": (types.positive_int, "channels inside the hourglasses"),
    "depth": (types.positive_int, "downsamplings per hourglass"),
    "blocks": (types.positive_int, "residual modules at each place of the hourglasses and features (the paper's "
                                   "equal-parameter study: 2 stacks of 4, 4 of 2, 8 of 1)"),
    "sigma": (types.positive_float, "heatmap Gaussian std in heatmap pixels"),
    "epochs": (types.positive_int, "epochs to train (when resuming: the total, counting those done)"),
    "batch_size": (types.positive_int, "images per batch and process (the global batch is this x processes)"),
    "accumulate": (types.positive_int, "batches per optimizer step"),
    "lr": (types.positive_float, "learning rate"),
    "lr_gamma": (types.positive_float, "factor of each learning-rate drop"),
    "train_size": (types.positive_int, "synthetic training people per epoch"),
    "val_size": (types.positive_int, "synthetic validation people"),
    "workers": (types.natural_int, "data-loading processes"),
    "seed": (types.natural_int, "random seed of initialisation, data and augmentation"),
    "check_every": (types.positive_int, "steps between the host's reads of the losses (the non-finite check, "
                                        "the progress bar's loss); each read waits for the GPU"),
    "lr_drops": (types.epochs, "comma-separated epochs at which the learning rate drops ('' for none)"),
}
_SWITCHES = {
    "channels_last": "channels_last (NHWC) activations",
    "compile": "torch.compile the model",
    "flip_test": "validate with the flip test (mirrored image's heatmaps averaged in)",
    "tensorboard": "write TensorBoard logs to the output folder",
    "sync_bn": "BN-ReLU statistics over all processes (torchrun)",
    "cuda_graphs": "capture the whole training step once as a CUDA graph and replay it (one CUDA process)",
}


def add_command(sub):
    t = sub.add_parser("train", help="train a StackedHourglass (synthetic people by default); "
                                     "data-parallel with `torchrun --nproc_per_node N -m fasthg train`",
                       description="Settings not given take the device's defaults (GPU or CPU, as shown), "
                                   "or, with --resume, the checkpoint's.")
    t.add_argument("--out", help="output folder (default: runs/train, or the resumed checkpoint's)")
    t.add_argument("--resume", help="checkpoint to continue from (e.g. OUT/last.pt); its settings are kept "
                                    "unless given again")
    t.add_argument("--init", dest="init", metavar="CKPT",
                   help="start a new run from this checkpoint's weights (fasthg's, or princeton-vl's "
                        "pytorch_stacked_hourglass or bearpaw's pytorch-pose hourglass): its model shape (stacks, "
                        "features, depth, stem) where not given; fresh optimizer, schedule and epochs")
    types.add_trust(t, "--init's or --resume's checkpoint")
    # (None: "auto" for a new run, the checkpoint's device when resuming)
    types.add_device(t, help=" (default: auto, a GPU if there is one, which picks the defaults' column; when "
                             "resuming, the checkpoint's)", default=None)
    for name, (kind, text) in _SETTINGS.items():
        t.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, help=f"{text} ({default(name)})")
    types.add_backend(t, default=None, help=f" ({default('backend')})")
    t.add_argument("--optimizer", choices=["rmsprop", "adam", "sgd"],
                   help=f"rmsprop (the paper's), adam, or sgd with momentum 0.9 ({default('optimizer')})")
    t.add_argument("--supervision", choices=["all", "last"],
                   help="the loss on every stack's heatmaps (intermediate supervision, the paper's) or on the last "
                        f"stack's only (its Fig. 8 ablation) ({default('supervision')})")
    t.add_argument("--memory", choices=["default", "recompute"],
                   help="recompute: the residual modules' BN-ReLU-conv units keep only their input and the BN "
                        "statistics for backward and recompute the rest there (about half the activations, a few "
                        f"percent more time; native or triton backend) ({default('memory')})")
    t.add_argument("--amp", choices=["none", "bf16", "fp16", "auto"],
                   help=f"automatic mixed precision; fp16 needs CUDA and uses a grad scaler; auto is bf16 on a CPU "
                        f"that computes bf16 (AMX, AVX512_BF16), else none ({default('amp')})")
    t.add_argument("--minutes", type=types.positive_float,
                   help="time budget in minutes of wall time: the run stops at the first step past it, validates "
                        "the model, writes its checkpoints and can be resumed (default: none)")
    t.add_argument("--mpii-h5-train", dest="mpii_h5_train", help="MPII training people, HDF5 format")
    t.add_argument("--mpii-json-train", dest="mpii_json_train",
                   help="MPII training people, JSON list (bearpaw's isValidation people are left out)")
    t.add_argument("--mpii-h5-valid", dest="mpii_h5_valid", help="MPII validation people, HDF5 (with head sizes)")
    t.add_argument("--coco-train", dest="coco_train", help="COCO person_keypoints JSON to train on (17 joints)")
    t.add_argument("--coco-valid", dest="coco_valid", help="COCO person_keypoints JSON validated by OKS AP")
    t.add_argument("--images", help="image folder of the training file (MPII: of both files)")
    t.add_argument("--valid-images", dest="valid_images",
                   help="image folder of the validation file, if not --images (COCO's val2017)")
    t.add_argument("--bad-images", dest="bad_images", choices=BAD_IMAGES,
                   help="an MPII/COCO person whose image file is bad (unreadable, truncated, not an image, over "
                        "fasthg.data.images.MAX_IMAGE_PIXELS): stop with an error naming it, or skip the person "
                        "(training: the next person of the file takes its place, so batches stay full and a "
                        f"resumed run sees the same data; validation: not scored) ({default('bad_images')})")
    for name, text in _SWITCHES.items():
        t.add_argument("--" + name.replace("_", "-"), dest=name, action="store_true", default=None,
                       help=f"{text} ({default(name)})")
    t.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bars")
    t.add_argument("--no-keep-freed-memory", dest="keep_freed_memory", action="store_false",
                   help="on the CPU, let glibc hand freed memory back to the OS (by default it keeps it for "
                        "reuse: fasthg.bench.malloc)")
    t.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                   help="NCHW activations (the CPU default is channels_last)")
    t.set_defaults(fn=run_train)
