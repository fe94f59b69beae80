"""MPII (JSON, HDF5) and COCO loaders: small files written in the real formats, read back."""
import copy
import json
import os
import re

import cv2
import h5py
import numpy as np
import pytest

from fasthg.data import PoseRecord
from fasthg.data.coco import load_coco_keypoints
from fasthg.data.mpii import check_images, load_mpii_h5, load_mpii_json

# --- MPII: three people; person 0 has every kind of joint -------------------------------------

# Person 0's joints: joint j at (10 + j, 20 + 2j), flag 1, except
#   3: (0, 0) and 9: (-1, -1) -> not annotated;
#   12: (40, 50) flag 0 -> annotated but occluded, so scored;
#   5: (0, 55) -> only x is 0, so annotated.
P0_JOINTS = [[10.0 + j, 20.0 + 2 * j] for j in range(16)]
P0_JOINTS[3], P0_JOINTS[9], P0_JOINTS[12], P0_JOINTS[5] = [0.0, 0.0], [-1.0, -1.0], [40.0, 50.0], [0.0, 55.0]
P0_FLAGS = [1.0] * 16
P0_FLAGS[3], P0_FLAGS[9], P0_FLAGS[12] = 0.0, 0.0, 0.0
P0_VISIBLE = [1, 1, 1, 0, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1]

PEOPLE = [  # (image, centre, scale, joints, flags, is validation, head size)
    ("a.png", [100.0, 120.0], 1.5, P0_JOINTS, P0_FLAGS, 0, 30.0),
    ("b.png", [60.5, 70.25], 2.75, [[5.0 * j + 1, 7.0] for j in range(16)], [1.0] * 16, 1, 41.5),
    ("a.png", [33.0, 44.0], 0.8, [[3.0, 3.0 + j] for j in range(16)], [1.0] * 16, 0, 12.25),
]


def _write_images(directory) -> None:
    os.makedirs(directory, exist_ok=True)
    for name in ("a.png", "b.png"):
        assert cv2.imwrite(os.path.join(directory, name), np.full((8, 8, 3), 127, np.uint8))


def _cpm_entries():
    return [{"img_paths": img, "objpos": c, "scale_provided": s, "joint_self": [j + [f] for j, f in zip(js, fl)],
             "isValidation": float(v), "annolist_index": 10 + i, "people_index": 1}
            for i, (img, c, s, js, fl, v, _) in enumerate(PEOPLE)]


def _hrnet_entries():
    return [{"image": img, "center": c, "scale": s, "joints": js, "joints_vis": fl}
            for img, c, s, js, fl, _, _ in PEOPLE]


def _write_json(path, data) -> str:
    with open(path, "w") as f:
        json.dump(data, f)
    return str(path)


def _h5_arrays(names="bytes"):
    if names == "bytes":
        imgname = np.array([p[0].encode() for p in PEOPLE], dtype="S16")
    else:  # Torch hdf5: zero-padded rows of character codes
        imgname = np.zeros((len(PEOPLE), 16), np.int8)
        for i, p in enumerate(PEOPLE):
            imgname[i, :len(p[0])] = [ord(ch) for ch in p[0]]
    return {"imgname": imgname, "center": np.array([p[1] for p in PEOPLE]),
            "scale": np.array([p[2] for p in PEOPLE]), "part": np.array([p[3] for p in PEOPLE]),
            "visible": np.array([p[4] for p in PEOPLE]), "normalize": np.array([p[6] for p in PEOPLE]),
            "index": np.array([10, 11, 12]), "person": np.array([1, 1, 2])}


def _write_h5(path, arrays) -> str:
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            f[key] = value
    return str(path)


def _check_person(record: PoseRecord, i: int, image_dir, head_size: bool) -> None:
    img, center, scale, joints, flags, _, head = PEOPLE[i]
    assert record.index == i
    assert record.image == os.path.join(image_dir, img)
    # MPII is 1-based: the loaders shift to 0-based pixel centres.
    np.testing.assert_array_equal(record.center, np.asarray(center) - 1)
    assert record.scale == scale
    np.testing.assert_array_equal(record.joints, np.asarray(joints) - 1)
    np.testing.assert_array_equal(record.extra["vis_flag"], flags)
    assert record.head_size == (head if head_size else 0.0)


