"""fasthg.ops.bn_relu_conv (the recomputing BN-ReLU-conv training unit) and the models'
memory="recompute": against the storing composition relu(batch_norm(x)) -> conv in float64,
on every backend; and that it saves less for backward."""
import copy
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from conftest import rel_err, sgd_steps_agree
import fasthg
from fasthg import ops
from fasthg.bench.memory import saved_activation_bytes
from fasthg.models import StackedHourglass
from fasthg.nn import BNReLU, convert_sync_bn_relu

BACKENDS = [b for b in ("eager", "native", "triton") if b in ops.available("cpu", "bn_relu")]
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
# (x shape, conv kwargs): odd sizes, 1x1 and 3x3, stride, padding, dilation, no bias
CASES = [((2, 5, 9, 7), dict(out_channels=7, kernel_size=1)),
         ((2, 5, 9, 7), dict(out_channels=3, kernel_size=3, padding=1)),
         ((3, 4, 6, 5), dict(out_channels=6, kernel_size=3, stride=2, padding=1, bias=False)),
         ((1, 3, 7, 8), dict(out_channels=4, kernel_size=(3, 1), stride=(1, 2), padding=(2, 0), dilation=2)),
         ((5, 6, 1, 1), dict(out_channels=2, kernel_size=1))]  # (2 values per channel: xhat = +-1, grad_x is noise)


def unit(c, conv_kw, seed=0, bn_kw=None, backend="auto"):
    torch.manual_seed(seed)
    bn, conv = BNReLU(c, backend=backend, **(bn_kw or {})), nn.Conv2d(c, **conv_kw)
    with torch.no_grad():
        if bn.weight is not None:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        if bn.running_mean is not None:
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2)
    return bn, conv


def storing(x, bn, conv):
    """The float64 eager composition, on float64 copies of the modules."""
    return conv(torch.relu(nn.functional.batch_norm(
        x, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.training or bn.running_mean is None,
        bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked + 1), bn.eps)))


def params_of(bn, conv):
    return [p for p in (bn.weight, bn.bias, conv.weight, conv.bias) if p is not None]


