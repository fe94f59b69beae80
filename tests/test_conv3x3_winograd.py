"""fasthg::conv3x3_winograd and its backward (csrc/cpu/conv3x3_winograd.cpp): the float32
3x3 convolution by Winograd's F(2x2, 3x3), against a float64 convolution; and where
fasthg.ops.conv2d routes to it."""
import importlib

import pytest
import torch
from torch import nn

from conftest import in_threads, rel_err, under_gemm_kernels
from fasthg.nn import Conv2d

conv2d_module = importlib.import_module("fasthg.ops.conv2d")
needs_native = pytest.mark.skipif(not hasattr(getattr(torch.ops, "fasthg", None), "conv3x3_winograd"),
                                  reason="the extension is not built")
LAYOUTS = [torch.contiguous_format, torch.channels_last]
# (batch, in, out, height, width): odd heights and widths (tiles past the edge), one pixel,
# channel counts off every panel and row block (70 in, 130 out; 3 and 2), a map of one tile
# row, and enough tiles for several blocks per thread (the hourglass's 128 channels)
SHAPES = [(2, 5, 7, 9, 11), (1, 3, 2, 1, 1), (3, 64, 130, 7, 6), (1, 70, 64, 5, 8), (2, 4, 6, 2, 17),
          (2, 128, 128, 16, 16)]
TOLS = {torch.float32: 1e-5, torch.float64: 1e-12}


def _inputs(shape, dtype, layout, seed):
    n, cin, cout, h, w = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=g).to(dtype).contiguous(memory_format=layout)
    grad = torch.randn(n, cout, h, w, generator=g).to(dtype).contiguous(memory_format=layout)
    weight = (torch.randn(cout, cin, 3, 3, generator=g) * 0.2).to(dtype).contiguous(memory_format=layout)
    bias = torch.randn(cout, generator=g).to(dtype)
    return x, grad, weight, bias


def _reference(x, grad, weight, bias):
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, weight, bias))
    y = torch.nn.functional.conv2d(x64, w64, b64, padding=1)
    return (y,) + torch.autograd.grad(y, [x64, w64, b64], grad.double())


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_and_backward_against_float64(shape, layout, dtype, poison):
    x, grad, weight, bias = _inputs(shape, dtype, layout, seed=sum(shape))
    y = torch.ops.fasthg.conv3x3_winograd(x, weight, bias)
    gx, gw, gb = torch.ops.fasthg.conv3x3_winograd_backward(grad, x, weight, True)
    want = _reference(x, grad, weight, bias)
    for name, got, ref, like in [("y", y, want[0], x), ("gx", gx, want[1], x), ("gw", gw, want[2], weight),
                                 ("gb", gb, want[3], bias)]:
        assert got.dtype == dtype and got.shape == ref.shape, name
        assert got.is_contiguous(memory_format=layout if got.dim() == 4 else torch.contiguous_format), name
        assert rel_err(got, ref) < TOLS[dtype], (name, rel_err(got, ref))
    # as close as oneDNN's float32 convolution itself (DESIGN.md's rule), with margin for rounding
    if dtype == torch.float32:
        eager = torch.nn.functional.conv2d(x, weight, bias, padding=1)
        assert rel_err(y, want[0]) < 3 * rel_err(eager, want[0]) + 1e-7


@needs_native
def test_without_bias_and_input_gradient(poison):
    x, grad, weight, _ = _inputs((2, 6, 5, 7, 9), torch.float32, torch.channels_last, seed=2)
    y = torch.ops.fasthg.conv3x3_winograd(x, weight)
    gx, gw, gb = torch.ops.fasthg.conv3x3_winograd_backward(grad, x, weight, False)
    want = _reference(x, grad, weight, torch.zeros(5))
    assert gx.numel() == 0
    for got, ref in [(y, want[0]), (gw, want[2]), (gb, want[3])]:
        assert rel_err(got, ref) < TOLS[torch.float32]


@needs_native
def test_gradcheck_float64():
    x, _, weight, bias = _inputs((2, 3, 4, 5, 3), torch.float64, torch.channels_last, seed=3)
    x, weight, bias = (t.requires_grad_() for t in (x, weight, bias))

    class Conv(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, bias):
            ctx.save_for_backward(x, weight)
            return torch.ops.fasthg.conv3x3_winograd(x, weight, bias)

        @staticmethod
        def backward(ctx, g):
            x, weight = ctx.saved_tensors
            return torch.ops.fasthg.conv3x3_winograd_backward(g.contiguous(), x, weight, True)

    torch.autograd.gradcheck(Conv.apply, (x, weight, bias))


