"""Every Triton kernel compiles for sm_90 (tests/triton_compile_all.py), in a process of its
own without the interpreter: what the interpreter tests cannot show, short of a GPU."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
HERE = os.path.dirname(os.path.abspath(__file__))


def test_every_triton_kernel_compiles_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(HERE)
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, os.path.join(HERE, "triton_compile_all.py")], capture_output=True,
                         text=True, env=env, cwd=root, timeout=900)
    assert run.returncode == 0 and run.stdout.strip().endswith("all compiled"), (run.stdout + run.stderr)[-4000:]
