"""fasthg's own checkpoints: written atomically (a temporary file, then a rename), so that a
crash, an interrupt or a full disk never leaves a half-written file where a good one was;
holding plain data only (tensors, numbers, strings, lists, tuples, dicts), so that they load
with PyTorch's safe unpickler; read back (fasthg.safe_load) with clear errors for a corrupt
file or one of another model shape."""
import errno
import os
import tempfile
from typing import Any, Dict, Optional

import numpy as np
import torch

from fasthg.models import StackedHourglass, convert
from fasthg.models.hourglass import complete_config
from fasthg.safe_load import EXPECTED, FORMAT, check_format, load_file

__all__ = ["FORMAT", "EXPECTED", "save", "read", "load_model", "load_file", "check_format", "plain", "check_writable"]


def plain(value: Any) -> Any:
    """`value` with numpy arrays as tensors and numpy scalars as Python numbers, through dicts,
    lists and tuples: what the safe loader builds without numpy."""
    if isinstance(value, dict):  # a copy keeps a subclass (the scheduler's Counter of milestones)
        out = value.copy()
        for k, v in value.items():
            out[k] = plain(v)
        return out
    if isinstance(value, (list, tuple)):
        out = [plain(v) for v in value]
        return out if isinstance(value, list) else tuple(out)
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, np.generic):
        return value.item()
    return value


def _temporary(folder: str):
    """(fd, path) of a new temporary file in `folder` (made if missing); OSError naming the
    folder and what to do where one cannot write there."""
    try:
        os.makedirs(folder, exist_ok=True)
        return tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    except OSError as e:
        raise OSError(e.errno, f"cannot write in this folder ({e.strerror or e}); choose a writable output "
                               f"folder", folder) from None


def check_writable(folder: str) -> None:
    """OSError naming `folder` unless files can be written there: a run checks its output folder
    before it trains, not when its first checkpoint is due."""
    fd, tmp = _temporary(folder)
    os.close(fd)
    os.unlink(tmp)


def save(path: str, model: StackedHourglass, **extra: Any) -> None:
    """Write model weights, the model's config and `extra` (optimizer state, epoch, ...).
    An error while writing (a full disk, a folder one cannot write) leaves the file that was
    at `path` as it was, and says so."""
    state = {"format": FORMAT, "model_config": plain(dict(model.config)), "model": model.state_dict(),
             **plain(extra)}
    fd, tmp = _temporary(os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) or (isinstance(e, RuntimeError) and "write" in str(e).lower()):
            kept = "the previous checkpoint there is kept" if os.path.exists(path) else "nothing was written"
            full = " (the disk is full)" if getattr(e, "errno", None) == errno.ENOSPC else ""
            raise OSError(getattr(e, "errno", None) or errno.EIO,
                          f"writing the checkpoint failed{full}: {getattr(e, 'strerror', None) or e}; {kept}",
                          path) from None
        raise


def read(path: str, trust: bool = False) -> Dict[str, Any]:
    """The checkpoint's contents, read safely (fasthg.safe_load.load_file; `trust`: its
    opt-in to full unpickling); FileNotFoundError (missing) or ValueError (anything else
    that is not a fasthg checkpoint) with a message that names the file."""
    state = load_file(path, trust=trust)
    if not isinstance(state, dict) or "format" not in state:
        raise ValueError(f"{path}: a torch file but not a fasthg checkpoint (no format {FORMAT!r}; {EXPECTED})")
    check_format(path, state)
    return state


def load_model(path: str, backend: str = "auto", model: Optional[StackedHourglass] = None,
               state: Optional[Dict[str, Any]] = None, trust: bool = False) -> StackedHourglass:
    """The checkpoint's model (built from its config), or its weights loaded into `model`,
    which must have the same shape. `state`: the checkpoint as read(path) gave it, for a
    caller that read it already (it is not read again). Every tensor is checked (names,
    shapes, dtypes) before any is loaded: ValueError naming the file and the tensors."""
    state = read(path, trust) if state is None else state
    ckpt = convert.from_contents(path, state)
    if model is None:
        return convert.build(ckpt, backend=backend, map_location=None).train()
    if complete_config(model.config) != complete_config(ckpt.config):
        raise ValueError(f"{path}: checkpoint of a model {ckpt.config}, not {dict(model.config)}")
    model.load_state_dict(ckpt.state_dict)
    return model
