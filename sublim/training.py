"""Lightning's fit of a student module: on one device, or as DDP workers the training stage spawns itself.

Multi-device training (``student.devices`` > 1) is DDP with one worker process per device, spawned from the
job's own process: Lightning's ``strategy=ddp`` would instead re-run the command line once per device, i.e.
the whole Hydra job or sweep, whose copies then wait on the store's lock of this very stage. A step's global
batch (batch_size x devices examples) is the single-device run's batch of that size, split across the
workers, and the loss is the global token mean, so ``devices=2 batch_size=4`` trains what ``devices=1
batch_size=8`` does (up to float rounding); one device trains on exactly the batches of a seeded shuffled
DataLoader.
"""

from __future__ import annotations

import csv
import logging
import math
import pickle
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.environments.lightning import LightningEnvironment, find_free_network_port
from omegaconf import DictConfig
from pytorch_lightning.loggers import CSVLogger, Logger
from pytorch_lightning.strategies import DDPStrategy
from torch.utils.data import DataLoader, Sampler

from sublim import SublimError

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
# Like torchrun's --max-restarts: a spawned fit whose worker dies by a signal (a DDP worker aborted once at
# start-up on a loaded 2-core host) is restarted from the start this many times before the stage fails.
RESTARTS = 1


class GlobalBatchSampler(Sampler[int]):
    """One worker's share of a seeded shuffle, in global batches of ``batch_size x world`` examples.

    Epoch e's order is the permutation a seeded shuffled DataLoader draws in epoch e. Step k's global batch is
    the order's k-th slice of batch_size x world examples (the batch one device with that batch size trains on)
    and worker r takes the r-th batch_size of it. The last, smaller global batch is split as evenly as possible;
    a worker left without an example (fewer left than workers) repeats one, so every worker takes as many steps.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls it at the start of every epoch
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        """This worker's batches of the current epoch."""
        order = self.order()
        size = self.batch_size * self.world
        full = self.n - self.n % size
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        out = [order[start:start + size][mine] for start in range(0, full, size)]
        rest = order[full:]
        if rest:
            share = np.array_split(np.arange(len(rest)), self.world)[self.rank]
            out.append([rest[i] for i in share] or [rest[self.rank % len(rest)]])
        return out

    def order(self) -> list[int]:
        """The epoch's permutation: the one a shuffled DataLoader with a generator seeded ``seed`` draws in that
        epoch, so one device trains on exactly the batches a plain seeded ``shuffle=True`` loader gives."""
        generator = torch.Generator().manual_seed(self.seed)
        for _ in range(self.epoch + 1):
            torch.empty((), dtype=torch.int64).random_(generator=generator)  # the loader iterator's base seed
            order = torch.randperm(self.n, generator=generator).tolist()
            if self.n % (self.batch_size * self.world):  # a short last batch exhausts RandomSampler, which then
                torch.randperm(self.n, generator=generator)  # draws its (empty) trailing slice
        return order

    def __iter__(self) -> Iterator[int]:
        return iter([i for batch in self.batches() for i in batch])

    def __len__(self) -> int:
        size = self.batch_size * self.world
        each, extra = divmod(self.n % size, self.world)
        last = max(1, each + (self.rank < extra)) if self.n % size else 0  # np.array_split's sizes, or a repeat
        return self.n // size * self.batch_size + last


class StudentData(pl.LightningDataModule):
    """The examples, batched by ``GlobalBatchSampler`` for this worker (created in the worker, which knows its rank)."""

    def __init__(self, examples: list, collate_fn: Callable[[list], dict], batch_size: int, seed: int) -> None:
        super().__init__()
        self.examples, self.collate_fn, self.batch_size, self.seed = examples, collate_fn, batch_size, seed

    def train_dataloader(self) -> DataLoader:
        sampler = GlobalBatchSampler(len(self.examples), self.batch_size, self.seed, self.trainer.global_rank,
                                     self.trainer.world_size)
        # its own generator: the iterator's base seed is not drawn from torch's global generator
        return DataLoader(self.examples, batch_size=self.batch_size, sampler=sampler, collate_fn=self.collate_fn,
                          generator=torch.Generator())


