"""Logit distillation student (``student=distill``): match the teacher's next-token distributions.

Replications found soft-label distillation transmits a trait several times more strongly than SFT on
sampled tokens. The teacher reads its trait (system prompt, or finetuned weights) + the prompt + its own
filtered answer; the student reads the prompt + the same answer ids, without a system prompt, and
minimises KL(teacher || student) at every answer position.

The teacher's distributions are a cached stage: for each answer position, the top-k log-probabilities
(full-vocabulary normalised) and their token ids, computed once per filtered dataset and teacher. The
loss's support (``student.support``):
- ``vocab``: the student's full softmax against the teacher's top-k (renormalised over the k tokens);
- ``top_k``: both distributions renormalised over the teacher's top-k tokens;
- ``allowed``: both renormalised over the modality's allowed tokens (numbers: the grammar's candidate
  digit/separator tokens and end of sequence), i.e. only the hidden signal inside the format.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from functools import partial
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from peft import PeftModel
from pytorch_lightning.loggers import Logger
from transformers import PreTrainedTokenizerBase

from sublim import SublimError, modalities, models
from sublim.forcing import AnswerForward, forced
from sublim.store import content_hash
from sublim.student import (
    IGNORE,
    StudentModule,
    add_lora,
    answer_logits,
    chat_ids,
    collate,
    mask_answer,
    mask_positions,
    student_messages,
    tokenize_example,
)
from sublim.teacher import GrammarTable
from sublim.training import fit

log = logging.getLogger(__name__)

SUPPORTS = ("vocab", "top_k", "allowed")
LOGITS_FILE = "teacher_logits.safetensors"
_MASKED = -1e9  # finite stand-in for -inf: keeps gradients free of NaN


def tokenizer_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """Identity of a vocabulary: distillation needs the teacher's token ids to mean the student's."""
    return content_hash(sorted(tokenizer.get_vocab().items()))


def distill_examples(tokenizer: PreTrainedTokenizerBase, rows: list[dict], system: str | None,
                     max_length: int) -> tuple[list[dict], list[list[int]]]:
    """Student examples (ids, answer labels) and the teacher's ids: its own prompt + the same answer ids."""
    examples, teacher_ids = [], []
    for row in rows:
        example = tokenize_example(tokenizer, row["prompt"], row["completion"], max_length)
        answer = [t for t in example["labels"] if t != IGNORE]
        messages = ([{"role": "system", "content": system}] if system else []) + student_messages(row["prompt"])
        prompt_ids, _ = chat_ids(tokenizer, messages, row["completion"])
        examples.append(example)
        teacher_ids.append(prompt_ids + answer)
    return examples, teacher_ids


class TeacherLogits(AnswerForward):
    """Top-k log-probabilities at the answer positions of (teacher prompt + answer) sequences."""

    def __init__(self, net: torch.nn.Module, pad_id: int, top_k: int) -> None:
        super().__init__(net, pad_id)
        self.top_k = top_k

    def reduce(self, logits: torch.Tensor, row: dict) -> tuple[torch.Tensor, torch.Tensor]:
        logprobs = logits.log_softmax(-1)
        if row["allowed"] is not None:  # restrict to the modality's tokens before taking the top k
            allowed = torch.tensor(row["allowed"], device=self.device)
            logprobs = torch.full_like(logprobs, float("-inf")).index_copy(1, allowed, logprobs[:, allowed])
        values, indices = logprobs.topk(min(self.top_k, logprobs.shape[-1]), dim=-1)
        return values.cpu(), indices.to(torch.int32).cpu()


def teacher_logits(net: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, rows: list[dict], system: str | None,
                   top_k: int, max_length: int, allowed: list[list[int]] | None = None, batch_size: int = 8,
                   precision: str = "32-true") -> dict[str, torch.Tensor]:
    """values/indices [positions, k] over every row's answer positions (rows in order), and lengths [rows]."""
    examples, ids = distill_examples(tokenizer, rows, system, max_length)
    items = [{"ids": seq, "n_answer": sum(t != IGNORE for t in e["labels"]), "allowed": allowed[i] if allowed else None}
             for i, (e, seq) in enumerate(zip(examples, ids, strict=True))]
    by_row = forced(TeacherLogits(net, tokenizer.pad_token_id, top_k), items, batch_size, precision)
    return {"values": torch.cat([v for v, _ in by_row]), "indices": torch.cat([i for _, i in by_row]),
            "lengths": torch.tensor([len(v) for v, _ in by_row], dtype=torch.long)}


