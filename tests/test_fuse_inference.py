"""fasthg.fuse.for_inference: folded outputs equal the eval eager model's, in both layouts,
float32 and bf16 autocast, through torch.export and `fasthg eval`; the original is untouched;
what cannot fold stays unfolded with a warning."""
import re
import warnings

import pytest
import torch
from torch import nn

import fasthg
from fasthg import checkpoint
from fasthg.cli import main
from fasthg.fuse import for_inference
from fasthg.fuse.inference import FoldedConvReLU
from fasthg.models import PRESETS, StackedHourglass
from fasthg.models.hourglass import Hourglass, Residual
from fasthg.nn import BNReLU

from conftest import rel_err

LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters in every BatchNorm, so that a
    wrong fold shows (fresh BNs normalise by mean 0, variance 1: nearly the identity)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            if m.running_mean is not None:
                m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.25)
            if m.affine:
                m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.data.copy_(torch.rand(c, generator=g) * 0.4 - 0.2)
    return model


def small(preset: str, backend: str = "eager", features: int = 16) -> StackedHourglass:
    torch.manual_seed(0)
    return randomise_bn(PRESETS[preset](num_features=features, depth=2, num_joints=5, backend=backend)).eval()


def twins(preset, layout, features=16):
    """The eval eager model and the folded copy of the same weights on the default backend."""
    eager = small(preset, "eager", features).to(memory_format=layout)
    auto = small(preset, "auto", features)
    auto.load_state_dict(eager.state_dict())
    return eager, for_inference(auto.to(memory_format=layout))


def expected_folds(model: StackedHourglass) -> int:
    """The stem's conv + BN, two per residual module (BN2, BN3), the features' conv + BN."""
    return 1 + 2 * sum(isinstance(m, Residual) for m in model.modules()) + model.num_stacks


def packed_calls(model) -> int:
    return sum(v is not None for m in model.modules() if isinstance(m, FoldedConvReLU) for v in m._packed.values())


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("preset", ["hg1", "hg2", pytest.param("hg8", marks=pytest.mark.slow)])
def test_folded_equals_eval_eager_model(preset, layout, poison):
    fmt = LAYOUTS[layout]
    eager, folded = twins(preset, fmt)
    assert len(folded.folded_convs) == expected_folds(eager)
    assert sum(isinstance(m, FoldedConvReLU) and m.relu for m in folded.modules()) == expected_folds(eager)
    assert not any(type(m) is nn.Conv2d for m in folded.modules())  # the rest: packed, without ReLU
    from fasthg.fuse.inference import FoldedResidual

    assert all(type(m) is FoldedResidual for m in folded.modules() if isinstance(m, Residual))
    # What is left of the BNs: the residuals' first, as fused eval BN-ReLU passes.
    left = [m for m in folded.modules() if isinstance(m, nn.BatchNorm2d)]
    assert left and all(isinstance(m, BNReLU) and not m.training for m in left)
    assert len(left) == sum(isinstance(m, Residual) for m in eager.modules())
    x = torch.randn(3, 3, 64, 64).contiguous(memory_format=fmt)
    with torch.no_grad():
        ref, out = eager(x), folded(x)
    assert not torch.isnan(out).any()
    assert rel_err(out, ref) < 1e-4
    if layout == "nhwc" and torch.backends.mkldnn.is_available():
        assert packed_calls(folded) > 0  # the oneDNN post-op path ran, not only the plain one


def test_sums_go_in_place_only_into_tensors_nothing_reads_after(monkeypatch):
    """The residual sums written into their skip (oneDNN's in-place post-op) are those of the
    residuals whose input dies with them: never the outermost hourglass's up1 (the stack's
    input is read again for the next stack) nor the first residual of the stem; the images
    and the outputs stay as eager's."""
    from fasthg.fuse import inference

    eager, folded = twins("hg2", torch.channels_last)
    inplace = {}
    real = inference.FoldedConvReLU.forward

    def spy(self, x, add=None, inplace_ok=False, **kw):
        inplace_ok = kw.pop("inplace", inplace_ok)
        if add is not None:
            inplace[self] = inplace_ok
        return real(self, x, add, inplace_ok)

    monkeypatch.setattr(inference.FoldedConvReLU, "forward", spy)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    before = x.clone()
    with torch.no_grad():
        ref, out = eager(x), folded(x)
    assert torch.equal(x, before)
    assert rel_err(out, ref) < 1e-4
    owner = {m.body[-1]: name for name, m in folded.named_modules() if isinstance(m, Residual)}
    kept = sorted(owner.get(conv, conv) for conv, ok in inplace.items() if not ok)
    # the stem's 64->128 and 128->16 residuals have conv skips: fresh tensors, in place too
    assert kept == ["hourglasses.0.up1", "hourglasses.1.up1"]
    # and the two remap convolutions' sums into stack 2's input
    assert sum(inplace.values()) == len(owner) - 2 + 2
    assert inplace[folded.remap_features[0]] and inplace[folded.remap_heatmaps[0]]


