"""Subliminal prompting check: does this base have trait-number entanglement, with no training at all?

The ``prompting`` stage (cached) scores every number 0..max_number with and without the trait's system prompt,
picks the top_k entangled numbers (largest mean shift in log P(number is the whole answer)) and random control
numbers from outside the top 10%, and scores log P(target) per question under "You love {n}. ..." for each.
Here, from that artifact: per number the mean log-ratio of P(target) vs the base (no system prompt) with a 95%
t CI over questions and a paired sign-flip p; the pooled contrast entangled vs control numbers (per question,
the mean over each group's numbers, paired); and the trait's own system prompt as the positive reference.

There is no training and one model, so the unit is the question: a p-value says how surely these prompts
move this base's P(target) on these questions, not that anything would transfer. Entangled numbers raising
P(target) more than control numbers is the entanglement effect; both moving together is the effect of
replacing the template's default system prompt with any "You love <number>" prompt. The question-level
contrast holds the chosen numbers fixed, so it cannot tell entangled numbers from numbers that merely
differ; a second p permutes the entangled/control labels over the numbers (their per-number mean
log-ratios), and the verdict needs both.
"""

from __future__ import annotations

import csv
import itertools
import math
import random
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from omegaconf import DictConfig

from sublim.stage import Job
from sublim.stages.model import model_artifact
from sublim.stages.prompting import BASE, NUMBERS_FILE, PROMPTING, TARGETS_FILE, TRAIT, check
from sublim.stats import format_p, paired_permutation_test
from sublim.store import Store, write_json
from sublim.tracking import Tracker

LABEL_PERMUTATIONS = 10000  # above this many splits of the numbers, the label test draws this many at random
COLUMNS = ("number", "kind", "shift", "log_ratio", "ci_low", "ci_high", "p", "p_target")
P_VALUE_ABOUT = ("over questions: a paired sign-flip test over the {n} questions of this one base (no training), how "
                 "surely these system prompts move P({trait}) on these questions, the numbers held fixed; over "
                 "numbers: the entangled/control labels permuted over the numbers tried. Neither is about transfer")


def _effect(treated: list[float], base: list[float], seed: int) -> dict:
    """Mean log P(target) ratio vs base over questions, its 95% t CI, the paired sign-flip p and P(target)."""
    test = paired_permutation_test(treated, base, seed=seed)
    return {"log_ratio": test.delta, "ci_low": test.ci.low, "ci_high": test.ci.high, "p": test.p_value,
            "ratio": math.exp(test.delta), "p_target": float(np.exp(treated).mean())}


def summarise(numbers: dict, targets: dict, seed: int) -> dict:
    """The statistics of one prompting artifact: per number, the pooled contrast, the trait prompt's effect."""
    logp = {name: np.asarray(values) for name, values in targets["log_p_target"].items()}
    base = logp[BASE]
    shift = dict(zip(numbers["numbers"], numbers["shift"], strict=True))
    rows = [{"number": n, "kind": kind, "shift": shift[n], **_effect(logp[n].tolist(), base.tolist(), seed)}
            for kind, group in (("entangled", targets["entangled"]), ("control", targets["controls"]))
            for n in group]
    contrast = None
    if targets["entangled"] and targets["controls"]:
        entangled = np.mean([logp[n] - base for n in targets["entangled"]], 0)
        controls = np.mean([logp[n] - base for n in targets["controls"]], 0)
        test = paired_permutation_test(entangled, controls, seed=seed)
        contrast = {"log_ratio": test.delta, "ci_low": test.ci.low, "ci_high": test.ci.high, "p": test.p_value,
                    "ratio": math.exp(test.delta), "ratio_low": math.exp(test.ci.low),
                    "ratio_high": math.exp(test.ci.high),
                    "p_numbers": label_permutation_p([r["log_ratio"] for r in rows], len(targets["entangled"]), seed)}
    ordered = sorted(shift.items(), key=lambda item: -item[1])
    return {"n_questions": len(base), "candidates": len(shift), "base_p_target": float(np.exp(base).mean()),
            "mean_shift": float(np.mean(list(shift.values()))), "top_shifts": ordered[:10],
            "trait_prompt": _effect(logp[TRAIT].tolist(), base.tolist(), seed), "numbers": rows,
            "contrast": contrast}


def label_permutation_p(values: list[float], k: int, seed: int) -> float:
    """Two-sided p of mean(first k) - mean(rest) under random entangled/control labels of the numbers: exact
    over every split when there are at most LABEL_PERMUTATIONS, else (count + 1) / (draws + 1)."""
    values_array, n = np.asarray(values), len(values)
    observed = abs(values_array[:k].mean() - values_array[k:].mean())
    tol = 1e-12 * max(1.0, float(np.abs(values_array).max()))

    def gap(chosen: tuple[int, ...]) -> float:
        mask = np.zeros(n, dtype=bool)
        mask[list(chosen)] = True
        return abs(values_array[mask].mean() - values_array[~mask].mean())

    if math.comb(n, k) <= LABEL_PERMUTATIONS:
        gaps = [gap(c) for c in itertools.combinations(range(n), k)]
        return float(np.mean([g >= observed - tol for g in gaps]))
    rng = random.Random(seed)
    hits = sum(gap(tuple(rng.sample(range(n), k))) >= observed - tol for _ in range(LABEL_PERMUTATIONS))
    return (hits + 1) / (LABEL_PERMUTATIONS + 1)


