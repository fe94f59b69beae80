"""The training loop behind `fasthg train`: a StackedHourglass with intermediate supervision,
on synthetic people by default or MPII files, evaluated (PCKh) every epoch.

Never lose work: checkpoints are atomic (fasthg.checkpoint) and written at every epoch's end
and on SIGINT/SIGTERM (then the run stops); `resume` restores model, optimizer, scheduler,
scaler, epoch, step within the epoch, RNG states and the data order, so an interrupted and
resumed run ends with the weights of an uninterrupted one. A non-finite loss stops the run
with a message naming the step; the last good checkpoint stays.
"""
import dataclasses
import json
import math
import os
import random
import signal
import time
from typing import Dict, List, Optional

import numpy as np
import torch
from tqdm import tqdm

from fasthg import checkpoint
from fasthg.data.dataset import PoseDataset
from fasthg.data.synthetic import SyntheticPoses
from fasthg.evaluate import evaluate
from fasthg.models import StackedHourglass


@dataclasses.dataclass
class TrainConfig:
    out: str = "runs/train"
    stacks: int = 2
    features: int = 256
    depth: int = 4
    input_size: int = 256
    sigma: Optional[float] = None        # heatmap Gaussian std in output pixels (None: output/64)
    backend: str = "auto"
    epochs: int = 10
    batch_size: int = 16
    accumulate: int = 1                  # optimizer step every `accumulate` batches
    optimizer: str = "rmsprop"           # the paper's; or "adam"
    lr: float = 2.5e-4
    lr_drops: tuple = ()                 # epochs at which the learning rate is multiplied by lr_gamma
    lr_gamma: float = 0.1
    train_size: int = 20000              # synthetic people per epoch
    val_size: int = 500
    mpii_h5_train: Optional[str] = None
    mpii_h5_valid: Optional[str] = None
    images: Optional[str] = None
    workers: int = 2
    seed: int = 0
    device: str = "auto"
    amp: str = "none"                    # none, bf16, fp16 (fp16: CUDA, with a grad scaler)
    channels_last: bool = False
    compile: bool = False
    flip_test: bool = False
    tensorboard: bool = False
    progress: bool = True


