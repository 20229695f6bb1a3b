"""The powered study's decision, by the rule fixed before it ran (docs/studies.md), from its committed job dirs.

    python studies/powered/analyze.py studies/powered/runs      # writes decision.md, .json and .png there

``runs/<experiment>/seed<k>/<job>/`` holds each sitting's jobs (results.json, provenance.json). Per variant
(experiment): the trait x target matrix of log(P_T / P_C) over the seeds that have every trait, its diagonal
permutation test, each trait's own-target effect across seeds, generic drift (control vs base), the audit's
answer shift (treatment data minus control data) against the own-target effect, and the verdict. The rule is
applied only once every planned seed is in (no optional stopping): before that the figures are labelled interim.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the headless backend is chosen)
import numpy as np
import yaml
from scipy import stats

from sublim.replication import minimum_detectable_effect, seed_test
from sublim.report import collect, trait_target_matrices
from sublim.report.effects import log_ratio
from sublim.report.matrix import seed_level
from sublim.report.provenance import problems
from sublim.stats import bh_adjust, format_p

HERE = Path(__file__).resolve().parent
PLANNED = yaml.safe_load((HERE.parents[1] / "sweeps" / "powered.yaml").read_text())["seeds"]
PILOT_SD = json.loads((HERE / "pilot" / "results.json").read_text())["pooled"]["log_probability_ratio"]["sd"]
ALPHA = 0.05
MAIN = "powered"  # the main design: each variant's per-seed contrasts are set beside its seeds' (descriptive)
MIN_CELLS = 5  # fewer trait x seed cells than this give no meaningful rank correlation


def own_effect(row: dict) -> float:
    targets = row["_arms"]
    return log_ratio(targets["treatment"]["targets"][row["trait"]]["mean"],
                     targets["control"]["targets"][row["trait"]]["mean"])


def drift(row: dict) -> float:
    """Mean over the targets of log(P_control / P_base): what training on the control's numbers did to every animal."""
    arms = row["_arms"]
    return float(np.mean([log_ratio(arms["control"]["targets"][t]["mean"], arms["base"]["targets"][t]["mean"])
                          for t in arms["control"]["targets"]]))


def audit_shift(row: dict) -> float | None:
    """The treatment data's mean answer shift minus the control data's (nats per answer), None without an audit."""
    audit = row["_audit"]
    if not {"control", "treatment"} <= set(audit):
        return None
    return audit["treatment"]["answer_shift"]["mean"] - audit["control"]["answer_shift"]["mean"]


def variant(directory: Path) -> dict:
    """One experiment's figures and verdict."""
    rows = collect(directory)
    entries = [e for e in trait_target_matrices(rows) if e["matrix"] is not None]
    if len(entries) != 1:
        raise SystemExit(f"{directory}: expected one setting with a complete trait x target matrix, found "
                         f"{len(entries)}")
    [entry] = entries
    complete = [r for r in rows if r["_seed"] in entry["seeds"]]
    traits = {trait: seed_test([own_effect(r) for r in complete if r["trait"] == trait]) for trait in entry["traits"]}
    cells = [(audit_shift(r), own_effect(r)) for r in complete if audit_shift(r) is not None]
    spearman = stats.spearmanr(*zip(*cells, strict=True)) if len(cells) >= MIN_CELLS else None
    final = sorted(entry["seeds"]) == sorted(PLANNED)
    test = entry["test"]
    transfer = test.statistic > 0 and test.p_value < ALPHA and all(t["mean"] > 0 for t in traits.values())
    return {
        "experiment": directory.name, "seeds": entry["seeds"], "planned_seeds": PLANNED, "final": final,
        "traits": entry["traits"], "targets": entry["targets"], "matrix": entry["matrix"].tolist(),
        "contrast": test.statistic, "p_matrix": test.p_value, "permutations": test.n_permutations,
        "seed_contrasts": entry["seed_contrasts"], "contrast_over_seeds": entry["contrast_over_seeds"],
        "own": traits, "drift": float(np.mean([drift(r) for r in complete])),
        "audit_vs_effect": [{"trait": r["trait"], "seed": r["_seed"], "audit_shift": audit_shift(r),
                             "effect": own_effect(r)} for r in complete],
        "spearman": None if spearman is None else {"rho": float(spearman.statistic), "p": float(spearman.pvalue),
                                                   "n": len(cells)},
        "mde_pilot": minimum_detectable_effect(PILOT_SD, len(PLANNED)),
        "provenance_problems": problems(rows),
        "verdict": None if not final else ("transfer" if transfer else "no transfer detected"),
    }


