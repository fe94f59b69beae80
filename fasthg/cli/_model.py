"""What `fasthg eval` and `fasthg predict` share: the checkpoint's flags and loading its model."""
import argparse
import os
import sys

import torch

from fasthg.cli import args as types
from fasthg.deploy.runtimes import PRECISIONS, RUNTIMES
from fasthg.device import resolve as resolve_device
from fasthg.models import convert


def input_mean(text):
    """--input-mean: three comma-separated numbers, or a file (pytorch-pose's mean.pth.tar)."""
    if os.path.exists(text):
        return text
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected R,G,B (three numbers) or a mean.pth.tar file, got {text!r}")
    return values


def add_arguments(parser):
    """The checkpoint and how its model runs."""
    parser.add_argument("checkpoint", help="a fasthg checkpoint (e.g. runs/train/best.pt), or one of the authors' "
                                           "PyTorch port (princeton-vl's pytorch_stacked_hourglass) or bearpaw's "
                                           "pytorch-pose hourglass (fasthg.models.from_checkpoint)")
    parser.add_argument("--input-mean", type=input_mean, default=None, metavar="R,G,B|FILE",
                        help="for a pytorch-pose checkpoint: the mean colour (of pixel/255) its training subtracted, "
                             "or its data/<set>/mean.pth.tar (default: fasthg's 0.5, with a warning)")
    types.add_trust(parser, "the checkpoint (and --input-mean's file)")
    types.add_backend(parser)
    types.add_device(parser)
    parser.add_argument("--input-size", type=types.positive_int, default=None,
                        help="network input size in pixels (default: the checkpoint's, else 256)")
    parser.add_argument("--flip-test", action="store_true",
                        help="average with the mirrored image's heatmaps (real photos; not synthetic "
                             "people, whose left/right colour code a mirror inverts)")
    parser.add_argument("--no-fold", dest="fold", action="store_false",
                        help="run the model as trained instead of folded for inference (by default each "
                             "BatchNorm after a conv is folded into it, its ReLU run by the conv: "
                             "fasthg.fuse.for_inference; same outputs within float rounding, faster)")
    parser.add_argument("--runtime", choices=("auto",) + RUNTIMES, default="auto",
                        help="what runs the network: torch (fasthg's folded model), onnxruntime or openvino (its "
                             "ONNX export; pip install 'fasthg[deploy]'), or auto: the fastest of those installed "
                             "for the device and precision, timed once per model and cached (default: auto)")
    parser.add_argument("--precision", choices=PRECISIONS, default="float32",
                        help="float32, or bf16 (torch: autocast; openvino: its bf16 inference precision; fastest "
                             "on CPUs with AMX or AVX512_BF16) (default: float32)")


def load(args, batch: int = 1):
    """(runner, model, input size): the checkpoint's StackedHourglass on args.device, and the
    runtime that runs its forward (fasthg.deploy.runtimes; args.runtime, args.precision;
    `batch`: the batch size auto times them at). The model is set up to run as `fasthg train` runs it on that
    device (fasthg.cli.train, fasthg.train.config.DEVICE_DEFAULTS): the layout the trainer
    uses there (on the CPU channels_last, the faster format for its convolutions) and, on the
    CPU, glibc keeping freed memory (fasthg.bench.malloc), else every fresh activation
    page-faults; and, unless args.fold is False, folded for inference (fasthg.fuse.for_inference).
    Without these `fasthg eval` ran slower than the same validation inside
    training (benchmarks/results/HISTORY.md)."""
    from fasthg.bench import malloc
    from fasthg.train.config import device_defaults

    ckpt = convert.read_checkpoint(args.checkpoint, input_mean=args.input_mean, trust=args.trust_checkpoint)
    device = resolve_device(args.device)
    model = convert.build(ckpt, backend=args.backend).to(device)
    if device_defaults(device.type)["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    folded = model
    if getattr(args, "fold", True):
        from fasthg.fuse import for_inference

        folded = for_inference(model)
    if device.type == "cpu":
        malloc.keep_freed_memory()  # process-wide: this process only evaluates (or predicts) and exits
    size = args.input_size or ckpt.input_size
    return runner(args, model, folded, size, device, batch), model, size


def runner(args, model, folded, size: int, device, batch: int):
    """args.runtime for the model (auto: the fastest, timed or cached), saying which it is on
    stderr (stdout keeps the command's own output: tables, written files)."""
    from fasthg.deploy import runtimes

    if args.runtime != "auto":
        run = runtimes.make(args.runtime, model, folded, size, device, args.precision)
        print(f"runtime: {run.name} ({args.precision})", file=sys.stderr)
        return run
    run, ms, cached = runtimes.choose(model, folded, size, batch, device, args.precision)
    timed = ", ".join(f"{name} {v:.0f} ms" for name, v in ms.items())
    how = f"{'cached ' if cached else ''}forward of {batch} images: {timed}" if ms else "the only one installed"
    print(f"runtime: {run.name} ({args.precision}; auto, {how})", file=sys.stderr)
    return run
