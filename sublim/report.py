"""Sweep report: ``python -m sublim.report <sweep dir>`` (also run by a Hydra callback after -m).

Reads every job's results.json under the sweep dir and writes report.md (one row per job),
report.csv and report.png (grouped bars with 95% CIs, like the paper's figures); with W&B on, it logs
one summary run with the table and chart in the sweep's group.

Misalignment jobs (eval=misalignment) get their own table, report_misalignment.csv and
misalignment.png: the misaligned-answer rate of base, control and treatment per job, 95% CIs, and
treatment vs control.

Specificity: when a sweep holds several traits of one setting (teacher base, student base, student,
trait source), report.md also gets the trait x target matrix of log(treatment P / control P), averaged
over seeds, with a permutation test that the diagonal stands above its row and column (seeds are the
replicates), and matrix_<n>.png heatmaps.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from sublim.stats import diagonal_permutation_test, format_p

log = logging.getLogger(__name__)

COLUMNS = ["job", "teacher_base", "base", "trait", "modality", "filter", "n", "control_rate", "treatment_rate",
           "delta_rate", "delta_rate_low", "delta_rate_high", "p_rate", "control_p", "treatment_p", "delta_p",
           "delta_p_low", "delta_p_high", "p_p"]


ARMS = ("base", "control", "treatment")
MISALIGNMENT_COLUMNS = ["job", "teacher_base", "base", "trait", "modality", "filter", "n", "base_misaligned",
                       "control_misaligned", "treatment_misaligned", "delta_misaligned", "delta_misaligned_low",
                       "delta_misaligned_high", "p_misaligned"]


def _jobs(sweep_dir: Path, kind: str) -> list[tuple[Path, dict]]:
    """(job dir, results) of the sweep's finished LLM jobs of one eval kind, in job order."""
    out = []
    for path in sorted(sweep_dir.glob("**/results.json"), key=_job_order):
        results = json.loads(path.read_text())
        if "treatment_vs_control" in results and results.get("eval", "preference") == kind:
            out.append((path.parent, results))
    return out


def _job_fields(sweep_dir: Path, job: Path, results: dict) -> dict:
    """What identifies a job in a report row, and what plots and W&B need."""
    return {"job": str(job.relative_to(sweep_dir)), "teacher_base": results["teacher_base"], "base": results["base"],
            "trait": results["trait"], "modality": results["modality"], "filter": results["filter"],
            "n": results["arms"]["treatment"]["n_train"], "_arms": results["arms"],
            "_logger": results.get("config", {}).get("logger", {})}


def collect(sweep_dir: Path) -> list[dict]:
    """One row per preference job of the sweep (other tasks and eval kinds are skipped)."""
    rows = []
    for job, results in _jobs(sweep_dir, "preference"):
        arms, tests = results["arms"], results["treatment_vs_control"]
        rate, prob = tests["rate"], tests["probability"]
        rows.append({
            **_job_fields(sweep_dir, job, results),
            "control_rate": arms["control"]["rate"]["mean"], "treatment_rate": arms["treatment"]["rate"]["mean"],
            "delta_rate": rate["delta"], "delta_rate_low": rate["ci"]["low"], "delta_rate_high": rate["ci"]["high"],
            "p_rate": rate["p_value"],
            "control_p": arms["control"]["probability"]["mean"],
            "treatment_p": arms["treatment"]["probability"]["mean"],
            "delta_p": prob["delta"], "delta_p_low": prob["ci"]["low"], "delta_p_high": prob["ci"]["high"],
            "p_p": prob["p_value"], "_seed": results.get("seed", 0),
            "_setting": (results["teacher_base"], results["base"], results.get("student", "lora"),
                         results.get("source", "prompt"), results["modality"], results["filter"]),
        })
    return rows


