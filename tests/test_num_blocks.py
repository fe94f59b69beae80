"""Residual modules per place (num_blocks, the paper's equal-parameter variants): the rows of
residuals sit where the paper and pytorch-pose put them, the parameter counts of 2x4, 4x2 and
8x1 agree within a few percent, and every backend, memory mode, the folded inference model
and accelerate give the eager model's numbers."""
import copy

import pytest
import torch
from torch import nn

import fasthg
from conftest import rel_err, require_backend, sgd_steps_agree
from fasthg.fuse import for_inference
from fasthg.models import StackedHourglass
from fasthg.models.hourglass import Residual
from test_fuse_inference import randomise_bn

LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


def small(blocks=2, **kw):
    torch.manual_seed(0)
    return StackedHourglass(**{"num_stacks": 2, "num_features": 16, "num_joints": 5, "depth": 2,
                               "num_blocks": blocks, **kw})


def params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("blocks", [1, 2, 3])
def test_each_place_holds_a_row_of_residuals(blocks):
    model = small(blocks, backend="eager")
    one = small(1, backend="eager")
    # depth 2: 3 places per level + the bottom = 7 per hourglass, plus the features' one
    per_stack = 2 * 3 + 1 + 1
    assert sum(isinstance(m, Residual) for m in model.modules()) == 3 + 2 * per_stack * blocks
    assert params(model) - params(one) == 2 * per_stack * (blocks - 1) * params(Residual(16, 16))
    keys = set(model.state_dict())
    assert ("hourglasses.0.up1.1.body.0.weight" in keys) == (blocks > 1)
    assert ("hourglasses.0.up1.body.0.weight" in keys) == (blocks == 1)  # the paper's keys unchanged
    assert model.config["num_blocks"] == blocks


def test_the_papers_equal_parameter_arrangements_are_within_a_few_percent():
    counts = {(s, b): params(StackedHourglass(s, 256, 16, 4, backend="eager", num_blocks=b))
              for s, b in ((2, 4), (4, 2), (8, 1))}
    assert max(counts.values()) / min(counts.values()) < 1.05, counts


@pytest.mark.parametrize("backend", ["native", pytest.param("triton", marks=pytest.mark.slow)])  # interpreter: 10-25 s
@pytest.mark.parametrize("memory", ["default", "recompute"])
def test_backends_and_memory_modes_train_like_eager(backend, memory):
    """In float64: the rows' extra BNs at the 2x2 bottom (8 values a channel) amplify float32
    rounding chaotically (gradients 1e-1 apart in float32, 1e-12 in float64)."""
    require_backend("cpu", backend)
    eager = small(backend="eager").double().train()
    fused = small(backend=backend, memory=memory).double().train()
    fused.load_state_dict(eager.state_dict())
    fmt = torch.channels_last
    eager, fused = eager.to(memory_format=fmt), fused.to(memory_format=fmt)
    make = lambda: torch.randn(2, 3, 32, 32, dtype=torch.float64).contiguous(memory_format=fmt)  # noqa: E731
    sgd_steps_agree(eager, fused, make, 2, 1e-7)  # the second step amplifies the first's rounding
    for (name, a), b in zip(eager.state_dict().items(), fused.state_dict().values()):
        assert rel_err(b, a) < 1e-7 if a.is_floating_point() else torch.equal(a, b), name


@pytest.mark.parametrize("layout", LAYOUTS)
def test_folded_inference_equals_eager_and_sums_rows_in_place(layout, monkeypatch):
    """The second residual of every row reads only the first's output: it sums into it; the
    merges go into the up rows' last output; the outermost up row's first residual keeps the
    stack's input (read again by the next stack)."""
    from fasthg.fuse import inference

    fmt = LAYOUTS[layout]
    eager = randomise_bn(small(backend="eager")).eval().to(memory_format=fmt)
    folded = for_inference(copy.deepcopy(eager).to(memory_format=fmt))
    for m in folded.modules():
        if hasattr(m, "backend"):
            m.backend = "auto"
    inplace, merges = {}, []
    real, real_merge = inference.FoldedConvReLU.forward, fasthg.ops.upsample_add_

    def spy(self, x, add=None, inplace_ok=False, **kw):
        inplace_ok = kw.pop("inplace", inplace_ok)
        if add is not None:
            inplace[self] = inplace_ok
        return real(self, x, add, inplace_ok)

    def merge_spy(low, skip, backend="auto"):
        merges.append(skip)
        return real_merge(low, skip, backend)

    monkeypatch.setattr(inference.FoldedConvReLU, "forward", spy)
    monkeypatch.setattr(fasthg.ops, "upsample_add_", merge_spy)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=fmt)
    before = x.clone()
    with torch.no_grad():
        ref, out = eager(x), folded(x)
    assert torch.equal(x, before) and rel_err(out, ref) < 1e-4
    owner = {m.body[-1]: name for name, m in folded.named_modules() if isinstance(m, Residual)}
    assert sorted(owner[c] for c, ok in inplace.items() if not ok and c in owner) == \
        ["hourglasses.0.up1.0", "hourglasses.1.up1.0"]
    assert len(merges) == 4  # two hourglasses of depth 2


def test_accelerate_leaves_it_equal():
    model = small(backend="eager").double().train()  # float64: see the backends' test
    accelerated = fasthg.accelerate(copy.deepcopy(model))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    out, ref = accelerated(x), model(x)
    assert rel_err(out, ref) < 1e-9
    assert list(accelerated.state_dict()) == list(model.state_dict())


def test_bad_num_blocks():
    with pytest.raises(ValueError, match="num_blocks must be a positive int, got 0"):
        StackedHourglass(1, 16, 5, 2, num_blocks=0)
    with pytest.raises(ValueError, match="num_blocks"):
        StackedHourglass(1, 16, 5, 2, num_blocks=1.5)


def test_a_checkpoint_keeps_its_rows(tmp_path):
    from fasthg import checkpoint
    from fasthg.models import from_checkpoint

    model = small(3, backend="eager")
    path = str(tmp_path / "m.pt")
    checkpoint.save(path, model)
    loaded = from_checkpoint(path, backend="eager")
    assert loaded.config == model.config
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    with pytest.raises(ValueError, match="checkpoint of a model"):
        checkpoint.load_model(path, model=small(2, backend="eager"))
    assert isinstance(loaded.hourglasses[0].up1, nn.Sequential)
