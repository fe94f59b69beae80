"""The package as a user imports it: the names the README gives, and one table of defaults."""
import dataclasses

import fasthg


def test_the_data_names_the_readme_gives_import_from_fasthg_data():
    from fasthg.data import (EpochSampler, PoseDataset, SyntheticPoses, load_coco_keypoints,  # noqa: F401
                             load_image, load_mpii_h5, load_mpii_json)

    ds = PoseDataset(SyntheticPoses(2, 64), input_size=64, train=False)
    assert ds[0]["image"].shape == (3, 64, 64)


def test_one_table_of_device_defaults():
    from fasthg.train import DEVICE_DEFAULTS, TrainConfig, device_defaults

    gpu, cpu = device_defaults("cuda"), device_defaults("cpu")
    assert set(gpu) == set(cpu) == set(DEVICE_DEFAULTS)
    plain = TrainConfig()
    assert all(getattr(plain, k) == v for k, v in gpu.items()), "TrainConfig's defaults are the GPU column"
    on_cpu = TrainConfig.for_device("cpu", epochs=3)
    assert on_cpu.epochs == 3 and all(getattr(on_cpu, k) == v for k, v in cpu.items() if k != "epochs")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(DEVICE_DEFAULTS) <= names


def test_the_top_level_holds_few_loose_modules():
    import os

    root = os.path.dirname(fasthg.__file__)
    loose = sorted(f for f in os.listdir(root) if f.endswith(".py") and not f.startswith("_"))
    # safe_load.py: the one reader of torch files, below both checkpoint.py and models/convert.py
    assert loose == ["checkpoint.py", "device.py", "draw.py", "evaluate.py", "safe_load.py"], loose
