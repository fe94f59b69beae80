"""Malformed data files a user can hand fasthg: annotation files (MPII JSON and HDF5, COCO) and
the images they name. Each ends in one line naming the file (and the record, annotation or
image), never a traceback from deep inside, a hang, a crashed DataLoader worker or a silently
wrong number; or, where a file is merely odd (grey, CMYK, 16-bit, joints off the picture), it
loads right."""
import builtins
import copy
import json
import os
import struct
import zlib

import cv2
import h5py
import numpy as np
import pytest
import torch
from test_data_loaders import (_coco, _cpm_entries, _h5_arrays, _hrnet_entries, _keypoints, _write_h5, _write_images,
                               _write_json)

from fasthg.cli import main
from fasthg.data import PoseDataset, PoseRecord
from fasthg.data import images as image_files
from fasthg.data.coco import load_coco_keypoints
from fasthg.data.dataset import SkipBadImages, load_image
from fasthg.data.images import BadImageError, read_rgb
from fasthg.data.mpii import load_mpii_h5, load_mpii_json
from fasthg.data.sources import sources
from fasthg.evaluate import oks, pckh, predict_dataset
from fasthg.train import TrainConfig


@pytest.fixture
def image_dir(tmp_path):
    d = tmp_path / "images"
    _write_images(d)  # a.png, b.png
    return str(d)


def picture(h=24, w=32, seed=0):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def encoded(ext, img=None, params=()):
    ok, buf = cv2.imencode(ext, picture() if img is None else img, list(params))
    assert ok
    return buf.tobytes()


def cli(capsys, monkeypatch, argv):
    """(exit status, fasthg's error lines, stdout) of `fasthg ARGV`, without FASTHG_DEBUG."""
    monkeypatch.delenv("FASTHG_DEBUG", raising=False)
    try:
        status = main(argv)
    except SystemExit as e:
        status = e.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Caught" not in err, err
    return status, [line for line in err.splitlines() if line.startswith(f"fasthg {argv[0]}: error: ")], out


# --- MPII JSON: wrong types -------------------------------------------------------------------

@pytest.mark.parametrize("key,value", [
    ("scale_provided", "2.5"),                  # a number in quotes
    ("joint_self", [["1", "2", "1"]] * 16),     # strings where numbers are
    ("objpos", {"x": 1, "y": 2}),               # a dict where a list is
    ("objpos", None),
    ("isValidation", "1"),
    ("joint_self", [[1, 2, 1]] * 15 + [[1, 2]]),  # ragged
])
def test_mpii_json_wrong_types(tmp_path, image_dir, key, value):
    entries = _cpm_entries()
    entries[1][key] = value
    path = _write_json(tmp_path / "types.json", entries)
    with pytest.raises(ValueError, match=rf"types\.json: record 1: {key} is not an array of numbers, got "):
        load_mpii_json(path, image_dir)


def test_mpii_hrnet_json_strings(tmp_path, image_dir):
    entries = _hrnet_entries()
    entries[0]["joints_vis"] = ["1"] * 16
    with pytest.raises(ValueError, match=r"h\.json: record 0: joints_vis is not an array of numbers"):
        load_mpii_json(_write_json(tmp_path / "h.json", entries), image_dir)


# --- MPII HDF5 --------------------------------------------------------------------------------

def test_mpii_h5_group_in_place_of_a_dataset(tmp_path, image_dir):
    arrays = _h5_arrays()
    del arrays["center"]
    path = _write_h5(tmp_path / "group.h5", arrays)
    with h5py.File(path, "a") as f:
        f.create_group("center")
    with pytest.raises(ValueError, match=r"group\.h5: center must be a dataset, got a group"):
        load_mpii_h5(path, image_dir)