def markdown(v: dict) -> str:
    interim = "" if v["final"] else (f" (INTERIM: {len(v['seeds'])} of the {len(v['planned_seeds'])} planned seeds; "
                                     "the decision rule is applied only when all are in)")
    lines = [f"## {v['experiment']}{interim}", "",
             "| teacher trait \\ target | " + " | ".join(v["targets"]) + " |", "|---|" + "---|" * len(v["targets"])]
    for i, trait in enumerate(v["traits"]):
        lines.append(f"| {trait} | " + " | ".join(f"**{x:+.2f}**" if j == i else f"{x:+.2f}"
                                                  for j, x in enumerate(v["matrix"][i])) + " |")
    lines += ["", f"Seed-mean log(P_T / P_C) over seeds {', '.join(map(str, v['seeds']))}. Diagonal contrast "
              f"{v['contrast']:+.3f}, one-sided permutation p = {format_p(v['p_matrix'])} ({v['permutations']} "
              f"within-seed permutations; the smallest p {len(v['seeds'])} seed(s) allow is "
              f"{1 / math.factorial(len(v['traits'])) ** len(v['seeds']):.3g})."
              + seed_level(v) + " (Descriptive, not the rule's test.)", "",
              "| trait | per-seed own-target effect | mean [95% t CI] | t-test p | sign-flip p | post-hoc MDE |",
              "|---|---|---|---|---|---|"]
    for trait, t in v["own"].items():
        ci = "(one seed)" if t["low"] is None else f"[{t['low']:+.3f}, {t['high']:+.3f}]"
        mde = "-" if t["mde"] is None else f"{t['mde']:.3f}"
        lines.append(f"| {trait} | {', '.join(f'{e:+.3f}' for e in t['effects'])} | {t['mean']:+.3f} {ci} | "
                     f"{'-' if t['p_value'] is None else format_p(t['p_value'])} | {format_p(t['p_sign_flip'])} | "
                     f"{mde} |")
    lines += ["", f"Generic drift (log(P_C / P_base), mean over the {len(v['targets'])} targets and the seeds): "
              f"{v['drift']:+.3f}. "
              f"Power by the pilot's spread: MDE {v['mde_pilot']:.3f} (x{math.exp(v['mde_pilot']):.2f}) per trait at "
              f"{len(v['planned_seeds'])} seeds."]
    if v["spearman"]:
        s = v["spearman"]
        lines.append(f"Audit vs transfer (descriptive): Spearman rho {s['rho']:+.2f} over {s['n']} trait x seed cells "
                     f"(p = {format_p(s['p'])}) between the audit's answer shift (treatment data minus control data) "
                     "and the own-target effect.")
    else:
        lines.append(f"Audit vs transfer: {len(v['audit_vs_effect'])} trait x seed cells, too few for a rank "
                     f"correlation (it needs {MIN_CELLS}); the cells are in decision.json.")
    for problem in v["provenance_problems"]:
        lines.append(f"PROVENANCE: {problem}")
    verdict = v["verdict"] or "none yet (interim)"
    lines += ["", f"**Verdict: {verdict}.**"]
    return "\n".join(lines)


