"""Checkpoints: written atomically (a temporary file, then a rename), so that a crash or an
interrupt never leaves a half-written file where a good one was; read back with clear
errors for a corrupt file or one of another model shape."""
import os
import tempfile
from typing import Any, Dict, Optional

import torch

from fasthg.models import StackedHourglass

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


def read(path: str) -> Dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise
    except Exception as e:  # truncated, not a torch file, ...
        raise ValueError(f"{path}: not a readable fasthg checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path}: not a fasthg checkpoint (expected format {FORMAT!r})")
    return state


def load_model(path: str, backend: str = "auto", model: Optional[StackedHourglass] = None) -> StackedHourglass:
    """The checkpoint's model (built from its config), or its weights loaded into `model`,
    which must have the same shape."""
    state = read(path)
    if model is None:
        model = StackedHourglass(**state["model_config"], backend=backend)
    elif dict(model.config) != state["model_config"]:
        raise ValueError(f"{path}: checkpoint of a model {state['model_config']}, not {dict(model.config)}")
    model.load_state_dict(state["model"])
    return model
