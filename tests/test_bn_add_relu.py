"""fasthg.ops.bn_add_relu and fasthg.nn.BNAddReLU on every backend against the float64 eager
reference relu(batch_norm(x) + residual)."""
import pytest
import torch
from torch import nn

from conftest import DTYPES, TOL, device_backend_params, rel_err, skip_unsupported
import fasthg
from fasthg import ops
from fasthg.nn import BNAddReLU

# Odd sizes; NHWC bands of 32 and 8 channels plus a tail (44); N*H*W = 1200 > 1024, which
# splits each channel's Triton reduction over two programs.
SHAPES = [(2, 3, 5, 7), (4, 16, 4, 4), (1, 5, 3, 1), (2, 44, 9, 7), (2, 3, 24, 25)]
LAYOUTS = [torch.contiguous_format, torch.channels_last]


def params():
    return device_backend_params(include_eager=False, op="bn_add_relu")


def make(shape, dtype, device, layout, seed=0):
    """x (offset, as activations may be), residual, weight, bias, running stats: (float64 copies
    of the rounded values for the reference, the tensors under test)."""
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x64 = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.3
    r64 = torch.randn(shape, generator=g, dtype=torch.float64)
    x, r = (t.to(device=device, dtype=dtype).contiguous(memory_format=layout) for t in (x64, r64))
    w64, b64 = torch.rand(c, generator=g, dtype=torch.float64) + 0.5, torch.randn(c, generator=g, dtype=torch.float64)
    rm64, rv64 = torch.randn(c, generator=g, dtype=torch.float64), torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    p = torch.float64 if dtype == torch.float64 else torch.float32
    ref = [x.double().cpu(), r.double().cpu(), w64, b64, rm64, rv64]
    got = [x, r] + [t.to(device=device, dtype=p) for t in (w64, b64, rm64, rv64)]
    return ref, got


def run_both(ref, got, training, backend, grad_seed=1):
    """Forward and the gradients of x, residual, weight, bias through the op and the reference."""
    for ts in (ref, got):
        for t in ts[:4]:
            t.requires_grad_(True)
    y = ops.bn_add_relu(*got, training=training, backend=backend)
    want = fasthg.ops.reference.bn_add_relu(*ref, training, 0.1, 1e-5)
    gy64 = torch.randn(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(grad_seed))
    gy = torch.empty_like(y).copy_(gy64)  # in y's memory format
    grads = torch.autograd.grad(y, got[:4], gy)
    grads64 = torch.autograd.grad(want, ref[:4], gy.double().cpu())
    return y, want, grads, grads64


