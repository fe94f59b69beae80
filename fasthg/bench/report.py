"""`fasthg bench`: every registered fused op and the models against eager, timed in one run
(fasthg.bench.harness) so that every ratio compares numbers taken under the same machine load,
written as bench.json, bench.md and bench.png.

Against the hardware's limit: each op row carries the bytes a fused kernel must move (the
registry's traffic: every tensor read or written once per pass) and the GB/s that makes at
the measured time, as a fraction of a large copy's bandwidth timed in the same run. Memory:
the peak bytes each call allocates (fasthg.bench.memory) and, for the model, the activation
bytes saved for backward.
"""
import json
import os
from typing import Dict, List

import torch
from tqdm import tqdm

from fasthg import ops
from fasthg.bench import budget, memory, traffic
from fasthg.bench.inference import bench_inference, fold_lines
from fasthg.bench.cases import ModelCase, op_calls, op_cases
from fasthg.bench.harness import (LAYOUTS, SPREAD_LIMIT, copy_bandwidth, default_dtypes, dtype_name,
                                  interleaved_samples, last_level_cache_bytes, layout_name, medians_and_spreads,
                                  speedup)
from fasthg.device import resolve as resolve_device
from fasthg.ops import registry

# The bars (registry.FusedOp.bars) by (op, mode), and the levels they apply at.
BARS = {(op.name, mode): value for op in registry.ops() for mode, value in op.bars.items()}
BAR_LEVELS = registry.BAR_LEVELS
# Bytes a fused kernel moves per mode, in full-resolution tensors (registry.FusedOp.traffic).
TRAFFIC = {(op.name, mode): units for op in registry.ops() for mode, units in op.traffic.items()}


def timed(fns: Dict[str, callable], device, warmup: int = 3, repeats: int = 20):
    """Each function's median seconds and spread (harness.spread), timed round-robin."""
    return medians_and_spreads(interleaved_samples(fns, device, warmup, repeats))


def timing(med: Dict[str, float], spreads: Dict[str, float], b: str) -> dict:
    """A row's timing columns: median, speedup over eager, spread and whether it varied too much."""
    return {"median_ms": med[b] * 1e3, "speedup": speedup(med["eager"], med[b]), "spread": spreads[b],
            "varied": spreads[b] > SPREAD_LIMIT}


def op_rows(case, calls: Dict[str, callable], mode: str, med: Dict[str, float], spreads: Dict[str, float],
            device) -> List[dict]:
    n, c, h, w = case["shape"]
    moved = TRAFFIC[case["op"], mode] * n * c * h * w * case["_dtype"].itemsize
    return [{**{k: v for k, v in case.items() if not k.startswith("_")}, "mode": mode, "backend": b,
             **timing(med, spreads, b), "bytes": moved,
             "gb_s": moved / med[b] / 1e9, "peak_mb": memory.peak_bytes(fn, device) / 2**20}
            for b, fn in calls.items()]


def bench_op(case, device, backends, repeats, cache_bytes=0) -> List[dict]:
    """Every mode of a case, each backend (eager first) timed round-robin."""
    rows = []
    for mode, calls in op_calls(case, device, backends, cache_bytes).items():
        with torch.enable_grad():
            med, spreads = timed(calls, device, repeats=repeats)
            rows += op_rows(case, calls, mode, med, spreads, device)
    return rows


def bench_model(preset: str, device, backends, batch: int, image_size: int, repeats: int,
                layout=torch.contiguous_format, dtype=torch.float32) -> List[dict]:
    """The training step per backend, then the inference forward (fasthg.bench.cases.ModelCase);
    rows carry images/s, the peak bytes a call allocates and, for the step, the activation
    bytes saved for its backward."""
    case = ModelCase(preset, device, backends, batch, image_size, layout, dtype)

    def row(what, mode, b, med, fn, **extra):
        return {"op": f"{preset} {what}", "level": image_size, "shape": [batch, 3, image_size, image_size],
                "dtype": dtype_name(dtype), "layout": layout_name(layout),
                "mode": mode, "backend": b, **timing(med, spreads, b), "images_per_s": batch / med[b],
                "peak_mb": memory.peak_bytes(fn, device) / 2**20, **extra}

    warmup = 2 if "compile" in backends else 1
    med, spreads = timed(case.step, device, warmup=warmup, repeats=repeats)
    rows = [row("train step", "forward+backward", b, med, fn, saved_mb=case.saved_activation_bytes(b) / 2**20)
            for b, fn in case.step.items()]
    case.eval()
    med, spreads = timed(case.infer, device, warmup=warmup, repeats=repeats)
    return rows + [row("inference", "forward", b, med, fn) for b, fn in case.infer.items()]


