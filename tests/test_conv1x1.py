"""fasthg.ops.conv1x1.bn_relu_conv1x1 against the float64 eager reference
conv1x1(relu(bn(x))) (fasthg.ops.reference.bn_relu_conv1x1): the native CPU unit
(csrc/cpu/conv1x1.cpp) with each of its GEMM kernels, and Triton's (kernels/conv1x1.py) on the
CPU under the Triton interpreter and, marked cuda, on a GPU."""
import functools
import os
import subprocess
import sys

import pytest
import torch

from conftest import HAS_CUDA, TOL, rel_err, under_gemm_kernels
from fasthg.ops import _backend, conv1x1, reference
from fasthg.ops.conv1x1 import bn_relu_conv1x1

HAS_TRITON = _backend.triton_available()
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
needs_native = pytest.mark.skipif(not conv1x1.native_available(), reason="the extension is not built")
# (device, backend) pairs: the native unit is the CPU's; Triton runs interpreted on the CPU.
TARGETS = [pytest.param(("cpu", "native"), marks=needs_native, id="cpu-native"),
           pytest.param(("cpu", "triton"), marks=needs_triton, id="cpu-triton"),
           pytest.param(("cuda", "triton"), marks=[pytest.mark.cuda, needs_triton], id="cuda-triton")]

# (N, C, H, W, Cout): odd channel counts; N*H*W = 70 and 144 are not multiples of the 64-row
# tile; 70 input and 65 output channels span two 64-channel tiles, each with a partial one.
SHAPES = [(2, 3, 5, 7, 7), (1, 5, 3, 3, 9), (2, 17, 5, 7, 9), (2, 70, 9, 8, 65)]
LAYOUTS = [torch.contiguous_format, torch.channels_last]
EPS = 1e-5


def dtypes(device, backend):
    """bfloat16 everywhere but in the Triton interpreter (it has none)."""
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" or backend == "native" else [])


def op_of(backend):
    return functools.partial(bn_relu_conv1x1, backend=backend)


def make_inputs(shape, dtype, device, layout, seed=0):
    """x (with a constant channel: zero variance, and one that the BN makes all negative, so
    the ReLU stops every gradient there), its batch statistics and the parameters, float64
    on the CPU for the reference and as the op takes them."""
    n, c, h, w, cout = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64) * 2 + 0.3
    x[:, 0] = 1.5
    bn_w = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    bn_b = torch.randn(c, generator=g, dtype=torch.float64)
    if c > 1:
        bn_b[1] = -50.0
    conv_w = torch.randn(cout, c, 1, 1, generator=g, dtype=torch.float64) / c ** 0.5
    conv_b = torch.randn(cout, generator=g, dtype=torch.float64)
    x = x.to(dtype).double()  # the reference sees the rounded values
    conv_w = conv_w.to(dtype).double()
    mean = x.mean((0, 2, 3))
    invstd = torch.rsqrt(x.var((0, 2, 3), unbiased=False) + EPS)
    gy = torch.randn(n, cout, h, w, generator=g, dtype=torch.float64).to(dtype).double()
    ref = dict(x=x, mean=mean, invstd=invstd, bn_w=bn_w, bn_b=bn_b, conv_w=conv_w, conv_b=conv_b, gy=gy)
    p = torch.float64 if dtype == torch.float64 else torch.float32
    op = {k: v.to(device=device, dtype=dtype if k in ("x", "gy", "conv_w") else p) for k, v in ref.items()}
    op["x"] = op["x"].contiguous(memory_format=layout)
    op["gy"] = op["gy"].contiguous(memory_format=layout)
    return ref, op


LEAVES = ("x", "bn_w", "bn_b", "conv_w", "conv_b")


