"""fasthg.ops.bn_relu and fasthg.nn.BNReLU on every backend against the float64 eager
reference relu(batch_norm(x))."""
import pytest
import torch
from torch import nn

from conftest import DTYPES, TOL, device_backend_params, rel_err, skip_unsupported
import fasthg
from fasthg import ops
from fasthg.nn import BNReLU

# Odd sizes, sizes that cover the CPU's 8-wide AVX2 blocks plus their scalar tails, and
# N*H*W = 1200 > 1024, which splits each channel's Triton reduction over two programs.
SHAPES = [(2, 3, 5, 7), (4, 16, 4, 4), (2, 20, 9, 7), (1, 5, 3, 1), (3, 2, 1, 1), (2, 3, 24, 25)]
LAYOUTS = [torch.contiguous_format, torch.channels_last]


def params():
    """(device, backend) pairs: the backends with bn_relu kernels here, CUDA ones marked."""
    return device_backend_params(include_eager=False, op="bn_relu")


def make_x(shape, dtype, device, layout, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    x64 = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.3 + offset)
    x = x64.to(device=device, dtype=dtype).contiguous(memory_format=layout)
    return x.double().cpu(), x  # the reference sees the rounded values


def reference(x64, w, b, rm, rv, training, momentum=0.1, eps=1e-5):
    return fasthg.ops.reference.bn_relu(x64, w, b, rm, rv, training, momentum, eps)


@pytest.mark.parametrize("device,backend", params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_training_forward_backward_and_running_stats(device, backend, dtype, layout, shape, poison):
    skip_unsupported(device, backend, dtype)
    c = shape[1]
    x64, x = make_x(shape, dtype, device, layout)
    g = torch.Generator().manual_seed(1)
    w64, b64 = torch.rand(c, generator=g, dtype=torch.float64) + 0.5, torch.randn(c, generator=g, dtype=torch.float64)
    rm64, rv64 = torch.randn(c, dtype=torch.float64, generator=g), torch.rand(c, dtype=torch.float64, generator=g) + 0.5
    w, b = w64.float().to(device).requires_grad_(), b64.float().to(device).requires_grad_()
    rm, rv = rm64.float().to(device), rv64.float().to(device)
    x.requires_grad_(True)
    x64.requires_grad_(True)
    w64.requires_grad_(True)
    b64.requires_grad_(True)
    y = ops.bn_relu(x, w, b, rm, rv, training=True, momentum=0.1, eps=1e-5, backend=backend)
    ref = reference(x64, w64, b64, rm64, rv64, True)
    assert y.dtype == dtype and y.is_contiguous(memory_format=layout) and not y.isnan().any()
    assert rel_err(y, ref) < TOL[dtype]
    assert rel_err(rm, rm64) < 1e-6 and rel_err(rv, rv64) < 1e-6
    gy64 = torch.randn(shape, dtype=torch.float64, generator=g)
    gy = gy64.to(device=device, dtype=dtype).contiguous(memory_format=layout)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), gy)
    rx, rw, rb = torch.autograd.grad(ref, (x64, w64, b64), gy.double().cpu())
    assert not gx.isnan().any()
    assert gx.is_contiguous(memory_format=layout)
    for got, want in ((gx, rx), (gw, rw), (gb, rb)):
        assert rel_err(got.cpu(), want) < max(TOL[dtype], 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(2, 256, 9, 7), (3, 24, 16, 16), (2, 44, 48, 64)], ids=str)
def test_native_cpu_nhwc_chunks_and_threads(dtype, shape, poison):
    """The CPU NHWC reductions walk bands of 32, then 8 channels, then single channels down
    chunks of rows (L2/16 of each input: 32 rows of 256 channels on a 512 KiB L2), each
    thread summing its own partials: 256 channels in bands of 32; 24 in bands of 8; 44 = 32
    + 8 + 4 over 6144 rows, several chunks per thread at any chunk size (at most 128 KiB)."""
    if "native" not in fasthg.ops.available("cpu", "bn_relu"):
        pytest.skip("native unavailable")
    test_training_forward_backward_and_running_stats("cpu", "native", dtype, torch.channels_last, shape, poison)


def channel_sums(x, dtype=None):
    """x's per-channel (sum, sum of squares), summed in float64, in the statistics' dtype (as
    the conv1x1 unit's out_stats gives them)."""
    x64 = x.detach().double()
    p = dtype or (torch.float64 if x.dtype == torch.float64 else torch.float32)
    return x64.sum((0, 2, 3)).to(p), x64.square().sum((0, 2, 3)).to(p)


