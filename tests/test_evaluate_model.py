"""evaluate(): an oracle 'model' that outputs the targets scores 100%, a blind one less;
with the flip test, an oracle that also knows the mirrored images still scores 100%, and
only when left and right are swapped back correctly."""
import numpy as np
import pytest
import torch

from fasthg.data.dataset import PoseDataset
from fasthg.data.synthetic import SyntheticPoses
from fasthg.data import MPII_FLIP_PAIRS
from fasthg.evaluate import evaluate, flip_back, predict_dataset


class Oracle(torch.nn.Module):
    """Returns the dataset's target heatmaps for the images it is given (looked up by
    content), as a 1-stack model would."""

    def __init__(self, dataset):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.items = [dataset[i] for i in range(len(dataset))]

    def forward(self, images):
        out = []
        for img in images:
            hit = [it["heatmaps"] for it in self.items if torch.equal(it["image"], img)]
            # a mirrored input: the heatmaps of the mirrored crop (left and right swapped)
            hit += [flip_back(it["heatmaps"], MPII_FLIP_PAIRS) for it in self.items
                    if torch.equal(it["image"].flip(-1), img)]
            out.append(hit[0] if hit else torch.zeros_like(self.items[0]["heatmaps"]))
        return torch.stack(out)[:, None]


def test_oracle_scores_100_and_blind_model_does_not():
    ds = PoseDataset(SyntheticPoses(10, 128, seed=4), input_size=128, train=False)
    table, res = evaluate(Oracle(ds), ds, batch_size=4, progress=False)
    assert table["Mean"] == pytest.approx(100.0)
    assert res["pred"].shape == (10, 16, 2) and list(res["index"]) == list(range(10))

    class Blind(Oracle):
        def forward(self, images):
            return torch.zeros(len(images), 1, 16, 32, 32)

    blind, _ = evaluate(Blind(ds), ds, batch_size=4, progress=False)
    assert blind["Mean"] < 20


def test_evaluation_needs_an_eval_dataset():
    ds = PoseDataset(SyntheticPoses(2, 64), input_size=64, train=True)
    with pytest.raises(ValueError, match="evaluation dataset"):
        predict_dataset(Oracle(ds), ds)


def test_flip_test_swaps_left_and_right_back():
    ds = PoseDataset(SyntheticPoses(10, 128, seed=6), input_size=128, train=False)
    table, res = evaluate(Oracle(ds), ds, batch_size=4, flip_test=True, progress=False)
    assert table["Mean"] == pytest.approx(100.0) and np.isfinite(res["pred"]).all()
    wrong = PoseDataset(SyntheticPoses(10, 128, seed=6), input_size=128, train=False, flip_pairs=())
    assert evaluate(Oracle(wrong), wrong, batch_size=4, flip_test=True, progress=False)[0]["Mean"] < 95
