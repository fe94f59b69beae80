"""The paper's ablation experiments (Newell, Yang, Deng, ECCV 2016, section 5.2), rerun with
fasthg's trainer on the same data, seeds and schedule for every variant:

* supervision (Fig. 8): networks of one size trained with the loss on every stack's heatmaps
  (intermediate supervision) or on the last stack's only; their accuracy on the harder joints
  (elbows, wrists, knees, ankles) as training goes.
* stacking (Fig. 9, right): about equal parameters arranged as 2 stacks of 4 residual modules
  at each place, 4 of 2, 8 of 1; the accuracy of each stack's own heatmaps.

Each variant trains into its own folder of the output folder (fasthg train's files: last.pt,
log.jsonl, curves.png); a variant whose last.pt has its epochs or has spent its time budget is
read back instead of trained again, any other (interrupted, or given more epochs) resumes from
its last.pt. Results:
ablation.json, ablation.md (the table), supervision.png and stacking.png."""
import dataclasses
import json
import os
from typing import Dict, List, Optional, Sequence

from fasthg import checkpoint
from fasthg.draw import save_figure
from fasthg.evaluate import METRICS
from fasthg.train.config import TrainConfig, metric_of


@dataclasses.dataclass(frozen=True)
class Variant:
    stacks: int
    blocks: int
    supervision: str

    @property
    def name(self) -> str:
        return f"{self.stacks}x{self.blocks}-{self.supervision}"

    @property
    def label(self) -> str:
        loss = "every stack" if self.supervision == "all" else "the last stack"
        return f"{self.stacks} stacks x {self.blocks} modules, loss on {loss}"


STUDIES = {
    "supervision": (Variant(2, 4, "all"), Variant(2, 4, "last"), Variant(8, 1, "all"), Variant(8, 1, "last")),
    "stacking": (Variant(2, 4, "all"), Variant(4, 2, "all"), Variant(8, 1, "all")),
}
# The CPU scale: both studies' five variants in about 30 minutes on 2 cores (ablate's --minutes
# caps each); the GPU scale is fasthg train's own (the paper's 256 features, 256 px, depth 4).
CPU_SCALE = {"features": 32, "input_size": 128, "depth": 3, "epochs": 12, "train_size": 800, "val_size": 200}


def variants(studies: Sequence[str]) -> List[Variant]:
    """The variants the studies need, each once, in the studies' order."""
    unknown = [s for s in studies if s not in STUDIES]
    if unknown or not studies:
        raise ValueError(f"studies must be some of {', '.join(STUDIES)}, got {', '.join(studies) or 'none'}")
    out: List[Variant] = []
    for study in studies:
        out += [v for v in STUDIES[study] if v not in out]
    return out


def parameters(cfg: TrainConfig, variant: Variant, joints: int = 16) -> int:
    """The variant's parameter count at cfg's width and depth (built on the meta device)."""
    import torch

    from fasthg.models import StackedHourglass

    with torch.device("meta"):
        model = StackedHourglass(variant.stacks, cfg.features, joints, cfg.depth, backend="eager",
                                 num_blocks=variant.blocks)
    return sum(p.numel() for p in model.parameters())


def _result(variant: Variant, history: List[Dict], params: int, metric: str) -> Dict:
    """A variant's row of the table: its final scores, each stack's, and its history."""
    last = history[-1] if history else {}
    key = METRICS[metric].lower()
    return {"variant": variant.name, "label": variant.label, **dataclasses.asdict(variant), "params": params,
            "epochs": last.get("epoch", 0), "score": last.get(f"{metric}_{key}"),
            "hard": last.get(f"{metric}_hard"),
            "stack_scores": [last[f"{metric}_{key}_stack{k}"] for k in range(1, variant.stacks + 1)
                             if f"{metric}_{key}_stack{k}" in last],
            "history": history}


def run_variant(base: TrainConfig, variant: Variant, out: str, minutes: Optional[float]) -> Dict:
    """Trains (or resumes, or reads back) one variant in out/<name>; its result row. Raises
    KeyboardInterrupt where a signal stopped its training (its last.pt resumes it)."""
    from fasthg.train.trainer import Trainer

    folder = os.path.join(out, variant.name)
    cfg = dataclasses.replace(base, out=folder, stacks=variant.stacks, blocks=variant.blocks,
                              supervision=variant.supervision, minutes=minutes)
    last = os.path.join(folder, "last.pt")
    state = checkpoint.read(last) if os.path.exists(last) else None
    if state is not None:
        spent = state.get("elapsed", 0.0) / 60  # the budget is the variant's, over all its runs
        if (state["epoch"] >= cfg.epochs and not state["step_in_epoch"]) or (minutes is not None and spent >= minutes):
            return _result(variant, state["history"], parameters(cfg, variant), metric_of(cfg))
        if minutes is not None:
            cfg = dataclasses.replace(cfg, minutes=minutes - spent)
    trainer = Trainer(cfg, model_config=state["model_config"] if state else None)
    try:
        if state is not None:
            trainer.resume(last)
        trainer.fit()
    finally:
        trainer.close()
    if trainer._stopped and not trainer._out_of_time:
        raise KeyboardInterrupt(f"{variant.name} stopped by a signal; run the same command again to resume it")
    params = sum(p.numel() for p in trainer.model.parameters())
    return _result(variant, trainer.history, params, metric_of(cfg))


