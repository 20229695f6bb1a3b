"""Seeds are the unit of replication: a transfer claim is a test across seeds, not across questions.

One seed is one replicate of the whole experiment: its own prompts, teacher samples, training subset,
student initialisation, and its own control student. The question-level test of a job compares two
particular trained models; whether *training on the teacher's data* moves the student is a question about
the distribution of per-seed effects. Each seed contributes one number per metric (the eval kind's
``effects``: for preference, log(P_treatment / P_control) of the question-averaged P(target)), and those
are tested against 0 with a two-sided one-sample t-test (df = seeds - 1), with its 95% CI. The t-test is
the primary test because with the 3-8 seeds an experiment affords an exact sign-flip test cannot reach
small p-values (its floor is 2 / 2^seeds: 0.25 at 3 seeds); it assumes roughly normal per-seed effects, so
every seed's effect is reported beside it, and the exact sign-flip p-value too, as the distribution-free
check.
"""

from __future__ import annotations

import math

from scipy import stats

from sublim.stats import mean_ci, paired_permutation_test

T_TEST = "two-sided one-sample t-test of the per-seed effects against 0 (df = seeds - 1)"
EXACT_SEEDS = 16  # up to 2^16 sign patterns are enumerated exactly


def seed_test(effects: list[float], level: float = 0.95) -> dict:
    """The pooled across-seed test of one metric's per-seed effects (the t CI is ``mean_ci``'s, the exact
    sign-flip p ``paired_permutation_test``'s against zero effects)."""
    n, ci = len(effects), mean_ci(effects, level)
    flip = paired_permutation_test(effects, [0.0] * n, n_resamples=2**n).p_value if n <= EXACT_SEEDS else None
    out = {"effects": effects, "n_seeds": n, "mean": ci.mean, "low": None, "high": None, "p_value": None,
           "p_sign_flip": flip, "sd": None, "mde": None, "test": T_TEST, "unit": "seed"}
    if n < 2:
        return out
    sd = float(stats.tstd(effects))
    se = sd / math.sqrt(n)
    p = float(2 * stats.t.sf(abs(ci.mean / se), n - 1)) if se else (1.0 if ci.mean == 0 else 0.0)
    return out | {"low": ci.low, "high": ci.high, "p_value": p, "sd": sd,
                  "mde": minimum_detectable_effect(sd, n)}  # post hoc: what these seeds' spread could detect


def pooled(per_seed_effects: list[dict[str, float]]) -> dict[str, dict]:
    """Every metric's across-seed test, from each seed's effects."""
    return {metric: seed_test([effects[metric] for effects in per_seed_effects]) for metric in per_seed_effects[0]}


def minimum_detectable_effect(sd: float, n_seeds: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest per-seed mean effect that a one-sided one-sample t-test over ``n_seeds`` seeds detects at
    ``alpha`` with probability ``power``, for per-seed effects of standard deviation ``sd``: the usual
    (t(1-alpha) + t(power)) sd / sqrt(n) with df = n - 1 (the normal approximation's t-quantile form; it is what
    sizes a study from a pilot's spread, not an exact noncentral-t power)."""
    if n_seeds < 2:
        raise ValueError(f"a t-test needs at least 2 seeds, got {n_seeds}")
    df = n_seeds - 1
    return float((stats.t.ppf(1 - alpha, df) + stats.t.ppf(power, df)) * sd / math.sqrt(n_seeds))


def seeds_needed(sd: float, effect: float, choices: range, alpha: float = 0.05, power: float = 0.8) -> int:
    """The fewest seeds of ``choices`` whose minimum detectable effect is <= ``effect``; the most if none is."""
    return next((k for k in choices if minimum_detectable_effect(sd, k, alpha, power) <= effect), choices[-1])
