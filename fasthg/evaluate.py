"""From heatmaps to joint positions, and the scores a pose researcher reports: PCKh (MPII:
distances over the head size) and OKS AP (COCO: keypoint similarity to the ground truth,
averaged precision over similarity thresholds), here on ground-truth person boxes."""
from typing import Dict, Sequence, Tuple

import numpy as np
import torch

from fasthg.data.records import COCO_SIGMAS, MPII_GROUPS
from fasthg.data.transforms import from_heatmap_coords, invert, transform_points

# The paper's "harder joints" (Fig. 8: wrists, elbows, knees, ankles), MPII_GROUPS' names.
HARDER = ("Elbow", "Wrist", "Knee", "Ankle")


def decode_heatmaps(heatmaps) -> Tuple[np.ndarray, np.ndarray]:
    """Argmax of each [.., J, h, w] heatmap, moved a quarter pixel towards the higher
    neighbour in x and in y (the hourglass paper's sub-pixel step). Returns positions
    (.., J, 2) in heatmap pixels (x, y) and the peak values (.., J)."""
    hm = heatmaps.detach().float().cpu().numpy() if isinstance(heatmaps, torch.Tensor) else np.asarray(heatmaps, np.float32)
    *lead, h, w = hm.shape
    flat = hm.reshape(-1, h * w)
    idx = flat.argmax(1)
    peak = flat[np.arange(flat.shape[0]), idx]
    y, x = np.divmod(idx, w)
    maps = hm.reshape(-1, h, w)
    rows = np.arange(maps.shape[0])
    xs, ys = x.astype(np.float64), y.astype(np.float64)
    inner_x = (x > 0) & (x < w - 1)
    inner_y = (y > 0) & (y < h - 1)
    dx = np.where(inner_x, maps[rows, y, np.minimum(x + 1, w - 1)] - maps[rows, y, np.maximum(x - 1, 0)], 0)
    dy = np.where(inner_y, maps[rows, np.minimum(y + 1, h - 1), x] - maps[rows, np.maximum(y - 1, 0), x], 0)
    xs += 0.25 * np.sign(dx)
    ys += 0.25 * np.sign(dy)
    return np.stack([xs, ys], -1).reshape(*lead, 2), peak.reshape(lead)


def to_image_coords(points_hm: np.ndarray, matrices: np.ndarray, stride: float) -> np.ndarray:
    """Heatmap positions (N, J, 2) back to source-image pixels, through each sample's crop
    matrix (N, 2, 3) (the one that made the network's input)."""
    crop = from_heatmap_coords(points_hm, stride)
    return np.stack([transform_points(p, invert(m)) for p, m in zip(crop, np.asarray(matrices))])


def flip_back(heatmaps: torch.Tensor, flip_pairs: Sequence[Tuple[int, int]]) -> torch.Tensor:
    """Heatmaps of a horizontally flipped input, turned back: mirror x, swap left/right."""
    out = heatmaps.flip(-1)
    perm = list(range(out.shape[-3]))
    for a, b in flip_pairs:
        perm[a], perm[b] = b, a
    return out[..., perm, :, :]


def _first_unscorable(visible: np.ndarray, norm: np.ndarray, records, what: str, fix: str) -> None:
    """ValueError naming the first person with annotated joints whose normaliser `norm` is not
    positive (a division by zero, or a negative distance scale, otherwise)."""
    bad = visible.any(1) & ~(norm > 0)
    if bad.any():
        i, count = int(np.argmax(bad)), int(bad.sum())
        who = f"person {i}" + (f" (record {records[i]})" if records is not None else "")
        raise ValueError(f"{who} has annotated joints ({int(visible[i].sum())}) but {what} {norm[i]:g}: "
                         f"{fix} ({count} {'person' if count == 1 else 'people'} like this)")


def pckh(pred: np.ndarray, gt: np.ndarray, visible: np.ndarray, head_size: np.ndarray,
         threshold: float = 0.5, records=None) -> Tuple[np.ndarray, np.ndarray]:
    """Per-joint fraction of annotated joints predicted within threshold x head size.
    pred, gt: (N, J, 2) image pixels; visible: (N, J), 1 where annotated; head_size: (N,);
    records: (N,) each person's record index, for messages.
    Returns (accuracy (J,), count (J,)); a joint never annotated has accuracy nan.
    A person with annotated joints and a head size of 0 (a zero-size head box, or a file
    without head boxes) is an error naming that person, not left out: leaving people out
    silently would score a different set than the benchmark's. People with no annotated joint
    (including those SkipBadImages blanked) count for nothing, whatever their head size."""
    pred, gt = np.asarray(pred, np.float64), np.asarray(gt, np.float64)
    visible, head_size = np.asarray(visible) > 0, np.asarray(head_size, np.float64)
    _first_unscorable(visible, head_size, records, "head size",
                      "PCKh needs a positive head size for every person it scores (MPII's: the HDF5 files' "
                      "normalize, from the head boxes)")
    dist = np.linalg.norm(pred - gt, axis=-1) / np.where(head_size > 0, head_size, 1.0)[:, None]
    hit = (dist <= threshold) & visible
    count = visible.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return hit.sum(0) / count, count


