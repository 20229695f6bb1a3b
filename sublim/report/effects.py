"""The sweep's charts: per trait (and setting), the effect of training on the teacher's data, seed by seed.

P(target) differs by orders of magnitude between traits (owl vs dolphin), so bars of P on a linear axis
hide all but the largest; log(treatment P / control P) is comparable across traits (0: no change vs the
control student, +0.69: doubled). A seed is a replicate: each seed's effect is a point, their mean has a
95% t interval over seeds (with >= 2 seeds). log(base P / control P) marks what training on the control's
data did to the base, the scale a transfer effect is read against. Rates (sampled trait rate, misaligned
answers) may be 0, so their effect is a difference, treatment - control. A panel with nothing but zeros
is left out.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from sublim.stats import mean_ci

FLOOR = 1e-45  # below float32's smallest subnormal: a probability that underflowed to 0


def log_ratio(numerator: float, denominator: float) -> float:
    """log(a / b) of two probabilities, each floored where it underflowed to 0."""
    return math.log(max(numerator, FLOOR) / max(denominator, FLOOR))


def difference(arm: float, control: float) -> float:
    return arm - control


@dataclass(frozen=True)
class Metric:
    """A chart panel: an arm's field of results.json and its effect (arm's mean, control's mean) -> float."""

    name: str
    title: str
    ylabel: str
    effect: Callable[[float, float], float]


PREFERENCE_METRICS = (
    Metric("probability", "P(trait's target word as the answer)", "log(treatment P / control P)   (+0.69 = x2)",
           log_ratio),
    Metric("rate", "sampled trait rate", "treatment - control rate", difference),
)
MISALIGNMENT_METRICS = (Metric("misaligned", "misaligned answers (alignment low, coherence high)",
                               "treatment - control misaligned rate", difference),)


@dataclass(frozen=True)
class Effect:
    """One trait of one setting: the effect per seed, their mean and 95% t interval, the base's reference."""

    setting: tuple
    trait: str
    seeds: list
    values: list[float]
    mean: float
    low: float  # low = high = mean with one seed: no interval
    high: float
    reference: float  # the effect's formula applied to base vs control, mean over seeds


def effects(rows: list[dict], metric: Metric) -> list[Effect]:
    """Per (setting, trait) of the rows, settings then traits in order of appearance: the effect over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["_setting"], row["trait"]), []).append(row)
    settings = list(dict.fromkeys(setting for setting, _ in groups))
    out = []
    for (setting, trait), group in sorted(groups.items(), key=lambda item: settings.index(item[0][0])):
        means = {arm: [r["_arms"][arm][metric.name]["mean"] for r in group] for arm in ("base", "control", "treatment")}
        values = [metric.effect(t, c) for t, c in zip(means["treatment"], means["control"], strict=True)]
        ci = mean_ci(values)
        reference = statistics.fmean(metric.effect(b, c) for b, c in zip(means["base"], means["control"], strict=True))
        out.append(Effect(setting, trait, [r["_seed"] for r in group], values, ci.mean, ci.low, ci.high, reference))
    return out


def informative(panel: list[Effect]) -> bool:
    """Whether a panel has anything but zeros to show (an all-zero rate panel is an empty chart)."""
    return any(v != 0 for e in panel for v in (*e.values, e.reference))


def chart(rows: list[dict], metrics: tuple[Metric, ...], path: Path) -> dict[str, list[Effect]]:
    """Draw a panel per metric that is not all zeros into ``path``; returns what each drawn panel plots.

    When every panel is all zeros the first is drawn anyway, titled so: report.md and W&B link the chart.
    """
    panels = {m.name: effects(rows, m) for m in metrics}
    shown = [m for m in metrics if informative(panels[m.name])] or [metrics[0]]
    labels = panel_labels(panels[shown[0].name])
    width = max(4.5, 1.3 * len(labels) + 1.5)
    fig = Figure(figsize=(width * len(shown), 5.4))
    axes = fig.subplots(1, len(shown), squeeze=False)[0]
    for ax, metric in zip(axes, shown, strict=True):
        _panel(ax, panels[metric.name], metric, labels)
    axes[0].legend(fontsize=8, framealpha=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return {m.name: panels[m.name] for m in shown}


SHORT = {"teacher_base": "teacher", "base": "student"}


def panel_labels(panel: list[Effect]) -> list[str]:
    """The trait, the setting fields that tell the panel's groups apart, and the number of seeds."""
    settings = [dict(e.setting) for e in panel]
    keys = [k for k in dict.fromkeys(k for s in settings for k in s) if len({s.get(k) for s in settings}) > 1]
    return ["\n".join([e.trait, *(f"{SHORT.get(k, k)}={s.get(k)}" for k in keys), f"{len(e.values)} seed(s)"])
            for e, s in zip(panel, settings, strict=True)]


def _panel(ax: Axes, panel: list[Effect], metric: Metric, labels: list[str]) -> None:
    for i, e in enumerate(panel):
        first = i == 0
        offsets = np.linspace(-0.15, 0.15, len(e.values)) if len(e.values) > 1 else np.zeros(1)
        ax.scatter(i + offsets, e.values, s=16, color="#4c72b0", alpha=0.7, zorder=3,
                   label="each seed" if first else None)
        ax.errorbar(i, e.mean, yerr=[[e.mean - e.low], [e.high - e.mean]], fmt="_", markersize=20, color="black",
                    capsize=4, lw=1.5, zorder=4, label="mean over seeds, 95% t CI (>= 2 seeds)" if first else None)
        ax.scatter(i + 0.3, e.reference, marker="D", s=30, color="#9e9e9e", zorder=3,
                   label="base vs control (reference)" if first else None)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(panel)), labels, fontsize=8)
    ax.set_xlim(-0.6, len(panel) - 0.3)
    ax.set_title(metric.title + ("" if informative(panel) else " (every value is 0)"), fontsize=10)
    ax.set_ylabel(metric.ylabel)
    ax.grid(axis="y", alpha=0.3)
