"""fasthg.ops.conv2d / fasthg.nn.Conv2d: the convolution with its backward from
fasthg::conv2d_backward (AMX bf16 on AMX CPUs: the weight and bias gradients, and a 1x1's input
gradient; ATen's elsewhere), against float64."""
import importlib

import pytest
import torch
from torch import nn

from conftest import in_threads, rel_err
from fasthg import ops
from fasthg.nn import Conv2d

conv2d_module = importlib.import_module("fasthg.ops.conv2d")
needs_native = pytest.mark.skipif(not hasattr(getattr(torch.ops, "fasthg", None), "conv2d_backward"),
                                  reason="the extension is not built")
needs_amx = pytest.mark.skipif(not conv2d_module.amx_available(), reason="no AMX bf16 on this CPU")
LAYOUTS = [torch.contiguous_format, torch.channels_last]
# (batch, in, out, height, width, kernel): odd sizes, 1x1 with more output channels (the
# kernel's roles swap) and with fewer, a channel block tail (258 = 256 + 2), one pixel, several
# bands of rows (120 rows of 8), rows wider than a band (800), 5x5
SHAPES = [(2, 6, 10, 7, 9, 3), (2, 6, 10, 7, 9, 1), (3, 12, 4, 5, 3, 1), (1, 4, 2, 1, 1, 3), (3, 8, 6, 5, 6, 5),
          (2, 258, 66, 3, 5, 3), (1, 4, 6, 120, 8, 3), (1, 2, 2, 3, 800, 3), (2, 16, 258, 4, 4, 1)]
TOLS = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _inputs(shape, dtype, layout, seed):
    n, cin, cout, h, w, k = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=g).to(dtype).contiguous(memory_format=layout)
    grad = torch.randn(n, cout, h, w, generator=g).to(dtype).contiguous(memory_format=layout)
    weight = (torch.randn(cout, cin, k, k, generator=g) * 0.2).to(dtype).contiguous(memory_format=layout)
    return x, grad, weight


