from fasthg.models.hourglass import Hourglass, Residual, StackedHourglass, hg1, hg2, hg4, hg8
from fasthg.models.convert import from_checkpoint

PRESETS = {"hg1": hg1, "hg2": hg2, "hg4": hg4, "hg8": hg8}

__all__ = ["Hourglass", "Residual", "StackedHourglass", "hg1", "hg2", "hg4", "hg8", "PRESETS", "from_checkpoint"]