def run(base: TrainConfig, studies: Sequence[str], out: str, minutes: Optional[float] = None,
        progress: bool = True) -> Dict:
    """Every variant of the studies on base's data, seed and schedule; writes and returns the
    results ({"studies", "config", "variants": [row...], "param_spread"})."""
    from tqdm import tqdm

    todo = variants(studies)
    os.makedirs(out, exist_ok=True)
    counts = {v.name: parameters(base, v) for v in todo}
    spread = max(counts.values()) / min(counts.values()) - 1
    print("parameters: " + ", ".join(f"{name} {n / 1e6:.2f}M" for name, n in counts.items())
          + f" (largest {100 * spread:.1f}% above the smallest)")
    rows = []
    bar = tqdm(todo, desc="variants", unit="variant", disable=not progress)
    for variant in bar:
        bar.set_postfix_str(variant.name)
        print(f"\n== {variant.label} ({variant.name}) ==")
        rows.append(run_variant(base, variant, out, minutes))
    result = {"studies": list(studies), "metric": metric_of(base), "config": dataclasses.asdict(base),
              "minutes_per_variant": minutes, "param_spread": spread, "variants": rows}
    write(result, out)
    return result


def table(result: Dict) -> str:
    """The results as a Markdown table: parameters, epochs, final score, harder joints, each stack's."""
    name = "PCKh@0.5" if result["metric"] == "pckh" else "OKS AP"
    lines = [f"| variant | parameters | epochs | {name} | harder joints | by stack (1 .. last) |",
             "|---|---|---|---|---|---|"]
    for r in result["variants"]:
        stacks = " / ".join(f"{v:.1f}" for v in r["stack_scores"])
        hard = "-" if r["hard"] is None else f"{r['hard']:.1f}"
        score = "-" if r["score"] is None else f"{r['score']:.1f}"
        lines.append(f"| {r['label']} | {r['params'] / 1e6:.2f}M | {r['epochs']} | {score} | {hard} | {stacks} |")
    return "\n".join(lines)


def write(result: Dict, out: str) -> None:
    """ablation.json, ablation.md and the two figures (where matplotlib is installed)."""
    with open(os.path.join(out, "ablation.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out, "ablation.md"), "w") as f:
        f.write(table(result) + "\n")
    plot(result, out)


def plot(result: Dict, out: str) -> None:
    """supervision.png (harder-joint accuracy per epoch, with and without intermediate
    supervision; Fig. 8) and stacking.png (each stack's accuracy per arrangement; Fig. 9)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = {r["variant"]: r for r in result["variants"]}
    metric = result["metric"]
    label = "PCKh@0.5" if metric == "pckh" else "OKS AP"
    if "supervision" in result["studies"]:
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for i, v in enumerate(STUDIES["supervision"]):
            history = rows[v.name]["history"]
            key = f"{metric}_{'hard' if metric == 'pckh' else METRICS[metric].lower()}"
            ax.plot([h["epoch"] for h in history], [h.get(key) for h in history], marker="o", markersize=3,
                    color=f"C{i // 2}", linestyle="-" if v.supervision == "all" else "--", label=v.label)
        what = "harder joints" if metric == "pckh" else "all joints"
        ax.set(xlabel="epoch", ylabel=f"validation {label}, {what} (%)", ylim=(0, 100),
               title="intermediate supervision (Fig. 8)")
        ax.legend(fontsize=7)
        save_figure(fig, os.path.join(out, "supervision.png"))
    if "stacking" in result["studies"]:
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for v in STUDIES["stacking"]:
            r = rows[v.name]
            ax.plot(range(1, len(r["stack_scores"]) + 1), r["stack_scores"], marker="o",
                    label=f"{v.stacks} stacks x {v.blocks} ({r['params'] / 1e6:.2f}M)")
        ax.set(xlabel="stack", ylabel=f"validation {label} (%)", title="accuracy at each stack (Fig. 9)")
        ax.legend(fontsize=7)
        save_figure(fig, os.path.join(out, "stacking.png"))

