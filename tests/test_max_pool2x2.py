"""fasthg.ops.max_pool2x2 on every backend against max_pool2d: the same values and gradients
exactly (a maximum and a routed gradient round nothing), ties and NaN included."""
import pytest
import torch
import torch.nn.functional as F

from conftest import DTYPES, device_backend_params, skip_unsupported
from fasthg import ops
from fasthg.bench.memory import saved_activation_bytes
from fasthg.ops import reference

LAYOUTS = [torch.contiguous_format, torch.channels_last]
# Even, odd H and W (a last row or column in no window), one window, many channels.
SHAPES = [(2, 3, 6, 8), (2, 3, 5, 7), (1, 5, 2, 2), (2, 4, 9, 8), (1, 3, 3, 2), (1, 17, 6, 10)]


def make(shape, dtype, device, layout, seed=0, special=True):
    """Small integers (several maxima share a window), with NaNs, whole -inf windows and
    infinities planted where `special`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, shape, generator=g).double()
    if special:
        flat = x.view(-1)
        n = flat.numel()
        pick = lambda k: torch.randperm(n, generator=g)[:k]  # noqa: E731
        flat[pick(max(1, n // 40))] = float("nan")
        flat[pick(max(1, n // 40))] = float("inf")
        x[0, 0, :2, :2] = float("-inf")  # a window of -inf: its first element is the maximum
    return x.to(device=device, dtype=dtype).contiguous(memory_format=layout)


def assert_same(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("device,backend", device_backend_params(op="max_pool2x2"))
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_values_and_gradients_equal_max_pool2d(device, backend, dtype, layout, shape, poison):
    skip_unsupported(device, backend, dtype)
    x = make(shape, dtype, device, layout).requires_grad_(True)
    y = ops.max_pool2x2(x, backend=backend)
    assert y.shape == (shape[0], shape[1], shape[2] // 2, shape[3] // 2) and y.dtype == dtype
    assert y.is_contiguous(memory_format=layout)
    x64 = x.detach().cpu().double().requires_grad_(True)
    ref = reference.max_pool2x2(x64)
    assert_same(y.double().cpu(), ref.detach())

    grad = torch.randn(ref.shape, dtype=torch.float64).to(dtype)  # representable in dtype: exact
    (gx,) = torch.autograd.grad(y, x, grad.to(device).contiguous(memory_format=layout))
    (want,) = torch.autograd.grad(ref, x64, grad.double())
    assert gx.is_contiguous(memory_format=layout)
    assert_same(gx.double().cpu(), want)  # every element written: no NaN from the poisoned allocation


@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", [(2, 8, 32, 48), (2, 64, 128, 128), (1, 24, 34, 18)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_native_cpu_vector_paths_equal_aten(shape, dtype, layout, poison):
    """The CPU kernels' 8-wide paths, their scalar tails and (float32 from 8 MiB) the backward's
    streaming stores, against ATen's max_pool2d and its backward, bit for bit."""
    if "native" not in ops.available("cpu", "max_pool2x2"):
        pytest.skip("native unavailable")
    x = make(shape, dtype, "cpu", layout, special=False)
    x[0, 0, :4, :6] = float("nan")
    y = torch.ops.fasthg.max_pool2x2(x)
    out, idx = torch.ops.aten.max_pool2d_with_indices(x, [2, 2], [2, 2], [0, 0], [1, 1], False)
    assert_same(y, out)
    grad = torch.randn(out.shape).to(dtype).contiguous(memory_format=layout)
    gx = torch.ops.fasthg.max_pool2x2_backward(grad, x)
    assert_same(gx, torch.ops.aten.max_pool2d_with_indices_backward(grad, x, [2, 2], [2, 2], [0, 0], [1, 1], False, idx))


@pytest.mark.parametrize("device,backend", device_backend_params(include_eager=False, op="max_pool2x2"))
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_gradcheck_float64(device, backend, layout):
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64, device=device).contiguous(memory_format=layout)
    assert torch.autograd.gradcheck(lambda t: ops.max_pool2x2(t, backend=backend), (x.requires_grad_(True),))


def _opcheck_ops(backend):
    if backend == "native":
        return torch.ops.fasthg.max_pool2x2, torch.ops.fasthg.max_pool2x2_backward
    return torch.ops.fasthg.max_pool2x2_triton, torch.ops.fasthg.max_pool2x2_backward_triton


