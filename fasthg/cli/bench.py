"""`fasthg bench`: the fused ops and a training step against eager, timed in one run."""
from fasthg.cli import args as types


def run(args) -> int:
    from fasthg import bench

    result = bench.run(device=args.device, levels=args.levels, channels=args.channels,
                       repeats=args.repeats, models=args.model, model_repeats=args.model_repeats,
                       image_size=args.image_size, compile=args.compile, out_dir=args.out, dtypes=args.dtypes,
                       keep_freed_memory=args.keep_freed_memory, model_layouts=args.model_layouts,
                       memory_modes=args.memory, budget_models=args.budget_model,
                       inference_fold=args.inference_fold)
    print(bench.table(result))
    if args.out:
        print(f"\nwrote {args.out}/bench.json, bench.md and bench.png")
    warning = bench.spread_warning(result)
    if warning:  # again as the last line, where it is seen: the table's first lines have scrolled away
        print(f"\n{warning}")
    return 0


def add_command(sub):
    b = sub.add_parser("bench", help="fused ops and a training step against eager, timed in one run")
    types.add_device(b)
    b.add_argument("--levels", type=types.positive_ints, default="64,32,16,8",
                   help="feature-map sizes the ops run at (comma-separated; the hourglass runs 128..4; "
                        "default: 64,32,16,8)")
    b.add_argument("--channels", type=types.positive_ints, default="256",
                   help="channel counts (comma-separated; the hourglass runs 64,128,256; default: 256)")
    b.add_argument("--dtypes", type=types.dtypes, default=None,
                   help="activation dtypes of the ops and models (autocast), comma-separated: float32, bfloat16, "
                        "float16 (default: float32, and bfloat16 on GPUs and on CPUs with AMX or AVX512_BF16)")
    b.add_argument("--repeats", type=types.positive_int, default=20,
                   help="timed rounds per op (median reported; default: 20)")
    b.add_argument("--model", type=types.models, default="hg2",
                   help=f"models whose training step and inference are timed: {', '.join(types.PRESETS)}, "
                        "comma-separated, or none (default: hg2)")
    b.add_argument("--compile", action="store_true",
                   help="also time torch.compile of the eager compositions and model (compiles every shape)")
    b.add_argument("--model-repeats", type=types.positive_int, default=5,
                   help="timed rounds of each model's training step and inference (median reported; default: 5)")
    b.add_argument("--model-layouts", type=types.layouts, default="nchw,nhwc",
                   help="memory formats the models run in: nchw, nhwc (channels_last), comma-separated "
                        "(default: both)")
    b.add_argument("--memory", type=types.memory_modes, default="default",
                   help="models' activation memory: default, recompute (adds BACKEND+recompute rows: "
                        "StackedHourglass(memory='recompute'), and the largest batch of --budget-model in 16 and "
                        "80 GiB of saved activations), comma-separated (default: default)")
    b.add_argument("--budget-model", type=types.models, default="hg8",
                   help="models of the activation-budget section (with --memory recompute; default: hg8)")
    b.add_argument("--inference-fold", action="store_true",
                   help="instead of the ops and training steps: each --model's inference at batch 1 and 8, eager vs "
                        "the default backend vs folded (fasthg.fuse.for_inference) vs torch.compile with inductor's "
                        "freezing (its compile wait reported apart), per --dtypes and --model-layouts")
    b.add_argument("--image-size", type=types.positive_int, default=256,
                   help="the models' input size in pixels (default: 256)")
    b.add_argument("--keep-freed-memory", action="store_true",
                   help="CPU: glibc keeps freed memory for reuse (fasthg.bench.malloc), so that fresh outputs' page "
                        "faults do not swamp the kernels' time (for eager and fused ops alike)")
    b.add_argument("--out", default="runs/bench", help="folder for bench.json/.md/.png ('' for none; "
                                                       "default: runs/bench)")
    b.set_defaults(fn=run)