def collect_misalignment(sweep_dir: Path) -> list[dict]:
    """One row per misalignment job: the misaligned-answer rate per arm and treatment vs control."""
    rows = []
    for job, results in _jobs(sweep_dir, "misalignment"):
        arms, test = results["arms"], results["treatment_vs_control"]["misaligned"]
        rows.append({**_job_fields(sweep_dir, job, results),
                     **{f"{arm}_misaligned": arms[arm]["misaligned"]["mean"] for arm in ARMS},
                     "delta_misaligned": test["delta"], "delta_misaligned_low": test["ci"]["low"],
                     "delta_misaligned_high": test["ci"]["high"], "p_misaligned": test["p_value"]})
    return rows


def _job_order(path: Path) -> tuple:
    """Hydra job dirs start with the job number: sort 2_ before 10_."""
    head = path.parent.name.split("_", 1)[0]
    return (int(head) if head.isdigit() else sys.maxsize, str(path))


def markdown(rows: list[dict]) -> str:
    header = ("| teacher base | student base | trait | modality | filter | n | control rate | treatment rate | "
              "Δ rate [95% CI] | p | control P | treatment P | Δ P [95% CI] | p |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['teacher_base']} | {r['base']} | {r['trait']} | {r['modality']} | {r['filter']} | {r['n']} | "
            f"{r['control_rate']:.3f} | {r['treatment_rate']:.3f} | "
            f"{r['delta_rate']:+.3f} [{r['delta_rate_low']:+.3f}, {r['delta_rate_high']:+.3f}] | "
            f"{format_p(r['p_rate'])} | {r['control_p']:.3g} | {r['treatment_p']:.3g} | "
            f"{r['delta_p']:+.3g} [{r['delta_p_low']:+.3g}, {r['delta_p_high']:+.3g}] | {format_p(r['p_p'])} |")
    return "\n".join(lines)


