"""`fasthg export`: a checkpoint's network as ONNX or a torch.export program, for deployment."""
import torch

from fasthg.cli import args as types
from fasthg.cli._model import input_mean
from fasthg.deploy import FORMATS


def check(model, path: str, fmt: str, size: int) -> str:
    """The exported file run on two random images against the PyTorch model: a line with the
    relative error (ONNX: in ONNX Runtime, where installed)."""
    from fasthg.deploy.export import eager_twin

    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = eager_twin(model)(images)
    if fmt == "torch":
        out, where = torch.export.load(path).module()(images), "torch.export.load"
    else:
        from fasthg.deploy import runtimes

        if runtimes.why_not("onnxruntime", torch.device("cpu"), "float32"):
            return f"not checked: {runtimes.why_not('onnxruntime', torch.device('cpu'), 'float32')}"
        out, where = runtimes.OnnxRuntime(path, torch.device("cpu"))(images), "ONNX Runtime"
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    return f"checked in {where} against PyTorch on 2 random images: relative error {err:.1e}"


def run(args) -> int:
    from fasthg.deploy import export_file
    from fasthg.models import convert

    ckpt = convert.read_checkpoint(args.checkpoint, input_mean=args.input_mean, trust=args.trust_checkpoint)
    model = convert.build(ckpt, backend="eager")
    size = args.input_size or ckpt.input_size
    fmt = args.format or ("torch" if args.out.lower().endswith(".pt2") else "onnx")
    path = export_file(model, args.out, fmt, size)
    shape = f"[batch, 3, {size}, {size}] -> [batch, {model.num_stacks}, {model.num_joints}, {size // 4}, {size // 4}]"
    print(f"wrote {path} ({'ONNX opset 18' if fmt == 'onnx' else 'torch.export program'}, {shape}, "
          "images as fasthg feeds them: RGB, pixel / 255 - 0.5)")
    if args.check:
        print(check(model, path, fmt, size))
    return 0


def add_command(sub):
    e = sub.add_parser("export", help="write a checkpoint's network as ONNX (ONNX Runtime, OpenVINO, TensorRT) or "
                                      "a torch.export program",
                       description="The eager composition of the network (stock PyTorch ops), in eval mode, the "
                                   "batch dynamic. Heatmap decoding stays fasthg's (fasthg.evaluate).")
    e.add_argument("checkpoint", help="a fasthg checkpoint, or one fasthg.models.from_checkpoint converts")
    e.add_argument("out", help="the file to write (.onnx, or .pt2 for torch.export)")
    e.add_argument("--format", choices=FORMATS, default=None,
                   help="onnx or torch (torch.export's ExportedProgram) (default: by OUT's extension, else onnx)")
    e.add_argument("--input-size", type=types.positive_int, default=None,
                   help="network input size in pixels (default: the checkpoint's, else 256)")
    e.add_argument("--input-mean", type=input_mean, default=None, metavar="R,G,B|FILE",
                   help="for a pytorch-pose checkpoint, as fasthg eval's")
    types.add_trust(e, "the checkpoint")
    e.add_argument("--no-check", dest="check", action="store_false",
                   help="do not run the exported file against PyTorch (by default it does: ONNX in ONNX Runtime "
                        "where installed)")
    e.set_defaults(fn=run)
