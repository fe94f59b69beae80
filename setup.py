"""Builds fasthg and its native extension fasthg._C from csrc/.

The CPU sources are always built. The CUDA sources are built when nvcc and a CUDA build of
torch are both present; FASTHG_CUDA=1 forces them on (and fails loudly if they cannot be
built), FASTHG_CUDA=0 forces them off. With no GPU visible and no TORCH_CUDA_ARCH_LIST set,
the CUDA code is built for A100 and H100 (8.0;9.0).

Build without isolation so the torch already installed is the one compiled against:
    pip install --no-build-isolation -e .
"""
import glob
import os
import platform

from setuptools import find_packages, setup

# A minimal toolkit lives in /usr/local/cuda but its nvcc may be reached through a wrapper
# elsewhere on PATH, which would make torch guess the wrong CUDA_HOME.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

DEFAULT_ARCHS = "8.0;9.0"
HERE = os.path.dirname(os.path.abspath(__file__))


def want_cuda():
    flag = os.environ.get("FASTHG_CUDA", "auto").lower()
    available = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if flag in ("0", "off", "false", "no"):
        return False
    if flag in ("1", "on", "true", "yes"):
        if not available:
            raise RuntimeError(
                "FASTHG_CUDA=1 but the CUDA sources cannot be built: "
                f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME}"
            )
        return True
    if flag != "auto":
        raise RuntimeError(f"FASTHG_CUDA must be 0, 1 or auto, got {flag!r}")
    return available


def cuda_archs():
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.cuda.is_available():
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        return ";".join(f"{a}.{b}" for a, b in sorted(caps))
    return DEFAULT_ARCHS


def cpu_flags():
    """AVX2+FMA (and F16C, for float16) code when the machine that builds (and so runs) the extension has them:
    the CPU kernels' select-and-accumulate loops only vectorise past SSE2. No FMA
    contraction, so that a forward and its recomputing backward round identically.
    FASTHG_CPU_SIMD=0 builds for the x86-64 baseline."""
    if os.environ.get("FASTHG_CPU_SIMD", "1") == "0" or platform.machine() not in ("x86_64", "AMD64"):
        return []
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    if not {"avx2", "fma"} <= set(flags):
        return []
    return ["-mavx2", "-mfma", "-ffp-contract=off"] + (["-mf16c"] if "f16c" in flags else [])


def write_build_info(with_cuda, archs):
    with open(os.path.join(HERE, "fasthg", "_build_info.py"), "w") as f:
        f.write("# Written by setup.py at build time.\n")
        f.write(f"WITH_CUDA = {with_cuda!r}\n")
        f.write(f"CUDA_ARCHS = {archs!r}\n")
        f.write(f"TORCH_VERSION = {torch.__version__!r}\n")


def extensions():
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp")) + sorted(glob.glob("csrc/autograd/*.cpp"))
    cxx = ["-O3", "-fopenmp"] + cpu_flags()
    with_cuda = want_cuda()
    archs = ""
    if with_cuda:
        archs = cuda_archs()
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        ext = cpp_extension.CUDAExtension(
            "fasthg._C",
            sources,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--fmad=false"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "fasthg._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"]
        )
    write_build_info(with_cuda, archs)
    return [ext]


setup(
    name="fasthg",
    version="0.1.0",
    description="Stacked Hourglass pose networks with fused CUDA/C++/Triton kernels",
    # kernels/ sits at the top level of the repository but installs as fasthg.kernels.
    packages=find_packages(include=["fasthg", "fasthg.*"]) + ["fasthg.kernels"],
    package_dir={"fasthg.kernels": "kernels"},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy", "tqdm", "opencv-python-headless", "h5py"],
    extras_require={
        "triton": ["triton"],
        "test": ["pytest", "pytest-benchmark", "torchvision", "triton; platform_system == 'Linux'"],
        "plot": ["matplotlib"],
        # fasthg export, and eval/predict --runtime onnxruntime|openvino (auto picks the fastest)
        "deploy": ["onnx", "onnxruntime", "openvino"],
    },
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    entry_points={"console_scripts": ["fasthg = fasthg.cli:main"]},
)
