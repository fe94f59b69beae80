"""The Stacked Hourglass network (Newell, Yang, Deng, ECCV 2016), as in the authors' Torch
code: pre-activation bottleneck residual modules, hourglasses of depth 4 whose skip merges
are nearest-2x-upsample + add, and intermediate supervision between stacks."""
from typing import List, Optional

import torch
from torch import nn

from fasthg import ops
from fasthg.nn import BNReLU, Conv2d, MaxPool2x2


MEMORY = ("default", "recompute")


def _bn(bn, h, sums):
    """bn(h), with h's sums where a unit gave them (BNReLU's `sums`)."""
    return bn(h) if sums is None else bn(h, sums=sums)


class Residual(nn.Module):
    """BN-ReLU-conv1x1(C/2) -> BN-ReLU-conv3x3(C/2) -> BN-ReLU-conv1x1(C), plus the input
    (through a 1x1 conv when the channel counts differ). Paper Fig. 4. memory="recompute"
    runs each BN-ReLU-conv pair of the body as fasthg.ops.bn_relu_conv (same modules, same
    state_dict), which recomputes relu(bn(x)) in the backward instead of storing it. On the
    CPU, in either mode, a 1x1 pair that fasthg.ops.bn_relu_conv1x1 runs fused in training
    (the native unit, channels_last, the dtypes of FASTHG_CPU_CONV1X1) goes there
    (fasthg.ops.fuses_conv1x1). On the CPU the first BN-ReLU (or recomputing or fused unit) takes the
    input for both branches (BNReLU.forward_with_skip, ops.bn_relu_conv_with_skip), so that in
    native training the skip branch's gradient is added in that BN-ReLU's backward pass rather
    than in one of autograd's own, and the last convolution adds the skip branch in its
    epilogue (fasthg.ops.conv_add; not in recompute, whose last unit adds after it). A fused
    first unit in bf16 also hands its output's per-channel sums to the next BN-ReLU, which
    takes its statistics from them instead of a pass over that output. Its
    convolutions are fasthg.nn.Conv2d: nn.Conv2d with fasthg's backward in bf16 training on AMX
    CPUs (fasthg.ops.conv2d)."""

    def __init__(self, in_channels: int, out_channels: int, backend: str = "auto", memory: str = "default"):
        super().__init__()
        self.backend, self.memory = backend, memory
        mid = out_channels // 2
        self.body = nn.Sequential(
            BNReLU(in_channels, backend=backend), Conv2d(in_channels, mid, 1, backend=backend),
            BNReLU(mid, backend=backend), Conv2d(mid, mid, 3, padding=1, backend=backend),
            BNReLU(mid, backend=backend), Conv2d(mid, out_channels, 1, backend=backend),
        )
        self.skip = nn.Identity() if in_channels == out_channels else Conv2d(in_channels, out_channels, 1, backend=backend)

    def forward(self, x):
        h = skip = x
        sums = None  # h's per-channel sums, where the unit that wrote h took them
        for i in range(0, len(self.body), 2):
            bn, conv = self.body[i], self.body[i + 1]
            # The fused 1x1 unit stores what recompute stores, so on the CPU, where it was
            # measured, it runs in either mode (on a GPU, Triton's in recompute only).
            cpu = h.device.type == "cpu"
            if self.memory == "recompute" or (cpu and ops.fuses_conv1x1(h, bn, conv, self.backend, i == 0)):
                if i == 0 and cpu:  # (the unit's skip, as below; its output's sums for the next BN)
                    (h, sums), skip = ops.bn_relu_conv_with_skip(h, bn, conv, backend=self.backend, out_stats=True)
                    continue
                h = ops.bn_relu_conv(h, bn, conv, backend=self.backend, sums=sums)
            elif i == 0 and cpu:  # the skip branch's gradient joins the BN-ReLU's backward pass
                y, skip = bn.forward_with_skip(h)
                h = conv(y)
            elif i == len(self.body) - 2:  # the merge in the convolution's epilogue where it fuses
                return ops.conv_add(_bn(bn, h, sums), conv, self.skip(skip), backend=self.backend)
            else:
                h = conv(_bn(bn, h, sums))
            sums = None
        return h + self.skip(skip)


def residuals(channels: int, blocks: int, backend: str = "auto", memory: str = "default") -> nn.Module:
    """What sits at one place of the network: a Residual (the paper's main network), or `blocks`
    of them in a row (the paper's equal-parameter variants, Fig. 9; pytorch-pose's num_blocks),
    as an nn.Sequential whose state_dict keys are pytorch-pose's (place.0, place.1, ...)."""
    if blocks == 1:
        return Residual(channels, channels, backend, memory)
    return nn.Sequential(*(Residual(channels, channels, backend, memory) for _ in range(blocks)))


