"""`fasthg train`: the README's main job."""
import dataclasses

from fasthg.device import resolve as resolve_device
from fasthg.train import TrainConfig, Trainer, device_defaults

def config_from_args(args) -> TrainConfig:
    """Device defaults (or, when resuming, the checkpoint's config), then the flags given."""
    gpu = resolve_device(args.device).type == "cuda"
    if args.resume:
        from fasthg import checkpoint

        values = dict(checkpoint.read(args.resume)["config"])
        values["lr_drops"] = tuple(values["lr_drops"])
    else:
        values = device_defaults("cuda" if gpu else "cpu")
    for f in dataclasses.fields(TrainConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    return TrainConfig(**values)


def run_train(args) -> int:
    cfg = config_from_args(args)
    if args.keep_freed_memory and resolve_device(cfg.device).type == "cpu":
        # Fresh activations otherwise page-fault every step: one epoch of the default run on
        # the 2-core VM went from 48-50 to 58-61 images/s, same loss. The process is ours: its
        # memory stays at its peak, which a training run reaches at the first step anyway.
        from fasthg.bench import malloc

        malloc.keep_freed_memory()
    trainer = Trainer(cfg)
    try:
        if args.resume:
            trainer.resume(args.resume)
        if trainer.is_main:
            print(f"training on {trainer.device} x {trainer.world} process(es): {dataclasses.asdict(trainer.cfg)}")
        trainer.fit()
    finally:
        trainer.close()
    return 0


def add_command(sub):
    t = sub.add_parser("train", help="train a StackedHourglass (synthetic people by default); "
                                     "data-parallel with `torchrun --nproc_per_node N -m fasthg train`")
    t.add_argument("--out", help="output folder (default: runs/train, or the resumed checkpoint's)")
    t.add_argument("--resume", help="checkpoint to continue from (e.g. OUT/last.pt); its settings are kept "
                                    "unless given again")
    t.add_argument("--device", default="auto")
    for name, kind in (("input_size", int), ("stacks", int), ("features", int), ("depth", int), ("sigma", float),
                       ("epochs", int), ("batch_size", int), ("accumulate", int), ("lr", float), ("lr_gamma", float),
                       ("train_size", int), ("val_size", int), ("workers", int), ("seed", int)):
        t.add_argument("--" + name.replace("_", "-"), dest=name, type=kind)
    t.add_argument("--lr-drops", dest="lr_drops", type=lambda s: tuple(int(x) for x in s.split(",") if x),
                   help="comma-separated epochs at which the learning rate drops")
    t.add_argument("--backend", choices=["auto", "eager", "native", "triton"])
    t.add_argument("--optimizer", choices=["rmsprop", "adam", "sgd"])
    t.add_argument("--amp", choices=["none", "bf16", "fp16"])
    t.add_argument("--mpii-h5-train", dest="mpii_h5_train", help="MPII training people, HDF5 format")
    t.add_argument("--mpii-json-train", dest="mpii_json_train",
                   help="MPII training people, JSON list (bearpaw's isValidation people are left out)")
    t.add_argument("--mpii-h5-valid", dest="mpii_h5_valid", help="MPII validation people, HDF5 (with head sizes)")
    t.add_argument("--coco-train", dest="coco_train", help="COCO person_keypoints JSON to train on (17 joints)")
    t.add_argument("--coco-valid", dest="coco_valid", help="COCO person_keypoints JSON validated by OKS AP")
    t.add_argument("--images", help="image folder of the training file (MPII: of both files)")
    t.add_argument("--valid-images", dest="valid_images",
                   help="image folder of the validation file, if not --images (COCO's val2017)")
    for flag in ("channels_last", "compile", "flip_test", "tensorboard", "sync_bn", "cuda_graphs"):
        t.add_argument("--" + flag.replace("_", "-"), dest=flag, action="store_true", default=None)
    t.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    t.add_argument("--no-keep-freed-memory", dest="keep_freed_memory", action="store_false",
                   help="on the CPU, let glibc hand freed memory back to the OS (by default it keeps it for "
                        "reuse: fasthg.bench.malloc)")
    t.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                   help="NCHW activations (the CPU default is channels_last)")
    t.set_defaults(fn=run_train)
