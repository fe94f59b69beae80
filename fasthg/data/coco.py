"""COCO person keypoints annotations (person_keypoints_{train,val}2017.json) to PoseRecords.

One record per kept person annotation, in file order. COCO has no person centre or height,
so they come from the box: centre = box centre, scale = max(w, h) / 200 * padding (padding
1.0 by default: PoseDataset already pads the crop by its crop_factor, 1.25). COCO has no head boxes: head_size is 0.
Images are not opened here; `check_images` and `require_images` (re-exported from
fasthg.data.mpii) list the records whose image file is missing or raise if there are any.
"""
import os
from typing import Any, Dict, List, Optional, Set, Tuple, Union

import numpy as np

from fasthg.data.mpii import _load_json, _shown, check_images, numbers, require_images
from fasthg.data.records import COCO_JOINTS, PoseRecord

__all__ = ["load_coco_keypoints", "check_images", "require_images"]

NUM_KEYPOINTS = len(COCO_JOINTS)
ANNOTATION_KEYS = ("id", "image_id", "bbox", "keypoints")


def _error(path: str, index: int, ann: Any, what: str) -> ValueError:
    ann_id = ann.get("id") if isinstance(ann, dict) else None
    return ValueError(f"{path}: annotation {index} (id {ann_id}): {what}")


