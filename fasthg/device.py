"""The device a command or the trainer runs on: "auto" is CUDA where there is a GPU, else the CPU."""
import torch


def resolve(name: str) -> torch.device:
    """torch.device for "auto", "cpu", "cuda", "cuda:1", ..."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bfloat16 instructions (AMX or AVX512_BF16), with which oneDNN runs
    autocast's bf16 convolutions natively rather than converting to float32. (torch.cpu's probes are
    private: where they are missing, the answer is no.)"""
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        try:
            if getattr(torch.cpu, probe)():
                return True
        except (AttributeError, RuntimeError):
            continue
    return False


def cpu_description() -> str:
    """This CPU for a person reading a measurement: its model name, core count and the widest
    vector/matrix instructions torch's kernels use here, e.g. "AMD EPYC, 2 cores, AVX512 + bf16"."""
    import os

    name = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    isa = torch.backends.cpu.get_cpu_capability()
    extras = [what for what, probe in (("AMX", "_is_amx_tile_supported"), ("bf16", "_is_avx512_bf16_supported"))
              if getattr(torch.cpu, probe, lambda: False)()]
    return f"{name}, {os.cpu_count()} cores, {' + '.join([isa] + extras)}"