def native_cpu():
    if "native" not in fasthg.ops.available("cpu", "bn_relu"):
        pytest.skip("native unavailable")


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_native_cpu_statistics_from_sums(dtype, layout, shape, poison):
    """bn_relu(sums=x's sums) in native CPU training: y, the running statistics and the
    gradients of x, weight and bias as the float64 reference's (the BN's backward takes the
    gradient through the statistics; the sums get none)."""
    native_cpu()
    c = shape[1]
    x64, x = make_x(shape, dtype, "cpu", layout, seed=4)
    g = torch.Generator().manual_seed(5)
    w64, b64 = torch.rand(c, generator=g, dtype=torch.float64) + 0.5, torch.randn(c, generator=g, dtype=torch.float64)
    rm64, rv64 = torch.randn(c, dtype=torch.float64, generator=g), torch.rand(c, dtype=torch.float64, generator=g) + 0.5
    p = torch.float64 if dtype == torch.float64 else torch.float32
    w, b = w64.to(p).requires_grad_(), b64.to(p).requires_grad_()
    rm, rv = rm64.to(p), rv64.to(p)
    sums = channel_sums(x)
    for t in (x, x64, w64, b64):
        t.requires_grad_(True)
    y = ops.bn_relu(x, w, b, rm, rv, training=True, backend="native", sums=sums)
    ref = reference(x64, w64, b64, rm64, rv64, True)
    assert y.dtype == dtype and y.is_contiguous(memory_format=layout)
    assert rel_err(y, ref) < TOL[dtype]
    assert rel_err(rm, rm64) < 1e-6 and rel_err(rv, rv64) < 1e-6
    gy = torch.randn(shape, dtype=torch.float64, generator=g).to(dtype).contiguous(memory_format=layout)
    got = torch.autograd.grad(y, (x, w, b), gy)
    want = torch.autograd.grad(ref, (x64, w64, b64), gy.double())
    assert not got[0].isnan().any()
    for a, e in zip(got, want):
        assert rel_err(a, e) < max(TOL[dtype], 1e-5)


def test_native_cpu_sums_are_what_the_statistics_come_from():
    """The statistics are the sums' (those of another tensor give that tensor's), and the
    running statistics follow them: the op does not pass over x for them."""
    native_cpu()
    _, x = make_x((3, 6, 5, 7), torch.float32, "cpu", torch.channels_last, seed=1)
    other = x * 3 + 1
    w, b = torch.rand(6) + 0.5, torch.randn(6)
    rm, rv, rm2, rv2 = torch.zeros(6), torch.ones(6), torch.zeros(6), torch.ones(6)
    y = ops.bn_relu(x, w, b, rm, rv, training=True, backend="native", sums=channel_sums(other))
    ops.bn_relu(other, w, b, rm2, rv2, training=True, backend="native")
    mean, var = other.double().mean((0, 2, 3)), other.double().var((0, 2, 3), unbiased=False)
    want = torch.relu((x.double() - mean[None, :, None, None]) / (var[None, :, None, None] + 1e-5).sqrt()
                      * w.double()[None, :, None, None] + b.double()[None, :, None, None])
    assert rel_err(y, want) < 1e-6
    torch.testing.assert_close(rm, rm2)
    torch.testing.assert_close(rv, rv2)


@pytest.mark.parametrize("case", ["offset", "constant", "nan"])
def test_native_cpu_sums_that_cancel_take_the_pass_over_x(case, poison):
    """Where E[x^2] - mean^2 from float32 sums would lose the variance (a mean 1e3 standard
    deviations out; a constant channel) or the sums are not finite, the statistics come from
    the pass over x after all: the result is bn_relu's without sums, bit for bit."""
    native_cpu()
    _, x = make_x((2, 5, 6, 7), torch.float32, "cpu", torch.channels_last, seed=2)
    if case == "offset":
        x[:, 2] += 1e3
    elif case == "constant":
        x[:, 3] = 0.75
    sums = channel_sums(x)
    if case == "nan":
        sums[1][4] = float("nan")
    w, b = torch.rand(5) + 0.5, torch.randn(5)
    y = ops.bn_relu(x, w, b, training=True, backend="native", sums=sums)
    assert torch.equal(y, ops.bn_relu(x, w, b, training=True, backend="native"))
    if case == "offset":  # (what the sums alone would have given: far off)
        mean = sums[0].double() / 84
        var = sums[1].double() / 84 - mean * mean
        assert rel_err(var[2], x[:, 2].double().var(unbiased=False)) > 1e-4