def pckh_table(accuracy: np.ndarray, count: np.ndarray,
               groups=MPII_GROUPS) -> Dict[str, float]:
    """The usual table: each group's accuracy over its joints' annotations, and Mean over
    the joints of every group (for MPII: all but pelvis and thorax), in percent; and Hard,
    over the harder joints' annotations (HARDER: elbows, wrists, knees, ankles; the paper's
    Fig. 8), where the groups hold them."""
    def over(j):
        return 100.0 * float(np.nansum(accuracy[j] * count[j]) / max(count[j].sum(), 1))

    out, by_name = {}, {name: list(joints) for name, joints in groups}
    for name, joints in by_name.items():
        out[name] = over(joints)
    out["Mean"] = over(sum(by_name.values(), []))
    if all(name in by_name for name in HARDER):
        out["Hard"] = over(sum((by_name[name] for name in HARDER), []))
    return out


def oks(pred: np.ndarray, gt: np.ndarray, visible: np.ndarray, area: np.ndarray,
        sigmas: Sequence[float] = COCO_SIGMAS, records=None) -> np.ndarray:
    """COCO's object keypoint similarity of each person: the mean over annotated joints of
    exp(-d^2 / (2 area (2 sigma)^2)), d in image pixels, area the person's segment area.
    pred, gt: (N, J, 2); visible: (N, J); area: (N,); records: (N,) record indices, for messages.
    nan for a person with no annotated joint. A person with annotated joints and no positive
    area is an error naming that person."""
    pred, gt = np.asarray(pred, np.float64), np.asarray(gt, np.float64)
    visible, area = np.asarray(visible) > 0, np.asarray(area, np.float64)
    _first_unscorable(visible, area, records, "area", "OKS needs a positive area for every person it scores")
    k2 = (2 * np.asarray(sigmas, np.float64)) ** 2
    e = ((pred - gt) ** 2).sum(-1) / (2 * k2 * np.where(area > 0, area, 1.0)[:, None])
    count = visible.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(visible, np.exp(-e), 0.0).sum(1) / count


def oks_table(similarity: np.ndarray, score: np.ndarray) -> Dict[str, float]:
    """AP (mean over OKS thresholds 0.50:0.05:0.95), AP50 and AP75 in percent, as COCO's
    keypoint evaluation computes them (precision made non-increasing, read at 101 recall
    points) for one prediction per ground-truth person, ranked by `score`. People whose
    similarity is nan (nothing annotated) are left out."""
    similarity, score = np.asarray(similarity, np.float64), np.asarray(score, np.float64)
    keep = ~np.isnan(similarity)
    ranked = similarity[keep][np.argsort(-score[keep], kind="stable")]
    if not len(ranked):
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    recall_points = np.linspace(0, 1, 101)
    aps = []
    for t in np.linspace(0.5, 0.95, 10):
        tp = np.cumsum(ranked >= t)
        recall = tp / len(ranked)
        precision = np.maximum.accumulate((tp / np.arange(1, len(ranked) + 1))[::-1])[::-1]
        at = np.searchsorted(recall, recall_points, side="left")
        aps.append(float(np.where(at < len(ranked), precision[np.minimum(at, len(ranked) - 1)], 0.0).mean()))
    return {"AP": 100.0 * float(np.mean(aps)), "AP50": 100.0 * aps[0], "AP75": 100.0 * aps[5]}


def format_table(table: Dict[str, float]) -> str:
    names = list(table)
    return " | ".join(f"{n:>8}" for n in names) + "\n" + " | ".join(f"{table[n]:8.2f}" for n in names)


# The items' entries predict_dataset returns as they are.
_COLLECTED = ("joints", "visible", "head_size", "area", "index", "record", "skipped")


