"""``open_answers`` (eval=misalignment): k sampled answers to open-ended questions, spread over paraphrases."""

from __future__ import annotations

import logging
from pathlib import Path

from sublim import misalignment
from sublim.stage import Inputs, declare
from sublim.stages._load import load_model
from sublim.stages.answers import STUDENT_MODEL
from sublim.store import write_jsonl

log = logging.getLogger(__name__)


def compute(inputs: Inputs, out: Path) -> None:
    cfg = inputs.cfg
    net, tokenizer = load_model(inputs.model, inputs.adapter, cfg.base)
    log.info("sampling open-ended answers of the %s model", inputs.label)
    write_jsonl(out / "answers.jsonl",
                misalignment.sample_answers(net, tokenizer, cfg.eval, cfg.seed, cfg.base.precision))


OPEN_ANSWERS = declare("open_answers", (*(f"eval.{f}" for f in misalignment.SAMPLING_FIELDS), "seed",
                                        *STUDENT_MODEL),
                       compute, upstream=("model", "adapter?"))
