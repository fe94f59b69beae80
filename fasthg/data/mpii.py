"""MPII Human Pose annotations to PoseRecords.

Two file families are read:

* JSON lists of people (`load_mpii_json`): the `mpii_annotations.json` of public hourglass
  and CPM code (bearpaw/pytorch-pose: `img_paths`, `objpos`, `scale_provided`, `joint_self`,
  `isValidation`), or HRNet's `mpii/annot/{train,valid}.json` (`image`, `center`, `scale`,
  `joints`, `joints_vis`).
* The HDF5 files of the original Torch hourglass code, `annot/{train,valid}.h5`
  (`load_mpii_h5`), the only one of these formats that carries the PCKh head size.

MPII's coordinates are 1-based (MATLAB): centres and joints are shifted by -1 to fasthg's
0-based pixel centres, as HRNet's loader does. Scales are kept as stored (PoseDataset pads
the crop by its crop_factor). Images are not opened here; `check_images` lists the records
whose image file is missing, and `require_images` raises, naming the folder, if there are any.

A joint is annotated (visible = 1, scored by PCKh) unless both of its coordinates are <= 0:
MPII files mark a missing joint with (0, 0) or (-1, -1). The per-joint flag of the file is
not used for this, because MPII's flag 0 also means "annotated but occluded", whose
coordinates are valid; it is kept raw in extra["vis_flag"].
"""
import json
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import h5py
import numpy as np

from fasthg.data.records import MPII_JOINTS, PoseRecord

NUM_JOINTS = len(MPII_JOINTS)
SPLITS = (None, "train", "valid")

CPM_KEYS = ("img_paths", "objpos", "scale_provided", "joint_self", "isValidation")
HRNET_KEYS = ("image", "center", "scale", "joints", "joints_vis")
H5_KEYS = ("imgname", "center", "scale", "part", "visible", "normalize")
# Optional HDF5 datasets that locate a person in the official annolist, and their extra key.
H5_IDS = {"index": "annolist_index", "person": "person_index"}


def _error(path: str, index: int, what: str) -> ValueError:
    return ValueError(f"{path}: record {index}: {what}")


def require_file(path: str, expected: str) -> None:
    """FileNotFoundError (IsADirectoryError for a folder) naming the file and what was expected."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path}: a folder, not a file (expected {expected})")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file (expected {expected})")


def _load_json(path: str, expected: str = "a JSON annotation file") -> Any:
    """The parsed file; a missing file or a syntax error names the file (json's own message does
    not) and what was expected."""
    require_file(path, expected)
    with open(path, "r", encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON: {e} (expected {expected})") from None
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not a text file (expected {expected})") from None


def _require(path: str, index: int, entry: Any, keys: Sequence[str]) -> None:
    if not isinstance(entry, dict):
        raise _error(path, index, f"expected an object with keys {list(keys)}, got {type(entry).__name__}")
    missing = [k for k in keys if k not in entry]
    if missing:
        raise _error(path, index, f"missing keys {missing}")


def numbers(value: Any) -> Optional[np.ndarray]:
    """A JSON value as a float64 array if it is a number or a (nested) list of numbers; None
    otherwise. Strings are not numbers here, "2.5" neither: a file that quotes its numbers is
    not the format it claims to be."""
    try:
        a = np.asarray(value)
    except ValueError:  # ragged lists
        return None
    return a.astype(np.float64) if a.dtype.kind in "biuf" else None


def _array(path: str, index: int, name: str, value: Any, shape: Tuple[int, ...]) -> np.ndarray:
    """`value` as a finite float64 array of exactly `shape`."""
    a = numbers(value)
    if a is None:
        raise _error(path, index, f"{name} is not an array of numbers, got {_shown(value)}")
    if a.shape != shape:
        raise _error(path, index, f"{name} must have shape {shape}, got {a.shape}")
    if not np.isfinite(a).all():
        raise _error(path, index, f"{name} has non-finite values")
    return a


def _shown(value: Any, limit: int = 40) -> str:
    """A value as a message shows it, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _scalar(path: str, index: int, name: str, value: Any) -> float:
    return float(_array(path, index, name, value, ()))


