"""fasthg.models.from_checkpoint: checkpoints of the authors' PyTorch port (princeton-vl's
pytorch_stacked_hourglass) and of pytorch-pose (bearpaw) give fasthg models whose heatmaps
equal the original networks' on the same images; fasthg's own checkpoints round-trip (stem
and input normalisation included); what does not map is refused by name.

The two peers' networks are written below from their published structure (module names kept,
so their state_dict keys are the real checkpoints'; code our own). Their widths and depth are
arguments here so the tests stay small: the authors' PoseNet fixes depth 4 (its width and
stack count are arguments there too); pytorch-pose's HourglassNet fixes 128 features inside
its residuals (256 channels) and depth 4, which the defaults below keep."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fasthg import checkpoint
from fasthg.models import StackedHourglass, from_checkpoint
from fasthg.models.convert import read_checkpoint


# -- the authors' PyTorch port (models/layers.py, models/posenet.py, task/pose.py) -------------

class PConv(nn.Module):
    """conv (always with bias), then BN if bn, then ReLU if relu."""

    def __init__(self, cin, cout, k=3, stride=1, bn=False, relu=True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, padding=(k - 1) // 2, bias=True)
        self.relu = nn.ReLU() if relu else None
        self.bn = nn.BatchNorm2d(cout) if bn else None

    def forward(self, x):
        x = self.conv(x)
        x = self.bn(x) if self.bn is not None else x
        return self.relu(x) if self.relu is not None else x


class PResidual(nn.Module):
    """Pre-activation bottleneck; skip_layer is built always, used only when widths differ."""

    def __init__(self, cin, cout):
        super().__init__()
        mid = cout // 2
        self.relu = nn.ReLU()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), PConv(cin, mid, 1, relu=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(mid), PConv(mid, mid, 3, relu=False)
        self.bn3, self.conv3 = nn.BatchNorm2d(mid), PConv(mid, cout, 1, relu=False)
        self.skip_layer = PConv(cin, cout, 1, relu=False)
        self.need_skip = cin != cout

    def forward(self, x):
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return out + (self.skip_layer(x) if self.need_skip else x)


class PHourglass(nn.Module):
    def __init__(self, n, f, increase=0):
        super().__init__()
        nf = f + increase
        self.up1 = PResidual(f, f)
        self.pool1 = nn.MaxPool2d(2, 2)
        self.low1 = PResidual(f, nf)
        self.low2 = PHourglass(n - 1, nf) if n > 1 else PResidual(nf, nf)
        self.low3 = PResidual(nf, f)
        self.up2 = nn.Upsample(scale_factor=2, mode="nearest")

    def forward(self, x):
        return self.up1(x) + self.up2(self.low3(self.low2(self.low1(self.pool1(x)))))


class PMerge(nn.Module):
    def __init__(self, x_dim, y_dim):
        super().__init__()
        self.conv = PConv(x_dim, y_dim, 1, relu=False, bn=False)

    def forward(self, x):
        return self.conv(x)


class PoseNet(nn.Module):
    """Takes NHWC images (pixel / 255, RGB); returns [B, nstack, oup_dim, H/4, W/4]."""

    def __init__(self, nstack, inp_dim, oup_dim, increase=0, depth=4):
        super().__init__()
        self.nstack = nstack
        self.pre = nn.Sequential(PConv(3, 64, 7, 2, bn=True, relu=True), PResidual(64, 128), nn.MaxPool2d(2, 2),
                                 PResidual(128, 128), PResidual(128, inp_dim))
        self.hgs = nn.ModuleList(nn.Sequential(PHourglass(depth, inp_dim, increase)) for _ in range(nstack))
        self.features = nn.ModuleList(nn.Sequential(PResidual(inp_dim, inp_dim),
                                                    PConv(inp_dim, inp_dim, 1, bn=True, relu=True))
                                      for _ in range(nstack))
        self.outs = nn.ModuleList(PConv(inp_dim, oup_dim, 1, relu=False, bn=False) for _ in range(nstack))
        self.merge_features = nn.ModuleList(PMerge(inp_dim, inp_dim) for _ in range(nstack - 1))
        self.merge_preds = nn.ModuleList(PMerge(oup_dim, inp_dim) for _ in range(nstack - 1))

    def forward(self, imgs):
        x = self.pre(imgs.permute(0, 3, 1, 2))
        preds = []
        for i in range(self.nstack):
            feature = self.features[i](self.hgs[i](x))
            preds.append(self.outs[i](feature))
            if i < self.nstack - 1:
                x = x + self.merge_preds[i](preds[-1]) + self.merge_features[i](feature)
        return torch.stack(preds, 1)


class PTrainer(nn.Module):
    """The port's training wrapper: the network as .model (DataParallel inside)."""

    def __init__(self, model):
        super().__init__()
        self.model = model


