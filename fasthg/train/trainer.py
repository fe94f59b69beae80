"""The training loop behind `fasthg train`: a StackedHourglass with intermediate supervision,
on synthetic people by default, MPII files or COCO files, evaluated every epoch (PCKh; OKS AP
for COCO's 17 joints).

Never lose work: checkpoints are atomic (fasthg.checkpoint) and written at every epoch's end
and on SIGINT/SIGTERM (then the run stops); `resume` restores model, optimizer, scheduler,
scaler, epoch, step within the epoch, RNG states and the data order, so an interrupted and
resumed run ends with the weights of an uninterrupted one, and logs the same losses (a
checkpoint within an epoch carries the epoch's sums so far). Settings given again on resume
take effect (the learning rate and its schedule, epochs, batch size at an epoch's end, ...);
those a run cannot change mid-way are refused (fasthg.train.config.check_resume_changes).
A non-finite loss stops the run with a message naming the step; the last good checkpoint
stays. Messages count epochs and steps from 1, as the log and the progress bar do.

The host waits for the device only every `check_every` steps (and at an epoch's end, and
before a checkpoint on a signal): the steps' losses stay on the device until then, when one
copy brings them over to be summed for the log, checked for the first non-finite one, and
shown in the progress bar.

Data-parallel under torchrun (`torchrun --nproc_per_node N -m fasthg train`): each process
trains on batch_size people of every global batch of N * batch_size (one permutation per
epoch, sliced by rank), DDP averages the gradients, `sync_bn` merges the BN-ReLU statistics
across processes; only rank 0 evaluates, logs and writes checkpoints. With sync_bn, N
processes follow the same trajectory as one process with the global batch.
"""
import contextlib
import dataclasses
import gc
import json
import math
import os
import random
import signal
import time
import warnings
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from fasthg import checkpoint
from fasthg.data.dataset import PoseDataset
from fasthg.data.records import COCO_JOINTS, MPII_JOINTS, joint_conventions
from fasthg.data.sampler import EpochSampler
from fasthg.data.sources import sources
from fasthg.data.synthetic import SyntheticPoses
from fasthg.device import resolve as resolve_device
from fasthg.evaluate import METRICS, evaluate
from fasthg.draw import plot_training_curves
from fasthg.models import StackedHourglass
from fasthg.train.config import AMP_MODES, TrainConfig, check_resume_changes, metric_of, resolve_amp, resume_changes
from fasthg.train.init import init_model

# The settings that make the learning-rate schedule.
_SCHEDULE = ("lr", "lr_drops", "lr_gamma")
# An epoch's running sums over all processes, carried in a checkpoint written within it.
# data_seconds and step_seconds: this process's wait for the loader and time in the steps.
# skipped: people whose bad image SkipBadImages (bad_images "skip") passed over.
_NO_SUMS = {"loss_sum": 0.0, "steps": 0, "images": 0, "seconds": 0.0, "data_seconds": 0.0, "step_seconds": 0.0,
            "skipped": 0}


# Where the loss applies: every stack's heatmaps (intermediate supervision), or the last one's.
SUPERVISION = ("all", "last")