@pytest.fixture
def image_dir(tmp_path):
    d = tmp_path / "images"
    _write_images(d)
    return str(d)


def test_mpii_json_fields_and_split(tmp_path, image_dir):
    path = _write_json(tmp_path / "mpii_annotations.json", _cpm_entries())
    records = load_mpii_json(path, image_dir)
    assert len(records) == 3
    for i, r in enumerate(records):
        _check_person(r, i, image_dir, head_size=False)
        assert r.extra["annolist_index"] == 10 + i and r.extra["people_index"] == 1
    np.testing.assert_array_equal(records[0].visible, P0_VISIBLE)
    np.testing.assert_array_equal(records[1].visible, np.ones(16))
    assert [r.index for r in load_mpii_json(path, image_dir, split="train")] == [0, 2]
    valid = load_mpii_json(path, image_dir, split="valid")
    assert [r.index for r in valid] == [1] and valid[0].extra["is_validation"] is True
    # The original CPM output wraps the list in {"root": ...}.
    wrapped = _write_json(tmp_path / "root.json", {"root": _cpm_entries()})
    assert [r.index for r in load_mpii_json(wrapped, image_dir, split="valid")] == [1]
    assert check_images(records) == []


def test_mpii_hrnet_json(tmp_path, image_dir):
    path = _write_json(tmp_path / "train.json", _hrnet_entries())
    records = load_mpii_json(path, image_dir)
    assert len(records) == 3
    for i, r in enumerate(records):
        _check_person(r, i, image_dir, head_size=False)
    np.testing.assert_array_equal(records[0].visible, P0_VISIBLE)
    with pytest.raises(ValueError, match=r"train\.json.*no per-record split"):
        load_mpii_json(path, image_dir, split="train")


@pytest.mark.parametrize("names", ["bytes", "char codes"])
def test_mpii_h5_fields(tmp_path, image_dir, names):
    path = _write_h5(tmp_path / "valid.h5", _h5_arrays(names))
    records = load_mpii_h5(path, image_dir)
    assert len(records) == 3
    for i, r in enumerate(records):
        _check_person(r, i, image_dir, head_size=True)
    assert [r.head_size for r in records] == [30.0, 41.5, 12.25]
    np.testing.assert_array_equal(records[0].visible, P0_VISIBLE)
    assert [(r.extra["annolist_index"], r.extra["person_index"]) for r in records] == [(10, 1), (11, 1), (12, 2)]


def test_check_images_reports_missing(tmp_path, image_dir):
    entries = _cpm_entries()
    entries[1]["img_paths"] = "missing.png"
    records = load_mpii_json(_write_json(tmp_path / "m.json", entries), image_dir)
    missing = check_images(records)
    assert [r.index for r in missing] == [1] and missing[0].image == os.path.join(image_dir, "missing.png")
    generated = PoseRecord(center=(1, 1), scale=1.0, joints=np.zeros((16, 2)), visible=np.zeros(16),
                           extra={"pixels": np.zeros((4, 4, 3), np.uint8)})
    no_file = PoseRecord(center=(1, 1), scale=1.0, joints=np.zeros((16, 2)), visible=np.zeros(16), index=7)
    assert [r.index for r in check_images([generated, no_file])] == [7]


def _set(key, value):
    def edit(entry):
        entry[key] = value
    return edit


def _drop(key):
    def edit(entry):
        del entry[key]
    return edit


def _set_joint(key, joint, value):
    def edit(entry):
        entry[key][joint] = value
    return edit


CPM_BAD = [
    (_drop("objpos"), r"missing keys \['objpos'\]"),
    (_set("joint_self", [[1.0, 2.0, 1.0]] * 15), r"joint_self must have shape \(16, 3\)"),
    (_set("joint_self", [[1.0, 2.0]] * 16), r"joint_self must have shape \(16, 3\)"),
    (_set_joint("joint_self", 4, [float("nan"), 2.0, 1.0]), r"joint_self has non-finite"),
    (_set("objpos", [1.0, float("inf")]), r"objpos has non-finite"),
    (_set("objpos", [1.0, 2.0, 3.0]), r"objpos must have shape \(2,\)"),
    (_set("scale_provided", 0.0), r"scale must be positive"),
    (_set("scale_provided", -1.5), r"scale must be positive"),
    (_set("scale_provided", "big"), r"scale_provided is not an array of numbers"),
    (_set("isValidation", 2), r"isValidation must be 0 or 1"),
    (_set("img_paths", ""), r"img_paths must be a non-empty file name"),
]