def run(t, training, out_stats=True, fn=bn_relu_conv1x1):
    """Outputs and the gradients of every differentiable input."""
    leaves = {k: t[k].clone().requires_grad_(True) for k in LEAVES}
    out = fn(leaves["x"], t["mean"], t["invstd"], leaves["bn_w"], leaves["bn_b"], leaves["conv_w"], leaves["conv_b"],
             training, out_stats)
    y = out[0] if out_stats else out
    grads = torch.autograd.grad(y, [leaves[k] for k in LEAVES], t["gy"])
    return (out if out_stats else (y,)), dict(zip(LEAVES, grads))


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_outputs_statistics_and_every_gradient_match_float64(target, training, layout, shape, poison):
    device, backend = target
    if shape == SHAPES[-1] and device == "cpu" and backend == "triton" and layout != torch.channels_last:
        pytest.skip("the two-tile shape runs channels_last only in the interpreter: it is slow there")
    for dtype in dtypes(device, backend):
        ref, t = make_inputs(shape, dtype, device, layout)
        (y, s, s2), grads = run(t, training, fn=op_of(backend))
        (ry, rs, rs2), rgrads = run(ref, training, fn=reference.bn_relu_conv1x1)
        tol = TOL[dtype]
        assert y.dtype == dtype and y.shape == ry.shape and y.is_contiguous(memory_format=layout)
        assert s.dtype == s2.dtype == torch.float32 and not s.requires_grad
        for name, out, want in (("y", y, ry), ("sum", s, rs), ("sum of squares", s2, rs2)):
            assert rel_err(out, want) < tol, (dtype, name, rel_err(out, want))
        for k in LEAVES:
            assert grads[k].dtype == t[k].dtype and grads[k].shape == t[k].shape
            assert rel_err(grads[k], rgrads[k]) < tol, (dtype, k, rel_err(grads[k], rgrads[k]))
        assert grads["x"].is_contiguous(memory_format=layout)
        assert torch.isfinite(grads["x"]).all()


@pytest.mark.parametrize("target", TARGETS)
def test_without_stats_or_bias(target, poison):
    device, backend = target
    ref, t = make_inputs(SHAPES[2], torch.float32, device, torch.channels_last)
    y = bn_relu_conv1x1(t["x"], t["mean"], t["invstd"], t["bn_w"], t["bn_b"], t["conv_w"], None, training=False,
                        backend=backend)
    want = reference.bn_relu_conv1x1(ref["x"], ref["mean"], ref["invstd"], ref["bn_w"], ref["bn_b"], ref["conv_w"],
                                     None, training=False)
    assert isinstance(y, torch.Tensor) and rel_err(y, want) < TOL[torch.float32]
    w = t["conv_w"].clone().requires_grad_(True)
    out = bn_relu_conv1x1(t["x"], t["mean"], t["invstd"], t["bn_w"], t["bn_b"], w, None, backend=backend)
    assert torch.autograd.grad(out, w, t["gy"])[0].shape == w.shape


@pytest.mark.parametrize("target", TARGETS)
def test_float64_runs_at_float64_precision(target):
    device, backend = target
    ref, t = make_inputs(SHAPES[1], torch.float64, device, torch.channels_last)
    (y, s, s2), grads = run(t, True, fn=op_of(backend))
    (ry, rs, rs2), rgrads = run(ref, True, fn=reference.bn_relu_conv1x1)
    assert s.dtype == torch.float64
    for out, want in [(y, ry), (s, rs), (s2, rs2)] + [(grads[k], rgrads[k]) for k in LEAVES]:
        assert rel_err(out, want) < 1e-12


@pytest.mark.parametrize("backend", [pytest.param("native", marks=needs_native),
                                     pytest.param("triton", marks=[needs_triton, pytest.mark.slow])])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_float64(training, backend):
    """Numerical against analytic gradients; in training the statistics are x's, recomputed
    from every perturbed x (the op treats them as such, without a gradient of their own)."""
    device = "cuda" if HAS_CUDA and backend == "triton" else "cpu"
    _, t = make_inputs((2, 3, 2, 3, 5), torch.float64, device, torch.channels_last)

    def f(x, bn_w, bn_b, conv_w, conv_b):
        xd = x.detach()
        mean = xd.mean((0, 2, 3)) if training else t["mean"]
        invstd = torch.rsqrt(xd.var((0, 2, 3), unbiased=False) + EPS) if training else t["invstd"]
        return bn_relu_conv1x1(x, mean, invstd, bn_w, bn_b, conv_w, conv_b, training, backend=backend)

    leaves = [t[k].clone().requires_grad_(True) for k in LEAVES]
    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


