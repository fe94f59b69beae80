"""What `fasthg eval` and `fasthg predict` share: the checkpoint's flags and loading its model."""
from fasthg import checkpoint
from fasthg.cli import args as types
from fasthg.device import resolve as resolve_device


def add_arguments(parser):
    """The checkpoint and how its model runs."""
    parser.add_argument("checkpoint", help="a fasthg checkpoint (e.g. runs/train/best.pt)")
    types.add_backend(parser)
    types.add_device(parser)
    parser.add_argument("--input-size", type=types.positive_int, default=None,
                        help="network input size in pixels (default: the checkpoint's, else 256)")
    parser.add_argument("--flip-test", action="store_true",
                        help="average with the mirrored image's heatmaps (real photos; not synthetic "
                             "people, whose left/right colour code a mirror inverts)")


def load(args):
    """(model on args.device, input size)."""
    state = checkpoint.read(args.checkpoint)
    model = checkpoint.load_model(args.checkpoint, backend=args.backend).to(resolve_device(args.device))
    return model, args.input_size or int(state.get("input_size", 256))