@pytest.mark.parametrize("index,person,what", [
    ([10, 12, 12], [1, 1, 1], r"records 1 and 2 are the same person: index 12, person 1"),
    ([7, 11, 7], [2, 1, 2], r"records 0 and 2 are the same person: index 7, person 2"),
    ([10, 11], [1, 1, 2], r"dataset index must have shape \(3,\)"),
    ([10.5, 11, 12], [1, 1, 2], r"record 0: index must be a whole number"),
    ([10, 11, 12], [b"a", b"b", b"c"], r"dataset person must be numeric"),
])
def test_mpii_h5_person_ids(tmp_path, image_dir, index, person, what):
    arrays = {**_h5_arrays(), "index": np.array(index), "person": np.array(person)}
    with pytest.raises(ValueError, match=r"ids\.h5: " + what):
        load_mpii_h5(_write_h5(tmp_path / "ids.h5", arrays), image_dir)


def test_mpii_h5_without_people_loads_empty(tmp_path, image_dir):
    arrays = {k: v[:0] for k, v in _h5_arrays().items()}
    assert load_mpii_h5(_write_h5(tmp_path / "none.h5", arrays), image_dir) == []


# --- COCO --------------------------------------------------------------------------------------

def _edit(fn):
    data = copy.deepcopy(_coco())
    fn(data)
    return data


def _set_ann(i, key, value):
    return lambda d: d["annotations"][i].__setitem__(key, value)


def _set_image(i, key, value):
    return lambda d: d["images"][i].__setitem__(key, value)


COCO_BAD = [
    (_set_ann(3, "id", 100), r"annotation 0 and annotation 3 have the same id 100"),
    (_set_ann(5, "id", 101), r"annotation 1 and annotation 5 have the same id 101"),  # a dog's, too
    (_set_image(1, "id", 5), r"image 0 and image 1 have the same id 5"),
    (_set_image(1, "id", [9]), r"image 1: id must be an integer, got \[9\]"),
    (_set_image(1, "file_name", 7), r"image 1 \(id 9\): file_name must be a non-empty file name, got 7"),
    (_set_ann(0, "id", {"n": 1}), r"annotation 0: id must be an integer"),
    (_set_ann(1, "image_id", [9]), r"annotation 1 \(id 101\): image_id \[9\] is not in images"),
    (_set_ann(1, "keypoints", [str(v) for v in _keypoints([(0, 2)])]),
     r"annotation 1 \(id 101\): keypoints is not an array of numbers, got \['1.0'"),
    (_set_ann(1, "keypoints", {"nose": [1, 2, 2]}), r"annotation 1 \(id 101\): keypoints is not an array of numbers"),
    (_set_ann(0, "bbox", "10 20 40 100"), r"annotation 0 \(id 100\): bbox is not an array of numbers"),
    (_set_ann(0, "iscrowd", "0"), r"annotation 0 \(id 100\): iscrowd must be 0 or 1, got '0'"),
    (_set_ann(0, "category_id", [1]), r"annotation 0 \(id 100\): category_id must be an integer"),
    (_set_ann(0, "area", "4000"), r"annotation 0 \(id 100\): area must be a finite number, got '4000'"),
    (_set_ann(1, "area", float("inf")), r"annotation 1 \(id 101\): area must be a finite number, got inf"),
]


@pytest.mark.parametrize("edit,what", COCO_BAD)
def test_coco_malformed(tmp_path, image_dir, edit, what):
    path = _write_json(tmp_path / "bad.json", _edit(edit))
    with pytest.raises(ValueError, match=r"bad\.json: " + what):
        load_coco_keypoints(path, image_dir)


def test_coco_categories_with_odd_ids_are_not_persons(tmp_path, image_dir):
    data = _edit(lambda d: d["categories"].append({"id": [3], "keypoints": []}))
    assert len(load_coco_keypoints(_write_json(tmp_path / "c.json", data), image_dir)) == 3


# --- empty sets: training says so, naming the file -----------------------------------------------

def _mpii_config(tmp_path, image_dir, **files):
    valid = files.pop("mpii_h5_valid", None) or _write_h5(tmp_path / "valid.h5", _h5_arrays())
    return TrainConfig(out=str(tmp_path / "run"), images=image_dir, mpii_h5_valid=valid, batch_size=1, **files)


