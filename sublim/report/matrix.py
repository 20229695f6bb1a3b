"""Specificity: per setting with several traits, the trait x target matrix of log(treatment P / control P).

The matrix and its permutation test use the same seeds: those with a job for every trait of the setting
(the test permutes trait labels within a seed, so a seed lacking a trait has nothing to permute; averaging
it into the matrix would show numbers the test never saw). The report says which seeds were dropped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from sublim.replication import seed_test
from sublim.report.effects import log_ratio
from sublim.report.jobs import SETTING
from sublim.stats import bh_adjust, diagonal_permutation_test, format_p


def log_ratios(row: dict, targets: list[str]) -> list[float]:
    """log(treatment P / control P) of one job for each target."""
    arms = row["_arms"]
    return [log_ratio(arms["treatment"]["targets"][t]["mean"], arms["control"]["targets"][t]["mean"]) for t in targets]


def trait_target_matrices(rows: list[dict]) -> list[dict]:
    """Per setting with >= 2 traits: the trait x target matrix over the complete seeds, its test and BH q.

    Targets are those every job of the setting scored; q adjusts the diagonal tests of all the sweep's
    settings together (Benjamini-Hochberg).
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
        seeds = [seed for seed, cells in by_seed.items() if set(traits) <= set(cells)]
        complete = np.array([[by_seed[seed][t] for t in traits] for seed in seeds])
        diagonal = list(range(len(traits)))
        per_seed = [diagonal_permutation_test(m, diagonal).statistic for m in complete]
        out.append({"setting": setting, "traits": traits, "targets": targets, "seeds": seeds, "n_seeds": len(seeds),
                    "dropped": {seed: [t for t in traits if t not in cells] for seed, cells in by_seed.items()
                                if seed not in seeds},
                    "matrix": complete.mean(axis=0) if seeds else None,
                    "test": diagonal_permutation_test(complete, diagonal) if seeds else None,
                    "seed_contrasts": dict(zip(seeds, per_seed, strict=True)),
                    "contrast_over_seeds": seed_test(per_seed) if seeds else None})
    tested = [entry for entry in out if entry["test"] is not None]
    for entry, q in zip(tested, bh_adjust([e["test"].p_value for e in tested]), strict=True):
        entry["q"] = q
    return out


def setting_title(setting: tuple) -> str:
    """teacher -> student (student kind, trait source), modality, filter; and the sweep's varying fields."""
    fields = dict(setting)
    varying = [f"{k}={v}" for k, v in setting[len(SETTING):]]
    return (f"teacher {fields['teacher_base']} -> student {fields['base']} ({fields['student']}, trait source "
            f"{fields['source']}), {fields['modality']}, filter {fields['filter']}"
            + (f"; {', '.join(varying)}" if varying else ""))


def matrix_markdown(entry: dict, n_tests: int) -> str:
    """The matrix table, which seeds it (and its test) used and dropped, the diagonal test with its BH q."""
    lines = [f"### Trait x target: log(treatment P / control P), {setting_title(entry['setting'])}", ""]
    dropped = "; ".join(f"{seed} (no {', '.join(missing)})" for seed, missing in entry["dropped"].items())
    if entry["matrix"] is None:
        return "\n".join(lines + [f"No seed has a job for every trait ({', '.join(entry['traits'])}): no matrix. "
                                  f"Seeds: {dropped}."])
    lines += ["| teacher trait \\ target | " + " | ".join(entry["targets"]) + " |",
              "|---|" + "---|" * len(entry["targets"])]
    for i, trait in enumerate(entry["traits"]):
        values = [f"**{v:+.2f}**" if j == i else f"{v:+.2f}" for j, v in enumerate(entry["matrix"][i])]
        lines.append(f"| {trait} | " + " | ".join(values) + " |")
    lines += ["", f"Seeds used (a job for every trait; the matrix is their mean, the test permutes within each): "
              f"{', '.join(map(str, entry['seeds']))}." + (f" Dropped: {dropped}." if dropped else "")]
    test = entry["test"]
    lines += ["", f"Diagonal above its row and column: contrast {test.statistic:+.3f} (log units, mean over "
              f"{entry['n_seeds']} seed(s)), one-sided permutation p = {format_p(test.p_value)} "
              f"({test.n_permutations} {'row permutations' if test.exhaustive else 'random permutations'}); "
              f"Benjamini-Hochberg q = {format_p(entry['q'])} over the sweep's {n_tests} matrix test(s)."
              + seed_level(entry)]
    return "\n".join(lines)


def seed_level(entry: dict) -> str:
    """Each seed's contrast and their t-test, the seed as the unit: the permutation test draws on every cell at
    once, so a contrast that one seed carries can pass it; here that shows as a wide interval."""
    per_seed = ", ".join(f"seed {seed} {c:+.3f}" for seed, c in entry["seed_contrasts"].items())
    t = entry["contrast_over_seeds"]
    if t["p_value"] is None:
        return f" Per seed: {per_seed}."
    one_sided = t["p_value"] / 2 if t["mean"] > 0 else 1 - t["p_value"] / 2
    return (f" Per seed: {per_seed}; tested with the seed as the unit: {t['mean']:+.3f} [{t['low']:+.3f}, "
            f"{t['high']:+.3f}], one-sided t-test p = {format_p(one_sided)} (df = {t['n_seeds'] - 1}).")


def plot_matrix(entry: dict, path: Path) -> None:
    """Heatmap of the trait x target matrix, diverging around 0 (no change vs the control student)."""
    matrix = entry["matrix"]
    bound = max(float(np.abs(matrix).max()), 1e-6)
    fig = Figure(figsize=(1.0 + 0.8 * len(entry["targets"]), 1.6 + 0.6 * len(entry["traits"])))
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="RdBu_r", vmin=-bound, vmax=bound)
    ax.set_xticks(range(len(entry["targets"])), entry["targets"], rotation=45, ha="right")
    ax.set_yticks(range(len(entry["traits"])), entry["traits"])
    ax.set_xlabel("target scored")
    ax.set_ylabel("teacher trait")
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            ax.text(j, i, f"{matrix[i, j]:+.2f}", ha="center", va="center", fontsize=7,
                    fontweight="bold" if i == j else "normal")
    fields = dict(entry["setting"])
    ax.set_title(f"log(treatment/control): {fields['teacher_base']} -> {fields['base']} ({fields['student']})\n"
                 f"diagonal contrast {entry['test'].statistic:+.2f}, p={format_p(entry['test'].p_value)}, "
                 f"seeds {', '.join(map(str, entry['seeds']))}", fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