def test_native_cpu_sums_gradcheck_float64():
    """gradcheck with the sums computed from x inside the function, as a unit computes them
    from what it writes: the numerical gradient moves them with x."""
    native_cpu()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 3, dtype=torch.float64, generator=g).contiguous(memory_format=torch.channels_last)
    w = torch.rand(3, dtype=torch.float64, generator=g) + 0.5
    b = torch.randn(3, dtype=torch.float64, generator=g) * 0.1
    f = lambda x, w, b: ops.bn_relu(x, w, b, backend="native", sums=(x.sum((0, 2, 3)), x.square().sum((0, 2, 3))))  # noqa: E731
    assert torch.autograd.gradcheck(f, tuple(t.requires_grad_() for t in (x, w, b)))


@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_native_cpu_sums_opcheck(layout):
    native_cpu()
    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=layout)
    s, s2 = channel_sums(x)
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    torch.library.opcheck(torch.ops.fasthg.bn_relu_train_forward_sums, (x, s, s2, w, b, 1e-5))
    wg, bg = w.clone().requires_grad_(), b.clone().requires_grad_()
    torch.library.opcheck(torch.ops.fasthg.bn_relu_train_sums, (x.clone().requires_grad_(), s, s2, wg, bg, 1e-5))
    torch.library.opcheck(torch.ops.fasthg.bn_relu_train_sums, (x, s, s2, wg, bg, 1e-5))


