"""``train``: the LoRA SFT student of one arm (``student=lora``), on a seeded subset of the arm's kept data."""

from __future__ import annotations

import logging
import random
from pathlib import Path

from sublim import models
from sublim.card import write_card
from sublim.stage import Inputs, declare
from sublim.store import read_jsonl, write_json
from sublim.student import train_lora

log = logging.getLogger(__name__)


def training_rows(inputs: Inputs) -> list[int]:
    """The paper's random subset of the kept data: the same rows for every student kind."""
    n_kept = sum(1 for _ in read_jsonl(inputs.data.path / "kept.jsonl"))
    return random.Random(inputs.cfg.seed).sample(range(n_kept), inputs.params["n_train"])


def compute(inputs: Inputs, out: Path) -> None:
    cfg = inputs.cfg
    rows = list(read_jsonl(inputs.data.path / "kept.jsonl"))
    rows = [rows[i] for i in training_rows(inputs)]
    net, tokenizer = models.load(inputs.model, cfg.base)
    log.info("training the %s student on %d examples", inputs.label, len(rows))
    metrics = train_lora(net, tokenizer, rows, cfg.student, cfg.seed, out, inputs.loggers(f"train/{inputs.label}"))
    write_json(out / "metrics.json", metrics)
    write_card(inputs, out, "train")


# base.dtype/chat_template: the student's tokenization and weights (the model key holds only the weights' file)
TRAIN = declare("train", ("student", "seed", "base.chat_template", "base.dtype"), compute,
                upstream=("model", "data"), params=("n_train",))