def _array(path: str, index: int, ann: Dict[str, Any], key: str, shape: Tuple[int, ...]) -> np.ndarray:
    """ann[key] as a finite float64 array of exactly `shape`."""
    a = numbers(ann[key])
    if a is None:
        raise _error(path, index, ann, f"{key} is not an array of numbers, got {_shown(ann[key])}")
    if a.shape != shape:
        raise _error(path, index, ann, f"{key} must have {shape[0]} values, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise _error(path, index, ann, f"{key} has non-finite values")
    return a


def is_id(value: Any) -> bool:
    """Whether a value can be a COCO id: an integer (COCO's) or a string, not a bool."""
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _unique_id(path: str, what: str, index: int, value: Any, seen: Dict[Any, int]) -> None:
    """Records `value`, the id of entry `index` of `what`, in `seen` (id -> position); ValueError
    naming the id and both positions if an earlier entry has it."""
    if not is_id(value):
        raise ValueError(f"{path}: {what} {index}: id must be an integer, got {_shown(value)}")
    if value in seen:
        raise ValueError(f"{path}: {what} {seen[value]} and {what} {index} have the same id {value!r} "
                         f"(expected each {what} once)")
    seen[value] = index


def _image_names(path: str, images: Any) -> Dict[Any, str]:
    """image id -> file name."""
    if not isinstance(images, list):
        raise ValueError(f"{path}: 'images' must be a list, got {type(images).__name__}")
    names, seen = {}, {}
    for index, image in enumerate(images):
        if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
            raise ValueError(f"{path}: image {index}: needs keys 'id' and 'file_name'")
        _unique_id(path, "image", index, image["id"], seen)
        if not isinstance(image["file_name"], str) or not image["file_name"]:
            raise ValueError(f"{path}: image {index} (id {image['id']}): file_name must be a non-empty file name, "
                             f"got {_shown(image['file_name'])}")
        names[image["id"]] = image["file_name"]
    return names


def _person_categories(categories: Any) -> Optional[Set[Any]]:
    """Ids of the categories that have keypoints (COCO: person, id 1); None when the file
    declares none, in which case every annotation is taken as a person."""
    if not isinstance(categories, list):
        return None
    ids = {c["id"] for c in categories if isinstance(c, dict) and "keypoints" in c and is_id(c.get("id"))}
    return ids or None


def load_coco_keypoints(path: str, image_dir: str, min_keypoints: int = 1, include_crowd: bool = False,
                        return_skipped: bool = False, padding: float = 1.0
                        ) -> Union[List[PoseRecord], Tuple[List[PoseRecord], Dict[str, int]]]:
    """The people of a COCO keypoints file (record.index = position in `annotations`).

    Skipped: crowd annotations (iscrowd true) unless include_crowd; annotations with fewer
    than min_keypoints labelled keypoints (v > 0); annotations of a category without
    keypoints. With return_skipped, returns (records, {"crowd": n, "too_few_keypoints": m,
    "not_person": k}).
    Record: center = bbox centre (x + w/2, y + h/2); scale = max(w, h) / 200 * padding;
    joints = the 17 (x, y); visible = 1 where v > 0 (labelled, also when occluded);
    head_size = 0; image = image_dir/file_name; extra: annotation_id, image_id, bbox,
    vis_flag (raw v), num_keypoints (labelled count), iscrowd, area (the segment area OKS
    scales by; the box's w * h where the annotation has no positive area).
    Raises ValueError naming the file and the annotation (position and id) for missing keys,
    an image_id not in `images`, keypoints that are not 17 x 3 finite numbers (numbers, not
    strings), an iscrowd other than 0/1, an area that is not a number, and (for kept
    annotations only: COCO has degenerate boxes on annotations nobody trains on) a bbox with
    w or h <= 0; naming the id and both positions for two images or two annotations with the
    same id; naming the image for a file_name that is not a non-empty string. A file with no
    person to keep gives no records (a training run refuses it, naming the file).
    """
    if not padding > 0:
        raise ValueError(f"padding must be positive, got {padding}")
    data = _load_json(path, "COCO person keypoints JSON, e.g. person_keypoints_val2017.json")
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise ValueError(f"{path}: expected a COCO object with 'images' and 'annotations'")
    names = _image_names(path, data["images"])
    persons = _person_categories(data.get("categories"))
    if not isinstance(data["annotations"], list):
        raise ValueError(f"{path}: 'annotations' must be a list, got {type(data['annotations']).__name__}")
    records, skipped = [], {"crowd": 0, "too_few_keypoints": 0, "not_person": 0}
    seen: Dict[Any, int] = {}
    for index, ann in enumerate(data["annotations"]):
        reason = _skip_reason(path, index, ann, names, persons, min_keypoints, include_crowd)
        _unique_id(path, "annotation", index, ann["id"], seen)
        if reason:
            skipped[reason] += 1
        else:
            records.append(_record(path, index, ann, os.path.join(image_dir, names[ann["image_id"]]), padding))
    return (records, skipped) if return_skipped else records


def _skip_reason(path: str, index: int, ann: Any, names: Dict[Any, str], persons: Optional[Set[Any]],
                 min_keypoints: int, include_crowd: bool) -> Optional[str]:
    """Why this annotation is skipped (a key of the skip counts), or None to keep it; raises
    for faults that make the file itself suspect, whether or not the annotation is kept."""
    if not isinstance(ann, dict):
        raise _error(path, index, ann, f"expected an object, got {type(ann).__name__}")
    missing = [k for k in ("id", "image_id") if k not in ann]
    if missing:
        raise _error(path, index, ann, f"missing keys {missing}")
    if not is_id(ann["image_id"]) or ann["image_id"] not in names:
        raise _error(path, index, ann, f"image_id {_shown(ann['image_id'])} is not in images")
    if "category_id" in ann and not is_id(ann["category_id"]):
        raise _error(path, index, ann, f"category_id must be an integer, got {_shown(ann['category_id'])}")
    if persons is not None and "category_id" in ann and ann["category_id"] not in persons:
        return "not_person"  # other categories carry no keypoints to check
    missing = [k for k in ANNOTATION_KEYS if k not in ann]
    if missing:
        raise _error(path, index, ann, f"missing keys {missing}")
    keypoints = _array(path, index, ann, "keypoints", (NUM_KEYPOINTS * 3,))
    if ann.get("iscrowd", 0) not in (0, 1):  # also False and True
        raise _error(path, index, ann, f"iscrowd must be 0 or 1, got {_shown(ann['iscrowd'])}")
    if "area" in ann and not (is_number(ann["area"]) and np.isfinite(ann["area"])):
        raise _error(path, index, ann, f"area must be a finite number, got {_shown(ann['area'])}")
    if ann.get("iscrowd", 0) and not include_crowd:
        return "crowd"
    if int((keypoints[2::3] > 0).sum()) < min_keypoints:
        return "too_few_keypoints"
    return None


def _record(path: str, index: int, ann: Dict[str, Any], image: str, padding: float) -> PoseRecord:
    keypoints = _array(path, index, ann, "keypoints", (NUM_KEYPOINTS * 3,)).reshape(NUM_KEYPOINTS, 3)
    bbox = _array(path, index, ann, "bbox", (4,))
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        raise _error(path, index, ann, f"bbox width and height must be positive, got w={w}, h={h}")
    flags = keypoints[:, 2]
    area = float(ann["area"]) if ann.get("area", 0) > 0 else float(w * h)
    extra = {"annotation_id": ann["id"], "image_id": ann["image_id"], "bbox": bbox, "vis_flag": flags.copy(),
             "num_keypoints": int((flags > 0).sum()), "iscrowd": bool(ann.get("iscrowd", 0)), "area": area}
    return PoseRecord(center=(x + w / 2, y + h / 2), scale=max(w, h) / 200 * padding, joints=keypoints[:, :2],
                      visible=(flags > 0).astype(np.float64), head_size=0.0, image=image, index=index, extra=extra)