@needs_native
@pytest.mark.parametrize("input_grad", [True, False])
def test_opcheck(input_grad):
    x, grad, weight, bias = _inputs((2, 6, 4, 5, 7), torch.float32, torch.channels_last, seed=4)
    torch.library.opcheck(torch.ops.fasthg.conv3x3_winograd.default, (x, weight, bias))
    torch.library.opcheck(torch.ops.fasthg.conv3x3_winograd_backward.default, (grad, x, weight, input_grad))


@needs_native
def test_empty_batch_and_no_input_channels():
    x, grad, weight, bias = _inputs((2, 4, 3, 5, 6), torch.float32, torch.channels_last, seed=5)
    y = torch.ops.fasthg.conv3x3_winograd(x[:0], weight, bias)
    assert y.shape == (0, 3, 5, 6)
    gx, gw, gb = torch.ops.fasthg.conv3x3_winograd_backward(grad[:0], x[:0], weight, True)
    assert gx.shape == (0, 4, 5, 6) and (gw == 0).all() and (gb == 0).all()
    y = torch.ops.fasthg.conv3x3_winograd(x[:, :0], weight[:, :0], bias)
    torch.testing.assert_close(y, bias.view(1, 3, 1, 1).expand(2, 3, 5, 6))
    gx, gw, gb = torch.ops.fasthg.conv3x3_winograd_backward(grad[:, :0], x, weight[:0], True)
    assert (gx == 0).all() and gw.numel() == 0 and gb.numel() == 0


@needs_native
def test_bad_arguments_are_clear_errors():
    x, grad, weight, bias = _inputs((2, 6, 4, 5, 7), torch.float32, torch.channels_last, seed=6)
    fwd, bwd = torch.ops.fasthg.conv3x3_winograd, torch.ops.fasthg.conv3x3_winograd_backward
    with pytest.raises(RuntimeError, match="`x` must be 4-D"):
        fwd(x[0], weight)
    with pytest.raises(RuntimeError, match="`x` must be float32 or float64"):
        fwd(x.bfloat16(), weight.bfloat16())
    with pytest.raises(RuntimeError, match=r"`weight` must be \[Cout, 6, 3, 3\]"):
        fwd(x, weight[:, :, :2])
    with pytest.raises(RuntimeError, match="`weight` must be Float on cpu, got Double"):
        fwd(x, weight.double())
    with pytest.raises(RuntimeError, match="`bias` must be"):
        fwd(x, weight, bias[:2])
    with pytest.raises(RuntimeError, match="`grad_out` must be"):
        bwd(grad[:, :, :3], x, weight, True)


@needs_native
def test_one_thread_and_many_agree():
    """Per-thread weight-gradient sums, summed once: the thread count changes only rounding."""
    x, grad, weight, _ = _inputs((3, 8, 6, 20, 12), torch.float32, torch.channels_last, seed=7)
    one = in_threads(1, lambda: torch.ops.fasthg.conv3x3_winograd_backward(grad, x, weight, True))
    many = torch.ops.fasthg.conv3x3_winograd_backward(grad, x, weight, True)
    for a, b in zip(one, many):
        assert rel_err(a, b) < 1e-6


@needs_native
def test_every_native_gemm_kernel_agrees():
    """FASTHG_GEMM narrows the GEMM kernel (read once per process): avx2 and the plain loops
    give what the widest one does, against float64."""
    script = (
        "import torch, sys; sys.path.insert(0, 'tests'); import test_conv3x3_winograd as t; from conftest import rel_err\n"
        "x, g, w, b = t._inputs((2, 70, 20, 9, 8), torch.float32, torch.channels_last, 9)\n"
        "got = (torch.ops.fasthg.conv3x3_winograd(x, w, b),) + torch.ops.fasthg.conv3x3_winograd_backward(g, x, w, True)\n"
        "print(torch.ops.fasthg.cpu_gemm_kernel(torch.float32), max(rel_err(a, r) for a, r in zip(got, t._reference(x, g, w, b))))\n")
    for kernel, (name, err) in under_gemm_kernels(script).items():
        assert name in (kernel, "plain") and float(err) < TOLS[torch.float32], (name, err)


# Routing (fasthg.ops.conv2d): float32 3x3 convolutions with enough pixels per weight element,
# where the GEMM kernel is AVX2 or AVX-512.