def princeton_checkpoint(path, net):
    state = PTrainer(nn.DataParallel(net)).state_dict()
    optimizer = torch.optim.Adam(net.parameters(), 1e-3)
    torch.save({"state_dict": state, "optimizer": optimizer.state_dict(), "epoch": 7}, path)


# -- pytorch-pose (pose/models/hourglass.py, example/main.py) -------------------------------------

class Bottleneck(nn.Module):
    expansion = 2

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(inplanes), nn.Conv2d(inplanes, planes, 1, bias=True)
        self.bn2, self.conv2 = nn.BatchNorm2d(planes), nn.Conv2d(planes, planes, 3, stride, padding=1, bias=True)
        self.bn3, self.conv3 = nn.BatchNorm2d(planes), nn.Conv2d(planes, planes * 2, 1, bias=True)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return out + (self.downsample(x) if self.downsample is not None else x)


class BHourglass(nn.Module):
    """hg[n] for level n (n = depth-1 outermost): [0] up1, [1] low1, [2] low3, [3] the
    innermost level's low2; each a Sequential of num_blocks bottlenecks."""

    def __init__(self, block, num_blocks, planes, depth):
        super().__init__()
        self.depth = depth
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.hg = nn.ModuleList(
            nn.ModuleList(nn.Sequential(*(block(planes * 2, planes) for _ in range(num_blocks)))
                          for _ in range(4 if n == 0 else 3))
            for n in range(depth))

    def level(self, n, x):
        up1 = self.hg[n - 1][0](x)
        low1 = self.hg[n - 1][1](F.max_pool2d(x, 2, stride=2))
        low2 = self.level(n - 1, low1) if n > 1 else self.hg[n - 1][3](low1)
        return up1 + self.upsample(self.hg[n - 1][2](low2))

    def forward(self, x):
        return self.level(self.depth, x)


class HourglassNet(nn.Module):
    """Returns a list of each stack's heatmaps."""

    def __init__(self, num_stacks=2, num_blocks=1, num_classes=16, num_feats=128, depth=4):
        super().__init__()
        block = Bottleneck
        self.inplanes, self.num_feats, self.num_stacks = 64, num_feats, num_stacks
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=True)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_residual(block, self.inplanes, 1)
        self.layer2 = self._make_residual(block, self.inplanes, 1)
        self.layer3 = self._make_residual(block, self.num_feats, 1)
        self.maxpool = nn.MaxPool2d(2, stride=2)
        ch = num_feats * 2
        self.hg = nn.ModuleList(BHourglass(block, num_blocks, num_feats, depth) for _ in range(num_stacks))
        self.res = nn.ModuleList(self._make_residual(block, num_feats, num_blocks) for _ in range(num_stacks))
        self.fc = nn.ModuleList(nn.Sequential(nn.Conv2d(ch, ch, 1, bias=True), nn.BatchNorm2d(ch), self.relu)
                                for _ in range(num_stacks))
        self.score = nn.ModuleList(nn.Conv2d(ch, num_classes, 1, bias=True) for _ in range(num_stacks))
        self.fc_ = nn.ModuleList(nn.Conv2d(ch, ch, 1, bias=True) for _ in range(num_stacks - 1))
        self.score_ = nn.ModuleList(nn.Conv2d(num_classes, ch, 1, bias=True) for _ in range(num_stacks - 1))

    def _make_residual(self, block, planes, blocks):
        downsample = None
        if self.inplanes != planes * 2:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * 2, 1, bias=True))
        layers = [block(self.inplanes, planes, 1, downsample)]
        self.inplanes = planes * 2
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.maxpool(self.layer1(x))))
        out = []
        for i in range(self.num_stacks):
            y = self.fc[i](self.res[i](self.hg[i](x)))
            out.append(self.score[i](y))
            if i < self.num_stacks - 1:
                x = x + self.fc_[i](y) + self.score_[i](out[-1])
        return out