@pytest.mark.parametrize("edit,what", CPM_BAD)
def test_mpii_json_bad_record(tmp_path, image_dir, edit, what):
    entries = _cpm_entries()
    edit(entries[1])
    path = _write_json(tmp_path / "bad_cpm.json", entries)
    with pytest.raises(ValueError, match=r"bad_cpm\.json: record 1: " + what):
        load_mpii_json(path, image_dir)


HRNET_BAD = [
    (_drop("center"), r"missing keys \['center'\]"),
    (_set("joints_vis", [1.0] * 17), r"joints_vis must have shape \(16,\)"),
    (_set("joints", [[1.0, 2.0]] * 14), r"joints must have shape \(16, 2\)"),
    (_set("scale", float("nan")), r"scale has non-finite"),
]


@pytest.mark.parametrize("edit,what", HRNET_BAD)
def test_mpii_hrnet_json_bad_record(tmp_path, image_dir, edit, what):
    entries = _hrnet_entries()
    edit(entries[2])
    path = _write_json(tmp_path / "bad_hrnet.json", entries)
    with pytest.raises(ValueError, match=r"bad_hrnet\.json: record 2: " + what):
        load_mpii_json(path, image_dir)


def test_mpii_json_bad_file(tmp_path, image_dir):
    broken = tmp_path / "broken.json"
    broken.write_text('[{"img_paths": ')
    with pytest.raises(ValueError, match=r"broken\.json: not valid JSON"):
        load_mpii_json(str(broken), image_dir)
    unknown = _write_json(tmp_path / "unknown.json", [{"file": "a.png"}])
    with pytest.raises(ValueError, match=r"unknown\.json: record 0: neither MPII JSON format"):
        load_mpii_json(unknown, image_dir)
    with pytest.raises(ValueError, match=r"split must be one of"):
        load_mpii_json(_write_json(tmp_path / "ok.json", _cpm_entries()), image_dir, split="test")


def _h5_edit(key, row, value):
    def edit(arrays):
        arrays[key] = arrays[key].astype(np.float64)
        arrays[key][row] = value
    return edit


def _h5_replace(key, value):
    def edit(arrays):
        if value is None:
            del arrays[key]
        else:
            arrays[key] = value
    return edit


H5_BAD = [
    (_h5_edit("center", 1, [np.nan, 5.0]), r"record 1: center has non-finite"),
    (_h5_edit("part", 2, np.inf), r"record 2: part has non-finite"),
    (_h5_edit("scale", 2, 0.0), r"record 2: scale must be positive"),
    (_h5_edit("normalize", 1, -3.0), r"record 1: normalize \(head size\) must not be negative"),
    (_h5_replace("part", np.zeros((3, 15, 2))), r"dataset part must have shape \(3, 16, 2\)"),
    (_h5_replace("visible", np.zeros((3, 17))), r"dataset visible must have shape \(3, 16\)"),
    (_h5_replace("scale", np.ones(2)), r"dataset scale must have shape \(3,\)"),
    (_h5_replace("normalize", None), r"missing datasets \['normalize'\]"),
]


@pytest.mark.parametrize("edit,what", H5_BAD)
def test_mpii_h5_bad(tmp_path, image_dir, edit, what):
    arrays = _h5_arrays()
    edit(arrays)
    path = _write_h5(tmp_path / "bad.h5", arrays)
    with pytest.raises(ValueError, match=r"bad\.h5: .*" + what):
        load_mpii_h5(path, image_dir)


def test_mpii_h5_bad_name(tmp_path, image_dir):
    arrays = _h5_arrays("char codes")
    arrays["imgname"][2] = 0
    with pytest.raises(ValueError, match=r"names\.h5: record 2: imgname is empty"):
        load_mpii_h5(_write_h5(tmp_path / "names.h5", arrays), image_dir)


# --- COCO ------------------------------------------------------------------------------------