def test_bad_sums_are_a_clear_error():
    x = torch.randn(2, 3, 4, 4)
    good = channel_sums(x)
    for sums, message in [(good[0], "`sums` must be a pair of tensors"),
                          ((good[0], good[1][:2]), r"`sums` must be two \(3,\) torch.float32 tensors"),
                          ((good[0].double(), good[1]), "`sums` must be two"),
                          ((good[0], None), "`sums` must be a pair of tensors")]:
        with pytest.raises(ValueError, match=message):
            ops.bn_relu(x, sums=sums)
    native_cpu()
    w, b = torch.ones(3), torch.zeros(3)
    with pytest.raises(RuntimeError, match="`sum_sq` must be a 1-D tensor of 3"):
        torch.ops.fasthg.bn_relu_train_forward_sums(x, good[0], good[1][:2], w, b, 1e-5)
    with pytest.raises(RuntimeError, match="`sum` must be Float"):
        torch.ops.fasthg.bn_relu_train_sums(x, good[0].double(), good[1], w, b, 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_native_cpu_half_precision_rounds_as_float(dtype, layout, poison):
    """The CPU kernels compute 16-bit activations as floats, 8 at a time (csrc/cpu/vec8.h):
    outputs and gradients must be the float32 op's, rounded to nearest even, bit for bit
    (a NaN in the gradient stays NaN). 44 channels: bands of 32 and 8 and a tail; planes of
    21x23 elements: 8-wide steps and a tail."""
    if "native" not in fasthg.ops.available("cpu", "bn_relu"):
        pytest.skip("native unavailable")
    _, x = make_x((3, 44, 21, 23), dtype, "cpu", layout)
    gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(dtype).contiguous(memory_format=layout)
    gy[1, 5, 2, 3] = float("nan")
    w, b = torch.rand(44) + 0.5, torch.randn(44)
    outs = {}
    for t in (dtype, torch.float32):
        xt = x.to(t).requires_grad_(True)
        y = ops.bn_relu(xt, w, b, backend="native")
        outs[t] = (y, torch.autograd.grad(y, xt, gy.to(t))[0])
    for got, want in zip(outs[dtype], outs[torch.float32]):
        assert got.dtype == dtype and got.is_contiguous(memory_format=layout)
        torch.testing.assert_close(got, want.to(dtype), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_native_cpu_streaming_stores(layout, poison):
    """Float32 outputs of 8 MiB and more are written with streaming stores (csrc/cpu's
    kStreamBytes): NCHW planes of an odd size start unaligned and peel to 32 bytes, NHWC rows
    of 64 channels start aligned."""
    if "native" not in fasthg.ops.available("cpu", "bn_relu"):
        pytest.skip("native unavailable")
    shape = (2, 64, 129, 131)
    assert 4 * shape[0] * shape[1] * shape[2] * shape[3] >= 8 << 20
    test_training_forward_backward_and_running_stats("cpu", "native", torch.float32, layout, shape, poison)


@pytest.mark.parametrize("device,backend", params())
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_eval_forward_backward(device, backend, layout, poison):
    x64, x = make_x((2, 4, 3, 5), torch.float32, device, layout)
    rm64, rv64 = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5
    w64, b64 = torch.randn(4, dtype=torch.float64, requires_grad=True), torch.randn(4, dtype=torch.float64, requires_grad=True)
    w, b = w64.detach().float().to(device).requires_grad_(), b64.detach().float().to(device).requires_grad_()
    x.requires_grad_(True)
    x64.requires_grad_(True)
    rm, rv = rm64.float().to(device), rv64.float().to(device)
    y = ops.bn_relu(x, w, b, rm, rv, training=False, backend=backend)
    ref = reference(x64, w64, b64, rm64, rv64, False)
    assert rel_err(y, ref) < 1e-6
    assert torch.equal(rm, rm64.float().to(device))  # eval leaves the statistics alone
    gy = torch.randn(y.shape, dtype=torch.float64)
    got = torch.autograd.grad(y, (x, w, b), gy.float().to(device).contiguous(memory_format=layout))
    want = torch.autograd.grad(ref, (x64, w64, b64), gy)
    for a, e in zip(got, want):
        assert rel_err(a.cpu(), e) < 1e-5
    with torch.no_grad():  # inference skips the autograd Function: the same values
        y_nograd = ops.bn_relu(x, w, b, rm, rv, training=False, backend=backend)
    assert not y_nograd.requires_grad and torch.equal(y_nograd, y.detach())
    assert y_nograd.is_contiguous(memory_format=layout)


@pytest.mark.parametrize("device,backend", params())
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", ["constant-channel", "offset-1e4", "outlying-first-pixels"])
def test_hard_statistics(device, backend, layout, case):
    # 44 channels: the CPU's NHWC sums take bands of 32 and 8 channels, then a scalar tail.
    x64, x = make_x((2, 44, 32, 32), torch.float32, device, layout, offset=1e4 if case == "offset-1e4" else 0.0)
    if case == "constant-channel":
        x64[:, 1] = 0.75
    if case == "outlying-first-pixels":  # 11 sigma out: a shift taken from them would cancel
        x64[0, :, 0, :16] = 100.0
    x = x64.float().to(device).contiguous(memory_format=layout)
    rm, rv = torch.zeros(44, device=device), torch.ones(44, device=device)
    y = ops.bn_relu(x, None, None, rm, rv, training=True, momentum=1.0, backend=backend)
    ref = reference(x64, None, None, None, None, True)
    assert not y.isnan().any()
    # A float32 mean of ~1e4 is itself only exact to ~5e-4: ask for eager float32's accuracy.
    eager32 = reference(x64.float(), None, None, None, None, True).to(device)
    assert rel_err(y, ref) < max(1e-5, 2 * rel_err(eager32, ref))
    assert rel_err(rv.cpu(), x64.var((0, 2, 3))) < 2e-7  # momentum 1: the batch's unbiased variance
    if case == "constant-channel":
        assert (y[:, 1] == 0).all()  # zero variance: normalised to 0, not NaN


@pytest.mark.parametrize("device,backend", params())
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_parameter_grads_without_input_grad(device, backend, layout):
    """A first layer's input needs no gradient: the backward then runs the sums alone."""
    x64, x = make_x((3, 5, 6, 7), torch.float32, device, layout)
    g = torch.Generator().manual_seed(2)
    w64, b64 = torch.rand(5, generator=g, dtype=torch.float64) + 0.5, torch.randn(5, generator=g, dtype=torch.float64)
    w, b = w64.float().to(device).requires_grad_(), b64.float().to(device).requires_grad_()
    gy64 = torch.randn(3, 5, 6, 7, generator=g, dtype=torch.float64)
    gw, gb = torch.autograd.grad(ops.bn_relu(x, w, b, backend=backend), (w, b),
                                 gy64.float().to(device).contiguous(memory_format=layout))
    w64.requires_grad_(True)
    b64.requires_grad_(True)
    rw, rb = torch.autograd.grad(reference(x64, w64, b64, None, None, True), (w64, b64), gy64)
    assert rel_err(gw.cpu(), rw) < 1e-5 and rel_err(gb.cpu(), rb) < 1e-5


@pytest.mark.parametrize("device,backend", params())
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_float64(device, backend, layout, training):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 3, 4, 3, dtype=torch.float64, generator=g)).to(device).contiguous(memory_format=layout)
    w = torch.rand(3, dtype=torch.float64, generator=g).to(device) + 0.5
    b = torch.randn(3, dtype=torch.float64, generator=g).to(device) * 0.1
    rm, rv = torch.zeros(3, dtype=torch.float64, device=device), torch.ones(3, dtype=torch.float64, device=device)
    for t in (x, w, b):
        t.requires_grad_(True)
    f = lambda x, w, b: ops.bn_relu(x, w, b, None if training else rm, None if training else rv,  # noqa: E731
                                    training=training, backend=backend)
    assert torch.autograd.gradcheck(f, (x, w, b))


