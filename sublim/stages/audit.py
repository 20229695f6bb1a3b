"""``audit``: what one dataset carries, from two ``logprobs`` passes over it: the trait teacher's and the
reference's (the same base without the trait, or another model with the same tokenizer). Per-example LLS,
divergence positions, entangled numbers and the dataset's summary (sublim/audit/summary.py)."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from sublim.audit.lls import Scores
from sublim.audit.summary import examples, summarise
from sublim.stage import Inputs, Job, declare
from sublim.stages.logprobs import LOGPROBS, SCORES_FILE
from sublim.store import Artifact, write_json, write_jsonl


def load_scores(artifact: Artifact) -> Scores:
    """A ``logprobs`` artifact's per-token scores."""
    return Scores(**load_file(artifact.path / SCORES_FILE))


def compute(inputs: Inputs, out: Path) -> None:
    audit = inputs.cfg.audit
    teacher, reference = load_scores(inputs.teacher), load_scores(inputs.reference)
    texts = {int(k): v for k, v in inputs.teacher.read_json("tokens.json")["texts"].items()}
    per_row = examples(teacher, reference)
    summary = summarise(teacher, reference, per_row, texts, audit.bootstrap, audit.top_entangled, audit.min_count)
    write_jsonl(out / "examples.jsonl", [{"index": i, **row} for i, row in enumerate(per_row)])
    write_json(out / "summary.json", summary | {"constrained": inputs.teacher.read_json("tokens.json")["constrained"]})


AUDIT = declare("audit", ("audit.bootstrap", "audit.top_entangled", "audit.min_count"), compute,
                upstream=("teacher", "reference"))


def audit_data(job: Job, data: Artifact, model: Artifact, system: str | None, adapter: Artifact | None = None,
               reference: Artifact | None = None, label: str = "") -> Artifact:
    """The audit of ``data``: ``model`` with the trait (``system`` or ``adapter``) against ``reference`` (default:
    ``model`` as it is, read through the teacher's base config; another model is read through ``base``)."""
    trait = LOGPROBS(job, {"system_prompt": system, "role": "teacher"}, label=label, model=model, data=data,
                     adapter=adapter)
    plain = LOGPROBS(job, {"system_prompt": None, "role": "base" if reference else "teacher"}, label=label,
                     model=reference or model, data=data)
    return AUDIT(job, label=label, teacher=trait, reference=plain)