class _Finish(pl.Callback):
    """At the end of training: rank 0 saves the adapter; the global step, token count and first loss go into the
    callback metrics (which a spawned worker sends back to the main process, unlike the trainer's and module's
    state)."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        first = module.first_loss if module.first_loss is not None else math.nan
        trainer.callback_metrics.update({"fit/steps": torch.tensor(trainer.global_step),
                                         "fit/tokens": torch.tensor(module.tokens_seen),
                                         "fit/initial_loss": torch.tensor(first, dtype=torch.float64)})
        if trainer.is_global_zero:
            module.net.save_pretrained(self.out / ADAPTER_DIR)


class _LocalWorkers(LightningEnvironment):
    """The spawned workers of one training run, on this machine: a fresh local port, whatever MASTER_ADDR/PORT the
    job inherited (a cluster launcher's, or a previous run's)."""

    def __init__(self) -> None:
        super().__init__()
        self._main_port = find_free_network_port()

    @property
    def main_address(self) -> str:
        return "127.0.0.1"

    @property
    def creates_processes_externally(self) -> bool:
        return False


SPAWNABLE = ("auto", "ddp", "ddp_spawn")


def trainer_strategy(student: DictConfig) -> tuple[str | DDPStrategy, int]:
    """Lightning's strategy and devices for ``student.strategy``/``student.devices``.

    More than one device is DDP over worker processes spawned here (the job itself stays one process); other
    strategies run on one device only: Lightning starts their workers by re-running the command line.
    """
    strategy = student.get("strategy", "auto") or "auto"
    devices = student.get("devices", 1)
    if devices == "auto":  # Lightning's choice: every GPU, or one CPU process (no worker spawned for one device)
        devices = torch.cuda.device_count() if torch.cuda.is_available() else 1
    if devices == 1:
        return ("auto" if strategy in SPAWNABLE else strategy), 1
    if strategy not in SPAWNABLE:
        raise SublimError(
            f"student.strategy={strategy} with student.devices={devices}: Lightning starts that strategy's workers "
            f"by re-running the command line, i.e. the whole job or sweep; use student.strategy=ddp, whose workers "
            f"the training stage spawns itself (one machine, batch_size x devices examples a step)"
        )
    return DDPStrategy(start_method="spawn", cluster_environment=_LocalWorkers()), devices


def fit(module: pl.LightningModule, examples: list, collate_fn: Callable[[list], dict], student: DictConfig, seed: int,
        out: Path, loggers: list[Logger] | None = None) -> dict:
    """Lightning fit of a student module over examples; saves the adapter under ``out`` and returns metrics.

    With several devices, the spawned workers get only the CSV logger; ``loggers`` (W&B) get its rows after the
    fit, so no logger state crosses processes. ``collate_fn`` must then pickle (a module-level function or a
    functools.partial of one, not a lambda).
    """
    strategy, devices = trainer_strategy(student)
    spawned = isinstance(strategy, DDPStrategy)
    if spawned:
        try:
            pickle.dumps(collate_fn)
        except (pickle.PicklingError, AttributeError, TypeError) as err:
            raise TypeError(f"the collate function {collate_fn!r} cannot be sent to the spawned device workers "
                            f"({err}); pass a module-level function or a functools.partial of one") from None
    start = time.time()
    for attempt in range(1 + (RESTARTS if spawned else 0)):
        if attempt:  # a used strategy carries the first trainer's devices: a fresh one for the restart
            strategy, devices = trainer_strategy(student)
        trainer = pl.Trainer(
            accelerator="auto", strategy=strategy, devices=devices, max_epochs=student.epochs,
            precision=student.precision, accumulate_grad_batches=student.accumulate_grad_batches,
            logger=[CSVLogger(out, name="log", version="")] + ([] if spawned else list(loggers or [])),
            callbacks=[_Finish(out)], use_distributed_sampler=False,  # GlobalBatchSampler shards the data
            log_every_n_steps=1, enable_checkpointing=False, enable_model_summary=False,
        )
        try:
            trainer.fit(module, datamodule=StudentData(examples, collate_fn, student.batch_size, seed))
            break
        except torch.multiprocessing.ProcessRaisedException as err:  # a worker's SublimError, as a traceback text
            raised = re.search(r"SublimError: (.*?)\s*\Z", str(err), re.S)
            if raised:
                raise SublimError(raised.group(1)) from None
            raise
        except torch.multiprocessing.ProcessExitedException as err:  # a worker killed by a signal
            if attempt == RESTARTS:
                raise
            # the parent's module is untouched (workers train copies), so the fit restarts from the same start
            log.warning("a training worker died (%s); restarting the fit from the start", err)
            shutil.rmtree(out / "log", ignore_errors=True)
    seconds = time.time() - start
    if spawned:
        _replay(out / "log" / "metrics.csv", loggers or [])
    metrics = trainer.callback_metrics
    loss = metrics.get("train/loss")
    tokens = int(metrics.get("fit/tokens", module.tokens_seen))
    return {
        "n_examples": len(examples),
        "epochs": student.epochs,
        "steps": int(metrics.get("fit/steps", trainer.global_step)),
        "devices": trainer.world_size,
        "initial_loss": float(metrics.get("fit/initial_loss", math.nan)),  # the first step's: the base's own
        "final_loss": float(loss) if loss is not None else math.nan,
        "tokens": tokens,
        "seconds": round(seconds, 2),
        "tokens_per_second": round(tokens / max(seconds, 1e-9), 1),
    }


def _replay(path: Path, loggers: list[Logger]) -> None:
    """Send the rows of a spawned fit's metrics.csv (written by rank 0) to loggers of this process."""
    if not loggers or not path.exists():
        return
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            values = {k: float(v) for k, v in row.items() if k != "step" and v not in ("", None)}
            for logger in loggers:
                logger.log_metrics(values, step=int(row["step"]))
