"""`fasthg eval`: a checkpoint's score table (PCKh; OKS AP on COCO), per-joint PCKh, a picture
of its poses and its predictions written for other tools."""
import argparse
import json
import os

import numpy as np
import torch

from fasthg.cli import _model
from fasthg.cli import args as types
from fasthg.data.dataset import BAD_IMAGES, PoseDataset
from fasthg.data.records import COCO_JOINTS, MPII_JOINTS, joint_conventions
from fasthg.data.transforms import transform_points
from fasthg.draw import draw_skeleton, grid, write_png
from fasthg.evaluate import evaluate, format_table, per_joint_table

PREDICTION_FORMATS = (".mat", ".h5", ".npz", ".json", ".csv")
COORDINATES = ("image pixels, 1-based (MATLAB, the MPII toolkit's): fasthg's 0-based pixel centres + 1; "
               "pos_pred_src[x/y, joint, person]")


def eval_source(args, input_size):
    """The records to evaluate: held-out synthetic people by default, else the given files;
    the first args.limit of them where that is given."""
    annotation = args.mpii_json or args.mpii_h5 or args.coco
    if annotation and not args.images:
        raise types.UsageError("--mpii-json, --mpii-h5 and --coco need --images, the folder of the file's images")
    if args.mpii_json:
        from fasthg.data.mpii import load_mpii_json
        source = load_mpii_json(args.mpii_json, args.images, split=None if args.split == "all" else args.split)
    elif args.mpii_h5:
        from fasthg.data.mpii import load_mpii_h5
        source = load_mpii_h5(args.mpii_h5, args.images)
    elif args.coco:
        from fasthg.data.coco import load_coco_keypoints
        source = load_coco_keypoints(args.coco, args.images)
    else:
        from fasthg.data.synthetic import SyntheticPoses
        source = SyntheticPoses(args.n, input_size, seed=args.seed)
    if annotation and not len(source):
        split = f" in its {args.split} split" if args.mpii_json and args.split != "all" else ""
        raise ValueError(f"{annotation}: no people to evaluate{split} (expected annotated people)")
    if args.limit and args.limit < len(source):
        source = torch.utils.data.Subset(source, range(args.limit))
    if annotation:  # the people evaluated, each with its image file
        from fasthg.data.mpii import require_images
        require_images(source, annotation, args.images)
    return source


def _write_mat(path: str, pos_pred_src: np.ndarray) -> None:
    """A MATLAB file holding pos_pred_src: scipy's v5 format where scipy is installed, else
    a v7.3 one (HDF5 with MATLAB's header; MATLAB's dimensions are HDF5's reversed)."""
    try:
        from scipy.io import savemat
    except ImportError:
        savemat = None
    if savemat is not None:
        savemat(path, {"pos_pred_src": pos_pred_src})
        return
    import time

    import h5py

    with h5py.File(path, "w", userblock_size=512) as f:
        f.create_dataset("pos_pred_src", data=np.ascontiguousarray(pos_pred_src.T))
        f["pos_pred_src"].attrs["MATLAB_class"] = np.bytes_("double")
    header = (f"MATLAB 7.3 MAT-file, Platform: fasthg, Created on: {time.asctime()} "
              "HDF5 schema 1.00 .").encode().ljust(116) + bytes(8) + b"\x00\x02IM"
    with open(path, "r+b") as f:
        f.write(header)


def save_predictions(path: str, pred: np.ndarray, index: np.ndarray, joint_names=MPII_JOINTS) -> None:
    """Predicted joints (N, J, 2), fasthg's 0-based image pixels, written in the MPII
    evaluation toolkit's layout: pos_pred_src (2, J, N) = x/y, joint, person, 1-based.
    .mat: what evaluatePCKh.m loads; .h5, .npz, .json: pos_pred_src, index (each person's
    position in its source), joint_names and a note on the coordinates; .csv: a row per
    person and joint (person, index, joint, name, x, y)."""
    pos = np.asarray(pred, np.float64).transpose(2, 1, 0) + 1.0
    index = np.asarray(index, np.int64)
    ext = os.path.splitext(path)[1].lower()
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    if ext == ".mat":
        _write_mat(path, pos)
    elif ext == ".h5":
        import h5py

        with h5py.File(path, "w") as f:
            f["pos_pred_src"], f["index"] = pos, index
            f.attrs["joint_names"], f.attrs["coordinates"] = list(joint_names), COORDINATES
    elif ext == ".npz":
        np.savez(path, pos_pred_src=pos, index=index, joint_names=np.array(joint_names), coordinates=COORDINATES)
    elif ext == ".json":
        with open(path, "w") as f:
            json.dump({"coordinates": COORDINATES, "joint_names": list(joint_names), "index": index.tolist(),
                       "pos_pred_src": pos.tolist()}, f)
    elif ext == ".csv":
        with open(path, "w") as f:
            f.write("person,index,joint,name,x_1based,y_1based\n")
            for n in range(pos.shape[2]):
                for j, name in enumerate(joint_names):
                    f.write(f"{n},{index[n]},{j},{name},{float(pos[0, j, n])!r},{float(pos[1, j, n])!r}\n")
    else:
        raise ValueError(f"{path}: predictions are written as {', '.join(PREDICTION_FORMATS)}")


