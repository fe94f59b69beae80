"""Crops, augmentation and heatmap targets.

Coordinates: pixel centres at integers. A heatmap of stride s over an input crop maps input
x to (x + 0.5) / s - 0.5, so that a horizontal flip of the crop is an exact flip of the
heatmap (which the flip test relies on).
"""
from typing import Sequence, Tuple

import cv2
import numpy as np


def affine_matrix(center, scale: float, rotation: float, size: int, flip: bool = False) -> np.ndarray:
    """2x3 matrix taking source pixels to a size x size crop: the square of side 200*scale
    around `center`, rotated by `rotation` degrees (counter-clockwise on screen), mirrored
    left-right when `flip`."""
    cx, cy = float(center[0]), float(center[1])
    zoom = size / (200.0 * scale)
    a = np.deg2rad(rotation)
    cos, sin = np.cos(a) * zoom, np.sin(a) * zoom
    half = (size - 1) / 2.0
    # x' = R*zoom*(x - c) + half, with y pointing down (so a positive angle turns the picture CCW).
    m = np.array([[cos, sin, half - cos * cx - sin * cy],
                  [-sin, cos, half + sin * cx - cos * cy]], dtype=np.float64)
    if flip:
        m = np.array([[-1.0, 0.0, size - 1.0], [0.0, 1.0, 0.0]]) @ np.vstack([m, [0.0, 0.0, 1.0]])
    return m


def invert(matrix: np.ndarray) -> np.ndarray:
    return cv2.invertAffineTransform(np.asarray(matrix, dtype=np.float64))


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply a 2x3 affine matrix to (..., 2) points."""
    points = np.asarray(points, dtype=np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


def warp(image: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """The size x size crop of `image` under `matrix` (bilinear, black outside)."""
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=0)


def swap_pairs(values: np.ndarray, pairs: Sequence[Tuple[int, int]]) -> np.ndarray:
    """Exchange left and right joints (axis 0 of `values`) after a horizontal flip."""
    out = np.array(values, copy=True)
    for a, b in pairs:
        out[[a, b]] = out[[b, a]]
    return out


def color_jitter(image: np.ndarray, rng: np.random.Generator, strength: float = 0.2) -> np.ndarray:
    """Scale each colour channel by a factor in [1 - strength, 1 + strength]."""
    gains = rng.uniform(1 - strength, 1 + strength, size=(1, 1, image.shape[2]))
    return np.clip(image.astype(np.float32) * gains, 0, 255).astype(np.uint8)


def to_heatmap_coords(points: np.ndarray, stride: float) -> np.ndarray:
    return (np.asarray(points, dtype=np.float64) + 0.5) / stride - 0.5


def from_heatmap_coords(points: np.ndarray, stride: float) -> np.ndarray:
    return (np.asarray(points, dtype=np.float64) + 0.5) * stride - 0.5


def gaussian_heatmaps(joints: np.ndarray, visible: np.ndarray, height: int, width: int,
                      sigma: float) -> Tuple[np.ndarray, np.ndarray]:
    """One Gaussian (peak 1, std `sigma` pixels) per joint at its (sub-pixel) position in
    heatmap coordinates, and per-joint weights: 0 for joints not annotated or outside the map
    (their map is all zeros), else 1."""
    joints = np.asarray(joints, dtype=np.float64)
    inside = (joints[:, 0] >= 0) & (joints[:, 0] <= width - 1) & (joints[:, 1] >= 0) & (joints[:, 1] <= height - 1)
    weights = (np.asarray(visible) > 0) & inside
    ys = np.arange(height, dtype=np.float64)[None, :, None]
    xs = np.arange(width, dtype=np.float64)[None, None, :]
    d2 = (xs - joints[:, 0, None, None]) ** 2 + (ys - joints[:, 1, None, None]) ** 2
    maps = np.exp(-d2 / (2 * sigma * sigma)) * weights[:, None, None]
    return maps.astype(np.float32), weights.astype(np.float32)