def summary(variants: list[dict]) -> str:
    """One row per variant, the Benjamini-Hochberg q of its matrix test beside its p (the protocol's correction
    across the variants; each verdict is still the rule's, on its own p)."""
    lines = ["| variant | seeds in | diagonal contrast (per seed) | permutation p | BH q | own means | verdict |",
             "|---|---|---|---|---|---|---|"]
    for v in variants:
        per_seed = ", ".join(f"{c:+.3f}" for c in v["seed_contrasts"].values())
        own = ", ".join(f"{trait} {t['mean']:+.3f}" for trait, t in v["own"].items())
        lines.append(f"| {v['experiment']} | {len(v['seeds'])} of {len(v['planned_seeds'])} | {v['contrast']:+.3f} "
                     f"({per_seed}) | {format_p(v['p_matrix'])} | {format_p(v['q_matrix'])} | {own} | "
                     f"{v['verdict'] or 'interim'} |")
    return "\n".join(lines)


def plot(variants: list[dict], path: Path) -> None:
    """Per variant: every seed's own-target effect and diagonal contrast, with the mean and its 95% t CI, so the
    reader sees at a glance whether an effect is in every seed or carried by one."""
    fig, axes = plt.subplots(1, len(variants), figsize=(4.2 * len(variants), 3.6), sharey=True, squeeze=False)
    for ax, v in zip(axes[0], variants, strict=True):
        tests = [*v["own"].values(), v["contrast_over_seeds"]]
        labels = [*v["own"], "diagonal\ncontrast"]
        for x, t in enumerate(tests):
            ax.scatter([x + 0.12] * len(t["effects"]), t["effects"], s=14, color="0.55", zorder=2)
            low, high = (t["mean"], t["mean"]) if t["low"] is None else (t["low"], t["high"])
            ax.errorbar(x - 0.08, t["mean"], yerr=[[t["mean"] - low], [high - t["mean"]]], fmt="o",
                        color="C3" if x == len(tests) - 1 else "C0", capsize=3, zorder=3)
        ax.axhline(0, color="0.3", lw=0.8)
        ax.set_xticks(range(len(labels)), labels)
        status = v["verdict"] or f"interim, {len(v['seeds'])} of {len(v['planned_seeds'])} seeds"
        ax.set_title(f"{v['experiment']}\n{status}; contrast p = {format_p(v['p_matrix'])}", fontsize=9)
    axes[0][0].set_ylabel("log(P_T / P_C): seeds (grey), mean [95% t CI]")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def against_main(variants: list[dict]) -> list[str]:
    """Each variant's per-seed diagonal contrasts minus the main design's, the seed as the unit (Welch t;
    descriptive, not the rule): does LLS selection strengthen the diagonal, does another teacher base remove it?"""
    main = next((v for v in variants if v["experiment"] == MAIN), None)
    lines = []
    for v in variants:
        if main is None or v is main or min(len(v["seed_contrasts"]), len(main["seed_contrasts"])) < 2:
            continue
        ours, theirs = list(v["seed_contrasts"].values()), list(main["seed_contrasts"].values())
        test = stats.ttest_ind(ours, theirs, equal_var=False)
        ci = test.confidence_interval(1 - ALPHA)
        lines.append(f"- {v['experiment']} minus {MAIN}: {np.mean(ours) - np.mean(theirs):+.3f} [{ci.low:+.3f}, "
                     f"{ci.high:+.3f}], two-sided Welch t p = {format_p(float(test.pvalue))} ({len(ours)} vs "
                     f"{len(theirs)} seeds)")
    if not lines:
        return []
    return ["", "Diagonal contrast against the main design's, the seed as the unit (Welch t of the per-seed "
            "contrasts; descriptive, not the rule):", *lines]


def main(runs: Path) -> None:
    variants = [variant(d) for d in sorted(p for p in runs.iterdir() if p.is_dir() and any(p.glob("*/*/results.json")))]
    for v, q in zip(variants, bh_adjust([v["p_matrix"] for v in variants]), strict=True):
        v["q_matrix"] = q  # kept in decision.json so README's q column is a stored figure, not a recomputation
    text = ("# The powered study: decision\n\n" + "\n".join([summary(variants), *against_main(variants)]) + "\n\n"
            + "\n\n".join(markdown(v) for v in variants) + "\n")
    (runs / "decision.md").write_text(text)
    (runs / "decision.json").write_text(json.dumps(variants, indent=1, default=float))
    plot(variants, runs / "decision.png")
    print(text)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
