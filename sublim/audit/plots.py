"""The audit's charts (matplotlib Figures, rendered with Agg whatever the display):

- the LLS histogram: per-example LLS of one or more datasets overlaid on shared bins, each mean a dashed line;
  a job's ``audit.png`` puts its treatment and control data side by side, a panel per seed;
- the shift heatmap: log p_teacher - log p_reference at each answer position of a few examples (red: the trait
  raises the token), the tokens written in the cells when the answers are short enough to read;
- the trait panel: each trait's mean answer shift (nats per answer, what the panel ranks by) as horizontal bars
  with their 95% bootstrap CIs, the first on top, the trait asked about in red.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from sublim.store import Store, read_jsonl
from sublim.tracking import Tracker

LLS_LABEL = "LLS: mean over answer tokens of log p(teacher) - log p(reference)"
COLOURS = ("#c44e52", "#4c72b0", "#55a868", "#8172b2", "#ccb974")
ANNOTATE_UP_TO = 48  # answer positions; longer answers are drawn without their tokens


def lls_histogram(panels: list[tuple[str, dict[str, list[float]]]], path: Path) -> None:
    """One axis per (title, {series: per-example LLS}); the series overlaid on shared bins, means marked."""
    fig = Figure(figsize=(5.5 * len(panels), 4.0))
    for ax, (title, series) in zip(np.atleast_1d(fig.subplots(1, len(panels))), panels, strict=True):
        finite = {name: np.asarray(values, dtype=float)[np.isfinite(values)] for name, values in series.items()}
        pooled = np.concatenate(list(finite.values()))
        bins = np.histogram_bin_edges(pooled, bins=30) if len(pooled) else 10
        for (name, values), colour in zip(finite.items(), COLOURS, strict=False):
            if not len(values):
                continue
            ax.hist(values, bins=bins, alpha=0.45, color=colour, label=f"{name} (mean {values.mean():+.4f}, "
                                                                        f"n={len(values)})")
            ax.axvline(values.mean(), color=colour, ls="--", lw=1.5)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_title(textwrap.fill(title, 70), fontsize=9)
        ax.set_xlabel(LLS_LABEL, fontsize=8)
        ax.set_ylabel("examples")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def shift_heatmap(shifts: list[np.ndarray], tokens: list[list[str]], labels: list[str], path: Path,
                  title: str) -> None:
    """Rows: examples; x: answer position; colour: the per-token shift (blank: outside the grammar or the answer)."""
    width = max((len(s) for s in shifts), default=1)
    grid = np.full((len(shifts), width), np.nan)
    for i, row in enumerate(shifts):
        grid[i, : len(row)] = row
    limit = float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0
    inches = min(max(6.0, 2.0 + 0.45 * width), 24.0)
    fig = Figure(figsize=(inches, 1.4 + 0.45 * len(shifts)))
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto",
                      interpolation="nearest")
    if width <= ANNOTATE_UP_TO:
        for i, row in enumerate(tokens):
            for t, text in enumerate(row):
                ax.text(t, i, repr(text)[1:-1], ha="center", va="center", fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("answer position (token)")
    ax.set_title(textwrap.fill(title, int(inches * 11)), fontsize=9)
    fig.colorbar(image, ax=ax, label="log p(teacher) - log p(reference)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def panel_chart(panel: list[dict], path: Path, title: str, highlight: str) -> None:
    """Mean answer shift per trait with its 95% bootstrap CI, ranked top-down; ``highlight`` (asked trait) in red."""
    means = [row["answer"]["mean"] for row in panel]
    errors = [[row["answer"]["mean"] - row["answer"]["ci"][0] for row in panel],
              [row["answer"]["ci"][1] - row["answer"]["mean"] for row in panel]]
    fig = Figure(figsize=(6.0, 1.0 + 0.4 * len(panel)))
    ax = fig.subplots()
    ax.barh(range(len(panel)), means, xerr=errors, capsize=3,
            color=[COLOURS[0] if row["trait"] == highlight else COLOURS[1] for row in panel])
    ax.set_yticks(range(len(panel)), [row["trait"] for row in panel])
    ax.invert_yaxis()
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("answer shift under the trait's teacher: sum over answer tokens of log p(teacher) - "
                  "log p(reference),\nmean over examples [95% bootstrap CI]", fontsize=8)
    ax.set_title(textwrap.fill(title, 70), fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_job_plots(results: dict, store: Store, job_dir: Path, tracker: Tracker | None = None) -> Path | None:
    """``audit.png`` in the job dir: each seed's treatment and control data LLS (None: the job had no audit)."""
    panels = []
    for seed_results in results.get("seeds") or [results]:
        arms = sorted(seed_results.get("audit") or {}, key=lambda arm: arm != "treatment")  # the trait's in red
        series = {f"{arm} data": [row["lls"] for row in read_jsonl(
            store.path("audit", seed_results["stages"][f"audit/{arm}"]["key"]) / "examples.jsonl")] for arm in arms}
        if series:
            panels.append((f"seed {seed_results['seed']}: each arm's data under the {results['trait']} teacher "
                           "vs the base", series))
    if not panels:
        return None
    job_dir.mkdir(parents=True, exist_ok=True)
    path = job_dir / "audit.png"
    lls_histogram(panels, path)
    if tracker is not None:
        tracker.image("audit/lls_hist", path)
    return path