def test_training_on_files_without_people(tmp_path, image_dir):
    empty_json = _write_json(tmp_path / "empty.json", [])
    with pytest.raises(ValueError, match=r"empty\.json: no training people"):
        sources(_mpii_config(tmp_path, image_dir, mpii_json_train=empty_json))
    all_valid = _cpm_entries()
    for e in all_valid:
        e["isValidation"] = 1.0
    flagged = _write_json(tmp_path / "flagged.json", all_valid)
    with pytest.raises(ValueError, match=r"flagged\.json: no training people \(isValidation 0\)"):
        sources(_mpii_config(tmp_path, image_dir, mpii_json_train=flagged))
    empty_h5 = _write_h5(tmp_path / "none.h5", {k: v[:0] for k, v in _h5_arrays().items()})
    with pytest.raises(ValueError, match=r"none\.h5: no people"):
        sources(_mpii_config(tmp_path, image_dir, mpii_h5_train=empty_h5))
    with pytest.raises(ValueError, match=r"none\.h5: no people"):
        sources(_mpii_config(tmp_path, image_dir, mpii_h5_train=empty_h5, mpii_h5_valid=empty_h5))
    no_people = _write_json(tmp_path / "nobody.json", _edit(lambda d: d.__setitem__("annotations", [])))
    coco = _write_json(tmp_path / "coco.json", _coco())
    for train, valid in ((no_people, coco), (coco, no_people)):
        with pytest.raises(ValueError, match=r"nobody\.json: no people"):
            sources(TrainConfig(images=image_dir, coco_train=train, coco_valid=valid, batch_size=1))


def test_training_on_fewer_people_than_a_batch(tmp_path, image_dir):
    h5 = _write_h5(tmp_path / "three.h5", _h5_arrays())
    with pytest.raises(ValueError, match=r"three\.h5: 3 training people make no batch of 4"):
        sources(TrainConfig(images=image_dir, mpii_h5_train=h5, mpii_h5_valid=h5, batch_size=4))


def test_train_command_on_an_empty_file(tmp_path, image_dir, capsys, monkeypatch):
    empty = _write_json(tmp_path / "empty.json", [])
    status, lines, _ = cli(capsys, monkeypatch, ["train", "--mpii-json-train", empty, "--mpii-h5-valid",
                                                 _write_h5(tmp_path / "v.h5", _h5_arrays()), "--images", image_dir,
                                                 "--device", "cpu", "--out", str(tmp_path / "run")])
    assert status == 1 and len(lines) == 1 and "empty.json: no training people" in lines[0]


def test_evaluating_nobody_is_an_error():
    model = torch.nn.Identity()
    model.register_parameter("p", torch.nn.Parameter(torch.zeros(1)))
    with pytest.raises(ValueError, match="no people to evaluate"):
        predict_dataset(model, PoseDataset([], input_size=32, train=False), progress=False)


# --- joints outside the image: they load and train, weighted 0 where off the crop ---------------------

def test_joints_outside_the_image_train(tmp_path, image_dir):
    from fasthg.train import Trainer

    entries = _cpm_entries()
    far = [[-500.0, 20.0, 1.0], [1e5, 1e5, 1.0], [9.0, -3e4, 1.0]] + entries[0]["joint_self"][3:]
    entries[0]["joint_self"] = far
    js = _write_json(tmp_path / "outside.json", entries)
    records = load_mpii_json(js, image_dir, split="train")
    item = PoseDataset(records, input_size=32, train=False)[0]
    np.testing.assert_array_equal(item["weights"][:3], [0, 0, 0])  # off the crop
    assert item["weights"][4] == 1 and torch.isfinite(item["heatmaps"]).all()
    assert item["heatmaps"][:3].abs().sum() == 0
    cfg = TrainConfig(out=str(tmp_path / "run"), mpii_json_train=js, mpii_h5_valid=_write_h5(tmp_path / "v.h5",
                      _h5_arrays()), images=image_dir, stacks=1, features=8, depth=1, input_size=32, epochs=1,
                      batch_size=2, workers=0, progress=False, backend="eager", optimizer="adam", lr=1e-3)
    history = Trainer(cfg).fit()
    assert np.isfinite(history[0]["loss"])