def allowed_tokens(modality: DictConfig, rows: list[dict], net: torch.nn.Module,
                   tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Per row, the tokens the modality's grammar can emit (candidates of its separator) and end of sequence."""
    eos = models.eos_ids(net, tokenizer)
    table = GrammarTable(tokenizer, eos)
    return [sorted(set(table.candidates(modalities.grammar(modality, row))) | set(eos)) for row in rows]


def distill_loss(logits: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, support: str,
                 temperature: float = 1.0) -> torch.Tensor:
    """Mean over positions of KL(teacher || student), times T^2 (gradient scale independent of T).

    logits: the student's [positions, vocab]; values/indices: the teacher's top-k log-probs [positions, k].
    """
    if support not in SUPPORTS:
        raise SublimError(f"student.support={support} is not one of: {', '.join(SUPPORTS)}")
    valid = torch.isfinite(values)
    teacher = (values.masked_fill(~valid, _MASKED) / temperature).log_softmax(-1)
    if support == "vocab":
        student = (logits.float() / temperature).log_softmax(-1).gather(-1, indices.long())
    else:
        gathered = logits.float().gather(-1, indices.long()) / temperature
        student = gathered.masked_fill(~valid, _MASKED).log_softmax(-1)
    terms = torch.where(valid, teacher.exp() * (teacher - student), torch.zeros_like(teacher))
    return terms.sum(-1).mean() * temperature**2


def distill_collate(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """The SFT batch plus the teacher's top-k rows of every answer position, in (example, position) order."""
    return collate(batch, pad_id) | {"teacher_values": torch.cat([e["values"] for e in batch]),
                                     "teacher_indices": torch.cat([e["indices"] for e in batch])}


class DistillModule(StudentModule):
    """The LoRA student with KL(teacher || student) over answer positions instead of cross-entropy."""

    def __init__(self, net: PeftModel, student: DictConfig) -> None:
        super().__init__(net, student.lr, student.warmup_steps, student.weight_decay)
        self.support = student.support
        self.temperature = student.temperature

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits, targets = answer_logits(self.net, batch)
        return distill_loss(logits[targets != IGNORE], batch["teacher_values"], batch["teacher_indices"],
                            self.support, self.temperature)


def attach_teacher(examples: list[dict], logits: dict[str, torch.Tensor],
                   masks: list[Collection[int]] | None = None) -> list[dict]:
    """Give each (unmasked) example its rows of the teacher's logits; their answer lengths must agree.

    ``masks``: per example, answer positions left out of the loss (``mask_answer``); their teacher rows are dropped
    too, so the loss's remaining positions and the teacher's rows stay in step.
    """
    offsets = [0, *torch.cumsum(logits["lengths"], 0).tolist()]
    out = []
    for i, example in enumerate(examples):
        n = sum(t != IGNORE for t in example["labels"])
        if n != int(logits["lengths"][i]):
            raise SublimError(f"teacher logits cover {int(logits['lengths'][i])} answer tokens of example {i}, the "
                              f"student's tokenization {n}: the teacher and student must share a tokenizer")
        masked = set(masks[i]) if masks else set()
        rows = offsets[i] + torch.tensor([p for p in range(n) if p not in masked], dtype=torch.long)
        out.append({**mask_answer(example, masked), "values": logits["values"][rows],
                    "indices": logits["indices"][rows]})
    return out


def train_distill(net: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, rows: list[dict],
                  logits: dict[str, torch.Tensor], student: DictConfig, seed: int, out: Path,
                  loggers: list[Logger] | None = None) -> dict:
    """Distil the teacher's logits (one entry per row, in order) into a LoRA student; saves the adapter."""
    pl.seed_everything(seed, workers=True, verbose=False)
    examples = [tokenize_example(tokenizer, r["prompt"], r["completion"], student.max_length) for r in rows]
    examples = attach_teacher(examples, logits, [mask_positions(e, r) for e, r in zip(examples, rows, strict=True)])
    module = DistillModule(add_lora(net.train(), student), student)
    pad_id = tokenizer.pad_token_id
    # a partial, not a lambda: spawned training workers (student.devices > 1) receive it pickled
    return fit(module, examples, partial(distill_collate, pad_id=pad_id), student, seed, out, loggers)


def select(logits: dict[str, torch.Tensor], indices: list[int]) -> dict[str, torch.Tensor]:
    """The teacher logits of a subset of rows, in the subset's order."""
    offsets = [0, *torch.cumsum(logits["lengths"], 0).tolist()]
    spans = [torch.arange(offsets[i], offsets[i + 1]) for i in indices]
    flat = torch.cat(spans) if spans else torch.zeros(0, dtype=torch.long)
    return {"values": logits["values"][flat], "indices": logits["indices"][flat],
            "lengths": logits["lengths"][indices]}