@torch.no_grad()
def predict_dataset(model, dataset, batch_size: int = 16, flip_test: bool = False, device=None,
                    num_workers: int = 0, progress: bool = True) -> Dict[str, np.ndarray]:
    """Run the model (an nn.Module, or a runtime of fasthg.deploy.runtimes: a callable with a
    .device) over an evaluation PoseDataset and map each prediction back to its source
    image. Flip test: average with the heatmaps of the mirrored input, turned back. Returns
    pred (N, J, 2) and peak (N, J) of the last stack, pred_stacks (N, S, J, 2) and peak_stacks
    (N, S, J) of every stack (the last one's are pred and peak), joints, visible,
    head_size, area, index, record (each person's record index) and skipped (1 where
    SkipBadImages blanked a person whose image is bad), in dataset order. Raises ValueError for
    an empty dataset, and BadImageError (one line naming the record and file) for a bad image,
    from DataLoader workers too."""
    from tqdm import tqdm

    if dataset.train:
        raise ValueError("predict_dataset: pass an evaluation dataset (PoseDataset(..., train=False))")
    if len(dataset) == 0:
        raise ValueError("predict_dataset: no people to evaluate (the evaluation set is empty)")
    module = isinstance(model, torch.nn.Module)  # else a runtime of fasthg.deploy.runtimes
    device = torch.device(device or (next(model.parameters()).device if module else model.device))
    was_training = module and model.training
    if module:
        model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    out = {k: [] for k in ("pred_stacks", "peak_stacks") + _COLLECTED}
    try:
        for batch in tqdm(loader, desc="evaluate", disable=not progress, leave=False):
            images = batch["image"].to(device)
            heatmaps = model(images).float()  # [B, stacks, J, h, w]
            if flip_test:
                mirrored = model(images.flip(-1)).float()
                heatmaps = (heatmaps + flip_back(mirrored, dataset.flip_pairs)) / 2
            pos, peak = decode_heatmaps(heatmaps)
            matrices = batch["matrix"].numpy()
            out["pred_stacks"].append(np.stack([to_image_coords(pos[:, s], matrices, dataset.stride)
                                                for s in range(pos.shape[1])], 1))
            out["peak_stacks"].append(peak)
            for k in _COLLECTED:
                out[k].append(np.asarray(batch[k]))
    finally:
        if module:
            model.train(was_training)
    res = {k: np.concatenate(v) for k, v in out.items()}
    res["pred"], res["peak"] = res["pred_stacks"][:, -1], res["peak_stacks"][:, -1]
    return res


METRICS = {"pckh": "Mean", "oks": "AP"}  # metric -> the entry of its table that ranks models


def evaluate(model, dataset, threshold: float = 0.5, metric: str = "pckh",
             **kw) -> Tuple[Dict[str, float], Dict[str, np.ndarray]]:
    """The model's score table (percent) on an evaluation PoseDataset, and the predictions it
    was computed from: PCKh@threshold (metric "pckh", with the per-joint accuracy and count of
    pckh() in the results as "pckh_accuracy" and "pckh_count"), or OKS AP ("oks": COCO; each
    person scored by its mean heatmap peak). The table is the last stack's; the results hold
    every stack's as "stack_tables" (the paper's accuracy at each intermediate stack) and,
    for PCKh, their per-joint accuracies as "pckh_accuracy_stacks" (S, J)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
    res = predict_dataset(model, dataset, **kw)
    stacks = range(res["pred_stacks"].shape[1])
    if metric == "oks":
        tables = [oks_table(oks(res["pred_stacks"][:, s], res["joints"], res["visible"], res["area"],
                                records=res["record"]), res["peak_stacks"][:, s].mean(1)) for s in stacks]
    else:
        scored = [pckh(res["pred_stacks"][:, s], res["joints"], res["visible"], res["head_size"], threshold,
                       records=res["record"]) for s in stacks]
        res["pckh_accuracy_stacks"] = np.stack([acc for acc, _ in scored])
        res["pckh_accuracy"], res["pckh_count"] = scored[-1]
        tables = [pckh_table(acc, count) for acc, count in scored]
    res["stack_tables"] = tables
    return tables[-1], res


def per_joint_table(accuracy: np.ndarray, count: np.ndarray, names: Sequence[str]) -> str:
    """pckh()'s per-joint result as text: a line per joint with its name, its accuracy in
    percent ("-" for a joint never annotated) and its number of annotations."""
    width = max(len(n) for n in names)
    lines = [f"{'joint':<{width}}  {'PCKh':>7}  {'annotated':>9}"]
    for name, a, c in zip(names, np.asarray(accuracy, np.float64), count):
        lines.append(f"{name:<{width}}  {'-' if np.isnan(a) else f'{100.0 * a:.2f}':>7}  {int(c):>9}")
    return "\n".join(lines)
