"""Pictures: skeletons drawn on images, grids of predicted vs true, training curves. (The
benchmark chart is fasthg.bench.chart.)"""
import os
from typing import Dict, Optional, Sequence, Tuple

import cv2
import numpy as np

from fasthg.data.records import COCO_JOINTS, MPII_JOINTS, joint_conventions

# Right side warm, left side cool, centre line white: the usual reading of pose pictures.
_RIGHT, _LEFT, _MIDDLE = (255, 80, 40), (40, 140, 255), (255, 255, 255)
_KNOWN_JOINTS = {len(names): names for names in (MPII_JOINTS, COCO_JOINTS)}


def joint_side(name: str) -> str:
    """The side of a joint by its name, "right", "left" or "middle": r_/right and l_/left
    name a side (MPII's r_ankle, COCO's l_eye), anything else (pelvis, nose) is the centre line."""
    name = name.lower()
    if name.startswith(("r_", "right")):
        return "right"
    if name.startswith(("l_", "left")):
        return "left"
    return "middle"


def bone_colour(a: str, b: str):
    """The colour of a bone between joints named a and b: a bone with an end on one side
    only is that side's (MPII's hip-pelvis is right), one across both sides (COCO's
    shoulder-shoulder) or on the centre line is white."""
    sides = {joint_side(a), joint_side(b)} - {"middle"}
    if sides == {"right"}:
        return _RIGHT
    return _LEFT if sides == {"left"} else _MIDDLE


def draw_skeleton(image: np.ndarray, joints: np.ndarray, visible: Optional[np.ndarray] = None,
                  skeleton: Optional[Sequence[Tuple[int, int]]] = None, colour=None, thickness: int = 2,
                  joint_names: Optional[Sequence[str]] = None) -> np.ndarray:
    """A copy of the RGB image with bones between joints (where both ends are visible),
    coloured by side from the joints' names: `joint_names`, else MPII's for 16 joints and
    COCO's for 17 (other counts: all white). skeleton None: MPII's or COCO's bones by the
    number of joints (fasthg.data.records.joint_conventions)."""
    out = np.ascontiguousarray(image).copy()
    vis = np.ones(len(joints)) if visible is None else np.asarray(visible)
    if skeleton is None:
        _, skeleton = joint_conventions(len(joints))
    names = joint_names if joint_names is not None else _KNOWN_JOINTS.get(len(joints), ("",) * len(joints))
    if len(names) != len(joints):
        raise ValueError(f"{len(names)} joint names for {len(joints)} joints")
    pt = lambda k: (int(round(joints[k][0])), int(round(joints[k][1])))  # noqa: E731
    for a, b in skeleton:
        if vis[a] > 0 and vis[b] > 0:
            cv2.line(out, pt(a), pt(b), colour or bone_colour(names[a], names[b]), thickness, cv2.LINE_AA)
    for k in range(len(joints)):
        if vis[k] > 0:
            cv2.circle(out, pt(k), thickness + 1, colour or (255, 255, 0), -1, cv2.LINE_AA)
    return out


def grid(images: Sequence[np.ndarray], columns: int = 4) -> np.ndarray:
    """Same-size RGB images tiled row by row (blank tiles fill the last row)."""
    h, w, _ = images[0].shape
    rows = (len(images) + columns - 1) // columns
    out = np.zeros((rows * h, columns * w, 3), np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        out[r * h:(r + 1) * h, c * w:(c + 1) * w] = img
    return out


def write_png(path: str, image: np.ndarray) -> None:
    if not cv2.imwrite(path, cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")


def plot_training_curves(history: Sequence[dict], score_key: str, score_label: str, path: str,
                         more: Optional[Dict[str, str]] = None) -> None:
    """A PNG of a run's training loss and validation score per epoch (rows of fasthg train's
    log.jsonl), written atomically; nothing without history or matplotlib. `more`: {label: key}
    of further scores drawn beside it (each stack's, the harder joints')."""
    if not history:
        return
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    ep = [r["epoch"] for r in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(ep, [r["loss"] for r in history], marker="o")
    a.set(xlabel="epoch", ylabel="training loss", yscale="log")
    b.plot(ep, [r[score_key] for r in history], marker="o", color="tab:green", label="mean (last stack)")
    for label, key in (more or {}).items():
        rows = [r for r in history if key in r]  # a resumed run's older rows may lack it
        b.plot([r["epoch"] for r in rows], [r[key] for r in rows], marker=".", linewidth=1,
               linestyle="--" if "harder" in label else "-", label=label)
    if more:
        b.legend(fontsize=7)
    b.set(xlabel="epoch", ylabel=score_label, ylim=(0, 100))
    save_figure(fig, path)


def save_figure(fig, path: str) -> None:
    """A matplotlib figure as a PNG at `path`, written atomically, and closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
