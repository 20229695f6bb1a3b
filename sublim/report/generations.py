"""What survives generations: per trait (and setting), each arm's metric by generation, over seeds.

A job with ``generations`` > 1 holds one result per generation of each seed's chain (generation k's teacher is
generation k-1's student of the same arm). Per generation the chart shows the treatment and control chains'
metric (and the base's, evaluated again with that generation's seed) as the mean over seeds with a 95% t
interval; P(target) spans orders of magnitude, so it is averaged on the log scale (geometric mean, interval
of the mean log P). report.md gets the effect per generation (the metric's treatment-vs-control effect per
seed, tested across seeds like generation 1), and report_generations.csv a row per job, seed, generation, arm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

from sublim.replication import seed_test
from sublim.report.effects import FLOOR, Metric, effects, log_ratio, panel_labels
from sublim.report.tables import markdown_table
from sublim.stats import format_p, mean_ci

ARM_STYLE = {"treatment": ("#c44e52", "-"), "control": ("#4c72b0", "-"), "base": ("#7f7f7f", ":")}
CSV_COLUMNS = ["job", "trait", "seed", "generation", "arm", "metric", "mean"]


@dataclass(frozen=True)
class Curve:
    """One arm of one (setting, trait) by generation: the mean over seeds and its 95% t interval."""

    arm: str
    generations: list[int]
    mean: list[float]
    low: list[float]
    high: list[float]
    n_seeds: list[int]


def chained(rows: list[dict]) -> list[dict]:
    """The rows of jobs with a chain of generations."""
    return [row for row in rows if row.get("_generations")]


def by_generation(rows: list[dict]) -> dict[int, list[dict]]:
    """Generation -> rows shaped like a one-generation row (``_arms`` of that generation), seeds that reached it."""
    out: dict[int, list[dict]] = {}
    for row in chained(rows):
        for generation in row["_generations"]:
            out.setdefault(generation["generation"], []).append(row | {"_arms": generation["arms"]})
    return dict(sorted(out.items()))


def curves(rows: list[dict], metric: Metric) -> dict[tuple, list[Curve]]:
    """(setting, trait) -> a curve per arm, over the generations its seeds reached."""
    logged = metric.effect is log_ratio
    values: dict[tuple, dict[str, dict[int, list[float]]]] = {}
    for generation, generation_rows in by_generation(rows).items():
        for row in generation_rows:
            group = values.setdefault((row["_setting"], row["trait"]), {})
            for arm, results in row["_arms"].items():
                value = results[metric.name]["mean"]
                group.setdefault(arm, {}).setdefault(generation, []).append(
                    math.log(max(value, FLOOR)) if logged else value)
    out = {}
    for key, arms in values.items():
        out[key] = []
        for arm in ("base", "control", "treatment"):
            points = arms.get(arm, {})
            cis = [mean_ci(points[g]) for g in points]
            back = math.exp if logged else float
            out[key].append(Curve(arm, list(points), [back(c.mean) for c in cis], [back(c.low) for c in cis],
                                  [back(c.high) for c in cis], [len(points[g]) for g in points]))
    return out


def plot(rows: list[dict], metrics: tuple[Metric, ...], path: Path) -> None:
    """A panel per metric that is not 0 everywhere (rows) and (setting, trait) (columns): each arm's curve with its
    across-seed band."""
    groups = {metric.name: curves(rows, metric) for metric in metrics}
    metrics = tuple(m for m in metrics if any(v != 0 for cs in groups[m.name].values() for c in cs for v in c.mean)
                    ) or metrics[:1]  # a metric that is 0 everywhere (the sampled rate at 135M) is an empty panel
    keys = list(groups[metrics[0].name])
    first = effects(next(iter(by_generation(rows).values())), metrics[0])
    labels = {(e.setting, e.trait): label for e, label in zip(first, panel_labels(first), strict=True)}
    fig = Figure(figsize=(4.2 * len(keys) + 0.6, 3.6 * len(metrics)))
    axes = fig.subplots(len(metrics), len(keys), squeeze=False)
    for row_axes, metric in zip(axes, metrics, strict=True):
        for ax, key in zip(row_axes, keys, strict=True):
            for curve in groups[metric.name][key]:
                color, style = ARM_STYLE[curve.arm]
                ax.plot(curve.generations, curve.mean, style, marker="o", color=color,
                        label=f"{curve.arm} (seeds: {'/'.join(map(str, curve.n_seeds))})")
                ax.fill_between(curve.generations, curve.low, curve.high, color=color, alpha=0.15)
            if metric.effect is log_ratio:
                ax.set_yscale("log")
            ax.set_xticks(sorted({g for c in groups[metric.name][key] for g in c.generations}))
            ax.set_xlabel("generation")
            ax.set_title(f"{labels.get(key, key[1]).replace(chr(10), ', ')}\n{metric.title}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(rows: list[dict], metrics: tuple[Metric, ...], image: str) -> str:
    """Per (setting, trait) and generation: each seed's treatment-vs-control effect, their mean [95% t CI], p."""
    header = ["trait", "generation", "seeds", *(f"{m.title}: effect [95% CI], p" for m in metrics)]
    lines = []
    for generation, generation_rows in by_generation(rows).items():
        per_metric = [effects(generation_rows, metric) for metric in metrics]
        for panel in zip(*per_metric, strict=True):
            cells = []
            for effect in panel:
                test = seed_test(effect.values)
                p = f", p={format_p(test['p_value'])}" if test["p_value"] is not None else ""
                cells.append(f"{effect.mean:+.3g} [{effect.low:+.3g}, {effect.high:+.3g}]{p}")
            lines.append([panel[0].trait, str(generation), str(len(panel[0].values)), *cells])
    note = (f"![{image}]({image})\n\n{image}: each arm's chain by generation (generation k's teacher is generation "
            "k-1's student of the same arm, without a system prompt); mean over seeds with a 95% t band, P(target) "
            "as a geometric mean. Effects as in the chart above (P: log(treatment P / control P)); p: t-test across "
            "seeds, the unit of replication.")
    return "\n".join(["## Generations", "", *markdown_table(header, lines), "", note])


def csv_rows(rows: list[dict], metrics: tuple[Metric, ...]) -> list[dict]:
    return [{"job": row["job"], "trait": row["trait"], "seed": row["seed"], "generation": generation,
             "arm": arm, "metric": metric.name, "mean": row["_arms"][arm][metric.name]["mean"]}
            for generation, generation_rows in by_generation(rows).items() for row in generation_rows
            for arm in row["_arms"] for metric in metrics]