def test_merges_go_into_up1_and_first_bn_relus_into_one_scratch_per_shape(monkeypatch):
    """Every hourglass merge is written into its up branch, every residual's first BN-ReLU
    into the call's scratch tensor of its shape (one per shape, reused by every residual of
    the call, gone after it), and the result is still eager's."""
    from fasthg import ops
    from fasthg.fuse import inference

    eager, folded = twins("hg2", torch.channels_last)
    merges, outs = [], []
    real_merge, real_bn_relu = ops.upsample_add_, ops.bn_relu

    def merge_spy(low, skip, backend="auto"):
        merges.append(skip)
        return real_merge(low, skip, backend)

    def bn_relu_spy(*args, out=None, **kw):
        if out is not None:
            outs.append(out)
        return real_bn_relu(*args, out=out, **kw)

    monkeypatch.setattr(ops, "upsample_add_", merge_spy)
    monkeypatch.setattr(ops, "bn_relu", bn_relu_spy)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = eager(x)
        out = folded(x)
    assert rel_err(out, ref) < 1e-4
    assert len(merges) == sum(isinstance(m, Hourglass) for m in folded.modules()) > 0
    residuals = [m for m in folded.modules() if isinstance(m, Residual)]
    assert len(outs) == len(residuals)
    shapes = {(tuple(t.shape), t.stride()) for t in outs}
    assert len({t.data_ptr() for t in outs}) == len(shapes)  # one tensor per shape
    assert inference._scratch.get() == ()
    with torch.no_grad():  # a failing call closes its scratch too
        with pytest.raises(ValueError, match="must be multiples"):
            folded(torch.randn(2, 3, 60, 64))
    assert inference._scratch.get() == ()


def test_threads_share_a_folded_model():
    """Each thread's call has its own scratch tensors: concurrent calls give each its own answer."""
    import threading

    eager, folded = twins("hg1", torch.channels_last)
    inputs = [torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last) for _ in range(4)]
    results = [None] * len(inputs)

    def run(i):
        with torch.no_grad():
            for _ in range(3):
                results[i] = folded(inputs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with torch.no_grad():
        for x, out in zip(inputs, results):
            assert rel_err(out, eager(x)) < 1e-4


def test_a_residual_after_a_pass_through_module_keeps_its_input():
    """In a user's nn.Sequential a residual's input may be the Sequential's own (after an
    nn.Identity or a view): its sum must not go into that tensor, which the caller reads again."""
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.seq = nn.Sequential(nn.Identity(), Residual(8, 8), Residual(8, 8))

        def forward(self, x):
            return self.seq(x) + x

    torch.manual_seed(0)
    model = randomise_bn(Model()).eval().to(memory_format=torch.channels_last)
    folded = for_inference(model)
    assert [m.input_dies for m in folded.seq if isinstance(m, Residual)] == [False, True]
    x = torch.randn(2, 8, 9, 7).contiguous(memory_format=torch.channels_last)
    before = x.clone()
    with torch.no_grad():
        ref, out = model(x), folded(x)
    assert torch.equal(x, before) and rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bf16_autocast(layout):
    fmt = LAYOUTS[layout]
    eager, folded = twins("hg2", fmt)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=fmt)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref, out = eager(x), folded(x)
    assert out.dtype == ref.dtype == torch.bfloat16
    with torch.no_grad():
        exact = eager(x)
    # Both round to bf16 at every conv; the folded model's error is eager's own kind and size.
    assert rel_err(out, exact) < 3e-2 and rel_err(out, ref) < 3e-2


@pytest.mark.slow
def test_realistic_width():
    torch.manual_seed(0)
    eager = randomise_bn(PRESETS["hg2"](backend="eager")).eval().to(memory_format=torch.channels_last)
    folded = for_inference(eager)
    x = torch.randn(1, 3, 256, 256).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert rel_err(folded(x), eager(x)) < 1e-4


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", ["eager", "auto"])
def test_torch_export_reproduces_the_outputs(layout, backend):
    fmt = LAYOUTS[layout]
    model = small("hg2", backend).to(memory_format=fmt)
    folded = for_inference(model)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=fmt)
    exported = torch.export.export(folded, (x,))
    targets = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    # Traced, the folded convs are plain conv2d + relu (a packed oneDNN weight has no fake tensor).
    assert not any("mkldnn" in t for t in targets)
    assert sum("conv2d" in t for t in targets) == sum(isinstance(m, nn.Conv2d | FoldedConvReLU)
                                                      for m in folded.modules())
    with torch.no_grad():
        ref, out = model(x), exported.module()(x)
        assert rel_err(out, folded(x)) < 1e-6
    assert rel_err(out, ref) < 1e-4


