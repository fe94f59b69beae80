"""fasthg.accelerate on the conv nets people train most: torchvision's ResNet-18 and ResNet-50,
one training step (forward, cross-entropy, backward, SGD) at 224x224, channels_last, float32
and bf16 autocast, timed round-robin in one run (fasthg.bench.harness.interleaved_samples):
  eager         the model as torchvision builds it
  accelerated   fasthg.accelerate(model): BN-ReLU and BN-add-ReLU fused
  compile       torch.compile(model) (inductor), what users would pick instead
  no BN/ReLU    every BatchNorm2d and ReLU replaced by an identity: a ceiling, not a model;
                no fusion of them can beat it
and the fused op itself at ResNet-50's block outputs against eager relu(bn(x) + residual).
Needs torchvision (skipped without it).

    pytest benchmarks/test_bench_resnet.py --benchmark-only      (extra_info: medians, ratios)
    python benchmarks/test_bench_resnet.py [--repeats N] [--out DIR] [--no-compile]
        prints the tables; writes resnet.json, resnet.md and resnet.png to --out
"""
import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time

import pytest
import torch
from torch import nn

import fasthg
from fasthg.bench import dtype_name, interleaved_samples, op_calls, op_case, speedup, spread
from fasthg.ops import registry

ARCHS = ("resnet18", "resnet50")
DTYPES = (torch.float32, torch.bfloat16)
IMAGE = 224


def _strip_bn_relu(model):
    for name, child in model.named_children():
        if isinstance(child, (nn.BatchNorm2d, nn.ReLU)):
            setattr(model, name, nn.Identity())
        else:
            _strip_bn_relu(child)
    return model


def variants(arch, device, with_compile=True):
    """{name: model}, all from the same weights, channels_last, in training mode."""
    import torchvision

    torch.manual_seed(0)
    eager = getattr(torchvision.models, arch)().to(device)
    out = {"eager": eager, "accelerated": fasthg.accelerate(copy.deepcopy(eager))}
    if with_compile:
        out["compile"] = torch.compile(copy.deepcopy(eager))
    out["no BN/ReLU"] = _strip_bn_relu(copy.deepcopy(eager))
    return {k: m.to(memory_format=torch.channels_last).train() for k, m in out.items()}