def misalignment_markdown(rows: list[dict]) -> str:
    header = ("| teacher base | student base | trait | modality | filter | n | base misaligned | control misaligned "
              "| treatment misaligned | Δ [95% CI] | p |")
    lines = ["## Misalignment (eval=misalignment)", "", header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        cells = [f"{r['_arms'][arm]['misaligned']['mean']:.3f} [{r['_arms'][arm]['misaligned']['low']:.3f}, "
                 f"{r['_arms'][arm]['misaligned']['high']:.3f}]" for arm in ARMS]
        delta = (f"{r['delta_misaligned']:+.3f} [{r['delta_misaligned_low']:+.3f}, "
                 f"{r['delta_misaligned_high']:+.3f}]")
        lines.append(f"| {r['teacher_base']} | {r['base']} | {r['trait']} | {r['modality']} | {r['filter']} | "
                     f"{r['n']} | {' | '.join(cells)} | {delta} | {format_p(r['p_misaligned'])} |")
    return "\n".join(lines)


PREFERENCE_PANELS = (("probability", "P(target word as the answer)"), ("rate", "sampled trait rate"))
MISALIGNMENT_PANELS = (("misaligned", "misaligned answers (alignment low, coherence high)"),)


def plot(rows: list[dict], path: Path, panels: tuple[tuple[str, str], ...] = PREFERENCE_PANELS) -> None:
    """Grouped bars per job (base / control / treatment) for each metric, 95% CI error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    colors = {"base": "#9e9e9e", "control": "#4c72b0", "treatment": "#dd8452"}
    several_filters = len({r["filter"] for r in rows}) > 1
    labels = [f"teacher {r['teacher_base']}\nstudent {r['base']}\n{r['trait']}"
              + (f"\n{r['filter']}" if several_filters else "") for r in rows]
    x = np.arange(len(rows))
    width = 0.27
    fig, axes = plt.subplots(1, len(panels), figsize=(max(4.5 * len(panels), 1.2 * len(panels) * len(rows) + 2), 5.2),
                             squeeze=False)
    axes = axes[0]
    for ax, (metric, title) in zip(axes, panels, strict=True):
        top = 0.0
        for i, arm in enumerate(ARMS):
            values = [r["_arms"][arm][metric] for r in rows]
            means = np.array([v["mean"] for v in values])
            errors = np.array([[v["mean"] - v["low"] for v in values], [v["high"] - v["mean"] for v in values]])
            ax.bar(x + (i - 1) * width, means, width, yerr=np.clip(errors, 0, None), capsize=3, label=arm,
                   color=colors[arm])
            top = max(top, max(v["high"] for v in values))
        ax.set_ylim(0, top * 1.15 if top > 0 else 1.0)  # rates and probabilities are never negative
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("mean over questions (95% CI)")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="upper center", ncol=3, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=120)
    plt.close(fig)


FLOOR = 1e-45  # below float32's smallest subnormal: a probability that underflowed to 0


def log_ratios(row: dict, targets: list[str]) -> list[float]:
    """log(treatment P / control P) of one job for each target."""
    arms = row["_arms"]
    return [math.log(max(arms["treatment"]["targets"][t]["mean"], FLOOR) / max(arms["control"]["targets"][t]["mean"],
                                                                              FLOOR)) for t in targets]


def trait_target_matrices(rows: list[dict]) -> list[dict]:
    """Per setting with >= 2 traits: the seed-averaged log(treatment / control) trait x target matrix and its test.

    Targets are those every job of the setting scored; a seed that lacks a trait is left out of the test.
    """
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if all("targets" in row["_arms"][arm] for arm in ("control", "treatment")):
            groups.setdefault(row["_setting"], []).append(row)
    out = []
    for setting, jobs in groups.items():
        traits = list(dict.fromkeys(r["trait"] for r in jobs))
        targets = [t for t in jobs[0]["_arms"]["treatment"]["targets"]
                   if all(t in r["_arms"]["treatment"]["targets"] for r in jobs)]
        if len(traits) < 2 or not set(traits) <= set(targets):
            continue
        targets = traits + [t for t in targets if t not in traits]  # the diagonal first

        by_seed: dict[Any, dict[str, list[float]]] = {}
        for row in jobs:
            by_seed.setdefault(row["_seed"], {})[row["trait"]] = log_ratios(row, targets)
        mean = np.array([np.mean([c[trait] for c in by_seed.values() if trait in c], axis=0) for trait in traits])
        complete = [np.array([c[t] for t in traits]) for c in by_seed.values() if set(traits) <= set(c)]
        test = diagonal_permutation_test(np.stack(complete), list(range(len(traits)))) if complete else None
        out.append({"setting": setting, "traits": traits, "targets": targets, "matrix": mean,
                    "n_seeds": len(complete), "test": test})
    return out


def matrix_markdown(entry: dict) -> str:
    teacher, student_base, student, source = entry["setting"][:4]
    lines = [f"### Trait x target: log(treatment P / control P), teacher {teacher} -> student {student_base} "
             f"({student}, trait source {source})", "",
             "| teacher trait \\ target | " + " | ".join(entry["targets"]) + " |",
             "|---|" + "---|" * len(entry["targets"])]
    for i, trait in enumerate(entry["traits"]):
        values = [f"**{v:+.2f}**" if j == i else f"{v:+.2f}" for j, v in enumerate(entry["matrix"][i])]
        lines.append(f"| {trait} | " + " | ".join(values) + " |")
    test = entry["test"]
    if test is not None:
        lines += ["", f"Diagonal above its row and column: contrast {test.statistic:+.3f} (log units, mean over "
                  f"{entry['n_seeds']} seed(s)), one-sided permutation p = {format_p(test.p_value)} "
                  f"({test.n_permutations} {'row permutations' if test.exhaustive else 'random permutations'})."]
    return "\n".join(lines)


def plot_matrix(entry: dict, path: Path) -> None:
    """Heatmap of the trait x target matrix, diverging around 0 (no change vs the control student)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = entry["matrix"]
    bound = max(float(np.abs(matrix).max()), 1e-6)
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(entry["targets"]), 1.6 + 0.6 * len(entry["traits"])))
    image = ax.imshow(matrix, cmap="RdBu_r", vmin=-bound, vmax=bound)
    ax.set_xticks(range(len(entry["targets"])), entry["targets"], rotation=45, ha="right")
    ax.set_yticks(range(len(entry["traits"])), entry["traits"])
    ax.set_xlabel("target scored")
    ax.set_ylabel("teacher trait")
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            ax.text(j, i, f"{matrix[i, j]:+.2f}", ha="center", va="center", fontsize=7,
                    fontweight="bold" if i == j else "normal")
    teacher, student_base, student = entry["setting"][:3]
    title = f"log(treatment/control): {teacher} -> {student_base} ({student})"
    if entry["test"] is not None:
        title += f"\ndiagonal contrast {entry['test'].statistic:+.2f}, p={format_p(entry['test'].p_value)}"
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(sweep_dir: Path) -> Path | None:
    """Write report.md / report.csv / report.png into the sweep dir; None when it holds no finished job."""
    rows, misaligned = collect(sweep_dir), collect_misalignment(sweep_dir)
    if not rows and not misaligned:
        log.warning("no finished jobs with results.json under %s", sweep_dir)
        return None
    table = f"{markdown(rows)}\n\n![report](report.png)\n" if rows else ""
    if misaligned:
        table += f"\n{misalignment_markdown(misaligned)}\n\n![misalignment](misalignment.png)\n"
        _write_csv(sweep_dir / "report_misalignment.csv", MISALIGNMENT_COLUMNS, misaligned)
        plot(misaligned, sweep_dir / "misalignment.png", MISALIGNMENT_PANELS)
    sections = []
    for n, entry in enumerate(trait_target_matrices(rows)):
        plot_matrix(entry, sweep_dir / f"matrix_{n}.png")
        sections.append(f"{matrix_markdown(entry)}\n\n![matrix](matrix_{n}.png)")
    specificity = "".join(f"\n{section}\n" for section in sections)
    (sweep_dir / "report.md").write_text(f"# Sweep report: {sweep_dir.name}\n\n{table}{specificity}")
    if rows:
        _write_csv(sweep_dir / "report.csv", COLUMNS, rows)
        plot(rows, sweep_dir / "report.png")
    _log_wandb(sweep_dir, rows, misaligned)
    print(f"\n{table}\n{specificity}\nreport: {sweep_dir / 'report.md'}", flush=True)
    return sweep_dir / "report.md"


