"""Sweep report: ``python -m sublim.report <sweep dir>`` (also run by a Hydra callback after -m).

Reads every job's results.json under the sweep dir (a job over several seeds gives a row per seed) and
writes report.md (a row per job and seed, with every field that differs between the sweep's jobs, raw
p-values beside Benjamini-Hochberg adjusted ones), report.csv and report.png (per trait, the effect
log(treatment P / control P) of each seed, their mean and 95% t interval over seeds); with W&B on, it
logs one summary run with the table and chart in the sweep's group.

Jobs with ``generations`` > 1 add generations.png (each arm's metric by generation, over seeds), the effect per
generation in report.md, and report_generations.csv (sublim/report/generations.py).

Misalignment jobs (eval=misalignment) get their own table, report_misalignment.csv and
misalignment.png (treatment - control misaligned-answer rate per seed).

Specificity: when a sweep holds several traits of one setting, report.md also gets the trait x target
matrix of log(treatment P / control P) over the seeds that have every trait, with a permutation test that
the diagonal stands above its row and column, and matrix_<n>.png heatmaps.

Provenance: whether the jobs were computed alike (the same stage code per setting; an artifact several jobs share
is the same files in each), from each job's provenance.json, so seeds run in different sittings can be pooled.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from sublim import quiet_on_closed_pipe
from sublim.report import generations
from sublim.report.effects import MISALIGNMENT_METRICS, PREFERENCE_METRICS, Effect, Metric, chart
from sublim.report.jobs import MISALIGNMENT_TAIL, PREFERENCE_TAIL, collect, collect_misalignment, columns
from sublim.report.matrix import matrix_markdown, plot_matrix, trait_target_matrices
from sublim.report.provenance import problems, provenance_markdown
from sublim.report.tables import chart_note, markdown, misalignment_markdown, pooled_markdown, write_csv

__all__ = ["ReportCallback", "collect", "collect_misalignment", "main", "trait_target_matrices",
           "write_job_generations", "write_report"]

log = logging.getLogger(__name__)


def write_report(sweep_dir: Path) -> Path | None:
    """Write report.md / report.csv / report.png into the sweep dir; None when it holds no finished job."""
    rows, misaligned = collect(sweep_dir), collect_misalignment(sweep_dir)
    if not rows and not misaligned:
        log.warning("no finished jobs with results.json under %s", sweep_dir)
        return None
    table = ""
    if rows:
        drawn = chart(rows, PREFERENCE_METRICS, sweep_dir / "report.png")
        table += f"{markdown(rows)}\n\n{chart_note('report.png', PREFERENCE_METRICS, drawn)}\n"
        table += _across_seeds(drawn, PREFERENCE_METRICS)
        write_csv(sweep_dir / "report.csv", columns(rows, PREFERENCE_TAIL), rows)
    if misaligned:
        drawn = chart(misaligned, MISALIGNMENT_METRICS, sweep_dir / "misalignment.png")
        table += (f"\n{misalignment_markdown(misaligned)}\n\n"
                  f"{chart_note('misalignment.png', MISALIGNMENT_METRICS, drawn)}\n")
        table += _across_seeds(drawn, MISALIGNMENT_METRICS)
        write_csv(sweep_dir / "report_misalignment.csv", columns(misaligned, MISALIGNMENT_TAIL), misaligned)
    table += "".join(f"\n{section}\n" for section in write_generations(sweep_dir, rows, misaligned).values())
    entries = trait_target_matrices(rows)
    n_tests = sum(e["test"] is not None for e in entries)
    sections = []
    for n, entry in enumerate(entries):
        section = matrix_markdown(entry, n_tests)
        if entry["matrix"] is not None:
            plot_matrix(entry, sweep_dir / f"matrix_{n}.png")
            section += f"\n\n![matrix](matrix_{n}.png)"
        sections.append(section)
    specificity = "".join(f"\n{section}\n" for section in sections)
    found = problems(rows + misaligned)
    for problem in found:
        log.warning("%s", problem)
    provenance = f"\n{provenance_markdown(rows + misaligned, found)}\n"
    (sweep_dir / "report.md").write_text(f"# Sweep report: {sweep_dir.name}\n\n{table}{specificity}{provenance}")
    _log_wandb(sweep_dir, rows, misaligned)
    print(f"\n{table}\n{specificity}\nreport: {sweep_dir / 'report.md'}", flush=True)
    return sweep_dir / "report.md"


def _across_seeds(drawn: dict[str, list[Effect]], metrics: tuple[Metric, ...]) -> str:
    """The across-seed tests, when some trait has more than one seed."""
    replicated = any(len(e.values) > 1 for panel in drawn.values() for e in panel)
    return f"\n{pooled_markdown(drawn, metrics)}\n" if replicated else ""


def write_generations(out: Path, rows: list[dict], misaligned: list[dict]) -> dict[Path, str]:
    """For chained jobs: generations[_misalignment].png and report_generations[_misalignment].csv in ``out``;
    each chart's path -> its report.md section."""
    sections = {}
    for chain_rows, metrics, suffix in ((rows, PREFERENCE_METRICS, ""),
                                        (misaligned, MISALIGNMENT_METRICS, "_misalignment")):
        if generations.chained(chain_rows):
            image = out / f"generations{suffix}.png"
            generations.plot(chain_rows, metrics, image)
            sections[image] = generations.markdown(chain_rows, metrics, image.name)
            write_csv(out / f"report_generations{suffix}.csv", generations.CSV_COLUMNS,
                      generations.csv_rows(chain_rows, metrics))
    return sections


def write_job_generations(job_dir: Path) -> list[Path]:
    """A chained job's own generations chart and CSV (the sweep report draws the same over its jobs)."""
    return list(write_generations(job_dir, collect(job_dir), collect_misalignment(job_dir)))


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
        for name, table_rows, tail, image in (("", rows, PREFERENCE_TAIL, "report.png"),
                                              ("misalignment_", misaligned, MISALIGNMENT_TAIL, "misalignment.png")):
            if table_rows:
                names = columns(table_rows, tail)
                table = wandb.Table(columns=names, data=[[r[c] for c in names] for r in table_rows])
                run.log({f"report/{name}table": table, f"report/{name}chart": wandb.Image(str(sweep_dir / image))})
        for image in sorted(sweep_dir.glob("generations*.png")):
            run.log({f"report/{image.stem}": wandb.Image(str(image))})
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
    with quiet_on_closed_pipe():
        if write_report(args.sweep_dir) is None:
            raise SystemExit(f"error: no finished jobs (results.json) under {args.sweep_dir}")