# --- head size 0: PCKh names the person instead of dividing by zero ------------------------------------

def test_pckh_with_a_zero_head_size():
    gt = np.zeros((3, 2, 2))
    visible = np.array([[1, 1], [1, 0], [0, 0]])
    with pytest.raises(ValueError, match=r"person 1 \(record 17\) has annotated joints \(1\) but head size 0: PCKh "
                                         r"needs a positive head size .*\(1 person like this\)"):
        pckh(gt, gt, visible, np.array([2.0, 0.0, 0.0]), records=[5, 17, 30])
    # Nobody annotated with head size 0: left out of the scores, no division by zero.
    with np.errstate(all="raise"):
        acc, count = pckh(gt, gt, visible, np.array([2.0, 3.0, 0.0]))
    np.testing.assert_array_equal(acc, [1.0, 1.0])
    np.testing.assert_array_equal(count, [2, 1])
    with pytest.raises(ValueError, match=r"person 0 has annotated joints \(2\) but area -1"):
        oks(gt, gt, visible, np.array([-1.0, 2.0, 0.0]), sigmas=(0.1, 0.1))


def test_validation_file_with_a_zero_head_size(tmp_path, image_dir, capsys, monkeypatch):
    arrays = _h5_arrays()
    arrays["normalize"] = np.array([30.0, 0.0, 12.25])
    h5 = _write_h5(tmp_path / "heads.h5", arrays)
    with pytest.raises(ValueError, match=r"heads\.h5: record 1: annotated joints \(16\) but head size 0: PCKh "
                                         r"cannot score this person \(1 person like this"):
        sources(_mpii_config(tmp_path, image_dir, mpii_h5_train=h5, mpii_h5_valid=h5))
    ckpt = _tiny_checkpoint(tmp_path)
    status, lines, _ = cli(capsys, monkeypatch, ["eval", ckpt, "--mpii-h5", h5, "--images", image_dir,
                                                 "--device", "cpu"])
    assert status == 1 and len(lines) == 1
    assert "person 1 (record 1) has annotated joints (16) but head size 0" in lines[0]


def _tiny_checkpoint(tmp_path, joints=16):
    from fasthg import checkpoint
    from fasthg.models import StackedHourglass

    path = str(tmp_path / f"m{joints}.pt")
    model = StackedHourglass(num_stacks=1, num_features=8, num_joints=joints, depth=1, backend="eager")
    checkpoint.save(path, model, input_size=32)
    return path


# --- image files --------------------------------------------------------------------------------

def _png_declaring(width, height):
    """A small, valid PNG whose header declares width x height pixels (one row of data)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(width + 1)))
            + chunk(b"IEND", b""))


def _jpeg_with_thumbnail():
    """A JPEG whose EXIF-like APP1 segment holds a whole other JPEG (a thumbnail, with its own
    end marker) before the picture's own scan."""
    thumb = encoded(".jpg", picture(8, 8, seed=1))
    body = encoded(".jpg")
    app1 = b"\xff\xe1" + struct.pack(">H", len(thumb) + 8) + b"Exif\x00\x00" + thumb
    return body[:2] + app1 + body[2:]


def _progressive():
    data = encoded(".jpg", params=(cv2.IMWRITE_JPEG_PROGRESSIVE, 1))
    assert data.count(b"\xff\xda") > 1  # several scans
    return data


