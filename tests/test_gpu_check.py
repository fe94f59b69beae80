"""benchmarks/gpu_check.sh, dry (GPU_CHECK_DRY=1): every step's command line runs on the CPU
with tiny sizes and the summary is written, so that a lent GPU's minutes are not lost to a
script error. What the GPU itself would say (cuda tests, memcheck, timings) is not checked."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ["the installed extension (dry run: no build)", "tests marked cuda",
         "compute-sanitizer memcheck (op tests, small shapes)", "Triton bn_relu_conv1x1 vs BN-ReLU + cuDNN conv",
         "fasthg bench on the GPU", "fasthg export + inference runtimes on the GPU"]


@pytest.mark.slow  # every step once, tiny: about a minute on 2 cores
def test_the_gpu_check_runs_end_to_end_dry(tmp_path):
    pytest.importorskip("onnx")  # its export step
    env = dict(os.environ, GPU_CHECK_DRY="1", PYTHON=sys.executable)
    run = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), str(tmp_path / "out")], env=env,
                         capture_output=True, text=True, timeout=540, cwd=ROOT)
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert run.returncode == 0, summary + run.stderr[-3000:]
    assert "FAILED" not in summary
    for step in STEPS:
        assert f"ok   {step} (" in summary, step
    try:
        import torchvision  # noqa: F401
        assert "ok   torchvision ResNets accelerated" in summary
    except ImportError:
        assert "skipped: torchvision ResNets" in summary
    assert "bn_add_relu on cpu" in summary  # fasthg info, with every registered op
    assert "checked in ONNX Runtime against PyTorch" in summary
    assert len(os.listdir(tmp_path / "out")) <= 8