def heatmap_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sum over stacks of the masked squared error, 0.5 * sum over each heatmap's pixels,
    averaged over people and joints. (A mean over pixels makes gradients so small that
    Adam's epsilon swallows them.) pred [B, S, J, h, w]; target [B, J, h, w]; weights [B, J]."""
    err = (pred.float() - target[:, None]) ** 2 * weights[:, None, :, None, None]
    return 0.5 * err.sum((3, 4)).mean((0, 2)).sum()


class _EpochSampler(torch.utils.data.Sampler):
    """A permutation that depends only on (seed, epoch), from a given position: the data order
    of a resumed run is the uninterrupted run's."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.start = n, seed, 0, 0

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g)[self.start:].tolist())

    def __len__(self):
        return self.n - self.start


class Trainer:
    def __init__(self, cfg: TrainConfig):
        if cfg.amp not in ("none", "bf16", "fp16"):
            raise ValueError(f"amp must be none, bf16 or fp16, got {cfg.amp!r}")
        if cfg.optimizer not in ("rmsprop", "adam"):
            raise ValueError(f"optimizer must be rmsprop or adam, got {cfg.optimizer!r}")
        if cfg.accumulate < 1 or cfg.batch_size < 1 or cfg.epochs < 1:
            raise ValueError("epochs, batch_size and accumulate must be positive")
        self.cfg = cfg
        self.device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                                   ("cpu" if cfg.device == "auto" else cfg.device))
        if cfg.amp == "fp16" and self.device.type != "cuda":
            raise ValueError("amp=fp16 needs a CUDA device (on the CPU use bf16)")
        self._seed_everything(cfg.seed)
        self.model = StackedHourglass(cfg.stacks, cfg.features, 16, cfg.depth, backend=cfg.backend).to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.step_model = torch.compile(self.model) if cfg.compile else self.model
        params = self.model.parameters()
        self.optimizer = (torch.optim.RMSprop(params, lr=cfg.lr) if cfg.optimizer == "rmsprop"
                          else torch.optim.Adam(params, lr=cfg.lr))
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, list(cfg.lr_drops), cfg.lr_gamma)
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp == "fp16")
        train_src, val_src = self._sources()
        self.train_set = PoseDataset(train_src, cfg.input_size, train=True, seed=cfg.seed, sigma=cfg.sigma)
        self.val_set = PoseDataset(val_src, cfg.input_size, train=False, sigma=cfg.sigma)
        self.sampler = _EpochSampler(len(self.train_set), cfg.seed)
        self.epoch, self.best, self.history = 0, -1.0, []
        self._stop = False
        self.log_path = os.path.join(cfg.out, "log.jsonl")

    def _sources(self):
        c = self.cfg
        if c.mpii_h5_train:
            from fasthg.data.mpii import load_mpii_h5
            if not (c.mpii_h5_valid and c.images):
                raise ValueError("MPII training needs mpii_h5_valid (for PCKh) and images")
            return load_mpii_h5(c.mpii_h5_train, c.images), load_mpii_h5(c.mpii_h5_valid, c.images)
        # Training and validation people come from different seeds: validation is held out.
        return (SyntheticPoses(c.train_size, c.input_size, seed=c.seed + 1),
                SyntheticPoses(c.val_size, c.input_size, seed=10_000_019 + c.seed))

    @staticmethod
    def _seed_everything(seed: int):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    # -- checkpoints ---------------------------------------------------------------------
    def _state(self, step_in_epoch: int) -> Dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "epoch": self.epoch, "step_in_epoch": step_in_epoch,
                "best": self.best, "history": self.history, "config": dataclasses.asdict(self.cfg),
                "input_size": self.cfg.input_size,
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}}

    def save(self, path: str, step_in_epoch: int = 0):
        checkpoint.save(path, self.model, **self._state(step_in_epoch))

    def resume(self, path: str):
        state = checkpoint.read(path)
        checkpoint.load_model(path, model=self.model)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.best, self.history = state["epoch"], state["best"], state["history"]
        self.sampler.start = state["step_in_epoch"] * self.cfg.batch_size
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    # -- the loop ------------------------------------------------------------------------
    def _on_signal(self, signum, frame):
        self._stop = True  # finish the step in flight, checkpoint, stop

    def fit(self) -> List[Dict]:
        cfg = self.cfg
        os.makedirs(cfg.out, exist_ok=True)
        last = os.path.join(cfg.out, "last.pt")
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        writer = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(os.path.join(cfg.out, "tensorboard"))
        try:
            while self.epoch < cfg.epochs:
                finished, step = self._train_epoch()
                if not finished:
                    self.save(last, step)
                    print(f"stopped by a signal at epoch {self.epoch} step {step}; resume from {last}")
                    return self.history
                table, _ = evaluate(self.model, self.val_set, batch_size=cfg.batch_size, flip_test=cfg.flip_test,
                                    progress=False)
                self._record(table, writer)
                self.epoch += 1
                self.scheduler.step()
                self.sampler.start = 0
                self.save(last)
                if table["Mean"] > self.best:
                    self.best = table["Mean"]
                    self.save(os.path.join(cfg.out, "best.pt"))
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
            if writer:
                writer.close()
        self.plot()
        return self.history

    def _train_epoch(self):
        cfg = self.cfg
        self.train_set.set_epoch(self.epoch)
        self.sampler.epoch = self.epoch
        first = self.sampler.start // cfg.batch_size
        loader = torch.utils.data.DataLoader(self.train_set, batch_size=cfg.batch_size, sampler=self.sampler,
                                             num_workers=cfg.workers, drop_last=True,
                                             pin_memory=self.device.type == "cuda")
        self.model.train()
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
        bar = tqdm(loader, desc=f"epoch {self.epoch + 1}/{cfg.epochs}", disable=not cfg.progress,
                   initial=first, total=first + len(loader), unit="batch")
        t0, seen, losses = time.time(), 0, []
        step = first
        for step, batch in enumerate(bar, start=first):
            images = batch["image"].to(self.device, non_blocking=True)
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                pred = self.step_model(images)
            loss = heatmap_loss(pred, batch["heatmaps"].to(self.device), batch["weights"].to(self.device))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss ({loss.item()}) at epoch {self.epoch} step {step}; "
                                         f"the last good checkpoint is in {cfg.out}")
            self.scaler.scale(loss / cfg.accumulate).backward()
            if (step + 1) % cfg.accumulate == 0:
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            seen += len(images)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", img_s=f"{seen / (time.time() - t0):.1f}")
            # Stop only between optimizer steps: a resumed run cannot rebuild half-accumulated grads.
            if self._stop and (step + 1) % cfg.accumulate == 0:
                return False, step + 1
        self._last_epoch = {"loss": float(np.mean(losses)) if losses else math.nan,
                            "images_per_s": seen / max(time.time() - t0, 1e-9)}
        return True, step + 1

    def _record(self, table: Dict[str, float], writer):
        row = {"epoch": self.epoch + 1, **self._last_epoch, "lr": self.optimizer.param_groups[0]["lr"],
               **{f"pckh_{k.lower()}": v for k, v in table.items()}}
        self.history.append(row)
        with open(self.log_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if writer:
            for k, v in row.items():
                if k != "epoch":
                    writer.add_scalar(k, v, row["epoch"])
        print(f"epoch {row['epoch']}: loss {row['loss']:.4f}, {row['images_per_s']:.1f} img/s, "
              f"PCKh@0.5 mean {table['Mean']:.1f}%")

    def plot(self):
        """PNG of the loss and PCKh curves (needs matplotlib)."""
        if not self.history:
            return
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        ep = [r["epoch"] for r in self.history]
        fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
        a.plot(ep, [r["loss"] for r in self.history], marker="o")
        a.set(xlabel="epoch", ylabel="training loss", yscale="log")
        b.plot(ep, [r["pckh_mean"] for r in self.history], marker="o", color="tab:green")
        b.set(xlabel="epoch", ylabel="validation PCKh@0.5 mean (%)", ylim=(0, 100))
        fig.tight_layout()
        fig.savefig(os.path.join(self.cfg.out, "curves.png"), dpi=110)
        plt.close(fig)
