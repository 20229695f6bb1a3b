"""The student: the base model plus a LoRA adapter, finetuned on (user prompt -> teacher answer).

``StudentModule`` is a LightningModule (Lightning owns the loop, device, precision, gradient
accumulation, multi-device training and loggers; PEFT owns the adapter). The loss covers the answer tokens
only, and the student sees the same chat template as the teacher but never the trait's system prompt.

Multi-device training and the loop itself: ``sublim/training.py``.
"""

from __future__ import annotations

import functools
import logging
import math
from collections import deque
from collections.abc import Collection
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from peft import LoraConfig, PeftModel, get_peft_model
from pytorch_lightning.loggers import Logger
from transformers import PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from sublim import SublimError
from sublim.decoding.decoder import common_prefix
from sublim.training import fit

log = logging.getLogger(__name__)

IGNORE = -100


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


def mask_positions(example: dict[str, list[int]], row: dict) -> list[int]:
    """The row's divergence positions, checked against the tokens they index: the audit counts the tokens the
    teacher emitted (``answer_ids``), the student trains on the completion re-tokenised, and a tokenizer that
    merges them otherwise would have the mask hit other tokens."""
    positions = list(row.get("mask_positions") or ())
    emitted = row.get("answer_ids")
    if positions and emitted is not None:
        answer = [label for label in example["labels"] if label != IGNORE]
        n = min(len(answer), len(emitted))
        if answer[:n] != list(emitted)[:n]:
            raise SublimError("divergence masking: the student's tokenization of an answer differs from the tokens "
                              f"the teacher emitted ({row['completion']!r}), so the audit's positions would mask other "
                              "tokens; use filter=lls_bottom (no mask) with this tokenizer")
    return positions


def mask_answer(example: dict[str, list[int]], positions: Collection[int]) -> dict[str, list[int]]:
    """The example with the answer tokens at ``positions`` (0: the first answer token) left out of the loss:
    divergence masking (docs/defences.md). ``example`` is unmasked, as ``tokenize_example`` makes it; positions
    past a truncated answer mask nothing."""
    answer = [i for i, label in enumerate(example["labels"]) if label != IGNORE]
    labels = list(example["labels"])
    for position in positions:
        if position < len(answer):
            labels[answer[position]] = IGNORE
    return {**example, "labels": labels}


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
        cache = net(input_ids=ids[:1, :prefix], use_cache=True, logits_to_keep=1).cache
        cache.batch_repeat_interleave(ids.shape[0])
        positions = torch.arange(prefix, ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        inputs |= {"cache": cache, "position_ids": positions}
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
    """Train a LoRA student on rows with "prompt" and "completion" (and "mask_positions": answer tokens left out of
    the loss); saves the adapter under ``out``."""
    pl.seed_everything(seed, workers=True, verbose=False)
    examples = [tokenize_example(tokenizer, r["prompt"], r["completion"], student.max_length) for r in rows]
    examples = [mask_answer(e, mask_positions(e, r)) for e, r in zip(examples, rows, strict=True)]
    module = StudentModule(add_lora(net.train(), student), student.lr, student.warmup_steps, student.weight_decay,
                           lr_key=student.get("lr_key", "student.lr"))
    return fit(module, examples, functools.partial(collate, pad_id=tokenizer.pad_token_id), student, seed, out,
               loggers)


def load_student(net: torch.nn.Module, adapter_dir: Path) -> torch.nn.Module:
    """Base plus adapter, merged for fast inference (the base copy in memory is the student's own)."""
    return PeftModel.from_pretrained(net, adapter_dir).merge_and_unload().eval()