@needs_triton
def test_int64_offsets_give_the_same_results(monkeypatch):
    """No tensor here is 2^30 elements: lower the limit so that every launch takes int64
    offsets, and compare bit for bit."""
    from fasthg.kernels import _index

    _, t = make_inputs(SHAPES[2], torch.float32, "cpu", torch.channels_last)
    fn = op_of("triton")
    narrow = run(t, True, fn=fn)
    with monkeypatch.context() as m:
        m.setattr(_index, "INT32_LIMIT", 1)
        wide = run(t, True, fn=fn)
    for a, b in zip(narrow[0], wide[0]):
        assert torch.equal(a, b)
    for k in LEAVES:
        assert torch.equal(narrow[1][k], wide[1][k])


@pytest.mark.parametrize("target", TARGETS[:2])
def test_deterministic(target):
    """Partials are summed in a fixed order: two runs agree bit for bit."""
    _, t = make_inputs(SHAPES[3], torch.float32, "cpu", torch.channels_last)
    fn = op_of(target[1])
    first, again = run(t, True, fn=fn), run(t, True, fn=fn)
    assert all(torch.equal(a, b) for a, b in zip(first[0], again[0]))
    assert all(torch.equal(first[1][k], again[1][k]) for k in LEAVES)


@pytest.mark.parametrize("target", TARGETS[:2])
def test_nan_in_x_reaches_y_as_relu_lets_it(target):
    _, t = make_inputs(SHAPES[0], torch.float32, "cpu", torch.channels_last)
    x = t["x"].clone()
    x[0, 2, 1, 1] = float("nan")
    y = bn_relu_conv1x1(x, t["mean"], t["invstd"], t["bn_w"], t["bn_b"], t["conv_w"], t["conv_b"], False,
                        backend=target[1])
    assert torch.isnan(y[0, :, 1, 1]).all() and torch.isfinite(y[1]).all()


@pytest.mark.parametrize("target", TARGETS[:2])
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_custom_ops_pass_opcheck(target, layout):
    forward, backward = ((conv1x1._native_forward_op, conv1x1._native_backward_op) if target[1] == "native"
                         else (conv1x1._forward_op, conv1x1._backward_op))
    _, t = make_inputs(SHAPES[0], torch.float32, "cpu", layout)
    args = (t["x"], t["mean"], t["invstd"], t["bn_w"], t["bn_b"], t["conv_w"], t["conv_b"])
    for training, out_stats in ((True, True), (False, False)):
        torch.library.opcheck(forward, (*args, training, out_stats))
    torch.library.opcheck(backward, (t["gy"], *args[:6], True))
    if target[1] == "native":  # (with a skip branch's gradient)
        torch.library.opcheck(backward, (t["gy"], *args[:6], True, t["x"].clone()))


def test_bad_input_is_refused_naming_the_argument():
    _, t = make_inputs(SHAPES[0], torch.float32, "cpu", torch.channels_last)
    good = dict(x=t["x"], mean=t["mean"], invstd=t["invstd"], bn_weight=t["bn_w"], bn_bias=t["bn_b"],
                conv_weight=t["conv_w"], conv_bias=t["conv_b"])
    cases = [
        ("x", t["x"][0], "`x` must be a 4-D"),
        ("x", t["x"].to(torch.int32), "`x` must be float32"),
        ("x", t["x"][:0], "`x` must not be empty"),
        ("mean", t["mean"][:2], r"`mean` must be a tensor of shape \(3,\)"),
        ("bn_weight", None, "`bn_weight` must be a tensor"),
        ("conv_weight", torch.randn(7, 3, 3, 3), r"`conv_weight` must be a \[Cout, 3, 1, 1\]"),
        ("conv_weight", torch.randn(7, 4, 1, 1), r"`conv_weight` must be a \[Cout, 3, 1, 1\]"),
        ("conv_bias", torch.randn(6), r"`conv_bias` must be None or a tensor of shape \(7,\)"),
        ("invstd", t["invstd"].to(torch.int64), "`invstd` must be floating point"),
    ]
    for name, value, message in cases:
        with pytest.raises(ValueError, match=message):
            bn_relu_conv1x1(**{**good, name: value})
    if HAS_TRITON:
        with pytest.raises(ValueError, match="bfloat16 `x` needs a CUDA device"):
            bn_relu_conv1x1(**{**good, "x": t["x"].bfloat16()}, backend="triton")
    with pytest.raises(ValueError, match="`backend` must be one of"):
        bn_relu_conv1x1(**good, backend="eager")


