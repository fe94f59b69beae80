"""PoseDataset: records (from any source) to network inputs and heatmap targets."""
from typing import Optional, Sequence, Tuple

import cv2
import numpy as np
import torch

from fasthg.data.records import MPII_FLIP_PAIRS, PoseRecord
from fasthg.data.transforms import (affine_matrix, color_jitter, gaussian_heatmaps, swap_pairs, to_heatmap_coords,
                                    transform_points, warp)


def load_image(record: PoseRecord) -> np.ndarray:
    """The record's image as RGB uint8: generated pixels, or the file (clear error if bad)."""
    if "pixels" in record.extra:
        return record.extra["pixels"]
    if record.image is None:
        raise ValueError(f"record {record.index}: it has neither an image file nor generated pixels")
    img = cv2.imread(record.image, cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"record {record.index}: cannot read image file {record.image!r} (missing or corrupt)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


class PoseDataset(torch.utils.data.Dataset):
    """Crops each person to `input_size` around centre/scale (the box 200 * scale *
    crop_factor), and for training augments it: rotation up to `rotation` degrees, scale
    by 1 +- `scale_jitter`, horizontal flip (left/right joints swapped), colour jitter.
    Targets: one Gaussian per joint (sigma 1 at 64x64, scaled with the output size, unless
    `sigma` is given) on an output_size map (input/4 by default), and per-joint weights (0:
    not annotated or outside). Augmentation is a function of (seed, epoch, index): runs are reproducible and
    resumable; call set_epoch each epoch.

    Items are dicts: image (3, H, W) float32 in [-0.5, 0.5], heatmaps (J, h, w), weights (J,),
    and for evaluation index, matrix (the 2x3 crop matrix), joints, visible, head_size, area
    (COCO's person area for OKS; 0 for other sources)."""

    def __init__(self, source: Sequence[PoseRecord], input_size: int = 256, output_size: Optional[int] = None,
                 train: bool = True, flip_pairs: Sequence[Tuple[int, int]] = MPII_FLIP_PAIRS, rotation: float = 30.0,
                 scale_jitter: float = 0.25, flip: bool = True, color: float = 0.2, crop_factor: float = 1.25,
                 seed: int = 0, sigma: Optional[float] = None):
        self.source, self.input_size = source, input_size
        self.output_size = output_size or input_size // 4
        if input_size % self.output_size:
            raise ValueError(f"input_size {input_size} must be a multiple of output_size {self.output_size}")
        self.stride = input_size // self.output_size
        self.sigma = sigma if sigma is not None else self.output_size / 64.0
        if not self.sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        self.train, self.flip_pairs, self.rotation = train, tuple(flip_pairs), rotation
        self.scale_jitter, self.flip, self.color, self.crop_factor = scale_jitter, flip, color, crop_factor
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return len(self.source)

    def augmentation(self, index: int):
        """(scale factor, rotation, flip, rng for the colours) of this item in this epoch;
        the identity when not training."""
        if not self.train:
            return 1.0, 0.0, False, None
        rng = np.random.default_rng([self.seed, self.epoch, index])
        scale = rng.uniform(1 - self.scale_jitter, 1 + self.scale_jitter)
        rotation = rng.uniform(-self.rotation, self.rotation) if rng.random() < 0.6 else 0.0
        flip = self.flip and rng.random() < 0.5
        return scale, rotation, flip, rng

    def __getitem__(self, index: int):
        record = self.source[index]
        image = load_image(record)
        scale, rotation, flip, rng = self.augmentation(index)
        matrix = affine_matrix(record.center, record.scale * self.crop_factor * scale, rotation, self.input_size, flip)
        crop = warp(image, matrix, self.input_size)
        if self.train and self.color > 0:
            crop = color_jitter(crop, rng, self.color)
        joints = to_heatmap_coords(transform_points(record.joints, matrix), self.stride)
        visible = record.visible
        if flip:
            joints, visible = swap_pairs(joints, self.flip_pairs), swap_pairs(visible, self.flip_pairs)
        heatmaps, weights = gaussian_heatmaps(joints, visible, self.output_size, self.output_size, self.sigma)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(crop.transpose(2, 0, 1))).float().div_(255).sub_(0.5),
            "heatmaps": torch.from_numpy(heatmaps),
            "weights": torch.from_numpy(weights),
            "index": index,
            "matrix": torch.from_numpy(matrix.astype(np.float64)),
            "joints": torch.tensor(record.joints),  # copies: the record's arrays may be a cache's, read-only
            "visible": torch.tensor(record.visible),
            "head_size": float(record.head_size),
            "area": float(record.extra.get("area", 0.0)),
        }