BAD_FILES = {
    "truncated JPEG": ("cut.jpg", lambda: encoded(".jpg")[:-400], "truncated JPEG (no end-of-image marker FF D9)"),
    "JPEG cut before its scan": ("head.jpg", lambda: encoded(".jpg")[:300], "truncated JPEG"),
    "progressive JPEG cut in a later scan": ("prog.jpg", lambda: _progressive()[:-2], "truncated JPEG"),
    "JPEG with a thumbnail, cut": ("thumb.jpg", lambda: _jpeg_with_thumbnail()[:-300], "truncated JPEG"),
    "truncated PNG": ("cut.png", lambda: encoded(".png")[:-300], "truncated PNG (no IEND chunk"),
    "PNG without IEND": ("noend.png", lambda: encoded(".png")[:-12], "truncated PNG (no IEND chunk"),
    "empty file": ("empty.png", lambda: b"", "an empty file"),
    "text": ("notes.jpg", lambda: b"not a picture", "not an image OpenCV can decode"),
    "huge PNG": ("huge.png", lambda: _png_declaring(100_000, 100_000),
                 "100000 x 100000 pixels, more than fasthg.data.images.MAX_IMAGE_PIXELS"),
    "huge under OpenCV's limit": ("big.png", lambda: _png_declaring(30_000, 30_000), "30000 x 30000 pixels"),
}


@pytest.mark.parametrize("name,data,expected", list(BAD_FILES.values()), ids=list(BAD_FILES))
def test_bad_image_files(tmp_path, name, data, expected):
    path = tmp_path / name
    path.write_bytes(data())
    with pytest.raises(BadImageError) as e:
        read_rgb(str(path))
    assert str(e.value).startswith(f"cannot read image file {str(path)!r}: ") and expected in str(e.value)
    assert "\n" not in str(e.value)
    record = PoseRecord(center=(4, 4), scale=1.0, joints=np.zeros((16, 2)), visible=np.ones(16), image=str(path),
                        index=41)
    with pytest.raises(BadImageError, match=rf"^record 41: cannot read image file .*{name}.*: "):
        load_image(record)


def test_good_jpegs_with_thumbnail_or_trailing_bytes_load(tmp_path):
    for name, data in (("thumb.jpg", _jpeg_with_thumbnail()), ("tail.jpg", encoded(".jpg") + b"\0\0trailer"),
                       ("prog.jpg", _progressive())):
        (tmp_path / name).write_bytes(data)
        assert read_rgb(str(tmp_path / name)).shape == (24, 32, 3)


def test_the_pixel_limit_comes_before_decoding(tmp_path, monkeypatch):
    (tmp_path / "a.png").write_bytes(encoded(".png"))  # 32 x 24
    (tmp_path / "a.jpg").write_bytes(encoded(".jpg"))
    monkeypatch.setattr(image_files, "MAX_IMAGE_PIXELS", 32 * 24 - 1)
    for name in ("a.png", "a.jpg"):
        with pytest.raises(BadImageError, match=r"32 x 24 pixels, more than .*MAX_IMAGE_PIXELS \(767\)"):
            read_rgb(str(tmp_path / name))
    monkeypatch.setattr(image_files, "MAX_IMAGE_PIXELS", 32 * 24)
    assert read_rgb(str(tmp_path / "a.jpg")).shape == (24, 32, 3)
    # A file too large to be an image within the limit is not read in (the bytes of any format).
    (tmp_path / "a.bmp").write_bytes(encoded(".bmp") + bytes(8 * 32 * 24))
    with pytest.raises(BadImageError, match=r"a\.bmp': [0-9,]+ bytes, more than an image of .*MAX_IMAGE_PIXELS \(768\) "
                                            r"pixels needs"):
        read_rgb(str(tmp_path / "a.bmp"))


