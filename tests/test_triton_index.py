"""The Triton kernels' index width (kernels/_index.py): offsets are int32 below 2^30 elements
and int64 from there on. No test tensor is that large, so these tests lower the limit and
check that both widths give the same results, and that the int64 flag really widens."""
import pytest
import torch
import triton
import triton.language as tl

from conftest import DEVICES
from fasthg import ops
from fasthg.kernels import _index

LAYOUTS = [torch.contiguous_format, torch.channels_last]


@triton.jit
def _pid_times_2_to_32(out_ptr, INT64: tl.constexpr):
    pid = _index.program_index(0, INT64)
    tl.store(out_ptr + tl.program_id(0), pid * 65536 * 65536)  # wraps to 0 in int32


@pytest.mark.parametrize("device", DEVICES)
def test_program_index_widens_only_when_asked(device):
    for int64, want in ((False, [0, 0, 0]), (True, [0, 2 ** 32, 2 ** 33])):
        out = torch.full((3,), -1, dtype=torch.int64, device=device)
        _pid_times_2_to_32[(3,)](out, INT64=int64)
        assert out.tolist() == want


def test_needs_int64_at_the_limit(monkeypatch):
    monkeypatch.setattr(_index, "INT32_LIMIT", 12)
    assert not _index.needs_int64(torch.empty(11), torch.empty(3))
    assert _index.needs_int64(torch.empty(2), torch.empty(3, 4))


def both_widths(fn, monkeypatch):
    """fn() with int32 offsets, then with every tensor taken as large (int64 offsets)."""
    narrow = fn()
    with monkeypatch.context() as m:
        m.setattr(_index, "INT32_LIMIT", 1)
        wide = fn()
    return narrow, wide


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_bn_relu_triton_same_with_int64_offsets(device, layout, monkeypatch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, 7, generator=g).to(device).contiguous(memory_format=layout)
    w, b = torch.rand(5, generator=g).to(device) + 0.5, torch.randn(5, generator=g).to(device)
    gy = torch.randn(2, 5, 6, 7, generator=g).to(device).contiguous(memory_format=layout)

    def run():
        xs, ws, bs = (t.clone().requires_grad_(True) for t in (x, w, b))
        rm, rv = torch.zeros(5, device=device), torch.ones(5, device=device)
        y = ops.bn_relu(xs, ws, bs, rm, rv, training=True, backend="triton")
        return (y, *torch.autograd.grad(y, (xs, ws, bs), gy), rm, rv)

    for narrow, wide in zip(*both_widths(run, monkeypatch)):
        assert torch.equal(narrow, wide)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("low_hw,hw", [((4, 5), (8, 10)), ((5, 7), (9, 11))], ids=["2x", "non-integer"])
def test_upsample_add_triton_same_with_int64_offsets(device, layout, low_hw, hw, monkeypatch):
    g = torch.Generator().manual_seed(0)
    low = torch.randn(2, 3, *low_hw, generator=g).to(device).contiguous(memory_format=layout)
    skip = torch.randn(2, 3, *hw, generator=g).to(device).contiguous(memory_format=layout)
    grad = torch.randn(2, 3, *hw, generator=g).to(device).contiguous(memory_format=layout)

    def run():
        lo = low.clone().requires_grad_(True)
        out = ops.upsample_add(lo, skip, backend="triton")
        return out, *torch.autograd.grad(out, lo, grad)

    for narrow, wide in zip(*both_widths(run, monkeypatch)):
        assert torch.equal(narrow, wide)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_max_pool2x2_triton_same_with_int64_offsets(device, layout, monkeypatch):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-2, 3, (2, 3, 7, 6), generator=g).float().to(device).contiguous(memory_format=layout)
    grad = torch.randn(2, 3, 3, 3, generator=g).to(device).contiguous(memory_format=layout)

    def run():
        xs = x.clone().requires_grad_(True)
        y = ops.max_pool2x2(xs, backend="triton")
        return y, *torch.autograd.grad(y, xs, grad)

    for narrow, wide in zip(*both_widths(run, monkeypatch)):
        assert torch.equal(narrow, wide)
