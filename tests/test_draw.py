"""Skeleton pictures: bones coloured by side, from the joints' names (MPII's and COCO's)."""
import numpy as np
import pytest

from fasthg import draw
from fasthg.data.records import COCO_JOINTS, COCO_SKELETON, MPII_JOINTS, MPII_SKELETON


def bone_pixel(names, skeleton, a, b, **kw):
    """The colour drawn halfway along bone a-b of a skeleton whose other joints are hidden."""
    joints = np.zeros((len(names), 2))
    joints[a], joints[b] = (10, 10), (50, 10)
    visible = np.zeros(len(names))
    visible[[a, b]] = 1
    image = draw.draw_skeleton(np.zeros((20, 60, 3), np.uint8), joints, visible, skeleton, thickness=3, **kw)
    return tuple(int(c) for c in image[10, 30])


def test_coco_bones_take_the_side_of_their_joints():
    i = COCO_JOINTS.index
    assert bone_pixel(COCO_JOINTS, COCO_SKELETON, i("r_hip"), i("r_knee")) == draw._RIGHT
    assert bone_pixel(COCO_JOINTS, COCO_SKELETON, i("l_shoulder"), i("l_elbow")) == draw._LEFT
    # MPII's joint numbers coloured these three wrong: 14 was MPII's l_elbow, 5 its l_ankle, 0 its r_ankle
    assert bone_pixel(COCO_JOINTS, COCO_SKELETON, i("r_knee"), i("r_ankle")) == draw._RIGHT
    assert bone_pixel(COCO_JOINTS, COCO_SKELETON, i("l_shoulder"), i("r_shoulder")) == draw._MIDDLE
    assert bone_pixel(COCO_JOINTS, COCO_SKELETON, i("nose"), i("l_eye")) == draw._LEFT
    # names given explicitly: the same as inferred from the 17 joints
    assert bone_pixel(COCO_JOINTS, COCO_SKELETON, i("r_hip"), i("r_knee"), joint_names=COCO_JOINTS) == draw._RIGHT
    # no skeleton given: COCO's bones, by the number of joints
    assert bone_pixel(COCO_JOINTS, None, i("l_shoulder"), i("l_elbow")) == draw._LEFT


def test_mpii_bones_keep_their_colours():
    right, left = {0, 1, 2, 10, 11, 12}, {3, 4, 5, 13, 14, 15}  # the joint numbers draw.py went by
    for a, b in MPII_SKELETON:
        want = draw._RIGHT if {a, b} & right else draw._LEFT if {a, b} & left else draw._MIDDLE
        assert bone_pixel(MPII_JOINTS, MPII_SKELETON, a, b) == want, (MPII_JOINTS[a], MPII_JOINTS[b])
        assert bone_pixel(MPII_JOINTS, None, a, b) == want


def test_joint_sides_by_name():
    assert [draw.joint_side(n) for n in ("r_ankle", "right_wrist", "l_eye", "Left_hip", "pelvis", "nose")] == \
        ["right", "right", "left", "left", "middle", "middle"]
    with pytest.raises(ValueError, match="3 joint names for 16 joints"):
        draw.draw_skeleton(np.zeros((8, 8, 3), np.uint8), np.zeros((16, 2)), joint_names=("a", "b", "c"))