def save_coco_results(path: str, pred: np.ndarray, peak: np.ndarray, image_ids) -> None:
    """COCO's keypoint results format: a person per entry, {image_id, category_id 1, keypoints
    [x, y, heatmap peak] x 17, score (mean peak)}, in the annotation file's own pixel
    coordinates (those fasthg reads them in, unshifted)."""
    results = [{"image_id": image_id, "category_id": 1,
                "keypoints": np.concatenate([p, s[:, None]], 1).reshape(-1).tolist(), "score": float(s.mean())}
               for image_id, p, s in zip(image_ids, np.asarray(pred, np.float64), np.asarray(peak, np.float64))]
    with open(path, "w") as f:
        json.dump(results, f)


def _prediction_file(text):
    if os.path.splitext(text)[1].lower() not in PREDICTION_FORMATS:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a file ending in {', '.join(PREDICTION_FORMATS)}")
    return text


def _write(args, source, res):
    path = args.save_predictions
    image_ids = [source[k].extra.get("image_id") for k in range(len(source))] if args.coco else []
    if path.lower().endswith(".json") and image_ids and None not in image_ids:
        save_coco_results(path, res["pred"], res["peak"], image_ids)
        print(f"wrote {path} (COCO keypoint results, the annotation file's pixel coordinates)")
        return
    save_predictions(path, res["pred"], res["index"], COCO_JOINTS if args.coco else MPII_JOINTS)
    print(f"wrote {path} (pos_pred_src: 2 x {res['pred'].shape[1]} joints x {len(res['pred'])} people, "
          "1-based image pixels: fasthg's 0-based + 1)")


def run(args) -> int:
    if args.grid_stack is not None and not args.grid:
        raise types.UsageError("--grid-stack K picks the stack drawn in --grid's picture: give --grid too")
    run, model, size = _model.load(args, args.batch_size)
    if args.grid_stack is not None and args.grid_stack > model.num_stacks:
        raise types.UsageError(f"--grid-stack: {args.checkpoint} has stacks 1 to {model.num_stacks}, "
                               f"got {args.grid_stack}")
    source = eval_source(args, size)
    joints = len(COCO_JOINTS) if args.coco else len(MPII_JOINTS)
    if model.num_joints != joints:
        raise ValueError(f"{args.checkpoint}: a model of {model.num_joints} joints cannot be scored on "
                         f"{'COCO' if args.coco else 'MPII-style'} people ({joints} joints)")
    flip_pairs, skeleton = joint_conventions(joints)
    if args.bad_images == "skip":  # the person stays, unscored (blank image, nothing annotated)
        from fasthg.data.dataset import SkipBadImages

        source = SkipBadImages(source, substitute=False)
    ds = PoseDataset(source, input_size=size, train=False, flip_pairs=flip_pairs)
    metric = "oks" if args.coco else "pckh"
    table, res = evaluate(run, ds, threshold=args.threshold, metric=metric, batch_size=args.batch_size,
                          flip_test=args.flip_test)
    name = "OKS AP (ground-truth boxes)" if args.coco else f"PCKh@{args.threshold}"
    skipped = int(res["skipped"].sum())
    scored = f"{len(ds) - skipped} people, {skipped} skipped for bad images" if skipped else f"{len(ds)} people"
    print(f"{name} on {scored} ({'flip test' if args.flip_test else 'no flip test'}):")
    print(format_table(table))
    if metric == "pckh":
        print(f"\nper joint:\n{per_joint_table(res['pckh_accuracy'], res['pckh_count'], MPII_JOINTS)}")
    if args.per_stack:
        print(f"\n{name} of each stack's heatmaps:\n{stack_table(res['stack_tables'])}")
    if args.save_predictions:
        _write(args, source, res)
    if args.grid:
        _write_grid(args, ds, res, skeleton, model.num_stacks)
    return 0


