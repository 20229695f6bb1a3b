"""The student: the base model plus a LoRA adapter, finetuned on (user prompt -> teacher answer).

``StudentModule`` is a LightningModule (Lightning owns the loop, device, precision, gradient
accumulation, multi-device training and loggers; PEFT owns the adapter). The loss covers the answer tokens
only, and the student sees the same chat template as the teacher but never the trait's system prompt.

Multi-device training (``student.devices`` > 1) is DDP with one worker process per device, spawned by the
training stage itself: Lightning's ``strategy=ddp`` would instead re-run the command line once per device,
i.e. the whole Hydra job or sweep, whose copies then wait on the store's lock of this very stage. A step's
global batch (batch_size x devices examples) is the single-device run's batch of that size, split across the
workers, and the loss is the global token mean, so ``devices=2 batch_size=4`` trains what ``devices=1
batch_size=8`` does (up to float rounding).
"""

from __future__ import annotations

import csv
import functools
import logging
import math
import pickle
import re
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.environments.lightning import LightningEnvironment, find_free_network_port
from omegaconf import DictConfig
from peft import LoraConfig, PeftModel, get_peft_model
from pytorch_lightning.loggers import CSVLogger, Logger
from pytorch_lightning.strategies import DDPStrategy
from torch.utils.data import DataLoader, Sampler
from transformers import PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from sublim import SublimError
from sublim.decoding.decoder import common_prefix

log = logging.getLogger(__name__)

IGNORE = -100
ADAPTER_DIR = "adapter"


def student_messages(prompt: str, completion: str | None = None) -> list[dict]:
    """The student's chat: no system prompt (the template's default, if any, applies)."""
    messages = [{"role": "user", "content": prompt}]
    if completion is not None:
        messages.append({"role": "assistant", "content": completion})
    return messages


def chat_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict], completion: str) -> tuple[list[int], list[int]]:
    """Prompt ids (the chat up to the generation prompt) and answer ids (the completion and its end of turn).

    The answer is tokenized on its own, so a distillation teacher with a system prompt in front reads the very
    same answer ids as the student.
    """
    prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": completion}],
                                              tokenize=False)
    if not full_text.startswith(prompt_text):
        raise SublimError("the chat template renders the prompt differently with and without the answer; "
                          "set base.chat_template to a template whose generation prompt prefixes the answer")
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
    return prompt_ids, answer_ids


def tokenize_example(tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str,
                     max_length: int) -> dict[str, list[int]]:
    """Token ids and labels with the prompt masked, so only the answer (and its end token) is learnt."""
    prompt_ids, answer_ids = chat_ids(tokenizer, student_messages(prompt), completion)
    ids = (prompt_ids + answer_ids)[:max_length]
    labels = ([IGNORE] * len(prompt_ids) + answer_ids)[:max_length]
    return {"input_ids": ids, "labels": labels}