def test_unreadable_files(tmp_path, monkeypatch):
    with pytest.raises(BadImageError, match=r"cannot read image file .*missing\.png': No such file"):
        read_rgb(str(tmp_path / "missing.png"))
    with pytest.raises(BadImageError, match=r"cannot read image file .*: Is a directory"):
        read_rgb(str(tmp_path))
    locked = tmp_path / "locked.png"
    locked.write_bytes(encoded(".png"))

    def no_permission(path, *args, **kwargs):
        if str(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(path))
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(image_files, "open", no_permission, raising=False)
    with pytest.raises(BadImageError, match=r"cannot read image file .*locked\.png': Permission denied"):
        read_rgb(str(locked))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")
def test_file_without_read_permission(tmp_path):
    locked = tmp_path / "locked.png"
    locked.write_bytes(encoded(".png"))
    locked.chmod(0)
    try:
        with pytest.raises(BadImageError, match=r"locked\.png': Permission denied"):
            read_rgb(str(locked))
    finally:
        locked.chmod(0o600)


def test_grey_cmyk_and_16_bit_files_load_as_8_bit_rgb(tmp_path):
    img = picture()
    grey = img[..., 0]
    for ext in (".png", ".jpg"):
        (tmp_path / f"grey{ext}").write_bytes(encoded(ext, grey))
        rgb = read_rgb(str(tmp_path / f"grey{ext}"))
        assert rgb.shape == (24, 32, 3) and rgb.dtype == np.uint8
        assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    assert (read_rgb(str(tmp_path / "grey.png"))[..., 0] == grey).all()
    # 16 bits: scaled to 8 (the high byte), not saturated at 255
    deep = np.array([[0, 255, 256, 13980], [32767, 40000, 65280, 65535]], np.uint16)
    colour = np.stack([deep, deep // 2, 65535 - deep], -1)
    (tmp_path / "grey16.png").write_bytes(encoded(".png", deep))
    (tmp_path / "colour16.png").write_bytes(encoded(".png", colour))
    np.testing.assert_array_equal(read_rgb(str(tmp_path / "grey16.png"))[..., 1], deep >> 8)
    # RGB out of OpenCV's BGR file
    np.testing.assert_array_equal(read_rgb(str(tmp_path / "colour16.png")), (colour >> 8)[..., ::-1])
    Image = pytest.importorskip("PIL.Image")
    cmyk = tmp_path / "cmyk.jpg"
    Image.fromarray(img).convert("CMYK").save(cmyk, quality=95)
    assert Image.open(cmyk).mode == "CMYK"
    rgb = read_rgb(str(cmyk))
    assert rgb.shape == (24, 32, 3) and rgb.dtype == np.uint8
    assert np.abs(rgb.astype(int) - np.asarray(Image.open(cmyk).convert("RGB"), int)).mean() < 2
    assert np.abs(rgb.astype(int) - img.astype(int)).mean() < 12  # the same picture, not inverted


# --- a bad image mid-epoch ---------------------------------------------------------------------

def _people(tmp_path, bad=(1,), n=6):
    """n people, each with its own image; those in `bad` truncated JPEGs."""
    records = []
    for i in range(n):
        path = tmp_path / f"p{i}.jpg"
        data = encoded(".jpg", picture(seed=i))
        path.write_bytes(data[:-100] if i in bad else data)
        records.append(PoseRecord(center=(16, 12), scale=0.12, joints=np.full((16, 2), 10.0 + i),
                                  visible=np.ones(16), image=str(path), index=100 + i))
    return records


def test_bad_image_error_is_one_line_through_dataloader_workers(tmp_path):
    ds = PoseDataset(_people(tmp_path), input_size=32)
    with pytest.raises(BadImageError) as e:
        for _ in torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1):
            pass
    assert str(e.value) == (f"record 101: cannot read image file {str(tmp_path / 'p1.jpg')!r}: truncated JPEG "
                            "(no end-of-image marker FF D9)")


def test_bad_image_error_keeps_the_workers_message():
    """What torch's DataLoader does with a worker's exception (torch._utils.ExceptionWrapper)."""
    from torch._utils import ExceptionWrapper

    try:
        raise BadImageError("record 3: cannot read image file 'x.jpg': an empty file")
    except BadImageError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(BadImageError) as e:
        wrapped.reraise()
    assert str(e.value) == "record 3: cannot read image file 'x.jpg': an empty file"
    assert str(BadImageError("Caught nothing")) == "Caught nothing"


def test_skipping_in_training_substitutes_the_next_person(tmp_path):
    records = _people(tmp_path, bad=(1, 2, 5))
    ds = PoseDataset(SkipBadImages(records, substitute=True), input_size=32, seed=3)
    items = [ds[i] for i in range(6)]
    assert [it["skipped"] for it in items] == [0, 1, 1, 0, 0, 1]
    assert [it["record"] for it in items] == [100, 103, 103, 103, 104, 100]  # the next readable one, wrapping round
    # The same person as in its own place, under this position's augmentation: deterministic.
    again = PoseDataset(SkipBadImages(records, substitute=True), input_size=32, seed=3)
    for i in range(6):
        assert torch.equal(items[i]["image"], again[i]["image"])
        assert torch.equal(items[i]["heatmaps"], again[i]["heatmaps"])
    # Full batches, and the count of the skipped in them
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=1, drop_last=True)
    batches = list(loader)
    assert [len(b["image"]) for b in batches] == [3, 3] and sum(int(b["skipped"].sum()) for b in batches) == 3