def _routes(x, conv, dtype=torch.float32):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        return conv2d_module.fuses(x, conv) and conv2d_module.runs_winograd(
            x.to(dtype), conv.weight.to(dtype), conv.stride, conv.padding, conv.dilation, conv.groups)


def test_routing():
    on = conv2d_module.fma_available()
    x = torch.randn(4, 128, 16, 16).contiguous(memory_format=torch.channels_last).requires_grad_()
    conv = nn.Conv2d(128, 128, 3, padding=1)
    assert _routes(x, conv) == on  # the hourglass's 3x3 at 16x16
    assert not _routes(x[:, :, :8, :8], conv)  # too few pixels per weight
    assert not _routes(x, conv, torch.bfloat16)  # bf16: AMX's or oneDNN's
    assert not _routes(x, nn.Conv2d(128, 128, 3, padding=1, stride=2))
    assert not _routes(x, nn.Conv2d(128, 128, 3, padding=2, dilation=2))
    assert not _routes(x, nn.Conv2d(128, 128, 3, padding=1, groups=2))
    assert not _routes(x, nn.Conv2d(128, 128, 1))
    big = torch.randn(4, 512, 32, 32).contiguous(memory_format=torch.channels_last).requires_grad_()
    assert not _routes(big, nn.Conv2d(512, 512, 3, padding=1))  # transformed weight past the L2
    with torch.no_grad():
        assert not conv2d_module.fuses(x, conv)  # inference keeps oneDNN's