def pytorch_pose_checkpoint(path, net, arch="hg"):
    model = nn.DataParallel(net)
    optimizer = torch.optim.RMSprop(model.parameters(), lr=2.5e-4)
    torch.save({"epoch": 3, "arch": arch, "state_dict": model.state_dict(), "best_acc": torch.tensor(0.5),
                "optimizer": optimizer.state_dict()}, path)


# -- helpers ---------------------------------------------------------------------------------------

def randomise(net, seed=0):
    """Random weights, BN affine parameters and running statistics far from 0/1, so that a
    BN or bias mapped to the wrong place shows in the heatmaps."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.num_batches_tracked.fill_(int(torch.randint(1, 1000, (), generator=g)))
            elif isinstance(m, nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / (m.weight[0].numel() ** 0.5))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return net.eval()


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def images01(batch, h, w, seed=1):
    """RGB pixel / 255 as the peers feed it, [B, 3, H, W]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, h, w), generator=g).double() / 255


# -- same heatmaps ---------------------------------------------------------------------------------

@pytest.mark.parametrize("stacks,features,joints,size", [(1, 16, 16, (64, 64)), (2, 32, 5, (64, 128))])
def test_princeton_checkpoint_gives_the_same_heatmaps(tmp_path, stacks, features, joints, size):
    net = randomise(PoseNet(stacks, features, joints)).double()
    path = str(tmp_path / "checkpoint.pt")
    princeton_checkpoint(path, net)
    model = from_checkpoint(path, backend="eager").double()
    assert model.config == {"num_stacks": stacks, "num_features": features, "num_joints": joints, "depth": 4,
                            "stem": "paper", "input_norm": {"mean": [0.0] * 3, "std": [1.0] * 3}, "num_blocks": 1}
    x01 = images01(2, *size)
    with torch.no_grad():
        ref = net(x01.permute(0, 2, 3, 1))  # NHWC, pixel / 255
        out = model(x01 - 0.5)  # fasthg's input: NCHW, pixel / 255 - 0.5
    assert out.shape == ref.shape == (2, stacks, joints, size[0] // 4, size[1] // 4)
    assert rel_err(out, ref) < 1e-12
    assert ref.std() > 0.1 * ref.abs().mean()  # heatmaps that vary, not a constant that any mapping gives
    ckpt = read_checkpoint(path)
    assert ckpt.kind == "pytorch_stacked_hourglass" and ckpt.contents["epoch"] == 7
    # The identity residuals' unused skip_layer: dropped by name, nothing else.
    assert ckpt.dropped and all(".skip_layer.conv." in k and k.startswith("model.module.") for k in ckpt.dropped)
    assert "model.module.pre.3.skip_layer.conv.weight" in ckpt.dropped
    assert "model.module.pre.1.skip_layer.conv.weight" not in ckpt.dropped  # 64 -> 128: used


def test_princeton_checkpoint_float32_on_the_default_backend(tmp_path):
    net = randomise(PoseNet(2, 16, 16), seed=3)
    path = str(tmp_path / "checkpoint.pt")
    princeton_checkpoint(path, net)
    model = from_checkpoint(path)  # backend auto: the native kernels where built
    x01 = images01(2, 64, 64).float()
    with torch.no_grad():
        ref = net.double()(x01.double().permute(0, 2, 3, 1))
        out = model(x01 - 0.5)
        out_cl = model.to(memory_format=torch.channels_last)((x01 - 0.5).contiguous(memory_format=torch.channels_last))
    assert rel_err(out, ref) < 1e-5 and rel_err(out_cl, ref) < 1e-5


@pytest.mark.parametrize("stacks,feats,joints,depth,size,blocks", [
    (2, 8, 16, 4, (64, 64), 1), (3, 8, 17, 2, (32, 48), 1), (2, 8, 16, 2, (32, 32), 3),  # --blocks 3
    pytest.param(1, 128, 16, 4, (64, 64), 1, marks=pytest.mark.slow)])  # the published widths: 256 channels
def test_pytorch_pose_checkpoint_gives_the_same_heatmaps(tmp_path, stacks, feats, joints, depth, size, blocks):
    net = randomise(HourglassNet(stacks, blocks, joints, num_feats=feats, depth=depth), seed=stacks).double()
    path = str(tmp_path / "checkpoint.pth.tar")
    pytorch_pose_checkpoint(path, net)
    mean = [0.45, 0.43, 0.40]
    model = from_checkpoint(path, backend="eager", input_mean=mean).double()
    assert model.config == {"num_stacks": stacks, "num_features": 2 * feats, "num_joints": joints, "depth": depth,
                            "stem": "pytorch-pose", "input_norm": {"mean": mean, "std": [1.0] * 3},
                            "num_blocks": blocks}
    x01 = images01(2, *size)
    with torch.no_grad():
        ref = torch.stack(net(x01 - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)), 1)
        out = model(x01 - 0.5)
    assert out.shape == ref.shape == (2, stacks, joints, size[0] // 4, size[1] // 4)
    assert rel_err(out, ref) < 1e-12
    assert ref.std() > 0.1 * ref.abs().mean()
    assert read_checkpoint(path, input_mean=mean).dropped == []


def test_pytorch_pose_mean_from_its_file_or_fasthgs_with_a_warning(tmp_path):
    net = randomise(HourglassNet(1, 1, 16, num_feats=8, depth=2)).double()
    path = str(tmp_path / "checkpoint.pth.tar")
    pytorch_pose_checkpoint(path, net)
    torch.save({"mean": torch.tensor([0.44, 0.44, 0.43]), "std": torch.tensor([0.25, 0.24, 0.25])},
               tmp_path / "mean.pth.tar")
    model = from_checkpoint(path, input_mean=str(tmp_path / "mean.pth.tar"))
    assert model.config["input_norm"]["mean"] == pytest.approx([0.44, 0.44, 0.43])
    with pytest.warns(UserWarning, match="mean.pth.tar.*fasthg's 0.5 stands in"):
        model = from_checkpoint(path, backend="eager").double()
    assert model.config["input_norm"] is None
    x01 = images01(1, 32, 32)
    with torch.no_grad():
        assert rel_err(model(x01 - 0.5), torch.stack(net(x01 - 0.5), 1)) < 1e-12


def test_wrappers_are_stripped_and_a_bare_state_dict_loads(tmp_path):
    net = randomise(PoseNet(1, 16, 16))
    for prefix in ("", "module.", "model.", "_orig_mod.module."):
        path = str(tmp_path / "bare.pt")
        torch.save({prefix + k: v for k, v in net.state_dict().items()}, path)
        model = from_checkpoint(path, backend="eager")
        assert torch.equal(model.heads[0].weight, net.outs[0].conv.weight)


# -- fasthg's own checkpoints ----------------------------------------------------------------------

@pytest.mark.parametrize("stem,blocks", [("paper", 1), ("pytorch-pose", 1), ("paper", 2)])
def test_a_bare_fasthg_state_dict_loads_with_its_shape_inferred(tmp_path, stem, blocks):
    model = StackedHourglass(3, 32, 7, 3, backend="eager", stem=stem, num_blocks=blocks)
    path = str(tmp_path / "weights.pt")
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, path)
    loaded = from_checkpoint(path)
    assert loaded.config == model.config
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_fasthg_checkpoints_round_trip_with_stem_and_input_norm(tmp_path):
    torch.manual_seed(0)
    norm = {"mean": [0.4, 0.5, 0.6], "std": [1.0, 0.5, 2.0]}
    model = StackedHourglass(2, 16, 5, 2, backend="eager", stem="pytorch-pose", input_norm=norm).eval()
    path = str(tmp_path / "m.pt")
    checkpoint.save(path, model, input_size=64)
    loaded = from_checkpoint(path, backend="eager")
    assert loaded.config == model.config and loaded.config["stem"] == "pytorch-pose"
    assert read_checkpoint(path).input_size == 64
    x = torch.rand(1, 3, 32, 32) - 0.5
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_a_checkpoint_from_before_the_stem_option_loads_as_the_papers(tmp_path):
    model = StackedHourglass(1, 16, 16, 2, backend="eager")
    state = {"format": checkpoint.FORMAT, "model": model.state_dict(),
             "model_config": {"num_stacks": 1, "num_features": 16, "num_joints": 16, "depth": 2}}
    path = str(tmp_path / "old.pt")
    torch.save(state, path)
    assert from_checkpoint(path).config["stem"] == "paper"
    # resume's check: a model built today has the old checkpoint's shape
    checkpoint.load_model(path, model=StackedHourglass(1, 16, 16, 2, backend="eager"))