def run(device: str = "auto", levels=(64, 32, 16, 8), channels=(256,), repeats: int = 20, models=("hg2",),
        model_repeats: int = 3, image_size: int = 256, compile: bool = False, out_dir: str = None,
        progress: bool = True, keep_freed_memory: bool = False, dtypes=None, model_layouts=("nchw", "nhwc"),
        memory_modes=("default",), budget_models=("hg8",), inference_fold: bool = False):
    """keep_freed_memory (CPU): time with glibc keeping freed memory (fasthg.bench.malloc), so
    that page faults of fresh outputs do not swamp the kernels; process-wide. dtypes: the
    ops' activation dtypes and the models' (float32, or autocast to the others; default:
    default_dtypes). model_layouts: nchw and/or nhwc (channels_last). `compile` adds
    torch.compile of the eager compositions and model. memory_modes with "recompute": the models
    also run with memory="recompute" on each non-eager backend ("native+recompute" rows), and
    the report gets the largest batch of each of `budget_models` in 16 and 80 GiB of
    activations, eager vs storing vs recompute (fasthg.bench.budget). inference_fold: instead
    of the ops and training steps, each model's folded inference against eager and
    compiled-with-freezing at batch 1 and 8 (fasthg.bench.inference)."""
    dev = resolve_device(device)
    gpu = dev.type == "cuda"
    allocator = "CUDA caching allocator" if gpu else "malloc, default"
    if keep_freed_memory and not gpu:
        from fasthg.bench import malloc

        allocator = "glibc malloc, freed memory kept" if malloc.keep_freed_memory() else allocator
    extra = ["compile"] if compile else []

    def backends(op=None):  # with a kernel on this device; the Triton interpreter is not for speed
        return [b for b in ops.available(dev.type, op) if gpu or b != "triton"]

    batch = 16 if gpu else 4
    dtypes = dtypes or default_dtypes(dev)
    cases = [(backends(op.name) + extra, case) for c in channels for op in registry.ops()
             for case in op_cases(op.name, batch, c, levels, dtypes, list(LAYOUTS.values()))]
    cache_bytes = last_level_cache_bytes(dev)
    rows, budgets = [], []
    recompute = "recompute" in memory_modes
    budget_models = list(budget_models) if recompute else []
    model_cases = [(preset, LAYOUTS[lay], dtype) for preset in models for lay in model_layouts for dtype in dtypes]
    fold_cases = [(preset, LAYOUTS[lay], dtype, b) for preset in models for dtype in dtypes for lay in model_layouts
                  for b in (1, 8)] if inference_fold else []
    if inference_fold:
        cases, model_cases = [], []
    bar = tqdm(total=len(cases) + len(model_cases) + len(budget_models) + len(fold_cases) + 1,
               desc=f"bench on {dev.type}", disable=not progress)
    bar.set_postfix_str("copy bandwidth")
    copy_bw = copy_bandwidth(dev)
    bar.update()

    def result(complete):
        for r in rows:
            if "gb_s" in r:
                r["of_copy"] = r["gb_s"] * 1e9 / copy_bw
        return {"device": torch.cuda.get_device_name(dev) if gpu else f"CPU, {torch.get_num_threads()} threads",
                "torch": torch.__version__, "allocator": allocator, "copy_gb_s": copy_bw / 1e9,
                "cache_mib": cache_bytes / 2**20, "complete": complete, "rows": rows,
                "bars": [] if gpu else bar_checks(rows),  # the bars are set for the CPU
                **({"budgets": budgets} if budgets else {})}

    def done_one(new_rows):  # the JSON and table so far, so that a run cut short keeps what it measured
        rows.extend(new_rows)
        bar.update()
        if out_dir:
            write_outputs(result(False), out_dir, chart=False)

    for op_backends, case in cases:
        bar.set_postfix_str(f'{case["op"]} {case["layout"]} {case["shape"][1]}x{case["level"]}x{case["level"]} '
                            f'{case["dtype"]}')
        done_one(bench_op(case, dev, op_backends, repeats, cache_bytes))
    for preset, layout, dtype in model_cases:
        bar.set_postfix_str(f"{preset} training step {layout_name(layout)} {dtype_name(dtype)}")
        concrete = backends()
        done_one(bench_model(preset, dev, concrete + ["auto"] + extra
                             + [f"{b}+recompute" for b in concrete if recompute and b != "eager"],
                             batch, image_size, model_repeats, layout, dtype))
    for preset in budget_models:
        bar.set_postfix_str(f"{preset} activation budget")
        specs = ["eager"] + [b + mode for b in backends() if b != "eager" for mode in ("", "+recompute")]
        budgets.extend(budget.budget_rows(preset, specs, image_size, dev))
        bar.update()
    for preset, layout, dtype, b in fold_cases:
        bar.set_postfix_str(f"{preset} folded inference batch {b} {layout_name(layout)} {dtype_name(dtype)}")
        done_one(bench_inference(preset, dev, b, image_size, model_repeats, layout, dtype))
    bar.close()
    final = result(True)
    if out_dir:
        write_outputs(final, out_dir)
    return final