class Hourglass(nn.Module):
    """up1 = res(x); low = res(maxpool2x2(x)) -> hourglass(depth-1) or res -> res;
    out = up1 + nearest_upsample_2x(low), the merge fused by ops.upsample_add, the pool
    ops.max_pool2x2. Each res is `blocks` residual modules (residuals()). On the CPU up1 takes
    x from the pool (ops.max_pool2x2_with_skip), so that in native training its gradient is
    added in the pool's backward pass rather than in one of autograd's own."""

    def __init__(self, depth: int, channels: int, backend: str = "auto", memory: str = "default", blocks: int = 1):
        super().__init__()
        self.backend, self.memory = backend, memory
        self.up1 = residuals(channels, blocks, backend, memory)
        self.low1 = residuals(channels, blocks, backend, memory)
        self.low2 = (Hourglass(depth - 1, channels, backend, memory, blocks) if depth > 1
                     else residuals(channels, blocks, backend, memory))
        self.low3 = residuals(channels, blocks, backend, memory)

    def forward(self, x):
        # the native and triton pools keep no indices (their input x is saved by up1 anyway)
        if x.device.type == "cpu":  # up1's gradient is added in the pool's backward pass
            pooled, x = ops.max_pool2x2_with_skip(x, backend=self.backend)
        else:
            pooled = ops.max_pool2x2(x, backend=self.backend)
        return self._merge(self.low3(self.low2(self.low1(pooled))), self.up1(x))

    def _merge(self, low, up1):
        """up1 + nearest_upsample_2x(low), fused."""
        if low.dtype != up1.dtype:  # autocast may leave the branches in different dtypes
            dtype = torch.promote_types(low.dtype, up1.dtype)
            low, up1 = low.to(dtype), up1.to(dtype)
        return ops.upsample_add(low, up1, backend=self.backend)


# Stems after the 7x7 conv: the paper's residuals 64->128, pool, 128->128, 128->F, and
# pytorch-pose's (bearpaw's HourglassNet) 64->128, pool, 128->256, 256->F.
STEMS = ("paper", "pytorch-pose")
# Config keys later than the first checkpoints, with the value a config without them means.
CONFIG_DEFAULTS = {"stem": "paper", "input_norm": None, "num_blocks": 1}


def complete_config(config: dict) -> dict:
    """A model config with the keys an older checkpoint's lacks filled in (stem "paper", no
    input_norm, one residual module per place), so that configs compare equal whatever fasthg
    wrote them."""
    return {**CONFIG_DEFAULTS, **config}


def _input_norm(value) -> Optional[dict]:
    """input_norm as {"mean": [r, g, b], "std": [r, g, b]} of floats, or None."""
    if value is None:
        return None
    try:
        mean, std = ([float(v) for v in value[k]] for k in ("mean", "std"))
    except (TypeError, KeyError, ValueError):
        mean = std = None
    if mean is None or len(mean) != 3 or len(std) != 3 or not all(s > 0 for s in std):
        raise ValueError(f"input_norm must be None or {{'mean': 3 floats, 'std': 3 positive floats}}, got {value!r}")
    return {"mean": mean, "std": std}


