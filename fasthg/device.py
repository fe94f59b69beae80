"""The device a command or the trainer runs on: "auto" is CUDA where there is a GPU, else the CPU."""
import torch


def resolve(name: str) -> torch.device:
    """torch.device for "auto", "cpu", "cuda", "cuda:1", ..."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# torch.cpu's probes of the CPU's bfloat16 instructions, by the name a person knows them by
_BF16_PROBES = {"AMX": "_is_amx_tile_supported", "bf16": "_is_avx512_bf16_supported"}


def _cpu_has(probe: str) -> bool:
    """torch.cpu.<probe>(); the probes are private: where one is missing, the answer is no."""
    try:
        return bool(getattr(torch.cpu, probe)())
    except (AttributeError, RuntimeError):
        return False


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bfloat16 instructions (AMX or AVX512_BF16), with which oneDNN runs
    autocast's bf16 convolutions natively rather than converting to float32."""
    return any(_cpu_has(probe) for probe in _BF16_PROBES.values())


def cpu_name(default: str = "unknown CPU") -> str:
    """This CPU's model name (/proc/cpuinfo's), or `default` where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), default)
    except OSError:
        return default


def cpu_description() -> str:
    """This CPU for a person reading a measurement: its model name, core count and the widest
    vector/matrix instructions torch's kernels use here, e.g. "AMD EPYC, 2 cores, AVX512 + bf16"."""
    import os

    name = cpu_name()
    isa = torch.backends.cpu.get_cpu_capability()
    extras = [what for what, probe in _BF16_PROBES.items() if _cpu_has(probe)]
    return f"{name}, {os.cpu_count()} cores, {' + '.join([isa] + extras)}"