def _name(path: str, index: int, key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _error(path, index, f"{key} must be a non-empty file name, got {value!r}")
    return value


def annotated(joints: np.ndarray) -> np.ndarray:
    """(J,) float 1 where a joint is annotated: not both coordinates <= 0 (MPII's (0, 0) and
    (-1, -1) markers of a missing joint)."""
    return (~np.all(np.asarray(joints) <= 0, axis=-1)).astype(np.float64)


def _record(path: str, index: int, center: np.ndarray, scale: float, joints: np.ndarray, head_size: float,
            image: str, extra: Dict[str, Any]) -> PoseRecord:
    # PoseRecord checks the scale too, but its message cannot name the file.
    if not scale > 0:
        raise _error(path, index, f"scale must be positive, got {scale}")
    # Annotation is judged on the file's values, before the shift to 0-based pixels.
    return PoseRecord(center=np.asarray(center) - 1, scale=scale, joints=np.asarray(joints) - 1,
                      visible=annotated(joints), head_size=head_size, image=image, index=index, extra=extra)


def _from_cpm(path: str, index: int, entry: Any, image_dir: str) -> Tuple[PoseRecord, bool]:
    """One person of the bearpaw/CPM list, and whether it is in the validation split."""
    _require(path, index, entry, CPM_KEYS)
    joints = _array(path, index, "joint_self", entry["joint_self"], (NUM_JOINTS, 3))
    center = _array(path, index, "objpos", entry["objpos"], (2,))
    scale = _scalar(path, index, "scale_provided", entry["scale_provided"])
    flag = _scalar(path, index, "isValidation", entry["isValidation"])
    if flag not in (0.0, 1.0):
        raise _error(path, index, f"isValidation must be 0 or 1, got {entry['isValidation']!r}")
    name = _name(path, index, "img_paths", entry["img_paths"])
    extra = {"vis_flag": joints[:, 2].copy(), "is_validation": flag == 1.0}
    # The indices into the official annolist, for matching the MATLAB evaluation.
    for key in ("annolist_index", "people_index"):
        if key in entry:
            extra[key] = entry[key]
    return _record(path, index, center, scale, joints[:, :2], 0.0, os.path.join(image_dir, name), extra), flag == 1.0


def _from_hrnet(path: str, index: int, entry: Any, image_dir: str) -> Tuple[PoseRecord, bool]:
    """One person of an HRNet-style list; the split is the file's, so it is reported as train."""
    _require(path, index, entry, HRNET_KEYS)
    joints = _array(path, index, "joints", entry["joints"], (NUM_JOINTS, 2))
    vis = _array(path, index, "joints_vis", entry["joints_vis"], (NUM_JOINTS,))
    center = _array(path, index, "center", entry["center"], (2,))
    scale = _scalar(path, index, "scale", entry["scale"])
    name = _name(path, index, "image", entry["image"])
    return _record(path, index, center, scale, joints, 0.0, os.path.join(image_dir, name), {"vis_flag": vis}), False


def _parser(path: str, entries: List[Any], split: Optional[str]) -> Callable[..., Tuple[PoseRecord, bool]]:
    """The per-person parser for the file's format, told apart by its first entry."""
    first = entries[0]
    if isinstance(first, dict) and "joint_self" in first:
        return _from_cpm
    if isinstance(first, dict) and "joints" in first:
        if split is not None:
            raise ValueError(f"{path}: HRNet-style MPII JSON has no per-record split flag; pass split=None "
                             f"and load the split's own file (train.json or valid.json)")
        return _from_hrnet
    raise _error(path, 0, f"neither MPII JSON format: expected keys {list(CPM_KEYS)} or {list(HRNET_KEYS)}")


def load_mpii_json(path: str, image_dir: str, split: Optional[str] = None) -> List[PoseRecord]:
    """The people of an MPII JSON annotation list, in file order (record.index = position in
    the file, also when a split is selected).

    split: None (every person), "train" or "valid", selected by `isValidation`; only the
    bearpaw/CPM format has that flag, so an HRNet-style file takes split=None (its train.json
    and valid.json are already split). head_size is 0.0: neither format has the head box, so
    PCKh needs `load_mpii_h5` (its `normalize`) or the official head boxes.
    extra: vis_flag (the raw per-joint flag), and for the CPM format is_validation and, where
    present, annolist_index and people_index. A {"root": [...]} wrapper is accepted.
    Raises ValueError naming the file and record for missing keys, shapes other than 16
    joints, non-finite values, a non-positive scale, or a bad file name.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    entries = _load_json(path, "MPII annotations as a JSON list, e.g. mpii_annotations.json or annot/valid.json")
    if isinstance(entries, dict) and isinstance(entries.get("root"), list):
        entries = entries["root"]  # the original CPM genJSON output
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON list of people, got {type(entries).__name__}")
    if not entries:
        return []
    parse = _parser(path, entries, split)
    records = []
    for index, entry in enumerate(entries):
        record, is_valid = parse(path, index, entry, image_dir)
        if split is None or is_valid == (split == "valid"):
            records.append(record)
    return records


def _decode_names(path: str, raw: np.ndarray) -> List[str]:
    """Image names from HDF5: byte/str strings, or rows of character codes (Torch's
    hdf5 wrote char tensors, zero-padded)."""
    names = []
    if raw.dtype.kind in "SUO" and raw.ndim == 1:
        for index, value in enumerate(raw):
            try:
                names.append(value.decode("utf-8") if isinstance(value, bytes) else str(value))
            except UnicodeDecodeError:
                raise _error(path, index, f"imgname is not UTF-8: {value!r}") from None
    elif raw.dtype.kind in "iuf" and raw.ndim == 2:
        for index, row in enumerate(raw):
            zeros = np.flatnonzero(row == 0)
            codes = row[: zeros[0]] if zeros.size else row  # the name ends at the first 0
            if not (np.isfinite(codes).all() and (codes == np.round(codes)).all() and
                    ((codes > 0) & (codes < 256)).all()):
                raise _error(path, index, "imgname holds values that are not character codes")
            names.append("".join(chr(int(c)) for c in codes))
    else:
        raise ValueError(f"{path}: imgname must be strings (N,) or character codes (N, L), "
                         f"got dtype {raw.dtype} shape {raw.shape}")
    for index, name in enumerate(names):
        if not name:
            raise _error(path, index, "imgname is empty")
    return names


def _first_bad(path: str, bad: np.ndarray, what: str) -> None:
    """Raise for the first record flagged in `bad` (one flag per record)."""
    if bad.any():
        raise _error(path, int(np.argmax(bad)), what)


def _h5_dataset(path: str, f: h5py.File, key: str) -> np.ndarray:
    if not isinstance(f[key], h5py.Dataset):
        raise ValueError(f"{path}: {key} must be a dataset, got a {type(f[key]).__name__.lower()}")
    return np.asarray(f[key][()])


def _h5_ids(path: str, ids: Dict[str, np.ndarray], n: int) -> Dict[str, np.ndarray]:
    """The `index` / `person` datasets as integers, checked: one per record, whole numbers,
    and no (index, person) pair twice (the same person would be trained or scored twice)."""
    for key, value in ids.items():
        if value.shape != (n,):
            raise ValueError(f"{path}: dataset {key} must have shape {(n,)} (one per record), got {value.shape}")
        if value.dtype.kind not in "iuf":
            raise ValueError(f"{path}: dataset {key} must be numeric, got dtype {value.dtype}")
        _first_bad(path, ~(np.isfinite(value) & (value == np.round(value))), f"{key} must be a whole number")
        ids[key] = value.astype(np.int64)
    if len(ids) == len(H5_IDS) and n:
        pairs = np.stack([ids["index"], ids["person"]], 1)
        _, first, inverse = np.unique(pairs, axis=0, return_index=True, return_inverse=True)
        repeated = np.flatnonzero(first[inverse.reshape(-1)] != np.arange(n))
        if repeated.size:
            i = int(repeated[0])
            j = int(first[inverse.reshape(-1)[i]])
            raise ValueError(f"{path}: records {j} and {i} are the same person: index {pairs[i, 0]}, person "
                             f"{pairs[i, 1]} ({repeated.size} repeated records in all)")
    return ids


def load_mpii_h5(path: str, image_dir: str) -> List[PoseRecord]:
    """The people of an original-hourglass MPII HDF5 file (annot/train.h5, annot/valid.h5).

    Datasets read: imgname, center (N, 2), scale (N,), part (N, 16, 2), visible (N, 16),
    normalize (N,); head_size = normalize (the PCKh head size). Joints with both part
    coordinates <= 0 are not annotated. extra: vis_flag (the raw `visible` row), and
    annolist_index / person_index from the `index` / `person` datasets where present.
    Raises ValueError naming the file (and the record, for per-record faults) for missing
    datasets (or groups in their place), wrong shapes or joint count, non-finite values, a
    non-positive scale, a negative normalize, `index` / `person` values that are not integers,
    and two records with the same (index, person): one person twice.
    """
    expected = "MPII annotations in HDF5, e.g. annot/valid.h5"
    require_file(path, expected)
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"{path}: not a readable HDF5 file ({e}; expected {expected})") from None
    with f:
        missing = [k for k in H5_KEYS if k not in f]
        if missing:
            raise ValueError(f"{path}: missing datasets {missing} (has {sorted(f.keys())})")
        data = {k: _h5_dataset(path, f, k) for k in H5_KEYS}
        ids = {k: _h5_dataset(path, f, k) for k in H5_IDS if k in f}
    n = data["imgname"].shape[0] if data["imgname"].ndim else 0
    shapes = {"center": (n, 2), "scale": (n,), "part": (n, NUM_JOINTS, 2), "visible": (n, NUM_JOINTS),
              "normalize": (n,)}
    for key, shape in shapes.items():
        if data[key].shape != shape:
            raise ValueError(f"{path}: dataset {key} must have shape {shape} ({n} records, {NUM_JOINTS} joints), "
                             f"got {data[key].shape}")
        if data[key].dtype.kind not in "iuf":
            raise ValueError(f"{path}: dataset {key} must be numeric, got dtype {data[key].dtype}")
        data[key] = data[key].astype(np.float64)
        rows = data[key].reshape(n, int(np.prod(shape[1:])))  # not -1: a file may hold no records
        _first_bad(path, ~np.isfinite(rows).all(axis=1), f"{key} has non-finite values")
    _first_bad(path, data["scale"] <= 0, "scale must be positive")
    _first_bad(path, data["normalize"] < 0, "normalize (head size) must not be negative")
    names = _decode_names(path, data["imgname"])
    ids = _h5_ids(path, ids, n)
    records = []
    for i in range(n):
        extra = {"vis_flag": data["visible"][i].copy()}
        extra.update({H5_IDS[k]: int(v[i]) for k, v in ids.items()})
        records.append(_record(path, i, data["center"][i], float(data["scale"][i]), data["part"][i],
                               float(data["normalize"][i]), os.path.join(image_dir, names[i]), extra))
    return records


def require_head_sizes(records: Sequence[PoseRecord], annotation: str) -> None:
    """ValueError naming the file and the first record with annotated joints but no positive
    head size, which PCKh cannot score (a zero-size head box, or a file without head boxes)."""
    for record in records:
        if record.visible.any() and not record.head_size > 0:
            count = sum(1 for r in records if r.visible.any() and not r.head_size > 0)
            raise ValueError(f"{annotation}: record {record.index}: annotated joints ({int(record.visible.sum())}) "
                             f"but head size {record.head_size:g}: PCKh cannot score this person ({count} "
                             f"{'person' if count == 1 else 'people'} like this; expected an MPII HDF5 file whose "
                             f"normalize is positive for every annotated person)")


def check_images(records: Sequence[PoseRecord]) -> List[PoseRecord]:
    """The records whose image file does not exist (each distinct path is looked up once).
    Records carrying generated pixels need no file and are never reported."""
    exists: Dict[Optional[str], bool] = {}
    missing = []
    for record in records:
        if "pixels" in record.extra:
            continue
        if record.image not in exists:
            exists[record.image] = record.image is not None and os.path.isfile(record.image)
        if not exists[record.image]:
            missing.append(record)
    return missing


def require_images(records: Sequence[PoseRecord], annotation: str, image_dir: str) -> None:
    """FileNotFoundError unless every record's image file exists: names the annotation file,
    the image folder, how many people lack their image and the first such file."""
    missing = check_images(records)
    if not missing:
        return
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f"{image_dir}: no such folder (expected the folder of {annotation}'s images)")
    raise FileNotFoundError(f"{image_dir}: {len(missing)} of the {len(records)} people of {annotation} have no image "
                            f"file there, e.g. {missing[0].image} (expected the folder of the images it names)")
