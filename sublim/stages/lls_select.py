"""``lls_select``: one arm's filtered data cut to the examples the audit ranks highest (``filter.lls.keep=top``)
or lowest (``bottom``) by LLS, optionally with each row's divergence positions to mask out of the student's loss.

A defender who can compute LLS (the trait teacher and the clean base) keeps the bottom of the ranking, or masks the
positions where the two disagree; the top is the concentrated-signal probe (docs/defences.md). The output is a
data artifact like the filter stage's (``kept.jsonl``, ``rejected.jsonl``, ``report.json``), so training and the
job's reports read it unchanged; the cut is one more reject reason of the arm's filter report.
"""

from __future__ import annotations

import math
from pathlib import Path

from sublim import SublimError
from sublim.filters import FilterReport
from sublim.stage import Inputs, declare
from sublim.store import read_jsonl, write_json, write_jsonl


def ranked(lls: list[float], keep: str) -> list[int]:
    """Row indexes from the most to the least wanted: the highest LLS first for ``top``, the lowest for ``bottom``.

    Ties go to the lower index. A row without a defined LLS (NaN: every answer position outside the grammar) carries
    no measured signal either way, so it ranks last for both and is kept only when the fraction reaches it.
    """
    sign = -1.0 if keep == "top" else 1.0
    return sorted(range(len(lls)), key=lambda i: (math.isnan(lls[i]), 0.0 if math.isnan(lls[i]) else sign * lls[i], i))


def compute(inputs: Inputs, out: Path) -> None:
    lls = inputs.cfg.filter.lls
    rows = list(read_jsonl(inputs.data.path / "kept.jsonl"))
    scored = list(read_jsonl(inputs.audit.path / "examples.jsonl"))
    if [r["index"] for r in scored] != list(range(len(rows))):
        raise SublimError(f"lls_select: the {inputs.label} audit scores {len(scored)} rows, the data has {len(rows)}")
    n_keep = round(lls.fraction * len(rows))  # Python's round: half to even
    chosen = set(ranked([r["lls"] for r in scored], lls.keep)[:n_keep])
    kept, dropped = [], []
    for i, (row, score) in enumerate(zip(rows, scored, strict=True)):
        row = {**row, "lls": score["lls"]} | ({"mask_positions": score["divergence"]} if lls.mask_divergence else {})
        (kept if i in chosen else dropped).append(row)
    reason = f"lls/outside_{lls.keep}"
    report = inputs.data.read_json("report.json")
    rejected = report["rejected"] | ({reason: len(dropped)} if dropped else {})
    write_jsonl(out / "kept.jsonl", kept)
    write_jsonl(out / "rejected.jsonl", [row | {"rejected_by": reason} for row in dropped])
    write_json(out / "report.json", FilterReport(report["total"], len(kept), rejected).to_dict())


LLS_SELECT = declare("lls_select", ("filter.lls",), compute, upstream=("data", "audit"))
