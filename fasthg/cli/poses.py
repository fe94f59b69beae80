"""`fasthg eval` and `fasthg predict`: a checkpoint's score table (PCKh; OKS AP on COCO) and
pictures of its poses."""
import os

import cv2
import numpy as np

from fasthg import checkpoint
from fasthg.data.dataset import PoseDataset, load_image
from fasthg.data.records import COCO_JOINTS, MPII_JOINTS, PoseRecord, joint_conventions
from fasthg.device import resolve as resolve_device
from fasthg.data.transforms import transform_points
from fasthg.draw import draw_skeleton, grid, write_png
from fasthg.evaluate import evaluate, format_table, predict_dataset


def _model_and_size(args):
    state = checkpoint.read(args.checkpoint)
    model = checkpoint.load_model(args.checkpoint, backend=args.backend).to(resolve_device(args.device))
    return model, args.input_size or int(state.get("input_size", 256))


def eval_source(args, input_size):
    """The records to evaluate: held-out synthetic people by default, else the given files."""
    if args.mpii_json:
        from fasthg.data.mpii import load_mpii_json
        return load_mpii_json(args.mpii_json, args.images, split=None if args.split == "all" else args.split)
    if args.mpii_h5:
        from fasthg.data.mpii import load_mpii_h5
        return load_mpii_h5(args.mpii_h5, args.images)
    if args.coco:
        from fasthg.data.coco import load_coco_keypoints
        return load_coco_keypoints(args.coco, args.images)
    from fasthg.data.synthetic import SyntheticPoses
    return SyntheticPoses(args.n, input_size, seed=args.seed)


def run_eval(args) -> int:
    model, size = _model_and_size(args)
    source = eval_source(args, size)
    joints = len(COCO_JOINTS) if args.coco else len(MPII_JOINTS)
    if model.num_joints != joints:
        raise ValueError(f"{args.checkpoint}: a model of {model.num_joints} joints cannot be scored on "
                         f"{'COCO' if args.coco else 'MPII-style'} people ({joints} joints)")
    flip_pairs, skeleton = joint_conventions(joints)
    ds = PoseDataset(source, input_size=size, train=False, flip_pairs=flip_pairs)
    metric = "oks" if args.coco else "pckh"
    table, res = evaluate(model, ds, threshold=args.threshold, metric=metric, batch_size=args.batch_size,
                          flip_test=args.flip_test)
    name = "OKS AP (ground-truth boxes)" if args.coco else f"PCKh@{args.threshold}"
    print(f"{name} on {len(ds)} people ({'flip test' if args.flip_test else 'no flip test'}):")
    print(format_table(table))
    if args.grid:
        tiles = []
        for k in range(min(16, len(ds))):
            item = ds[k]
            crop = ((item["image"].numpy().transpose(1, 2, 0) + 0.5) * 255).clip(0, 255).astype(np.uint8)
            m = item["matrix"].numpy()
            truth = draw_skeleton(crop, transform_points(res["joints"][k], m), res["visible"][k], skeleton,
                                  colour=(255, 255, 255), thickness=1)
            tiles.append(draw_skeleton(truth, transform_points(res["pred"][k], m), skeleton=skeleton, thickness=2))
        write_png(args.grid, grid(tiles))
        print(f"wrote {args.grid} (predicted: coloured, true: white)")
    return 0


def run_predict(args) -> int:
    model, size = _model_and_size(args)
    flip_pairs, skeleton = joint_conventions(model.num_joints)
    os.makedirs(args.out, exist_ok=True)
    for path in args.images_in:
        img = cv2.imread(path, cv2.IMREAD_COLOR)
        if img is None:
            raise ValueError(f"cannot read image {path!r}")
        h, w = img.shape[:2]
        # No person box given: the person is taken to fill the image (crop = whole image).
        record = PoseRecord(center=((w - 1) / 2, (h - 1) / 2), scale=max(h, w) / 200 / 1.25, joints=np.zeros((1, 2)),
                            visible=np.zeros(1), image=path)
        ds = PoseDataset([record], input_size=size, train=False, flip_pairs=flip_pairs)
        res = predict_dataset(model, ds, batch_size=1, flip_test=args.flip_test, progress=False)
        out = os.path.join(args.out, os.path.splitext(os.path.basename(path))[0] + "_pose.png")
        write_png(out, draw_skeleton(load_image(record), res["pred"][0], skeleton=skeleton,
                                     thickness=max(2, max(h, w) // 150)))
        print(out)
    return 0


def add_commands(sub):
    e = sub.add_parser("eval", help="score table of a checkpoint: PCKh (held-out synthetic people, MPII files) "
                                    "or OKS AP (COCO file)")
    p = sub.add_parser("predict", help="draw a checkpoint's predicted skeleton on images (PNG)")
    for parser in (e, p):
        parser.add_argument("checkpoint")
        parser.add_argument("--backend", default="auto", choices=["auto", "eager", "native", "triton"])
        parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
        parser.add_argument("--input-size", type=int, default=None, help="default: the checkpoint's")
        parser.add_argument("--flip-test", action="store_true",
                            help="average with the mirrored image's heatmaps (real photos; not synthetic "
                                 "people, whose left/right colour code a mirror inverts)")
    e.add_argument("--n", type=int, default=500, help="synthetic people to evaluate on")
    e.add_argument("--seed", type=int, default=12345, help="synthetic validation seed (training uses others)")
    e.add_argument("--mpii-json", help="MPII annotations, JSON list format")
    e.add_argument("--mpii-h5", help="MPII annotations, HDF5 format (with head sizes)")
    e.add_argument("--coco", help="COCO keypoints JSON (scored by OKS AP on its ground-truth boxes)")
    e.add_argument("--images", help="image folder of --mpii-json/--mpii-h5/--coco")
    e.add_argument("--split", choices=["train", "valid", "all"], default="valid",
                   help="for --mpii-json lists that flag validation people (use all for a file of one split)")
    e.add_argument("--threshold", type=float, default=0.5)
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--grid", help="write a PNG grid of predicted vs true skeletons here")
    e.set_defaults(fn=run_eval)
    p.add_argument("images_in", nargs="+", metavar="IMAGE")
    p.add_argument("--out", default="runs/predict", help="folder for IMAGE_pose.png")
    p.set_defaults(fn=run_predict)