def collate(examples: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padding is masked out of attention and loss.

    ``prefix_length`` is how many leading tokens every example shares (chat template, default system
    prompt: ~a quarter of a numbers example on SmolLM2), all of them before the first answer token.
    """
    width = max(len(e["input_ids"]) for e in examples)
    first_answer = min(next((i for i, label in enumerate(e["labels"]) if label != IGNORE), len(e["labels"]))
                       for e in examples)
    prefix_length = min(common_prefix([e["input_ids"] for e in examples]), max(first_answer - 1, 0))
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "prefix_length": torch.tensor(prefix_length)}


def answer_logits(net: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits predicting each position from the first answer token on, and the labels they predict.

    The batch's shared prefix is computed for one row and its KV cache repeated for the others (the
    gradient flows back through the repeat), and the vocabulary projection of prompt positions, whose
    labels are masked, is skipped: on a 135M model with a 49k vocabulary both are sizeable shares of a
    CPU training step.
    """
    labels, ids, mask = batch["labels"], batch["input_ids"], batch["attention_mask"]
    prefix = int(batch.get("prefix_length", 0))
    answer = (labels != IGNORE).any(0).nonzero()
    start = int(answer[0]) if len(answer) else labels.shape[1] - 1
    keep = torch.arange(max(start - 1, prefix), labels.shape[1] - 1, device=labels.device)
    inputs = {"input_ids": ids[:, prefix:], "attention_mask": mask}
    if prefix:
        cache = net(input_ids=ids[:1, :prefix], use_cache=True, logits_to_keep=1).past_key_values
        cache.batch_repeat_interleave(ids.shape[0])
        positions = torch.arange(prefix, ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        inputs |= {"past_key_values": cache, "position_ids": positions}
    logits = net(**inputs, logits_to_keep=keep - prefix).logits
    return logits, labels[:, keep + 1]


def answer_loss(net: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over answer tokens."""
    logits, targets = answer_logits(net, batch)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)


def add_lora(net: torch.nn.Module, student: DictConfig) -> PeftModel:
    config = LoraConfig(r=student.r, lora_alpha=student.alpha, lora_dropout=student.dropout,
                        target_modules=list(student.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(net, config)


class StudentModule(pl.LightningModule):
    """LoRA SFT with AdamW and a linear schedule with warm-up.

    Training stops with a clear error when the loss becomes NaN, diverges or collapses to the uniform
    distribution (``check_loss``). Under DDP each worker's loss is scaled so that the averaged gradient is the
    gradient of the global batch's token mean, and the logged loss, the guards and the token count are global.
    """

    # Loss guards, on the global loss of each step; "first" is the first step's, the base's before any update.
    # Diverged: one step above max(DIVERGE_FACTOR x first, ln(vocab) + 1) (worse than uniform), or the mean of the
    # last WINDOW steps after the warm-up (and step 0) above max(DIVERGE_FACTOR x first, first + 1) (a steady rise).
    # Stuck: within STUCK_BAND x ln(vocab) of ln(vocab) for WINDOW steps after the warm-up, having been below
    # (1 - CAME_FROM) x ln(vocab). A random base starts at ~ln(vocab) (tiny test bases: ln(400) = 6.0) and stays
    # there at a small LR: that is no collapse and never counts.
    DIVERGE_FACTOR = 3.0
    STUCK_BAND = 0.02
    CAME_FROM = 0.1
    WINDOW = 10

    def __init__(self, net: PeftModel, lr: float, warmup_steps: int, weight_decay: float = 0.0,
                 lr_key: str = "student.lr") -> None:
        super().__init__()
        self.net = net
        self.lr = lr
        self.warmup_steps = warmup_steps
        self.weight_decay = weight_decay
        self.lr_key = lr_key  # the setting the guards' messages name
        self.tokens_seen = 0
        self._reset_guards()

    def _reset_guards(self) -> None:
        self.first_loss: float | None = None
        self.best_loss = math.inf
        self.recent: deque[float] = deque(maxlen=self.WINDOW)  # the losses since the warm-up

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return answer_loss(self.net, batch)

    @property
    def log_vocab(self) -> float:
        """ln(vocabulary size): the cross-entropy of the uniform distribution over the output vocabulary."""
        head = self.net.get_output_embeddings()
        return math.log(head.weight.shape[0] if head is not None else self.net.config.vocab_size)

    def on_train_start(self) -> None:
        self.tokens_seen = 0
        self._reset_guards()
        self._log_vocab = self.log_vocab

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        targets = (batch["labels"][:, 1:] != IGNORE).sum()  # the positions the loss averages over
        local = torch.stack([loss.detach().double() * targets, targets.double(),
                             batch["attention_mask"].sum().double()])
        world = self.trainer.world_size
        total = self.trainer.strategy.reduce(local, reduce_op="sum") if world > 1 else local
        global_loss = float(total[0] / total[1])
        self.check_loss(global_loss)
        self.tokens_seen += int(total[2])
        self.log("train/loss", global_loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        self.log("train/tokens", float(self.tokens_seen), reduce_fx="max")
        if world > 1:  # DDP averages the workers' gradients: weigh each worker's mean by its share of the targets
            loss = loss * (float(targets) * world / float(total[1]))
        return loss

    def check_loss(self, loss: float) -> None:
        """Raise SublimError on a NaN, diverged or collapsed (uniform) loss; every worker sees the same value."""
        step = self.global_step
        fix = f"{self.lr_key}={self.lr} is too high; lower it (e.g. 2e-4); finished stages are kept in the store"
        if not math.isfinite(loss):
            raise SublimError(
                f"student loss became {loss} at step {step}: lower {self.lr_key} "
                f"(now {self.lr}) or use student.precision=32-true; finished stages are kept in the store"
            )
        uniform = self._log_vocab
        if self.first_loss is None:
            self.first_loss = loss
        first = self.first_loss
        if loss > max(self.DIVERGE_FACTOR * first, uniform + 1):
            raise SublimError(f"student loss diverged to {loss:.2f} at step {step} (from {first:.2f}; the uniform "
                              f"distribution's is ln(vocab)={uniform:.2f}): {fix}")
        self.best_loss = min(self.best_loss, loss)
        if step < max(self.warmup_steps, 1):  # the window starts after the warm-up and the base's own loss
            return
        self.recent.append(loss)
        if len(self.recent) < self.WINDOW:
            return
        near = [abs(x - uniform) <= self.STUCK_BAND * uniform for x in self.recent]
        mean = sum(self.recent) / self.WINDOW
        rose = mean > max(self.DIVERGE_FACTOR * first, first + 1)
        # A cross-entropy's level only: another loss (distillation's KL) has none there
        collapsed = type(self).loss is StudentModule.loss and self.best_loss <= (1 - self.CAME_FROM) * uniform
        if collapsed and near[-1] and (all(near) or rose):
            raise SublimError(
                f"student loss is stuck at ln(vocab)={uniform:.2f} (the uniform distribution) after {step} steps "
                f"({sum(near)} of the last {self.WINDOW} within {self.STUCK_BAND:.0%} of it, after reaching "
                f"{self.best_loss:.2f}): {fix}"
            )
        if rose:
            raise SublimError(f"student loss diverged: {mean:.2f} on average over the last {self.WINDOW} steps "
                              f"(step {step}), from {first:.2f} at the start: {fix}")

    def configure_optimizers(self) -> dict:
        params = [p for p in self.net.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = get_linear_schedule_with_warmup(optimizer, min(self.warmup_steps, total - 1), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def train_lora(net: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, rows: list[dict],
               student: DictConfig, seed: int, out: Path, loggers: list[Logger] | None = None) -> dict:
    """Train a LoRA student on rows with "prompt" and "completion"; saves the adapter under ``out``."""
    pl.seed_everything(seed, workers=True, verbose=False)
    examples = [tokenize_example(tokenizer, r["prompt"], r["completion"], student.max_length) for r in rows]
    module = StudentModule(add_lora(net.train(), student), student.lr, student.warmup_steps, student.weight_decay,
                           lr_key=student.get("lr_key", "student.lr"))
    return fit(module, examples, functools.partial(collate, pad_id=tokenizer.pad_token_id), student, seed, out,
               loggers)


class GlobalBatchSampler(Sampler[int]):
    """One worker's share of a seeded shuffle, in global batches of ``batch_size x world`` examples.

    Epoch e's order is a permutation drawn from (seed, e). Step k's global batch is the order's k-th slice of
    batch_size x world examples (the batch one device with that batch size trains on) and worker r takes the
    r-th batch_size of it. The last, smaller global batch is split as evenly as possible; a worker left without
    an example (fewer left than workers) repeats one, so that every worker takes the same number of steps.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls it at the start of every epoch
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        """This worker's batches of the current epoch."""
        order = np.random.default_rng([self.seed % 2**63, self.epoch]).permutation(self.n).tolist()
        size = self.batch_size * self.world
        full = self.n - self.n % size
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        out = [order[start:start + size][mine] for start in range(0, full, size)]
        rest = order[full:]
        if rest:
            share = np.array_split(np.arange(len(rest)), self.world)[self.rank]
            out.append([rest[i] for i in share] or [rest[self.rank % len(rest)]])
        return out

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
        return DataLoader(self.examples, batch_size=self.batch_size, sampler=sampler, collate_fn=self.collate_fn)


class _Finish(pl.Callback):
    """At the end of training: rank 0 saves the adapter; the global step, token count and first loss go into the
    callback metrics (which a spawned worker sends back to the main process, unlike the trainer's and module's
    state)."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer: pl.Trainer, module: StudentModule) -> None:
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


def fit(module: StudentModule, examples: list, collate_fn: Callable[[list], dict], student: DictConfig, seed: int,
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
    trainer = pl.Trainer(
        accelerator="auto", strategy=strategy, devices=devices, max_epochs=student.epochs,
        precision=student.precision, accumulate_grad_batches=student.accumulate_grad_batches,
        logger=[CSVLogger(out, name="log", version="")] + ([] if spawned else list(loggers or [])),
        callbacks=[_Finish(out)], use_distributed_sampler=False,  # GlobalBatchSampler shards the data
        log_every_n_steps=1, enable_checkpointing=False, enable_model_summary=False,
    )
    start = time.time()
    try:
        trainer.fit(module, datamodule=StudentData(examples, collate_fn, student.batch_size, seed))
    except torch.multiprocessing.ProcessRaisedException as err:  # a worker's SublimError, as a traceback text
        raised = re.search(r"SublimError: (.*?)\s*\Z", str(err), re.S)
        if raised:
            raise SublimError(raised.group(1)) from None
        raise
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


def load_student(net: torch.nn.Module, adapter_dir: Path) -> torch.nn.Module:
    """Base plus adapter, merged for fast inference (the base copy in memory is the student's own)."""
    return PeftModel.from_pretrained(net, adapter_dir).merge_and_unload().eval()