def steps(arch, device, batch, dtype, with_compile=True):
    """{name: training step} on the same images and labels."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, IMAGE, IMAGE, generator=g).to(device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (batch,), generator=g).to(device)
    fns = {}
    for name, model in variants(arch, device, with_compile).items():
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)

        def step(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
                loss = nn.functional.cross_entropy(model(images).float(), labels)
            loss.backward()
            opt.step()
        fns[name] = step
    return fns


def measure(arch, device, batch, dtype, warmup=2, repeats=7, with_compile=True):
    fns = steps(arch, device, batch, dtype, with_compile)
    t0 = time.perf_counter()
    for fn in fns.values():  # the first call compiles; kept out of the warm-up's timing
        fn()
    prepare_s = time.perf_counter() - t0
    samples = interleaved_samples(fns, torch.device(device), warmup, repeats)
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {"arch": arch, "dtype": dtype_name(dtype), "batch": batch, "median_ms": {k: v * 1e3 for k, v in med.items()},
            "spread": {k: spread(v) for k, v in samples.items()}, "first_calls_s": prepare_s,
            "vs_eager": {k: speedup(med["eager"], v) for k, v in med.items()}}


# ResNet-50's block outputs: the fused op against eager (and Triton on a GPU), train forward+backward
OP_MODE = "train forward+backward"


def measure_op(device, batch, dtype, repeats=15):
    backends = [b for b in fasthg.ops.available(device, "bn_add_relu") if device == "cuda" or b != "triton"]
    rows = []
    for c, h, w in registry.get("bn_add_relu").shapes:
        case = op_case("bn_add_relu", (batch, c, h, w), dtype, "nhwc")
        calls = op_calls(case, device, backends)[OP_MODE]
        med = {k: statistics.median(v) for k, v in interleaved_samples(calls, torch.device(device), 3, repeats).items()}
        rows.append({"shape": [batch, c, h, w], "dtype": dtype_name(dtype), "median_ms": {k: v * 1e3 for k, v in med.items()},
                     "vs_eager": {k: speedup(med["eager"], v) for k, v in med.items()}})
    return rows


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_accelerated_resnet_train_step(benchmark, arch, dtype):
    pytest.importorskip("torchvision")
    from conftest import DEVICE

    if dtype == torch.bfloat16 and DEVICE == "cpu" and not fasthg.device.cpu_computes_bf16():
        pytest.skip("this CPU has no native bf16")
    batch = 32 if DEVICE == "cuda" else 4
    benchmark.group = f"torchvision {arch} train step, batch {batch}, {IMAGE}x{IMAGE}, channels_last, {dtype_name(dtype)}"
    result = {}
    benchmark.pedantic(lambda: result.update(measure(arch, DEVICE, batch, dtype, 1, 3)), rounds=1)
    benchmark.extra_info.update(result)


def _machine(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{fasthg.device.cpu_name(platform.processor() or platform.machine())}, {torch.get_num_threads()} threads"


def markdown(results, op_rows, machine):
    names = list(results[0]["median_ms"])
    lines = [f"Training step, {IMAGE}x{IMAGE}, channels_last ({machine}); ms, and eager's time over each", "",
             "| model | dtype | batch | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for r in results:
        cells = [f"{r['median_ms'][n]:.0f} ({r['vs_eager'][n]:.2f}x)" for n in names]
        lines.append(f"| {r['arch']} | {r['dtype']} | {r['batch']} | " + " | ".join(cells) + " |")
    if op_rows:
        backends = list(op_rows[0]["median_ms"])
        lines += ["", f"bn_add_relu {OP_MODE}, channels_last; ms, and eager's time over each", "",
                  "| shape | dtype | " + " | ".join(backends) + " |", "|---|---|" + "---|" * len(backends)]
        for r in op_rows:
            cells = [f"{r['median_ms'][b]:.2f} ({r['vs_eager'][b]:.2f}x)" for b in backends]
            lines.append(f"| {'x'.join(map(str, r['shape']))} | {r['dtype']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def chart(results, path, machine):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fasthg.draw import save_figure

    names = [n for n in results[0]["vs_eager"] if n != "eager"]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        ax.bar([j + i * width for j in range(len(results))], [r["vs_eager"][n] for r in results], width, label=n)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(results))],
                  [f"{r['arch']}\n{r['dtype']}" for r in results])
    lowest = min(r["vs_eager"][n] for r in results for n in names)
    ax.set_ylim(min(0.8, lowest - 0.05), None)  # the differences are a few percent
    ax.set_ylabel("speedup over eager (step)")
    ax.set_title(f"torchvision ResNets, training step ({machine})", fontsize=9)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    save_figure(fig, path)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None, help="default: 32 on GPU, 4 on CPU")
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--no-compile", action="store_true", help="leave torch.compile out (its first call takes minutes on a CPU)")
    p.add_argument("--no-op", action="store_true", help="leave out the op at ResNet-50's shapes")
    p.add_argument("--out", default="", help="folder for resnet.json/.md/.png ('' for none)")
    args = p.parse_args()
    try:
        import torchvision  # noqa: F401
    except ImportError:
        sys.exit("benchmarks/test_bench_resnet.py needs torchvision (pip install torchvision)")
    batch = args.batch or (32 if args.device == "cuda" else 4)
    if args.device == "cpu":
        import fasthg.bench.malloc

        fasthg.bench.malloc.keep_freed_memory()  # time the kernels, not page faults (fasthg.bench.malloc)
    machine = _machine(args.device)
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    print(f"device {args.device} ({machine}), torch {torch.__version__}, batch {batch}", flush=True)
    results = []
    for arch in args.archs.split(","):
        for dtype in dtypes:
            r = measure(arch, args.device, batch, dtype, repeats=args.repeats, with_compile=not args.no_compile)
            results.append(r)
            print(f"{arch} {r['dtype']}: " + ", ".join(f"{k} {v:.0f} ms ({r['vs_eager'][k]:.2f}x, spread "
                                                      f"{r['spread'][k]:.2f})" for k, v in r["median_ms"].items()),
                  flush=True)
    op_rows = [] if args.no_op else [row for d in dtypes for row in measure_op(args.device, batch, d)]
    text = markdown(results, op_rows, machine)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "resnet.json"), "w") as f:
            json.dump({"machine": machine, "torch": torch.__version__, "steps": results, "op": op_rows}, f, indent=1)
        with open(os.path.join(args.out, "resnet.md"), "w") as f:
            f.write(text)
        chart(results, os.path.join(args.out, "resnet.png"), machine)


if __name__ == "__main__":
    main()