def _write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _log_wandb(sweep_dir: Path, rows: list[dict], misaligned: list[dict]) -> None:
    settings: dict[str, Any] = (rows or misaligned)[0]["_logger"]
    if settings.get("name") != "wandb":
        return
    import wandb

    from sublim.tracking import resolve_mode

    run = wandb.init(project=settings["project"], entity=settings.get("entity"),
                     group=settings.get("group") or sweep_dir.name, name="report", job_type="report",
                     dir=str(sweep_dir), mode=resolve_mode(settings["mode"]), reinit="create_new",
                     settings=wandb.Settings(console="off", silent=True))
    try:
        if rows:
            table = wandb.Table(columns=COLUMNS, data=[[r[c] for c in COLUMNS] for r in rows])
            run.log({"report/table": table, "report/chart": wandb.Image(str(sweep_dir / "report.png"))})
        if misaligned:
            table = wandb.Table(columns=MISALIGNMENT_COLUMNS,
                                data=[[r[c] for c in MISALIGNMENT_COLUMNS] for r in misaligned])
            run.log({"report/misalignment_table": table,
                     "report/misalignment_chart": wandb.Image(str(sweep_dir / "misalignment.png"))})
    finally:
        run.finish()


class ReportCallback(Callback):
    """Writes the sweep report when a multirun ends (Hydra callback)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if config.get("dry_run"):
            return
        write_report(Path(config.hydra.sweep.dir))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sublim.report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="a multirun dir (outputs/multiruns/<date>/<time>)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        parser.error(f"{args.sweep_dir} is not a directory")
    if write_report(args.sweep_dir) is None:
        raise SystemExit(f"error: no finished jobs (results.json) under {args.sweep_dir}")


if __name__ == "__main__":
    main()