@pytest.mark.parametrize("device,backend", params())
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_training_forward_backward_and_running_stats(device, backend, dtype, layout, shape, poison):
    skip_unsupported(device, backend, dtype)
    ref, got = make(shape, dtype, device, layout)
    y, want, grads, grads64 = run_both(ref, got, True, backend)
    assert y.dtype == dtype and y.is_contiguous(memory_format=layout) and not y.isnan().any()
    assert rel_err(y, want) < TOL[dtype]
    for name, a, e in zip(("grad_x", "grad_residual", "grad_weight", "grad_bias"), grads, grads64):
        assert not a.isnan().any(), name
        assert rel_err(a, e) < max(TOL[dtype], 1e-5), name
    assert grads[0].is_contiguous(memory_format=layout) and grads[1].is_contiguous(memory_format=layout)
    assert rel_err(got[4], ref[4]) < 1e-6 and rel_err(got[5], ref[5]) < 1e-6  # running statistics


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_native_cpu_half_precision_rounds_as_float(dtype, layout, poison):
    """16-bit activations are computed as floats 8 at a time (csrc/cpu/vec8.h): outputs and
    gradients are the float32 op's, rounded to nearest even, bit for bit."""
    if "native" not in fasthg.ops.available("cpu", "bn_add_relu"):
        pytest.skip("native unavailable")
    _, (x, r, w, b, _, _) = make((3, 44, 21, 23), dtype, "cpu", layout)
    gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(dtype).contiguous(memory_format=layout)
    outs = {}
    for t in (dtype, torch.float32):
        xt, rt = x.to(t).requires_grad_(True), r.to(t).requires_grad_(True)
        y = ops.bn_add_relu(xt, rt, w, b, backend="native")
        outs[t] = (y,) + torch.autograd.grad(y, (xt, rt), gy.to(t))
    for got, want in zip(outs[dtype], outs[torch.float32]):
        assert got.dtype == dtype and got.is_contiguous(memory_format=layout)
        torch.testing.assert_close(got, want.to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_native_cpu_streaming_stores(layout, poison):
    """Float32 outputs of 8 MiB and more are written with streaming stores; odd NCHW planes
    peel to alignment."""
    if "native" not in fasthg.ops.available("cpu", "bn_add_relu"):
        pytest.skip("native unavailable")
    test_training_forward_backward_and_running_stats("cpu", "native", torch.float32, layout, (2, 64, 129, 131),
                                                     poison)


@pytest.mark.parametrize("device,backend", params())
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_eval_forward_backward_and_inference(device, backend, layout, poison):
    ref, got = make((2, 12, 3, 5), torch.float32, device, layout)
    rm_before = got[4].clone()
    y, want, grads, grads64 = run_both(ref, got, False, backend)
    assert rel_err(y, want) < 1e-6
    assert torch.equal(got[4], rm_before)  # eval leaves the statistics alone
    for a, e in zip(grads, grads64):
        assert rel_err(a, e) < 1e-5
    with torch.no_grad():  # inference runs the forward alone: the same values
        y_nograd = ops.bn_add_relu(*got, training=False, backend=backend)
    assert not y_nograd.requires_grad and torch.equal(y_nograd, y.detach())


@pytest.mark.parametrize("device,backend", params())
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_float64(device, backend, layout, training):
    (_, _, _, _, rm, rv), (x, r, w, b, _, _) = make((2, 3, 4, 3), torch.float64, device, layout)
    rm, rv = rm.to(device), rv.to(device)
    for t in (x, r, w, b):
        t.requires_grad_(True)

    def f(x, r, w, b):
        return ops.bn_add_relu(x, r, w, b, None if training else rm, None if training else rv, training=training,
                               backend=backend)
    assert torch.autograd.gradcheck(f, (x, r, w, b))


def _ops(backend):
    suffix = "_triton" if backend == "triton" else ""
    return [getattr(torch.ops.fasthg, f"bn_add_relu_{n}{suffix}") for n in ("forward", "backward_reduce",
                                                                         "backward_elemt")]


@pytest.mark.parametrize("device,backend", params())
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_opcheck(device, backend, layout):
    fwd, red, elemt = _ops(backend)
    x = torch.randn(2, 3, 4, 5, device=device).contiguous(memory_format=layout)
    r, gy = torch.randn_like(x), torch.randn_like(x)
    v = [torch.rand(3, device=device) + 0.5 for _ in range(6)]
    y = fwd(x, r, v[0], v[1], v[2], v[3])
    torch.library.opcheck(fwd, (x, r, v[0], v[1], v[2], v[3]))
    torch.library.opcheck(red, (gy, y, x, v[0], v[1]))
    torch.library.opcheck(elemt, (gy, x, v[0], v[1], v[2], v[4], v[5]))
    if backend == "native":  # the one-call training op, with and without gradients to compute
        w, b = v[2].clone().requires_grad_(), v[3].clone().requires_grad_()
        train = torch.ops.fasthg.bn_add_relu_train
        torch.library.opcheck(train, (x.clone().requires_grad_(), r.clone().requires_grad_(), w, b, 1e-5))
        torch.library.opcheck(train, (x, r, w, b, 1e-5))


@pytest.mark.parametrize("device,backend", params())
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_nan_propagates_as_in_eager(device, backend, layout, training, poison):
    """A NaN in the residual gives what eager gives: NaN at that element (not a zero that
    would hide a diverged step), and relu's backward passes grad_out there; a NaN in x spoils
    its channel's statistics in training, as in eager."""
    ref, got = make((2, 20, 9, 7), torch.float32, device, layout)
    for ts in (ref, got):
        ts[1][1, 3, 4, 5] = float("nan")
        if training:
            ts[0][0, 17, 0, 0] = float("nan")
    y, want, grads, grads64 = run_both(ref, got, training, backend)
    assert want.isnan().any()
    for a, e in zip((y,) + grads, (want,) + grads64):
        torch.testing.assert_close(a.double().cpu(), e.detach(), rtol=1e-4, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("device,backend", params())
def test_torch_compile_fullgraph(device, backend):
    torch._dynamo.reset()
    m = BNAddReLU(3, backend=backend).to(device)
    bn = nn.BatchNorm2d(3).to(device)
    x = torch.randn(2, 3, 4, 4, device=device, requires_grad=True)
    r = torch.randn(2, 3, 4, 4, device=device, requires_grad=True)
    out = torch.compile(m, backend="aot_eager", fullgraph=True)(x, r)
    grads = torch.autograd.grad(out.sum(), (x, r))
    expected = torch.relu(bn(x) + r)
    torch.testing.assert_close(out, expected)
    for a, e in zip(grads, torch.autograd.grad(expected.sum(), (x, r))):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("backend", ["eager", "native", "triton"])
@pytest.mark.parametrize("kw", [{}, {"momentum": None}, {"affine": False}, {"track_running_stats": False}],
                         ids=["default", "cumulative", "no-affine", "no-running-stats"])
def test_module_is_a_drop_in_for_batchnorm_add_relu(backend, kw):
    if backend not in fasthg.ops.available("cpu", "bn_add_relu"):
        pytest.skip(f"{backend} has no CPU bn_add_relu here")
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(4, **kw)
    m = BNAddReLU(4, backend=backend, **kw)
    m.load_state_dict(ref.state_dict())  # same names: loads unchanged
    assert list(m.state_dict()) == list(ref.state_dict())
    params = [list(mod.parameters()) for mod in (ref, m)]
    opts = [torch.optim.SGD(p, lr=0.1) if p else None for p in params]
    for step in range(3):
        x, r = torch.randn(3, 4, 5, 5) * (step + 1) + step, torch.randn(3, 4, 5, 5)
        for y, opt in ((torch.relu(ref(x) + r), opts[0]), (m(x, r), opts[1])):
            if opt:
                opt.zero_grad()
                (y * torch.arange(y.numel()).view_as(y).sin()).sum().backward()
                opt.step()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(m.state_dict()[k], v, msg=k)
    x, r = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    m.eval()
    ref.eval()
    torch.testing.assert_close(m(x, r), torch.relu(ref(x) + r))
    torch.testing.assert_close(m(x), ref(x))  # called with x alone: the BatchNorm2d it is


def test_module_falls_back_to_the_original_ops_where_the_residual_does_not_match():
    """A residual that broadcasts or has another dtype (autocast, mixed models) gets eager's
    result, type promotion included."""
    torch.manual_seed(0)
    ref, m = nn.BatchNorm2d(4), BNAddReLU(4)
    m.load_state_dict(ref.state_dict())
    x = torch.randn(2, 4, 3, 3)
    for r in (torch.randn(1, 4, 1, 1), torch.randn(2, 4, 3, 3, dtype=torch.float64)):
        got, want = m(x, r), torch.relu(ref(x) + r)
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(m.running_mean, ref.running_mean)


BAD = [
    ("residual-shape", lambda: (torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 5)), "`residual` must match `x`"),
    ("residual-dtype", lambda: (torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4).double()), "`residual` must match"),
    ("residual-type", lambda: (torch.randn(2, 3, 4, 4), 1.0), "`residual` must be a tensor"),
    ("rank", lambda: (torch.randn(2, 3, 4), torch.randn(2, 3, 4)), "4-D"),
    ("integer", lambda: (torch.ones(2, 3, 4, 4, dtype=torch.long),) * 2, "floating-point"),
    ("one-value", lambda: (torch.randn(1, 3, 1, 1), torch.randn(1, 3, 1, 1)), "more than 1 value per channel"),
]


