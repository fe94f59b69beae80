"""fasthg.accelerate on a model fasthg did not write: a 2-stack hourglass in plain PyTorch (the
paper's structure, nn.BatchNorm2d / nn.ReLU / nn.Upsample, as a user would write it), one
training step (forward, MSE over every stack, backward, SGD) unaccelerated, accelerated, and
fasthg's own hg2 of the same shape (fasthg.bench.cases.ModelCase), timed round-robin in one
run (fasthg.bench.harness.interleaved_samples), NCHW and channels_last, float32.
The issue's bar: accelerated faster than unaccelerated, and within 10% of the native hg2.

    pytest benchmarks/test_bench_accelerate.py --benchmark-only   (extra_info: medians, ratios)
    python benchmarks/test_bench_accelerate.py [--repeats N]       (prints the table)
"""
import argparse
import copy
import statistics

import pytest
import torch
from torch import nn

import fasthg
from fasthg.bench import LAYOUTS, ModelCase, interleaved_samples, speedup, spread
from fasthg.fuse import channels_last

IMAGE, FEATURES, JOINTS, STACKS, DEPTH = 256, 256, 16, 2, 4


class PlainResidual(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        mid = cout // 2
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.Conv2d(cin, mid, 1),
            nn.BatchNorm2d(mid), nn.ReLU(inplace=True), nn.Conv2d(mid, mid, 3, padding=1),
            nn.BatchNorm2d(mid), nn.ReLU(inplace=True), nn.Conv2d(mid, cout, 1))
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        return self.body(x) + self.skip(x)


class PlainHourglass(nn.Module):
    def __init__(self, depth, c):
        super().__init__()
        self.up1, self.low1, self.low3 = PlainResidual(c, c), PlainResidual(c, c), PlainResidual(c, c)
        self.pool = nn.MaxPool2d(2, 2)
        self.low2 = PlainHourglass(depth - 1, c) if depth > 1 else PlainResidual(c, c)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")

    def forward(self, x):
        return self.up1(x) + self.up(self.low3(self.low2(self.low1(self.pool(x)))))


class PlainStackedHourglass(nn.Module):
    """Newell et al. 2016, as fasthg.models.StackedHourglass computes it, in stock modules."""

    def __init__(self, stacks=STACKS, f=FEATURES, joints=JOINTS, depth=DEPTH):
        super().__init__()
        self.stacks = stacks
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, stride=2, padding=3), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
            PlainResidual(64, 128), nn.MaxPool2d(2, 2), PlainResidual(128, 128), PlainResidual(128, f))
        self.hourglasses = nn.ModuleList(PlainHourglass(depth, f) for _ in range(stacks))
        self.features = nn.ModuleList(
            nn.Sequential(PlainResidual(f, f), nn.Conv2d(f, f, 1), nn.BatchNorm2d(f), nn.ReLU(inplace=True))
            for _ in range(stacks))
        self.heads = nn.ModuleList(nn.Conv2d(f, joints, 1) for _ in range(stacks))
        self.remap_features = nn.ModuleList(nn.Conv2d(f, f, 1) for _ in range(stacks - 1))
        self.remap_heatmaps = nn.ModuleList(nn.Conv2d(joints, f, 1) for _ in range(stacks - 1))

    def forward(self, images):
        x = self.stem(images)
        heatmaps = []
        for i in range(self.stacks):
            feat = self.features[i](self.hourglasses[i](x))
            hm = self.heads[i](feat)
            heatmaps.append(hm)
            if i < self.stacks - 1:
                x = x + self.remap_features[i](feat) + self.remap_heatmaps[i](hm)
        return torch.stack(heatmaps, dim=1)


def steps(device, batch, layout):
    """{"plain": step, "accelerated": step, "fasthg hg2": step}: the same images and targets,
    the plain model and its accelerated copy from the same weights."""
    native = ModelCase("hg2", device, ["auto"], batch, IMAGE, layout)
    torch.manual_seed(0)
    plain = PlainStackedHourglass().to(device)
    models = {"plain": plain, "accelerated": fasthg.accelerate(copy.deepcopy(plain))}
    fns = {}
    for name, model in models.items():
        if not channels_last.has_it(model):  # (accelerate's layout step, on the CPU: its own layout inside)
            model.to(memory_format=layout)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)

        def step(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            nn.functional.mse_loss(model(native.images), native.target).backward()
            opt.step()
        fns[name] = step
    fns["fasthg hg2"] = native.step["auto"]
    return fns


def measure(device, batch, layout, warmup=2, repeats=10):
    samples = interleaved_samples(steps(device, batch, layout), torch.device(device), warmup, repeats)
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {"median_s": med, "spread": {k: spread(v) for k, v in samples.items()},
            "accelerated_speedup": speedup(med["plain"], med["accelerated"]),
            "accelerated_over_native": med["accelerated"] / med["fasthg hg2"]}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_accelerated_plain_hg2_train_step(benchmark, layout):
    from conftest import BATCH, DEVICE

    benchmark.group = f"plain hg2 accelerated, train step, batch {BATCH}, 256x256, {layout}"
    result = {}
    benchmark.pedantic(lambda: result.update(measure(DEVICE, BATCH, LAYOUTS[layout], 1, 3)), rounds=1)
    benchmark.extra_info.update({k: (round(v, 3) if isinstance(v, float) else {n: round(s, 4) for n, s in v.items()})
                                 for k, v in result.items()})


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None, help="default: 16 on GPU, 4 on CPU")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--layouts", default="nchw,nhwc")
    args = p.parse_args()
    batch = args.batch or (16 if args.device == "cuda" else 4)
    if args.device == "cpu":
        import fasthg.bench.malloc

        fasthg.bench.malloc.keep_freed_memory()
    print(f"device {args.device}, threads {torch.get_num_threads()}, batch {batch}, {IMAGE}x{IMAGE}, float32")
    for layout in args.layouts.split(","):
        r = measure(args.device, batch, LAYOUTS[layout], repeats=args.repeats)
        cells = ", ".join(f"{k} {v * 1e3:.0f} ms (spread {r['spread'][k]:.2f})" for k, v in r["median_s"].items())
        print(f"{layout}: {cells}; accelerated {r['accelerated_speedup']:.2f}x plain, "
              f"{r['accelerated_over_native']:.3f}x native hg2's time")


if __name__ == "__main__":
    main()