def test_the_stems_differ_in_their_last_two_residuals_widths():
    paper, bearpaw = (StackedHourglass(1, 32, 16, 1, stem=s) for s in ("paper", "pytorch-pose"))
    assert (paper.stem[4].body[5].out_channels, paper.stem[5].body[0].num_features) == (128, 128)
    assert (bearpaw.stem[4].body[5].out_channels, bearpaw.stem[5].body[0].num_features) == (256, 256)
    for model in (paper, bearpaw):
        assert model.stem[5].body[5].out_channels == 32
    with pytest.raises(ValueError, match="stem must be one of"):
        StackedHourglass(1, 32, stem="resnet")
    with pytest.raises(ValueError, match="input_norm must be"):
        StackedHourglass(1, 32, input_norm={"mean": [0.5], "std": [1, 1, 1]})


# -- what is refused -------------------------------------------------------------------------------

def test_a_truncated_file_is_refused(tmp_path):
    path = tmp_path / "checkpoint.pt"
    princeton_checkpoint(str(path), PoseNet(1, 16, 16))
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ValueError, match="cut.pt: not a readable fasthg checkpoint"):
        from_checkpoint(str(cut))


def test_a_classifier_is_refused_naming_its_modules(tmp_path):
    resnetish = {"conv1.weight": torch.zeros(64, 3, 7, 7), "bn1.weight": torch.ones(64),
                 "layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1),
                 "layer4.0.conv1.weight": torch.zeros(512, 1024, 1, 1),
                 "fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)}
    path = str(tmp_path / "resnet.pth")
    torch.save({"state_dict": {"module." + k: v for k, v in resnetish.items()}, "epoch": 90}, path)
    with pytest.raises(ValueError, match=r"not a fasthg checkpoint, nor a stacked hourglass.*"
                                         r"bn1, conv1, fc, layer1, layer4"):
        from_checkpoint(path)
    torch.save({"epoch": 1, "optimizer": {}}, path)
    with pytest.raises(ValueError, match=r"nor a model checkpoint with a 'state_dict'.*epoch, optimizer"):
        from_checkpoint(path)


def test_missing_extra_and_misshapen_keys_are_named(tmp_path):
    net = PoseNet(2, 16, 16)
    state = {"model.module." + k: v for k, v in net.state_dict().items()}
    path = str(tmp_path / "checkpoint.pt")

    def refused(state, *words):
        torch.save({"state_dict": state, "epoch": 1}, path)
        with pytest.raises(ValueError) as e:
            from_checkpoint(path)
        for word in words:
            assert word in str(e.value), str(e.value)

    cut = dict(state)
    del cut["model.module.hgs.1.0.low1.bn2.running_var"], cut["model.module.merge_preds.0.conv.conv.bias"]
    refused(cut, "keys missing (2)", "model.module.hgs.1.0.low1.bn2.running_var",
            "model.module.merge_preds.0.conv.conv.bias")
    # a classification head beside the heatmaps: another task's network
    refused({**state, "model.module.classifier.weight": torch.zeros(10, 16)},
            "keys that map to nothing in it (1): model.module.classifier.weight")
    # a stack whose heatmap head is not a 1x1 conv
    odd = {**state, "model.module.outs.1.conv.weight": torch.zeros(16, 16, 3, 3)}
    refused(odd, "shapes that differ (1)", "model.module.outs.1.conv.weight (16, 16, 3, 3) (expected (16, 16, 1, 1))")
    # a one-channel input stem (a fork's grey images)
    grey = {**state, "model.module.pre.0.conv.weight": torch.zeros(64, 1, 7, 7)}
    refused(grey, "model.module.pre.0.conv.weight (64, 1, 7, 7) (expected (64, 3, 7, 7))")


def test_peer_options_without_a_fasthg_counterpart_are_refused(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    princeton_checkpoint(path, PoseNet(1, 16, 16, increase=8, depth=2))
    with pytest.raises(ValueError, match="increase=8"):
        from_checkpoint(path)
    with pytest.raises(ValueError, match="input_mean is for pytorch-pose"):
        princeton_checkpoint(path, PoseNet(1, 16, 16, depth=2))
        from_checkpoint(path, input_mean=[0.5] * 3)


# -- the command line ------------------------------------------------------------------------------

def test_eval_and_predict_take_the_peers_checkpoints(tmp_path, capsys):
    import cv2
    import numpy as np

    from fasthg.cli import main

    princeton, bearpaw = str(tmp_path / "princeton.pt"), str(tmp_path / "bearpaw.pth.tar")
    princeton_checkpoint(princeton, randomise(PoseNet(1, 16, 16)))
    pytorch_pose_checkpoint(bearpaw, randomise(HourglassNet(1, 1, 16, num_feats=8)))
    assert main(["eval", princeton, "--n", "4", "--input-size", "64", "--device", "cpu"]) == 0
    assert "PCKh@0.5 on 4 people" in capsys.readouterr().out
    img = str(tmp_path / "person.png")
    cv2.imwrite(img, np.full((70, 50, 3), 100, np.uint8))
    assert main(["predict", bearpaw, img, "--input-size", "64", "--input-mean", "0.44,0.44,0.43",
                 "--out", str(tmp_path / "pred"), "--device", "cpu"]) == 0
    assert cv2.imread(str(tmp_path / "pred" / "person_pose.png")).shape == (70, 50, 3)


def _train(tmp_path, *extra):
    from fasthg.cli import main

    return main(["train", "--out", str(tmp_path / "run"), "--epochs", "1", "--train-size", "8", "--val-size", "4",
                 "--batch-size", "4", "--input-size", "64", "--workers", "0", "--no-progress", "--device", "cpu",
                 "--backend", "eager", *extra])


@pytest.mark.slow
def test_train_init_adopts_the_checkpoints_model_and_resumes_without_it(tmp_path, capsys):
    init = tmp_path / "princeton.pt"
    net = randomise(PoseNet(1, 16, 16))
    princeton_checkpoint(str(init), net)
    assert _train(tmp_path, "--init", str(init)) == 0
    last = tmp_path / "run" / "last.pt"
    state = checkpoint.read(str(last))
    assert state["model_config"] == from_checkpoint(str(init)).config  # depth 4, its input_norm
    assert state["config"]["init"] == str(init) and state["epoch"] == 1
    assert state["config"]["depth"] == 4 and state["config"]["features"] == 16  # not the CPU defaults (3, 64)
    assert not torch.equal(state["model"]["heads.0.weight"], net.outs[0].conv.weight)  # trained from there
    init.unlink()  # a resumed run has its weights in its own checkpoint
    assert _train(tmp_path, "--resume", str(last), "--epochs", "2") == 0
    assert checkpoint.read(str(last))["epoch"] == 2


@pytest.mark.filterwarnings("ignore:.*pytorch-pose subtracted")
def test_train_init_refuses_another_shape_and_resume(tmp_path, capsys, monkeypatch):
    from test_cli_errors import fails

    init = str(tmp_path / "bearpaw.pth.tar")
    pytorch_pose_checkpoint(init, randomise(HourglassNet(1, 1, 16, num_feats=8, depth=2)))
    common = ["train", "--init", init, "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "run")]
    fails(capsys, monkeypatch, common + ["--stacks", "2", "--depth", "3"], 1,
          "--init", "another model than the checkpoint's: --stacks 2 (it has 1), --depth 3 (it has 2)")
    pytorch_pose_checkpoint(init, randomise(HourglassNet(1, 1, 17, num_feats=8, depth=2)))
    fails(capsys, monkeypatch, common, 1, "a model of 17 joints, and the training data has 16")
    fails(capsys, monkeypatch, common + ["--resume", init], 2, "give one of them")