@pytest.mark.parametrize("backend", ["eager", "native", "triton", "auto"])
@pytest.mark.parametrize("what,args,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_clear_error(backend, what, args, message):
    with pytest.raises(ValueError, match=message):
        ops.bn_add_relu(*args(), backend=backend)


def test_native_ops_check_their_arguments():
    if "native" not in fasthg.ops.available("cpu", "bn_add_relu"):
        pytest.skip("native unavailable")
    fwd, red, elemt = _ops("native")
    x = torch.randn(2, 3, 4, 4)
    v = torch.ones(3)
    with pytest.raises(RuntimeError, match="`residual` must match `x`"):
        fwd(x, x[:, :, :3], v, v, v, v)
    with pytest.raises(RuntimeError, match="`mean` must be a 1-D tensor of 3"):
        fwd(x, x, torch.ones(4), v, v, v)
    with pytest.raises(RuntimeError, match="`y` must match `x`"):
        red(x, x.double(), x, v, v)
    with pytest.raises(RuntimeError, match="`mean_g_xhat` must be Float"):
        elemt(x, x, v, v, v, v, v.double())


def test_native_training_under_inference_mode_and_without_grads():
    """The one-call training op runs its forward alone where autograd is off, with the same
    values and running statistics."""
    if "native" not in fasthg.ops.available("cpu", "bn_add_relu"):
        pytest.skip("native unavailable")
    _, got = make((2, 12, 5, 3), torch.float32, "cpu", torch.channels_last)
    y = ops.bn_add_relu(*[t.clone() for t in got], training=True, backend="native")
    for ctx in (torch.inference_mode, torch.no_grad):
        rm, rv = got[4].clone(), got[5].clone()
        with ctx():
            y2 = ops.bn_add_relu(*got[:4], rm, rv, training=True, backend="native")
        assert torch.equal(y2, y) and not y2.requires_grad
        assert not torch.equal(rm, got[4])  # the running statistics were updated


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(16, 256, 56, 56), (16, 2048, 7, 7), (16, 1024, 14, 14)], ids=str)
def test_cuda_resnet50_sizes(backend, dtype, shape):
    """ResNet-50's block outputs at batch 16, channels_last as trained, against float64."""
    ref, got = make(shape, dtype, "cuda", torch.channels_last)
    y, want, grads, grads64 = run_both(ref, got, True, backend)
    assert rel_err(y, want) < TOL[dtype]
    for a, e in zip(grads, grads64):
        assert rel_err(a, e) < max(TOL[dtype], 1e-5)
