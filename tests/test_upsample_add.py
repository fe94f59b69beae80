"""fasthg.ops.upsample_add on every backend against the float64 eager reference."""
import pytest
import torch
import torch.nn.functional as F

from conftest import DTYPES, TOL, device_backend_params, rel_err, skip_unsupported
from fasthg import ops
from fasthg.ops import reference

# (low shape, skip H, W): the hourglass's exact 2x, odd sizes, 3x, non-integer, shrinking, 1x.
CASES = [
    ((2, 3, 4, 5), (8, 10)),
    ((1, 5, 3, 7), (6, 14)),
    ((2, 4, 1, 1), (2, 2)),
    ((1, 3, 3, 2), (9, 6)),
    ((1, 2, 5, 7), (9, 11)),
    ((2, 3, 6, 8), (3, 5)),
    ((1, 4, 4, 4), (4, 4)),
]
CASE_IDS = ["2x", "2x-odd", "1px", "3x", "non-integer", "shrink", "same"]
LAYOUTS = [torch.contiguous_format, torch.channels_last]


def make(low_shape, hw, dtype, device, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(low_shape, generator=g, dtype=torch.float64)
    skip = torch.randn(low_shape[:2] + hw, generator=g, dtype=torch.float64)
    cast = lambda t: t.to(device=device, dtype=dtype).contiguous(memory_format=layout)  # noqa: E731
    return low, skip, cast(low), cast(skip)


@pytest.mark.parametrize("device,backend", device_backend_params(op="upsample_add"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("low_shape,hw", CASES, ids=CASE_IDS)
def test_forward_backward_match_float64_reference(device, backend, dtype, layout, low_shape, hw, poison):
    skip_unsupported(device, backend, dtype)
    low64, skip64, low, skip = make(low_shape, hw, dtype, device, layout)
    low.requires_grad_(True)
    skip.requires_grad_(True)
    out = ops.upsample_add(low, skip, backend=backend)
    assert out.shape == skip.shape and out.dtype == dtype and out.device == skip.device
    assert out.is_contiguous(memory_format=layout)
    assert not out.isnan().any()
    low64.requires_grad_(True)
    skip64.requires_grad_(True)
    ref = reference.upsample_add(low64, skip64)
    assert rel_err(out, ref) < TOL[dtype]

    grad = torch.randn(ref.shape, dtype=torch.float64)
    out.backward(grad.to(device=device, dtype=dtype).contiguous(memory_format=layout))
    ref.backward(grad)
    assert not low.grad.isnan().any()
    assert rel_err(low.grad, low64.grad) < TOL[dtype]
    assert rel_err(skip.grad, skip64.grad) < TOL[dtype]


@pytest.mark.parametrize("device,backend", device_backend_params(op="upsample_add"))
def test_exact_on_integer_ratios(device, backend):
    # Forward is a copy plus one rounding, as in eager: equal bit for bit in float32.
    low = torch.randn(2, 3, 5, 6, device=device)
    skip = torch.randn(2, 3, 10, 12, device=device)
    torch.testing.assert_close(ops.upsample_add(low, skip, backend=backend),
                               skip + F.interpolate(low, scale_factor=2, mode="nearest"), rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", device_backend_params(include_eager=False, op="upsample_add"))
def test_non_contiguous_and_mixed_layouts(device, backend):
    low64 = torch.randn(2, 6, 8, 5, dtype=torch.float64)
    skip64 = torch.randn(2, 3, 10, 16, dtype=torch.float64)
    low = low64.to(device, torch.float32)[:, ::2].transpose(2, 3)  # strided view, 2x3x5x8
    skip = skip64.to(device, torch.float32).contiguous(memory_format=torch.channels_last)
    out = ops.upsample_add(low, skip, backend=backend)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(out, reference.upsample_add(low64[:, ::2].transpose(2, 3), skip64)) < 1e-6
    sliced = skip64.to(device, torch.float32)[..., 3:13]  # not contiguous in any format
    out = ops.upsample_add(low[..., :5, :5], sliced, backend=backend)
    assert rel_err(out, reference.upsample_add(low64[:, ::2].transpose(2, 3)[..., :5, :5], skip64[..., 3:13])) < 1e-6


def block_sums_2x(grad):
    """grad_low of the exact 2x case as the kernels add it: (g00 + g01) + (g10 + g11), in
    float for 16-bit grads, rounded once."""
    g = grad.float() if grad.dtype in (torch.float16, torch.bfloat16) else grad
    return ((g[..., 0::2, 0::2] + g[..., 0::2, 1::2]) + (g[..., 1::2, 0::2] + g[..., 1::2, 1::2])).to(grad.dtype)


# (low shape) at 2x: NCHW rows of 8 and 12 low values (vectors of 8 and a tail), NHWC 24
# and 13 channels; and float32 outputs of 8 MiB (forward) and grad_lows of 8 MiB (backward),
# which the CPU kernels write with streaming stores.
VECTOR_CASES = [pytest.param(shape, dtype, id=f"{name}-{str(dtype)[6:]}")
                for name, shape, dtypes in [("w8", (2, 3, 5, 8), DTYPES), ("w12-c24", (1, 24, 3, 12), DTYPES),
                                            ("c13", (2, 13, 4, 9), DTYPES), ("stream-fwd", (1, 32, 128, 128), [torch.float32]),
                                            ("stream-bwd", (1, 32, 256, 256), [torch.float32])]
                for dtype in dtypes]


@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("low_shape,dtype", VECTOR_CASES)
def test_native_cpu_vector_paths_are_exact(low_shape, dtype, layout, poison):
    """The CPU kernels' 8-wide paths (vec8.h), their scalar tails and their streaming stores
    (float32 only) give eager's forward bit for bit, and the backward's block sums added in
    the kernels' order, bit for bit."""
    if "native" not in ops.available("cpu", "upsample_add"):
        pytest.skip("native unavailable")
    n, c, h, w = low_shape
    mk = lambda *s: torch.randn(*s).to(dtype).contiguous(memory_format=layout)  # noqa: E731
    low, skip, grad = mk(n, c, h, w), mk(n, c, 2 * h, 2 * w), mk(n, c, 2 * h, 2 * w)
    out = torch.ops.fasthg.upsample_add(low, skip)
    assert out.is_contiguous(memory_format=layout)
    torch.testing.assert_close(out, skip + F.interpolate(low, scale_factor=2, mode="nearest"), rtol=0, atol=0)
    grad_low = torch.ops.fasthg.upsample_add_backward(grad, h, w)
    assert grad_low.is_contiguous(memory_format=layout)
    torch.testing.assert_close(grad_low, block_sums_2x(grad), rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", device_backend_params(include_eager=False, op="upsample_add"))
def test_grad_of_skip_is_grad_out_itself(device, backend):
    low = torch.randn(1, 2, 3, 3, device=device, requires_grad=True)
    skip = torch.randn(1, 2, 6, 6, device=device, requires_grad=True)
    seen = {}
    out = ops.upsample_add(low, skip, backend=backend)
    out.register_hook(lambda g: seen.setdefault("out", g))
    skip.register_hook(lambda g: seen.setdefault("skip", g))
    out.sum().backward()
    assert seen["skip"].data_ptr() == seen["out"].data_ptr()


@pytest.mark.parametrize("device,backend", device_backend_params(include_eager=False, op="upsample_add"))
@pytest.mark.parametrize("low_shape,hw", [CASES[0], CASES[3], CASES[4], CASES[5]], ids=["2x", "3x", "non-integer", "shrink"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_gradcheck_float64(device, backend, low_shape, hw, layout):
    _, _, low, skip = make(low_shape, hw, torch.float64, device, layout)
    low.requires_grad_(True)
    skip.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: ops.upsample_add(a, b, backend=backend), (low, skip))


def _opcheck_ops(backend):
    if backend == "native":
        return torch.ops.fasthg.upsample_add, torch.ops.fasthg.upsample_add_backward
    return torch.ops.fasthg.upsample_add_triton, torch.ops.fasthg.upsample_add_backward_triton


@pytest.mark.parametrize("device,backend", device_backend_params(include_eager=False, op="upsample_add"))
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("low_shape,hw", [CASES[0], CASES[4]], ids=["2x", "non-integer"])
def test_opcheck(device, backend, layout, low_shape, hw):
    fwd, bwd = _opcheck_ops(backend)
    _, _, low, skip = make(low_shape, hw, torch.float32, device, layout)
    torch.library.opcheck(fwd, (low.requires_grad_(True), skip.requires_grad_(True)))
    grad = torch.randn_like(skip)
    torch.library.opcheck(bwd, (grad, low.shape[2], low.shape[3]))


@pytest.mark.parametrize("device,backend", device_backend_params(include_eager=False, op="upsample_add"))
def test_torch_compile_fullgraph(device, backend):
    torch._dynamo.reset()

    def f(low, skip):
        return ops.upsample_add(torch.relu(low), skip * 2, backend=backend).square().sum()

    low = torch.randn(2, 3, 4, 4, device=device, requires_grad=True)
    skip = torch.randn(2, 3, 8, 8, device=device, requires_grad=True)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = compiled(low, skip)
    out.backward()
    grads = low.grad.clone(), skip.grad.clone()
    low.grad = skip.grad = None
    f(low, skip).backward()
    torch.testing.assert_close(out, f(low, skip))
    torch.testing.assert_close(grads, (low.grad, skip.grad))


@pytest.mark.slow
def test_torch_compile_inductor_native():
    torch._dynamo.reset()
    low = torch.randn(2, 3, 4, 4)
    skip = torch.randn(2, 3, 8, 8)
    f = torch.compile(lambda a, b: ops.upsample_add(a + 1, b, backend="native") * 3, fullgraph=True)
    torch.testing.assert_close(f(low, skip), (reference.upsample_add(low + 1, skip)) * 3)


BAD = [
    ("low", lambda: (torch.randn(3, 4, 4), torch.randn(1, 3, 8, 8)), "4-D"),
    ("skip", lambda: (torch.randn(1, 3, 4, 4), torch.randn(1, 3, 8, 8, 1)), "4-D"),
    ("channel", lambda: (torch.randn(1, 3, 4, 4), torch.randn(1, 4, 8, 8)), "same batch and channel"),
    ("batch", lambda: (torch.randn(2, 3, 4, 4), torch.randn(1, 3, 8, 8)), "same batch and channel"),
    ("dtype", lambda: (torch.randn(1, 3, 4, 4).half(), torch.randn(1, 3, 8, 8)), "same dtype"),
    ("integer", lambda: (torch.ones(1, 3, 4, 4, dtype=torch.int32), torch.ones(1, 3, 8, 8, dtype=torch.int32)), "floating-point"),
    ("empty", lambda: (torch.randn(0, 3, 4, 4), torch.randn(0, 3, 8, 8)), "empty"),
    ("empty-hw", lambda: (torch.randn(1, 3, 0, 4), torch.randn(1, 3, 8, 8)), "empty"),
]


@pytest.mark.parametrize("backend", ["eager", "native", "triton", "auto"])
@pytest.mark.parametrize("what,inputs,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_clear_error(backend, what, inputs, message):
    low, skip = inputs()
    with pytest.raises(ValueError, match=message):
        ops.upsample_add(low, skip, backend=backend)


@pytest.mark.parametrize("what,inputs,message", BAD, ids=[b[0] for b in BAD])
def test_native_op_checks_its_arguments(what, inputs, message):
    low, skip = inputs()
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fasthg.upsample_add(low, skip)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.upsample_add(torch.randn(1, 1, 2, 2), torch.randn(1, 1, 4, 4), backend="cudnn")


@pytest.mark.cuda
def test_device_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="same device"):
        ops.upsample_add(torch.randn(1, 3, 4, 4), torch.randn(1, 3, 8, 8, device="cuda"))
    with pytest.raises(RuntimeError, match="same device"):
        torch.ops.fasthg.upsample_add(torch.randn(1, 3, 4, 4), torch.randn(1, 3, 8, 8, device="cuda"))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_hourglass_sizes(backend, dtype):
    # The real shapes (batch 16, 256 channels, 64x64 out), where indexing bugs hide.
    low = torch.randn(16, 256, 32, 32, device="cuda", dtype=dtype)
    skip = torch.randn(16, 256, 64, 64, device="cuda", dtype=dtype)
    for fmt in LAYOUTS:
        low, skip = low.contiguous(memory_format=fmt), skip.contiguous(memory_format=fmt)
        assert rel_err(ops.upsample_add(low, skip, backend=backend), reference.upsample_add(low.double(), skip.double())) < TOL[dtype]


@pytest.mark.parametrize("device,backend", device_backend_params(op="upsample_add"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("low_shape,hw", CASES, ids=CASE_IDS)
def test_inplace_matches_float64_reference(device, backend, dtype, layout, low_shape, hw):
    """upsample_add_ writes the sum into skip (returned), as the float64 reference; low untouched."""
    skip_unsupported(device, backend, dtype)
    low64, skip64, low, skip = make(low_shape, hw, dtype, device, layout)
    before, ptr = low.clone(), skip.data_ptr()
    with torch.no_grad():
        out = ops.upsample_add_(low, skip, backend=backend)
    assert out is skip and skip.data_ptr() == ptr and skip.is_contiguous(memory_format=layout)
    assert torch.equal(low, before)
    assert rel_err(skip, reference.upsample_add(low64, skip64)) < TOL[dtype]


@pytest.mark.parametrize("device,backend", device_backend_params(op="upsample_add"))
def test_inplace_into_a_strided_view(device, backend):
    """A skip that is not dense (a view with a step) is written through a copy: the view's
    elements hold the sum, the others are untouched."""
    base = torch.randn(2, 3, 8, 20, device=device)
    low = torch.randn(2, 3, 4, 5, device=device)
    original = base.clone()
    view = base[..., ::2]
    with torch.no_grad():
        ops.upsample_add_(low, view, backend=backend)
    assert rel_err(base[..., ::2], reference.upsample_add(low.double(), original[..., ::2].double())) < 1e-6
    assert torch.equal(base[..., 1::2], original[..., 1::2])


@pytest.mark.parametrize("device,backend", device_backend_params(include_eager=False, op="upsample_add"))
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_opcheck_inplace(device, backend, layout):
    op = torch.ops.fasthg.upsample_add_inplace if backend == "native" else torch.ops.fasthg.upsample_add_inplace_triton
    _, _, low, skip = make(*CASES[0], torch.float32, device, layout)
    torch.library.opcheck(op, (low, skip))


def test_inplace_bad_input_is_a_clear_error():
    low, skip = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="no autograd"):
        ops.upsample_add_(low.requires_grad_(), skip)
    shared = torch.randn(1, 3, 8, 8)
    with torch.no_grad(), pytest.raises(ValueError, match="share memory"):
        ops.upsample_add_(shared[..., :4, :4], shared)
    with pytest.raises(ValueError, match="same batch and channel"):
        ops.upsample_add_(torch.randn(1, 2, 4, 4), skip)
    with pytest.raises(RuntimeError, match="must be dense"):
        torch.ops.fasthg.upsample_add_inplace(torch.randn(1, 3, 4, 4), skip[..., ::2])
    with pytest.raises(RuntimeError, match="overlap"):  # a dense low inside skip (a strided one is copied first)
        torch.ops.fasthg.upsample_add_inplace(shared.view(-1)[:48].view(1, 3, 4, 4), shared)