@needs_native
def test_native_kernels_refuse_bad_input_naming_the_argument():
    """The C++ ops' own checks (what a direct torch.ops call meets)."""
    _, t = make_inputs(SHAPES[0], torch.float32, "cpu", torch.channels_last)
    args = [t["x"], t["mean"], t["invstd"], t["bn_w"], t["bn_b"], t["conv_w"], t["conv_b"], True, True]
    cases = [(5, torch.randn(7, 4, 1, 1), "`conv_weight` must be"), (5, t["conv_w"].double(), "`conv_weight` must be"),
             (6, torch.randn(6), "`conv_bias` must be"), (1, t["mean"].double(), "`mean` must be")]
    for i, value, message in cases:
        with pytest.raises(RuntimeError, match=message):
            torch.ops.fasthg.bn_relu_conv1x1_forward(*args[:i], value, *args[i + 1:])
    with pytest.raises(RuntimeError, match="`grad_y` must be"):
        torch.ops.fasthg.bn_relu_conv1x1_backward(t["gy"][:, :3], *args[:6], True)


@needs_native
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_native_tiles_and_k_chunks(layout, poison):
    """Two tiles of pixels (the second a partial row block), 260 input channels (three chunks of
    the GEMM's k loop, the last of 4) and 33 output channels (a partial column panel)."""
    for dtype in (torch.float32, torch.bfloat16):
        ref, t = make_inputs((1, 260, 5, 41, 33), dtype, "cpu", layout)
        (y, s, s2), grads = run(t, True, fn=op_of("native"))
        (ry, rs, rs2), rgrads = run(ref, True, fn=reference.bn_relu_conv1x1)
        for name, out, want in [("y", y, ry), ("sum", s, rs), ("sum_sq", s2, rs2)] + [(k, grads[k], rgrads[k])
                                                                                     for k in LEAVES]:
            assert rel_err(out, want) < TOL[dtype], (dtype, name, rel_err(out, want))


@needs_native
def test_every_native_gemm_kernel_agrees():
    """FASTHG_GEMM narrows the CPU's GEMM kernel (read once per process): avx2 and the plain
    loops give what the widest one does, to float32 rounding, against the float64 reference."""
    script = (
        "import torch, sys; sys.path.insert(0, 'tests'); import test_conv1x1 as t; from conftest import rel_err\n"
        "ref, op = t.make_inputs((2, 70, 9, 8, 65), torch.float32, 'cpu', torch.channels_last)\n"
        "(y, s, s2), g = t.run(op, True, fn=t.op_of('native'))\n"
        "(ry, rs, rs2), rg = t.run(ref, True, fn=t.reference.bn_relu_conv1x1)\n"
        "errs = [rel_err(y, ry), rel_err(s, rs)] + [rel_err(g[k], rg[k]) for k in t.LEAVES]\n"
        "print(torch.ops.fasthg.cpu_gemm_kernel(torch.float32), max(errs))\n")
    for kernel, (name, err) in under_gemm_kernels(script).items():
        assert name in (kernel, "plain") and float(err) < TOL[torch.float32], (name, err)


# Even channel counts, which bfloat16 runs on AMX where the CPU has it (csrc/cpu/brgemm_bf16.h):
# a partial tile of odd rows (the weight gradient's K padded to even), two tiles with a
# partial second, 96 input channels (a partial column block of 64 in the B operands).
EVEN_SHAPES = [(1, 6, 3, 5, 4), (1, 96, 17, 13, 16), (2, 64, 13, 11, 48)]


