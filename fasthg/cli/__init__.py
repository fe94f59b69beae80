"""The `fasthg` command (also `python -m fasthg`)."""
import argparse
import sys


def _info(args):
    from fasthg.cli import info

    print(info.render(info.collect()))
    return 0


def _ints(text):
    """A comma-separated list of positive integers (--levels, --channels)."""
    try:
        values = [int(x) for x in text.split(",") if x]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


_DTYPES = {"float32": "float32", "f32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "f16": "float16", "fp16": "float16"}


def _dtypes(text):
    """--dtypes: activation dtypes, comma-separated (float32, bfloat16, float16)."""
    import torch

    names = [x for x in text.split(",") if x]
    unknown = [n for n in names if n not in _DTYPES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown dtype {', '.join(unknown) or repr(text)}: "
                                         "expected float32, bfloat16, float16 (comma-separated)")
    return [getattr(torch, _DTYPES[n]) for n in names]


def _models(text):
    """--model: preset names, comma-separated, or none."""
    from fasthg.models import PRESETS

    names = [] if text == "none" else [x for x in text.split(",") if x]
    unknown = [n for n in names if n not in PRESETS]
    if unknown or (text != "none" and not names):
        raise argparse.ArgumentTypeError(f"unknown model {', '.join(unknown) or repr(text)}: "
                                         f"expected {', '.join(PRESETS)} (comma-separated) or none")
    return names


def _layouts(text):
    """--model-layouts: nchw and/or nhwc, comma-separated."""
    names = [x for x in text.split(",") if x]
    unknown = [n for n in names if n not in ("nchw", "nhwc")]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown layout {', '.join(unknown) or repr(text)}: "
                                         "expected nchw, nhwc (comma-separated)")
    return names


def _bench(args):
    from fasthg import bench

    result = bench.run(device=args.device, levels=args.levels, channels=args.channels,
                       repeats=args.repeats, models=args.model, model_repeats=args.model_repeats,
                       image_size=args.image_size, compile=args.compile, out_dir=args.out, dtypes=args.dtypes,
                       keep_freed_memory=args.keep_freed_memory, model_layouts=args.model_layouts)
    print(bench.table(result))
    if args.out:
        print(f"\nwrote {args.out}/bench.json, bench.md and bench.png")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(prog="fasthg", description=__doc__)
    sub = p.add_subparsers(dest="cmd")
    sub.add_parser("info", help="versions, extension build, backends per device").set_defaults(fn=_info)
    b = sub.add_parser("bench", help="fused ops and a training step against eager, timed in one run")
    b.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    b.add_argument("--levels", type=_ints, default="64,32,16,8",
                   help="feature-map sizes the ops run at (comma-separated; the hourglass runs 128..4)")
    b.add_argument("--channels", type=_ints, default="256", help="channel counts (comma-separated; the hourglass runs 64,128,256)")
    b.add_argument("--dtypes", type=_dtypes, default=None,
                   help="activation dtypes of the ops and models (autocast), comma-separated: float32, bfloat16, "
                        "float16 (default: float32, and bfloat16 on GPUs and on CPUs with AMX or AVX512_BF16)")
    b.add_argument("--repeats", type=int, default=20, help="timed rounds per op (median reported)")
    b.add_argument("--model", type=_models, default="hg2",
                   help="models whose training step and inference are timed: hg1, hg2, hg4, hg8, comma-separated, "
                        "or none")
    b.add_argument("--compile", action="store_true",
                   help="also time torch.compile of the eager compositions and model (compiles every shape)")
    b.add_argument("--model-repeats", type=int, default=5)
    b.add_argument("--model-layouts", type=_layouts, default="nchw,nhwc",
                   help="memory formats the models run in: nchw, nhwc (channels_last), comma-separated")
    b.add_argument("--image-size", type=int, default=256)
    b.add_argument("--keep-freed-memory", action="store_true",
                   help="CPU: glibc keeps freed memory for reuse (fasthg.bench.malloc), so that fresh outputs' page "
                        "faults do not swamp the kernels' time (for eager and fused ops alike)")
    b.add_argument("--out", default="runs/bench", help="folder for bench.json/.md/.png ('' for none)")
    b.set_defaults(fn=_bench)
    from fasthg.cli.poses import add_commands
    from fasthg.cli.train import add_command

    add_commands(sub)
    add_command(sub)
    args = p.parse_args(argv)
    if not getattr(args, "fn", None):
        p.print_help()
        return 2
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