def _keypoints(labelled):
    """51 numbers: keypoint k at (k + 1, 2k + 3) with flag v for each (k, v) in `labelled`;
    unlabelled keypoints are (0, 0, 0) as COCO writes them."""
    kp = [0.0] * 51
    for k, v in labelled:
        kp[3 * k: 3 * k + 3] = [k + 1.0, 2.0 * k + 3, v]
    return kp


def _coco():
    ann = [
        # kept: tall box -> scale from h
        {"id": 100, "image_id": 5, "category_id": 1, "iscrowd": 0, "bbox": [10, 20, 40, 100],
         "keypoints": _keypoints([(0, 2), (5, 1), (16, 2)]), "num_keypoints": 3},
        # kept: wide box -> scale from w
        {"id": 101, "image_id": 9, "category_id": 1, "iscrowd": 0, "bbox": [0, 0, 300, 150], "area": 30000.0,
         "keypoints": _keypoints([(k, 2) for k in range(17)]), "num_keypoints": 17},
        # crowd (with keypoints, so include_crowd keeps it)
        {"id": 102, "image_id": 5, "category_id": 1, "iscrowd": 1, "bbox": [1, 2, 50, 60],
         "keypoints": _keypoints([(1, 2), (2, 2)]), "num_keypoints": 2},
        # one labelled keypoint
        {"id": 103, "image_id": 9, "category_id": 1, "iscrowd": 0, "bbox": [5, 5, 20, 20],
         "keypoints": _keypoints([(7, 1)]), "num_keypoints": 1},
        # none labelled, and a degenerate box: skipped, so not an error
        {"id": 104, "image_id": 9, "category_id": 1, "iscrowd": 0, "bbox": [5, 5, 0, 20],
         "keypoints": _keypoints([]), "num_keypoints": 0},
        # not a person
        {"id": 105, "image_id": 9, "category_id": 18, "iscrowd": 0, "bbox": [5, 5, 10, 10]},
    ]
    return {"images": [{"id": 5, "file_name": "a.png", "width": 8, "height": 8},
                       {"id": 9, "file_name": "b.png", "width": 8, "height": 8}],
            "annotations": ann,
            "categories": [{"id": 1, "name": "person", "keypoints": ["k"] * 17, "skeleton": []},
                           {"id": 18, "name": "dog"}]}


def test_coco_fields(tmp_path, image_dir):
    path = _write_json(tmp_path / "person_keypoints.json", _coco())
    records, skipped = load_coco_keypoints(path, image_dir, return_skipped=True)
    assert skipped == {"crowd": 1, "too_few_keypoints": 1, "not_person": 1}
    assert [r.extra["annotation_id"] for r in records] == [100, 101, 103]
    assert [r.index for r in records] == [0, 1, 3]
    a, b, c = records
    # bbox [10, 20, 40, 100]: centre (10 + 20, 20 + 50); scale 100 / 200 (padding 1 by default)
    np.testing.assert_array_equal(a.center, [30.0, 70.0])
    assert a.scale == pytest.approx(0.5)
    # bbox [0, 0, 300, 150]: centre (150, 75); scale 300 / 200
    np.testing.assert_array_equal(b.center, [150.0, 75.0])
    assert b.scale == pytest.approx(1.5)
    assert a.image == os.path.join(image_dir, "a.png") and b.image == os.path.join(image_dir, "b.png")
    expected_visible = np.zeros(17)
    expected_visible[[0, 5, 16]] = 1  # v = 2, 1, 2: occluded-but-labelled counts
    np.testing.assert_array_equal(a.visible, expected_visible)
    np.testing.assert_array_equal(a.joints[[0, 5, 16]], [[1, 3], [6, 13], [17, 35]])
    np.testing.assert_array_equal(a.joints[1], [0, 0])
    np.testing.assert_array_equal(a.extra["vis_flag"][[0, 5, 16, 1]], [2, 1, 2, 0])
    assert a.extra["num_keypoints"] == 3 and a.extra["image_id"] == 5 and a.extra["iscrowd"] is False
    assert a.extra["area"] == 40 * 100 and b.extra["area"] == 30000.0  # no "area": the box's; given: kept
    np.testing.assert_array_equal(b.visible, np.ones(17))
    np.testing.assert_array_equal(c.visible, np.eye(17)[7])
    assert all(r.head_size == 0.0 and r.joints.shape == (17, 2) for r in records)
    assert load_coco_keypoints(path, image_dir, padding=1.25)[0].scale == pytest.approx(0.625)
    assert check_images(records) == []