def bar_checks(rows) -> List[Dict]:
    """Every native float32 row of this run that a bar applies to: its speedup, the bar, and
    whether it is met; one per (op, mode, channels, level, layout)."""
    checks = {}
    for r in rows:
        key = (r["op"], r["mode"])
        if r["backend"] == "native" and r["level"] in BAR_LEVELS and key in BARS and r["dtype"] == "float32":
            checks[key + (r["shape"][1], r["level"], r["layout"])] = {
                "op": r["op"], "mode": r["mode"], "level": r["level"], "channels": r["shape"][1],
                "layout": r["layout"], "dtype": r["dtype"], "speedup": r["speedup"], "bar": BARS[key],
                "met": r["speedup"] >= BARS[key]}
    return list(checks.values())


def spread_warning(result) -> str:
    """One line when rows' repeats varied by more than SPREAD_LIMIT ('' when none did)."""
    rows = result["rows"]
    varied = sum(r.get("spread", 0.0) > SPREAD_LIMIT for r in rows)
    if not varied:
        return ""
    return (f"WARNING: {varied} of {len(rows)} rows varied by more than {SPREAD_LIMIT:.0%} between repeats "
            "(spread = interquartile range / median; marked !): the machine was busy; their medians mean little")


def table(result) -> str:
    warning = spread_warning(result)
    lines = ([] if result.get("complete", True) else ["(incomplete: the rows measured so far)"]) + (
             [warning] if warning else []) + [
             f"device: {result['device']}, torch {result['torch']}, {result['allocator']}; "
             f"copy bandwidth {result['copy_gb_s']:.1f} GB/s; op inputs rotated through "
             f"{2 * result.get('cache_mib', 0):.0f} MiB (twice the last-level cache) "
             "(medians; speedup = eager / backend, same run)",
             "| op | shape | layout | dtype | mode | backend | median ms | spread | speedup | GB/s | of copy "
             "| peak MB | img/s | saved MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    opt = lambda r, k, f: format(r[k], f) if k in r else ""  # noqa: E731
    for r in result["rows"]:
        lines.append(f"| {r['op']} | {'x'.join(map(str, r['shape']))} | {r['layout']} | {r['dtype']} | {r['mode']} "
                     f"| {r['backend']} | {r['median_ms']:.3f} | {spread_cell(r)} | {r['speedup']:.2f}x | {opt(r, 'gb_s', '.1f')} "
                     f"| {opt(r, 'of_copy', '.0%')} | {opt(r, 'peak_mb', '.1f')} | {opt(r, 'images_per_s', '.1f')} "
                     f"| {opt(r, 'saved_mb', '.0f')} |")
    batch = next((r["shape"][0] for r in result["rows"] if "gb_s" in r), 16)
    lines += ["", traffic.table(batch)]
    lines += fold_lines(result["rows"])
    checks = result.get("bars", [])
    if checks:
        lines += ["", f"Bars (native vs eager, same run): {sum(c['met'] for c in checks)} of {len(checks)} met"]
        lines += [f"- {c['op']} {c['mode']} {c['channels']}x{c['level']}x{c['level']} {c['layout']} {c['dtype']}: "
                  f"{c['speedup']:.2f}x, bar {c['bar']:.1f}x: {'met' if c['met'] else 'NOT met'}" for c in checks]
    lines += budget.table(result.get("budgets", []))
    return "\n".join(lines)


def spread_cell(row) -> str:
    if "spread" not in row:
        return ""
    return f"{row['spread']:.0%}" + (" !" if row["spread"] > SPREAD_LIMIT else "")


def _write_atomic(path: str, text: str):
    """Replaces path with text in one rename: a reader (or a run killed mid-write) never sees half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_outputs(result, out_dir: str, chart: bool = True):
    """bench.json and bench.md, and with `chart` bench.png (fasthg.bench.chart)."""
    os.makedirs(out_dir, exist_ok=True)
    _write_atomic(os.path.join(out_dir, "bench.json"), json.dumps(result, indent=1))
    _write_atomic(os.path.join(out_dir, "bench.md"), table(result) + "\n")
    if not chart:
        return
    try:
        from fasthg.bench.chart import speedup_chart
        speedup_chart(result, os.path.join(out_dir, "bench.png"), BARS, BAR_LEVELS)
    except ImportError:  # matplotlib
        return