def stack_table(tables) -> str:
    """Each stack's score table (evaluate()'s stack_tables) as rows of text, stack 1 first."""
    names = list(tables[0])
    lines = ["stack | " + " | ".join(f"{n:>8}" for n in names)]
    lines += [f"{k:>5} | " + " | ".join(f"{t[n]:8.2f}" for n in names) for k, t in enumerate(tables, 1)]
    return "\n".join(lines)


def _write_grid(args, ds, res, skeleton, stacks: int) -> None:
    """The first 16 people, predicted (coloured) over true (white) skeletons; with --grid-stack
    K, stack K's prediction beside the last stack's for each person."""
    early = args.grid_stack
    tiles = []
    for k in range(min(16 if early is None else 8, len(ds))):
        item = ds[k]
        crop = ((item["image"].numpy().transpose(1, 2, 0) + 0.5) * 255).clip(0, 255).astype(np.uint8)
        m = item["matrix"].numpy()
        truth = draw_skeleton(crop, transform_points(res["joints"][k], m), res["visible"][k], skeleton,
                              colour=(255, 255, 255), thickness=1)
        shown = [res["pred_stacks"][k, early - 1]] if early is not None else []
        for pred in shown + [res["pred"][k]]:
            tiles.append(draw_skeleton(truth, transform_points(pred, m), skeleton=skeleton, thickness=2))
    write_png(args.grid, grid(tiles))
    pairs = f"; each pair: stack {early}, then stack {stacks}" if early is not None else ""
    print(f"wrote {args.grid} (predicted: coloured, true: white{pairs})")


def add_command(sub):
    e = sub.add_parser("eval", help="score table of a checkpoint: PCKh (held-out synthetic people, MPII files) "
                                    "or OKS AP (COCO file)")
    _model.add_arguments(e)
    e.add_argument("--n", type=types.positive_int, default=500,
                   help="synthetic people to evaluate on (default: 500)")
    e.add_argument("--seed", type=types.natural_int, default=12345,
                   help="synthetic validation seed (training uses others; default: 12345)")
    e.add_argument("--mpii-json", help="MPII annotations, JSON list format")
    e.add_argument("--mpii-h5", help="MPII annotations, HDF5 format (with head sizes)")
    e.add_argument("--coco", help="COCO keypoints JSON (scored by OKS AP on its ground-truth boxes)")
    e.add_argument("--images", help="image folder of --mpii-json/--mpii-h5/--coco")
    e.add_argument("--split", choices=["train", "valid", "all"], default="valid",
                   help="for --mpii-json lists that flag validation people (use all for a file of one split; "
                        "default: valid)")
    e.add_argument("--limit", type=types.positive_int, default=None, metavar="N",
                   help="evaluate only the first N people of the source, for a quick look (default: all)")
    e.add_argument("--threshold", type=types.positive_float, default=0.5,
                   help="PCKh threshold, a fraction of the head size (default: 0.5)")
    e.add_argument("--batch-size", type=types.positive_int, default=16, help="people per batch (default: 16)")
    e.add_argument("--bad-images", dest="bad_images", choices=BAD_IMAGES, default="stop",
                   help="a person whose image file is bad (truncated, unreadable, too large): stop with an error "
                        "naming it, or skip it, unscored, and say how many were skipped (default: stop)")
    e.add_argument("--grid", help="write a PNG grid of predicted vs true skeletons here")
    e.add_argument("--grid-stack", dest="grid_stack", type=types.positive_int, default=None, metavar="K",
                   help="in --grid, show stack K's prediction beside the last stack's for each person (the "
                        "paper's Fig. 9, left)")
    e.add_argument("--per-stack", dest="per_stack", action="store_true",
                   help="also print the score table of every stack's heatmaps (intermediate supervision's "
                        "predictions; the paper's Fig. 9, right)")
    e.add_argument("--save-predictions", type=_prediction_file, metavar="FILE",
                   help="write the predicted joints in image pixels, in the MPII evaluation toolkit's layout: "
                        "pos_pred_src (2, joints, people), x/y by joint by person, 1-based like the toolkit "
                        "(fasthg's own coordinates are 0-based pixel centres: the file holds them + 1). .mat: "
                        "the file evaluatePCKh.m loads (MATLAB v5 with scipy, else v7.3); .h5, .npz, .json, "
                        ".csv: the same numbers in plain files. With --coco, a .json is COCO's keypoint "
                        "results format instead, in the annotation file's own coordinates")
    e.set_defaults(fn=run)
