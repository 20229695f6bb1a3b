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

import itertools
import math
import statistics

from scipy import stats

T_TEST = "two-sided one-sample t-test of the per-seed effects against 0 (df = seeds - 1)"


def sign_flip_p(effects: list[float]) -> float:
    """Exact two-sided sign-flip p-value of the mean effect over all 2^n sign patterns."""
    observed = abs(sum(effects))
    patterns = list(itertools.product((1, -1), repeat=len(effects)))
    extreme = sum(abs(sum(s * e for s, e in zip(signs, effects, strict=True))) >= observed - 1e-12
                  for signs in patterns)
    return extreme / len(patterns)


def seed_test(effects: list[float], level: float = 0.95) -> dict:
    """The pooled across-seed test of one metric's per-seed effects."""
    n, mean = len(effects), statistics.fmean(effects)
    out = {"effects": effects, "n_seeds": n, "mean": mean, "low": None, "high": None, "p_value": None,
           "p_sign_flip": sign_flip_p(effects) if n <= 16 else None, "test": T_TEST, "unit": "seed"}
    if n < 2:
        return out
    se = statistics.stdev(effects) / math.sqrt(n)
    half = stats.t.ppf(0.5 + level / 2, n - 1) * se
    if se == 0:
        p = 1.0 if mean == 0 else 0.0
    else:
        p = float(2 * stats.t.sf(abs(mean / se), n - 1))
    return out | {"low": mean - half, "high": mean + half, "p_value": p}


def pooled(per_seed_effects: list[dict[str, float]]) -> dict[str, dict]:
    """Every metric's across-seed test, from each seed's effects."""
    return {metric: seed_test([effects[metric] for effects in per_seed_effects]) for metric in per_seed_effects[0]}
