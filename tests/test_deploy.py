"""Deployment: `fasthg export` writes ONNX and torch.export files that reproduce the PyTorch
model (ONNX Runtime and OpenVINO run the ONNX file, float32 relative error <= 1e-5, any batch);
`fasthg eval`/`predict --runtime` run in torch, ONNX Runtime or OpenVINO with the same scores,
and auto takes the fastest installed (timed once, cached, said); without the extras nothing
changes."""
import json
import os

import numpy as np
import pytest
import torch
from test_cli_errors import fails
from test_fuse_inference import randomise_bn

from fasthg import checkpoint
from fasthg.cli import main
from fasthg.deploy import export_file, export_onnx, runtimes
from fasthg.models import StackedHourglass

from conftest import rel_err

HAS_ORT = runtimes.installed("onnxruntime")
HAS_OV = runtimes.installed("openvino")
needs_ort = pytest.mark.skipif(not HAS_ORT, reason="onnxruntime is not installed (pip install 'fasthg[deploy]')")
needs_ov = pytest.mark.skipif(not HAS_OV, reason="openvino is not installed (pip install 'fasthg[deploy]')")
CPU = torch.device("cpu")


def small(**kw):
    torch.manual_seed(0)
    model = StackedHourglass(**{"num_stacks": 2, "num_features": 16, "num_joints": 5, "depth": 2, "backend": "eager",
                                **kw})
    return randomise_bn(model).eval()


def reference(model, images):
    with torch.no_grad():
        return model.double()(images.double())


@pytest.fixture
def onnx_path(tmp_path):
    model = small()
    return model, export_onnx(model, str(tmp_path / "m.onnx"), input_size=32)


@needs_ort
@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_runs_in_onnx_runtime_like_pytorch(onnx_path, batch):
    model, path = onnx_path
    images = torch.randn(batch, 3, 32, 32)
    out = runtimes.OnnxRuntime(path, CPU)(images)
    assert out.shape == (batch, 2, 5, 8, 8) and out.dtype == torch.float32
    assert rel_err(out, reference(model, images)) <= 1e-5


@needs_ov
@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_runs_in_openvino_like_pytorch(onnx_path, batch):
    model, path = onnx_path
    images = torch.randn(batch, 3, 32, 32)
    out = runtimes.OpenVinoRuntime(path, "float32")(images)
    assert out.shape == (batch, 2, 5, 8, 8)
    assert rel_err(out, reference(model, images)) <= 1e-5


