"""Where `fasthg eval` and `fasthg predict` run the network's forward: PyTorch (fasthg's folded
model, fasthg.fuse.for_inference), ONNX Runtime or OpenVINO (both reading the ONNX export of
fasthg.deploy.export; optional: `pip install 'fasthg[deploy]'`). Each runtime is a callable
from a batch of images [B, 3, H, W] (fasthg's input) to the heatmaps of every stack
[B, stacks, joints, H/4, W/4], float32 on the CPU or the model's device.

`auto` times every runtime installed that can run the device and precision on one batch of the
evaluation's size and takes the fastest; the choice is cached per model, input size, batch,
precision, CPU and versions (runtimes.json in the cache folder, with the ONNX exports: see
cache_dir), so the timing is paid once."""
import hashlib
import importlib.util
import json
import os
import platform
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

from fasthg.device import cpu_name

RUNTIMES = ("torch", "onnxruntime", "openvino")
PRECISIONS = ("float32", "bf16")
MODULES = {"onnxruntime": "onnxruntime", "openvino": "openvino"}
INSTALL = "pip install 'fasthg[deploy]' (or: pip install onnx onnxruntime openvino)"
TIMED_RUNS = 3


def cache_dir() -> str:
    """FASTHG_CACHE, else $XDG_CACHE_HOME/fasthg, else ~/.cache/fasthg."""
    if os.environ.get("FASTHG_CACHE"):
        return os.environ["FASTHG_CACHE"]
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "fasthg")


def installed(name: str) -> bool:
    return name == "torch" or (name in MODULES and importlib.util.find_spec(MODULES[name]) is not None
                               and importlib.util.find_spec("onnx") is not None)


def why_not(name: str, device: torch.device, precision: str) -> Optional[str]:
    """Why runtime `name` cannot run this device and precision here, or None if it can."""
    if name not in RUNTIMES:
        return f"no runtime {name!r} (expected one of {', '.join(RUNTIMES)}, or auto)"
    if precision not in PRECISIONS:
        return f"no precision {precision!r} (expected one of {', '.join(PRECISIONS)})"
    if not installed(name):
        return f"{name} is not installed ({INSTALL})"
    if name == "onnxruntime":
        if precision == "bf16":
            return "ONNX Runtime has no bfloat16 convolutions (use float32, or openvino or torch for bf16)"
        if device.type == "cuda":
            import onnxruntime

            if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
                return "this ONNX Runtime has no CUDA provider (pip install onnxruntime-gpu)"
    if name == "openvino" and device.type != "cpu":
        return "OpenVINO runs here on the CPU only (give --device cpu)"
    return None


class TorchRuntime:
    """The model as it is (folded for inference by fasthg's CLI), under bf16 autocast for bf16."""
    name = "torch"

    def __init__(self, model: torch.nn.Module, device: torch.device, precision: str = "float32"):
        self.model, self.device, self.precision = model, device, precision

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            return self.model(images.to(self.device)).float()


class OnnxRuntime:
    """ONNX Runtime's session over the ONNX file (CPU, or its CUDA provider for a CUDA device),
    with as many threads as torch uses."""
    name = "onnxruntime"

    def __init__(self, onnx_path: str, device: torch.device):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        providers = (["CUDAExecutionProvider"] if device.type == "cuda" else []) + ["CPUExecutionProvider"]
        self.session = onnxruntime.InferenceSession(onnx_path, options, providers=providers)
        self.device = device

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(["heatmaps"], {"images": _numpy(images)})[0])


