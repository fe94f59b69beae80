"""The data pipeline's samples/s (synthetic people: draw, crop, augment, targets), through a
DataLoader with 0 and 2 workers: what the GPU can be fed. extra_info.samples_per_s."""
import pytest
import torch

from conftest import note_rate
from fasthg.data.dataset import PoseDataset
from fasthg.data.synthetic import SyntheticPoses

BATCH = 16


@pytest.mark.parametrize("input_size", [128, 256])
@pytest.mark.parametrize("workers", [0, 2])
def test_pipeline(benchmark, input_size, workers):
    benchmark.group = f"data pipeline {input_size}x{input_size}"
    ds = PoseDataset(SyntheticPoses(BATCH * 8, input_size), input_size=input_size, train=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=BATCH, num_workers=workers, persistent_workers=workers > 0)

    def one_pass():  # whole passes: a per-batch time would count prefetched batches as free
        for _ in loader:
            pass

    benchmark.pedantic(one_pass, rounds=3, warmup_rounds=1)
    note_rate(benchmark, "samples_per_s", len(ds), 1)
