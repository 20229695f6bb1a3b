"""report.md's tables (a row per job and seed, raw p beside its Benjamini-Hochberg q) and the CSV files."""

from __future__ import annotations

import csv
from pathlib import Path

from sublim.replication import seed_test
from sublim.report.effects import Effect, Metric
from sublim.report.jobs import ARMS
from sublim.report.matrix import setting_title as setting_label
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


def pooled_markdown(drawn: dict[str, list[Effect]], metrics: tuple[Metric, ...]) -> str:
    """Per setting and trait, the across-seed test of each charted metric's effect: the seeds are the replicates,
    so this, not a row's p, is the test of "training on this teacher's data moves the student"."""
    lines = []
    titles = {m.name: m for m in metrics}
    for name, panel in drawn.items():
        for effect in panel:
            test = seed_test(effect.values)
            ci = "-" if test["low"] is None else f"[{test['low']:+.3f}, {test['high']:+.3f}]"
            lines.append([titles[name].ylabel.split("   ")[0], setting_label(effect.setting), effect.trait,
                          str(test["n_seeds"]), ", ".join(f"{v:+.3f}" for v in effect.values),
                          f"{test['mean']:+.3f}", ci, _p(test["p_value"]), _p(test["p_sign_flip"]),
                          "-" if test["mde"] is None else f"{test['mde']:.3f}", f"{effect.reference:+.3f}"])
    header = ["effect", "setting", "trait", "seeds", "per seed", "mean", "95% t CI", "t-test p", "sign-flip p",
              "MDE", "base vs control"]
    note = ("Across seeds: each seed's effect is one replicate (its own data draw, students and control). p: "
            "two-sided one-sample t-test of the per-seed effects against 0 (df = seeds - 1) and the exact sign-flip "
            "test; MDE: the effect these seeds' spread could detect (one-sided alpha 0.05, power 0.8; post hoc). "
            "base vs control: the same effect of the base model against the control student (mean over seeds), "
            "what training on the control's data did.")
    return "\n".join(["## Across seeds", "", *markdown_table(header, lines), "", note])


def _p(value: float | None) -> str:
    return "-" if value is None else format_p(value)


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
