"""The student: the base model plus a LoRA adapter, finetuned on (user prompt -> teacher answer).

``StudentModule`` is a LightningModule (Lightning owns the loop, device, precision, gradient
accumulation and loggers; PEFT owns the adapter). The loss covers the answer tokens only, and the
student sees the same chat template as the teacher but never the trait's system prompt.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from peft import LoraConfig, PeftModel, get_peft_model
from pytorch_lightning.loggers import CSVLogger, Logger
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from sublim import SublimError
from sublim.decoding import common_prefix

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
    """LoRA SFT with AdamW and a linear schedule with warm-up; stops with a clear error on a NaN loss."""

    def __init__(self, net: PeftModel, lr: float, warmup_steps: int, weight_decay: float = 0.0) -> None:
        super().__init__()
        self.net = net
        self.lr = lr
        self.warmup_steps = warmup_steps
        self.weight_decay = weight_decay
        self.tokens_seen = 0

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return answer_loss(self.net, batch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        if not torch.isfinite(loss):
            raise SublimError(
                f"student loss became {loss.item()} at step {self.global_step}: lower student.lr "
                f"(now {self.lr}) or use student.precision=32-true; finished stages are kept in the store"
            )
        self.tokens_seen += int(batch["attention_mask"].sum())
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        self.log("train/tokens", float(self.tokens_seen), reduce_fx="max")
        return loss

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
    pad_id = tokenizer.pad_token_id
    module = StudentModule(add_lora(net.train(), student), student.lr, student.warmup_steps, student.weight_decay)
    return fit(module, examples, lambda batch: collate(batch, pad_id), student, seed, out, loggers)


def fit(module: StudentModule, examples: list, collate_fn: Callable[[list], dict], student: DictConfig, seed: int,
        out: Path, loggers: list[Logger] | None = None) -> dict:
    """Lightning fit of a student module over examples; saves the adapter under ``out`` and returns metrics."""
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(examples, batch_size=student.batch_size, shuffle=True, generator=generator,
                        collate_fn=collate_fn)
    trainer = pl.Trainer(
        accelerator="auto", devices=1, max_epochs=student.epochs, precision=student.precision,
        accumulate_grad_batches=student.accumulate_grad_batches,
        logger=[CSVLogger(out, name="log", version="")] + list(loggers or []),
        log_every_n_steps=1, enable_checkpointing=False, enable_model_summary=False,
    )
    start = time.time()
    trainer.fit(module, train_dataloaders=loader)
    seconds = time.time() - start
    module.net.save_pretrained(out / ADAPTER_DIR)
    loss = trainer.callback_metrics.get("train/loss")
    return {
        "n_examples": len(examples),
        "epochs": student.epochs,
        "steps": trainer.global_step,
        "final_loss": float(loss) if loss is not None else math.nan,
        "tokens": module.tokens_seen,
        "seconds": round(seconds, 2),
        "tokens_per_second": round(module.tokens_seen / max(seconds, 1e-9), 1),
    }


def load_student(net: torch.nn.Module, adapter_dir: Path) -> torch.nn.Module:
    """Base plus adapter, merged for fast inference (the base copy in memory is the student's own)."""
    return PeftModel.from_pretrained(net, adapter_dir).merge_and_unload().eval()