def _reference(x, grad, weight):
    k = weight.shape[-1]
    return torch.ops.aten.convolution_backward(grad.double(), x.double(), weight.double(), [weight.shape[0]],
                                               [1, 1], [k // 2, k // 2], [1, 1], False, [0, 0], 1, [True, True, True])


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("input_grad", [True, False])
def test_backward_against_float64(shape, layout, dtype, input_grad, poison):
    x, grad, weight = _inputs(shape, dtype, layout, seed=sum(shape))
    gx, gw, gb = torch.ops.fasthg.conv2d_backward(grad, x, weight, input_grad)
    want_x, want_w, want_b = _reference(x, grad, weight)
    assert gw.shape == weight.shape and gw.dtype == dtype and gb.shape == (shape[2],) and gb.dtype == dtype
    assert gw.is_contiguous(memory_format=layout)  # the weight's layout
    assert not gw.isnan().any() and not gb.isnan().any()
    assert rel_err(gw, want_w) < TOLS[dtype] and rel_err(gb, want_b) < TOLS[dtype]
    if not input_grad:
        assert gx.numel() == 0
        return
    assert gx.shape == x.shape and gx.dtype == dtype and gx.is_contiguous(memory_format=layout)
    assert not gx.isnan().any() and rel_err(gx, want_x) < TOLS[dtype]


@needs_amx
@pytest.mark.parametrize("shape", [(4, 64, 32, 16, 16, 3), (2, 128, 64, 8, 12, 1)], ids=str)
def test_amx_backward_as_close_as_onednns(shape):
    """Float accumulation rounded once: as far from float64 as oneDNN's own bf16 weight gradient."""
    x, grad, weight = _inputs(shape, torch.bfloat16, torch.channels_last, seed=1)
    got = torch.ops.fasthg.conv2d_backward(grad, x, weight, True)
    k = shape[-1]
    onednn = torch.ops.aten.convolution_backward(grad, x, weight, [shape[2]], [1, 1], [k // 2, k // 2], [1, 1],
                                                 False, [0, 0], 1, [True, True, True])
    for a, o, want in zip(got, onednn, _reference(x, grad, weight)):
        assert rel_err(a, want) <= 1.5 * rel_err(o, want) + 1e-3


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("input_grad", [True, False])
def test_opcheck(dtype, k, input_grad):
    x, grad, weight = _inputs((2, 6, 4, 5, 7, k), dtype, torch.channels_last, seed=3)
    torch.library.opcheck(torch.ops.fasthg.conv2d_backward.default, (grad, x, weight, input_grad))


@needs_native
def test_bad_arguments_are_clear_errors():
    x, grad, weight = _inputs((2, 6, 4, 5, 7, 3), torch.bfloat16, torch.channels_last, seed=4)
    op = torch.ops.fasthg.conv2d_backward
    with pytest.raises(RuntimeError, match="`weight` must be"):
        op(grad, x, weight[:, :, :2, :2], True)
    with pytest.raises(RuntimeError, match="`weight` must be"):
        op(grad, x, weight.float(), True)
    with pytest.raises(RuntimeError, match="`grad_out` must be"):
        op(grad[:, :, :4], x, weight, True)
    with pytest.raises(RuntimeError, match="`x` must be 4-D"):
        op(grad, x[0], weight, True)


def _module_pair(cin, cout, k, seed, **kw):
    torch.manual_seed(seed)
    conv = Conv2d(cin, cout, k, padding=k // 2, **kw).to(memory_format=torch.channels_last)
    ref = nn.Conv2d(cin, cout, k, padding=k // 2, bias=conv.bias is not None).double()
    ref.load_state_dict({n: v.double() for n, v in conv.state_dict().items()})
    return conv, ref


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("k,bias", [(3, True), (1, False)])
def test_module_values_and_gradients_against_float64(dtype, k, bias, poison):
    """Under bf16 autocast (the weight in float32, as training keeps it) and in float32."""
    conv, ref = _module_pair(8, 6, k, seed=k, bias=bias)
    x = torch.randn(2, 8, 48, 47).contiguous(memory_format=torch.channels_last).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        # float32 3x3: the Winograd kernel (tests/test_conv3x3_winograd.py), where it runs
        want_fused = conv2d_module.amx_available() if dtype == torch.bfloat16 else (
            k == 3 and conv2d_module.fma_available())
        assert conv2d_module.fuses(x, conv) == want_fused
        out = conv(x)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    x64 = x.detach().double().requires_grad_()
    want = ref(x64)
    assert rel_err(out, want) < TOLS[dtype]
    g = torch.randn(out.shape, dtype=torch.float64)
    got = torch.autograd.grad(out, [x] + list(conv.parameters()), g.to(dtype))
    exp = torch.autograd.grad(want, [x64] + list(ref.parameters()), g.to(dtype).double())
    for a, b, t in zip(got, exp, [x] + list(conv.parameters())):
        assert a.dtype == t.dtype and a.shape == t.shape and not a.isnan().any()
        assert rel_err(a, b) < TOLS[dtype]


def test_module_is_nn_conv2d_where_it_does_not_fuse(monkeypatch):
    """eager backend, NCHW, float64, stride 2, dilation, groups, even kernels, odd channel
    counts (bf16), no gradient: nn.Conv2d's own forward, exactly (float32 3x3s too, with too few
    pixels for the Winograd kernel)."""
    monkeypatch.setattr(conv2d_module, "_WINOGRAD_PIXELS_PER_WEIGHT", 1e9)
    monkeypatch.setattr(conv2d_module._Conv2d, "apply", lambda *a: pytest.fail("fused"))
    cl = torch.channels_last
    cases = [(dict(backend="eager"), cl, True), (dict(), torch.contiguous_format, True),
             (dict(stride=2), cl, True), (dict(dilation=2, padding=2), cl, True), (dict(groups=2), cl, True),
             (dict(kernel_size=2, padding=0), cl, True), (dict(out_channels=5), cl, True), (dict(), cl, False)]
    for kw, layout, grad in cases:
        args = dict(in_channels=4, out_channels=6, kernel_size=3, padding=1)
        args.update(kw)
        backend = args.pop("backend", "auto")
        torch.manual_seed(0)
        conv = Conv2d(**args, backend=backend).to(memory_format=cl)
        plain = nn.Conv2d(**args).to(memory_format=cl)
        plain.load_state_dict(conv.state_dict())
        x = torch.randn(2, 4, 8, 8).contiguous(memory_format=layout).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(grad):
            torch.testing.assert_close(conv(x), plain(x), rtol=0, atol=0)
        torch.testing.assert_close(conv(x), plain(x), rtol=0, atol=0)
    conv = Conv2d(4, 6, 3, padding=1).double()
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(conv, (x,))


def test_state_dict_is_nn_conv2ds():
    assert Conv2d(4, 6, 3).state_dict().keys() == nn.Conv2d(4, 6, 3).state_dict().keys()
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.conv2d(torch.randn(1, 4, 5, 5), Conv2d(4, 6, 3), backend="fast")


@needs_amx
def test_compiles_fullgraph():
    conv, _ = _module_pair(8, 6, 3, seed=5)
    x = torch.randn(2, 8, 32, 32).contiguous(memory_format=torch.channels_last).requires_grad_()
    compiled = torch.compile(conv, backend="aot_eager", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv2d_module.fuses(x, conv)
        out = compiled(x)
        want = conv(x)
    torch.testing.assert_close(out, want)
    got = torch.autograd.grad(out.float().sum(), [x, conv.weight])
    exp = torch.autograd.grad(want.float().sum(), [x, conv.weight])
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b)


def test_small_maps_keep_onednns_backward():
    """Too few pixels per weight element for larger weights (ResNet-50's later stages):
    nn.Conv2d's backward."""
    x = torch.randn(8, 256, 14, 14).contiguous(memory_format=torch.channels_last).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not conv2d_module.fuses(x, nn.Conv2d(256, 256, 3, padding=1))
        assert not conv2d_module.fuses(x[:1, :, :8, :8], nn.Conv2d(256, 256, 3, padding=1))
        assert not conv2d_module.fuses(x, nn.Conv2d(256, 1024, 1))


def test_small_weights_take_the_op_at_any_size():
    """The hourglass's 1x1s (up to 256x256 weights) and 3x3s (128x128) take the AMX kernel
    down to 4x4 maps."""
    x = torch.randn(4, 256, 4, 4).contiguous(memory_format=torch.channels_last).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for conv in (nn.Conv2d(256, 128, 1), nn.Conv2d(256, 256, 1), nn.Conv2d(256, 16, 1)):
            assert conv2d_module.fuses(x, conv) == conv2d_module.amx_available()
        x3 = torch.randn(4, 128, 4, 4).contiguous(memory_format=torch.channels_last).requires_grad_()
        assert conv2d_module.fuses(x3, nn.Conv2d(128, 128, 3, padding=1)) == conv2d_module.amx_available()


@needs_native
@pytest.mark.parametrize("shape", [(2, 6, 10, 7, 9, 3), (2, 16, 258, 4, 4, 1), (3, 12, 4, 5, 3, 1)], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_float32_weight_gradient_of_bf16_operands(shape, layout, poison):
    """grad_weight_dtype=float32 (float32 parameters under autocast): the weight and bias
    gradients are the float sums themselves, an order closer to float64 than bf16's rounding."""
    x, grad, weight = _inputs(shape, torch.bfloat16, layout, seed=11)
    gx, gw, gb = torch.ops.fasthg.conv2d_backward(grad, x, weight, True, torch.float32)
    want_x, want_w, want_b = _reference(x, grad, weight)
    assert gw.dtype == gb.dtype == torch.float32 and gx.dtype == torch.bfloat16
    assert gw.is_contiguous(memory_format=layout) and not gw.isnan().any() and not gb.isnan().any()
    assert rel_err(gw, want_w) < 1e-4 and rel_err(gb, want_b) < 1e-4
    assert rel_err(gx, want_x) < TOLS[torch.bfloat16]
    with pytest.raises(RuntimeError, match="`grad_weight_dtype` must be"):
        torch.ops.fasthg.conv2d_backward(grad, x, weight, True, torch.float16)


@needs_amx
def test_half_parameters_under_bf16_autocast_get_half_gradients():
    """Parameters in a dtype the kernel does not write (float16) get their gradients cast, as
    autograd's own cast back would give them."""
    conv, ref = _module_pair(8, 6, 3, seed=13)
    conv = conv.half()
    x = torch.randn(2, 8, 48, 47).half().contiguous(memory_format=torch.channels_last).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv2d_module.fuses(x, conv)
        out = conv(x)
    g = torch.randn(out.shape, dtype=torch.float64)
    gx, gw, gb = torch.autograd.grad(out, [x, conv.weight, conv.bias], g.to(out.dtype))
    assert gx.dtype == gw.dtype == gb.dtype == torch.float16
    ref.load_state_dict({n: v.double() for n, v in conv.state_dict().items()})
    want_w, want_b = torch.autograd.grad(ref(x.detach().bfloat16().double()), [ref.weight, ref.bias],
                                         g.bfloat16().double())
    assert rel_err(gw, want_w) < TOLS[torch.bfloat16] and rel_err(gb, want_b) < TOLS[torch.bfloat16]


@needs_amx
def test_autocast_parameters_get_their_gradient_without_a_cast():
    """Under autocast the Function takes the float32 parameters and casts them itself: their
    gradients come straight from the kernel in float32 (no bf16 rounding, no cast node)."""
    conv, ref = _module_pair(8, 6, 3, seed=12)
    x = torch.randn(2, 8, 48, 47).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
    weight_node, bias_node = [f for f, _ in out.grad_fn.next_functions if f is not None]
    assert type(weight_node).__name__ == type(bias_node).__name__ == "AccumulateGrad"
    g = torch.randn(out.shape, dtype=torch.float64)
    gw, gb = torch.autograd.grad(out, [conv.weight, conv.bias], g.to(out.dtype))
    assert gw.dtype == gb.dtype == torch.float32
    want_w, want_b = torch.autograd.grad(ref(x.bfloat16().double()), [ref.weight, ref.bias], g.bfloat16().double())
    assert rel_err(gw, want_w) < 1e-4 and rel_err(gb, want_b) < 1e-4


@needs_amx
@pytest.mark.parametrize("memory", ["default", "recompute"])
def test_conv_add_and_the_recomputing_unit_take_it(memory, monkeypatch):
    """conv_add's and bn_relu_conv's backward through fasthg.ops.conv2d.backward (thresholds
    lowered so that small maps take the AMX kernel), against float64."""
    monkeypatch.setattr(conv2d_module, "_MIN_PIXELS", 0)
    monkeypatch.setattr(conv2d_module, "_PIXELS_PER_WEIGHT", 0.0)
    calls = []
    real = torch.ops.fasthg.conv2d_backward

    class Spy:
        def __call__(self, *args):
            calls.append(args[2].shape)
            return real(*args)

    monkeypatch.setattr(torch.ops.fasthg, "conv2d_backward", Spy())
    torch.manual_seed(7)
    bn, conv1, conv3 = nn.BatchNorm2d(6), Conv2d(6, 8, 1), Conv2d(6, 6, 3, padding=1)
    x = torch.randn(2, 6, 7, 9).contiguous(memory_format=torch.channels_last)
    r = torch.randn(2, 8, 7, 9).contiguous(memory_format=torch.channels_last)
    mods = [m.to(memory_format=torch.channels_last) for m in (bn, conv1, conv3)]
    mods64 = [nn.BatchNorm2d(6).double(), nn.Conv2d(6, 8, 1).double(), nn.Conv2d(6, 6, 3, padding=1).double()]
    for m, m64 in zip(mods, mods64):
        m64.load_state_dict({n: v.double() for n, v in m.state_dict().items()})

    def run(x, r, bn, conv1, conv3, fused):
        if fused and memory == "recompute":
            h = ops.bn_relu_conv(x, bn, conv3)
        else:
            h = conv3(torch.relu(bn(x)))
        return ops.conv_add(h, conv1, r) if fused else conv1(h) + r

    xb, rb = x.clone().requires_grad_(), r.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(xb, rb, *mods, fused=True)
    x64, r64 = x.double().requires_grad_(), r.double().requires_grad_()
    want = run(x64, r64, *mods64, fused=False)
    assert rel_err(out, want) < 3e-2 and len(calls) == 0
    g = torch.randn(out.shape, dtype=torch.float64)
    got = torch.autograd.grad(out, [xb, rb] + [p for m in mods for p in m.parameters()], g.bfloat16())
    exp = torch.autograd.grad(want, [x64, r64] + [p for m in mods64 for p in m.parameters()], g)
    assert len(calls) == 2
    for a, b in zip(got, exp):
        assert rel_err(a, b) < 5e-2


@needs_native
def test_one_thread_and_many_agree():
    """Per-thread accumulators, summed once: the thread count changes only float rounding."""
    x, grad, weight = _inputs((3, 8, 6, 20, 12, 3), torch.bfloat16, torch.channels_last, seed=8)
    one = in_threads(1, lambda: torch.ops.fasthg.conv2d_backward(grad, x, weight, True))
    many = torch.ops.fasthg.conv2d_backward(grad, x, weight, True)
    want = _reference(x, grad, weight)
    for a, b, ref in zip(one, many, want):
        assert rel_err(a, ref) < TOLS[torch.bfloat16] and rel_err(b, ref) < TOLS[torch.bfloat16]
        assert rel_err(a, b) < 1e-2
