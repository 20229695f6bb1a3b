"""``audit``: what one dataset carries: every answer scored under the trait teacher and under the reference.

The teacher is the model that has the trait: its base with the trait's system prompt, or with its finetuned
adapter. The reference is the same base without it (or, from ``python -m sublim.audit``, another model of
the same tokenizer). Constrained data is scored over the grammar's tokens (``sampling.constrained``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from safetensors.torch import save_file

from sublim import SublimError, models
from sublim.audit.lls import score_answers
from sublim.audit.summary import examples, summarise
from sublim.modalities import grammar
from sublim.stage import Inputs, declare
from sublim.stages._load import load_model
from sublim.store import read_jsonl, write_json, write_jsonl
from sublim.teacher import token_texts

log = logging.getLogger(__name__)

SCORES_FILE = "scores.safetensors"


def compute(inputs: Inputs, out: Path) -> None:
    cfg, audit = inputs.cfg, inputs.cfg.audit
    rows = list(read_jsonl(inputs.data.path / "kept.jsonl"))
    if not rows:
        raise SublimError(f"audit: the {inputs.label or 'given'} dataset has no rows to audit")
    grammars = None
    if cfg.sampling.constrained:
        if missing := [i for i, row in enumerate(rows) if "separator" not in row]:
            raise SublimError(f"audit: sampling.constrained=true renormalises over the numbers grammar, but row "
                              f"{missing[0]} has no 'separator'; use sampling.constrained=false")
        grammars = [grammar(cfg.modality, row) for row in rows]
    passes, loaded = {}, None
    for role, model, adapter, system, base in (
            ("reference", inputs.reference or inputs.model, None, None, cfg.base if inputs.reference else cfg.teacher),
            ("teacher", inputs.model, inputs.adapter, inputs.params["system_prompt"], cfg.teacher)):
        if loaded is None or adapter is not None or model.key != loaded[0]:  # a prompt trait: the same weights
            loaded = (model.key, *load_model(model, adapter, base))
        _, net, tokenizer = loaded
        log.info("audit %s: scoring %d answers under the %s", inputs.label, len(rows), role)
        passes[role] = score_answers(net, tokenizer, rows, system, models.eos_ids(net, tokenizer), grammars,
                                     audit.max_length, audit.batch_size, cfg.teacher.precision)
    teacher, reference = passes["teacher"], passes["reference"]
    per_row = examples(teacher, reference)
    summary = summarise(teacher, reference, per_row, token_texts(tokenizer), audit.bootstrap, audit.top_entangled,
                        audit.min_count)
    save_file(teacher.tensors("teacher_") | reference.tensors("reference_"), out / SCORES_FILE)
    write_jsonl(out / "examples.jsonl", [{"index": i, **row} for i, row in enumerate(per_row)])
    write_json(out / "summary.json", summary | {"constrained": bool(grammars)})


AUDIT = declare(
    "audit",
    ("audit.batch_size", "audit.max_length", "audit.bootstrap", "audit.top_entangled", "audit.min_count",
     "modality", "sampling.constrained", "teacher.precision", "teacher.chat_template", "teacher.dtype",
     "base.chat_template", "base.dtype"),
    compute, upstream=("model", "data", "adapter?", "reference?"), params=("system_prompt",))