@pytest.mark.skipif(not conv2d_module.fma_available(), reason="no AVX2/AVX-512 GEMM kernel here")
@pytest.mark.parametrize("memory", ["default", "recompute"])
def test_module_and_the_recomputing_unit_take_it(memory, monkeypatch, poison):
    """fasthg.nn.Conv2d and bn_relu_conv (memory="recompute") run forward and backward on it,
    against float64."""
    from fasthg import ops
    calls = []
    for name in ("conv3x3_winograd", "conv3x3_winograd_backward"):
        real = getattr(torch.ops.fasthg, name)
        monkeypatch.setattr(torch.ops.fasthg, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    monkeypatch.setattr(conv2d_module, "_WINOGRAD_PIXELS_PER_WEIGHT", 0.0)
    torch.manual_seed(8)
    bn, conv = nn.BatchNorm2d(6), Conv2d(6, 5, 3, padding=1)
    bn64, conv64 = nn.BatchNorm2d(6).double(), nn.Conv2d(6, 5, 3, padding=1).double()
    bn64.load_state_dict({n: v.double() for n, v in bn.state_dict().items()})
    conv64.load_state_dict({n: v.double() for n, v in conv.state_dict().items()})
    x = torch.randn(2, 6, 7, 9).contiguous(memory_format=torch.channels_last).requires_grad_()
    conv = conv.to(memory_format=torch.channels_last)
    out = ops.bn_relu_conv(x, bn, conv) if memory == "recompute" else conv(torch.relu(bn(x)))
    x64 = x.detach().double().requires_grad_()
    want = conv64(torch.relu(bn64(x64)))
    assert rel_err(out, want) < 1e-5
    g = torch.randn(out.shape, dtype=torch.float64)
    got = torch.autograd.grad(out, [x] + list(bn.parameters()) + list(conv.parameters()), g.float())
    exp = torch.autograd.grad(want, [x64] + list(bn64.parameters()) + list(conv64.parameters()), g)
    for a, b in zip(got, exp):
        assert rel_err(a, b) < 1e-5
    assert calls == ["conv3x3_winograd", "conv3x3_winograd_backward"]


# The float32 1x1 backward on fasthg::conv2d_backward (the unit's float kernel without its
# BN-ReLU), routed from large enough maps.

@needs_native
@pytest.mark.parametrize("shape", [(2, 6, 9, 5, 7), (1, 70, 130, 3, 11), (3, 64, 16, 20, 12)], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("input_grad", [True, False])
def test_float32_1x1_backward(shape, layout, input_grad, poison):
    n, cin, cout, h, w = shape
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(n, cin, h, w, generator=g).contiguous(memory_format=layout)
    grad = torch.randn(n, cout, h, w, generator=g).contiguous(memory_format=layout)
    weight = torch.randn(cout, cin, 1, 1, generator=g).contiguous(memory_format=layout)
    gx, gw, gb = torch.ops.fasthg.conv2d_backward(grad, x, weight, input_grad)
    want = torch.ops.aten.convolution_backward(grad.double(), x.double(), weight.double(), [cout], [1, 1], [0, 0],
                                               [1, 1], False, [0, 0], 1, [True, True, True])
    assert gx.numel() == 0 if not input_grad else (gx.is_contiguous(memory_format=layout)
                                                   and rel_err(gx, want[0]) < 1e-6)
    for got, ref in [(gw, want[1]), (gb, want[2])]:
        assert got.dtype == torch.float32 and got.shape == ref.shape and rel_err(got, ref) < 1e-6


def test_float32_1x1_routing():
    x = torch.randn(4, 128, 64, 64).contiguous(memory_format=torch.channels_last).requires_grad_()
    assert conv2d_module.fuses(x, nn.Conv2d(128, 256, 1)) == conv2d_module.fma_available()  # the hourglass's at 64x64
    assert not conv2d_module.fuses(x[:, :, :32, :32], nn.Conv2d(128, 256, 1))  # too few pixels
    assert not conv2d_module.fuses(x, nn.Conv2d(128, 16, 1))  # too few channels
    assert not conv2d_module.fuses(x, nn.Conv2d(128, 256, 1, stride=2))
    assert not conv2d_module.fuses(x.contiguous(), nn.Conv2d(128, 256, 1))  # NCHW
    assert not conv2d_module.fuses(x.bfloat16(), nn.Conv2d(128, 256, 1).bfloat16()) or conv2d_module.amx_available()


@pytest.mark.skipif(not conv2d_module.fma_available(), reason="no AVX2/AVX-512 GEMM kernel here")
def test_compiles_fullgraph():
    torch.manual_seed(10)
    conv = Conv2d(8, 6, 3, padding=1).to(memory_format=torch.channels_last)
    x = torch.randn(2, 8, 32, 32).contiguous(memory_format=torch.channels_last).requires_grad_()
    assert _routes(x, conv)
    compiled = torch.compile(conv, backend="aot_eager", fullgraph=True)
    out, want = compiled(x), conv(x)
    torch.testing.assert_close(out, want)
    got = torch.autograd.grad(out.sum(), [x, conv.weight, conv.bias])
    exp = torch.autograd.grad(want.sum(), [x, conv.weight, conv.bias])
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b)


def test_the_benchmark_runs(tmp_path):
    """python -m fasthg.bench.conv2d at tiny shapes: it runs, and its rows, table and chart are
    whole (timings here mean nothing)."""
    from fasthg.bench import conv2d as bench

    rows = bench.run([(8, 8, 3, 8), (8, 8, 1, 4)], batch=1, dtypes=[torch.float32], repeats=1, warmup=1,
                     out_dir=str(tmp_path))
    assert [(r["k"], r["mode"]) for r in rows] == [(3, "forward"), (3, "forward+backward"), (1, "forward"),
                                                  (1, "forward+backward")]
    assert rows[0]["route"] == ("winograd" if conv2d_module.fma_available() else "onednn")
    assert rows[2]["route"] == "onednn"  # 16 pixels: below the GEMM route's size
    assert all(r["onednn_ms"] > 0 and r["fasthg_ms"] > 0 for r in rows)
    assert (tmp_path / "conv2d.md").read_text().count("| float32 |") == 4
    pytest.importorskip("matplotlib")
    assert (tmp_path / "conv2d.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.skipif(not conv2d_module.fma_available(), reason="no AVX2/AVX-512 GEMM kernel here")
def test_inference_forward_takes_it(monkeypatch):
    """Without gradients a float32 3x3 runs the Winograd forward (as close to float64 as
    oneDNN's); under bf16 autocast, or with backend="eager", nn.Conv2d's."""
    calls = []
    real = torch.ops.fasthg.conv3x3_winograd
    monkeypatch.setattr(torch.ops.fasthg, "conv3x3_winograd", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(11)
    conv = Conv2d(128, 64, 3, padding=1).to(memory_format=torch.channels_last)
    x = torch.randn(2, 128, 24, 20).contiguous(memory_format=torch.channels_last)
    want = torch.nn.functional.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
    with torch.no_grad():
        assert conv2d_module.infers_winograd(x, conv)
        out = conv(x)
        assert rel_err(out, want) < TOLS[torch.float32] and out.is_contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not conv2d_module.infers_winograd(x, conv)
            conv(x)
        assert not conv2d_module.infers_winograd(x, conv, backend="eager")
        assert not conv2d_module.infers_winograd(x.contiguous(), conv)
    assert calls == [1]