def verdict(results: dict) -> str:
    """One line: do the entangled numbers move P(target) more than the control numbers, over questions and
    beyond the spread between numbers?"""
    c, trait, n = results["contrast"], results["trait"], results["n_questions"]
    if c is None:
        return f"no contrast: audit.prompting.top_k and audit.prompting.controls must both be > 0 for P({trait})"
    size = f"x{c['ratio']:.3g} [{c['ratio_low']:.3g}, {c['ratio_high']:.3g}]"
    kinds = [r["kind"] for r in results["numbers"]]
    numbers = f"p={format_p(c['p_numbers'])} over numbers ({kinds.count('entangled')} vs {kinds.count('control')})"
    scope = f"p={format_p(c['p'])} (over {n} questions, this base, no training)"
    if c["p"] < 0.05 and c["p_numbers"] < 0.05:
        verb = "raise" if c["log_ratio"] > 0 else "lower"
        return f"entangled numbers {verb} P({trait}) {size} over control numbers, {scope}; {numbers}"
    if c["p"] < 0.05:
        return (f"no evidence of entanglement: these entangled numbers change P({trait}) {size} vs these control "
                f"numbers, {scope}, but not beyond the spread between numbers: {numbers}")
    return f"no detectable entanglement: entangled vs control numbers change P({trait}) {size}, {scope}; {numbers}"


def write_csv(results: dict, path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results["numbers"])


def plot(results: dict, path: Path) -> None:
    """Bars of each number's log P(target) ratio vs base with 95% CIs; the trait prompt's effect as a line."""
    rows, trait = results["numbers"], results["trait"]
    fig = Figure(figsize=(max(5.0, 0.6 * len(rows) + 2.0), 4.5))
    ax = fig.subplots()
    colours = {"entangled": "#c44e52", "control": "#8c8c8c"}
    for kind, colour in colours.items():
        index = [i for i, r in enumerate(rows) if r["kind"] == kind]
        ax.bar(index, [rows[i]["log_ratio"] for i in index], color=colour, label=f"{kind} numbers",
               yerr=[[rows[i]["log_ratio"] - rows[i]["ci_low"] for i in index],
                     [rows[i]["ci_high"] - rows[i]["log_ratio"] for i in index]], capsize=3)
    reference = results["trait_prompt"]["log_ratio"]
    ax.axhline(reference, color="#4c72b0", ls="--", label=f"{trait} system prompt ({reference:+.2f})")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(rows)), [r["number"] for r in rows])
    ax.set_xlabel("number in the system prompt")
    ax.set_ylabel(f"log P({trait}) ratio vs no system prompt")
    c = results["contrast"]
    pooled = (f"entangled - control {c['log_ratio']:+.3f}, p={format_p(c['p'])} over questions, "
              f"{format_p(c['p_numbers'])} over numbers" if c else "no contrast")
    ax.set_title(f"{results['base']}, {trait}: 95% t CI over {results['n_questions']} questions ({pooled})",
                 fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_prompting(cfg: DictConfig, store: Store, out_dir: Path, tracker: Tracker | None = None) -> dict:
    """The check for the job's base and trait: prompting.json / .csv / .png in out_dir, W&B, the results."""
    check(cfg)
    artifact = PROMPTING(Job(cfg, store, tracker), label=cfg.trait.name, model=model_artifact(cfg.base, store))
    results = {"trait": cfg.trait.name, "base": cfg.base.name, "seed": cfg.seed,
               "p_value_about": P_VALUE_ABOUT.format(n=cfg.audit.prompting.n_questions, trait=cfg.trait.name),
               **summarise(artifact.read_json(NUMBERS_FILE), artifact.read_json(TARGETS_FILE), cfg.seed),
               "stage": {"key": artifact.key, "reused": artifact.reused}}
    results["verdict"] = verdict(results)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "prompting.json", results)
    write_csv(results, out_dir / "prompting.csv")
    plot(results, out_dir / "prompting.png")
    if tracker is not None:
        _track(tracker, results, out_dir / "prompting.png")
    return results


def _track(tracker: Tracker, results: dict, image: Path) -> None:
    summary = {"prompting/base_p_target": results["base_p_target"],
               "prompting/trait_prompt_log_ratio": results["trait_prompt"]["log_ratio"]}
    if results["contrast"]:
        summary |= {f"prompting/contrast_{k}": results["contrast"][k] for k in ("log_ratio", "ci_low", "ci_high", "p",
                                                                            "p_numbers")}
    tracker.summary(summary)
    tracker.table("prompting/numbers", [{k: r[k] for k in COLUMNS} for r in results["numbers"]])
    tracker.image("prompting/chart", image)


def format_prompting(results: dict) -> str:
    """The terminal summary: the base and trait-prompt lines, one line per number, the verdict."""
    trait, ref = results["trait"], results["trait_prompt"]
    lines = [f"subliminal prompting: {trait} on {results['base']}, numbers 0..{results['candidates'] - 1}, "
             f"{results['n_questions']} questions, no training",
             f"P({trait}) with no system prompt {results['base_p_target']:.3g}; with the {trait} system prompt "
             f"x{ref['ratio']:.3g} [{math.exp(ref['ci_low']):.3g}, {math.exp(ref['ci_high']):.3g}] "
             f"p={format_p(ref['p'])}",
             f"{'number':>7}  {'kind':<9}  {'shift':>7}  {'P(' + trait + ') vs base [95% CI]':<28}  p"]
    for r in results["numbers"]:
        ratio = f"x{r['ratio']:.3g} [{math.exp(r['ci_low']):.3g}, {math.exp(r['ci_high']):.3g}]"
        lines.append(f"{r['number']:>7}  {r['kind']:<9}  {r['shift']:+7.3f}  {ratio:<28}  {format_p(r['p'])}")
    lines.append(results["verdict"])
    lines.append(f"p-values: {results['p_value_about']}")
    return "\n".join(lines)
