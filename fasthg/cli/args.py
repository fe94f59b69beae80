"""The argument types every command shares, written once: backend, device, dtypes, memory
layouts, model presets, positive numbers and comma-separated integer lists."""
import argparse
import math

from fasthg.models import PRESETS
from fasthg.ops import BACKENDS

DTYPES = {"float32": "float32", "f32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "f16": "float16", "fp16": "float16"}
LAYOUTS = ("nchw", "nhwc")


class UsageError(Exception):
    """A command's arguments that do not go together (found after parsing): fasthg.cli.main
    prints the command's usage and this message, exit status 2, as argparse does."""


def _int_list(text, minimum):
    """The integers of a comma-separated list, or None if one is not an integer >= minimum."""
    try:
        values = [int(x) for x in text.split(",") if x]
    except ValueError:
        return None
    return values if all(v >= minimum for v in values) else None


def positive_ints(text):
    """A non-empty comma-separated list of positive integers (--levels, --channels)."""
    values = _int_list(text, 1)
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def epochs(text):
    """Comma-separated epoch numbers (>= 0), possibly none at all (--lr-drops ''), as a tuple."""
    values = _int_list(text, 0)
    if values is None:
        raise argparse.ArgumentTypeError(f"expected comma-separated epochs (integers >= 0), got {text!r}")
    return tuple(values)


def _int(text, minimum, expected):
    values = _int_list(text, minimum)
    if not values or len(values) != 1 or "," in text:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return values[0]


def positive_int(text):
    """One integer >= 1 (--limit, --repeats, --batch-size)."""
    return _int(text, 1, "a positive integer")


def natural_int(text):
    """One integer >= 0 (--workers, --seed)."""
    return _int(text, 0, "an integer >= 0")


def _float(text, ok, expected):
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and ok(value)):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_float(text):
    """One finite number > 0 (--lr, --sigma)."""
    return _float(text, lambda v: v > 0, "a positive number")


def natural_float(text):
    """One finite number >= 0 (ablate's --minutes, where 0 means none)."""
    return _float(text, lambda v: v >= 0, "a number >= 0")


def _names(text, known, what, none=False, shown=None):
    """Comma-separated names out of `known` (or the word none, where `none` allows it); the
    error lists `shown` (default: known)."""
    names = [] if none and text == "none" else [x for x in text.split(",") if x]
    unknown = [n for n in names if n not in known]
    if unknown or (not names and not (none and text == "none")):
        raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(unknown) or repr(text)}: expected "
                                         f"{', '.join(shown or known)} (comma-separated){' or none' if none else ''}")
    return names


def dtypes(text):
    """--dtypes: activation dtypes, comma-separated (float32, bfloat16, float16 or their short names)."""
    import torch

    return [getattr(torch, DTYPES[n]) for n in _names(text, DTYPES, "dtype", shown=dict.fromkeys(DTYPES.values()))]


def models(text):
    """--model: preset names, comma-separated, or none."""
    return _names(text, PRESETS, "model", none=True)


def memory_modes(text):
    """--memory: default and/or recompute, comma-separated."""
    return _names(text, {"default": None, "recompute": None}, "memory mode")


def layouts(text):
    """--model-layouts: nchw and/or nhwc, comma-separated."""
    return _names(text, LAYOUTS, "layout")


def add_backend(parser, default="auto", help=" (default: auto)"):
    """--backend, its choices fasthg.ops.BACKENDS."""
    parser.add_argument("--backend", default=default, choices=BACKENDS,
                        help="fused-op kernels: auto takes the extension's (native) where it has the op for the "
                             "device, else Triton on CUDA, else eager PyTorch" + help)


def add_trust(parser, files):
    """--trust-checkpoint: the opt-in to unpickling `files` fully (fasthg.safe_load)."""
    parser.add_argument("--trust-checkpoint", dest="trust_checkpoint", action="store_true",
                        help=f"UNSAFE: read {files} by full unpickling, which runs any code the file holds; only for "
                             "a file you trust whose contents the safe loader refuses (by default fasthg builds "
                             "tensors and plain data only, and names what it refused)")


def device(text):
    """--device: auto, cpu, cuda or cuda:N (a GPU that is there), kept as the text."""
    import torch

    if text in ("auto", "cpu"):
        return text
    try:
        dev = torch.device(text)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}: expected cpu, cuda, cuda:N or auto")
    count = torch.cuda.device_count() if dev.type == "cuda" and torch.cuda.is_available() else 0
    if dev.type == "cuda" and (dev.index or 0) >= count:
        raise argparse.ArgumentTypeError(f"{text}: no such GPU ({count or 'no'} CUDA device{'s' * (count != 1)} "
                                         "visible); expected cpu, auto" + (f" or cuda:0..{count - 1}" if count else ""))
    return text


def add_device(parser, help=" (default: auto, a GPU if there is one)", default="auto"):
    """--device: cpu, cuda, cuda:N or auto (fasthg.device.resolve)."""
    parser.add_argument("--device", type=device, default=default, help="cpu, cuda, cuda:N or auto" + help)
