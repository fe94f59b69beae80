"""Checkpoints: written atomically (a temporary file, then a rename), so that a crash or an
interrupt never leaves a half-written file where a good one was; read back with clear
errors for a corrupt file or one of another model shape."""
import os
import tempfile
from typing import Any, Dict, Optional

import torch

from fasthg.models import StackedHourglass
from fasthg.models.hourglass import complete_config

FORMAT = "fasthg-checkpoint-1"


def save(path: str, model: StackedHourglass, **extra: Any) -> None:
    """Write model weights, the model's config and `extra` (optimizer state, epoch, ...)."""
    state = {"format": FORMAT, "model_config": dict(model.config), "model": model.state_dict(), **extra}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


EXPECTED = "expected a checkpoint that fasthg train wrote, e.g. runs/train/best.pt"


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


def load_file(path: str, expected: str = EXPECTED, map_location="cpu") -> Any:
    """torch.load of a checkpoint file, with errors that name the file and say what it is
    instead (missing, a folder, empty, text, truncated or not a torch file) and `expected`.
    Like torch.load, it unpickles: load only files you trust."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file ({expected})")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path}: a folder, not a checkpoint file ({expected})")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: an empty file, not a fasthg checkpoint ({expected})")
    if _looks_like_text(path):
        raise ValueError(f"{path}: a text file, not a fasthg checkpoint ({expected})")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated, not a torch file, ...
        raise ValueError(f"{path}: not a readable fasthg checkpoint ({type(e).__name__}: {e}; {expected})") from None


def read(path: str) -> Dict[str, Any]:
    """The checkpoint's contents; FileNotFoundError (missing) or ValueError (anything else
    that is not a fasthg checkpoint) with a message that names the file."""
    state = load_file(path)
    if not isinstance(state, dict) or "format" not in state:
        raise ValueError(f"{path}: a torch file but not a fasthg checkpoint (no format {FORMAT!r}; {EXPECTED})")
    check_format(path, state)
    return state


def check_format(path: str, state: Dict[str, Any]) -> None:
    """ValueError unless `state` (a dict with a "format") is of the format this fasthg reads."""
    if state["format"] != FORMAT:
        raise ValueError(f"{path}: a checkpoint of format {state['format']!r}, which this fasthg does not read "
                         f"(expected {FORMAT!r})")


def load_model(path: str, backend: str = "auto", model: Optional[StackedHourglass] = None,
               state: Optional[Dict[str, Any]] = None) -> StackedHourglass:
    """The checkpoint's model (built from its config), or its weights loaded into `model`,
    which must have the same shape. `state`: the checkpoint as read(path) gave it, for a
    caller that read it already (it is not read again)."""
    state = read(path) if state is None else state
    if model is None:
        model = StackedHourglass(**state["model_config"], backend=backend)
    elif complete_config(model.config) != complete_config(state["model_config"]):
        raise ValueError(f"{path}: checkpoint of a model {state['model_config']}, not {dict(model.config)}")
    model.load_state_dict(state["model"])
    return model