def test_coco_skip_rules(tmp_path, image_dir):
    path = _write_json(tmp_path / "person_keypoints.json", _coco())
    records, skipped = load_coco_keypoints(path, image_dir, min_keypoints=2, return_skipped=True)
    assert [r.extra["annotation_id"] for r in records] == [100, 101]
    assert skipped == {"crowd": 1, "too_few_keypoints": 2, "not_person": 1}
    records, skipped = load_coco_keypoints(path, image_dir, include_crowd=True, return_skipped=True)
    assert [r.extra["annotation_id"] for r in records] == [100, 101, 102, 103]
    assert records[2].extra["iscrowd"] is True and skipped["crowd"] == 0
    assert len(load_coco_keypoints(path, image_dir, min_keypoints=17)) == 1


def _ann_edit(index, key, value):
    def edit(data):
        if value is None:
            del data["annotations"][index][key]
        else:
            data["annotations"][index][key] = value
    return edit


COCO_BAD = [
    (_ann_edit(0, "bbox", [10, 20, 0, 100]), r"annotation 0 \(id 100\): bbox width and height must be positive"),
    (_ann_edit(1, "bbox", [0, 0, 30, -5]), r"annotation 1 \(id 101\): bbox width and height must be positive"),
    (_ann_edit(1, "bbox", [0, 0, 30]), r"annotation 1 \(id 101\): bbox must have 4 values"),
    (_ann_edit(1, "keypoints", [0.0] * 50), r"annotation 1 \(id 101\): keypoints must have 51 values"),
    (_ann_edit(0, "keypoints", [float("nan")] + [0.0] * 50), r"annotation 0 \(id 100\): keypoints has non-finite"),
    (_ann_edit(3, "image_id", 77), r"annotation 3 \(id 103\): image_id 77 is not in images"),
    (_ann_edit(2, "keypoints", None), r"annotation 2 \(id 102\): missing keys \['keypoints'\]"),
]


@pytest.mark.parametrize("edit,what", COCO_BAD)
def test_coco_bad_annotation(tmp_path, image_dir, edit, what):
    data = copy.deepcopy(_coco())
    edit(data)
    path = _write_json(tmp_path / "bad_coco.json", data)
    with pytest.raises(ValueError, match=r"bad_coco\.json: " + what):
        load_coco_keypoints(path, image_dir)


def test_coco_bad_file(tmp_path, image_dir):
    path = _write_json(tmp_path / "not_coco.json", {"images": []})
    with pytest.raises(ValueError, match=re.escape("not_coco.json") + r": expected a COCO object"):
        load_coco_keypoints(path, image_dir)


def test_eval_command_on_an_mpii_h5_file(tmp_path, image_dir, capsys):
    """End to end: MPII HDF5 annotations and image files -> crops -> model -> PCKh table."""
    from fasthg import checkpoint
    from fasthg.cli import main
    from fasthg.models import StackedHourglass

    h5 = _write_h5(tmp_path / "valid.h5", _h5_arrays())
    ckpt = str(tmp_path / "m.pt")
    checkpoint.save(ckpt, StackedHourglass(num_stacks=1, num_features=8, depth=1, backend="eager"), input_size=32)
    assert main(["eval", ckpt, "--mpii-h5", h5, "--images", str(image_dir), "--device", "cpu"]) == 0
    assert "PCKh@0.5 on 3 people" in capsys.readouterr().out
    # --limit: the first people only; the per-joint table; the toolkit's 1-based pixels
    saved = str(tmp_path / "pred.npz")
    assert main(["eval", ckpt, "--mpii-h5", h5, "--images", str(image_dir), "--device", "cpu", "--limit", "2",
                 "--save-predictions", saved]) == 0
    out = capsys.readouterr().out
    assert "PCKh@0.5 on 2 people" in out and "\nhead_top " in out and "\nl_wrist " in out
    assert np.load(saved)["pos_pred_src"].shape == (2, 16, 2) and list(np.load(saved)["index"]) == [0, 1]
    # The JSON formats have no head sizes: PCKh refuses them with a clear message.
    js = _write_json(tmp_path / "annot.json", _cpm_entries())
    assert main(["eval", ckpt, "--mpii-json", js, "--images", str(image_dir), "--device", "cpu"]) == 1
    assert "head size" in capsys.readouterr().err