def _native_ops():
    return [torch.ops.fasthg.bn_relu_stats, torch.ops.fasthg.bn_relu_forward,
            torch.ops.fasthg.bn_relu_backward_reduce, torch.ops.fasthg.bn_relu_backward_elemt]


def _triton_ops():
    return [torch.ops.fasthg.bn_relu_stats_triton, torch.ops.fasthg.bn_relu_forward_triton,
            torch.ops.fasthg.bn_relu_backward_reduce_triton, torch.ops.fasthg.bn_relu_backward_elemt_triton]


@pytest.mark.parametrize("device,backend", params())
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_opcheck(device, backend, layout):
    stats, fwd, red, elemt = _native_ops() if backend == "native" else _triton_ops()
    x = torch.randn(2, 3, 4, 5, device=device).contiguous(memory_format=layout)
    gy = torch.randn_like(x)
    v = [torch.rand(3, device=device) + 0.5 for _ in range(6)]
    torch.library.opcheck(stats, (x,))
    torch.library.opcheck(fwd, (x, v[0], v[1], v[2], v[3]))
    torch.library.opcheck(red, (gy, x, v[0], v[1], v[2], v[3]))
    torch.library.opcheck(elemt, (gy, x, v[0], v[1], v[2], v[3], v[4], v[5]))
    if backend == "native":  # the one-call training ops
        torch.library.opcheck(torch.ops.fasthg.bn_relu_train_forward, (x, v[2], v[3], 1e-5))
        torch.library.opcheck(torch.ops.fasthg.bn_relu_train_backward, (gy, x, v[0], v[1], v[2], v[3]))
        w, b = v[2].clone().requires_grad_(), v[3].clone().requires_grad_()
        torch.library.opcheck(torch.ops.fasthg.bn_relu_train, (x.clone().requires_grad_(), w, b, 1e-5))
        torch.library.opcheck(torch.ops.fasthg.bn_relu_train, (x, w, b, 1e-5))  # x needs no gradient
        torch.library.opcheck(torch.ops.fasthg.bn_relu_train_backward_skip,
                              (gy, x, v[0], v[1], v[2], v[3], torch.randn_like(x)))


@pytest.mark.parametrize("device,backend", params())
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_nan_propagates_as_in_eager(device, backend, layout, training, poison):
    """A NaN in x gives what relu(batch_norm(x)) gives: NaN where eager has NaN (the whole
    channel in training, whose statistics it spoils; the element in eval), not zeros that
    would hide a diverged step from the loss; and relu's backward passes grad_out where the
    output is NaN. 20 channels of 9x7: 8-wide vectors and scalar tails both see a NaN.
    (One difference: in eval, grad_x at a NaN of x is NaN, where eager's is finite, as the
    fused backward's xhat * mean_g_xhat is NaN * 0 there.)"""
    x64, _ = make_x((2, 20, 9, 7), torch.float32, device, layout)
    x64[1, 3, 4, 5] = x64[0, 17, 0, 0] = float("nan")
    x = x64.float().to(device).contiguous(memory_format=layout)
    g = torch.Generator().manual_seed(2)
    w64, b64 = torch.rand(20, generator=g, dtype=torch.float64) + 0.5, torch.randn(20, generator=g, dtype=torch.float64)
    rm64, rv64 = torch.randn(20, dtype=torch.float64, generator=g), torch.rand(20, dtype=torch.float64, generator=g) + 0.5
    gy64 = torch.randn(x64.shape, dtype=torch.float64, generator=g)
    ins64 = [t.requires_grad_() for t in (x64, w64, b64)]
    ins = [x.requires_grad_()] + [t.float().to(device).requires_grad_() for t in (w64.detach(), b64.detach())]
    ref = reference(*ins64, rm64.clone(), rv64.clone(), training)
    y = ops.bn_relu(*ins, rm64.float().to(device), rv64.float().to(device), training=training, backend=backend)
    grads64 = torch.autograd.grad(ref, ins64, gy64)
    grads = torch.autograd.grad(y, ins, gy64.float().to(device).contiguous(memory_format=layout))
    assert ref.isnan().any()
    if not training:
        grads64 = (torch.where(x64.isnan(), float("nan"), grads64[0]),) + grads64[1:]
    for got, want in zip((y,) + grads, (ref,) + grads64):
        torch.testing.assert_close(got.double().cpu(), want.detach(), rtol=1e-4, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("device,backend", params())
def test_torch_compile_fullgraph(device, backend):
    torch._dynamo.reset()
    m = BNReLU(3, backend=backend).to(device)
    ref = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU()).to(device)
    x = torch.randn(2, 3, 4, 4, device=device, requires_grad=True)
    out = torch.compile(m, backend="aot_eager", fullgraph=True)(x)
    out.sum().backward()
    gx = x.grad.clone()
    x.grad = None
    expected = ref(x)
    expected.sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(gx, x.grad)


