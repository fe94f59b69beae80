"""The synthetic people and the dataset that crops, augments and builds targets."""
import numpy as np
import pytest
import torch

from fasthg.data import MPII_FLIP_PAIRS, PoseRecord
from fasthg.data.dataset import PoseDataset, load_image
from fasthg.data.synthetic import SyntheticPoses
from fasthg.data.transforms import swap_pairs
from fasthg.evaluate import decode_heatmaps, to_image_coords


def test_synthetic_is_deterministic_per_seed_and_index():
    a, b, c = SyntheticPoses(5, 96, seed=3), SyntheticPoses(5, 96, seed=3), SyntheticPoses(5, 96, seed=4)
    np.testing.assert_array_equal(a[2].joints, b[2].joints)
    np.testing.assert_array_equal(a[2].extra["pixels"], b[2].extra["pixels"])
    assert not np.allclose(a[2].joints, c[2].joints)
    assert a[2].extra["pixels"].shape == (96, 96, 3) and a[2].extra["pixels"].dtype == np.uint8


def test_synthetic_people_are_plausible():
    ds = SyntheticPoses(200, 128, seed=0)
    recs = [ds[i] for i in range(len(ds))]
    for r in recs:
        assert r.joints.shape == (16, 2) and r.head_size > 0 and r.scale > 0
        thigh = np.linalg.norm(r.joints[2] - r.joints[1])
        torso = np.linalg.norm(r.joints[6] - r.joints[7])
        assert 0.6 < thigh / torso < 1.1  # 0.25 vs 0.30 of the height, +-10%
        # the record's box holds every joint
        lo, hi = r.center - 100 * r.scale, r.center + 100 * r.scale
        assert (r.joints >= lo - 1e-9).all() and (r.joints <= hi + 1e-9).all()
    hidden = np.mean([1 - r.visible.mean() for r in recs])
    assert 0.005 < hidden < 0.2  # some joints leave the frame, most do not
    # Out-of-frame joints, and only those, have visibility 0.
    for r in recs:
        inside = ((r.joints >= 0) & (r.joints <= 127)).all(1)
        np.testing.assert_array_equal(r.visible, inside.astype(float))


def test_left_and_right_limbs_have_different_colour_families():
    ds = SyntheticPoses(30, 128, seed=1)
    warm = cool = 0
    for i in range(len(ds)):
        r = ds[i]
        img = r.extra["pixels"].astype(int)
        for (a, b), side in (((1, 0), "right"), ((4, 5), "left")):  # shins
            mid = np.round((r.joints[a] + r.joints[b]) / 2).astype(int)
            if not ((mid >= 0) & (mid < 128)).all():
                continue
            red, _, blue = img[mid[1], mid[0]]
            warm += side == "right" and red > blue
            cool += side == "left" and blue > red
    assert warm >= 18 and cool >= 18  # occlusion hides some; most show their side's colour


@pytest.mark.parametrize("train", [False, True])
def test_targets_decode_back_to_the_joints(train):
    """Crop, augmentation, flip (left/right swapped), targets and decoding agree: the joints
    decoded from the target heatmaps, mapped back through the crop, are the record's."""
    ds = PoseDataset(SyntheticPoses(12, 128, seed=2), input_size=128, train=train, seed=5)
    for i in range(len(ds)):
        item = ds[i]
        _, _, flip, _ = ds.augmentation(i)
        pos, _ = decode_heatmaps(item["heatmaps"][None])
        if flip:
            pos = swap_pairs(pos[0], MPII_FLIP_PAIRS)[None]
        back = to_image_coords(pos, item["matrix"][None].numpy(), ds.stride)[0]
        weights = swap_pairs(item["weights"].numpy(), MPII_FLIP_PAIRS) if flip else item["weights"].numpy()
        ok = weights > 0
        assert ok.sum() >= 8
        # within about a heatmap pixel (stride 4 px, times the crop's zoom)
        err = np.linalg.norm(back[ok] - item["joints"].numpy()[ok], axis=1)
        assert err.max() < 4.0, (i, err.max())
        assert (weights[item["visible"].numpy() == 0] == 0).all()


def test_item_layout_and_epoch_dependent_augmentation():
    ds = PoseDataset(SyntheticPoses(4, 128), input_size=128, train=True)
    item = ds[0]
    assert item["image"].shape == (3, 128, 128) and item["image"].dtype == torch.float32
    assert -0.5 <= item["image"].min() and item["image"].max() <= 0.5
    assert item["heatmaps"].shape == (16, 32, 32) and item["weights"].shape == (16,)
    assert ds.augmentation(1)[:3] == ds.augmentation(1)[:3]
    first = [ds.augmentation(i)[:3] for i in range(4)]
    ds.set_epoch(1)
    assert [ds.augmentation(i)[:3] for i in range(4)] != first
    assert PoseDataset(SyntheticPoses(2, 128), input_size=128, train=False).augmentation(0)[:3] == (1.0, 0.0, False)


def test_dataloader_with_workers():
    ds = PoseDataset(SyntheticPoses(8, 64), input_size=64)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)))
    assert batch["image"].shape == (4, 3, 64, 64) and batch["matrix"].shape == (4, 2, 3)


def test_unreadable_image_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    rec = PoseRecord(center=(10, 10), scale=1.0, joints=np.zeros((16, 2)), visible=np.ones(16), image=str(bad), index=7)
    with pytest.raises(ValueError, match=r"record 7: cannot read image file .*broken.jpg"):
        load_image(rec)


def test_bad_arguments():
    with pytest.raises(ValueError, match="multiple of output_size"):
        PoseDataset(SyntheticPoses(2, 64), input_size=64, output_size=24)
    with pytest.raises(ValueError, match="n >= 1"):
        SyntheticPoses(0)


def test_the_cache_gives_the_same_people_read_only_and_keeps_to_its_bytes():
    plain = SyntheticPoses(5, 64, seed=3)
    per_person = 64 * 64 * 3
    cached = SyntheticPoses(5, 64, seed=3, cache_bytes=3 * per_person)
    for _ in range(2):
        for i in range(5):
            a, b = plain[i], cached[i]
            assert np.array_equal(a.extra["pixels"], b.extra["pixels"]) and np.array_equal(a.joints, b.joints)
            assert a.head_size == b.head_size and np.array_equal(a.visible, b.visible)
    assert sorted(cached._cache) == [0, 1, 2] and cached._cached_bytes == 3 * per_person
    assert cached[1] is cached[1] and cached[4] is not cached[4]
    with pytest.raises(ValueError, match="read-only"):
        cached[1].extra["pixels"][0, 0, 0] = 1
    # the dataset's items are the same cached or not, and do not share the cache's arrays
    a = PoseDataset(plain, 64, train=True, seed=1)[2]
    b = PoseDataset(cached, 64, train=True, seed=1)[2]
    for k in a:
        assert torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])), k
    b["joints"].add_(1)
    assert np.array_equal(cached[2].joints, plain[2].joints)
    with pytest.raises(ValueError, match="cache_bytes"):
        SyntheticPoses(5, 64, cache_bytes=-1)
