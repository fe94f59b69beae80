"""The CUDA kernels on the CPU, where CI has no GPU: tests/cuda_emulation compiles the kernels
of csrc/cuda/<op>.cu as C++ (FASTHG_HOST_EMULATION leaves out the ops around them) against a
stand-in for CUDA's thread indices, barriers and shared memory (cuda_shim.h) and checks them
against double references: index math, coverage, partial tiles, strided loops, both index
types. What only a GPU can show (warps, the memory model, 16-bit device conversions, launch
limits) is left to the tests marked cuda."""
import os
import shutil
import subprocess

import pytest
from torch.utils import cpp_extension

from fasthg.ops import registry

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_emulation")
CXX = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


@pytest.mark.slow  # a C++ build and run: 15-50 s on 2 cores
@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
@pytest.mark.parametrize("op", registry.names())
def test_cuda_kernels_emulated_on_cpu(op, tmp_path):
    exe = str(tmp_path / op)
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]  # torch's headers, as the build uses
    build = subprocess.run([CXX, "-std=c++20", "-O1", "-pthread", "-DFASTHG_HOST_EMULATION", f"-I{HERE}", *includes,
                            os.path.join(HERE, f"emulate_{op}.cpp"), "-o", exe], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([exe], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip().endswith("all passed"), run.stdout[-4000:]
