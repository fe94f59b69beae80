"""The paper's experiments: the loss on every stack or the last only, every stack scored (the
log, curves, `fasthg eval --per-stack`, `--grid-stack`), the harder-joint mean, `--blocks`,
and `fasthg ablate` (its variants, parameter counts, table, figures, reading back and resuming)."""
import json
import os

import cv2
import numpy as np
import pytest
import torch
from test_cli_errors import fails, run
from test_evaluate_model import Oracle
from test_train import tiny

from fasthg import checkpoint
from fasthg.cli import main
from fasthg.data import MPII_JOINTS
from fasthg.data.dataset import PoseDataset
from fasthg.data.synthetic import SyntheticPoses
from fasthg.evaluate import HARDER, evaluate, pckh_table
from fasthg.train import Trainer
from fasthg.train import ablation
from fasthg.train.trainer import heatmap_loss


def test_the_harder_joints_mean_is_over_elbows_wrists_knees_ankles():
    rng = np.random.default_rng(0)
    acc, count = rng.random(16), rng.integers(1, 9, 16)
    joints = [MPII_JOINTS.index(f"{side}_{j}") for side in "rl" for j in ("elbow", "wrist", "knee", "ankle")]
    assert pckh_table(acc, count)["Hard"] == pytest.approx(100 * (acc[joints] * count[joints]).sum()
                                                           / count[joints].sum())
    assert set(HARDER) == {"Elbow", "Wrist", "Knee", "Ankle"}


class TwoStacks(Oracle):
    """Stack 1 sees nothing (zeros), stack 2 is the oracle."""

    def forward(self, images):
        right = super().forward(images)
        return torch.cat([torch.zeros_like(right), right], 1)


def test_every_stack_is_scored_and_the_table_is_the_last_ones():
    ds = PoseDataset(SyntheticPoses(8, 128, seed=4), input_size=128, train=False)
    table, res = evaluate(TwoStacks(ds), ds, batch_size=4, progress=False)
    assert res["pred_stacks"].shape == (8, 2, 16, 2) and np.array_equal(res["pred"], res["pred_stacks"][:, 1])
    first, last = res["stack_tables"]
    assert last == table and last["Mean"] == pytest.approx(100.0) and first["Mean"] < 20
    assert res["pckh_accuracy_stacks"].shape == (2, 16)


def _batch(trainer):
    items = [trainer.train_set[i] for i in range(4)]
    return {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in ("image", "heatmaps", "weights")}


def test_the_loss_is_every_stacks_or_the_last_ones(tmp_path):
    torch.manual_seed(0)
    every = Trainer(tiny(tmp_path / "a", stacks=2))
    torch.manual_seed(0)
    last = Trainer(tiny(tmp_path / "b", stacks=2, supervision="last"))
    b = _batch(every)
    with torch.no_grad():
        pred = every.model(b["image"])
        l_every = every._loss(b["image"], b["heatmaps"], b["weights"], None)
        l_last = last._loss(b["image"], b["heatmaps"], b["weights"], None)
    assert torch.allclose(l_every, heatmap_loss(pred, b["heatmaps"], b["weights"]))
    assert torch.allclose(l_last, heatmap_loss(pred[:, -1:], b["heatmaps"], b["weights"]))
    assert l_last < l_every
    with pytest.raises(ValueError, match="supervision must be one of all, last, got 'first'"):
        Trainer(tiny(tmp_path / "c", supervision="first"))


def test_the_log_and_curves_hold_every_stacks_scores(tmp_path, capsys):
    t = Trainer(tiny(tmp_path, stacks=2, epochs=1))
    t.fit()
    t.plot()
    row = json.loads(open(tmp_path / "log.jsonl").readline())
    for key in ("pckh_mean_stack1", "pckh_mean_stack2", "pckh_hard_stack1", "pckh_hard_stack2", "pckh_hard"):
        assert 0 <= row[key] <= 100, key
    assert row["pckh_mean"] == row["pckh_mean_stack2"] and row["pckh_hard"] == row["pckh_hard_stack2"]
    assert "by stack" in capsys.readouterr().out
    assert cv2.imread(str(tmp_path / "curves.png")) is not None


def _train_argv(out, *extra):
    return ["train", "--out", str(out), "--epochs", "1", "--train-size", "8", "--val-size", "4", "--batch-size", "4",
            "--input-size", "32", "--stacks", "2", "--features", "8", "--depth", "1", "--workers", "0",
            "--no-progress", "--device", "cpu", "--backend", "eager", *extra]


def test_train_blocks_and_supervision_flags_and_resume(tmp_path, capsys, monkeypatch):
    assert main(_train_argv(tmp_path / "r", "--blocks", "2", "--supervision", "last")) == 0
    state = checkpoint.read(str(tmp_path / "r" / "last.pt"))
    assert state["model_config"]["num_blocks"] == 2 and state["config"]["supervision"] == "last"
    status, err = run(capsys, ["train", "--resume", str(tmp_path / "r" / "last.pt"), "--blocks", "3", "--epochs", "2"],
                      monkeypatch)
    assert status == 1 and "cannot resume with these settings changed:\n  blocks: the checkpoint has 2, given 3" in err
    fails(capsys, monkeypatch, _train_argv(tmp_path / "s", "--supervision", "first"), 2, "--supervision")
    # --init adopts the checkpoint's blocks, and refuses another
    assert main(_train_argv(tmp_path / "i", "--init", str(tmp_path / "r" / "last.pt"))) == 0
    assert checkpoint.read(str(tmp_path / "i" / "last.pt"))["model_config"]["num_blocks"] == 2
    fails(capsys, monkeypatch, _train_argv(tmp_path / "j", "--init", str(tmp_path / "r" / "last.pt"), "--blocks",
                                           "1"), 1, "--blocks 1 (it has 2)")


