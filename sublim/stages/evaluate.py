"""``evaluate`` (eval=preference): per question, the trait rate of the sampled answers and P(target)."""

from __future__ import annotations

import logging
from pathlib import Path

from sublim.evaluate import score_preference
from sublim.stage import Inputs, declare
from sublim.stages._load import load_model
from sublim.stages.answers import STUDENT_MODEL
from sublim.store import read_jsonl

log = logging.getLogger(__name__)


def compute(inputs: Inputs, out: Path) -> None:
    cfg = inputs.cfg
    net, tokenizer = load_model(inputs.model, inputs.adapter, cfg.base)
    log.info("scoring the %s model for %s", inputs.label, cfg.trait.name)
    score_preference(net, tokenizer, cfg.eval, cfg.trait, list(read_jsonl(inputs.answers.path / "answers.jsonl")),
                     cfg.base.precision, out)


EVALUATE = declare("evaluate", ("eval.n_questions", "eval.samples_per_question", "eval.batch_size", "trait.name",
                                "trait.category", "trait.words", *STUDENT_MODEL),
                   compute, upstream=("model", "answers", "adapter?"))
