"""The Stacked Hourglass model: shapes, size, intermediate supervision, layouts, dtypes, and
equality of every backend with the eager model."""
import copy
import sys

import pytest
import torch

from conftest import device_backend_params, rel_err, require_backend, sgd_steps_agree
import fasthg.ops
from fasthg.models import PRESETS, Residual, StackedHourglass, hg2, hg8
from fasthg.nn import BNReLU


def small(**kw):
    kw = {"num_stacks": 2, "num_features": 16, "num_joints": 5, "depth": 2, **kw}
    return StackedHourglass(**kw)


def residual_params(i, o):
    m = o // 2
    bns = 2 * i + 2 * m + 2 * m
    convs = (i * m + m) + (9 * m * m + m) + (m * o + o)
    return bns + convs + (i * o + o if i != o else 0)


def expected_params(stacks, f=256, joints=16, depth=4):
    stem = (3 * 64 * 49 + 64) + 2 * 64 + residual_params(64, 128) + residual_params(128, 128) + residual_params(128, f)
    hourglass = (3 * depth + 1) * residual_params(f, f)
    after = residual_params(f, f) + (f * f + f) + 2 * f + (f * joints + joints)
    remap = (f * f + f) + (joints * f + f)
    return stem + stacks * (hourglass + after) + (stacks - 1) * remap


@pytest.mark.parametrize("preset,stacks", [(hg2, 2), (hg8, 8)])
def test_parameter_count_matches_hand_count(preset, stacks):
    n = sum(p.numel() for p in preset(backend="eager").parameters())
    assert n == expected_params(stacks)
    # The paper's sizes: about 25M for 8 stacks, 6.7M for 2.
    assert {2: 6.5e6, 8: 25e6}[stacks] * 0.95 < n < {2: 6.5e6, 8: 25e6}[stacks] * 1.1


def test_presets():
    assert [PRESETS[k](num_features=8, backend="eager").num_stacks for k in ("hg1", "hg2", "hg4", "hg8")] == [1, 2, 4, 8]


@pytest.mark.parametrize("stacks,size", [(1, 64), (3, 32)])
def test_output_shape(stacks, size):
    model = small(num_stacks=stacks, backend="eager")
    out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, stacks, 5, size // 4, size // 4)


def test_full_size_hg2_forward_shape():
    model = hg2(backend="auto").eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 256, 256))
    assert out.shape == (1, 2, 16, 64, 64)


def test_intermediate_supervision_feeds_heatmaps_forward():
    torch.manual_seed(0)
    model = small(backend="eager").eval()
    x = torch.randn(1, 3, 32, 32)
    seen = {}  # hooks store with __setitem__ so that they return None and change nothing
    model.hourglasses[1].register_forward_pre_hook(lambda m, args: seen.__setitem__("x1", args[0]))
    model.stem.register_forward_hook(lambda m, args, out: seen.__setitem__("x0", out))
    model.features[0].register_forward_hook(lambda m, args, out: seen.__setitem__("feat0", out))
    with torch.no_grad():
        out = model(x)
        expected = seen["x0"] + model.remap_features[0](seen["feat0"]) + model.remap_heatmaps[0](out[:, 0])
    torch.testing.assert_close(seen["x1"], expected)
    # Changing how stack 1's heatmaps re-enter changes stack 2's output, not stack 1's.
    with torch.no_grad():
        model.remap_heatmaps[0].weight.mul_(3)
        out2 = model(x)
    torch.testing.assert_close(out2[:, 0], out[:, 0])
    assert not torch.allclose(out2[:, 1], out[:, 1])


@pytest.mark.parametrize("device,backend", device_backend_params(include_eager=False))
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype,steps,tol", [(torch.float32, 1, 1e-4),
                                             # minutes on 2 cores with the Triton interpreter: make test only
                                             pytest.param(torch.float64, 3, 1e-9, marks=pytest.mark.slow)],
                         ids=["f32", "f64"])
def test_backend_matches_eager_model(device, backend, layout, dtype, steps, tol, monkeypatch):
    """Outputs, gradients and running statistics over training steps. In float32 only one:
    this small net's BNs (8 values per channel at the bottom) amplify rounding chaotically
    over SGD steps, so several steps are compared in float64. (No TF32 convolutions on GPUs:
    their rounding, not the fused ops', would set the difference.)"""
    require_backend(device, backend)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # (matmuls: off by default)
    torch.manual_seed(0)
    eager = small(backend="eager").to(device, dtype).train()
    fused = copy.deepcopy(eager)
    for m in fused.modules():
        if hasattr(m, "backend"):
            m.backend = backend
    eager, fused = eager.to(memory_format=layout), fused.to(memory_format=layout)
    sgd_steps_agree(eager, fused,
                    lambda: torch.randn(2, 3, 32, 32, device=device, dtype=dtype).contiguous(memory_format=layout),
                    steps, tol)
    for (name, be), bf in zip(eager.named_buffers(), fused.buffers()):
        assert rel_err(bf, be) < tol, name