def test_training_on_mpii_files(tmp_path, image_dir):
    """fasthg.train on an MPII JSON list (bearpaw's validation people left out) or HDF5 file,
    validated on an HDF5 file (PCKh needs its head sizes)."""
    from fasthg.train import TrainConfig, Trainer

    js = _write_json(tmp_path / "mpii.json", _cpm_entries())
    h5 = _write_h5(tmp_path / "valid.h5", _h5_arrays())
    base = dict(stacks=1, features=8, depth=1, input_size=32, epochs=1, batch_size=1, workers=0, progress=False,
                backend="eager", optimizer="adam", lr=1e-3, images=image_dir, mpii_h5_valid=h5)
    t = Trainer(TrainConfig(out=str(tmp_path / "json"), mpii_json_train=js, **base))
    assert [r.index for r in t.train_set.source] == [0, 2] and len(t.val_set) == 3
    history = t.fit()
    assert len(history) == 1 and 0 <= history[0]["pckh_mean"] <= 100
    assert len(Trainer(TrainConfig(out=str(tmp_path / "h5"), mpii_h5_train=h5, **base)).train_set) == 3
    with pytest.raises(ValueError, match="head sizes"):
        Trainer(TrainConfig(out=str(tmp_path / "x"), mpii_json_train=js, **{**base, "mpii_h5_valid": None}))


def test_training_and_eval_on_coco_files(tmp_path, image_dir, capsys):
    """fasthg.train on COCO keypoints files: a 17-joint model scored by OKS AP every epoch;
    `fasthg eval --coco` scores its checkpoint the same way and refuses a 16-joint one."""
    from fasthg import checkpoint
    from fasthg.cli import main
    from fasthg.models import StackedHourglass
    from fasthg.train import TrainConfig, Trainer

    path = _write_json(tmp_path / "person_keypoints.json", _coco())
    base = dict(stacks=1, features=8, depth=1, input_size=32, epochs=1, batch_size=1, workers=0, progress=False,
                backend="eager", optimizer="adam", lr=1e-3, images=image_dir)
    t = Trainer(TrainConfig(out=str(tmp_path / "coco"), coco_train=path, coco_valid=path, **base))
    assert t.model.num_joints == 17 and len(t.train_set) == 3 and t.train_set.flip_pairs[0] == (1, 2)
    history = t.fit()
    assert len(history) == 1 and 0 <= history[0]["oks_ap"] <= 100 and "oks_ap50" in history[0]
    best = str(tmp_path / "coco" / "best.pt")
    assert checkpoint.read(best)["model_config"]["num_joints"] == 17
    assert main(["eval", best, "--coco", path, "--images", str(image_dir), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "OKS AP (ground-truth boxes) on 3 people" in out and "AP50" in out and "per joint" not in out
    # --save-predictions FILE.json on COCO people: COCO's keypoint results format
    saved = str(tmp_path / "results.json")
    assert main(["eval", best, "--coco", path, "--images", str(image_dir), "--device", "cpu", "--limit", "2",
                 "--save-predictions", saved]) == 0
    results = json.load(open(saved))
    assert [r["image_id"] for r in results] == [5, 9] and all(r["category_id"] == 1 for r in results)
    assert all(len(r["keypoints"]) == 51 and r["score"] == pytest.approx(np.mean(r["keypoints"][2::3]))
               for r in results)
    mpii = str(tmp_path / "m16.pt")
    checkpoint.save(mpii, StackedHourglass(num_stacks=1, num_features=8, depth=1, backend="eager"), input_size=32)
    assert main(["eval", mpii, "--coco", path, "--images", str(image_dir), "--device", "cpu"]) == 1
    assert "16 joints cannot be scored on COCO" in capsys.readouterr().err
    with pytest.raises(ValueError, match="coco_valid"):
        Trainer(TrainConfig(out=str(tmp_path / "x"), coco_train=path, **base))
