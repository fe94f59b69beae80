"""The record every pose source (synthetic, MPII, COCO) yields, and the joint conventions.

A record is one annotated person in one image; every later stage (augmentation, targets,
evaluation) treats records from every source alike.
"""
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

# The 16 MPII joints, in MPII's order.
MPII_JOINTS = (
    "r_ankle", "r_knee", "r_hip", "l_hip", "l_knee", "l_ankle", "pelvis", "thorax",
    "upper_neck", "head_top", "r_wrist", "r_elbow", "r_shoulder", "l_shoulder", "l_elbow", "l_wrist",
)
# Pairs that swap under a horizontal flip.
MPII_FLIP_PAIRS = ((0, 5), (1, 4), (2, 3), (10, 15), (11, 14), (12, 13))
# Bones drawn for a skeleton.
MPII_SKELETON = ((0, 1), (1, 2), (2, 6), (6, 3), (3, 4), (4, 5), (6, 7), (7, 8), (8, 9),
                 (7, 12), (12, 11), (11, 10), (7, 13), (13, 14), (14, 15))
# The usual PCKh table: group name -> joint indices.
MPII_GROUPS = (("Head", (8, 9)), ("Shoulder", (12, 13)), ("Elbow", (11, 14)), ("Wrist", (10, 15)),
               ("Hip", (2, 3)), ("Knee", (1, 4)), ("Ankle", (0, 5)))

# The 17 COCO keypoints, in COCO's order.
COCO_JOINTS = (
    "nose", "l_eye", "r_eye", "l_ear", "r_ear", "l_shoulder", "r_shoulder", "l_elbow", "r_elbow",
    "l_wrist", "r_wrist", "l_hip", "r_hip", "l_knee", "r_knee", "l_ankle", "r_ankle",
)
COCO_FLIP_PAIRS = ((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16))
# Per-keypoint standard deviations of human annotators, relative to the person's scale: the
# falloff of COCO's object keypoint similarity (OKS), as the COCO keypoint evaluation uses them.
COCO_SIGMAS = (0.026, 0.025, 0.025, 0.035, 0.035, 0.079, 0.079, 0.072, 0.072, 0.062, 0.062, 0.107, 0.107,
               0.087, 0.087, 0.089, 0.089)
COCO_SKELETON = ((15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7),
                 (6, 8), (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4))


def joint_conventions(num_joints: int):
    """(flip pairs, skeleton) of a model's joints: MPII's 16 or COCO's 17."""
    known = {len(MPII_JOINTS): (MPII_FLIP_PAIRS, MPII_SKELETON), len(COCO_JOINTS): (COCO_FLIP_PAIRS, COCO_SKELETON)}
    if num_joints not in known:
        raise ValueError(f"no joint convention for {num_joints} joints (MPII has 16, COCO 17)")
    return known[num_joints]


@dataclass
class PoseRecord:
    """One person. Coordinates are pixels of the source image, x right, y down.

    center: (2,) person centre; scale: person height / 200 px (MPII's convention);
    joints: (J, 2); visible: (J,) 1 where the joint is annotated (and so scored), else 0;
    head_size: the PCKh normaliser (MPII: 0.6 x the head box diagonal), 0 if unknown;
    image: path of the image file (None for generated images); index: position in its source.
    """

    center: np.ndarray
    scale: float
    joints: np.ndarray
    visible: np.ndarray
    head_size: float = 0.0
    image: Optional[str] = None
    index: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.center = np.asarray(self.center, dtype=np.float64).reshape(2)
        self.joints = np.asarray(self.joints, dtype=np.float64)
        self.visible = np.asarray(self.visible, dtype=np.float64).reshape(-1)
        if self.joints.ndim != 2 or self.joints.shape[1] != 2:
            raise ValueError(f"record {self.index}: joints must have shape (J, 2), got {self.joints.shape}")
        if self.visible.shape[0] != self.joints.shape[0]:
            raise ValueError(f"record {self.index}: visible has {self.visible.shape[0]} entries for "
                             f"{self.joints.shape[0]} joints")
        if not np.isfinite(self.joints).all() or not np.isfinite(self.center).all():
            raise ValueError(f"record {self.index}: joints and center must be finite")
        if not (np.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"record {self.index}: scale must be positive, got {self.scale}")
