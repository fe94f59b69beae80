"""Folded inference against eager and compiled-with-freezing (`fasthg bench --inference-fold`):
a preset's eval forward (no grad), timed round-robin, per variant:

- eager: the backend="eager" model, stock PyTorch;
- auto: the default backend (fused BN-ReLU passes, convolutions unfused);
- folded: fasthg.fuse.for_inference of the auto model;
- compile-freezing: torch.compile of the eager model with inductor's freezing on (which
  folds BN into the conv and packs oneDNN weights too), its first call (the compile wait)
  timed apart from the rest;
- onnxruntime, openvino: the ONNX export of the eager model in ONNX Runtime (float32 only) and
  OpenVINO (f32, or its bf16 precision for bfloat16), where installed (fasthg.deploy.runtimes):
  the runtimes people deploy to, and what `fasthg eval --runtime auto` chooses among.

Bars (issue 22, CPU): at batch 8 folded >= 1.25x eager, and within 10% of compile-freezing
or faster."""
import time
from typing import Dict, List

import torch

from fasthg.bench.harness import (SPREAD_LIMIT, compiled, dtype_name, interleaved_samples, layout_name,
                                  medians_and_spreads, speedup)
from fasthg.models import PRESETS

VARIANTS = ("eager", "auto", "folded", "compile-freezing")
RUNTIME_VARIANTS = ("onnxruntime", "openvino")


# A dtype's precision in fasthg.deploy.runtimes (which has no float16).
PRECISION = {torch.float32: "float32", torch.bfloat16: "bf16"}


def runtime_variants(device, dtype) -> List[str]:
    """The deployment runtimes installed that run this device and dtype."""
    from fasthg.deploy import runtimes

    precision = PRECISION.get(dtype)
    return [n for n in RUNTIME_VARIANTS
            if precision and runtimes.why_not(n, torch.device(device), precision) is None]
BAR_OVER_EAGER, BAR_OF_COMPILED, BAR_BATCH = 1.25, 0.9, 8


class InferenceCase:
    """The variants' forwards (`calls[name]`) over one batch of images, all from the same
    weights (with non-trivial BN running statistics, so a fold is not near the identity);
    `compile_s`: the seconds of compile-freezing's first call."""

    def __init__(self, preset: str, device, batch: int, image_size: int, layout=torch.channels_last,
                 dtype=torch.float32, variants=VARIANTS):
        from fasthg.fuse import for_inference

        device = torch.device(device)
        self.device, self.dtype = device, dtype
        torch.manual_seed(0)
        base = PRESETS[preset](backend="eager")
        for m in base.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
        self.images = torch.randn(batch, 3, image_size, image_size, device=device).contiguous(memory_format=layout)
        models, runs = {}, {}
        runnable = runtime_variants(device, dtype) if set(variants) & set(RUNTIME_VARIANTS) else []
        for v in variants:
            if v in RUNTIME_VARIANTS:
                if v in runnable:  # (else not installed, or not for this dtype)
                    from fasthg.deploy import runtimes

                    runs[v] = runtimes.make(v, base.eval(), None, image_size, device, PRECISION[dtype])
                continue
            m = PRESETS[preset](backend="eager" if v in ("eager", "compile-freezing") else "auto")
            m.load_state_dict(base.state_dict())
            models[v] = m.to(device).eval().to(memory_format=layout)
        if "folded" in models:
            models["folded"] = for_inference(models["folded"])
        self.compile_s = None
        forwards = dict(models)
        if "compile-freezing" in models:
            forwards["compile-freezing"] = compiled(models["compile-freezing"], device)
        self.calls = {v: (lambda f=f, v=v: self._forward(f, v)) for v, f in forwards.items()}
        self.calls.update({v: (lambda r=r: r(self.images)) for v, r in runs.items()})
        if "compile-freezing" in self.calls:
            t0 = time.perf_counter()
            self.calls["compile-freezing"]()
            self.compile_s = time.perf_counter() - t0

    def _forward(self, f, variant):
        import torch._inductor.config as inductor_config

        freezing = inductor_config.patch(freezing=variant == "compile-freezing")
        with freezing, torch.no_grad(), torch.autocast(self.device.type, dtype=self.dtype,
                                                       enabled=self.dtype != torch.float32):
            return f(self.images)


