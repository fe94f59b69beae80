"""The op registry (fasthg.ops.registry) is the one list of fused ops: every op in it has its
kernels, reference, tests, emulation, AOT compile list and benchmark calls, and every native
schema belongs to a registered op, so that no op can be half-added and silently run eager."""
import importlib
import os
import re
import subprocess
import sys

import pytest
import torch

import fasthg
from fasthg.bench import cases
from fasthg.ops import _backend, reference, registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = registry.names()


def _schemas_in_ops_cpp():
    with open(os.path.join(ROOT, "csrc", "ops.cpp")) as f:
        return re.findall(r'm\.def\(\s*"(\w+)\(', f.read())


def test_the_hourglass_ops_are_registered():
    assert set(OPS) == {"bn_add_relu", "bn_relu", "max_pool2x2", "upsample_add"}
    assert fasthg.ops.registry is registry


@pytest.mark.parametrize("name", OPS)
def test_every_op_has_its_files(name):
    for path in (f"fasthg/ops/{name}.py", f"csrc/cpu/{name}.cpp", f"csrc/cuda/{name}.cu", f"kernels/{name}.py",
                 f"tests/test_{name}.py", f"tests/cuda_emulation/emulate_{name}.cpp"):
        assert os.path.isfile(os.path.join(ROOT, path)), f"fused op {name!r} is registered without {path}"
    assert registry.get(name).test_file == f"tests/test_{name}.py"


@pytest.mark.parametrize("name", OPS)
def test_every_op_has_its_reference_entry_and_benchmark(name):
    op = registry.get(name)
    assert op.reference is getattr(reference, name), "the reference is fasthg.ops.reference.NAME"
    assert op.fn is getattr(fasthg.ops, name), "the public entry is fasthg.ops.NAME"
    assert op.traffic and set(op.bars) <= set(op.traffic)
    assert name in cases.CALLS, "fasthg.bench.cases.CALLS has no benchmark calls for it"
    assert set(op.backends) <= set(registry.BACKENDS) and "eager" in op.backends


@pytest.mark.parametrize("name", OPS)
def test_every_op_has_its_triton_compile_list(name):
    pytest.importorskip("triton")
    module = importlib.import_module(f"fasthg.kernels.{name}")
    variants = list(module.compile_variants("fp32", True, False))
    assert variants and all(callable(k) or hasattr(k, "arg_names") for k, _, _ in variants)


def test_every_triton_kernel_module_is_compiled_ahead_of_time():
    """kernels/NAME.py is a registered op's or listed in registry.TRITON_ONLY_KERNELS (which
    tests/triton_compile_all.py compiles too), and a Triton-only one has its tests and
    compile list."""
    pytest.importorskip("triton")
    modules = {f[:-3] for f in os.listdir(os.path.join(ROOT, "kernels")) if f.endswith(".py") and not f.startswith("_")}
    assert modules == set(OPS) | set(registry.TRITON_ONLY_KERNELS)
    assert not set(OPS) & set(registry.TRITON_ONLY_KERNELS)
    for name in registry.TRITON_ONLY_KERNELS:
        assert os.path.isfile(os.path.join(ROOT, "tests", f"test_{name}.py"))
        module = importlib.import_module(f"fasthg.kernels.{name}")
        assert list(module.compile_variants("fp32", True, False))


def test_every_native_schema_belongs_to_one_registered_op():
    declared = _schemas_in_ops_cpp()
    owned = [s for op in registry.ops() for s in op.schemas] + list(registry.UNREGISTERED_SCHEMAS)
    assert sorted(owned) == sorted(declared), "csrc/ops.cpp and the registry list different fasthg:: schemas"
    assert len(set(owned)) == len(owned)


@pytest.mark.skipif(fasthg.ops._ext._C is None, reason="extension not built")
@pytest.mark.parametrize("name", OPS)
def test_a_built_extension_has_every_cpu_kernel(name):
    """The CPU sources are always built: a registered op without them would fall back to eager."""
    assert registry.has_native(name, "cpu")
    assert "native" in fasthg.ops.available("cpu", name)
    x = torch.randn(2, 3, 4, 4)
    assert _backend.resolve("auto", name, x) == "native"


def test_auto_and_available_read_the_registry():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="unknown fused op 'nope'"):
        _backend.resolve("auto", "nope", x)
    with pytest.raises(ValueError, match="backend must be one of"):
        _backend.resolve("fast", "bn_relu", x)
    assert fasthg.ops.available("cpu") == [b for b in fasthg.ops.available("cpu", OPS[0])
                                           if all(b in fasthg.ops.available("cpu", n) for n in OPS)]


def test_registering_twice_or_a_kernel_outside_the_schemas_is_refused():
    op = registry.get("bn_relu")
    with pytest.raises(ValueError, match="registered twice"):
        registry.register(op)
    import dataclasses
    with pytest.raises(ValueError, match="is not one of its schemas"):
        registry.register(dataclasses.replace(op, name="other", kernel="missing"))
    assert "other" not in registry.names()


def test_the_gpu_check_reads_its_test_list_from_the_registry():
    run = subprocess.run([sys.executable, "-m", "fasthg.ops", "--test-files"], capture_output=True, text=True,
                         cwd=ROOT)
    assert run.returncode == 0 and not run.stderr, run.stderr
    assert run.stdout.split() == [f"tests/test_{n}.py" for n in OPS]
    with open(os.path.join(ROOT, "benchmarks", "gpu_check.sh")) as f:
        assert '-m fasthg.ops --test-files' in f.read()


def test_the_benchmarks_find_every_op_in_the_model():
    """The hourglass's ops at the model's own shapes; bn_add_relu (a residual block's end,
    which the pre-activation hourglass has not) at its registry entry's."""
    in_model = cases.hourglass_shapes("hg1", 128)
    shapes = cases.benchmark_shapes("hg1", 128)
    assert set(shapes) == set(OPS) and all(shapes[n] for n in OPS)
    assert {n for n in OPS if in_model[n]} == set(OPS) - {"bn_add_relu"}
    assert shapes["bn_add_relu"] == list(registry.get("bn_add_relu").shapes)