@pytest.mark.parametrize("backend", ["eager", "native", "triton"])
@pytest.mark.parametrize("kw", [{}, {"momentum": None}, {"affine": False}, {"track_running_stats": False}],
                         ids=["default", "cumulative", "no-affine", "no-running-stats"])
def test_module_is_a_drop_in_for_batchnorm_relu(backend, kw):
    if backend not in fasthg.ops.available("cpu", "bn_relu"):
        pytest.skip(f"{backend} has no CPU bn_relu here")
    torch.manual_seed(0)
    ref = nn.Sequential(nn.BatchNorm2d(4, **kw), nn.ReLU())
    m = BNReLU(4, backend=backend, **kw)
    m.load_state_dict(ref[0].state_dict())  # same names: loads unchanged
    assert list(m.state_dict()) == list(ref[0].state_dict())
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1) if kw.get("affine", True) else None
    opt = torch.optim.SGD(m.parameters(), lr=0.1) if kw.get("affine", True) else None
    for step in range(3):
        x = torch.randn(3, 4, 5, 5) * (step + 1) + step
        for mod, opt_ in ((ref, opt_ref), (m, opt)):
            mod.train()
            y = mod(x)
            if opt_:
                opt_.zero_grad()
                (y * torch.arange(y.numel()).view_as(y).sin()).sum().backward()
                opt_.step()
    for k, v in ref[0].state_dict().items():
        torch.testing.assert_close(m.state_dict()[k], v, msg=k)
    x = torch.randn(2, 4, 3, 3)
    m.eval()
    ref.eval()
    torch.testing.assert_close(m(x), ref(x))


BAD = [
    ("rank", lambda: (torch.randn(2, 3, 4),), {}, "4-D"),
    ("weight-channels", lambda: (torch.randn(2, 3, 4, 4), torch.ones(4), torch.zeros(3)), {}, "`weight` must have shape"),
    ("integer", lambda: (torch.ones(2, 3, 4, 4, dtype=torch.int64),), {}, "floating-point"),
    ("empty", lambda: (torch.randn(0, 3, 4, 4),), {}, "empty"),
    ("one-value-per-channel", lambda: (torch.randn(1, 3, 1, 1),), {}, "more than 1 value per channel"),
    ("eval-without-stats", lambda: (torch.randn(2, 3, 4, 4),), {"training": False}, "needs `running_mean`"),
]


@pytest.mark.parametrize("backend", ["eager", "native", "triton", "auto"])
@pytest.mark.parametrize("what,args,kw,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_clear_error(backend, what, args, kw, message):
    with pytest.raises(ValueError, match=message):
        ops.bn_relu(*args(), backend=backend, **kw)


def test_native_ops_check_their_arguments():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match="`mean` must be a 1-D tensor of 3"):
        torch.ops.fasthg.bn_relu_forward(x, torch.zeros(4), torch.ones(3), torch.ones(3), torch.zeros(3))
    with pytest.raises(RuntimeError, match="`weight` must be Float"):
        torch.ops.fasthg.bn_relu_forward(x, torch.zeros(3), torch.ones(3), torch.ones(3).half(), torch.zeros(3))
    with pytest.raises(RuntimeError, match="`grad_out` must match `x`"):
        torch.ops.fasthg.bn_relu_backward_reduce(torch.randn(2, 3, 4, 5), x, *[torch.ones(3)] * 4)
    with pytest.raises(RuntimeError, match="`grad_skip` must match `x`"):
        torch.ops.fasthg.bn_relu_train_backward_skip(torch.randn_like(x), x, *[torch.ones(3)] * 4,
                                                     torch.randn(2, 3, 4, 5))
    with pytest.raises(RuntimeError, match="`grad_skip` must match `x`"):
        torch.ops.fasthg.bn_relu_train_backward_skip(torch.randn_like(x), x, *[torch.ones(3)] * 4, x.double())


# Which outputs the loss reads: y alone, the skip alone (then y's backward does not run), both.
USES = ["y", "skip", "both"]


