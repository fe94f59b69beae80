"""A StackedHourglass in the forms people deploy: ONNX (any runtime reads it: ONNX Runtime,
OpenVINO, TensorRT) and torch.export's ExportedProgram. Both hold the eager composition of the
network (stock convolutions, BatchNorm, ReLU, max-pool, nearest upsample and add: no fasthg op),
in eval mode; the runtimes fold BatchNorm into the convolutions on load themselves. Files are
written atomically (a temporary file, then a rename)."""
import os
import tempfile
import warnings
from typing import Optional

import torch

from fasthg.models import StackedHourglass

FORMATS = ("onnx", "torch")
OPSET = 18


def eager_twin(model: StackedHourglass) -> StackedHourglass:
    """An eval-mode copy of `model` on the CPU built from stock PyTorch ops (backend "eager")."""
    if not isinstance(model, StackedHourglass):
        raise TypeError(f"model: expected a fasthg StackedHourglass, got {type(model).__name__}")
    twin = StackedHourglass(**model.config, backend="eager")
    twin.load_state_dict(model.state_dict())
    return twin.eval()


def write_atomically(path: str, write) -> str:
    """write(tmp) into a temporary file beside `path`, then one rename onto it: a failed or
    interrupted write leaves what was at `path` (and no temporary file). Returns `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _example(model: StackedHourglass, input_size: int, batch: int = 2) -> torch.Tensor:
    mult = 4 * 2 ** model.depth
    if input_size % mult:
        raise ValueError(f"input_size must be a multiple of {mult} for depth {model.depth}, got {input_size}")
    return torch.randn(batch, 3, input_size, input_size)


def export_onnx(model: StackedHourglass, path: str, input_size: int = 256, opset: int = OPSET) -> str:
    """Writes `model` as ONNX to `path`: input "images" [batch, 3, input_size, input_size]
    (fasthg's: RGB, pixel / 255 - 0.5; a converted model's input_norm is inside the graph),
    output "heatmaps" [batch, stacks, joints, input_size / 4, input_size / 4], the batch
    dynamic. Returns `path`."""
    twin = eager_twin(model)
    x = _example(model, input_size)

    def write(tmp):
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
            torch.onnx.export(twin, (x,), tmp, input_names=["images"], output_names=["heatmaps"],
                              dynamic_axes={"images": {0: "batch"}, "heatmaps": {0: "batch"}},
                              opset_version=opset, dynamo=False)

    return write_atomically(path, write)


def export_program(model: StackedHourglass, path: str, input_size: int = 256) -> str:
    """Writes `model` as torch.export's ExportedProgram (torch.export.save, a .pt2 file) with
    a dynamic batch; torch.export.load(path).module() runs it. Returns `path`."""
    twin = eager_twin(model)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(twin, (_example(model, input_size),), dynamic_shapes=({0: batch},))
    return write_atomically(path, lambda tmp: torch.export.save(program, tmp))


def export_file(model: StackedHourglass, path: str, fmt: Optional[str] = None, input_size: int = 256) -> str:
    """export_onnx or export_program, by `fmt` or else by the file's extension (.onnx; .pt2)."""
    fmt = fmt or ("onnx" if path.lower().endswith(".onnx") else "torch" if path.lower().endswith(".pt2") else None)
    if fmt not in FORMATS:
        raise ValueError(f"{path}: give a format ({', '.join(FORMATS)}) or a file ending in .onnx or .pt2")
    return export_onnx(model, path, input_size) if fmt == "onnx" else export_program(model, path, input_size)
