"""PoseDataset: records (from any source) to network inputs and heatmap targets; SkipBadImages:
records whose bad image files are skipped instead of stopping a run."""
import dataclasses
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from fasthg.data.images import BadImageError, read_rgb
from fasthg.data.records import MPII_FLIP_PAIRS, PoseRecord
from fasthg.data.transforms import (affine_matrix, color_jitter, gaussian_heatmaps, swap_pairs, to_heatmap_coords,
                                    transform_points, warp)


def load_image(record: PoseRecord) -> np.ndarray:
    """The record's image as RGB uint8: generated pixels, or the file (fasthg.data.images.read_rgb).
    A bad file is a BadImageError (ValueError) naming the record and the file, one line also
    where a DataLoader worker raised it."""
    if "pixels" in record.extra:
        return record.extra["pixels"]
    if record.image is None:
        raise ValueError(f"record {record.index}: it has neither an image file nor generated pixels")
    try:
        return read_rgb(record.image)
    except BadImageError as e:
        raise BadImageError(f"record {record.index}: {e}") from None


BAD_IMAGES = ("stop", "skip")


class SkipBadImages:
    """A sequence of records (`records[i]`, len) whose people with a bad image file are skipped
    rather than stopping a run (load_image's BadImageError). Each item comes with its image
    loaded (extra["pixels"]); a skipped one has extra["skipped_image"], the error's message,
    and PoseDataset marks its item skipped = 1.

    substitute=True (training): the next person of the list whose image reads (wrapping round)
    takes the skipped one's place, so batches stay full and what position i yields depends on
    the files alone: a resumed run sees what the uninterrupted one saw.
    substitute=False (evaluation): the person stays, with a blank image and no annotated joint,
    so no score counts it (PCKh and OKS leave such people out)."""

    def __init__(self, records: Sequence[PoseRecord], substitute: bool):
        self.records, self.substitute = records, substitute

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index: int) -> PoseRecord:
        record = self.records[index]
        try:
            return _with_extra(record, pixels=load_image(record))
        except BadImageError as e:
            skipped = str(e)
        if not self.substitute:
            return dataclasses.replace(record, visible=np.zeros_like(record.visible),
                                       extra={**record.extra, "pixels": np.zeros((1, 1, 3), np.uint8),
                                              "skipped_image": skipped})
        n = len(self.records)
        for k in range(1, n):
            other = self.records[(index + k) % n]
            try:
                return _with_extra(other, pixels=load_image(other), skipped_image=skipped)
            except BadImageError:
                continue
        raise BadImageError(f"no image of the {n} people can be read, e.g. {skipped}")


def _with_extra(record: PoseRecord, **extra) -> PoseRecord:
    """A copy of the record with more extra entries (the original may be shared, e.g. cached)."""
    return dataclasses.replace(record, extra={**record.extra, **extra})


class PoseDataset(torch.utils.data.Dataset):
    """Crops each person to `input_size` around centre/scale (the box 200 * scale *
    crop_factor), and for training augments it: rotation up to `rotation` degrees, scale
    by 1 +- `scale_jitter`, horizontal flip (left/right joints swapped), colour jitter.
    Targets: one Gaussian per joint (sigma 1 at 64x64, scaled with the output size, unless
    `sigma` is given) on an output_size map (input/4 by default), and per-joint weights (0:
    not annotated or outside). Augmentation is a function of (seed, epoch, index): runs are reproducible and
    resumable; call set_epoch each epoch.

    Items are dicts: image (3, H, W) float32 in [-0.5, 0.5], heatmaps (J, h, w), weights (J,),
    skipped (1 where SkipBadImages put another person, or none, in place of one whose image is
    bad), and for evaluation index, record (the record's own index, its position in its file),
    matrix (the 2x3 crop matrix), joints, visible, head_size, area (COCO's person area for OKS;
    0 for other sources)."""

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
            "skipped": int("skipped_image" in record.extra),
            "index": index,
            "record": record.index,
            "matrix": torch.from_numpy(matrix.astype(np.float64)),
            "joints": torch.tensor(record.joints),  # copies: the record's arrays may be a cache's, read-only
            "visible": torch.tensor(record.visible),
            "head_size": float(record.head_size),
            "area": float(record.extra.get("area", 0.0)),
        }