@pytest.mark.parametrize("device,backend", device_backend_params(op="bn_relu"))
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("use", USES)
def test_with_skip_equals_bn_relu_plus_the_branch(device, backend, dtype, layout, shape, use, poison):
    """bn_relu_with_skip: y and the running statistics as bn_relu's, skip x's values, and x's
    gradient (the skip branch's added in the BN-ReLU's backward pass where native) against
    float64, for a loss that reads y, the skip, or both."""
    skip_unsupported(device, backend, dtype)
    c = shape[1]
    x64, x = make_x(shape, dtype, device, layout, seed=3)
    g = torch.Generator().manual_seed(4)
    w64, b64 = torch.rand(c, generator=g, dtype=torch.float64) + 0.5, torch.randn(c, generator=g, dtype=torch.float64)
    rm64, rv64 = torch.randn(c, dtype=torch.float64, generator=g), torch.rand(c, dtype=torch.float64, generator=g) + 0.5
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    w, b = (t.to(device, pdtype).requires_grad_() for t in (w64, b64))
    rm, rv = rm64.to(device, pdtype), rv64.to(device, pdtype)
    for t in (x, x64, w64, b64):
        t.requires_grad_(True)
    y, skip = ops.bn_relu_with_skip(x, w, b, rm, rv, training=True, momentum=0.1, eps=1e-5, backend=backend)
    ref = reference(x64, w64, b64, rm64, rv64, True)
    assert y.dtype == dtype and y.is_contiguous(memory_format=layout) and not y.isnan().any()
    assert rel_err(y, ref) < TOL[dtype]
    assert torch.equal(skip, x) and skip.requires_grad
    assert rel_err(rm, rm64) < 1e-6 and rel_err(rv, rv64) < 1e-6
    gy64, gs64 = (torch.randn(shape, dtype=torch.float64, generator=g) for _ in range(2))
    gy, gs = (t.to(device=device, dtype=dtype).contiguous(memory_format=layout) for t in (gy64, gs64))
    outs, grads = {"y": ((y,), (gy,)), "skip": ((skip,), (gs,)), "both": ((y, skip), (gy, gs))}[use]
    ref_outs = {"y": (ref,), "skip": (x64,), "both": (ref, x64)}[use]
    gx, gw, gb = torch.autograd.grad(outs, (x, w, b), grads, allow_unused=True)
    if use == "skip":
        assert gw is None and gb is None and torch.equal(gx, gs)
        return
    ref_grads = tuple(t.double().cpu() for t in grads)
    rx, rw, rb = torch.autograd.grad(ref_outs, (x64, w64, b64), ref_grads)
    assert not gx.isnan().any() and gx.is_contiguous(memory_format=layout)
    for got, want in ((gx, rx), (gw, rw), (gb, rb)):
        assert rel_err(got.cpu(), want) < max(TOL[dtype], 1e-5)


@pytest.mark.parametrize("device,backend", params())
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_with_skip_gradcheck_float64(device, backend, layout):
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, device=device).contiguous(memory_format=layout).requires_grad_()
    w = (torch.rand(3, dtype=torch.float64, device=device) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, device=device).requires_grad_()
    torch.autograd.gradcheck(lambda x, w, b: ops.bn_relu_with_skip(x, w, b, backend=backend), (x, w, b))


@pytest.mark.parametrize("device,backend", params())
def test_with_skip_torch_compile_fullgraph(device, backend):
    torch._dynamo.reset()
    m = BNReLU(3, backend=backend).to(device)

    def block(x):
        y, skip = m.forward_with_skip(x)
        return y * 2 + skip

    x = torch.randn(2, 3, 4, 4, device=device, requires_grad=True)
    out = torch.compile(block, backend="aot_eager", fullgraph=True)(x)
    gx, = torch.autograd.grad(out.sum(), x)
    ref = BNReLU(3, backend="eager").to(device)
    expected = ref(x) * 2 + x
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(gx, torch.autograd.grad(expected.sum(), x)[0])


def test_with_skip_fuses_in_native_training_only(monkeypatch):
    """The skip's gradient goes through fasthg::bn_relu_train_backward_skip in native training
    with a gradient; elsewhere skip is x itself and bn_relu runs as it would alone."""
    calls = []
    real = torch.ops.fasthg.bn_relu_train_backward_skip
    monkeypatch.setattr(torch.ops.fasthg, "bn_relu_train_backward_skip", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    y, skip = ops.bn_relu_with_skip(x, backend="native")
    (y.sum() + skip.sum()).backward()
    assert calls == [1] and skip is not x
    for kw in ({"backend": "eager"}, {"backend": "native", "training": False, "running_mean": torch.zeros(3),
                                      "running_var": torch.ones(3)}):
        y, skip = ops.bn_relu_with_skip(x, **kw)
        assert skip is x
    with torch.no_grad():
        assert ops.bn_relu_with_skip(x, backend="native")[1] is x
    xd = x.detach()
    assert ops.bn_relu_with_skip(xd, backend="native")[1] is xd


def test_module_bad_input():
    with pytest.raises(ValueError, match="expected 3 channels"):
        BNReLU(3)(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="backend must be one of"):
        BNReLU(3, backend="cudnn")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(16, 64, 128, 128), (16, 256, 64, 64), (16, 256, 4, 4)], ids=str)
