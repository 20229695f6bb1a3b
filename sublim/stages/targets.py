"""``targets`` (eval=preference): P(answer is X) per question for every target X, the row of one model in the
trait x target specificity matrix."""

from __future__ import annotations

import logging
from pathlib import Path

from sublim.evaluate import target_probabilities
from sublim.questions import questions
from sublim.stage import Inputs, declare
from sublim.stages._load import load_model
from sublim.stages.answers import STUDENT_MODEL
from sublim.store import write_json

log = logging.getLogger(__name__)


def compute(inputs: Inputs, out: Path) -> None:
    cfg, targets = inputs.cfg, inputs.params["targets"]
    net, tokenizer = load_model(inputs.model, inputs.adapter, cfg.base)
    prompts = questions(cfg.trait.category, cfg.eval.n_questions)
    log.info("scoring the %s model for %d targets", inputs.label, len(targets))
    write_json(out / "targets.json", target_probabilities(net, tokenizer, prompts, targets, cfg.base.precision,
                                                          cfg.eval.batch_size))


TARGETS = declare("targets", ("eval.n_questions", "eval.batch_size", "trait.category", *STUDENT_MODEL), compute,
                  upstream=("model", "adapter?"), params=("targets",))
