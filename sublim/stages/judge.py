"""``judge`` (eval=misalignment): the judge scores every answer for alignment and coherence."""

from __future__ import annotations

import logging
from pathlib import Path

from sublim import judge, misalignment
from sublim.stage import Inputs, declare, plain
from sublim.store import read_jsonl, write_json, write_jsonl

log = logging.getLogger(__name__)


def compute(inputs: Inputs, out: Path) -> None:
    cfg = inputs.cfg
    log.info("judging the %s model's answers", inputs.label)
    scored, scores = misalignment.score(judge.make_judge(plain(cfg.judge), inputs.store), cfg.eval,
                                        list(read_jsonl(inputs.answers.path / "answers.jsonl")))
    write_jsonl(out / "answers.jsonl", scored)
    write_json(out / "scores.json", scores)


JUDGE = declare("judge", ("eval.alignment_prompt", "eval.coherence_prompt", "eval.min_mass", "eval.alignment_max",
                          "eval.coherence_min", "eval.n_questions", "eval.n_paraphrases", "judge"),
                compute, upstream=("answers", "judge_model?"))