def bench_inference(preset: str, device, batch: int, image_size: int, repeats: int,
                    layout=torch.channels_last, dtype=torch.float32, variants=None,
                    warmup: int = 1) -> List[dict]:
    """One row per variant (default: VARIANTS and the deployment runtimes installed): median
    ms, speedup over eager, images/s, and compile-freezing's compile wait (compile_s)."""
    if variants is None:
        variants = VARIANTS + tuple(runtime_variants(device, dtype))
    case = InferenceCase(preset, device, batch, image_size, layout, dtype, variants)
    med, spreads = medians_and_spreads(interleaved_samples(case.calls, torch.device(device), warmup, repeats))
    return [{"op": f"{preset} inference", "level": image_size, "shape": [batch, 3, image_size, image_size],
             "dtype": dtype_name(dtype), "layout": layout_name(layout), "mode": "forward", "backend": v,
             "median_ms": med[v] * 1e3, "speedup": speedup(med["eager"], med[v]), "spread": spreads[v],
             "varied": spreads[v] > SPREAD_LIMIT, "images_per_s": batch / med[v],
             **({"compile_s": case.compile_s} if v == "compile-freezing" else {})}
            for v in case.calls]


def fold_checks(rows) -> List[Dict]:
    """The bars per (preset, batch, dtype, layout) with folded and eager rows at BAR_BATCH."""
    out = []
    groups = {}
    for r in rows:
        if r["op"].endswith(" inference") and "images_per_s" in r:
            groups.setdefault((r["op"], r["shape"][0], r["dtype"], r["layout"]), {})[r["backend"]] = r
    for (op, batch, dt, lay), g in groups.items():
        if batch != BAR_BATCH or "folded" not in g or "eager" not in g:
            continue
        check = {"op": op, "batch": batch, "dtype": dt, "layout": lay, "over_eager": g["folded"]["speedup"],
                 "met_eager": g["folded"]["speedup"] >= BAR_OVER_EAGER}
        if "compile-freezing" in g:
            check["of_compiled"] = g["compile-freezing"]["median_ms"] / g["folded"]["median_ms"]
            check["met_compiled"] = check["of_compiled"] >= BAR_OF_COMPILED
        deployed = {v: g[v] for v in RUNTIME_VARIANTS if v in g}
        if deployed:  # fasthg's own path against the fastest runtime people deploy to, and auto's pick
            fastest = min(deployed, key=lambda v: deployed[v]["median_ms"])
            check["fastest_runtime"] = fastest
            check["folded_of_runtime"] = deployed[fastest]["median_ms"] / g["folded"]["median_ms"]
            check["auto_pick"] = fastest if check["folded_of_runtime"] < 1 else "torch"
        out.append(check)
    return out


def fold_lines(rows) -> List[str]:
    """The compile waits and the bars' verdicts, for the report's table."""
    lines = [f"- compile wait (first call, compile-freezing): {r['op']} batch {r['shape'][0]} {r['dtype']} "
             f"{r['layout']}: {r['compile_s']:.1f} s" for r in rows if "compile_s" in r]
    for c in fold_checks(rows):
        line = (f"- {c['op']} batch {c['batch']} {c['dtype']} {c['layout']}: folded {c['over_eager']:.2f}x eager "
                f"(bar {BAR_OVER_EAGER}x: {'met' if c['met_eager'] else 'NOT met'})")
        if "of_compiled" in c:
            line += (f", {c['of_compiled']:.2f}x compile-freezing's speed (bar {BAR_OF_COMPILED}: "
                     f"{'met' if c['met_compiled'] else 'NOT met'})")
        if "fastest_runtime" in c:
            line += (f"; folded runs at {c['folded_of_runtime']:.2f}x the speed of the fastest runtime "
                     f"({c['fastest_runtime']}), and --runtime auto picks {c['auto_pick']}")
        lines.append(line)
    return (["", "Folded inference (fasthg.fuse.for_inference), same run:"] + lines) if lines else []
