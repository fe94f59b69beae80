"""Pose data: records from every source (synthetic people, MPII and COCO files), augmentation and
heatmap targets (PoseDataset), and the order a training run sees them in (EpochSampler)."""
from fasthg.data.coco import load_coco_keypoints
from fasthg.data.dataset import PoseDataset, SkipBadImages, load_image
from fasthg.data.images import BadImageError, read_rgb
from fasthg.data.mpii import load_mpii_h5, load_mpii_json
from fasthg.data.records import (COCO_FLIP_PAIRS, COCO_JOINTS, COCO_SKELETON, MPII_FLIP_PAIRS, MPII_GROUPS,
                                 MPII_JOINTS, MPII_SKELETON, PoseRecord, joint_conventions)
from fasthg.data.sampler import EpochSampler
from fasthg.data.sources import sources
from fasthg.data.synthetic import SyntheticPoses

__all__ = ["PoseRecord", "PoseDataset", "SyntheticPoses", "EpochSampler", "load_image", "read_rgb", "BadImageError",
           "SkipBadImages", "load_mpii_json",
           "load_mpii_h5", "load_coco_keypoints", "sources", "joint_conventions",
           "MPII_JOINTS", "MPII_FLIP_PAIRS", "MPII_SKELETON", "MPII_GROUPS",
           "COCO_JOINTS", "COCO_FLIP_PAIRS", "COCO_SKELETON"]
