"""Pose data: records from every source, augmentation, heatmap targets."""
from fasthg.data.records import (COCO_FLIP_PAIRS, COCO_JOINTS, COCO_SKELETON, MPII_FLIP_PAIRS, MPII_GROUPS,
                                 MPII_JOINTS, MPII_SKELETON, PoseRecord)

__all__ = ["PoseRecord", "MPII_JOINTS", "MPII_FLIP_PAIRS", "MPII_SKELETON", "MPII_GROUPS",
           "COCO_JOINTS", "COCO_FLIP_PAIRS", "COCO_SKELETON"]