class StackedHourglass(nn.Module):
    """Input [B, 3, H, W] (H, W multiples of 4 * 2**depth); output the heatmaps of every
    stack, [B, num_stacks, num_joints, H/4, W/4]. The loss supervises every stack.

    Images come as fasthg's data pipeline makes them: RGB in [-0.5, 0.5] (pixel / 255 - 0.5).
    `input_norm` {"mean", "std"} (per RGB channel) is for weights trained on other inputs
    (a converted checkpoint, fasthg.models.from_checkpoint): the network then feeds its stem
    (pixel / 255 - mean) / std, computed from the images it is given, so fasthg's data,
    eval and predict run such a model unchanged. `stem`: "paper" or "pytorch-pose" (STEMS).
    `num_blocks`: residual modules at each place of the hourglasses and of the features (1, the
    paper's main network; its equal-parameter study has 2 stacks of 4, 4 of 2 and 8 of 1).

    On the CPU a model with a backend other than eager runs channels_last inside whatever the
    images' layout (NCHW images converted once, heatmaps returned NCHW): its fused ops and
    oneDNN's convolutions run faster so (bf16 hg2 step 3x, float32 1.4x against NCHW eager on a
    2-core AMX Xeon).

    memory="recompute": the BN-ReLU-conv units (the residual modules' three, and the
    features' BN-ReLU before the heatmap and remap convolutions) save only their input and
    the BN statistics for backward (fasthg.ops.bn_relu_conv), about half the activations, with
    the native or triton backend (whose hourglass max-pools, fasthg.ops.max_pool2x2, keep no
    indices in either mode); the same numerics up to rounding and the same
    state_dict as "default". Like the backend, it is not part of `config` (a checkpoint
    loads into either)."""

    def __init__(self, num_stacks: int = 8, num_features: int = 256, num_joints: int = 16,
                 depth: int = 4, backend: str = "auto", stem: str = "paper", input_norm: Optional[dict] = None,
                 memory: str = "default", num_blocks: int = 1):
        super().__init__()
        if backend not in ops.BACKENDS:
            raise ValueError(f"backend must be one of {ops.BACKENDS}, got {backend!r}")
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
        if memory not in MEMORY:
            raise ValueError(f"memory must be one of {MEMORY}, got {memory!r}")
        input_norm = _input_norm(input_norm)
        for name, v in (("num_stacks", num_stacks), ("num_features", num_features),
                        ("num_joints", num_joints), ("depth", depth), ("num_blocks", num_blocks)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if num_features % 2:
            raise ValueError(f"num_features must be even, got {num_features}")
        self.num_stacks, self.num_joints, self.depth, self.backend = num_stacks, num_joints, depth, backend
        self.memory = memory
        # What rebuilds this network from a checkpoint (the backend is the loader's choice).
        self.config = {"num_stacks": num_stacks, "num_features": num_features, "num_joints": num_joints,
                       "depth": depth, "stem": stem, "input_norm": input_norm, "num_blocks": num_blocks}
        f = num_features
        mid = 128 if stem == "paper" else 256
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, stride=2, padding=3), BNReLU(64, backend=backend),
            Residual(64, 128, backend, memory), MaxPool2x2(backend), Residual(128, mid, backend, memory),
            Residual(mid, f, backend, memory),
        )
        self.input_norm = input_norm
        if input_norm is not None:  # x = pixel/255 - 0.5 -> (x + 0.5 - mean) / std; not saved: config holds it
            # float64, cast per call: a float64 model then computes the peer's input to the last bit
            std = torch.tensor(input_norm["std"], dtype=torch.float64).view(1, 3, 1, 1)
            mean = torch.tensor(input_norm["mean"], dtype=torch.float64).view(1, 3, 1, 1)
            self.register_buffer("input_scale", 1 / std, persistent=False)
            self.register_buffer("input_shift", (0.5 - mean) / std, persistent=False)
        self.hourglasses = nn.ModuleList(Hourglass(depth, f, backend, memory, num_blocks) for _ in range(num_stacks))
        self.features = nn.ModuleList(
            nn.Sequential(residuals(f, num_blocks, backend, memory), Conv2d(f, f, 1, backend=backend), BNReLU(f, backend=backend))
            for _ in range(num_stacks))
        self.heads = nn.ModuleList(Conv2d(f, num_joints, 1, backend=backend) for _ in range(num_stacks))
        # Intermediate supervision: each stack's features and heatmaps re-enter the next.
        self.remap_features = nn.ModuleList(Conv2d(f, f, 1, backend=backend) for _ in range(num_stacks - 1))
        self.remap_heatmaps = nn.ModuleList(Conv2d(num_joints, f, 1, backend=backend) for _ in range(num_stacks - 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
        mult = 4 * 2 ** self.depth
        if images.shape[2] % mult or images.shape[3] % mult:
            raise ValueError(f"image height and width must be multiples of {mult} for depth "
                             f"{self.depth}, got {tuple(images.shape[2:])}")
        # On the CPU the fused ops and oneDNN's convolutions (bf16 most of all) run faster
        # channels_last: NCHW images are converted once here, the heatmaps given back NCHW.
        nchw = (self.backend != "eager" and images.device.type == "cpu"
                and not images.is_contiguous(memory_format=torch.channels_last))
        if nchw:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.input_norm is not None:
            images = images * self.input_scale.to(images.dtype) + self.input_shift.to(images.dtype)
        x = self.stem(images)
        heatmaps: List[torch.Tensor] = []
        for i in range(self.num_stacks):
            last = i == self.num_stacks - 1
            # x feeds this stack's hourglass and the next stack's input (and feat the head and
            # the remap): ops.fork sums their gradients faster than autograd does in bf16
            x, skip = (x, x) if last else ops.fork(x, backend=self.backend)
            if self.memory == "recompute":  # the features' BN-ReLU output is not stored either
                res, conv, bn_relu = self.features[i]
                convs = (self.heads[i],) + (() if last else (self.remap_features[i],))
                hm, *remapped = ops.bn_relu_convs(conv(res(self.hourglasses[i](x))), bn_relu, convs,
                                                  backend=self.backend)
                if not last:
                    x = skip + remapped[0] + self.remap_heatmaps[i](hm)
            else:
                feat = self.features[i](self.hourglasses[i](x))
                feat, to_head = (feat, feat) if last else ops.fork(feat, backend=self.backend)
                hm = self.heads[i](to_head)
                if not last:
                    x = self._next_input(i, skip, feat, hm)
            heatmaps.append(hm)
        out = torch.stack(heatmaps, dim=1)
        return out.contiguous() if nchw else out

    def _next_input(self, i: int, x: torch.Tensor, feat: torch.Tensor, hm: torch.Tensor) -> torch.Tensor:
        """Stack i+1's input: stack i's input, its remapped features and remapped heatmaps (each
        add in its convolution's epilogue where ops.conv_add fuses it)."""
        x = ops.conv_add(feat, self.remap_features[i], x, backend=self.backend)
        return ops.conv_add(hm, self.remap_heatmaps[i], x, backend=self.backend)


def hg1(**kw) -> StackedHourglass:
    return StackedHourglass(num_stacks=1, **kw)


def hg2(**kw) -> StackedHourglass:
    return StackedHourglass(num_stacks=2, **kw)


def hg4(**kw) -> StackedHourglass:
    return StackedHourglass(num_stacks=4, **kw)


def hg8(**kw) -> StackedHourglass:
    return StackedHourglass(num_stacks=8, **kw)