def _unit_calls(monkeypatch):
    """FASTHG_CPU_CONV1X1=all (every dtype's 1x1 residual units in the native CPU unit), and
    the list its calls are counted in: "unit", or "tee" for the residual modules' first units
    (their skip branch's gradient joins the unit's backward: bn_relu_conv1x1_with_skip)."""
    monkeypatch.setenv("FASTHG_CPU_CONV1X1", "all")
    unit_module = sys.modules["fasthg.ops.bn_relu_conv"]
    calls = []
    for name, kind in (("bn_relu_conv1x1", "unit"), ("bn_relu_conv1x1_with_skip", "tee")):
        real = getattr(unit_module, name)
        monkeypatch.setattr(unit_module, name, lambda *a, _r=real, _k=kind, **k: calls.append(_k) or _r(*a, **k))
    return calls


def _nhwc_model(dtype, state, **kw):
    m = small(**kw).to(dtype).train().to(memory_format=torch.channels_last)
    m.load_state_dict(state)
    return m


@pytest.mark.skipif(not fasthg.ops.conv1x1.native_available(), reason="the extension is not built")
@pytest.mark.parametrize("memory", ["default", "recompute"])
def test_native_conv1x1_unit_model_trains_like_eager_in_float64(memory, monkeypatch):
    """The model with its 1x1 residual units in the native CPU unit (channels_last): three SGD
    steps agree with the eager model's, running statistics too, and the unit ran for every
    1x1 unit of the residual modules (and, in recompute, the last stack's heat-map head)."""
    calls = _unit_calls(monkeypatch)
    torch.manual_seed(0)
    eager = small(backend="eager").double().train().to(memory_format=torch.channels_last)
    fused = _nhwc_model(torch.float64, eager.state_dict(), backend="native", memory=memory)
    sgd_steps_agree(eager, fused, lambda: torch.randn(2, 3, 32, 32, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last), 3, 1e-9)
    residuals = sum(isinstance(m, Residual) for m in fused.modules())
    assert calls.count("tee") == 3 * residuals
    assert calls.count("unit") == 3 * (residuals + (memory == "recompute"))
    for (name, be), bf in zip(eager.named_buffers(), fused.buffers()):
        assert rel_err(bf, be) < 1e-9, name


@pytest.mark.skipif(not fasthg.ops.conv1x1.native_available(), reason="the extension is not built")
@pytest.mark.parametrize("memory", ["default", "recompute"])
def test_bf16_first_units_feed_their_sums_to_the_next_bn(memory, monkeypatch):
    """Under bf16 autocast each residual module's first unit (fused) hands its output's sums to
    the next BN-ReLU, which takes its statistics from them (bn_relu_train_sums; in recompute,
    the recomputing unit's bn_relu_train_forward_sums): a training step's output, gradients and
    running statistics as without the sums, to bf16's rounding."""
    monkeypatch.setenv("FASTHG_CPU_CONV1X1", "all")
    name = "bn_relu_train_sums" if memory == "default" else "bn_relu_train_forward_sums"
    calls = []
    real = getattr(torch.ops.fasthg, name)
    monkeypatch.setattr(torch.ops.fasthg, name, lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    start = small(backend="native", memory=memory).train().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    results = []
    for feed in (True, False):
        if not feed:
            monkeypatch.setattr(sys.modules["fasthg.ops.bn_relu_conv"], "_SUMS_DTYPES", ())
        m = copy.deepcopy(start)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)
        out.float().square().mean().backward()
        results.append((out, torch.cat([p.grad.flatten() for p in m.parameters()]),
                        torch.cat([b.float().flatten() for b in m.buffers()])))
        if feed:
            assert len(calls) == sum(isinstance(r, Residual) for r in m.modules())
    (out, grads, bufs), (out0, grads0, bufs0) = results
    assert len(calls) == sum(isinstance(r, Residual) for r in start.modules())  # (none without the feed)
    assert rel_err(out, out0) < 1e-2 and rel_err(grads, grads0) < 1e-3 and rel_err(bufs, bufs0) < 1e-5


