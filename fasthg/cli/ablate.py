"""`fasthg ablate`: the paper's ablation studies (fasthg.train.ablation), trained on one data
set, seed and schedule, with a table and the two figures."""
from fasthg.cli import args as types
from fasthg.device import resolve as resolve_device

# fasthg train's settings that ablate takes too (the variants set stacks, blocks, supervision).
SETTINGS = ("input_size", "features", "depth", "sigma", "epochs", "batch_size", "lr", "lr_drops", "train_size",
            "val_size", "workers", "seed")
DATA = ("mpii_h5_train", "mpii_json_train", "mpii_h5_valid", "coco_train", "coco_valid", "images", "valid_images")
# Per variant on a CPU: the five variants of both studies in under 30 minutes on the slowest 2 cores.
CPU_MINUTES = 5.5


def config(args):
    """The variants' shared TrainConfig: the device's defaults, on a CPU at the ablation's CPU
    scale (fasthg.train.ablation.CPU_SCALE), then the flags given."""
    from fasthg.train import TrainConfig, device_defaults
    from fasthg.train.ablation import CPU_SCALE

    device = resolve_device(args.device)
    values = device_defaults(device.type)
    if device.type != "cuda":
        values.update(CPU_SCALE)
    for name in SETTINGS + DATA + ("device", "backend", "amp", "optimizer"):
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
    return TrainConfig(**values, progress=args.progress, bad_images=args.bad_images), device


def run(args) -> int:
    from fasthg.train import ablation

    studies = [s for s in args.studies.split(",") if s]
    ablation.variants(studies)  # unknown names before anything trains
    cfg, device = config(args)
    minutes = args.minutes if args.minutes is not None else (CPU_MINUTES if device.type != "cuda" else None)
    if minutes == 0:
        minutes = None
    result = ablation.run(cfg, studies, args.out, minutes, progress=args.progress)
    print("\n" + ablation.table(result))
    figures = [f for f in ("supervision.png", "stacking.png") if f[:-4] in studies]
    print(f"\nwrote {args.out}/ablation.json, ablation.md" + "".join(f", {f}" for f in figures))
    return 0


def add_command(sub):
    from fasthg.cli.train import _SETTINGS, default
    from fasthg.data.dataset import BAD_IMAGES

    a = sub.add_parser("ablate", help="the paper's ablations: intermediate supervision on/off and 2x4, 4x2, 8x1 "
                                      "stacks at equal parameters, trained alike; a table and two figures",
                       description="Each variant trains into OUT/<variant> (resumable: run the same command "
                                   "again after an interruption; finished variants are read back). On a CPU the "
                                   "defaults are small (32 features, 128 px, 800 synthetic people, 12 epochs, "
                                   f"{CPU_MINUTES:g} minutes a variant); on a GPU fasthg train's (the paper's) "
                                   "with MPII files: --mpii-h5-train, --mpii-h5-valid, --images.")
    a.add_argument("--studies", default="supervision,stacking",
                   help="comma-separated: supervision (Fig. 8), stacking (Fig. 9) (default: both)")
    a.add_argument("--out", default="runs/ablate", help="output folder (default: runs/ablate)")
    a.add_argument("--minutes", type=types.natural_float, default=None,
                   help=f"time budget of each variant in minutes, 0 for none (default: CPU {CPU_MINUTES:g}, "
                        "GPU none)")
    types.add_device(a)
    types.add_backend(a)
    for name in SETTINGS:
        kind, text = _SETTINGS[name]
        shown = "" if name in ("input_size", "features", "depth", "epochs", "train_size", "val_size") else \
            f" ({default(name)})"
        a.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None, help=text + shown)
    a.add_argument("--optimizer", choices=["rmsprop", "adam", "sgd"], default=None,
                   help=f"as fasthg train's ({default('optimizer')})")
    a.add_argument("--amp", choices=["none", "bf16", "fp16", "auto"], default=None,
                   help=f"as fasthg train's ({default('amp')})")
    for name in DATA:
        a.add_argument("--" + name.replace("_", "-"), dest=name, default=None, help="as fasthg train's")
    a.add_argument("--bad-images", dest="bad_images", choices=BAD_IMAGES, default="stop",
                   help="as fasthg train's (default: stop)")
    a.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    a.set_defaults(fn=run)
