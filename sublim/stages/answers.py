"""``answers`` (eval=preference): k sampled answers per "favourite <category>?" question of a model; trait-free,
so every trait of a category shares them."""

from __future__ import annotations

import logging
from pathlib import Path

from sublim.evaluate import SAMPLING_FIELDS, sample_answers
from sublim.stage import Inputs, declare
from sublim.stages._load import load_model
from sublim.store import write_jsonl

log = logging.getLogger(__name__)

# How the model reads and writes: its precision, chat template and weights' dtype (every model-running stage)
STUDENT_MODEL = ("base.precision", "base.chat_template", "base.dtype")


def compute(inputs: Inputs, out: Path) -> None:
    cfg = inputs.cfg
    net, tokenizer = load_model(inputs.model, inputs.adapter, cfg.base)
    log.info("sampling answers of the %s model", inputs.label)
    write_jsonl(out / "answers.jsonl",
                sample_answers(net, tokenizer, cfg.eval, cfg.trait.category, cfg.seed, cfg.base.precision))


ANSWERS = declare("answers", (*(f"eval.{f}" for f in SAMPLING_FIELDS), "trait.category", "seed", *STUDENT_MODEL),
                  compute, upstream=("model", "adapter?"))
