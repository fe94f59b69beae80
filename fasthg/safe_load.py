"""Every checkpoint fasthg reads (its own, resume, `--init`, eval, predict, from_checkpoint,
pytorch-pose's mean file) is read here, by `load_file`, with PyTorch's safe unpickler
(`torch.load(weights_only=True)`): tensors, numbers, strings, lists, tuples, dicts and
numpy arrays/scalars of numbers are built, anything else (a class, a function: what a
crafted file uses to run code) is refused with one line naming it and the file. Only
`trust=True` (`--trust-checkpoint`) unpickles fully, and that is as unsafe as unpickling is.

It sits below fasthg.checkpoint (fasthg's own format) and fasthg.models.convert (the peers'
files), which both read through it."""
import os
import re
import warnings
from typing import Any, List

import numpy as np
import torch

FORMAT = "fasthg-checkpoint-1"
EXPECTED = "expected a checkpoint that fasthg train wrote, e.g. runs/train/best.pt"
TRUST_HINT = ("if you trust the file and who made it, load it with trust=True (fasthg eval/predict/train "
              "--trust-checkpoint), which unpickles it fully and so runs any code it holds")


class UnsafeCheckpointError(ValueError):
    """A file holding objects the safe loader does not build (a pickled class or function)."""


def _numpy_globals() -> List[Any]:
    """numpy's constructors of arrays, scalars and numeric dtypes, under numpy 2's module names
    and numpy 1's (files written before numpy 2 name numpy.core.multiarray). They build data from
    bytes and shapes and cannot call anything else; fasthg's checkpoints before the plain-data
    RNG state held numpy arrays (np.random.get_state), and other people's often hold a numpy
    scalar (a best accuracy)."""
    from numpy._core import multiarray

    kinds = ("Bool", "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64",
             "Float16", "Float32", "Float64", "LongDouble", "Complex64", "Complex128", "CLongDouble")
    allowed = [np.ndarray, np.dtype] + [getattr(np.dtypes, k + "DType") for k in kinds]
    for fn in (multiarray._reconstruct, multiarray.scalar):
        allowed += [fn, (fn, f"numpy.core.multiarray.{fn.__name__}")]
    return allowed


_NUMPY = _numpy_globals()


def _looks_like_text(path: str) -> bool:
    """Whether the file starts as UTF-8 text (a checkpoint, zip or pickle, never does)."""
    with open(path, "rb") as f:
        head = f.read(4096)
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3:  # not a character cut at the end of the read
            return False
    return b"\0" not in head


def _refused(path: str, error: Exception) -> List[str]:
    """The globals (classes, functions) a safe load of `path` refused, by name; [] where it
    stopped for another reason (an opcode it does not run, random bytes)."""
    names = re.findall(r"\bGLOBAL ([A-Za-z_][\w.]*)", str(error))  # torch's words for each refusal
    if not names:
        try:  # zip files: torch lists the globals outside its own allowlist, unpickling nothing
            allowed = {n for g in _NUMPY for n in ([g[1]] if isinstance(g, tuple) else
                                                   [f"{g.__module__}.{g.__qualname__}"])}
            names = [n for n in torch.serialization.get_unsafe_globals_in_checkpoint(path) if n not in allowed]
        except Exception:
            names = []
    return sorted(set(names))


def _reason(error: Exception) -> str:
    """The weights-only unpickler's own words for a refusal that names no global."""
    text = str(error)
    at = text.find("WeightsUnpickler error:")
    detail = text[at + len("WeightsUnpickler error:"):].split("Check the documentation")[0] if at >= 0 else ""
    detail = " ".join(detail.split())
    return detail or type(error).__name__


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def check_exists(path: str, expected: str = EXPECTED) -> None:
    """FileNotFoundError / IsADirectoryError / ValueError naming the file unless it is a file
    that could be a checkpoint: present, not a folder, not empty, not text."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file ({expected})")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path}: a folder, not a checkpoint file ({expected})")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"{path}: not readable (permission denied; {expected})")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: an empty file, not a fasthg checkpoint ({expected})")
    if _looks_like_text(path):
        raise ValueError(f"{path}: a text file, not a fasthg checkpoint ({expected})")


def load_file(path: str, expected: str = EXPECTED, map_location="cpu", trust: bool = False) -> Any:
    """The contents of a torch file, read with the safe unpickler, with errors that name the
    file and say what it is instead (missing, a folder, empty, text, truncated, not a torch
    file, holding code: UnsafeCheckpointError) and `expected`. `trust=True` unpickles fully:
    only for a file you trust, since unpickling can run any code the file holds."""
    path = os.fspath(path)
    check_exists(path, expected)
    if trust:
        warnings.warn(f"{path}: loaded with trust (full unpickling: any code in the file has run)", stacklevel=2)
        try:
            return torch.load(path, map_location=map_location, weights_only=False)
        except Exception as e:
            raise ValueError(f"{path}: not a readable torch file ({type(e).__name__}: {_first_line(e)}; "
                             f"{expected})") from None
    try:
        with torch.serialization.safe_globals(_NUMPY):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated, not a torch file, a refused global, ...
        if "Weights only load failed" in str(e):
            names = _refused(path, e)
            if names:
                raise UnsafeCheckpointError(
                    f"{path}: holds a pickled {', '.join(names)}, which fasthg's safe loader does not build (a "
                    f"checkpoint holds tensors and plain data; a pickled object can run code when loaded); "
                    f"{TRUST_HINT}") from None
            raise UnsafeCheckpointError(
                f"{path}: not a readable fasthg checkpoint (the safe loader stopped at: {_reason(e)}; {expected}; "
                f"a torch file you trust that only full unpickling reads: trust=True, --trust-checkpoint)") from None
        raise ValueError(f"{path}: not a readable fasthg checkpoint ({type(e).__name__}: {_first_line(e)}; "
                         f"{expected})") from None


def check_format(path: str, state: Any) -> None:
    """ValueError unless `state` (a dict with a "format") is of the format this fasthg reads."""
    if state["format"] != FORMAT:
        raise ValueError(f"{path}: a checkpoint of format {state['format']!r}, which this fasthg does not read "
                         f"(expected {FORMAT!r})")