@pytest.mark.parametrize("device,backend", device_backend_params(include_eager=False, op="max_pool2x2"))
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1]], ids=str)
def test_opcheck(device, backend, layout, shape):
    fwd, bwd = _opcheck_ops(backend)
    x = torch.randn(shape, device=device).contiguous(memory_format=layout)
    torch.library.opcheck(fwd, (x.requires_grad_(True),))
    grad = torch.randn(shape[0], shape[1], shape[2] // 2, shape[3] // 2, device=device)
    torch.library.opcheck(bwd, (grad.contiguous(memory_format=layout), x.detach()))
    if backend == "native":
        torch.library.opcheck(torch.ops.fasthg.max_pool2x2_backward_skip,
                              (grad.contiguous(memory_format=layout), x.detach(), torch.randn_like(x)))


@pytest.mark.parametrize("device,backend", device_backend_params(include_eager=False, op="max_pool2x2"))
def test_saves_only_its_input(device, backend):
    x = torch.randn(2, 3, 8, 6, device=device, requires_grad=True)
    assert saved_activation_bytes(lambda: ops.max_pool2x2(x, backend=backend)) == x.numel() * 4
    assert saved_activation_bytes(lambda: ops.max_pool2x2(x, backend="eager")) > x.numel() * 4  # + int64 indices


def test_strided_input_is_copied_into_a_dense_layout():
    base = torch.randn(2, 3, 10, 16)
    x = base[:, :, 1:9, ::2]  # neither NCHW- nor channels_last-dense
    for backend in ops.available("cpu", "max_pool2x2"):
        xg = x.clone().requires_grad_(True)
        y = ops.max_pool2x2(x, backend=backend)
        assert_same(y, F.max_pool2d(x, 2, 2))
        g = torch.randn_like(y)
        assert_same(torch.autograd.grad(ops.max_pool2x2(xg, backend=backend), xg, g)[0],
                    torch.autograd.grad(F.max_pool2d(xg, 2, 2), xg, g)[0])


@pytest.mark.parametrize("device,backend", device_backend_params(include_eager=False, op="max_pool2x2"))
def test_torch_compile_fullgraph(device, backend):
    torch._dynamo.reset()

    def f(x):
        return ops.max_pool2x2(torch.relu(x) * 2, backend=backend).square().sum()

    x = torch.randn(2, 3, 8, 6, device=device, requires_grad=True)
    out = torch.compile(f, backend="aot_eager", fullgraph=True)(x)
    out.backward()
    got = x.grad.clone()
    x.grad = None
    f(x).backward()
    torch.testing.assert_close(out, f(x))
    torch.testing.assert_close(got, x.grad)


BAD = [
    ("3-D", lambda: torch.randn(3, 4, 4), "4-D"),
    ("integer", lambda: torch.ones(1, 3, 4, 4, dtype=torch.int32), "floating-point"),
    ("empty", lambda: torch.randn(0, 3, 4, 4), "H, W >= 2"),
    ("one-row", lambda: torch.randn(1, 3, 1, 4), "H, W >= 2"),
]


@pytest.mark.parametrize("backend", ["eager", "native", "triton", "auto"])
@pytest.mark.parametrize("what,make_x,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_clear_error(backend, what, make_x, message):
    with pytest.raises(ValueError, match=message):
        ops.max_pool2x2(make_x(), backend=backend)


@pytest.mark.parametrize("what,make_x,message", BAD, ids=[b[0] for b in BAD])
def test_native_op_checks_its_arguments(what, make_x, message):
    if "native" not in ops.available("cpu", "max_pool2x2"):
        pytest.skip("native unavailable")
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fasthg.max_pool2x2(make_x())


@pytest.mark.parametrize("grad,x,message", [
    (torch.randn(1, 3, 2, 3), torch.randn(1, 3, 4, 4), r"shape \[N, C, H / 2, W / 2\]"),
    (torch.randn(1, 3, 2, 2).double(), torch.randn(1, 3, 4, 5), "same dtype"),
    (torch.randn(1, 3, 2, 2), torch.randn(1, 3, 4), "4-D"),
], ids=["shape", "dtype", "x-3-D"])
def test_native_backward_checks_its_arguments(grad, x, message):
    if "native" not in ops.available("cpu", "max_pool2x2"):
        pytest.skip("native unavailable")
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fasthg.max_pool2x2_backward(grad, x)


def test_native_backward_skip_checks_grad_skip():
    if "native" not in ops.available("cpu", "max_pool2x2"):
        pytest.skip("native unavailable")
    grad, x = torch.randn(1, 3, 2, 2), torch.randn(1, 3, 4, 5)
    for bad in (torch.randn(1, 3, 4, 4), x.double()):
        with pytest.raises(RuntimeError, match="`grad_skip` must match `x`"):
            torch.ops.fasthg.max_pool2x2_backward_skip(grad, x, bad)


@pytest.mark.parametrize("device,backend", device_backend_params(op="max_pool2x2"))
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("use", ["pooled", "skip", "both"])
def test_with_skip_equals_the_pool_and_its_input(device, backend, dtype, layout, shape, use, poison):
    """max_pool2x2_with_skip: the pool's values, skip x's, and x's gradient exactly as
    max_pool2d's plus the skip branch's (the pool's gradient is grad_out's values or 0, so the
    sum rounds as autograd's add), odd rows and columns, ties and NaN included."""
    skip_unsupported(device, backend, dtype)
    x = make(shape, dtype, device, layout).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y, skip = ops.max_pool2x2_with_skip(x, backend=backend)
    y_ref = F.max_pool2d(x_ref, 2, 2)
    assert_same(y, y_ref)
    assert_same(skip.detach(), x.detach())
    assert skip.requires_grad
    g = torch.Generator().manual_seed(5)
    gy = torch.randn(y.shape, generator=g).to(device, dtype).contiguous(memory_format=layout)
    gs = torch.randn(x.shape, generator=g).to(device, dtype).contiguous(memory_format=layout)
    outs, grads = {"pooled": ((y,), (gy,)), "skip": ((skip,), (gs,)), "both": ((y, skip), (gy, gs))}[use]
    ref_outs = {"pooled": (y_ref,), "skip": (x_ref,), "both": (y_ref, x_ref)}[use]
    gx, = torch.autograd.grad(outs, x, grads)
    want, = torch.autograd.grad(ref_outs, x_ref, grads)
    assert gx.is_contiguous(memory_format=layout)
    assert_same(gx, want)


@pytest.mark.parametrize("device,backend", device_backend_params(include_eager=False, op="max_pool2x2"))
def test_with_skip_gradcheck_and_no_grad(device, backend):
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64, device=device).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: ops.max_pool2x2_with_skip(t, backend=backend), (x,))
    with torch.no_grad():
        assert ops.max_pool2x2_with_skip(x, backend=backend)[1] is x
    xd = x.detach()
    assert ops.max_pool2x2_with_skip(xd, backend=backend)[1] is xd


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_hourglass_sizes(backend, dtype):
    # The real shapes (batch 16, 256 channels, 64x64 in), where indexing bugs hide.
    for fmt in LAYOUTS:
        x = torch.randn(16, 256, 64, 64, device="cuda", dtype=dtype).contiguous(memory_format=fmt).requires_grad_(True)
        y = ops.max_pool2x2(x, backend=backend)
        ref = F.max_pool2d(x, 2, 2)
        assert_same(y, ref)
        g = torch.randn_like(ref)
        assert_same(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(ref, x, g)[0])