@pytest.mark.skipif(not fasthg.ops.conv1x1.native_available(), reason="the extension is not built")
def test_auto_routes_the_first_unit_of_each_residual_module_on_a_cpu_computing_bf16(monkeypatch):
    """FASTHG_CPU_CONV1X1=auto where the CPU computes bf16: a float32 channels_last model in
    training runs each residual module's first 1x1 unit (the one whose input feeds the skip
    branch) in the native unit with the skip, and its last one (whose residual add oneDNN's
    convolution fuses) not."""
    calls = _unit_calls(monkeypatch)
    monkeypatch.setenv("FASTHG_CPU_CONV1X1", "auto")
    monkeypatch.setattr(fasthg.ops.conv1x1, "_CPU_COMPUTES_BF16", True)
    m = small(backend="native").train().to(memory_format=torch.channels_last)
    m(torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)).square().mean().backward()
    assert calls == ["tee"] * sum(isinstance(r, Residual) for r in m.modules())


@pytest.mark.skipif(not fasthg.ops.conv1x1.native_available(), reason="the extension is not built")
def test_native_conv1x1_unit_model_in_float32_errs_no_more_than_eager(monkeypatch):
    """DESIGN's rule for whole models: in float32 the model with the native 1x1 unit is no
    further from the float64 model than the eager float32 model is (outputs and gradients of
    a training step; this small net's BNs amplify rounding, so both are ~1e-4-1e-3 away)."""
    calls = _unit_calls(monkeypatch)
    torch.manual_seed(0)
    reference = small(backend="eager").double().train().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    results = []
    for dtype, backend in ((torch.float64, "eager"), (torch.float32, "eager"), (torch.float32, "native")):
        m = _nhwc_model(dtype, reference.state_dict(), backend=backend)
        out = m(x.to(dtype))
        out.square().mean().backward()
        results.append((out, torch.cat([p.grad.flatten() for p in m.parameters()])))
    assert calls
    (ref_out, ref_grads), (eager_out, eager_grads), (out, grads) = results
    assert rel_err(out, ref_out) <= 2 * rel_err(eager_out, ref_out) + 1e-6
    assert rel_err(grads, ref_grads) <= 2 * rel_err(eager_grads, ref_grads) + 1e-6


def test_channels_last_model_matches_nchw():
    torch.manual_seed(0)
    model = small(backend="auto").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        out = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("backend", ["eager", "native"])
def test_cpu_runs_nchw_images_channels_last_inside(backend, monkeypatch):
    """On the CPU the fused model converts NCHW images once and gives NCHW heatmaps back (the
    eager model runs as written); values and gradients as the eager model's."""
    torch.manual_seed(0)
    eager = small(backend="eager").double().train()
    model = small(backend=backend).double().train()
    model.load_state_dict(eager.state_dict())
    seen = []
    real = BNReLU.forward
    monkeypatch.setattr(BNReLU, "forward", lambda self, x: seen.append(x.is_contiguous(memory_format=torch.channels_last)) or real(self, x))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    out = model(x)
    assert out.is_contiguous() and all(seen) == (backend == "native") and seen
    ref = eager(x)
    assert rel_err(out, ref) < 1e-10
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, list(model.parameters()), g)
    want = torch.autograd.grad(ref, list(eager.parameters()), g)
    scale = max(float(w.abs().max()) for w in want)  # (a bias before a BN has a zero gradient)
    for a, b in zip(got, want):
        assert float((a - b).abs().max()) <= 1e-10 * scale


@pytest.mark.parametrize("backend", ["eager", "auto"])
def test_autocast_bfloat16_cpu(backend):
    torch.manual_seed(0)
    model = small(backend=backend).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 5e-2


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["eager", "native", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_cuda(backend, dtype):
    require_backend("cuda", backend)
    torch.manual_seed(0)
    model = small(backend=backend).cuda().train()
    x = torch.randn(2, 3, 32, 32, device="cuda")
    ref = model(x)
    with torch.autocast("cuda", dtype=dtype):
        out = model(x)
    out.float().sum().backward()
    assert rel_err(out, ref) < 5e-2


@pytest.mark.parametrize("kw,message", [
    ({"backend": "fast"}, "backend must be one of"),
    ({"num_stacks": 0}, "num_stacks"),
    ({"num_features": 15}, "num_features must be even"),
])
def test_bad_arguments(kw, message):
    with pytest.raises(ValueError, match=message):
        small(**kw)


@pytest.mark.parametrize("shape,message", [((1, 1, 32, 32), r"\[B, 3, H, W\]"), ((1, 3, 30, 32), "multiples of 16")])
def test_bad_images(shape, message):
    with pytest.raises(ValueError, match=message):
        small(backend="eager")(torch.randn(shape))
