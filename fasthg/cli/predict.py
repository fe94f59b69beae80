"""`fasthg predict`: pictures of a checkpoint's poses on image files."""
import os

import numpy as np

from fasthg.cli import _model
from fasthg.data.dataset import PoseDataset, load_image
from fasthg.data.images import read_rgb
from fasthg.data.records import PoseRecord, joint_conventions
from fasthg.draw import draw_skeleton, write_png
from fasthg.evaluate import predict_dataset


def _require_file(path: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"cannot read image {path}: " + ("a folder, not an image file" if os.path.isdir(path)
                                                                 else "no such file"))


def read_image(path: str) -> np.ndarray:
    """The image file as RGB uint8; an error that says what is wrong with it (truncated, too
    many pixels, not a picture: fasthg.data.images.read_rgb, as training reads its images)."""
    _require_file(path)
    return read_rgb(path)


def run(args) -> int:
    for path in args.images_in:  # before the model loads and the first picture is written
        _require_file(path)
    run, model, size = _model.load(args)
    flip_pairs, skeleton = joint_conventions(model.num_joints)
    os.makedirs(args.out, exist_ok=True)
    for path in args.images_in:
        img = read_image(path)
        h, w = img.shape[:2]
        # No person box given: the person is taken to fill the image (crop = whole image).
        record = PoseRecord(center=((w - 1) / 2, (h - 1) / 2), scale=max(h, w) / 200 / 1.25, joints=np.zeros((1, 2)),
                            visible=np.zeros(1), image=path)
        ds = PoseDataset([record], input_size=size, train=False, flip_pairs=flip_pairs)
        res = predict_dataset(run, ds, batch_size=1, flip_test=args.flip_test, progress=False)
        out = os.path.join(args.out, os.path.splitext(os.path.basename(path))[0] + "_pose.png")
        write_png(out, draw_skeleton(load_image(record), res["pred"][0], skeleton=skeleton,
                                     thickness=max(2, max(h, w) // 150)))
        print(f"{path} -> {out}")
    return 0


def add_command(sub):
    p = sub.add_parser("predict", help="draw a checkpoint's predicted skeleton on images (PNG)",
                       description="Draws the checkpoint's predicted skeleton on each IMAGE and writes it as "
                                   "OUT/IMAGE_pose.png (OUT: --out, default runs/predict), printing "
                                   "'IMAGE -> OUT/IMAGE_pose.png' for each.")
    _model.add_arguments(p)
    p.add_argument("images_in", nargs="+", metavar="IMAGE",
                   help="image files, each taken to show one person filling the picture")
    p.add_argument("--out", default="runs/predict",
                   help="folder the pictures are written to, IMAGE_pose.png for each IMAGE (default: runs/predict, "
                        "under the current folder; each written path is printed)")
    p.set_defaults(fn=run)
