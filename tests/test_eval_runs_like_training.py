"""`fasthg eval` runs a checkpoint's model as training's validation does (issue 25: it ran
several times slower): the trainer's layout for the device and, on the CPU, glibc keeping
freed memory as `fasthg train` sets it. What is pinned is the setup, not a timing."""
import torch

from fasthg import checkpoint
from fasthg.cli import main
from fasthg.models import StackedHourglass
from fasthg.train.config import TrainConfig


def test_eval_runs_the_model_in_the_trainers_layout_with_freed_memory_kept(tmp_path, monkeypatch):
    from fasthg.bench import malloc
    from fasthg.cli import eval as eval_cli

    torch.manual_seed(0)
    path = str(tmp_path / "tiny.pt")
    checkpoint.save(path, StackedHourglass(1, 16, 16, 2, backend="eager"), input_size=64)
    kept, seen = [], {}
    monkeypatch.setattr(malloc, "keep_freed_memory", lambda: kept.append(True) or True)
    real_evaluate = eval_cli.evaluate

    def spy(run, dataset, **kw):
        module = run.model  # the torch runtime's (fasthg.deploy.runtimes.TorchRuntime)
        seen["weights"] = [p for p in module.parameters() if p.dim() == 4 and p.shape[-1] > 1]  # (1x1: both layouts)
        return real_evaluate(run, dataset, **kw)

    monkeypatch.setattr(eval_cli, "evaluate", spy)
    assert main(["eval", path, "--n", "2", "--device", "cpu", "--backend", "eager", "--no-fold", "--runtime",
                 "torch"]) == 0
    # The trainer's CPU default (TrainConfig.for_device("cpu")): channels_last weights.
    assert TrainConfig.for_device("cpu").channels_last
    assert seen["weights"] and all(w.is_contiguous(memory_format=torch.channels_last) and
                                   not w.is_contiguous() for w in seen["weights"])
    assert kept == [True]  # as `fasthg train` does on the CPU (fasthg.cli.train)
