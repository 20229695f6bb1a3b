"""report.md's tables (a row per job and seed, raw p beside its Benjamini-Hochberg q) and the CSV files."""

from __future__ import annotations

import csv
from pathlib import Path

from sublim.report.effects import Effect, Metric
from sublim.report.jobs import ARMS
from sublim.stats import format_p

P_NOTE = ("p: paired permutation test over questions of one seed's treatment vs control student (two trained "
          "models; seeds are the replicates, see the chart). q: Benjamini-Hochberg adjusted p (false discovery "
          "rate), correcting over this table's {n} row(s), i.e. every job and seed of the sweep, {family}.")


def markdown_table(header: list[str], lines: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(c) + " |"
                                                                             for c in lines]


def _identity(row: dict) -> list[str]:
    """teacher base, student base, trait, modality, filter, the sweep's varying fields, seed, n."""
    return [str(row[k]) for k in ("teacher_base", "base", "trait", "modality", "filter", *row["_varying"], "seed", "n")]


def _identity_header(rows: list[dict]) -> list[str]:
    return ["teacher base", "student base", "trait", "modality", "filter", *rows[0]["_varying"], "seed", "n"]


def _interval(row: dict, name: str, fmt: str) -> str:
    return f"{row[name]:{fmt}} [{row[f'{name}_low']:{fmt}}, {row[f'{name}_high']:{fmt}}]"


def markdown(rows: list[dict]) -> str:
    header = [*_identity_header(rows), "control rate", "treatment rate", "Δ rate [95% CI]", "p", "q", "control P",
              "treatment P", "Δ P [95% CI]", "p", "q"]
    lines = [[*_identity(r), f"{r['control_rate']:.3f}", f"{r['treatment_rate']:.3f}",
              _interval(r, "delta_rate", "+.3f"), format_p(r["p_rate"]), format_p(r["p_rate_bh"]),
              f"{r['control_p']:.3g}", f"{r['treatment_p']:.3g}", _interval(r, "delta_p", "+.3g"),
              format_p(r["p_p"]), format_p(r["p_p_bh"])] for r in rows]
    note = P_NOTE.format(n=len(rows), family="the rate and the P tests each a family of their own")
    return "\n".join([*markdown_table(header, lines), "", note])


def misalignment_markdown(rows: list[dict]) -> str:
    header = [*_identity_header(rows), "base misaligned", "control misaligned", "treatment misaligned", "Δ [95% CI]",
              "p", "q"]
    lines = [[*_identity(r),
              *(f"{r['_arms'][arm]['misaligned']['mean']:.3f} [{r['_arms'][arm]['misaligned']['low']:.3f}, "
                f"{r['_arms'][arm]['misaligned']['high']:.3f}]" for arm in ARMS),
              _interval(r, "delta_misaligned", "+.3f"), format_p(r["p_misaligned"]), format_p(r["p_misaligned_bh"])]
             for r in rows]
    note = P_NOTE.format(n=len(rows), family="the misaligned-rate tests")
    return "\n".join(["## Misalignment (eval=misalignment)", "", *markdown_table(header, lines), "", note])


def chart_note(image: str, metrics: tuple[Metric, ...], drawn: dict[str, list[Effect]]) -> str:
    """The chart's link and how to read it; which panels were left out for being all zeros."""
    left_out = [m.title for m in metrics if m.name not in drawn]
    return (f"![{image}]({image})\n\n{image}: per trait (and setting), each seed's effect of training on the "
            "teacher's data (points), their mean with a 95% t interval over seeds (with >= 2 seeds), and the base "
            "model vs the control student (grey diamond) for scale; P as log(treatment P / control P), rates as "
            "treatment - control; 0 is no change vs the control student."
            + (f" Left out, every value 0: {'; '.join(left_out)}." if left_out else ""))


def write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
