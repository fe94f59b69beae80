"""fasthg.accelerate on models written in plain PyTorch in several styles: what it fuses, what
it leaves alone (and says why), and that the accelerated model computes what the original
does (outputs, gradients, running statistics, train and eval, both layouts, autocast,
torch.compile, deepcopy, pickle, DDP) with the same state_dict."""
import copy
import io
import pickle

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn

import fasthg
from fasthg.fuse.accelerate import Report, upsample_add_2x
from fasthg.nn import BNAddReLU, BNReLU


# ----------------------------------------------------------------------------- the models
class SeqResidual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.Conv2d(c, c // 2, 1),
                                  nn.BatchNorm2d(c // 2), nn.ReLU(), nn.Conv2d(c // 2, c, 3, padding=1))

    def forward(self, x):
        return self.body(x) + x


class SeqHourglass(nn.Module):
    """nn.Sequential residuals, nn.Upsample merges (two of them as nn.UpsamplingNearest2d)."""

    def __init__(self, depth=2, c=8):
        super().__init__()
        self.up1, self.low1, self.low3 = SeqResidual(c), SeqResidual(c), SeqResidual(c)
        self.pool = nn.MaxPool2d(2, 2)
        self.low2 = SeqHourglass(depth - 1, c) if depth > 1 else SeqResidual(c)
        self.up = nn.Upsample(scale_factor=2, mode="nearest") if depth > 1 else nn.UpsamplingNearest2d(scale_factor=2)

    def forward(self, x):
        return self.up1(x) + self.up(self.low3(self.low2(self.low1(self.pool(x)))))


class FunctionalHourglass(nn.Module):
    """F.relu / torch.relu / .relu_() after BN, F.interpolate(size=...) merged by +=, torch.add."""

    def __init__(self, c=8):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1)
        self.bn2, self.conv2 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1)
        self.bn3, self.conv3 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 1)

    def forward(self, x):
        up1 = self.conv1(F.relu(self.bn1(x), inplace=True))
        low = self.conv2(torch.relu(self.bn2(F.max_pool2d(x, 2))))
        up1 += F.interpolate(low, size=up1.shape[-2:], mode="nearest")
        low2 = F.max_pool2d(up1, 2)
        low2 = self.conv3(self.bn3(low2).relu_())
        return torch.add(F.interpolate(low2, scale_factor=2.0), up1)


class RecursiveHourglass(nn.Module):
    """The pytorch-pose style: Python lists of branches walked recursively, stopping on the
    tensor's size (data-dependent: fx cannot trace the whole)."""

    def __init__(self, c=8, depth=2):
        super().__init__()
        self.branches = nn.ModuleList(nn.ModuleList(SeqResidual(c) for _ in range(3)) for _ in range(depth))
        self.bottom = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1))

    def _hourglass(self, n, x):
        if x.shape[-1] < 4:  # data-dependent control flow
            return self.bottom(x)
        up1 = self.branches[n][0](x)
        low = self.branches[n][1](F.max_pool2d(x, 2))
        low = self._hourglass(n - 1, low) if n > 0 else self.bottom(low)
        return up1 + F.interpolate(self.branches[n][2](low), scale_factor=2)

    def forward(self, x):
        return self._hourglass(len(self.branches) - 1, x)


class PreActBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + shortcut


