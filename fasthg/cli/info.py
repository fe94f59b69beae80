"""What `fasthg info` prints: versions, how the extension was built, usable backends."""
import platform

import torch

import fasthg
from fasthg.ops import _backend, _ext, registry


def collect() -> dict:
    info = {
        "fasthg": fasthg.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "extension_loaded": _ext._C is not None,
        "extension_error": None if _ext.LOAD_ERROR is None else str(_ext.LOAD_ERROR),
        **_ext.build_info(),
        "triton": None,
        "triton_interpreter": _backend.triton_interpreted(),
        "cpu_threads": torch.get_num_threads(),
        "cuda_devices": [],
        "backends": {"cpu": _backend.available("cpu")},
        "ops": {op.name: {"cpu": _backend.available("cpu", op.name)} for op in registry.ops()},
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    from fasthg.bench.harness import dtype_name
    from fasthg.ops import conv1x1

    info["conv1x1_unit_cpu"] = None
    if conv1x1.native_available():
        kernels = {dtype_name(d): torch.ops.fasthg.cpu_gemm_kernel(d) for d in (torch.float32, torch.bfloat16)}
        info["conv1x1_unit_cpu"] = {"gemm_kernel": kernels,
                                    "training_dtypes": [dtype_name(d) for d in conv1x1.cpu_unit_dtypes()],
                                    "training_dtypes_with_skip": [dtype_name(d)
                                                                  for d in conv1x1.cpu_unit_dtypes(with_skip=True)]}
    from fasthg.deploy import runtimes

    info["runtimes"] = {name: runtimes.version(name) if runtimes.installed(name) else None
                        for name in runtimes.RUNTIMES if name != "torch"}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["cuda_devices"].append(f"{p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)")
        info["backends"]["cuda"] = _backend.available("cuda")
        for name, per_device in info["ops"].items():
            per_device["cuda"] = _backend.available("cuda", name)
    return info


def _routed(unit: dict) -> str:
    """Which dtypes the models train in the conv1x1 unit, in words."""
    every, with_skip = (", ".join(unit[k]) or "no dtype" for k in ("training_dtypes", "training_dtypes_with_skip"))
    if every == with_skip:
        return f"{every} in it"
    return f"{with_skip} in it where its input also feeds a residual branch, {every} elsewhere"


def render(info: dict) -> str:
    rows = [
        ("fasthg", info["fasthg"]),
        ("python", info["python"]),
        ("torch", f'{info["torch"]} (CUDA {info["torch_cuda"] or "none"})'),
        ("triton", (info["triton"] or "not installed") + (" [interpreter]" if info["triton_interpreter"] else "")),
        ("extension", "loaded" if info["extension_loaded"] else f'NOT loaded: {info["extension_error"]}'),
        ("built with CUDA", f'yes, archs {info["cuda_archs"]}' if info["with_cuda"] else "no"),
        ("built against torch", info["built_against_torch"]),
        ("CPU threads", info["cpu_threads"]),
        ("conv1x1 unit (CPU)", "not built" if not info.get("conv1x1_unit_cpu") else
         "GEMM " + ", ".join(f"{k} ({d})" for d, k in info["conv1x1_unit_cpu"]["gemm_kernel"].items())
         + f'; the models train {_routed(info["conv1x1_unit_cpu"])} (FASTHG_CPU_CONV1X1)'),
        ("CUDA devices", ", ".join(info["cuda_devices"]) or "none visible"),
        ("inference runtimes", ", ".join(f"{n} {v or 'not installed'}" for n, v in info.get("runtimes", {}).items())
         + " (fasthg eval/predict --runtime; pip install 'fasthg[deploy]')"),
    ]
    rows += [(f"backends on {dev}", ", ".join(b)) for dev, b in info["backends"].items()]
    rows += [(f"  {name} on {dev}", ", ".join(b)) for name, per_device in info.get("ops", {}).items()
             for dev, b in per_device.items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def run(args) -> int:
    print(render(collect()))
    return 0


def add_command(sub):
    sub.add_parser("info", help="versions, extension build, backends per device").set_defaults(fn=run)