def make_x(shape, layout, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x64 = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.3
    x = x64.to(dtype).contiguous(memory_format=layout)
    return x64.to(dtype).double(), x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("shape,conv_kw", CASES, ids=lambda v: str(v) if isinstance(v, tuple) else None)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_matches_the_storing_composition(backend, layout, shape, conv_kw, training, poison):
    """Output, gradients of x and of the four parameters, running statistics and
    num_batches_tracked, over two steps, against float64 eager."""
    fmt = LAYOUTS[layout]
    bn, conv = unit(shape[1], conv_kw, backend=backend)
    bn, conv = bn.train(training), conv.to(memory_format=fmt)
    bn64, conv64 = copy.deepcopy(bn).double(), copy.deepcopy(conv).double()
    for step in range(2):
        x64, x = make_x(shape, fmt, seed=step)
        x, x64 = x.requires_grad_(), x64.requires_grad_()
        y = ops.bn_relu_conv(x, bn, conv, backend=backend)
        ref = storing(x64, bn64, conv64)
        if training:
            bn64.num_batches_tracked.add_(1)
        assert y.is_contiguous(memory_format=fmt)
        gy = torch.randn(ref.shape, dtype=torch.float64)
        got = torch.autograd.grad(y, [x] + params_of(bn, conv), gy.float())
        want = torch.autograd.grad(ref, [x64] + params_of(bn64, conv64), gy)
        assert rel_err(y, ref) < 1e-5
        for i, (a, b) in enumerate(zip(got, want)):
            assert rel_err(a, b) < 1e-5, i
        assert got[0].is_contiguous(memory_format=fmt)
        assert rel_err(bn.running_mean, bn64.running_mean) < 1e-6
        assert rel_err(bn.running_var, bn64.running_var) < 1e-6
        assert int(bn.num_batches_tracked) == int(bn64.num_batches_tracked)


@pytest.mark.parametrize("bn_kw", [{"momentum": None}, {"affine": False}, {"track_running_stats": False}], ids=str)
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "eager"])
def test_batchnorm_options_as_nn_batchnorm(backend, bn_kw):
    """Cumulative averages, no affine parameters, no running statistics: three training steps
    and an eval forward, against nn.BatchNorm2d + ReLU + conv."""
    bn, conv = unit(4, dict(out_channels=3, kernel_size=3, padding=1), bn_kw=bn_kw, backend=backend)
    ref = nn.Sequential(nn.BatchNorm2d(4, **bn_kw), nn.ReLU(), copy.deepcopy(conv))
    ref[0].load_state_dict(bn.state_dict())
    for step in range(3):
        x = torch.randn(2, 4, 5, 6, requires_grad=True)
        y = ops.bn_relu_conv(x, bn, conv, backend=backend)
        x2 = x.detach().requires_grad_()
        y2 = ref(x2)
        torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(y)
        torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(y2, x2, g)[0],
                                   rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(bn.state_dict().items(), ref[0].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    bn.eval(), ref.eval()
    x = torch.randn(2, 4, 5, 6)
    torch.testing.assert_close(ops.bn_relu_conv(x, bn, conv, backend=backend), ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "eager"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gradcheck_float64(backend, layout):
    fmt = LAYOUTS[layout]
    bn, conv = unit(3, dict(out_channels=2, kernel_size=3, padding=1, stride=2), backend=backend)
    bn, conv = bn.double(), conv.double().to(memory_format=fmt)
    x = (torch.randn(2, 3, 5, 4, dtype=torch.float64) + 0.2).contiguous(memory_format=fmt).requires_grad_()

    def f(x, w, b, cw, cb):  # the modules with these tensors as their parameters
        bn._parameters.update(weight=w, bias=b)
        conv._parameters.update(weight=cw, bias=cb)
        return ops.bn_relu_conv(x, bn, conv, backend=backend)

    ins = (x,) + tuple(p.detach().clone().requires_grad_() for p in params_of(bn, conv))
    assert torch.autograd.gradcheck(f, ins, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("shape,conv_kw", CASES[:3], ids=lambda v: str(v) if isinstance(v, tuple) else None)
@pytest.mark.parametrize("use", ["out", "skip", "both"])
def test_with_skip_matches_the_unit_plus_the_branch(backend, layout, shape, conv_kw, use, poison):
    """bn_relu_conv_with_skip: the unit's output and x's gradient (the skip branch's joining
    the recomputing unit's BN-ReLU backward) as the float64 composition's, for a loss that reads
    the output, the skip, or both; skip is x's values."""
    fmt = LAYOUTS[layout]
    bn, conv = unit(shape[1], conv_kw, backend=backend)
    conv = conv.to(memory_format=fmt)
    bn64, conv64 = copy.deepcopy(bn).double(), copy.deepcopy(conv).double()
    x64, x = make_x(shape, fmt)
    x.requires_grad_()
    x64.requires_grad_()
    out, skip = ops.bn_relu_conv_with_skip(x, bn, conv, backend=backend)
    ref = storing(x64, bn64, conv64)
    assert rel_err(out, ref) < 1e-5 and torch.equal(skip, x)
    g = torch.Generator().manual_seed(7)
    go, gs = torch.randn(out.shape, generator=g), torch.randn(x.shape, generator=g).contiguous(memory_format=fmt)
    outs, grads, refs = {"out": ((out,), (go,), (ref,)), "skip": ((skip,), (gs,), (x64,)),
                         "both": ((out, skip), (go, gs), (ref, x64))}[use]
    gx, = torch.autograd.grad(outs, x, grads)
    want, = torch.autograd.grad(refs, x64, tuple(t.double() for t in grads))
    assert not gx.isnan().any() and rel_err(gx, want) < 1e-5


def test_with_skip_runs_the_skip_backward_in_the_recomputing_unit(monkeypatch):
    calls = []
    real = torch.ops.fasthg.bn_relu_train_backward_skip
    monkeypatch.setattr(torch.ops.fasthg, "bn_relu_train_backward_skip", lambda *a: calls.append(1) or real(*a))
    bn, conv = unit(5, CASES[1][1], backend="native")
    x = make_x(CASES[1][0], torch.contiguous_format)[1].requires_grad_()
    out, skip = ops.bn_relu_conv_with_skip(x, bn, conv, backend="native")
    (out.sum() + skip.sum()).backward()
    assert calls == [1] and skip is not x
    bn.eval()
    assert ops.bn_relu_conv_with_skip(x, bn, conv, backend="native")[1] is x


@pytest.mark.skipif(not fasthg.ops.conv1x1.native_available(), reason="the extension is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_with_skip_runs_the_skip_backward_in_the_fused_unit(dtype, monkeypatch, poison):
    """Where the 1x1 unit runs fused (channels_last, FASTHG_CPU_CONV1X1=all), the skip branch's
    gradient goes to the native unit's backward (its grad_skip), and x's gradient is the
    storing composition's plus the branch's."""
    monkeypatch.setenv("FASTHG_CPU_CONV1X1", "all")
    skips = []
    real = fasthg.ops.conv1x1._native_backward_op
    monkeypatch.setattr(fasthg.ops.conv1x1, "_native_backward_op", lambda *a: skips.append(a[-1] is not None) or real(*a))
    torch.manual_seed(0)
    bn, conv = BNReLU(16).to(dtype), nn.Conv2d(16, 8, 1).to(dtype)
    x = torch.randn(2, 16, 5, 7, dtype=dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
    out, skip = ops.bn_relu_conv_with_skip(x, bn, conv, backend="native")
    assert skip is not x and torch.equal(skip, x)
    go, gs = torch.randn_like(out), torch.randn_like(x)
    gx, = torch.autograd.grad((out, skip), x, (go, gs))
    assert skips == [True]
    x64 = x.detach().double().requires_grad_()
    want, = torch.autograd.grad(storing(x64, copy.deepcopy(bn).double(), copy.deepcopy(conv).double()), x64, go.double())
    assert not gx.isnan().any() and rel_err(gx, want + gs.double()) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.skipif(not fasthg.ops.conv1x1.native_available(), reason="the extension is not built")
@pytest.mark.parametrize("case", ["bf16", "fp16", "float32", "nchw", "eager", "eval"])
def test_with_skip_out_stats_gives_the_outputs_sums_where_the_bf16_unit_runs(case, monkeypatch, poison):
    """out_stats=True: ((out, sums), skip), sums the output's per-channel sum and sum of squares
    (float32, from the fused unit's epilogue) where the native unit runs fused in bf16 or fp16;
    None elsewhere (float32 keeps eager's double-summed statistics; NCHW and eager do not fuse;
    eval saves nothing). The output is the one without out_stats."""
    monkeypatch.setenv("FASTHG_CPU_CONV1X1", "all")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(case, torch.float32)
    torch.manual_seed(0)
    bn, conv = BNReLU(16).to(dtype), nn.Conv2d(16, 8, 1).to(dtype)
    fmt = torch.contiguous_format if case == "nchw" else torch.channels_last
    x = torch.randn(2, 16, 5, 7, dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
    backend = "eager" if case == "eager" else "native"
    if case == "eval":
        bn.eval()
    (out, sums), skip = ops.bn_relu_conv_with_skip(x, bn, conv, backend=backend, out_stats=True)
    plain, _ = ops.bn_relu_conv_with_skip(x, copy.deepcopy(bn).train(case != "eval"), conv, backend=backend)
    assert torch.equal(out, plain) and torch.equal(skip, x)
    if case not in ("bf16", "fp16"):
        assert sums is None
        return
    o64 = out.detach().double()
    assert sums[0].dtype == sums[1].dtype == torch.float32 and not sums[0].requires_grad
    assert rel_err(sums[0], o64.sum((0, 2, 3))) < 1e-6 and rel_err(sums[1], o64.square().sum((0, 2, 3))) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_unit_saves_x_and_statistics_only(backend):
    """Recomputing backends keep x (and per-channel vectors), not relu(bn(x)); eager stores it."""
    bn, conv = unit(8, dict(out_channels=8, kernel_size=1), backend=backend)
    x = torch.randn(4, 8, 16, 16, requires_grad=True)
    saved = saved_activation_bytes(lambda: ops.bn_relu_conv(x, bn, conv, backend=backend), params_of(bn, conv))
    act = x.numel() * x.element_size()
    if backend == "eager":
        assert saved >= 2 * act
    else:
        assert act <= saved < act + 4 * 8 * 8  # x, and mean/invstd (float32, 8 channels)
    with torch.no_grad():  # no autograd graph: nothing at all
        assert saved_activation_bytes(lambda: ops.bn_relu_conv(x, bn, conv, backend=backend)) == 0


def test_autocast_bfloat16_matches_the_storing_unit():
    """On the CPU under bf16 autocast the convolution runs in bf16 (as nn.Conv2d would), the
    BN-ReLU in x's dtype: the same roundings as the storing composition."""
    bn, conv = unit(6, dict(out_channels=5, kernel_size=3, padding=1), backend="native")
    bn2, conv2 = copy.deepcopy(bn), copy.deepcopy(conv)
    x = torch.randn(2, 6, 7, 9, requires_grad=True)
    x2 = x.detach().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.bn_relu_conv(x, bn, conv, backend="native")
        y2 = conv2(bn2(x2))
    assert y.dtype == y2.dtype == torch.bfloat16
    g = torch.randn_like(y)
    (y.float() * g).sum().backward()
    (y2.float() * g).sum().backward()
    assert rel_err(y, y2) < 1e-2
    for a, b in [(x.grad, x2.grad), (bn.weight.grad, bn2.weight.grad), (conv.weight.grad, conv2.weight.grad),
                 (conv.bias.grad, conv2.bias.grad)]:
        assert a.dtype == b.dtype == torch.float32
        assert rel_err(a, b) < 1e-2


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    bn, conv = unit(4, dict(out_channels=3, kernel_size=3, padding=1), backend="native")
    bn2, conv2 = copy.deepcopy(bn), copy.deepcopy(conv)
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    out = torch.compile(lambda t: ops.bn_relu_conv(t, bn, conv, backend="native"), backend="aot_eager",
                        fullgraph=True)(x)
    out.square().sum().backward()
    x2 = x.detach().requires_grad_()
    ref = conv2(bn2(x2))
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(conv.weight.grad, conv2.weight.grad)
    torch.testing.assert_close(bn.running_var, bn2.running_var)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_several_convolutions_of_one_bn_relu(backend, layout):
    """bn_relu_convs: a 1x1 and a 3x3 convolution of the same relu(bn(x)), gradients summed."""
    fmt = LAYOUTS[layout]
    bn, conv1 = unit(5, dict(out_channels=3, kernel_size=1), backend=backend)
    conv2 = nn.Conv2d(5, 4, 3, padding=1, bias=False).to(memory_format=fmt)
    bn64, c1, c2 = copy.deepcopy(bn).double(), copy.deepcopy(conv1).double(), copy.deepcopy(conv2).double()
    x64, x = make_x((2, 5, 7, 6), fmt)
    x, x64 = x.requires_grad_(), x64.requires_grad_()
    y1, y2 = ops.bn_relu_convs(x, bn, (conv1, conv2), backend=backend)
    y = torch.relu(nn.functional.batch_norm(x64, bn64.running_mean, bn64.running_var, bn64.weight, bn64.bias, True))
    r1, r2 = c1(y), c2(y)
    g1, g2 = torch.randn_like(r1), torch.randn_like(r2)
    got = torch.autograd.grad((y1, y2), [x, bn.weight, bn.bias, conv1.weight, conv1.bias, conv2.weight],
                              (g1.float(), g2.float()))
    want = torch.autograd.grad((r1, r2), [x64, bn64.weight, bn64.bias, c1.weight, c1.bias, c2.weight], (g1, g2),
                               retain_graph=True)
    assert rel_err(y1, r1) < 1e-5 and rel_err(y2, r2) < 1e-5
    for i, (a, b) in enumerate(zip(got, want)):
        assert rel_err(a, b) < 1e-5, i
    assert rel_err(bn.running_var, bn64.running_var) < 1e-6
    # only the first output used: the other convolution's weight gets no (or a zero) gradient
    y1, _ = ops.bn_relu_convs(x, bn, (conv1, conv2), backend=backend)
    gx, gw2 = torch.autograd.grad(y1.sum(), (x, conv2.weight), allow_unused=True, materialize_grads=True)
    assert not gw2.any()
    assert rel_err(gx, torch.autograd.grad(c1(y).sum(), x64)[0]) < 1e-5


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton backend unavailable")
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_triton_backend_runs_1x1_convolutions_in_the_conv1x1_kernel(layout, monkeypatch):
    """backend="triton": 1x1 convolutions (here two of one BN-ReLU) go through
    fasthg.ops.bn_relu_conv1x1 (prologue BN-ReLU, recomputing backward), a 3x3 does not;
    outputs, gradients and running statistics as the float64 storing composition."""
    unit_module = sys.modules["fasthg.ops.bn_relu_conv"]  # (fasthg.ops.bn_relu_conv is the function)
    calls = []
    real = unit_module.bn_relu_conv1x1
    monkeypatch.setattr(unit_module, "bn_relu_conv1x1", lambda *a, **k: calls.append(1) or real(*a, **k))
    fmt = LAYOUTS[layout]
    bn, conv1 = unit(7, dict(out_channels=5, kernel_size=1), backend="triton")
    conv2 = nn.Conv2d(7, 3, 1, bias=False).to(memory_format=fmt)
    bn64, c1, c2 = copy.deepcopy(bn).double(), copy.deepcopy(conv1).double(), copy.deepcopy(conv2).double()
    x64, x = make_x((3, 7, 5, 9), fmt)
    x, x64 = x.requires_grad_(), x64.requires_grad_()
    y1, y2 = ops.bn_relu_convs(x, bn, (conv1, conv2), backend="triton")
    assert len(calls) == 2
    y = torch.relu(nn.functional.batch_norm(x64, bn64.running_mean, bn64.running_var, bn64.weight, bn64.bias, True))
    r1, r2 = c1(y), c2(y)
    g1, g2 = torch.randn_like(r1), torch.randn_like(r2)
    got = torch.autograd.grad((y1, y2), [x, bn.weight, bn.bias, conv1.weight, conv1.bias, conv2.weight],
                              (g1.float(), g2.float()))
    want = torch.autograd.grad((r1, r2), [x64, bn64.weight, bn64.bias, c1.weight, c1.bias, c2.weight], (g1, g2))
    assert rel_err(y1, r1) < 1e-5 and rel_err(y2, r2) < 1e-5
    for i, (a, b) in enumerate(zip(got, want)):
        assert rel_err(a, b) < 1e-5, i
    assert rel_err(bn.running_mean, bn64.running_mean) < 1e-6 and rel_err(bn.running_var, bn64.running_var) < 1e-6
    calls.clear()
    ops.bn_relu_conv(x, bn, nn.Conv2d(7, 2, 3, padding=1), backend="triton")
    assert not calls


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_triton_unit_on_cuda_matches_the_float64_composition(dtype, tol):
    """The GPU path of memory="recompute" with backend="triton": two 1x1 convolutions of one
    BN-ReLU in the conv1x1 kernel (compiled, not interpreted), channels_last, against float64."""
    if "triton" not in ops.available("cuda", "bn_relu"):
        pytest.skip("Triton backend unavailable on CUDA")
    bn, conv1 = unit(96, dict(out_channels=48, kernel_size=1), backend="triton")
    conv2 = nn.Conv2d(96, 80, 1, bias=False)
    bn64, c1, c2 = copy.deepcopy(bn).double(), copy.deepcopy(conv1).double(), copy.deepcopy(conv2).double()
    bn, conv1, conv2 = (m.cuda().to(dtype) if m is not bn else m.cuda() for m in (bn, conv1, conv2))
    x64 = torch.randn(4, 96, 33, 17, dtype=torch.float64) * 2 + 0.3
    x = x64.to(dtype).cuda().contiguous(memory_format=torch.channels_last).requires_grad_()
    x64 = x.detach().double().cpu().requires_grad_()
    y1, y2 = ops.bn_relu_convs(x, bn, (conv1, conv2), backend="triton")
    y = torch.relu(nn.functional.batch_norm(x64, bn64.running_mean, bn64.running_var, bn64.weight, bn64.bias, True))
    r1, r2 = c1(y), c2(y)
    g1, g2 = torch.randn_like(r1), torch.randn_like(r2)
    got = torch.autograd.grad((y1, y2), [x, bn.weight, conv1.weight, conv2.weight],
                              (g1.to(dtype).cuda(), g2.to(dtype).cuda()))
    want = torch.autograd.grad((r1, r2), [x64, bn64.weight, c1.weight, c2.weight], (g1, g2))
    assert y1.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(y1, r1) < tol and rel_err(y2, r2) < tol
    for i, (a, b) in enumerate(zip(got, want)):
        assert rel_err(a, b) < tol, i
    assert rel_err(bn.running_var, bn64.running_var) < 1e-5


@pytest.mark.parametrize("conv,message", [
    (nn.Conv2d(4, 4, 3, groups=2), "groups=2"),
    (nn.Conv2d(4, 4, 3, padding="same"), "padding='same'"),
    (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), "padding_mode='reflect'"),
    (nn.Conv2d(5, 4, 1), "in_channels=5 but the BN has 4"),
    (nn.Linear(4, 4), "must be an nn.Conv2d"),
])
def test_unsupported_modules_are_a_clear_error(conv, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        ops.bn_relu_conv(torch.randn(2, 4, 5, 5), BNReLU(4), conv)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match=r"`x` must be \[N, 4, H, W\]"):
        ops.bn_relu_conv(torch.randn(2, 3, 5, 5), BNReLU(4), nn.Conv2d(4, 4, 1))
    with pytest.raises(ValueError, match="`bn` must be an nn.BatchNorm2d"):
        ops.bn_relu_conv(torch.randn(2, 4, 5, 5), nn.ReLU(), nn.Conv2d(4, 4, 1))
    with pytest.raises(ValueError, match="memory must be one of"):
        StackedHourglass(num_stacks=1, num_features=8, memory="low")


# ---- the model's memory="recompute"

def small(**kw):
    return StackedHourglass(**{"num_stacks": 2, "num_features": 16, "num_joints": 5, "depth": 2, **kw})


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype,steps,tol", [(torch.float32, 1, 1e-5),
                                             pytest.param(torch.float64, 3, 1e-10, marks=pytest.mark.slow)],
                         ids=["f32", "f64"])
def test_recompute_model_trains_like_the_storing_model(layout, dtype, steps, tol):
    """SGD steps of memory="recompute" and "default" from the same weights: outputs, gradients,
    parameters and buffers (running statistics, num_batches_tracked). Native backend (a whole
    model in the Triton interpreter takes minutes; the unit tests above cover Triton)."""
    fmt, backend = LAYOUTS[layout], "native"
    torch.manual_seed(0)
    default = small(backend=backend).to(dtype).to(memory_format=fmt)
    recompute = small(backend=backend, memory="recompute").to(dtype).to(memory_format=fmt)
    assert list(recompute.state_dict()) == list(default.state_dict())
    recompute.load_state_dict(default.state_dict())
    sgd_steps_agree(default, recompute, lambda: torch.randn(2, 3, 32, 32, dtype=dtype).contiguous(memory_format=fmt),
                    steps, tol)
    for (name, a), b in zip(default.state_dict().items(), recompute.state_dict().values()):
        assert rel_err(b, a) < tol if a.is_floating_point() else torch.equal(a, b), name


def test_recompute_model_under_bf16_autocast_matches_the_storing_model(monkeypatch):
    # The storing model's merges in oneDNN's epilogue (ops.conv_add) round each sum once, and
    # recompute's units do not: in bf16 that moves every residual output by an ulp, which this
    # 2-image model's BNs amplify to ~7% (from the float32 model: 6.9% with conv_add, 8.1%
    # without; conv_add's own numerics: tests/test_conv_add.py). So both add as recompute does.
    monkeypatch.setattr(fasthg.ops, "conv_add", lambda x, conv, r, backend="auto": conv(x) + r)
    torch.manual_seed(0)
    default = small(backend="native").to(memory_format=torch.channels_last)
    recompute = copy.deepcopy(default)
    for m in recompute.modules():
        if hasattr(m, "memory"):
            m.memory = "recompute"
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    outs, grads = [], []
    for m in (default, recompute):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)
        out.float().square().mean().backward()
        outs.append(out)
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert outs[1].dtype == torch.bfloat16
    # Both models run their residual modules' 1x1 units in the fused native unit; the features'
    # heat-map and remap convolutions are fused only in "recompute". The fused GEMM sums in
    # another order than oneDNN's, so a bf16 rounding here and there differs, and the 2-image
    # batches' BNs amplify that (the unit alone agrees to 1e-4:
    # test_fused_unit_under_bf16_autocast_matches_the_storing_composition).
    assert rel_err(outs[1], outs[0]) < 1e-2
    assert rel_err(grads[1], grads[0]) < 2e-2


@pytest.mark.skipif(not fasthg.ops.conv1x1.native_available(), reason="the extension is not built")
def test_fused_unit_under_bf16_autocast_matches_the_storing_composition(monkeypatch):
    """bf16 x and float32 parameters under autocast, as a model runs them: the native 1x1 unit
    (fasthg.ops.bn_relu_conv1x1, taken: fuses_conv1x1) against BN-ReLU then nn.Conv2d, output
    and every gradient (the activation is rounded to bf16 in both, the bias too). The unit
    casts the weight inside and gives its gradient in float32 from its float sums, where
    autocast's composition rounds it to bf16 first: they agree to that rounding."""
    monkeypatch.setenv("FASTHG_CPU_CONV1X1", "all")  # (on a CPU with bf16 instructions "auto" leaves bf16 to oneDNN)
    torch.manual_seed(0)
    bn, conv = BNReLU(64), nn.Conv2d(64, 32, 1)
    x = torch.randn(4, 64, 16, 16).bfloat16().contiguous(memory_format=torch.channels_last)
    g = torch.randn(4, 32, 16, 16).bfloat16().contiguous(memory_format=torch.channels_last)
    results = []
    for backend in ("native", "eager"):
        xx = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert ops.fuses_conv1x1(xx, bn, conv, backend) == (backend == "native")
            y = ops.bn_relu_conv(xx, bn, conv, backend=backend)
        assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
        results.append((y,) + torch.autograd.grad(y, [xx, bn.weight, bn.bias, conv.weight, conv.bias], g))
    for name, got, want in zip(("y", "x", "bn.weight", "bn.bias", "conv.weight", "conv.bias"), *results):
        tol = 4e-3 if name == "conv.weight" else 1e-3  # (one bf16 rounding: 2^-9 of each value at most)
        assert got.dtype == want.dtype and rel_err(got, want) < tol, (name, rel_err(got, want))
    unit_grad = results[0][4]
    assert not torch.equal(unit_grad, unit_grad.bfloat16().float())  # not rounded to bf16 on the way


@pytest.mark.slow
def test_recompute_model_compiles_fullgraph():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = small(backend="native", memory="recompute")
    ref = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    out = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    out.square().mean().backward()
    expected = ref(x)
    expected.square().mean().backward()
    assert rel_err(out, expected) < 1e-6
    for a, b in zip(model.parameters(), ref.parameters()):
        assert rel_err(a.grad, b.grad) < 1e-5
    for a, b in zip(model.buffers(), ref.buffers()):
        assert torch.equal(a, b)


def test_recompute_model_saves_less_for_backward(monkeypatch):
    """The BN-ReLU-conv units keep 2C instead of 4C per pixel: the whole forward at least a
    third less here than the default model without the fused 1x1 unit (FASTHG_CPU_CONV1X1=off),
    which stores what recompute stores, so that the default model with the units `auto` routes
    saves no more than without. The eager backend stores everything in either mode; the native
    pools keep no indices in either (fasthg.ops.max_pool2x2)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    saved = {}
    for backend, memory, units in (("native", "default", "off"), ("native", "recompute", "off"),
                                   ("native", "default", "auto"), ("eager", "default", "auto"),
                                   ("eager", "recompute", "auto")):
        monkeypatch.setenv("FASTHG_CPU_CONV1X1", units)
        m = small(backend=backend, memory=memory, num_features=32)
        saved[backend, memory, units] = saved_activation_bytes(lambda: m(x), m.parameters())
    assert saved["native", "recompute", "off"] < 0.67 * saved["native", "default", "off"]
    assert saved["native", "default", "auto"] <= saved["native", "default", "off"]
    assert saved["eager", "recompute", "auto"] == saved["eager", "default", "auto"]
    assert saved["native", "default", "auto"] < saved["eager", "default", "auto"]


def test_checkpoint_of_a_default_model_loads_into_a_recompute_model(tmp_path):
    from fasthg import checkpoint

    model = small(backend="native")
    checkpoint.save(str(tmp_path / "m.pt"), model)
    rec = small(backend="native", memory="recompute")
    checkpoint.load_model(str(tmp_path / "m.pt"), model=rec)
    assert "memory" not in rec.config
    for a, b in zip(model.state_dict().values(), rec.state_dict().values()):
        assert torch.equal(a, b)


def test_activation_budget_is_extrapolated_from_two_batches():
    from fasthg.bench import budget

    # 100 fixed + 30 per image: 10 images fit 400 bytes, 9 fit 399
    assert budget.largest_batch({2: 160, 4: 220}, 400) == 10
    assert budget.largest_batch({2: 160, 4: 220}, 399) == 9
    assert budget.largest_batch({2: 160, 4: 220}, 50) == 0


@pytest.mark.slow
def test_activation_budget_rows_of_a_model():
    from fasthg.bench import budget

    rows = budget.budget_rows("hg1", ["eager", "native+recompute"], 64, "cpu", budgets_gib=(1,))
    eager, rec = rows
    assert eager["drop"] == 0 and rec["drop"] > 0.3
    assert rec["largest_batch"]["1"] > eager["largest_batch"]["1"] > 0
    assert eager["per_image_mb"] == pytest.approx((eager["saved_mb"]["4"] - eager["saved_mb"]["2"]) / 2)
    lines = budget.table(rows)
    assert "largest batch in 1 GiB" in lines[2] and len(lines) == 6


# ---- sync BN across processes (gloo, CPU)

SHARDS = (3, 2)


def _sync_data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(sum(SHARDS), 6, 5, 4, generator=g) * 2 + 1, torch.randn(sum(SHARDS), 4, 3, 2, generator=g)


def _sync_run(bn, conv, x, weights, backend, steps=2):
    for _ in range(steps):
        xs = x.clone().requires_grad_(True)
        bn.zero_grad(), conv.zero_grad()
        y = ops.bn_relu_conv(xs, bn, conv, backend=backend)
        (y * weights).sum().backward()
    return {"y": y.detach(), "gx": xs.grad, "gw": bn.weight.grad, "gcw": conv.weight.grad,
            "rm": bn.running_mean.clone(), "rv": bn.running_var.clone()}


def _sync_worker(rank, init_file, backend, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=len(SHARDS))
    try:
        x, weights = _sync_data()
        part = slice(sum(SHARDS[:rank]), sum(SHARDS[:rank + 1]))
        bn, conv = unit(6, dict(out_channels=4, kernel_size=3, stride=2, padding=1))
        convert_sync_bn_relu(bn)
        torch.save(_sync_run(bn, conv, x[part], weights[part], backend), os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_sync_bn_two_processes_equal_one_process_on_the_whole_batch(backend, tmp_path):
    mp.spawn(_sync_worker, args=(str(tmp_path / "init"), backend, str(tmp_path)), nprocs=len(SHARDS), join=True)
    parts = [torch.load(tmp_path / f"{r}.pt") for r in range(len(SHARDS))]
    x, weights = _sync_data()
    bn, conv = unit(6, dict(out_channels=4, kernel_size=3, stride=2, padding=1))
    whole = _sync_run(bn.double(), conv.double(), x.double(), weights.double(), "eager")
    for key in ("y", "gx"):
        assert rel_err(torch.cat([p[key] for p in parts]), whole[key]) < 1e-5, key
    for key in ("gw", "gcw"):  # local, as in nn.SyncBatchNorm: DDP adds (averages) them
        assert rel_err(sum(p[key] for p in parts), whole[key]) < 1e-5, key
    for p in parts:
        for key in ("rm", "rv"):
            assert rel_err(p[key], whole[key]) < 1e-6, key


# ---- the command line

@pytest.mark.slow
def test_train_command_with_memory_recompute(tmp_path):
    from fasthg import checkpoint
    from fasthg.cli import main

    args = ["train", "--out", str(tmp_path), "--input-size", "32", "--stacks", "1", "--features", "16", "--depth", "2",
            "--train-size", "8", "--val-size", "4", "--batch-size", "4", "--workers", "0", "--no-progress",
            "--device", "cpu", "--backend", "native", "--epochs", "1", "--memory", "recompute",
            "--no-keep-freed-memory"]
    assert main(args) == 0
    state = checkpoint.read(str(tmp_path / "last.pt"))
    assert state["config"]["memory"] == "recompute" and "memory" not in state["model_config"]
    # numerics are the same up to rounding: a resumed run may switch back
    assert main(["train", "--resume", str(tmp_path / "last.pt"), "--device", "cpu", "--epochs", "2",
                 "--memory", "default", "--no-keep-freed-memory"]) == 0
    assert checkpoint.read(str(tmp_path / "last.pt"))["config"]["memory"] == "default"
