import os

import torch

# Without a GPU, Triton kernels run on CPU tensors through its interpreter. It must be
# switched on before triton is first imported (fasthg imports it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# fasthg.deploy's ONNX exports and runtime choices go to a folder of this session, not ~/.cache.
if "FASTHG_CACHE" not in os.environ:
    import tempfile

    os.environ["FASTHG_CACHE"] = tempfile.mkdtemp(prefix="fasthg-test-cache-")

import pytest  # noqa: E402

import fasthg  # noqa: E402,F401
from fasthg.ops import registry  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


# Tests that call Triton kernels hundreds of times (gradcheck) or through a whole model: each
# takes 5-35 s in the CPU interpreter on 2 cores, so they run in `make test`, not in
# `make test-quick` (marked slow below; the same tests' native cases stay quick).
SLOW_UNDER_THE_TRITON_INTERPRETER = {"test_gradcheck_float64", "test_backend_matches_eager_model",
                                     "test_two_processes_equal_one_process_on_the_whole_batch"}


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="no CUDA device visible")
    for item in items:
        params = getattr(item, "callspec", None) and item.callspec.params
        if (params and params.get("backend") == "triton" and params.get("device", "cpu") == "cpu"
                and item.originalname in SLOW_UNDER_THE_TRITON_INTERPRETER):
            item.add_marker(pytest.mark.slow)
        if not HAS_CUDA and "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def poison():
    """Fill every freshly allocated tensor with NaN (torch's deterministic mode does this for
    torch.empty), so an output element a kernel never writes shows up as NaN."""
    was, was_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    assert torch.isnan(torch.empty(8)).all(), "poisoning is not in effect"
    yield
    torch.use_deterministic_algorithms(was, warn_only=was_warn)
    torch.utils.deterministic.fill_uninitialized_memory = fill


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """|out - ref| / |ref| over the whole tensor, in float64, on the CPU (a CUDA output is
    compared with a CPU float64 reference)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def sgd_steps_agree(a, b, make_input, steps: int, tol: float, lr: float = 0.05) -> None:
    """SGD steps of models `a` (the reference) and `b` from the same weights on the same
    inputs (make_input()), their outputs and all gradients together within `tol` (relative)
    at every step. (All gradients together: a conv bias feeding a training-mode BN has a
    gradient of pure rounding noise, which no per-tensor bound can hold.)"""
    opts = [torch.optim.SGD(m.parameters(), lr=lr) for m in (a, b)]
    for step in range(steps):
        x = make_input()
        outs = []
        for m, opt in zip((a, b), opts):
            opt.zero_grad()
            out = m(x)
            out.square().mean().backward()
            opt.step()
            outs.append(out)
        grads = [torch.cat([p.grad.flatten() for p in m.parameters()]) for m in (a, b)]
        assert rel_err(outs[1], outs[0]) < tol, step
        assert rel_err(grads[1], grads[0]) < tol, step


def backends_on(device: str, op: str = None):
    """Concrete backends that can run `op` (default: every registered op) on a device here
    (Triton on CPU: the interpreter)."""
    if device == "cuda" and not HAS_CUDA:  # collected, then skipped
        return list(registry.get(op).backends if op else registry.BACKENDS)
    return fasthg.ops.available(device, op)


def device_backend_params(include_eager=True, op: str = None):
    """(device, backend) pairs of `op` (default: every registered op), from the registry:
    every backend available on the CPU here, and every backend on CUDA (marked `cuda`, so
    skipped without a GPU)."""
    out = [pytest.param("cpu", b, id=f"cpu-{b}") for b in fasthg.ops.available("cpu", op)
           if include_eager or b != "eager"]
    out += [pytest.param("cuda", b, id=f"cuda-{b}", marks=pytest.mark.cuda)
            for b in (registry.get(op).backends if op else registry.BACKENDS) if include_eager or b != "eager"]
    return out


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def skip_unsupported(device: str, backend: str, dtype: torch.dtype):
    if device == "cpu" and backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bfloat16; bf16 Triton runs in the CUDA tests")


def require_backend(device: str, backend: str, op: str = None):
    """Skip when `backend` has no kernel for `op` (default: every fused op) on `device`."""
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("no CUDA device visible")
    if backend not in fasthg.ops.available(device, op):
        pytest.skip(f"{backend} has no {op or 'complete'} kernel set for {device} in this build")


def in_threads(n: int, fn):
    """fn() with torch's intra-op thread count at n, restored after."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(n)
        return fn()
    finally:
        torch.set_num_threads(threads)


def under_gemm_kernels(script: str, kernels=("avx2", "plain")):
    """{kernel: stdout words} of `python -c script` run from the repository root once per
    FASTHG_GEMM value (the CPU GEMM kernel is read once per process); each run must succeed."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    words = {}
    for kernel in kernels:
        out = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True,
                             env={**os.environ, "FASTHG_GEMM": kernel}, timeout=300)
        assert out.returncode == 0, out.stderr
        words[kernel] = out.stdout.split()
    return words