@needs_native
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", EVEN_SHAPES, ids=str)
def test_native_bfloat16_with_even_channels(shape, training, layout, poison):
    ref, t = make_inputs(shape, torch.bfloat16, "cpu", layout)
    (y, s, s2), grads = run(t, training, fn=op_of("native"))
    (ry, rs, rs2), rgrads = run(ref, training, fn=reference.bn_relu_conv1x1)
    for name, out, want in [("y", y, ry), ("sum", s, rs), ("sum_sq", s2, rs2)] + [(k, grads[k], rgrads[k])
                                                                                 for k in LEAVES]:
        assert rel_err(out, want) < TOL[torch.bfloat16], (name, rel_err(out, want))
    assert y.is_contiguous(memory_format=layout) and grads["x"].is_contiguous(memory_format=layout)


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [EVEN_SHAPES[1], SHAPES[2]], ids=["even", "odd"])
def test_native_float32_weight_gets_a_float32_gradient(shape, dtype, poison):
    """A float32 conv_weight (a parameter under autocast) is cast inside the native kernels (AMX
    for bf16 at even channels, the FMA GEMMs otherwise): y as with the weight cast first, and
    its gradient in float32 from the float sums, which rounded to x's dtype is the gradient of
    the cast weight, and is not itself rounded so."""
    ref, t = make_inputs(shape, dtype, "cpu", torch.channels_last)
    wide = dict(t, conv_w=t["conv_w"].float())
    (y32, s32, _), g32 = run(wide, True, fn=op_of("native"))
    (y16, s16, _), g16 = run(t, True, fn=op_of("native"))
    (ry, _, _), rg = run(ref, True, fn=reference.bn_relu_conv1x1)
    assert torch.equal(y32, y16) and torch.equal(s32, s16)
    assert g32["conv_w"].dtype == torch.float32 and g16["conv_w"].dtype == dtype
    assert torch.equal(g32["conv_w"].to(dtype), g16["conv_w"])
    assert not torch.equal(g32["conv_w"].to(dtype).float(), g32["conv_w"])
    for k in LEAVES:
        assert rel_err(g32[k], rg[k]) < TOL[dtype], (k, rel_err(g32[k], rg[k]))
    torch.library.opcheck(conv1x1._native_forward_op, (t["x"], t["mean"], t["invstd"], t["bn_w"], t["bn_b"],
                                                       wide["conv_w"], t["conv_b"], True, True))
    torch.library.opcheck(conv1x1._native_backward_op, (t["gy"], t["x"], t["mean"], t["invstd"], t["bn_w"], t["bn_b"],
                                                        wide["conv_w"], True))


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", [SHAPES[2], EVEN_SHAPES[1]], ids=["odd", "even"])
def test_with_skip_adds_the_branch_gradient_to_grad_x(target, layout, shape, poison):
    """bn_relu_conv1x1_with_skip: y, the statistics and skip (x's values) as the unit's; grad_x
    the float64 composition's plus the skip branch's gradient (the native AMX path adds it in its
    grad_x pass, before the rounding), the parameters' gradients the unit's; a loss on skip alone
    gives grad_x the branch's gradient as it is."""
    device, backend = target
    for dtype in dtypes(device, backend):
        ref, t = make_inputs(shape, dtype, device, layout)
        g = torch.Generator().manual_seed(3)
        gs64 = torch.randn(ref["x"].shape, generator=g, dtype=torch.float64).to(dtype).double()
        gs = gs64.to(device=device, dtype=dtype).contiguous(memory_format=layout)
        leaves = {k: t[k].clone().requires_grad_(True) for k in LEAVES}
        args = (leaves["x"], t["mean"], t["invstd"], leaves["bn_w"], leaves["bn_b"], leaves["conv_w"], leaves["conv_b"])
        (y, s, s2), skip = conv1x1.bn_relu_conv1x1_with_skip(*args, True, True, backend=backend)
        grads = dict(zip(LEAVES, torch.autograd.grad((y, skip), list(leaves.values()), (t["gy"], gs))))
        (uy, us, us2), ugrads = run(t, True, fn=op_of(backend))
        _, rgrads = run(ref, True, fn=reference.bn_relu_conv1x1)
        assert torch.equal(y, uy) and torch.equal(s, us) and torch.equal(s2, us2) and torch.equal(skip, t["x"])
        for k in LEAVES[1:]:
            assert torch.equal(grads[k], ugrads[k]), k
        assert not grads["x"].isnan().any() and grads["x"].is_contiguous(memory_format=layout)
        assert rel_err(grads["x"], rgrads["x"] + gs64) < TOL[dtype], (dtype, rel_err(grads["x"], rgrads["x"] + gs64))
        gx, = torch.autograd.grad(conv1x1.bn_relu_conv1x1_with_skip(*args, backend=backend)[1], leaves["x"], gs)
        assert torch.equal(gx, gs)


@needs_native
def test_native_backward_refuses_a_bad_grad_skip():
    _, t = make_inputs(SHAPES[0], torch.float32, "cpu", torch.channels_last)
    args = (t["gy"], t["x"], t["mean"], t["invstd"], t["bn_w"], t["bn_b"], t["conv_w"], True)
    for bad in (t["x"][:, :2], t["x"].double()):
        with pytest.raises(RuntimeError, match="bn_relu_conv1x1_backward: `grad_skip` must match `x`"):
            conv1x1._native_backward_op(*args, bad)


