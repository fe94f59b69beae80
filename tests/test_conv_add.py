"""fasthg.ops.conv_add: conv(x) + residual, the add in oneDNN's convolution epilogue on the CPU
(channels_last, float32 or bf16 autocast), against a float64 reference; the composition
elsewhere."""
import copy
import importlib

import pytest
import torch
from torch import nn

from conftest import rel_err
from fasthg import ops

conv_add_module = importlib.import_module("fasthg.ops.conv_add")
LAYOUTS = [torch.contiguous_format, torch.channels_last]
# (in, out, kernel, stride, padding, groups, bias) and an odd input size
CONVS = [(8, 16, 1, 1, 0, 1, True), (6, 5, 3, 1, 1, 1, True), (4, 6, 3, 2, 1, 2, False), (3, 7, 1, 1, 0, 1, False)]
TOLS = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def make(cfg, layout, seed):
    cin, cout, k, s, p, groups, bias = cfg
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, s, p, groups=groups, bias=bias)
    with torch.no_grad():
        for t in conv.parameters():
            t.copy_(torch.randn(t.shape, generator=g) * 0.3)
    conv = conv.to(memory_format=layout)
    x = torch.randn(2, cin, 7, 9, generator=g).contiguous(memory_format=layout)
    ho, wo = (7 + 2 * p - k) // s + 1, (9 + 2 * p - k) // s + 1
    r = torch.randn(2, cout, ho, wo, generator=g).contiguous(memory_format=layout)
    return conv, x, r


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("cfg", CONVS, ids=str)
def test_values_and_gradients_against_float64(dtype, layout, cfg, poison):
    conv, x, r = make(cfg, layout, seed=len(str(cfg)))
    conv64 = nn.Conv2d(cfg[0], cfg[1], cfg[2], cfg[3], cfg[4], groups=cfg[5], bias=cfg[6]).double()
    conv64.load_state_dict({k: v.double() for k, v in conv.state_dict().items()})
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        xd, rd = x.to(dtype).requires_grad_(), r.to(dtype).requires_grad_()
        assert conv_add_module.fuses(xd, conv, rd) == (layout == torch.channels_last
                                                        and dtype in conv_add_module._FUSED_DTYPES)
        out = ops.conv_add(xd, conv, rd)
    x64, r64 = xd.detach().double().requires_grad_(), rd.detach().double().requires_grad_()
    ref = conv64(x64) + r64
    assert out.dtype == dtype and out.is_contiguous(memory_format=layout) and not out.isnan().any()
    assert rel_err(out, ref) < TOLS[dtype]
    g = torch.randn(out.shape, dtype=torch.float64)
    params = list(conv.parameters())
    got = torch.autograd.grad(out, [xd, rd] + params, g.to(dtype).contiguous(memory_format=layout))
    want = torch.autograd.grad(ref, [x64, r64] + list(conv64.parameters()), g.to(dtype).double())
    for a, b, t in zip(got, want, [xd, rd] + params):
        assert a.dtype == t.dtype and not a.isnan().any()
        assert rel_err(a, b) < TOLS[dtype]


def test_falls_back_to_the_composition(monkeypatch):
    """eager backend, NCHW, a residual that broadcasts or has another dtype, float64, a padding
    mode other than zeros: conv(x) + residual as written, never the fused op."""
    monkeypatch.setattr(conv_add_module._ConvAdd, "apply", lambda *a: pytest.fail("fused"))
    conv, x, r = make(CONVS[0], torch.channels_last, 0)
    cases = [(x, conv, r, "eager"), (x.contiguous(), conv, r, "auto"), (x, conv, r[:, :, :1], "auto"),
             (x, conv, r.double(), "auto"), (x.double(), copy.deepcopy(conv).double(), r.double(), "auto"),
             (x, nn.Conv2d(8, 16, 3, padding=1, padding_mode="reflect"), r, "auto")]
    for xi, ci, ri, backend in cases:
        torch.testing.assert_close(ops.conv_add(xi, ci, ri, backend=backend), ci(xi) + ri)


def test_bf16_falls_back_where_onednn_lacks_it(monkeypatch):
    """On CPUs without oneDNN's native bf16 (AVX2-only), bf16 under autocast is the composition."""
    monkeypatch.setattr(conv_add_module, "_FUSED_DTYPES", (torch.float32,))
    monkeypatch.setattr(conv_add_module._ConvAdd, "apply", lambda *a: pytest.fail("fused"))
    conv, x, r = make(CONVS[0], torch.channels_last, 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xb, rb = x.bfloat16(), r.bfloat16()
        assert not conv_add_module.fuses(xb, conv, rb)
        torch.testing.assert_close(ops.conv_add(xb, conv, rb), conv(xb) + rb)


def test_bad_backend_is_a_clear_error():
    conv, x, r = make(CONVS[0], torch.channels_last, 0)
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.conv_add(x, conv, r, backend="fast")