def test_cuda_hourglass_sizes(backend, dtype, shape):
    """The real shapes (largest and smallest levels), where indexing and reduction bugs hide."""
    for layout in LAYOUTS:
        x64, x = make_x(shape, dtype, "cuda", layout)
        w = torch.rand(shape[1], device="cuda") + 0.5
        b = torch.randn(shape[1], device="cuda") * 0.1
        x.requires_grad_(True)
        y = ops.bn_relu(x, w, b, None, None, training=True, backend=backend)
        x64 = x64.cuda().requires_grad_(True)
        ref = reference(x64, w.double(), b.double(), None, None, True)
        assert rel_err(y, ref) < TOL[dtype]
        gy = torch.randn_like(ref)
        (gx,) = torch.autograd.grad(y, x, gy.to(dtype))
        (rx,) = torch.autograd.grad(ref, x64, gy.to(dtype).double())
        assert rel_err(gx, rx) < max(TOL[dtype], 1e-5)


@pytest.mark.parametrize("device,backend", device_backend_params(op="bn_relu"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_eval_into_out(device, backend, dtype, layout, shape):
    """out=: the eval result written into a given tensor (NaN-filled first, so an element never
    written shows), returned, equal to the float64 reference; x untouched."""
    skip_unsupported(device, backend, dtype)
    x64, x = make_x(shape, dtype, device, layout)
    c = shape[1]
    g = torch.Generator().manual_seed(1)
    w64, b64, rm64 = (torch.randn(c, generator=g, dtype=torch.float64) for _ in range(3))
    rv64 = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    w, b, rm, rv = (t.float().to(device) for t in (w64, b64, rm64, rv64))
    out = torch.full_like(x, float("nan"), memory_format=layout)
    before = x.clone()
    with torch.no_grad():
        y = ops.bn_relu(x, w, b, rm, rv, training=False, backend=backend, out=out)
    assert y is out and torch.equal(x, before)
    assert rel_err(out, reference(x64, w64, b64, rm64, rv64, False)) < TOL[dtype]


@pytest.mark.parametrize("device,backend", params())
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_opcheck_into(device, backend, layout):
    op = torch.ops.fasthg.bn_relu_forward_into if backend == "native" else torch.ops.fasthg.bn_relu_forward_into_triton
    x = torch.randn(2, 3, 4, 5, device=device).contiguous(memory_format=layout)
    v = [torch.rand(3, device=device) + 0.5 for _ in range(4)]
    torch.library.opcheck(op, (x, *v, torch.empty_like(x)))


OUT_BAD = [
    ("training", {"training": True}, lambda x: torch.empty_like(x), "for inference"),
    ("shape", {}, lambda x: torch.empty(2, 3, 4, 5), "must match `x`"),
    ("dtype", {}, lambda x: torch.empty_like(x, dtype=torch.float64), "must match `x`"),
    ("layout", {}, lambda x: torch.empty_like(x, memory_format=torch.channels_last), "must be dense"),
    ("aliases-x", {}, lambda x: x, "must not share memory"),
]


@pytest.mark.parametrize("backend", ["eager", "native", "triton", "auto"])
@pytest.mark.parametrize("what,kw,make_out,message", OUT_BAD, ids=[b[0] for b in OUT_BAD])
def test_bad_out_is_a_clear_error(backend, what, kw, make_out, message):
    x = torch.randn(2, 3, 4, 4)
    args = dict(weight=torch.ones(3), bias=torch.zeros(3), running_mean=torch.zeros(3), running_var=torch.ones(3),
                training=False, backend=backend)
    with torch.no_grad(), pytest.raises(ValueError, match=message):
        ops.bn_relu(x, **{**args, **kw}, out=make_out(x))
    with pytest.raises(ValueError, match="no autograd"):
        ops.bn_relu(x.requires_grad_(), **args, out=torch.empty_like(x))


def test_native_into_checks_its_arguments():
    x, p = torch.randn(2, 3, 4, 4), [torch.ones(3)] * 4
    with pytest.raises(RuntimeError, match="`out` must match `x`"):
        torch.ops.fasthg.bn_relu_forward_into(x, *p, torch.empty(2, 3, 4, 5))
    with pytest.raises(RuntimeError, match="`out` must be dense"):
        torch.ops.fasthg.bn_relu_forward_into(x, *p, torch.empty_like(x, memory_format=torch.channels_last))
    with pytest.raises(RuntimeError, match="overlap"):
        torch.ops.fasthg.bn_relu_forward_into(x, *p, x)
