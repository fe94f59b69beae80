"""bench.png of `fasthg bench`: the speedup over eager of every other backend, one panel per
fused op and mode (levels along x, a bar per layout, dtype and backend) and one for the
models, on a log scale so that 1.2x and 15x both read; the issues' bars drawn where they apply."""
import math
import os
from typing import Dict, List, Tuple


def _panels(rows) -> Dict[Tuple[str, str], List[dict]]:
    """Non-eager rows by panel, in the order the run measured them: (op, mode) for the fused
    ops, ("models", "") for every model row."""
    panels: Dict[Tuple[str, str], List[dict]] = {}
    for r in rows:
        if r["backend"] == "eager":
            continue
        key = ("models", "") if "images_per_s" in r else (r["op"], r["mode"])
        panels.setdefault(key, []).append(r)
    return panels


def grouped_bars(ax, groups: List[str], series: Dict[str, Dict[str, float]]):
    """Bars of each series side by side within each group on the x axis, labelled with their values."""
    width = 0.8 / max(1, len(series))
    for k, (name, values) in enumerate(series.items()):
        xs = [g + (k - (len(series) - 1) / 2) * width for g in range(len(groups)) if groups[g] in values]
        ys = [values[groups[g]] for g in range(len(groups)) if groups[g] in values]
        bars = ax.bar(xs, ys, width, label=name)
        ax.bar_label(bars, labels=[f"{y:.3g}" for y in ys], fontsize=6, padding=1)
    ax.set_xticks(range(len(groups)), groups, fontsize=7 if len(groups) <= 6 else 6)


def speedup_panel(ax, groups: List[str], series: Dict[str, Dict[str, float]], ylabel: str, title: str) -> None:
    """A panel of speedups (grouped_bars) with the 1x line, for the per-kernel benchmarks."""
    grouped_bars(ax, groups, series)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)


def speedup_figure(rows: List[dict], panel, series, group, ylabel: str, title, suptitle: str, path: str,
                   stacked: bool = False) -> None:
    """The per-kernel benchmarks' PNG: a speedup_panel per value of panel(row) (side by side, or
    stacked), a bar per series(row) in each group(row), titled title(panel value, its rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys(panel(r) for r in rows))
    grid, size = ((len(keys), 1), (11, 3.6 * len(keys))) if stacked else ((1, len(keys)), (6 * len(keys), 3.8))
    fig, axes = plt.subplots(*grid, figsize=size, squeeze=False)
    for ax, key in zip(axes.flat, keys):
        these = [r for r in rows if panel(r) == key]
        bars: Dict[str, Dict[str, float]] = {}
        for r in these:
            bars.setdefault(series(r), {})[group(r)] = r["speedup"]
        speedup_panel(ax, list(dict.fromkeys(group(r) for r in these)), bars, ylabel, title(key, these))
    fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    save_png(fig, path)


def save_png(fig, path: str) -> None:
    """Writes fig to path as a PNG through one rename (a reader never sees half a file), and
    closes it."""
    import matplotlib.pyplot as plt

    fig.savefig(f"{path}.tmp", dpi=110, format="png")
    plt.close(fig)
    os.replace(f"{path}.tmp", path)


def speedup_chart(result, path: str, bars: Dict[Tuple[str, str], float], bar_levels=()) -> int:
    """Writes the chart of `result` (fasthg.bench.run's) to `path`; returns how many panels it drew."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    panels = _panels(result["rows"])
    if not panels:
        return 0
    cols = min(3, len(panels))
    rows_of_panels = math.ceil(len(panels) / cols)
    # a panel wide enough for its groups' labels (the models' panel of --inference-fold has 8)
    model_groups = len({(r["op"], r["layout"], r["dtype"], r["shape"][0]) for r in panels.get(("models", ""), [])})
    panel_width = max(5.5, 1.0 * model_groups)
    fig, axes = plt.subplots(rows_of_panels, cols, figsize=(panel_width * cols, 3.8 * rows_of_panels), squeeze=False)
    for ax, ((op, mode), rows) in zip(axes.flat, panels.items()):
        series: Dict[str, Dict[str, float]] = {}
        if op == "models":
            batches = sorted({r["shape"][0] for r in rows})

            def group(r):  # "hg2 step\nnhwc float32" (and " b8" where the run has several batch sizes)
                name = f"{r['op'].replace('train step', 'step').replace('inference', 'infer')}\n{r['layout']} {r['dtype']}"
                return name + (f"\nbatch {r['shape'][0]}" if len(batches) > 1 else "")

            groups = list(dict.fromkeys(group(r) for r in rows))
            for r in rows:
                series.setdefault(r["backend"], {})[group(r)] = r["speedup"]
            ax.set_title("models (batch %s, %dx%d)" % (", ".join(map(str, batches)), rows[0]["shape"][2],
                                                       rows[0]["shape"][3]), fontsize=9)
        else:
            groups = [f"{level}x{level}" for level in sorted({r["level"] for r in rows}, reverse=True)]
            several_channels = len({r["shape"][1] for r in rows}) > 1
            for r in rows:
                name = f"{r['layout']} {r['dtype']} {r['backend']}" + (f" C={r['shape'][1]}" if several_channels else "")
                series.setdefault(name, {})[f"{r['level']}x{r['level']}"] = r["speedup"]
            ax.set_title(f"{op} {mode}", fontsize=9)
            if (op, mode) in bars:
                ax.axhline(bars[op, mode], color="tab:red", ls="--", lw=0.8,
                           label=f"bar {bars[op, mode]:g}x (native float32, {', '.join(map(str, bar_levels))})")
        grouped_bars(ax, groups, series)
        ax.set_yscale("log", base=2)
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_ylabel("speedup over eager (x)", fontsize=8)
        ax.legend(fontsize=6, loc="best")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"fasthg vs eager on {result['device']}", fontsize=11)
    fig.tight_layout()
    save_png(fig, path)
    return len(panels)
