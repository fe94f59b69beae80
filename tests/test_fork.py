"""fasthg.ops.fork: two views of a tensor whose gradients it sums itself (out of place)."""
import importlib

import pytest
import torch

from fasthg import ops
from fasthg.models import StackedHourglass

fork_module = importlib.import_module("fasthg.ops.fork")  # (fasthg.ops.fork is the function)


def _bf16_leaf(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).bfloat16().contiguous(memory_format=torch.channels_last).requires_grad_()


CL, NCHW = torch.channels_last, torch.contiguous_format


@pytest.mark.parametrize("shape,layouts", [((2, 6, 5, 7), (CL, CL)), ((2, 6, 5, 7), (CL, NCHW)),
                                           ((3, 5, 4, 9), (NCHW, NCHW)), ((4, 5, 6), None)], ids=str)
def test_values_and_gradient_are_the_sum_of_both_branches(shape, layouts):
    """The two gradients in either layout (4-D: fasthg's one-pass sum), or 3-D (ATen's)."""
    t = _bf16_leaf(*shape, seed=0) if len(shape) == 4 else torch.randn(*shape).bfloat16().requires_grad_()
    a, b = (torch.randn(*shape).bfloat16() for _ in range(2))
    if layouts:
        a, b = a.contiguous(memory_format=layouts[0]), b.contiguous(memory_format=layouts[1])
    u, v = ops.fork(t)
    assert fork_module.forks(t) and torch.equal(u, t) and torch.equal(v, t)
    got, = torch.autograd.grad((u * a).sum() + (v * b).sum(), [t])
    want, = torch.autograd.grad((t * a).sum() + (t * b).sum(), [t])  # autograd's own sum
    assert torch.equal(got, want) and not got.isnan().any()
    if layouts == (CL, CL):
        assert got.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("which", [0, 1])
def test_one_branch_without_gradient(which):
    t = _bf16_leaf(3, 4, 2, 2, seed=1)
    outs = ops.fork(t)
    w = torch.randn(3, 4, 2, 2).bfloat16()
    got, = torch.autograd.grad((outs[which] * w).sum(), [t])
    assert torch.equal(got, w)


def test_where_it_does_not_fork_it_is_the_tensor_itself():
    t = _bf16_leaf(1, 2, 3, 3, seed=2)
    for x, backend in ((t, "eager"), (t.detach(), "auto"), (t.float().detach().requires_grad_(), "auto")):
        u, v = ops.fork(x, backend=backend)
        assert u is x and v is x
    with torch.no_grad():
        assert ops.fork(t)[0] is t


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="backend"):
        ops.fork(torch.zeros(1), backend="cuda")
    with pytest.raises(TypeError, match="`t` must be a torch.Tensor"):
        ops.fork([1.0])


def test_hourglass_gradients_equal_autograds_own_sum(monkeypatch):
    """A 2-stack model in bf16 autocast: forking changes no gradient (both sums round once)."""
    torch.manual_seed(0)
    model = StackedHourglass(num_stacks=2, num_features=16, num_joints=4, depth=2).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    calls = []
    real = fork_module._Fork.apply
    monkeypatch.setattr(fork_module._Fork, "apply", lambda t: calls.append(t.shape) or real(t))

    def grads():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        return torch.autograd.grad(out.float().square().sum(), list(model.parameters()))

    got = grads()
    assert len(calls) == 2  # the stack's input and its features
    monkeypatch.setattr(fork_module, "forks", lambda *a, **k: False)
    want = grads()
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_hourglass_compiles():
    """torch.compile traces the model with its forks (bf16 autocast, CPU; oneDNN's fused
    convolution has no fake kernel, so not as one graph): values and gradients as the model run
    eagerly."""
    torch.manual_seed(1)
    model = StackedHourglass(num_stacks=2, num_features=16, num_joints=4, depth=2).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(model, backend="aot_eager")
    outs, grads = [], []
    for m in (model, compiled):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)
        outs.append(out)
        grads.append(torch.autograd.grad(out.float().square().sum(), list(model.parameters())))
    torch.testing.assert_close(outs[1], outs[0])
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b)