def test_skipping_when_every_image_is_bad(tmp_path):
    ds = PoseDataset(SkipBadImages(_people(tmp_path, bad=range(3), n=3), substitute=True), input_size=32)
    with pytest.raises(BadImageError, match=r"no image of the 3 people can be read, e\.g\. record 101: cannot read"):
        ds[1]


def test_skipping_in_evaluation_scores_nobody_in_the_bad_ones_place(tmp_path):
    records = _people(tmp_path, bad=(2,), n=4)
    for r in records:
        r.head_size = 5.0
    ds = PoseDataset(SkipBadImages(records, substitute=False), input_size=32, train=False)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 1), torch.nn.AvgPool2d(4), torch.nn.Unflatten(0, (-1, 1)))
    res = predict_dataset(model, ds, batch_size=2, progress=False)
    assert list(res["skipped"]) == [0, 0, 1, 0] and list(res["record"]) == [100, 101, 102, 103]
    assert res["visible"][2].sum() == 0 and res["visible"][[0, 1, 3]].all()
    _, count = pckh(res["pred"], res["joints"], res["visible"], res["head_size"])
    assert (count == 3).all()


def test_bad_images_setting(tmp_path, image_dir, capsys, monkeypatch):
    h5 = _write_h5(tmp_path / "v.h5", _h5_arrays())
    with pytest.raises(ValueError, match=r"bad_images must be one of stop, skip, got 'ignore'"):
        sources(TrainConfig(images=image_dir, mpii_h5_train=h5, mpii_h5_valid=h5, bad_images="ignore"))
    train, valid = sources(TrainConfig(images=image_dir, mpii_h5_train=h5, mpii_h5_valid=h5, batch_size=1,
                                       bad_images="skip"))
    assert isinstance(train, SkipBadImages) and train.substitute and not valid.substitute
    assert isinstance(sources(TrainConfig(images=image_dir, mpii_h5_train=h5, mpii_h5_valid=h5, batch_size=1))[0],
                      list)
    status, lines, _ = cli(capsys, monkeypatch, ["train", "--bad-images", "ignore"])
    assert status == 2 and len(lines) == 1 and "argument --bad-images: invalid choice: 'ignore'" in lines[0]


def _truncate(path):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:-20])