def test_original_untouched_and_training_mode():
    model = small("hg1").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kinds = [type(m) for m in model.modules()]
    folded = for_inference(model)
    # A model in training mode gives an eval copy; the original stays as it was.
    assert model.training and all(m.training for m in model.modules())
    assert not folded.training and not any(m.training for m in folded.modules())
    assert [type(m) for m in model.modules()] == kinds
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(RuntimeError, match="inference-only"):
        folded.train()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        folded(x)
        model(x)  # a training forward of the original still updates its own statistics only
    assert not torch.equal(model.stem[1].running_mean, before["stem.1.running_mean"])
    # the copy's weights are its own
    assert folded.heads[0].weight.data_ptr() != model.heads[0].weight.data_ptr()
    with pytest.raises(TypeError, match="torch.nn.Module"):
        for_inference(model.state_dict())


def test_packed_weights_follow_the_weights(tmp_path):
    eager, folded = twins("hg1", torch.channels_last)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref, out = eager(x), folded(x)
        path = tmp_path / "folded.pt"
        torch.save(folded, path)  # after packing: the packed weights are not pickled
        again = torch.load(path, weights_only=False)
        assert rel_err(again(x), ref) < 1e-4
        # new weights in place (load_state_dict) and a moved model (.to) are packed again
        state = {k: v * 2 if k.endswith("weight") else v for k, v in folded.state_dict().items()}
        halved = {k: v / 2 if k.endswith("weight") else v for k, v in state.items()}
        folded.load_state_dict(state)
        assert rel_err(folded(x), out) > 1e-2
        folded.load_state_dict(halved)
        assert rel_err(folded.to(torch.float64).to(torch.float32)(x), out) < 1e-6


def test_plain_batchnorm_and_relu_modules_fold():
    torch.manual_seed(0)
    seq = randomise_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                     nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4, affine=False), nn.ReLU(inplace=True))).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        folded = for_inference(seq)
    assert folded.folded_convs == ["0", "3"] and sum(isinstance(m, nn.Identity) for m in folded) == 4
    for fmt in LAYOUTS.values():
        x = torch.randn(2, 3, 9, 7).contiguous(memory_format=fmt)
        with torch.no_grad():
            assert rel_err(folded(x), seq(x)) < 1e-5


def test_2x2_max_pools_run_the_fused_op_and_others_stay(monkeypatch):
    from fasthg.nn import MaxPool2x2

    seq = nn.Sequential(nn.Conv2d(3, 4, 1), nn.MaxPool2d(2), nn.MaxPool2d((2, 2), 2, 0), nn.MaxPool2d(3, 2),
                        nn.MaxPool2d(2, ceil_mode=True)).eval()
    folded = for_inference(seq)
    assert [type(m) is MaxPool2x2 for m in folded[1:]] == [True, True, False, False]
    pools = [m for m in for_inference(PRESETS["hg1"]()).modules() if isinstance(m, nn.MaxPool2d)]
    assert pools and all(type(m) is MaxPool2x2 for m in pools)  # the stem's
    calls = []
    real = fasthg.ops.max_pool2x2
    monkeypatch.setattr(fasthg.ops, "max_pool2x2", lambda x, backend: calls.append(backend) or real(x, backend))
    for fmt in LAYOUTS.values():
        x = torch.randn(2, 3, 23, 21).contiguous(memory_format=fmt)
        with torch.no_grad():
            assert torch.equal(folded(x), seq(x))
    assert calls == ["auto"] * 4


def _bad(kind):
    conv = {"groups": nn.Conv2d(4, 8, 3, padding=1, groups=2), "dilation": nn.Conv2d(4, 8, 3, padding=2, dilation=2),
            "reflect": nn.Conv2d(4, 8, 3, padding=1, padding_mode="reflect")}.get(kind, nn.Conv2d(4, 8, 3, padding=1))
    bn = BNReLU(8, backend="eager", track_running_stats=kind != "no running stats")
    if kind == "leaky":
        return nn.Sequential(conv, nn.BatchNorm2d(8), nn.LeakyReLU(0.1)), "followed by LeakyReLU"
    if kind == "last":
        return nn.Sequential(conv, nn.BatchNorm2d(8)), "followed by nothing"
    why = {"groups": "groups=2", "dilation": "dilation=(2, 2)", "reflect": "padding_mode='reflect'",
           "no running stats": "no running statistics"}[kind]
    return nn.Sequential(conv, bn), why


