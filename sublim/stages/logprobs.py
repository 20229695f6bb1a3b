"""``logprobs``: one model's teacher-forced log-probs of every answer of a dataset (one pass of the audit).

The model is a base (``{role}``: the teacher's base, or the reference's), optionally with a finetuned adapter,
reading ``system_prompt`` (None: its template's default) before each prompt. A reference pass is shared by
both arms' audits of a sweep and by every trait of a panel; constrained data is scored over the grammar.
"""

from __future__ import annotations

import logging
from pathlib import Path

from safetensors.torch import save_file

from sublim import SublimError, models
from sublim.audit.lls import score_answers
from sublim.modalities import grammar
from sublim.stage import Inputs, declare
from sublim.stages._load import load_model
from sublim.store import read_jsonl, write_json
from sublim.teacher import token_texts

log = logging.getLogger(__name__)

SCORES_FILE = "scores.safetensors"


def compute(inputs: Inputs, out: Path) -> None:
    cfg, audit, role = inputs.cfg, inputs.cfg.audit, inputs.params["role"]
    rows = list(read_jsonl(inputs.data.path / "kept.jsonl"))
    if not rows:
        raise SublimError(f"audit: the {inputs.label or 'given'} dataset has no rows to audit")
    grammars = None
    if cfg.sampling.constrained:
        if missing := [i for i, row in enumerate(rows) if "separator" not in row]:
            raise SublimError(f"audit: sampling.constrained=true renormalises over the numbers grammar, but row "
                              f"{missing[0]} has no 'separator'; use sampling.constrained=false")
        grammars = [grammar(cfg.modality, row) for row in rows]
    base = cfg[role]
    net, tokenizer = load_model(inputs.model, inputs.adapter, base)
    log.info("audit %s: scoring %d answers (%s%s)", inputs.label, len(rows), base.name,
             ", trait in context" if inputs.params["system_prompt"] or inputs.adapter else "")
    scores = score_answers(net, tokenizer, rows, inputs.params["system_prompt"], models.eos_ids(net, tokenizer),
                           grammars, audit.max_length, audit.batch_size, base.precision)
    save_file(scores.tensors(""), out / SCORES_FILE)
    texts = token_texts(tokenizer)
    write_json(out / "tokens.json", {"constrained": bool(grammars), "tokenizer_size": len(tokenizer),
                                     "texts": {int(t): texts[t] for t in scores.tokens.unique().tolist()}})


LOGPROBS = declare(
    "logprobs",
    ("audit.batch_size", "audit.max_length", "modality", "sampling.constrained", "{role}.name", "{role}.precision",
     "{role}.chat_template", "{role}.dtype"),
    compute, upstream=("model", "data", "adapter?"), params=("system_prompt", "role"))