@pytest.mark.parametrize("workers", ["0", "1"])
def test_train_command_on_a_bad_image(tmp_path, image_dir, capsys, monkeypatch, workers):
    """Stops with one line naming the record and the file (through a DataLoader worker too);
    --bad-images skip trains on."""
    _truncate(os.path.join(image_dir, "b.png"))  # record 1's
    h5 = _write_h5(tmp_path / "v.h5", _h5_arrays())
    argv = ["train", "--mpii-h5-train", h5, "--mpii-h5-valid", h5, "--images", image_dir, "--device", "cpu",
            "--stacks", "1", "--features", "8", "--depth", "1", "--input-size", "32", "--epochs", "1",
            "--batch-size", "1", "--workers", workers, "--no-progress", "--backend", "eager"]
    status, lines, _ = cli(capsys, monkeypatch, argv + ["--out", str(tmp_path / "stop")])
    assert status == 1 and len(lines) == 1, lines
    assert lines[0] == (f"fasthg train: error: record 1: cannot read image file "
                        f"{os.path.join(image_dir, 'b.png')!r}: truncated PNG (no IEND chunk at its end)")
    status, lines, out = cli(capsys, monkeypatch, argv + ["--out", str(tmp_path / "skip"), "--bad-images", "skip"])
    assert status == 0 and not lines and "epoch 1: loss" in out
    # the epoch line and the log count the skipped (record 1 of the training file, once an epoch)
    assert "skipped for bad images: 1" in out
    rows = [json.loads(line) for line in open(tmp_path / "skip" / "log.jsonl")]
    assert [r["skipped_images"] for r in rows] == [1]


def test_eval_command_on_a_bad_image(tmp_path, image_dir, capsys, monkeypatch):
    (tmp_path / "images" / "b.png").write_bytes(b"")
    h5 = _write_h5(tmp_path / "v.h5", _h5_arrays())
    status, lines, _ = cli(capsys, monkeypatch, ["eval", _tiny_checkpoint(tmp_path), "--mpii-h5", h5, "--images",
                                                 image_dir, "--device", "cpu"])
    assert status == 1 and lines == [f"fasthg eval: error: record 1: cannot read image file "
                                     f"{os.path.join(image_dir, 'b.png')!r}: an empty file"]


def test_eval_command_skips_bad_images_when_asked(tmp_path, image_dir, capsys, monkeypatch):
    _truncate(os.path.join(image_dir, "b.png"))
    h5 = _write_h5(tmp_path / "v.h5", _h5_arrays())
    argv = ["eval", _tiny_checkpoint(tmp_path), "--mpii-h5", h5, "--images", image_dir, "--device", "cpu"]
    status, lines, out = cli(capsys, monkeypatch, argv + ["--bad-images", "skip"])
    n = len(_h5_arrays()["scale"])
    assert status == 0 and not lines and f"on {n - 1} people, 1 skipped for bad images" in out, out
    status, lines, _ = cli(capsys, monkeypatch, argv)
    assert status == 1 and "record 1: cannot read image file" in lines[0]


def test_predict_command_on_a_huge_or_truncated_image(tmp_path, capsys, monkeypatch):
    huge, cut = tmp_path / "huge.png", tmp_path / "cut.png"
    huge.write_bytes(_png_declaring(100_000, 100_000))
    cv2.imwrite(str(cut), np.full((40, 30, 3), 90, np.uint8))
    _truncate(str(cut))
    ckpt = _tiny_checkpoint(tmp_path)
    for path, why in ((huge, "100000 x 100000"), (cut, "truncated PNG")):
        status, lines, _ = cli(capsys, monkeypatch, ["predict", ckpt, str(path), "--out", str(tmp_path / "p"),
                                                     "--device", "cpu"])
        assert status == 1 and len(lines) == 1 and str(path) in lines[0] and why in lines[0], lines


def test_eval_command_on_a_file_without_people_names_it(tmp_path, image_dir, capsys, monkeypatch):
    empty = _write_json(tmp_path / "empty.json", [])
    status, lines, _ = cli(capsys, monkeypatch, ["eval", _tiny_checkpoint(tmp_path), "--mpii-json", empty,
                                                 "--images", image_dir, "--device", "cpu", "--split", "all"])
    assert status == 1 and lines == [f"fasthg eval: error: {empty}: no people to evaluate (expected annotated people)"]