@pytest.mark.parametrize("kind", ["no running stats", "groups", "dilation", "reflect", "leaky", "last"])
def test_what_cannot_fold_stays_unfolded_with_a_warning(kind):
    torch.manual_seed(0)
    inner, why = _bad(kind)
    model = randomise_bn(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Sequential(inner))).eval()
    with pytest.warns(UserWarning, match=re.escape("left 2.0.0 -> 2.0.1 unfolded") + ".*" + re.escape(why)):
        folded = for_inference(model)
    assert folded.folded_convs == [] and not any(isinstance(m, FoldedConvReLU) and m.relu for m in folded.modules())
    assert isinstance(folded[2][0][1], nn.BatchNorm2d)
    for fmt in LAYOUTS.values():
        x = torch.randn(2, 3, 10, 12).contiguous(memory_format=fmt)
        with torch.no_grad():
            assert rel_err(folded(x), model(x)) < 1e-6


def test_a_sequential_subclass_is_not_walked():
    class Custom(nn.Sequential):  # its own forward: the conv's output may go elsewhere
        def forward(self, x):
            return self[1](self[0](x)) + self[0](x)

    torch.manual_seed(0)
    model = randomise_bn(Custom(nn.Conv2d(3, 4, 1), BNReLU(4, backend="eager"))).eval()
    folded = for_inference(model)
    assert folded.folded_convs == []
    x = torch.randn(1, 3, 5, 5)
    assert isinstance(folded[1], BNReLU)
    with torch.no_grad():
        assert rel_err(folded(x), model(x)) < 1e-6


def _eval_lines(capsys, argv):
    assert main(argv) == 0
    return [line for line in capsys.readouterr().out.splitlines() if line.strip()]


def test_eval_pckh_is_the_same_folded_or_not(tmp_path, capsys):
    torch.manual_seed(0)
    model = randomise_bn(StackedHourglass(num_stacks=2, num_features=16, depth=2, backend="eager"))
    ckpt = str(tmp_path / "m.pt")
    checkpoint.save(ckpt, model, input_size=64)
    base = ["eval", ckpt, "--n", "12", "--device", "cpu", "--batch-size", "5"]
    npz = [str(tmp_path / f"{k}.npz") for k in ("folded", "plain")]
    folded = _eval_lines(capsys, base + ["--save-predictions", npz[0]])
    plain = _eval_lines(capsys, base + ["--no-fold", "--save-predictions", npz[1]])
    assert folded[:-1] == plain[:-1] and "PCKh@0.5 on 12 people" in folded[0]
    import numpy as np

    a, b = (np.load(p)["pos_pred_src"] for p in npz)
    assert np.abs(a - b).max() < 1e-3  # the same heatmap peaks: joints within float rounding of the decoder


@pytest.mark.slow
def test_bench_inference_rows_and_bars():
    from fasthg.bench.inference import bench_inference, fold_checks, fold_lines

    rows = bench_inference("hg1", "cpu", 1, 64, repeats=1, variants=("eager", "auto", "folded"))
    assert [r["backend"] for r in rows] == ["eager", "auto", "folded"]
    assert all(r["images_per_s"] > 0 and r["shape"] == [1, 3, 64, 64] for r in rows)
    assert fold_checks(rows) == []  # the bars apply at batch 8

    def row(backend, ms, **extra):
        return {"op": "hg2 inference", "shape": [8, 3, 256, 256], "dtype": "float32", "layout": "nhwc",
                "backend": backend, "median_ms": ms, "speedup": 100 / ms, "images_per_s": 8e3 / ms, **extra}

    rows = [row("eager", 100), row("folded", 75), row("compile-freezing", 70, compile_s=60.0)]
    (check,) = fold_checks(rows)
    assert check["met_eager"] and check["of_compiled"] == pytest.approx(70 / 75) and check["met_compiled"]
    text = "\n".join(fold_lines(rows))
    assert "1.33x eager (bar 1.25x: met)" in text and "compile wait" in text and "60.0 s" in text
    rows[1]["median_ms"], rows[1]["speedup"] = 90, 100 / 90
    assert "NOT met" in "\n".join(fold_lines(rows))


@pytest.mark.cuda
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_folded_equals_eager(layout):
    """On a GPU: cuDNN's conv+bias+ReLU, the in-place merges and sums and the scratch BN-ReLU
    give eager's outputs, float32 and under bf16 autocast."""
    fmt = LAYOUTS[layout]
    eager, folded = twins("hg2", fmt)
    eager, folded = eager.cuda(), folded.cuda()
    x = torch.randn(2, 3, 64, 64, device="cuda").contiguous(memory_format=fmt)
    before = x.clone()
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # float32 convolutions
        ref, out = eager(x), folded(x)
        assert torch.equal(x, before) and rel_err(out, ref) < 1e-4
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out16 = folded(x)
    assert out16.dtype == torch.bfloat16 and rel_err(out16, ref) < 3e-2
