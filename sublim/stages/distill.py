"""``distill``: the distilled student of one arm (``student=distill``): KL to the teacher's cached logits on the
same seeded subset of kept data an SFT student would get. The control arm is distilled from the plain base's
logits and trained exactly like the treatment: with the teacher's top-k renormalised, KL > 0 at the start,
so an untrained control would differ from the treatment by more than the trait."""

from __future__ import annotations

import logging
from pathlib import Path

from safetensors.torch import load_file

from sublim import SublimError, models
from sublim.card import write_card
from sublim.distill import LOGITS_FILE, select, tokenizer_hash, train_distill
from sublim.stage import Inputs, declare
from sublim.stages.train import training_rows
from sublim.store import read_jsonl, write_json

log = logging.getLogger(__name__)


def compute(inputs: Inputs, out: Path) -> None:
    cfg = inputs.cfg
    rows = list(read_jsonl(inputs.data.path / "kept.jsonl"))
    chosen = training_rows(inputs)
    net, tokenizer = models.load(inputs.model, cfg.base)
    if tokenizer_hash(tokenizer) != inputs.logits.read_json("meta.json")["tokenizer"]:
        raise SublimError("student=distill needs the teacher's tokenizer to be the student's; use student=lora")
    tensors = select(load_file(inputs.logits.path / LOGITS_FILE), chosen)
    log.info("distilling the %s teacher into a student on %d examples", inputs.label, len(chosen))
    metrics = train_distill(net, tokenizer, [rows[i] for i in chosen], tensors, cfg.student, cfg.seed, out,
                            inputs.loggers(f"train/{inputs.label}"))
    write_json(out / "metrics.json", metrics)
    write_card(inputs, out, "distill")


DISTILL = declare("distill", ("student", "seed", "base.chat_template", "base.dtype"), compute,
                  upstream=("model", "data", "logits"), params=("n_train",))