class PreActResNet(nn.Module):
    def __init__(self, c=8, classes=5):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.layers = nn.Sequential(PreActBlock(c, c), PreActBlock(c, 2 * c, 2))
        self.bn = nn.BatchNorm2d(2 * c)
        self.fc = nn.Linear(2 * c, classes)

    def forward(self, x):
        out = F.relu(self.bn(self.layers(self.conv(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def conv_bn_relu(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallUNet(nn.Module):
    """Encoder-decoder: one merge by nearest upsample + add, one by concatenation."""

    def __init__(self, c=8):
        super().__init__()
        self.enc1, self.enc2, self.enc3 = conv_bn_relu(3, c), conv_bn_relu(c, 2 * c), conv_bn_relu(2 * c, 2 * c)
        self.dec2 = conv_bn_relu(4 * c, c)
        self.out = nn.Conv2d(c, 2, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        e3 = self.enc3(F.max_pool2d(e2, 2))
        d2 = e2 + F.interpolate(e3, scale_factor=2, mode="nearest")
        d1 = self.dec2(torch.cat([F.interpolate(d2, scale_factor=2), e1.repeat(1, 2, 1, 1)], 1))
        return self.out(d1)


class NotToRewrite(nn.Module):
    """Every near-miss: BN output with two users, BN -> LeakyReLU, bilinear upsample, scale 3,
    an upsample result used twice, an upsample feeding a multiplication."""

    def __init__(self, c=8):
        super().__init__()
        self.bn_two, self.bn_leaky = nn.BatchNorm2d(c), nn.BatchNorm2d(c)
        self.leaky = nn.LeakyReLU(0.1)
        self.bilinear = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)

    def forward(self, x):
        y = self.bn_two(x)
        a = F.relu(y) + y
        b = self.leaky(self.bn_leaky(a))
        low = F.max_pool2d(b, 2)
        c = self.bilinear(low) + b
        d = F.interpolate(F.max_pool2d(c, 3), scale_factor=3) + c[..., :c.shape[-2] // 3 * 3, :c.shape[-1] // 3 * 3]
        u = F.interpolate(F.max_pool2d(d, 2), scale_factor=2)
        e = u + d[..., :u.shape[-2], :u.shape[-1]]
        return e * u + F.interpolate(F.max_pool2d(e, 2), scale_factor=2) * e


class TrainingBranch(nn.Module):
    """A forward that reads self.training (fx bakes it in: accelerate traces both modes)."""

    def __init__(self, c=8):
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(c), nn.Conv2d(c, c, 1)

    def forward(self, x):
        y = self.conv(F.relu(self.bn(x)))
        return y * 2 if self.training else y - 1


class SequentialWithUntraceable(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x  # data-dependent


def seq_untraceable(c=8):
    return nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), SequentialWithUntraceable(), nn.Conv2d(c, c, 1),
                         nn.BatchNorm2d(c), nn.ReLU(inplace=True))


class BasicBlock(nn.Module):
    """torchvision's post-activation block: the BN before the addition, += identity, ReLU."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNetBasic(nn.Module):
    def __init__(self, c=8, classes=5):
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()
        self.layers = nn.Sequential(BasicBlock(c, c), BasicBlock(c, 2 * c, 2))
        self.fc = nn.Linear(2 * c, classes)

    def forward(self, x):
        out = self.layers(self.relu(self.bn(self.conv(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


class ResidualSpellings(nn.Module):
    """The addition as people write it: residual first, torch.add, .add, F.relu."""

    def __init__(self, c=8):
        super().__init__()
        self.bn_a, self.bn_b, self.bn_c = nn.BatchNorm2d(c), nn.BatchNorm2d(c), nn.BatchNorm2d(c)
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        a = torch.relu(x + self.bn_a(self.conv(x)))
        b = F.relu(torch.add(self.bn_b(self.conv(a)), a))
        return self.bn_c(self.conv(b)).add(b).relu()


# name: (builder, input channels, size, fused BN-ReLUs, fused upsample-adds)
MODELS = {
    "seq_hourglass": (SeqHourglass, 8, 16, 14, 2),
    "functional_hourglass": (FunctionalHourglass, 8, 16, 3, 2),
    "recursive_hourglass": (RecursiveHourglass, 8, 16, 13, 0),
    "preact_resnet": (PreActResNet, 3, 16, 5, 0),
    "small_unet": (SmallUNet, 3, 16, 4, 1),
    "training_branch": (TrainingBranch, 8, 8, 1, 0),
    "seq_untraceable": (seq_untraceable, 8, 8, 2, 0),
    "not_to_rewrite": (NotToRewrite, 8, 12, 0, 0),
    "resnet_basic": (ResNetBasic, 3, 16, 3, 0),
    "residual_spellings": (ResidualSpellings, 8, 8, 0, 0),
}
# fused BN-add-ReLUs, where a model has them
BN_ADD_RELUS = {"resnet_basic": 2, "residual_spellings": 3}


def build(name, seed=0):
    torch.manual_seed(seed)
    make, cin, size, _, _ = MODELS[name]
    model = make()
    # non-trivial running statistics and affine parameters, so eval mode tells them apart
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    return model, torch.randn(4, cin, size, size)


def pair(name, layout=torch.contiguous_format):
    original, x = build(name)
    accelerated, report = fasthg.accelerate(copy.deepcopy(original), return_report=True)
    if layout is not torch.contiguous_format:  # (NCHW: the layout accelerate left, channels_last on the CPU)
        accelerated = accelerated.to(memory_format=layout)
    return original.to(memory_format=layout), accelerated, x.contiguous(memory_format=layout), report


def close(a, b, tol=1e-4, what="", scale=None):
    """max |a - b| over max |b| (or over `scale`: a gradient next to the others of its step,
    since a conv bias before a training BN has a gradient of zero plus rounding)."""
    a, b = a.detach(), b.detach()
    scale = b.abs().max() if scale is None else scale
    err = (a.double() - b.double()).abs().max() / max(float(scale), 1e-12)
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


# ----------------------------------------------------------------------------- what it rewrites
@pytest.mark.parametrize("name", MODELS)
def test_fuses_the_patterns_and_reports_them(name):
    *_, report = pair(name)
    _, _, _, n_bn, n_up = MODELS[name]
    assert isinstance(report, Report) and str(report).startswith("fasthg.accelerate")
    fused = report.fused()
    assert sum(c.kind == "bn_relu" for c in fused) == n_bn, str(report)
    assert sum(c.kind == "upsample_add" for c in fused) == n_up, str(report)
    assert sum(c.kind == "bn_add_relu" for c in fused) == BN_ADD_RELUS.get(name, 0), str(report)


def test_the_residual_blocks_downsampling_bn_stays_a_batchnorm_with_its_reason():
    _, accelerated, _, report = pair("resnet_basic")
    reasons = {c.where: (c.kind, c.reason) for c in report.left_alone()}
    assert reasons == {"layers.1.downsample.1": ("bn_add_relu", "the other addend (layers.1.bn2) is fused with the "
                                                                "addition")}, str(report)
    assert type(accelerated.layers[1].downsample[1]) is nn.BatchNorm2d
    assert all(isinstance(accelerated.layers[i].bn2, BNAddReLU) for i in (0, 1))


class ResidualNearMisses(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.bn_sum, self.bn_into_input, self.bn_self = nn.BatchNorm2d(c), nn.BatchNorm2d(c), nn.BatchNorm2d(c)
        self.bn_const = nn.BatchNorm2d(c)

    def forward(self, x):
        s = torch.sigmoid(self.bn_sum(x) + x)  # the sum is not clamped
        v = x[:, :]
        v += self.bn_into_input(s)  # mutates the caller's x: cannot become out of place
        t = self.bn_self(s)
        return torch.relu(v) + torch.relu(t + t) + torch.relu(self.bn_const(s) + 0.5)


def test_residual_near_misses_are_left_alone_with_their_reason():
    torch.manual_seed(0)
    model = ResidualNearMisses().eval()
    x = torch.randn(2, 8, 4, 4)
    want = model(x.clone())
    _, report = fasthg.accelerate(model, return_report=True)
    reasons = {c.where: c.reason for c in report.left_alone()}
    assert "sigmoid" in reasons["bn_sum"], str(report)
    assert "+= onto a residual" in reasons["bn_into_input"], str(report)
    assert "added to itself" in reasons["bn_self"], str(report)
    assert "added to a constant (0.5)" in reasons["bn_const"], str(report)
    assert not report.fused() and not any(isinstance(m, BNAddReLU) for m in model.modules())
    close(model(x.clone()), want)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_torchvision_resnets_fuse_every_bn_and_train_as_the_original(arch):
    """Every BN of torchvision's ResNets fused (BN-ReLU or BN-add-ReLU) but the downsampling
    BNs, whose output is the residual of a fused one; float64 steps as the original's."""
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    original = getattr(models, arch)(num_classes=10).double()
    accelerated, report = fasthg.accelerate(copy.deepcopy(original), return_report=True)
    bns = [n for n, m in original.named_modules() if isinstance(m, nn.BatchNorm2d)]
    downsampling = {n for n in bns if "downsample" in n}
    assert {c.where for c in report.fused()} == set(bns) - downsampling, str(report)
    assert {c.where for c in report.left_alone()} == downsampling
    assert all("is fused with the addition" in c.reason for c in report.left_alone())
    assert not any("not a ReLU" in c.reason for c in report)
    assert list(accelerated.state_dict()) == list(original.state_dict())
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    ref_outs, ref_grads, ref_buffers = run_steps(original, x)
    outs, grads, buffers = run_steps(accelerated, x)
    for a, b in zip(outs, ref_outs):
        close(a, b, tol=1e-10)
    for gs, rgs in zip(grads, ref_grads):
        scale = max(float(rg.abs().max()) for rg in rgs)
        for g, rg in zip(gs, rgs):
            close(g, rg, tol=1e-10, scale=scale)
    for a, b in zip(buffers, ref_buffers):
        close(a, b, tol=1e-10)
    if arch == "resnet18":  # float32 errs no more than eager float32 does against float64
        errs = {}  # (eager in the layout accelerate chose: oneDNN's float32 convolutions err more channels_last)
        eager = copy.deepcopy(original).to(memory_format=torch.channels_last)
        eager_x = x.contiguous(memory_format=torch.channels_last)
        for name, model, inp in (("eager", eager, eager_x), ("accelerated", copy.deepcopy(accelerated), x)):
            outs, grads, _ = run_steps(model.float(), inp.float(), steps=1)
            pairs = [(outs[0], ref_outs[0])] + list(zip(grads[0], ref_grads[0]))  # the first step's
            errs[name] = [float((a.double() - b).norm() / b.norm()) for a, b in pairs]
        assert all(a <= 2 * e + 1e-6 for a, e in zip(errs["accelerated"], errs["eager"])), errs
    clone = pickle.loads(pickle.dumps(accelerated))
    assert sum(isinstance(m, BNAddReLU) for m in clone.modules()) == len(report.fused()) - sum(
        c.kind == "bn_relu" for c in report.fused())
    with torch.no_grad():
        torch.testing.assert_close(clone(x), accelerated(x))


def test_the_untraceable_model_says_it_fell_back_to_submodules():
    *_, report = pair("recursive_hourglass")
    trace = [c for c in report if c.kind == "trace"]
    assert trace and trace[0].where == "<model>" and "submodules" in trace[0].reason, str(report)


def test_near_misses_are_left_alone_with_their_reason():
    _, accelerated, _, report = pair("not_to_rewrite")
    reasons = {c.where: c.reason for c in report.left_alone()}
    assert "2 users" in reasons["bn_two"]
    assert "LeakyReLU" in reasons["bn_leaky"]
    ups = [c.reason for c in report.left_alone() if c.kind == "upsample_add"]
    assert any("'bilinear'" in r for r in ups) and any("scale_factor 3" in r for r in ups)
    assert any("4 users" in r for r in ups) and any("mul" in r for r in ups), ups
    assert not any(isinstance(m, BNReLU) for m in accelerated.modules())


def test_state_dict_keys_and_tensors_are_unchanged():
    for name in MODELS:
        original, _ = build(name)
        before = original.state_dict(keep_vars=True)
        fasthg.accelerate(original)
        after = original.state_dict(keep_vars=True)
        assert list(after) == list(before), name
        assert all(after[k] is before[k] for k in before), f"{name}: the same tensor objects"


def test_idempotent():
    for name in MODELS:
        _, accelerated, x, first = pair(name)
        state = {k: v.clone() for k, v in accelerated.state_dict().items()}
        forward = type(accelerated).forward
        accelerated.eval()
        y = accelerated(x)
        again, second = fasthg.accelerate(accelerated, return_report=True)
        assert again is accelerated and not second.fused(), f"{name}: {second}"
        assert len(second) == len(first) and len([c for c in second if c.action == "already fused"]) == len(first.fused())
        assert type(accelerated).forward.__code__.co_code == forward.__code__.co_code
        assert torch.equal(accelerated(x), y)
        assert all(torch.equal(v, state[k]) for k, v in accelerated.state_dict().items())


def test_a_submodule_with_hooks_keeps_them_and_is_accelerated_inside():
    original, x = build("seq_hourglass")
    accelerated = copy.deepcopy(original)
    calls = []
    accelerated.low1.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    original.low1.register_forward_hook(lambda m, i, o: None)
    fasthg.accelerate(accelerated)
    assert isinstance(accelerated.low1.body[0], BNReLU)
    original.eval(), accelerated.eval()
    close(accelerated(x), original(x))
    assert calls == [torch.Size([4, 8, 8, 8])]


# ----------------------------------------------------------------------------- what it computes
def run_steps(model, x, steps=2):
    """Training steps (forward, backward) then an eval forward: outputs, grads, running stats."""
    model.train()
    outs, grads = [], []
    for i in range(steps):
        xi = (x + i).requires_grad_(True)
        y = model(xi)
        y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
        outs.append(y.detach())
        grads.append([xi.grad] + [p.grad.clone() for p in model.parameters()])
        model.zero_grad()
    model.eval()
    with torch.no_grad():
        outs.append(model(x))
    return outs, grads, [b.clone() for b in model.buffers()]


# (channels_last BN on the CPU makes the two largest models' runs 10 s: slow)
EQUALITY_CASES = [pytest.param(name, layout, id=f"{name}-{lid}",
                               marks=[pytest.mark.slow] if lid == "nhwc" and "hourglass" in name else [])
                  for name in MODELS
                  for layout, lid in ((torch.contiguous_format, "nchw"), (torch.channels_last, "nhwc"))]


@pytest.mark.parametrize("name,layout", EQUALITY_CASES)
def test_outputs_gradients_and_running_stats_equal_the_original(name, layout):
    original, accelerated, x, _ = pair(name, layout)
    ref_outs, ref_grads, ref_buffers = run_steps(original, x)
    outs, grads, buffers = run_steps(accelerated, x)
    for i, (a, b) in enumerate(zip(outs, ref_outs)):
        close(a, b, what=f"output {i}")
    for step, (gs, rgs) in enumerate(zip(grads, ref_grads)):
        scale = max(float(rg.abs().max()) for rg in rgs)
        for j, (g, rg) in enumerate(zip(gs, rgs)):
            close(g, rg, what=f"step {step} grad {j}", scale=scale)
    for a, b in zip(buffers, ref_buffers):
        close(a, b, what="buffer")


def test_the_guard_runs_the_original_ops_where_the_fused_op_would_differ():
    low = torch.randn(2, 3, 4, 5)
    cases = [  # broadcasting, odd size, another size, mixed dtypes, 3-D
        (low, torch.randn(2, 3, 1, 1), None), (low, torch.randn(2, 3, 9, 10), (9, 10)),
        (low, torch.randn(2, 3, 8, 10), (8, 11)), (low, torch.randn(2, 3, 8, 10, dtype=torch.float64), None),
    ]
    for lo, skip, size in cases:
        try:
            up = F.interpolate(lo, size=size, scale_factor=None if size else 2.0, mode="nearest")
            want = skip + up
        except RuntimeError:
            continue
        assert torch.equal(upsample_add_2x(lo, skip, size, "auto", False), want)
        assert torch.equal(upsample_add_2x(lo, skip, size, "auto", True), up + skip)


def test_functional_size_merge_on_odd_sizes_matches():
    # 18 -> pool 9 -> pool 4: the size=... merge is not 2x there and must fall back
    original, accelerated, _, _ = pair("functional_hourglass")
    x = torch.randn(2, 8, 18, 18)
    original.eval(), accelerated.eval()
    close(accelerated(x), original(x))


@pytest.mark.parametrize("name", ["seq_hourglass", "preact_resnet", "resnet_basic"])
def test_autocast(name):
    original, accelerated, x, _ = pair(name, torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, ref = accelerated(x), original(x)
    close(y.float(), ref.float(), tol=3e-2, what="bf16 autocast")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["seq_hourglass", "resnet_basic"])
def test_torch_compile(name):
    original, accelerated, x, _ = pair(name, torch.channels_last)
    torch._dynamo.reset()
    compiled = torch.compile(accelerated)
    ref_outs, ref_grads, _ = run_steps(original, x)
    outs, grads, _ = run_steps(compiled, x)
    for a, b in zip(outs, ref_outs):
        close(a, b)
    scale = max(float(g.abs().max()) for g in ref_grads[-1])
    for g, rg in zip(grads[-1], ref_grads[-1]):
        close(g, rg, scale=scale)


def test_deepcopy_and_pickle_keep_it_accelerated():
    _, accelerated, x, _ = pair("seq_hourglass")
    accelerated.eval()
    y = accelerated(x)
    for clone in (copy.deepcopy(accelerated), pickle.loads(pickle.dumps(accelerated))):
        assert type(clone).__name__ == "SeqHourglass" and hasattr(type(clone), "_fasthg_orig_cls")
        assert sum(isinstance(m, BNReLU) for m in clone.modules()) == 14
        assert torch.equal(clone(x), y)
        assert clone.state_dict().keys() == accelerated.state_dict().keys()
    buf = io.BytesIO()
    torch.save(accelerated.state_dict(), buf)
    buf.seek(0)
    plain, _ = build("seq_hourglass", seed=1)
    plain.load_state_dict(torch.load(buf))  # an accelerated model's checkpoint loads into the original
    plain.eval()
    close(plain(x), y)


def test_checkpoint_of_the_original_loads_after_accelerating():
    original, _ = build("small_unet")
    accelerated = fasthg.accelerate(build("small_unet", seed=1)[0])
    accelerated.load_state_dict(original.state_dict())
    original.eval(), accelerated.eval()
    x = torch.randn(2, 3, 16, 16)
    close(accelerated(x), original(x))


def test_ddp_single_process_gloo_and_sync_bn(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        original, x = build("seq_hourglass")
        accelerated = fasthg.accelerate(copy.deepcopy(original), sync_bn=True)
        assert all(m.sync for m in accelerated.modules() if isinstance(m, BNReLU))
        ddp, ref = DistributedDataParallel(accelerated), DistributedDataParallel(original)
        for model in (ddp, ref):
            model(x).square().mean().backward()
        scale = max(float(q.grad.abs().max()) for q in original.parameters())
        for (name, p), q in zip(accelerated.named_parameters(), original.parameters()):
            close(p.grad, q.grad, what=name, scale=scale)
    finally:
        dist.destroy_process_group()


def _ddp_worker(rank, init_file, out):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        model, x = build("seq_hourglass")
        ddp = DistributedDataParallel(fasthg.accelerate(model, sync_bn=True))
        y = ddp(x[2 * rank:2 * rank + 2])
        y.square().mean().backward()
        torch.save({"y": y.detach(), "grads": [p.grad for p in model.parameters()],
                    "buffers": list(model.buffers())}, f"{out}.{rank}")
        del ddp  # DDP's hold on the group goes before the group
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_with_sync_bn_follow_one_process_on_the_global_batch(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2)
    original, x = build("seq_hourglass")
    y = original(x)
    y.square().mean().backward()
    ranks = [torch.load(tmp_path / f"out.{r}") for r in range(2)]
    close(torch.cat([r["y"] for r in ranks]), y)
    scale = max(float(p.grad.abs().max()) for p in original.parameters())
    for r in ranks:
        for g, p in zip(r["grads"], original.parameters()):
            close(g, p.grad, scale=scale)
        for b, rb in zip(r["buffers"], original.buffers()):
            close(b, rb)


# ----------------------------------------------------------------------------- bad input
def test_bad_arguments_are_named():
    model = SeqResidual(4)
    with pytest.raises(TypeError, match="`model`"):
        fasthg.accelerate(lambda x: x)
    with pytest.raises(ValueError, match="`backend`"):
        fasthg.accelerate(model, backend="cuda")
    with pytest.raises(ValueError, match="`memory`"):
        fasthg.accelerate(model, memory="low")
    with pytest.raises(ValueError, match="`sync_bn`"):
        fasthg.accelerate(model, sync_bn="yes")


# ----------------------------------------------------------------------------- memory="recompute"
RECOMPUTE_UNITS = {"seq_hourglass": 14, "functional_hourglass": 3, "preact_resnet": 3}


@pytest.mark.parametrize("name", RECOMPUTE_UNITS)
def test_recompute_equals_the_original_and_keeps_the_state_dict(name):
    original, x = build(name)
    accelerated = copy.deepcopy(original)
    before = accelerated.state_dict(keep_vars=True)
    accelerated, report = fasthg.accelerate(accelerated, memory="recompute", return_report=True)
    assert sum(c.kind == "bn_relu_conv" for c in report.fused()) == RECOMPUTE_UNITS[name], str(report)
    after = accelerated.state_dict(keep_vars=True)
    assert list(after) == list(before) and all(after[k] is before[k] for k in before)
    ref_outs, ref_grads, ref_buffers = run_steps(original, x)
    outs, grads, buffers = run_steps(accelerated, x)
    for a, b in zip(outs, ref_outs):
        close(a, b)
    for gs, rgs in zip(grads, ref_grads):
        scale = max(float(rg.abs().max()) for rg in rgs)
        for g, rg in zip(gs, rgs):
            close(g, rg, scale=scale)
    for a, b in zip(buffers, ref_buffers):
        close(a, b)
    _, again = fasthg.accelerate(accelerated, memory="recompute", return_report=True)
    assert not again.fused() and len(again) == len(report), str(again)


def test_recompute_saves_fewer_activations():
    from fasthg.bench import memory

    model, x = build("seq_hourglass")
    default = fasthg.accelerate(copy.deepcopy(model))
    recompute = fasthg.accelerate(copy.deepcopy(model), memory="recompute")
    saved = {name: memory.saved_activation_bytes(lambda m=m: m(x), m.parameters())
             for name, m in (("default", default), ("recompute", recompute))}
    assert saved["recompute"] < 0.8 * saved["default"], saved


class _OwnConv(nn.Conv2d):
    """A user's subclass: accelerate leaves it alone."""


def test_convolutions_take_fasthgs_backward_in_place():
    """Every plain nn.Conv2d becomes a fasthg.nn.Conv2d (the same object and parameters), a
    subclass stays; again: "already"; in bf16 channels_last training the model's values and
    gradients stay within bf16's error of the original's (fasthg's AMX backward where it runs)."""
    from fasthg.nn import Conv2d

    torch.manual_seed(0)
    original = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 8, 1), _OwnConv(8, 6, 3, padding=1)).to(memory_format=torch.channels_last)
    model = copy.deepcopy(original)
    before = model.state_dict(keep_vars=True)
    convs = [model[0], model[3], model[4]]
    model, report = fasthg.accelerate(model, return_report=True)
    assert [type(c) for c in convs] == [Conv2d, Conv2d, _OwnConv] and model[0] is convs[0]
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(before) and all(after[k] is before[k] for k in before)
    assert {c.where for c in report if c.kind == "conv2d"} == {"0", "3"}, str(report)
    _, again = fasthg.accelerate(model, return_report=True)
    assert {c.action for c in again if c.kind == "conv2d"} == {"already backward on fasthg"}, str(again)
    x = torch.randn(2, 4, 40, 36).contiguous(memory_format=torch.channels_last)
    grads = []
    for m in (original, model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)
        out.float().square().sum().backward()
        grads.append((out.float(), [p.grad for p in m.parameters()]))
    (ref, ref_grads), (got, got_grads) = grads
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)
    for a, b in zip(got_grads, ref_grads):
        assert (a - b).abs().max() <= 3e-2 * b.abs().max()
    pickle.loads(pickle.dumps(model))


# ----------------------------------------------------------------------------- the layout step
class _Outputs(nn.Module):
    """A model whose outputs are a dict, a tuple and a 4-D tensor, and that can be told to fail."""

    def __init__(self):
        super().__init__()
        self.conv, self.fail = nn.Conv2d(3, 4, 3, padding=1), False

    def forward(self, x, scale=1.0):
        if self.fail:
            raise RuntimeError("asked to fail")
        y = self.conv(x) * scale
        return {"map": y, "pair": (y + 1, y.mean((2, 3)))}


def test_cpu_models_run_channels_last_inside_and_answer_in_the_inputs_layout():
    """accelerate (channels_last="auto") on a CPU model: 4-D parameters and inputs channels_last,
    outputs NCHW after NCHW inputs and channels_last after channels_last ones, and the same
    values and gradients (float64, where the convolution is layout-blind) as the original."""
    original, x = build("resnet_basic")
    original = original.double()
    accelerated, report = fasthg.accelerate(copy.deepcopy(original), return_report=True)
    assert [(c.kind, c.action) for c in report if c.kind == "layout"] == [("layout", "channels_last")]
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in accelerated.parameters() if p.dim() == 4)
    assert [k for k in accelerated.state_dict()] == [k for k in original.state_dict()]
    xd = x.double()
    ref_outs, ref_grads, ref_buffers = run_steps(original, xd)
    outs, grads, buffers = run_steps(accelerated, xd)
    for a, b in zip(outs + [g for gs in grads for g in gs] + buffers,
                    ref_outs + [g for gs in ref_grads for g in gs] + ref_buffers):
        close(a, b, tol=1e-10, scale=max(float(b.abs().max()), 1.0))
    y = accelerated(xd)
    assert not accelerated._fasthg_nchw_calls
    assert torch.equal(accelerated(xd.contiguous(memory_format=torch.channels_last)), y)


def test_layout_step_outputs_pickling_failures_and_a_second_call():
    torch.manual_seed(0)
    model, report = fasthg.accelerate(_Outputs(), return_report=True)
    x = torch.randn(2, 3, 5, 6)
    want = _Outputs()
    want.load_state_dict(model.state_dict())
    for m in (model, pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        out = m(x, scale=2.0)
        ref = want(x, scale=2.0)
        assert out["map"].is_contiguous() and out["pair"][0].is_contiguous()
        torch.testing.assert_close(out["map"], ref["map"])
        torch.testing.assert_close(out["pair"][1], ref["pair"][1])
        m.fail = True
        with pytest.raises(RuntimeError, match="asked to fail"):
            m(x)
        m.fail = False
        assert m._fasthg_nchw_calls == [] and m(x)["map"].is_contiguous()
        cl = m(x.contiguous(memory_format=torch.channels_last))["map"]  # channels_last in, channels_last out
        assert cl.is_contiguous(memory_format=torch.channels_last) and not cl.is_contiguous()
    again, second = fasthg.accelerate(model, return_report=True)
    assert [c.action for c in second if c.kind == "layout"] == ["already channels_last"]
    assert len(model._forward_pre_hooks) == 1 and len(model._forward_hooks) == 1


def test_layout_choices():
    kept, report = fasthg.accelerate(_Outputs(), channels_last=False, return_report=True)
    assert not any(c.kind == "layout" for c in report) and not kept._forward_pre_hooks
    assert kept.conv.weight.is_contiguous() and not kept.conv.weight.is_contiguous(memory_format=torch.channels_last)
    no_convs = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU())
    _, report = fasthg.accelerate(no_convs, return_report=True)
    assert not any(c.kind == "layout" for c in report)  # "auto": nothing to gain without convolutions
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="channels_last"):
            fasthg.accelerate(_Outputs(), channels_last=bad)
