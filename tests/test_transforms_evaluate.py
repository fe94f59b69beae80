"""Crops, targets, decoding and PCKh, on cases worked out by hand."""
import numpy as np
import pytest
import torch

from fasthg.data import MPII_FLIP_PAIRS
from fasthg.data.transforms import (affine_matrix, gaussian_heatmaps, swap_pairs, to_heatmap_coords,
                                    transform_points, warp)
from fasthg.data.records import COCO_SIGMAS
from fasthg.evaluate import decode_heatmaps, flip_back, oks, oks_table, pckh, pckh_table, to_image_coords


def test_affine_matrix_by_hand():
    # scale 1 = a 200 px box; into 100 px: zoom 0.5. The centre lands on the crop's centre.
    m = affine_matrix((300, 200), 1.0, 0, 100)
    np.testing.assert_allclose(transform_points([[300, 200], [400, 200], [300, 100]], m),
                               [[49.5, 49.5], [99.5, 49.5], [49.5, -0.5]])
    # 90 degrees counter-clockwise on screen: right of centre goes up.
    m = affine_matrix((300, 200), 1.0, 90, 100)
    np.testing.assert_allclose(transform_points([[400, 200]], m), [[49.5, -0.5]], atol=1e-9)
    # flip: left and right exchange around the crop's centre.
    m = affine_matrix((300, 200), 1.0, 0, 100, flip=True)
    np.testing.assert_allclose(transform_points([[400, 200], [250, 220]], m), [[-0.5, 49.5], [74.5, 59.5]])


def test_warp_moves_pixels_where_the_matrix_moves_points():
    image = np.zeros((300, 400, 3), np.uint8)
    image[180:183, 250:253] = 255  # a dot centred on (251, 181)
    m = affine_matrix((240, 170), 0.35, 25, 64, flip=True)  # zoom ~0.9: the dot stays a dot
    crop = warp(image, m, 64)[..., 0].astype(np.float64)
    ys, xs = np.nonzero(crop > 0)
    w = crop[ys, xs]
    found = np.array([(xs * w).sum() / w.sum(), (ys * w).sum() / w.sum()])
    np.testing.assert_allclose(found, transform_points([[251, 181]], m)[0], atol=0.3)


def test_swap_pairs():
    v = np.arange(16)
    s = swap_pairs(v, MPII_FLIP_PAIRS)
    assert list(s[:6]) == [5, 4, 3, 2, 1, 0] and list(s[10:]) == [15, 14, 13, 12, 11, 10] and list(s[6:10]) == [6, 7, 8, 9]


def test_gaussian_heatmaps_and_weights():
    joints = np.array([[3.0, 2.0], [10.0, 1.0], [4.0, 4.0], [-1.0, 2.0]])
    maps, weights = gaussian_heatmaps(joints, np.array([1, 1, 0, 1]), 6, 8, sigma=1.0)
    assert maps.shape == (4, 6, 8)
    np.testing.assert_array_equal(weights, [1, 0, 0, 0])  # outside (x=10 >= 8), not annotated, outside (x<0)
    assert maps[0, 2, 3] == 1.0 and maps[0].argmax() == 2 * 8 + 3
    assert maps[0, 2, 4] == pytest.approx(np.exp(-0.5))
    assert not maps[1:].any()


def test_decode_quarter_pixel_step_by_hand():
    maps, _ = gaussian_heatmaps(np.array([[10.3, 7.0], [0.0, 5.0]]), np.ones(2), 16, 16, sigma=1.0)
    pos, peak = decode_heatmaps(maps[None])
    # joint 0: argmax (10, 7); right neighbour higher -> +0.25 in x; y symmetric -> no step.
    # joint 1: on the border in x: no step there.
    np.testing.assert_allclose(pos[0], [[10.25, 7.0], [0.0, 5.0]])
    assert peak[0, 1] == pytest.approx(1.0)


def test_crop_heatmap_round_trip_to_image_coords():
    rng = np.random.default_rng(0)
    joints = rng.uniform(100, 300, size=(16, 2))
    m = affine_matrix((200, 200), 1.3, -20, 256, flip=True)
    hm = to_heatmap_coords(transform_points(joints, m), 4)
    np.testing.assert_allclose(to_image_coords(hm[None], m[None], 4)[0], joints, atol=1e-9)


