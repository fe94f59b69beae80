"""fasthg.ops.conv1x1.bn_relu_conv1x1 (Triton: kernels/conv1x1.py) against the float64 eager
reference conv1x1(relu(bn(x))) (fasthg.ops.reference.bn_relu_conv1x1), on the CPU under the
Triton interpreter and, marked cuda, on a GPU."""
import pytest
import torch

from conftest import DEVICES, HAS_CUDA, TOL, rel_err
from fasthg.kernels import _index
from fasthg.ops import reference
from fasthg.ops.conv1x1 import _backward_op, _forward_op, bn_relu_conv1x1

pytest.importorskip("triton")

# (N, C, H, W, Cout): odd channel counts; N*H*W = 70 and 144 are not multiples of the 64-row
# tile; 70 input and 65 output channels span two 64-channel tiles, each with a partial one.
SHAPES = [(2, 3, 5, 7, 7), (1, 5, 3, 3, 9), (2, 17, 5, 7, 9), (2, 70, 9, 8, 65)]
LAYOUTS = [torch.contiguous_format, torch.channels_last]
EPS = 1e-5


def dtypes(device):
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])


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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_outputs_statistics_and_every_gradient_match_float64(device, training, layout, shape, poison):
    if shape == SHAPES[-1] and device == "cpu" and layout != torch.channels_last:
        pytest.skip("the two-tile shape runs channels_last only in the interpreter: it is slow there")
    for dtype in dtypes(device):
        ref, t = make_inputs(shape, dtype, device, layout)
        (y, s, s2), grads = run(t, training)
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


@pytest.mark.parametrize("device", DEVICES)
def test_without_stats_or_bias(device, poison):
    ref, t = make_inputs(SHAPES[2], torch.float32, device, torch.channels_last)
    y = bn_relu_conv1x1(t["x"], t["mean"], t["invstd"], t["bn_w"], t["bn_b"], t["conv_w"], None, training=False)
    want = reference.bn_relu_conv1x1(ref["x"], ref["mean"], ref["invstd"], ref["bn_w"], ref["bn_b"], ref["conv_w"],
                                     None, training=False)
    assert isinstance(y, torch.Tensor) and rel_err(y, want) < TOL[torch.float32]
    w = t["conv_w"].clone().requires_grad_(True)
    out = bn_relu_conv1x1(t["x"], t["mean"], t["invstd"], t["bn_w"], t["bn_b"], w, None)
    assert torch.autograd.grad(out, w, t["gy"])[0].shape == w.shape


@pytest.mark.parametrize("device", DEVICES)
def test_float64_runs_at_float64_precision(device):
    ref, t = make_inputs(SHAPES[1], torch.float64, device, torch.channels_last)
    (y, s, s2), grads = run(t, True)
    (ry, rs, rs2), rgrads = run(ref, True, fn=reference.bn_relu_conv1x1)
    assert s.dtype == torch.float64
    for out, want in [(y, ry), (s, rs), (s2, rs2)] + [(grads[k], rgrads[k]) for k in LEAVES]:
        assert rel_err(out, want) < 1e-12


@pytest.mark.slow
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_float64(training):
    """Numerical against analytic gradients; in training the statistics are x's, recomputed
    from every perturbed x (the op treats them as such, without a gradient of their own)."""
    device = "cuda" if HAS_CUDA else "cpu"
    _, t = make_inputs((2, 3, 2, 3, 5), torch.float64, device, torch.channels_last)

    def f(x, bn_w, bn_b, conv_w, conv_b):
        xd = x.detach()
        mean = xd.mean((0, 2, 3)) if training else t["mean"]
        invstd = torch.rsqrt(xd.var((0, 2, 3), unbiased=False) + EPS) if training else t["invstd"]
        return bn_relu_conv1x1(x, mean, invstd, bn_w, bn_b, conv_w, conv_b, training)

    leaves = [t[k].clone().requires_grad_(True) for k in LEAVES]
    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_int64_offsets_give_the_same_results(monkeypatch):
    """No tensor here is 2^30 elements: lower the limit so that every launch takes int64
    offsets, and compare bit for bit."""
    _, t = make_inputs(SHAPES[2], torch.float32, "cpu", torch.channels_last)
    narrow = run(t, True)
    with monkeypatch.context() as m:
        m.setattr(_index, "INT32_LIMIT", 1)
        wide = run(t, True)
    for a, b in zip(narrow[0], wide[0]):
        assert torch.equal(a, b)
    for k in LEAVES:
        assert torch.equal(narrow[1][k], wide[1][k])


def test_deterministic():
    """Partials are summed in a fixed order: two runs agree bit for bit."""
    _, t = make_inputs(SHAPES[2], torch.float32, "cpu", torch.channels_last)
    first, again = run(t, True), run(t, True)
    assert all(torch.equal(a, b) for a, b in zip(first[0], again[0]))
    assert all(torch.equal(first[1][k], again[1][k]) for k in LEAVES)


def test_nan_in_x_reaches_y_as_relu_lets_it():
    _, t = make_inputs(SHAPES[0], torch.float32, "cpu", torch.channels_last)
    x = t["x"].clone()
    x[0, 2, 1, 1] = float("nan")
    y = bn_relu_conv1x1(x, t["mean"], t["invstd"], t["bn_w"], t["bn_b"], t["conv_w"], t["conv_b"], False)
    assert torch.isnan(y[0, :, 1, 1]).all() and torch.isfinite(y[1]).all()


def test_custom_ops_pass_opcheck():
    _, t = make_inputs(SHAPES[0], torch.float32, "cpu", torch.channels_last)
    args = (t["x"], t["mean"], t["invstd"], t["bn_w"], t["bn_b"], t["conv_w"], t["conv_b"])
    for training, out_stats in ((True, True), (False, False)):
        torch.library.opcheck(_forward_op, (*args, training, out_stats))
    torch.library.opcheck(_backward_op, (t["gy"], *args[:6], True))


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
    with pytest.raises(ValueError, match="bfloat16 `x` needs a CUDA device"):
        bn_relu_conv1x1(**{**good, "x": t["x"].bfloat16()})


def test_the_gpu_benchmark_case_runs(tmp_path):
    """benchmarks/gpu_check.sh's case (python -m fasthg.bench.conv1x1), at a tiny shape in the
    interpreter: it runs, and its rows and table are whole (timings here mean nothing)."""
    from fasthg.bench import conv1x1 as bench

    rows = bench.run("cpu", levels=[4], units=((8, 4),), batch=1, repeats=1, warmup=1, out_dir=str(tmp_path))
    assert {(r["mode"], r["backend"]) for r in rows} == {(m, b) for m in ("forward", "forward+backward")
                                                           for b in ("unfused", "triton")}
    assert all(r["median_ms"] > 0 and r["bytes"] > 0 for r in rows)
    assert (tmp_path / "conv1x1.md").read_text().count("| triton |") == 2


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