@pytest.mark.cuda
def test_device_mismatch_is_a_clear_error():
    with pytest.raises(RuntimeError, match="same device"):
        torch.ops.fasthg.max_pool2x2_backward(torch.randn(1, 3, 2, 2), torch.randn(1, 3, 4, 4, device="cuda"))


@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_the_module_runs_the_op_on_the_cpu_and_equals_max_pool2d(layout, monkeypatch):
    """fasthg.nn.MaxPool2x2 (the stem's pool): nn.MaxPool2d(2, 2)'s values and gradients, no
    state, the fused op on the CPU with and without a gradient; inputs the op refuses go to ATen."""
    from torch import nn

    from fasthg.nn import MaxPool2x2

    calls = []
    real = ops.max_pool2x2
    monkeypatch.setattr(ops, "max_pool2x2", lambda x, backend: calls.append(backend) or real(x, backend))
    pool, ref = MaxPool2x2("native"), nn.MaxPool2d(2, 2)
    assert isinstance(pool, nn.MaxPool2d) and pool.state_dict() == {}
    for shape in SHAPES:
        x = make(shape, torch.float32, "cpu", layout).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        y, y_ref = pool(x), ref(x_ref)
        assert_same(y, y_ref)
        assert y.is_contiguous(memory_format=layout)
        g = torch.randn_like(y)
        assert_same(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(y_ref, x_ref, g)[0])
        with torch.no_grad():
            assert_same(pool(x), y_ref)
    assert calls == ["native"] * 2 * len(SHAPES)
    thin = torch.randn(1, 2, 1, 6)  # H < 2: ATen's own error, as nn.MaxPool2d gives it
    for module in (pool, ref):
        with pytest.raises(RuntimeError, match="too small"):
            module(thin)
    assert len(calls) == 2 * len(SHAPES)