@needs_ort
def test_a_converted_models_input_norm_and_num_blocks_are_in_the_graph(tmp_path):
    model = small(num_blocks=2, input_norm={"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.3, 0.25]}, stem="pytorch-pose")
    path = export_onnx(model, str(tmp_path / "m.onnx"), input_size=32)
    images = torch.randn(2, 3, 32, 32)
    assert rel_err(runtimes.OnnxRuntime(path, CPU)(images), reference(model, images)) <= 1e-5


def test_torch_export_program_round_trips(tmp_path):
    model = small()
    path = export_file(model, str(tmp_path / "m.pt2"), input_size=32)
    program = torch.export.load(path).module()
    for batch in (1, 4):
        images = torch.randn(batch, 3, 32, 32)
        assert rel_err(program(images), reference(model, images)) <= 1e-5


def test_export_refuses_what_it_cannot_write(tmp_path):
    with pytest.raises(ValueError, match="give a format"):
        export_file(small(), str(tmp_path / "m.bin"))
    with pytest.raises(ValueError, match="multiple of 16"):
        export_onnx(small(), str(tmp_path / "m.onnx"), input_size=40)
    with pytest.raises(TypeError, match="expected a fasthg StackedHourglass"):
        export_onnx(torch.nn.Conv2d(3, 3, 1), str(tmp_path / "m.onnx"))
    assert os.listdir(tmp_path) == []  # nothing half-written


@pytest.fixture
def ckpt(tmp_path):
    path = str(tmp_path / "m.pt")
    checkpoint.save(path, small(num_joints=16), input_size=32)
    return path


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_the_export_command(ckpt, tmp_path, capsys, fmt):
    out = str(tmp_path / f"hg.{fmt}")
    assert main(["export", ckpt, out]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "[batch, 3, 32, 32] -> [batch, 2, 16, 8, 8]" in printed
    if fmt == "pt2" or HAS_ORT:
        error = float(printed.split("relative error ")[1].split()[0])
        assert error <= 1e-5, printed
    else:
        assert "not checked: onnxruntime is not installed" in printed


def _scores(capsys, argv):
    assert main(argv) == 0
    out, err = capsys.readouterr()
    runtime = next(line for line in err.splitlines() if line.startswith("runtime: "))
    lines = out.splitlines()
    table = lines[lines.index(next(line for line in lines if line.startswith("PCKh@0.5"))) + 2]
    return runtime, [float(v) for v in table.split("|")]


@needs_ort
@needs_ov
def test_eval_gives_the_same_scores_in_every_runtime(ckpt, capsys):
    argv = ["eval", ckpt, "--n", "12", "--device", "cpu", "--batch-size", "4"]
    scores = {}
    for runtime in runtimes.RUNTIMES:
        said, scores[runtime] = _scores(capsys, argv + ["--runtime", runtime])
        assert said == f"runtime: {runtime} (float32)"
    assert scores["onnxruntime"] == pytest.approx(scores["torch"], abs=1e-6)
    assert scores["openvino"] == pytest.approx(scores["torch"], abs=1e-6)


@needs_ort
def test_auto_times_the_runtimes_once_and_takes_the_fastest(ckpt, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("FASTHG_CACHE", str(tmp_path / "cache"))
    fake = {"torch": 30.0, "onnxruntime": 10.0, "openvino": 20.0}
    timed = []

    def time_runtime(run, images, repeats=3):
        timed.append(run.name)
        return fake[run.name] / 1e3

    monkeypatch.setattr(runtimes, "time_runtime", time_runtime)
    argv = ["eval", ckpt, "--n", "8", "--device", "cpu", "--batch-size", "4"]
    said, first = _scores(capsys, argv)
    candidates = [n for n in runtimes.RUNTIMES if runtimes.why_not(n, CPU, "float32") is None]
    assert sorted(timed) == sorted(candidates)
    assert said.startswith("runtime: onnxruntime (float32; auto, forward of 4 images: torch 30 ms, onnxruntime 10 ms")
    said, again = _scores(capsys, argv)
    assert len(timed) == len(candidates) and again == first  # cached: not timed again
    assert said.startswith("runtime: onnxruntime (float32; auto, cached forward of 4 images")
    choices = json.load(open(tmp_path / "cache" / "runtimes.json"))
    assert [c["runtime"] for c in choices.values()] == ["onnxruntime"]
    _scores(capsys, argv[:-1] + ["8"])  # another batch size: timed anew
    assert len(timed) == 2 * len(candidates)


def test_without_the_extras_auto_is_torch_and_the_others_say_how_to_install(ckpt, capsys, monkeypatch):
    real = runtimes.installed
    monkeypatch.setattr(runtimes, "installed", lambda name: name == "torch")
    said, _ = _scores(capsys, ["eval", ckpt, "--n", "4", "--device", "cpu"])
    assert said == "runtime: torch (float32; auto, the only one installed)"
    for name in ("onnxruntime", "openvino"):
        fails(capsys, monkeypatch, ["eval", ckpt, "--n", "4", "--device", "cpu", "--runtime", name], 1,
              f"--runtime {name}: {name} is not installed (pip install 'fasthg[deploy]'")
    monkeypatch.setattr(runtimes, "installed", real)


def test_runtimes_refuse_what_they_cannot_run(ckpt, capsys, monkeypatch):
    if HAS_ORT:
        fails(capsys, monkeypatch, ["eval", ckpt, "--n", "4", "--device", "cpu", "--runtime", "onnxruntime",
                                    "--precision", "bf16"], 1, "ONNX Runtime has no bfloat16 convolutions")
    on_cuda = runtimes.why_not("openvino", torch.device("cuda"), "float32")
    assert on_cuda == ("OpenVINO runs here on the CPU only (give --device cpu)" if HAS_OV else
                       "openvino is not installed (pip install 'fasthg[deploy]' (or: pip install onnx onnxruntime "
                       "openvino))")
    fails(capsys, monkeypatch, ["eval", ckpt, "--runtime", "tensorrt"], 2, "--runtime")


# OpenVINO's bf16 runs in a process of its own: after it had run in the test process, a later
# subprocess spawn crashed that process (SIGSEGV, 3 of 3 full runs; not without these calls).
BF16_CHILD = r"""
import sys, torch
from fasthg.deploy import runtimes
from fasthg.models import StackedHourglass
torch.manual_seed(0)
model = StackedHourglass(2, 16, 16, 2, backend="eager").eval()
path = runtimes.onnx_file(model, 32)
images = torch.randn(2, 3, 32, 32)
with torch.no_grad():
    ref = model.double()(images.double())
out = runtimes.OpenVinoRuntime(path, "bf16")(images)
print(((out.double() - ref).norm() / ref.norm()).item())
"""


@needs_ov
def test_bf16_runs_in_torch_and_openvino_close_to_float32(ckpt, capsys):
    import subprocess
    import sys

    for runtime in ("torch", "openvino"):
        run = subprocess.run([sys.executable, "-m", "fasthg", "eval", ckpt, "--n", "8", "--device", "cpu",
                              "--batch-size", "4", "--precision", "bf16", "--runtime", runtime],
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr
        assert f"runtime: {runtime} (bf16)" in run.stderr and "PCKh@0.5 on 8 people" in run.stdout
    run = subprocess.run([sys.executable, "-c", BF16_CHILD], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert float(run.stdout.split()[-1]) < 5e-2


@needs_ort
def test_predict_runs_in_onnx_runtime(ckpt, tmp_path, capsys):
    import cv2

    img = str(tmp_path / "person.png")
    cv2.imwrite(img, np.full((40, 30, 3), 90, np.uint8))
    assert main(["predict", ckpt, img, "--out", str(tmp_path / "p"), "--device", "cpu", "--runtime",
                 "onnxruntime"]) == 0
    assert "runtime: onnxruntime (float32)" in capsys.readouterr().err
    assert cv2.imread(str(tmp_path / "p" / "person_pose.png")).shape == (40, 30, 3)


def test_bench_inference_rows_for_the_runtimes_and_the_comparison_line():
    from fasthg.bench.inference import RUNTIME_VARIANTS, bench_inference, fold_checks, fold_lines, runtime_variants

    installed = [n for n in RUNTIME_VARIANTS if runtimes.why_not(n, CPU, "float32") is None]
    assert runtime_variants(CPU, torch.float32) == installed  # bench_inference's default adds them
    rows = bench_inference("hg1", "cpu", 1, 64, repeats=1, variants=("eager", "folded", *RUNTIME_VARIANTS))
    assert [r["backend"] for r in rows] == ["eager", "folded"] + installed
    assert all(r["images_per_s"] > 0 for r in rows)
    # bf16: ONNX Runtime is no candidate; OpenVINO is (its bf16 runs in test_bf16_runs_..., in a process apart)
    assert runtime_variants(CPU, torch.bfloat16) == (["openvino"] if HAS_OV else [])
    bf16 = bench_inference("hg1", "cpu", 1, 64, repeats=1, dtype=torch.bfloat16, variants=("eager", "folded"))
    assert [r["backend"] for r in bf16] == ["eager", "folded"]

    def row(backend, ms):
        return {"op": "hg2 inference", "shape": [8, 3, 256, 256], "dtype": "float32", "layout": "nhwc",
                "backend": backend, "median_ms": ms, "speedup": 100 / ms, "images_per_s": 8e3 / ms}

    rows = [row("eager", 100), row("folded", 75), row("onnxruntime", 60), row("openvino", 65)]
    (check,) = fold_checks(rows)
    assert check["fastest_runtime"] == "onnxruntime" and check["folded_of_runtime"] == pytest.approx(0.8)
    assert "folded runs at 0.80x the speed of the fastest runtime (onnxruntime), and --runtime auto picks " \
           "onnxruntime" in "\n".join(fold_lines(rows))
    rows[1]["median_ms"] = 50
    assert fold_checks(rows)[0]["auto_pick"] == "torch"
