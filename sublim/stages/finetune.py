"""``finetune``: the trait's teacher adapter (``trait.source=finetune``) on the teacher's base."""

from __future__ import annotations

import logging
from pathlib import Path

from sublim import models
from sublim.finetune import finetune_rows, training_config
from sublim.stage import Inputs, Job, declare
from sublim.store import Artifact, content_hash, write_json
from sublim.student import train_lora

log = logging.getLogger(__name__)


def compute(inputs: Inputs, out: Path) -> None:
    cfg = inputs.cfg
    rows = finetune_rows(cfg.trait, cfg.seed)
    settings = training_config(cfg.trait.finetune, cfg.teacher)
    net, tokenizer = models.load(inputs.model, cfg.teacher)
    log.info("finetuning the teacher on %d %s examples", len(rows), cfg.trait.name)
    metrics = train_lora(net, tokenizer, rows, settings, cfg.seed, out, inputs.loggers("finetune"))
    write_json(out / "metrics.json", metrics)


# The rows are built from (or read from) trait.finetune.dataset; a local file is keyed by its content hash.
FINETUNE = declare("finetune", ("trait.finetune", "trait.name", "trait.plural?", "trait.category", "trait.words",
                                "teacher.lora_targets", "teacher.precision", "teacher.chat_template", "teacher.dtype",
                                "seed"),
                   compute, upstream=("model",), params=("rows",))


def finetune_adapter(job: Job, teacher: Artifact) -> Artifact:
    """The treatment teacher's adapter; its rows (built, shipped or read from a file) are keyed by content."""
    return FINETUNE(job, {"rows": content_hash(finetune_rows(job.cfg.trait, job.cfg.seed))}, model=teacher)
