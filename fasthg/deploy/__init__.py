"""The network in the forms people deploy (fasthg.deploy.export: ONNX, torch.export) and the
runtimes `fasthg eval` and `fasthg predict` run it in (fasthg.deploy.runtimes: torch, ONNX
Runtime, OpenVINO, or the fastest of them: auto)."""
from fasthg.deploy.export import FORMATS, export_file, export_onnx, export_program
from fasthg.deploy.runtimes import RUNTIMES, choose, make

__all__ = ["FORMATS", "RUNTIMES", "export_file", "export_onnx", "export_program", "choose", "make"]
