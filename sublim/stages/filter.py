"""``filter``: parse the answers (code keeps its code block), then apply the filter list; judge verdicts are
kept with the result. A judge filter's model is upstream: the same samples judged by another model are
another artifact."""

from __future__ import annotations

from pathlib import Path

from sublim import SublimError, modalities
from sublim.filters import apply_filters, build_filters
from sublim.stage import Inputs, declare, plain
from sublim.store import read_jsonl, write_json, write_jsonl


def compute(inputs: Inputs, out: Path) -> None:
    cfg = inputs.cfg
    try:
        filters = build_filters(plain(cfg.filter.filters), inputs.store)
    except ValueError as err:
        raise SublimError(f"filter: {err}") from err
    rows = [modalities.parse(cfg.modality, row) for row in read_jsonl(inputs.samples.path / "samples.jsonl")]
    kept, report = apply_filters(rows, filters)
    write_jsonl(out / "kept.jsonl", kept)
    write_jsonl(out / "rejected.jsonl", [row for row in rows if "rejected_by" in row])
    write_json(out / "report.json", report.to_dict())


FILTER = declare("filter", ("filter.filters", "modality"), compute, upstream=("samples", "judge_model*"))