class OpenVinoRuntime:
    """OpenVINO's compiled model of the ONNX file on the CPU, in f32 or bf16 (its inference
    precision hint), with as many threads as torch uses."""
    name = "openvino"

    def __init__(self, onnx_path: str, precision: str = "float32"):
        import openvino

        core = openvino.Core()
        config = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
                  "INFERENCE_NUM_THREADS": torch.get_num_threads()}
        self.compiled = core.compile_model(core.read_model(onnx_path), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.device = torch.device("cpu")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        result = self.request.infer({0: _numpy(images)})
        return torch.from_numpy(result[self.compiled.output(0)].copy())


def _numpy(images: torch.Tensor):
    """The ONNX graph's input: float32 NCHW on the CPU, as numpy."""
    return images.detach().float().cpu().contiguous().numpy()


def model_key(model, input_size: int) -> str:
    """A digest of the model's weights and config, the input size and the torch version that
    turns it into a runtime's program (the ONNX file's and the choice's cache key)."""
    h = hashlib.sha256()
    h.update(json.dumps([model.config, input_size, torch.__version__], sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def onnx_file(model, input_size: int, key: Optional[str] = None) -> str:
    """The ONNX export of `model` at `input_size` in the cache folder, written once. `key`:
    model_key(model, input_size), for a caller that has it (hashing hg8's weights takes ~0.2 s)."""
    from fasthg.deploy.export import export_onnx

    path = os.path.join(cache_dir(), "onnx", f"{key or model_key(model, input_size)}.onnx")
    if not os.path.exists(path):
        export_onnx(model, path, input_size)
    return path


def make(name: str, model, folded: torch.nn.Module, input_size: int, device: torch.device,
         precision: str = "float32", key: Optional[str] = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Runtime `name` for the model: `folded` (the torch runtime's module) or the ONNX export of
    `model` (its StackedHourglass) for the others; `key` as onnx_file's. ValueError saying why
    where it cannot run."""
    reason = why_not(name, device, precision)
    if reason:
        raise ValueError(f"--runtime {name}: {reason}")
    if name == "torch":
        return TorchRuntime(folded, device, precision)
    path = onnx_file(model, input_size, key)
    return OnnxRuntime(path, device) if name == "onnxruntime" else OpenVinoRuntime(path, precision)


def time_runtime(run: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, repeats: int = TIMED_RUNS) -> float:
    """Median seconds of run(images) after one warm-up call."""
    run(images)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = run(images)
        if out.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def _choice_key(model_digest: str, batch: int, device: torch.device, precision: str, candidates: List[str]) -> str:
    versions = {n: version(n) for n in candidates}
    cpu = cpu_name(platform.processor() or platform.machine())
    return (f"{model_digest}|{batch}|{device}|{precision}|{cpu}|{torch.get_num_threads()}|"
            f"{json.dumps(versions, sort_keys=True)}")


def version(name: str) -> str:
    """The installed version of runtime `name`."""
    if name == "torch":
        return torch.__version__
    module = __import__(MODULES[name])
    return getattr(module, "__version__", None) or getattr(module, "get_version", lambda: "?")()


def _read_choices(path: str) -> Dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}  # none yet, or a damaged cache: measured again


def _write_choices(path: str, choices: Dict) -> None:
    from fasthg.deploy.export import write_atomically

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(choices, f, indent=1)

    write_atomically(path, write)


def choose(model, folded: torch.nn.Module, input_size: int, batch: int, device: torch.device,
           precision: str = "float32") -> Tuple[Callable, Dict[str, float], bool]:
    """`auto`: (the fastest runtime, {name: measured ms per batch}, whether the choice came from
    the cache). Candidates: torch and every runtime installed that can run the device and
    precision."""
    candidates = [n for n in RUNTIMES if why_not(n, device, precision) is None]
    if candidates == ["torch"]:
        return make("torch", model, folded, input_size, device, precision), {}, False
    path = os.path.join(cache_dir(), "runtimes.json")
    digest = model_key(model, input_size)
    key = _choice_key(digest, batch, device, precision, candidates)
    cached = _read_choices(path).get(key)
    if cached and cached.get("runtime") in candidates:
        return make(cached["runtime"], model, folded, input_size, device, precision, digest), cached["ms"], True
    images = torch.randn(batch, 3, input_size, input_size, device=device)
    runs = {n: make(n, model, folded, input_size, device, precision, digest) for n in candidates}
    ms = {n: 1e3 * time_runtime(run, images) for n, run in runs.items()}
    best = min(ms, key=ms.get)
    choices = _read_choices(path)
    choices[key] = {"runtime": best, "ms": ms}
    _write_choices(path, choices)
    return runs[best], ms, False
