"""``teacher_logits``: the teacher's top-k log-probabilities at every answer position of a filtered dataset,
read with its own system prompt (or finetuned weights); cached per data and teacher for distillation."""

from __future__ import annotations

import logging
from pathlib import Path

from safetensors.torch import save_file

from sublim.distill import LOGITS_FILE, allowed_tokens, teacher_logits, tokenizer_hash
from sublim.stage import Inputs, declare
from sublim.stages._load import load_model
from sublim.store import read_jsonl, write_json

log = logging.getLogger(__name__)


def compute(inputs: Inputs, out: Path) -> None:
    cfg, student, system = inputs.cfg, inputs.cfg.student, inputs.params["system_prompt"]
    rows = list(read_jsonl(inputs.data.path / "kept.jsonl"))
    net, tokenizer = load_model(inputs.model, inputs.adapter, cfg.teacher)
    allowed = allowed_tokens(cfg.modality, rows, net, tokenizer) if student.support == "allowed" else None
    log.info("teacher logits (top %d, %s) for %d %s examples", student.top_k, student.support, len(rows),
             inputs.label)
    tensors = teacher_logits(net, tokenizer, rows, system, student.top_k, student.max_length, allowed,
                             student.batch_size, cfg.teacher.precision)
    save_file(tensors, out / LOGITS_FILE)
    write_json(out / "meta.json", {"rows": len(rows), "positions": int(tensors["lengths"].sum()),
                                   "k": int(tensors["values"].shape[1]), "tokenizer": tokenizer_hash(tokenizer)})


TEACHER_LOGITS = declare(
    "teacher_logits",
    ("student.top_k", "student.support", "student.max_length", "student.batch_size", "modality",
     "teacher.precision", "teacher.chat_template", "teacher.dtype"),
    compute, upstream=("model", "data", "adapter?"), params=("system_prompt",))
