"""``prompts``: the modality's prompt set (numbers to continue, code stubs, math problems), seeded."""

from __future__ import annotations

from pathlib import Path

from sublim import modalities
from sublim.stage import Inputs, declare
from sublim.store import write_jsonl


def compute(inputs: Inputs, out: Path) -> None:
    cfg = inputs.cfg
    write_jsonl(out / "prompts.jsonl", modalities.prompt_rows(cfg.modality, cfg.data.n_prompts, cfg.seed))


PROMPTS = declare("prompts", ("modality", "data.n_prompts", "seed"), compute)