def test_flip_back_is_the_heatmap_of_the_flipped_crop():
    rng = np.random.default_rng(1)
    joints = rng.uniform(20, 230, size=(16, 2))
    center, scale, size, stride = (128, 128), 1.28, 256, 4
    plain = to_heatmap_coords(transform_points(joints, affine_matrix(center, scale, 0, size)), stride)
    flipped = to_heatmap_coords(transform_points(joints, affine_matrix(center, scale, 0, size, flip=True)), stride)
    maps, _ = gaussian_heatmaps(plain, np.ones(16), 64, 64, 1.0)
    maps_flipped, _ = gaussian_heatmaps(swap_pairs(flipped, MPII_FLIP_PAIRS), np.ones(16), 64, 64, 1.0)
    torch.testing.assert_close(flip_back(torch.from_numpy(maps_flipped), MPII_FLIP_PAIRS), torch.from_numpy(maps))


def test_pckh_by_hand():
    gt = np.zeros((2, 16, 2))
    pred = np.zeros((2, 16, 2))
    visible = np.ones((2, 16))
    head = np.array([10.0, 20.0])
    pred[0, 0] = [4, 3]    # distance 5 = 0.5 x 10: counts (<=)
    pred[0, 1] = [6, 0]    # 0.6 x 10: miss
    pred[1, 0] = [12, 0]   # 0.6 x 20: miss
    pred[1, 1] = [0, 9]    # 0.45 x 20: hit
    visible[1, 2] = 0
    pred[1, 2] = [100, 0]  # not annotated: ignored
    acc, count = pckh(pred, gt, visible, head)
    assert acc[0] == 0.5 and acc[1] == 0.5 and acc[2] == 1.0 and count[2] == 1 and acc[3] == 1.0
    table = pckh_table(acc, count)
    assert table["Ankle"] == pytest.approx(100 * (1 + 2) / 4)  # joints 0 and 5: 1 of 2 hits, 2 of 2
    # Mean over the 14 table joints' 27 annotations, 2 of them missed.
    assert table["Mean"] == pytest.approx(100 * 25 / 27)
    assert pckh(pred, gt, visible, head, threshold=0.7)[0][0] == 1.0


def test_pckh_needs_head_sizes():
    with pytest.raises(ValueError, match="head size"):
        pckh(np.zeros((1, 16, 2)), np.zeros((1, 16, 2)), np.ones((1, 16)), np.zeros(1))


def test_oks_by_hand():
    gt = np.zeros((3, 17, 2))
    pred = np.zeros((3, 17, 2))
    visible = np.zeros((3, 17))
    visible[0, [0, 5]] = 1
    pred[0, 5] = [3, 4]      # d^2 = 25 on the left shoulder; the nose exact
    pred[0, 6] = [100, 0]    # not annotated: ignored
    visible[1, 0] = 1        # exact: 1
    area = np.array([50.0, 10.0, 0.0])  # person 2 has nothing annotated: no area needed
    got = oks(pred, gt, visible, area)
    k2 = (2 * COCO_SIGMAS[5]) ** 2
    assert got[0] == pytest.approx((1 + np.exp(-25 / (2 * 50 * k2))) / 2)
    assert got[1] == 1.0 and np.isnan(got[2])
    with pytest.raises(ValueError, match="positive area"):
        oks(pred, gt, visible, np.array([50.0, 0.0, 0.0]))


def test_oks_ap_by_hand():
    # Thresholds 0.50, 0.55, ..., 0.95; precision read at recall 0, 0.01, ..., 1.
    assert oks_table(np.ones(4), np.arange(4.0)) == {"AP": 100.0, "AP50": 100.0, "AP75": 100.0}
    # 0.91 passes the thresholds up to 0.90, 0.62 those up to 0.60. Ranked first (score 1),
    # 0.91 alone above a threshold gives precision 1 up to recall 0.5: 51 of 101 points.
    table = oks_table(np.array([0.91, 0.62, np.nan]), np.array([1.0, 0.5, 9.0]))
    assert table["AP50"] == pytest.approx(100.0) and table["AP75"] == pytest.approx(100 * 51 / 101)
    assert table["AP"] == pytest.approx(100 * (3 + 6 * 51 / 101) / 10)
    # Ranked second, its precision is 1/2 at recall 0.5.
    swapped = oks_table(np.array([0.91, 0.62]), np.array([0.5, 1.0]))
    assert swapped["AP50"] == pytest.approx(100.0) and swapped["AP75"] == pytest.approx(50 * 51 / 101)
    assert oks_table(np.array([0.3]), np.array([1.0]))["AP"] == 0.0


def test_per_joint_table_names_every_joint():
    from fasthg.evaluate import per_joint_table

    text = per_joint_table(np.array([0.5, np.nan, 1.0]), np.array([4, 0, 2]), ["r_ankle", "pelvis", "l_wrist"])
    assert text.splitlines() == ["joint       PCKh  annotated",
                                 "r_ankle    50.00          4",
                                 "pelvis         -          0",
                                 "l_wrist   100.00          2"]