def heatmap_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sum over stacks of the masked squared error, 0.5 * sum over each heatmap's pixels,
    averaged over people and joints. (A mean over pixels makes gradients so small that
    Adam's epsilon swallows them.) pred [B, S, J, h, w]; target [B, J, h, w]; weights [B, J]."""
    err = (pred.float() - target[:, None]) ** 2 * weights[:, None, :, None, None]
    return 0.5 * err.sum((3, 4)).mean((0, 2)).sum()


def time_split(row: Dict) -> str:
    """Where an epoch's wall time (a log row's train_s + val_s) went, for a person: "data 1.2 s
    (2%), step 50.3 s (90%), validation 4.1 s (7%)"; the rest is the loader's start-up."""
    parts = [(name, row[key]) for name, key in (("data", "data_s"), ("step", "step_s"), ("validation", "val_s"))]
    total = max(row["train_s"] + row["val_s"], 1e-9)
    return ", ".join(f"{name} {v:.1f} s ({100 * v / total:.0f}%)" for name, v in parts)


def rng_state() -> Dict:
    """The random streams' states as plain data (tensors, numbers, tuples), which the safe
    loader reads: numpy's MT19937 state as a dict of its key tensor and counters."""
    kind, key, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": {"bit_generator": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(rng: Dict) -> None:
    """Restores rng_state()'s streams; numpy's also from the tuple of np.random.get_state()
    that fasthg's checkpoints held before (read safely: fasthg.safe_load allows numpy arrays)."""
    torch.set_rng_state(rng["torch"])
    numpy_state = rng["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state = (numpy_state["bit_generator"], numpy_state["key"].numpy().astype(np.uint32), numpy_state["pos"],
                       numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    np.random.set_state(numpy_state)
    random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def optimizer_options(name: str, device: torch.device, cuda_graphs: bool = False) -> Dict:
    """Keyword arguments of the torch.optim optimizer `name` on `device`. On the CPU torch's
    default runs a loop of small ops per parameter: Adam and SGD take torch's fused CPU kernel
    (one pass per parameter, as the loop's math: the default run's Adam step 6.6 -> 1.8 ms,
    HISTORY.md), RMSprop, which has none, the foreach loop. On a GPU torch's defaults, and
    capturable Adam and RMSprop for CUDA graphs (SGD keeps no state that needs it)."""
    if device.type == "cpu":
        return dict(fused=True) if name in ("adam", "sgd") else dict(foreach=True)
    return dict(capturable=True) if cuda_graphs and name != "sgd" else {}


def _torchrun_env():
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) for a plain process."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))


class Trainer:
    def __init__(self, cfg: TrainConfig, model_config: Optional[dict] = None, trust_checkpoint: bool = False):
        """`model_config`: the model to build, a checkpoint's (resume's: what TrainConfig does
        not hold, a stem or input_norm, comes with it); default: cfg's shape, or with cfg.init
        that checkpoint's model and weights (fasthg.train.init). `trust_checkpoint`: read
        cfg.init by full unpickling instead of safely (fasthg.safe_load; only for a file you trust)."""
        if cfg.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {', '.join(AMP_MODES)}, got {cfg.amp!r}")
        if cfg.minutes is not None and not cfg.minutes > 0:
            raise ValueError(f"minutes must be positive, got {cfg.minutes!r}")
        if cfg.supervision not in SUPERVISION:
            raise ValueError(f"supervision must be one of {', '.join(SUPERVISION)}, got {cfg.supervision!r}")
        if cfg.optimizer not in ("rmsprop", "adam", "sgd"):
            raise ValueError(f"optimizer must be rmsprop, adam or sgd, got {cfg.optimizer!r}")
        if min(cfg.accumulate, cfg.batch_size, cfg.epochs, cfg.check_every) < 1:
            raise ValueError("epochs, batch_size, accumulate and check_every must be positive")
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.rank, self.world, local_rank = _torchrun_env()
        if cfg.cuda_graphs and (self.device.type != "cuda" or cfg.amp == "fp16" or cfg.accumulate != 1
                                or cfg.compile or self.world > 1):
            raise ValueError("cuda_graphs needs a CUDA device, one process, accumulate=1, no compile (use "
                             "compile alone for its own graphs) and amp none or bf16 (fp16's grad scaler "
                             "checks on the host)")
        self._owns_group = False
        if self.world > 1:
            if self.device.type == "cuda":
                self.device = torch.device("cuda", local_rank)
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
                self._owns_group = True
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.amp = resolve_amp(cfg.amp, self.device)
        if cfg.amp == "fp16" and self.device.type != "cuda":
            raise ValueError("amp=fp16 needs a CUDA device (on the CPU use bf16)")
        self._seed_everything(cfg.seed)
        # COCO: 17 joints, and no head boxes, so OKS AP instead of PCKh (fasthg.evaluate.METRICS).
        self.metric = metric_of(cfg)
        joints = len(COCO_JOINTS) if self.metric == "oks" else len(MPII_JOINTS)
        self.flip_pairs, _ = joint_conventions(joints)
        if model_config is not None:  # resuming: the checkpoint's model, whose weights resume() loads
            self.model = StackedHourglass(**model_config, backend=cfg.backend, memory=cfg.memory)
        elif cfg.init:
            self.model = init_model(cfg, joints, trust=trust_checkpoint)
        else:
            self.model = StackedHourglass(cfg.stacks, cfg.features, joints, cfg.depth, backend=cfg.backend,
                                          memory=cfg.memory, num_blocks=cfg.blocks)
        self.model = self.model.to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.step_model = self.model
        if self.world > 1:
            if cfg.sync_bn:
                from fasthg.nn import convert_sync_bn_relu
                convert_sync_bn_relu(self.model)
            self.step_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.compile:
            self.step_model = torch.compile(self.step_model)
        params = self.model.parameters()
        self._optimizer_options = optimizer_options(cfg.optimizer, self.device, cfg.cuda_graphs)
        fast = self._optimizer_options
        self.optimizer = {"rmsprop": lambda: torch.optim.RMSprop(params, lr=cfg.lr, **fast),
                          "adam": lambda: torch.optim.Adam(params, lr=cfg.lr, **fast),
                          "sgd": lambda: torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, **fast)}[cfg.optimizer]()
        self.scheduler = self._new_scheduler()
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp == "fp16")
        train_src, val_src = sources(cfg)
        # Synthetic people tell left from right by colour (warm right limbs): a mirrored one is
        # not a synthetic person, so flip augmentation would teach the net that colour means nothing.
        self.train_set = PoseDataset(train_src, cfg.input_size, train=True, seed=cfg.seed, sigma=cfg.sigma,
                                     flip=not isinstance(train_src, SyntheticPoses), flip_pairs=self.flip_pairs)
        self.val_set = PoseDataset(val_src, cfg.input_size, train=False, sigma=cfg.sigma, flip_pairs=self.flip_pairs)
        self.sampler = EpochSampler(len(self.train_set), cfg.seed, cfg.batch_size, self.rank, self.world)
        if self.sampler.steps < 1:
            raise ValueError(f"{len(self.train_set)} training people make no batch of {cfg.batch_size} x "
                             f"{self.world} processes")
        self.epoch, self.best, self.history = 0, -1.0, []
        self._epoch_sums = dict(_NO_SUMS)  # of the epoch's steps before a checkpoint in it (all processes')
        self._run = {"images": 0, "seconds": 0.0, "wall": 0.0, "epochs": 0}  # what fit() trained in this process
        self._stopped = None  # (epoch, step in it) where a signal or the time budget stopped fit()
        self._stop = False
        self._fit_start = None  # time.time() at the start of the fit() in progress
        self._deadline = None  # time.time() at which cfg.minutes runs out
        self._out_of_time = False  # whether the budget (not a signal) stopped fit()
        self._elapsed = 0.0  # wall seconds of the run's fit() calls before this one (resume carries it)
        self._graph = None  # (CUDAGraph, static inputs, static loss, the lr it was captured with)
        self.log_path = os.path.join(cfg.out, "log.jsonl")

    def _new_scheduler(self):
        return torch.optim.lr_scheduler.MultiStepLR(self.optimizer, list(self.cfg.lr_drops), self.cfg.lr_gamma)

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
                "epoch_sums": self._epoch_sums, "elapsed": self._elapsed_now(),
                "input_size": self.cfg.input_size, "rng": rng_state()}

    def save(self, path: str, step_in_epoch: int = 0):
        checkpoint.save(path, self.model, **self._state(step_in_epoch))

    def resume(self, path: str, trust: bool = False):
        """Continues from a checkpoint of this trainer's run. The settings of self.cfg that
        differ from the checkpoint's take effect: the learning rate and its schedule (as a
        fresh run with them would have it at this epoch), epochs, batch size and accumulate
        (at an epoch's end only), and those that change no state (workers, progress, ...).
        Raises ValueError for those a run cannot change (fasthg.train.config.check_resume_changes).
        `trust`: read the file by full unpickling instead of safely (only for a file you trust)."""
        state = checkpoint.read(path, trust)
        changes = resume_changes(state.get("config", {}), self.cfg)
        check_resume_changes(changes, state["step_in_epoch"])
        checkpoint.load_model(path, model=self.model, state=state)
        self.optimizer.load_state_dict(state["optimizer"])
        # How the optimizer runs is this machine's choice, not the checkpoint's (which brings the
        # implementation flags of the run that wrote it: fused on a CPU, capturable for graphs).
        for group in self.optimizer.param_groups:
            for key, value in {"foreach": None, "fused": None, "capturable": False, **self._optimizer_options}.items():
                if key in group:
                    group[key] = value
        if state["scaler"]:  # empty from a run without fp16, which an enabled scaler refuses
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.best, self.history = state["epoch"], state["best"], state["history"]
        # Older checkpoints have no partial sums: their resumed epoch logs the steps after it.
        self._epoch_sums = {**_NO_SUMS, **state.get("epoch_sums", {})}
        self._elapsed = state.get("elapsed", 0.0)
        if any(k in changes for k in _SCHEDULE):
            self._restart_schedule()
        else:
            self.scheduler.load_state_dict(state["scheduler"])
        if changes and self.is_main:
            print(f"resuming from {path} with " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changes.items()))
        self.sampler.start = state["step_in_epoch"] * self.cfg.batch_size
        set_rng_state(state["rng"])

    def _restart_schedule(self):
        """The learning rate a fresh run with this config has at self.epoch: its scheduler,
        stepped as many times as epochs done (so each drop passed multiplies by lr_gamma, as
        in the fresh run, to the last bit)."""
        for g in self.optimizer.param_groups:
            g["lr"] = g["initial_lr"] = self.cfg.lr
        self.scheduler = self._new_scheduler()
        with warnings.catch_warnings():  # no optimizer step in this process yet: torch would warn
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            for _ in range(self.epoch):
                self.scheduler.step()

    # -- the loop ------------------------------------------------------------------------
    def _on_signal(self, signum, frame):
        self._stop = True  # finish the step in flight, checkpoint, stop

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that evaluates, logs and writes checkpoints."""
        return self.rank == 0

    def _max_over_processes(self, *values: float) -> List[float]:
        """Each value's maximum over all processes (a flag's OR), so that every process stops
        at the same step."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def _barrier(self):
        if self.world > 1:
            dist.barrier()

    def close(self):
        """Drops the DDP wrapper and leaves the process group this Trainer joined (torchrun),
        if any. DDP's reducer holds the group; left to interpreter exit, the group's gloo
        threads may be torn down late (CI once saw a 2-process test's worker abort after a
        finished run, not reproduced in 24 runs since; freeing DDP first is the suspected fix)."""
        if self.world > 1:
            self.step_model = self.model
            gc.collect()
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False

    def fit(self) -> List[Dict]:
        cfg = self.cfg
        if self.is_main:
            checkpoint.check_writable(cfg.out)
        last = os.path.join(cfg.out, "last.pt")
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        writer, start, self._stopped, self._out_of_time = None, time.time(), None, False
        self._fit_start = start
        self._deadline = start + 60.0 * cfg.minutes if cfg.minutes else None
        if cfg.tensorboard and self.is_main:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(os.path.join(cfg.out, "tensorboard"))
        try:
            while self.epoch < cfg.epochs:
                if self._deadline is not None and self._max_over_processes(float(time.time() >= self._deadline))[0]:
                    self._stopped, self._out_of_time = (self.epoch, 0), True  # at an epoch's end: all saved
                    if self.is_main:
                        print(f"{self._stopped_text()}; resume from {last}")
                    break
                finished, step = self._train_epoch()
                if not finished:
                    self._stopped = (self.epoch, step)
                    if self.is_main:
                        if self._out_of_time:
                            # What the budget bought, validated: a row for the part of the epoch
                            # done, and best.pt if it is the best (before last.pt, which holds the best).
                            self._end_of_budget(step, writer)
                        self.save(last, step)
                        print(f"{self._stopped_text()}; resume from {last}")
                    self._barrier()
                    return self.history
                if self.is_main:
                    table = self._validate()
                    self._record(table, writer)
                self.epoch += 1
                self._run["epochs"] += 1
                self.scheduler.step()
                self.sampler.start = 0
                if self.is_main:
                    self.save(last)
                    if self._score(table) > self.best:
                        self.best = self._score(table)
                        self.save(os.path.join(cfg.out, "best.pt"))
                self._barrier()
        finally:
            self._run["wall"] += time.time() - start
            self._elapsed += time.time() - start
            self._fit_start = None
            for s, h in handlers.items():
                signal.signal(s, h)
            if writer:
                writer.close()
        if self.is_main:
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
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.amp)
        bar = tqdm(loader, desc=f"epoch {self.epoch + 1}/{cfg.epochs}", disable=not (cfg.progress and self.is_main),
                   initial=first, total=first + len(loader), unit="batch")
        # A resumed epoch goes on from the sums of its steps before the checkpoint (rank 0 holds
        # them, to be summed with the other processes' at the end), and from its time so far.
        carried, self._epoch_sums = self._epoch_sums if first else dict(_NO_SUMS), dict(_NO_SUMS)
        t0 = time.time() - carried["seconds"]
        seen, loss_sum, n, skipped = 0, carried["loss_sum"] if self.is_main else 0.0, 0, 0
        # Checks fall on optimizer steps (every check_every batches, rounded up to whole
        # accumulations), at the same steps in every process, and at the epoch's last step.
        period = -(-cfg.check_every // cfg.accumulate) * cfg.accumulate
        last = first + len(loader) - 1
        losses = []  # the device's losses of the steps since the last check
        step = first
        # Where the epoch's time goes: waiting for the loader (and copying the batch over), and
        # the steps (forward, backward, optimizer, and the checks' waits for the device).
        data_s, step_s = carried["data_seconds"], carried["step_seconds"]
        mark = time.perf_counter()
        for step, batch in enumerate(bar, start=first):
            boundary = (step + 1) % cfg.accumulate == 0
            images = batch["image"].to(self.device, non_blocking=True)
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            now = time.perf_counter()
            data_s, mark = data_s + now - mark, now
            if self._deadline is not None and time.time() >= self._deadline:
                self._stop = self._out_of_time = True
            if cfg.cuda_graphs:
                losses.append(self._graphed_step(images, batch["heatmaps"], batch["weights"], amp_dtype))
            else:
                losses.append(self._step(images, batch["heatmaps"], batch["weights"], amp_dtype, boundary))
            seen += len(images)
            skipped += int(batch["skipped"].sum())
            # One process reads its own stop flag at every step (no wait); several agree on
            # theirs at the checks only. Stop only between optimizer steps: a resumed run
            # cannot rebuild half-accumulated grads.
            check = (step + 1) % period == 0 or step == last or (self.world == 1 and self._stop and boundary)
            if check:
                values, stop = self._check(losses, step + 1 - len(losses))
            now = time.perf_counter()
            step_s, mark = step_s + now - mark, now
            if not check:
                continue
            losses = []
            loss_sum, n = sum(values, loss_sum), n + len(values)
            wall = time.time() - t0
            bar.set_postfix(loss=f"{values[-1]:.4f}", img_s=f"{(carried['images'] + seen * self.world) / wall:.1f}",
                            data=f"{100 * data_s / wall:.0f}%", step=f"{100 * step_s / wall:.0f}%")
            if stop and boundary:
                self._epoch_sums = self._sums(loss_sum, n, seen, skipped, carried, t0, data_s, step_s)
                self._last_epoch = self._epoch_row(self._epoch_sums)
                return False, step + 1
        sums = self._sums(loss_sum, n, seen, skipped, carried, t0, data_s, step_s)
        self._last_epoch = self._epoch_row(sums)
        return True, step + 1

    @staticmethod
    def _epoch_row(sums: Dict) -> Dict:
        """The log's training entries of an epoch (or its part) from its sums: mean loss,
        images/s, the training loop's seconds, and its seconds waiting for data and in the steps."""
        return {"loss": sums["loss_sum"] / sums["steps"] if sums["steps"] else math.nan,
                "images_per_s": sums["images"] / max(sums["seconds"], 1e-9), "train_s": sums["seconds"],
                "data_s": sums["data_seconds"], "step_s": sums["step_seconds"], "skipped_images": sums["skipped"]}

    def _validate(self) -> Dict[str, float]:
        """The validation table (rank 0; the last stack's), its seconds and every stack's score
        (and harder-joint mean, for PCKh) kept for the epoch's log row: {metric}_{entry}_stack{k}."""
        t = time.perf_counter()
        table, res = evaluate(self.model, self.val_set, batch_size=self.cfg.batch_size, metric=self.metric,
                              flip_test=self.cfg.flip_test, progress=False)
        self._last_epoch["val_s"] = time.perf_counter() - t
        for k, stack_table in enumerate(res["stack_tables"], 1):
            for entry in (METRICS[self.metric], "Hard"):
                if entry in stack_table:
                    self._last_epoch[f"{self.metric}_{entry.lower()}_stack{k}"] = stack_table[entry]
        return table

    def _end_of_budget(self, step: int, writer):
        """Rank 0, when cfg.minutes ran out at `step` of an epoch: validates the model as it is,
        logs it as the fraction of the epoch done (a resumed run logs the whole epoch again
        when it ends), and writes best.pt if it beats the best so far."""
        table = self._validate()
        self._record(table, writer, epoch=self.epoch + step / self.sampler.steps)
        if self._score(table) > self.best:
            self.best = self._score(table)
            self.save(os.path.join(self.cfg.out, "best.pt"), step)

    def _elapsed_now(self) -> float:
        """Wall seconds the run has trained (validations and checkpoints included), over every
        fit() of it, resumed ones too."""
        return self._elapsed + (time.time() - self._fit_start if self._fit_start else 0.0)

    def _sums(self, loss_sum: float, n: int, seen: int, skipped: int, carried: Dict, t0: float, data_s: float,
              step_s: float) -> Dict:
        """The epoch's sums so far over all processes (a collective): this process's loss sum
        (on rank 0 it includes the carried one), steps and images, plus the carried steps and
        images; the seconds since t0. Adds the images and seconds of this fit() to self._run."""
        totals = torch.tensor([loss_sum, n, seen, skipped], dtype=torch.float64)
        if self.world > 1:
            totals = totals.to(self.device)
            dist.all_reduce(totals)
        loss_sum, n, seen, skipped = totals.tolist()
        sums = {"loss_sum": loss_sum, "steps": int(n) + carried["steps"], "images": int(seen) + carried["images"],
                "skipped": int(skipped) + carried.get("skipped", 0),
                "seconds": time.time() - t0, "data_seconds": data_s, "step_seconds": step_s}
        self._run["images"] += int(seen)
        self._run["seconds"] += sums["seconds"] - carried["seconds"]
        return sums

    def _loss(self, images, heatmaps, weights, amp_dtype):
        with torch.autocast(self.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            pred = self.step_model(images)
        if self.cfg.supervision == "last":  # the earlier stacks learn only through the last one
            pred = pred[:, -1:]
        return heatmap_loss(pred, heatmaps.to(self.device), weights.to(self.device))

    def _check(self, losses: List[torch.Tensor], first_step: int):
        """The host's wait for the device, once in check_every steps: the losses of steps
        first_step, first_step + 1, ... as floats, and the stop flag OR-ed over all processes.
        Raises FloatingPointError naming the first step whose loss is not finite in any
        process, 1-based like the epoch (its checkpoints were written before that step's
        update, and none since)."""
        values = torch.stack(losses).tolist()
        bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), len(values))
        minus_bad, stop = self._max_over_processes(-bad, float(self._stop))
        bad = int(-minus_bad)
        if bad < len(values):
            value = values[bad] if not math.isfinite(values[bad]) else "in another process"
            raise FloatingPointError(f"non-finite loss ({value}) at epoch {self.epoch + 1} step "
                                     f"{first_step + bad + 1} of {self.sampler.steps}; "
                                     f"the last good checkpoint is in {self.cfg.out}")
        return values, bool(stop)

    def _step(self, images, heatmaps, weights, amp_dtype, boundary: bool) -> torch.Tensor:
        """Forward, loss and backward, and the optimizer step at accumulation boundaries;
        returns the loss, on the device (no wait for it)."""
        ddp = isinstance(self.step_model, torch.nn.parallel.DistributedDataParallel)
        # Between optimizer steps DDP need not all-reduce the gradients it accumulates.
        with (self.step_model.no_sync() if ddp and not boundary else contextlib.nullcontext()):
            loss = self._loss(images, heatmaps, weights, amp_dtype)
            self.scaler.scale(loss / self.cfg.accumulate).backward()
        if boundary:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def _graphed_step(self, images, heatmaps, weights, amp_dtype) -> torch.Tensor:
        """The whole step (forward, loss, backward, optimizer) as one CUDA graph replay: the
        launch-bound low-resolution levels cost one launch. The first step of a run is eager
        (it creates the optimizer state); the graph is captured at the second and again
        whenever the learning rate changed, since the graph holds it as a constant. Returns
        the loss on the device (a copy: the next replay overwrites the graph's)."""
        heatmaps, weights = heatmaps.to(self.device), weights.to(self.device)
        lr = self.optimizer.param_groups[0]["lr"]
        if not self.optimizer.state:
            return self._step(images, heatmaps, weights, amp_dtype, True)
        if self._graph is None or self._graph[3] != lr:
            static = (images.clone(), heatmaps.clone(), weights.clone())
            buffers = [b.clone() for b in self.model.buffers()]  # the warm-up must not move BN statistics
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the graph: lazy inits, allocator, cuDNN
                for _ in range(2):
                    self._loss(*static, amp_dtype).backward()
            torch.cuda.current_stream().wait_stream(side)
            with torch.no_grad():
                for b, saved in zip(self.model.buffers(), buffers):
                    b.copy_(saved)
            self.optimizer.zero_grad(set_to_none=True)  # the graph allocates the gradients it fills
            graph = torch.cuda.CUDAGraph()
            # thread_local: the DataLoader's pin-memory thread keeps calling CUDA during the
            # capture, which the default (global) mode would count against it.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                loss = self._loss(*static, amp_dtype)
                loss.backward()
                self.optimizer.step()
            self._graph = (graph, static, loss, lr)
        graph, static, loss, _ = self._graph
        for dst, src in zip(static, (images, heatmaps, weights)):
            dst.copy_(src, non_blocking=True)
        graph.replay()
        return loss.detach().clone()

    def _record(self, table: Dict[str, float], writer, epoch: Optional[float] = None):
        """Logs an epoch's row (`epoch`: a fraction of one, where the time budget cut it short):
        its training entries, validation seconds, the run's elapsed wall seconds and the scores."""
        row = {"epoch": self.epoch + 1 if epoch is None else round(epoch, 3), **self._last_epoch,
               "elapsed_s": self._elapsed_now(), "lr": self.optimizer.param_groups[0]["lr"],
               **{f"{self.metric}_{k.lower()}": v for k, v in table.items()}}
        self.history.append(row)
        with open(self.log_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if writer:
            for k, v in row.items():
                if k != "epoch":
                    writer.add_scalar(k, v, math.ceil(row["epoch"]))
        stacks = [row[k] for k in self._stack_keys(row)]
        print(f"epoch {row['epoch']}: loss {row['loss']:.4f}, {row['images_per_s']:.1f} img/s, "
              f"{self._metric_label()} {self._score(table):.1f}%"
              + (f" (harder joints {table['Hard']:.1f}%)" if "Hard" in table else "")
              + (f", by stack {' / '.join(f'{v:.1f}' for v in stacks)}" if len(stacks) > 1 else "")
              + f"; {time_split(row)}"
              + (f"; skipped for bad images: {row['skipped_images']}" if row["skipped_images"] else ""))

    def _score(self, table: Dict[str, float]) -> float:
        """The entry of a validation table that ranks checkpoints (PCKh mean, OKS AP)."""
        return table[METRICS[self.metric]]

    def _stack_keys(self, row: Dict, entry: Optional[str] = None) -> List[str]:
        """The log row's keys of each stack's score (`entry`: another entry of the table, e.g.
        "Hard"), in stack order."""
        prefix = f"{self.metric}_{(entry or METRICS[self.metric]).lower()}_stack"
        return sorted((k for k in row if k.startswith(prefix)), key=lambda k: int(k[len(prefix):]))

    def _score_key(self) -> str:
        """The log's (history's) key of the score that ranks checkpoints."""
        return f"{self.metric}_{METRICS[self.metric].lower()}"

    def _metric_label(self) -> str:
        return {"pckh": "PCKh@0.5 mean", "oks": "OKS AP"}[self.metric]

    def plot(self):
        """curves.png in the output folder: the loss and validation-score curves, each stack's and
        the harder joints' beside the last stack's (needs matplotlib)."""
        last = self.history[-1] if self.history else {}
        stacks = self._stack_keys(last)
        more = {f"stack {k}": key for k, key in enumerate(stacks, 1)} if len(stacks) > 1 else {}
        hard = self._stack_keys(last, "Hard")
        if hard:
            more["harder joints (last stack)"] = hard[-1]
        plot_training_curves(self.history, self._score_key(), f"validation {self._metric_label()} (%)",
                             os.path.join(self.cfg.out, "curves.png"), more)

    def _stopped_text(self) -> str:
        epoch, step = self._stopped
        cause = f"the time budget (--minutes {self.cfg.minutes:g})" if self._out_of_time else "a signal"
        if not step:
            return f"stopped by {cause} after epoch {epoch}"
        return f"stopped by {cause} in epoch {epoch + 1} after step {step} of {self.sampler.steps}"

    def summary(self) -> str:
        """What the last fit() did, for a person: epochs done, wall time, training images/s,
        the best and last validation scores, where a signal stopped it (and how to go on),
        and the files in the output folder with their paths."""
        cfg, run = self.cfg, self._run
        last = os.path.join(cfg.out, "last.pt")
        lines = [f"{self.epoch} of {cfg.epochs} epochs done ({run['epochs']} in this run), "
                 f"{run['wall']:.1f} s, {run['images'] / max(run['seconds'], 1e-9):.1f} training images/s"]
        if self._stopped:
            lines[0] = f"{self._stopped_text()}: {lines[0]}\nresume with: fasthg train --resume {last}"
        if self.history:
            key = self._score_key()
            best = max(self.history, key=lambda r: r[key])
            lines.append(f"{self._metric_label()}: best {best[key]:.1f}% (epoch {best['epoch']}), "
                         f"last {self.history[-1][key]:.1f}% (epoch {self.history[-1]['epoch']})")
        files = {"last.pt": "checkpoint", "best.pt": "best checkpoint", "log.jsonl": "log",
                 "curves.png": "curves", "tensorboard": "TensorBoard logs"}
        written = [(what, os.path.join(cfg.out, name)) for name, what in files.items()
                   if os.path.exists(os.path.join(cfg.out, name))]
        if written:
            lines += ["files written:"] + [f"  {what + ':':18} {path}" for what, path in written]
        return "\n".join(lines)