def test_eval_per_stack_and_grid_stack(tmp_path, capsys, monkeypatch):
    assert main(_train_argv(tmp_path / "r")) == 0
    ckpt = str(tmp_path / "r" / "last.pt")
    capsys.readouterr()
    grid = str(tmp_path / "grid.png")
    argv = ["eval", ckpt, "--n", "4", "--device", "cpu", "--per-stack", "--grid", grid, "--grid-stack", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    table = out[out.index("of each stack's heatmaps"):].splitlines()
    assert table[1].startswith("stack |") and "Hard" in table[1]
    assert [line.split("|")[0].strip() for line in table[2:4]] == ["1", "2"]
    assert "each pair: stack 1, then stack 2" in out
    assert cv2.imread(grid).shape == (2 * 32, 4 * 32, 3)  # 4 people x 2 tiles, 4 a row
    fails(capsys, monkeypatch, argv[:-1] + ["3"], 2, "--grid-stack", "stacks 1 to 2, got 3")
    fails(capsys, monkeypatch, ["eval", ckpt, "--grid-stack", "1"], 2, "give --grid too")


# -- fasthg ablate -----------------------------------------------------------------------------------

def test_the_studies_variants():
    assert [v.name for v in ablation.variants(["supervision", "stacking"])] == \
        ["2x4-all", "2x4-last", "8x1-all", "8x1-last", "4x2-all"]
    assert [v.name for v in ablation.variants(["stacking"])] == ["2x4-all", "4x2-all", "8x1-all"]
    with pytest.raises(ValueError, match="studies must be some of supervision, stacking, got stack"):
        ablation.variants(["stack"])


@pytest.mark.parametrize("scale", ["paper", "cpu"])
def test_the_arrangements_have_about_equal_parameters(scale):
    from fasthg.train import TrainConfig

    cfg = TrainConfig() if scale == "paper" else TrainConfig.for_device("cpu", **ablation.CPU_SCALE)
    counts = [ablation.parameters(cfg, v) for v in ablation.STUDIES["stacking"]]
    assert max(counts) / min(counts) < 1.05, counts


def _tiny_ablation(out, *extra):
    return ["ablate", "--out", str(out), "--features", "8", "--input-size", "32", "--depth", "1", "--epochs", "1",
            "--train-size", "8", "--val-size", "4", "--batch-size", "4", "--workers", "0", "--device", "cpu",
            "--backend", "eager", "--no-progress", *extra]


def test_ablate_trains_every_variant_writes_the_table_and_figures_and_reads_back(tmp_path, capsys, monkeypatch):
    out = tmp_path / "ablate"
    assert main(_tiny_ablation(out)) == 0
    printed = capsys.readouterr().out
    result = json.load(open(out / "ablation.json"))
    names = [r["variant"] for r in result["variants"]]
    assert names == ["2x4-all", "2x4-last", "8x1-all", "8x1-last", "4x2-all"]
    for r in result["variants"]:
        assert len(r["stack_scores"]) == r["stacks"] and r["epochs"] == 1 and r["params"] > 0
        assert os.path.exists(out / r["variant"] / "last.pt")
    assert result["param_spread"] < 0.1 and "parameters: 2x4-all" in printed
    assert (out / "ablation.md").read_text().count("\n") == 2 + 5
    for png in ("supervision.png", "stacking.png"):
        assert cv2.imread(str(out / png)) is not None
    # run again: the finished variants are read back, nothing trains
    monkeypatch.setattr(Trainer, "fit", lambda self: pytest.fail("a finished variant trained again"))
    assert main(_tiny_ablation(out)) == 0
    assert json.load(open(out / "ablation.json"))["variants"] == result["variants"]


def test_variants_resume_for_more_epochs_and_after_an_interruption(tmp_path, capsys, monkeypatch):
    out = tmp_path / "ablate"
    assert main(_tiny_ablation(out, "--studies", "stacking")) == 0
    started = {}
    real_fit = Trainer.fit

    def fit(self):
        started[os.path.basename(self.cfg.out)] = self.epoch
        return real_fit(self)

    monkeypatch.setattr(Trainer, "fit", fit)
    assert main(_tiny_ablation(out, "--studies", "stacking", "--epochs", "2")) == 0
    assert started == {"2x4-all": 1, "4x2-all": 1, "8x1-all": 1}  # each from its last.pt
    rows = {r["variant"]: r for r in json.load(open(out / "ablation.json"))["variants"]}
    assert [rows[n]["epochs"] for n in ("2x4-all", "4x2-all", "8x1-all")] == [2, 2, 2]
    # a signal in a variant's first epoch: it checkpoints, the command stops (130) and no table is written
    monkeypatch.setattr(Trainer, "fit", real_fit)
    monkeypatch.setattr(Trainer, "_train_epoch", lambda self: (False, 1))
    os.remove(out / "ablation.json")
    status = main(_tiny_ablation(out, "--studies", "stacking", "--epochs", "3"))
    assert status == 130 and "2x4-all stopped by a signal" in capsys.readouterr().err
    assert not (out / "ablation.json").exists()


def test_ablate_refuses_an_unknown_study(tmp_path, capsys, monkeypatch):
    fails(capsys, monkeypatch, _tiny_ablation(tmp_path, "--studies", "depth"), 1, "studies must be some of")