@needs_native
def test_native_rejects_a_weight_of_another_dtype():
    _, t = make_inputs(SHAPES[2], torch.bfloat16, "cpu", torch.channels_last)
    with pytest.raises(RuntimeError, match="`conv_weight` must be BFloat16 .like `x`. or Float"):
        conv1x1._native_forward_op(t["x"], t["mean"], t["invstd"], t["bn_w"], t["bn_b"], t["conv_w"].half(),
                                   t["conv_b"], True, False)


@needs_native
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_native_bfloat16_ops_pass_opcheck(layout):
    """The bf16 ops at even channel counts (the AMX kernels where the CPU has them)."""
    _, t = make_inputs(EVEN_SHAPES[1], torch.bfloat16, "cpu", layout)
    args = (t["x"], t["mean"], t["invstd"], t["bn_w"], t["bn_b"], t["conv_w"], t["conv_b"])
    for training, out_stats in ((True, True), (False, False)):
        torch.library.opcheck(conv1x1._native_forward_op, (*args, training, out_stats))
        torch.library.opcheck(conv1x1._native_backward_op, (t["gy"], *args[:6], training))
        torch.library.opcheck(conv1x1._native_backward_op, (t["gy"], *args[:6], training, t["x"].clone()))


@needs_native
def test_bfloat16_gemm_paths_agree(tmp_path):
    """bfloat16 on AMX (where the CPU has it) and on the FMA kernels (FASTHG_GEMM=avx512) give
    the same results to bfloat16 rounding, both within tolerance of the float64 reference."""
    script = (
        "import torch, sys; sys.path.insert(0, 'tests'); import test_conv1x1 as t; from conftest import rel_err\n"
        "ref, op = t.make_inputs(t.EVEN_SHAPES[2], torch.bfloat16, 'cpu', torch.channels_last)\n"
        "(y, s, s2), g = t.run(op, True, fn=t.op_of('native'))\n"
        "(ry, rs, rs2), rg = t.run(ref, True, fn=t.reference.bn_relu_conv1x1)\n"
        "errs = [rel_err(y, ry), rel_err(s, rs)] + [rel_err(g[k], rg[k]) for k in t.LEAVES]\n"
        "torch.save([y, s, s2] + [g[k] for k in t.LEAVES], sys.argv[1])\n"
        "print(torch.ops.fasthg.cpu_gemm_kernel(torch.bfloat16), max(errs))\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    results = {}
    for kernel in ("", "avx512"):
        path = str(tmp_path / f"bf16-{kernel or 'default'}.pt")
        out = subprocess.run([sys.executable, "-c", script, path], cwd=root, capture_output=True, text=True,
                             env={**os.environ, "FASTHG_GEMM": kernel}, timeout=300)
        assert out.returncode == 0, out.stderr
        name, err = out.stdout.split()
        assert float(err) < TOL[torch.bfloat16], out.stdout
        results[name] = torch.load(path, weights_only=True)
    assert "avx512" in results or "avx2" in results or "plain" in results
    if "amx" in results:
        fma = next(v for k, v in results.items() if k != "amx")
        for a, b in zip(results["amx"], fma):
            assert rel_err(a.double(), b.double()) < 1e-2


@pytest.mark.parametrize("target", TARGETS[:2])
def test_the_benchmark_runs(target, tmp_path):
    """python -m fasthg.bench.conv1x1 (benchmarks/gpu_check.sh's case; on the CPU the native
    unit's), at a tiny shape: it runs, and its rows, table and chart are whole (timings here
    mean nothing)."""
    from fasthg.bench import conv1x1 as bench

    backend = target[1]
    dtypes = [torch.float32] + ([torch.bfloat16] if backend == "native" else [])
    rows = bench.run("cpu", levels=[4], units=((8, 4),), batch=1, repeats=1, warmup=1, out_dir=str(tmp_path),
                     backend=backend, dtypes=dtypes)
    assert {(r["mode"], r["backend"], r["dtype"]) for r in rows} == {
        (m, b, bench.dtype_name(d)) for m in ("forward", "forward+backward") for b in ("unfused", backend)
        for d in dtypes}
    assert all(r["median_ms"] > 0 and r["bytes"] > 0 for r in rows)
    assert (tmp_path / "conv1x1.md").read_text().count(f"| {backend} |") == 2 * len(dtypes)
    pytest.importorskip("matplotlib")
    assert (tmp_path / "conv1x1.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_torch_compile_traces_it_whole():
    """The custom ops' fake impls let torch.compile trace forward and backward without a
    graph break (aot_eager: the same kernels run, so results are equal)."""
    _, t = make_inputs(SHAPES[0], torch.float32, "cpu", torch.channels_last)
    compiled = torch.compile(bn_relu_conv1x1, backend="aot_eager", fullgraph=True)
    (want, *stats), grads = run(t, True)
    (got, *got_stats), got_grads = run(t, True, fn=compiled)
    assert torch.equal(got, want) and all(torch.equal(a, b) for a, b in zip(got_stats, stats))
    assert all(torch.allclose(got_grads[k], grads[k], rtol=1e-6, atol=0) for k in LEAVES)


def test_auto_routes_units_by_the_cpu_and_the_skip_branch(monkeypatch):
    monkeypatch.setenv("FASTHG_CPU_CONV1X1", "auto")
    monkeypatch.setattr(conv1x1, "_CPU_COMPUTES_BF16", True)
    assert conv1x1.cpu_unit_dtypes() == () and conv1x1.cpu_unit_dtypes(with_skip=True) == (torch.float32, torch.bfloat16)
    monkeypatch.setattr(conv1x1, "_CPU_COMPUTES_BF16", False)
    assert conv1x1.cpu_unit_dtypes() == conv1x1.cpu_unit_dtypes(with_skip=True) == (torch.float16, torch.bfloat16)
    monkeypatch.setenv("FASTHG_CPU_CONV1X1", "off")
    assert conv1x1.cpu_unit_dtypes(with_skip=True) == ()


@needs_native
def test_fasthg_info_names_the_gemm_kernel_and_the_routed_dtypes(monkeypatch):
    from fasthg.cli import info

    monkeypatch.setenv("FASTHG_CPU_CONV1X1", "off")
    unit = info.collect()["conv1x1_unit_cpu"]
    kernels = {"float32": torch.ops.fasthg.cpu_gemm_kernel(torch.float32),
               "bfloat16": torch.ops.fasthg.cpu_gemm_kernel(torch.bfloat16)}
    assert unit == {"gemm_kernel": kernels, "training_dtypes": [], "training_dtypes_with_skip": []}
    assert kernels["float32"] in ("avx512", "avx2", "plain") and kernels["bfloat16"] in ("amx", kernels["float32"])
    assert torch.ops.fasthg.cpu_gemm_kernel(torch.float64) == "plain"
    # odd channel counts keep bf16 on the FMA kernels (AMX's K runs in pairs)
    assert conv1x1.native_gemm_kernel(torch.bfloat16, 256, 128) == kernels["bfloat16"]
    assert conv1x1.native_gemm_kernel(torch.bfloat16, 255, 128) == kernels["float32"]
    assert conv1x1.native_gemm_kernel(torch.float32, 256, 128) == kernels["float32"]
    monkeypatch.setenv("FASTHG_CPU_CONV1X1", "all")
    text = info.render(info.collect())
    assert "train float32, float16, bfloat16, float64 in it (FASTHG_CPU_CONV1X1)" in text
    monkeypatch.setenv("FASTHG_CPU_CONV1X1", "auto")
    auto = info.collect()["conv1x1_unit_cpu"]
    # CPUs that compute bf16 route the units with a skip branch (bf16 and float32), the others bf16 and half
    assert set(auto["training_dtypes"]) <= set(auto["training_dtypes_with_skip"])
    assert "bfloat16" in auto["training_dtypes_with_skip"]
    monkeypatch.setattr(conv1x1, "_CPU_COMPUTES_BF16", True)
    assert ("train float32, bfloat16 in it where its input also feeds a residual branch, no dtype elsewhere"
            in info.render(info.collect()))
    monkeypatch.setenv("FASTHG_CPU_CONV1X1", "sometimes")
    with pytest.raises(ValueError, match="FASTHG_CPU_CONV1X1 must be one of"):
        info.collect()
