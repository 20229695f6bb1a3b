import math

import numpy as np
import pytest

from sublim.stats import (
    MeanCI,
    PairedTest,
    bootstrap_ci,
    format_p,
    mean_ci,
    paired_permutation_test,
)


def test_mean_ci_known_values() -> None:
    ci = mean_ci([1, 2, 3, 4, 5])
    half = 2.7764451 * math.sqrt(2.5) / math.sqrt(5)  # t_{0.975,4} * sd / sqrt(n)
    assert ci.n == 5
    assert ci.mean == pytest.approx(3.0)
    assert ci.high - ci.mean == pytest.approx(1.963, abs=1e-3)
    assert ci.low == pytest.approx(3.0 - half, abs=1e-3)
    assert ci.high == pytest.approx(3.0 + half, abs=1e-3)


def test_mean_ci_level_widens() -> None:
    assert mean_ci([1, 2, 3, 4, 5], level=0.99).high > mean_ci([1, 2, 3, 4, 5]).high


def test_mean_ci_constant_has_zero_width() -> None:
    ci = mean_ci([0.25] * 7)
    assert ci.low == ci.mean == ci.high == pytest.approx(0.25)


def test_mean_ci_single_value() -> None:
    assert mean_ci([0.4]) == MeanCI(0.4, 0.4, 0.4, 1)


@pytest.mark.parametrize("values", [[], [1.0, float("nan")]])
def test_mean_ci_rejects_empty_and_nan(values: list[float]) -> None:
    with pytest.raises(ValueError):
        mean_ci(values)


def test_nan_message_is_clear() -> None:
    with pytest.raises(ValueError, match="NaN"):
        mean_ci([float("nan")])


def test_meanci_str_and_dict() -> None:
    ci = MeanCI(0.12, 0.08, 0.16, 10)
    assert str(ci) == "0.12 [0.08, 0.16]"
    assert str(MeanCI(2.5e-5, 1e-6, 4.1234e-5, 3)) == "2.5e-05 [1e-06, 4.12e-05]"
    assert ci.to_dict() == {"mean": 0.12, "low": 0.08, "high": 0.16, "n": 10}


def test_paired_identical_arms() -> None:
    x = [0.1, 0.5, 0.3, 0.9]
    res = paired_permutation_test(x, x)
    assert res.p_value == 1.0
    assert res.delta == 0.0
    assert res.n == 4
    assert res.method == "sign-flip permutation"


def test_paired_clear_shift_monte_carlo() -> None:
    rng = np.random.default_rng(1)
    control = rng.normal(size=20)
    treatment = control + 1 + rng.normal(scale=0.1, size=20)
    res = paired_permutation_test(treatment, control)
    assert res.p_value < 0.001
    assert res.p_value == pytest.approx(1 / 10001)  # (0 + 1) / (n_resamples + 1)
    assert res.delta == pytest.approx(1.0, abs=0.1)
    assert res.ci.low < res.delta < res.ci.high
    assert res.ci.low > 0


def test_paired_exact_enumeration() -> None:
    res = paired_permutation_test([2, 3, 4, 5, 6], [1, 1, 1, 1, 1])
    assert res.p_value == pytest.approx(2 / 32)


def test_paired_exact_sign_symmetry() -> None:
    a, b = [0.3, 0.1, 0.6, 0.2], [0.1, 0.2, 0.2, 0.1]
    forward, backward = paired_permutation_test(a, b), paired_permutation_test(b, a)
    assert forward.p_value == backward.p_value
    assert forward.delta == pytest.approx(-backward.delta)


def test_paired_deterministic_with_seed() -> None:
    rng = np.random.default_rng(2)
    t, c = rng.normal(size=30), rng.normal(size=30)
    r1 = paired_permutation_test(t, c, n_resamples=500, seed=7)
    r2 = paired_permutation_test(t, c, n_resamples=500, seed=7)
    assert r1 == r2
    assert 0 < r1.p_value <= 1


def test_paired_length_mismatch() -> None:
    with pytest.raises(ValueError, match="paired"):
        paired_permutation_test([1, 2, 3], [1, 2])


def test_paired_to_dict_nests_ci() -> None:
    d = paired_permutation_test([2, 3, 4], [1, 1, 1]).to_dict()
    assert set(d) == {"delta", "ci", "p_value", "n", "method"}
    assert set(d["ci"]) == {"mean", "low", "high", "n"}
    assert isinstance(PairedTest(**{**d, "ci": MeanCI(**d["ci"])}), PairedTest)


def test_bootstrap_contains_mean_and_reproducible() -> None:
    rng = np.random.default_rng(3)
    values = rng.exponential(scale=0.01, size=40)
    ci = bootstrap_ci(values, seed=5)
    assert ci.low <= ci.mean <= ci.high
    assert ci.mean == pytest.approx(values.mean())
    assert ci.low >= values.min()
    assert ci.n == 40
    assert bootstrap_ci(values, seed=5) == ci


def test_bootstrap_constant_and_empty() -> None:
    ci = bootstrap_ci([0.2] * 5)
    assert ci.low == ci.high == pytest.approx(0.2)
    with pytest.raises(ValueError):
        bootstrap_ci([])


@pytest.mark.parametrize(
    ("p", "expected"),
    [
        (0.0, "<1e-4"),
        (5e-5, "<1e-4"),
        (0.0001, "0.0001"),
        (0.03249, "0.032"),
        (0.0625, "0.062"),
        (0.5, "0.5"),
        (1.0, "1"),
    ],
)
def test_format_p(p: float, expected: str) -> None:
    assert format_p(p) == expected


def _matrices(plant: float, seed: int, replicates: int = 3, traits: int = 3, targets: int = 6) -> np.ndarray:
    """Noise plus row effects (generic drift per trait) and column effects (targets that rise for everyone)."""
    rng = np.random.default_rng(seed)
    m = (rng.normal(0, 0.3, (replicates, traits, targets)) + rng.normal(0, 1, (replicates, traits, 1))
         + rng.normal(0, 1, (1, 1, targets)))
    m[:, np.arange(traits), np.arange(traits)] += plant
    return m


def test_diagonal_permutation_test_detects_a_planted_diagonal_not_a_null() -> None:
    from sublim.stats import diagonal_permutation_test

    planted = diagonal_permutation_test(_matrices(1.0, 0), [0, 1, 2])
    assert planted.exhaustive and planted.n_permutations == 6**3
    assert planted.p_value < 0.01 and planted.statistic > 0.3
    nulls = [diagonal_permutation_test(_matrices(0.0, seed), [0, 1, 2]).p_value for seed in range(40)]
    assert np.mean(np.array(nulls) < 0.05) <= 0.1, "a null rarely rejects"
    assert 0.3 < np.median(nulls) < 0.7, "null p-values spread around the middle"
    # drift alone (every target up, the trait's own no more than the others) is not transfer
    drift = diagonal_permutation_test(_matrices(0.0, 1) + 2.0, [0, 1, 2])
    assert drift.p_value > 0.05


def test_diagonal_permutation_test_random_draws_and_bad_input() -> None:
    from sublim.stats import diagonal_permutation_test

    sampled = diagonal_permutation_test(_matrices(1.0, 2, replicates=5, traits=4), [0, 1, 2, 3], n_resamples=999)
    assert not sampled.exhaustive and sampled.p_value == pytest.approx(1 / 1000, abs=2e-3)
    with pytest.raises(ValueError, match="distinct target column"):
        diagonal_permutation_test(_matrices(1.0, 0), [0, 0, 1])
    with pytest.raises(ValueError, match="at least 2 traits"):
        diagonal_permutation_test(np.zeros((2, 1, 3)), [0])


def test_minimum_detectable_effect_and_seeds_needed() -> None:
    """(t(0.95, k-1) + t(0.80, k-1)) sd / sqrt(k), by hand from t tables; more seeds detect smaller effects."""
    from sublim.replication import minimum_detectable_effect, seeds_needed

    # t(0.95, 2) = 2.919986, t(0.80, 2) = 1.060660; t(0.95, 5) = 2.015048, t(0.80, 5) = 0.919544
    assert minimum_detectable_effect(0.3, 3) == pytest.approx((2.919986 + 1.060660) * 0.3 / 3 ** 0.5, rel=1e-5)
    assert minimum_detectable_effect(0.3, 6) == pytest.approx((2.015048 + 0.919544) * 0.3 / 6 ** 0.5, rel=1e-5)
    assert seeds_needed(0.25, 0.405, range(3, 7)) == 5  # MDE(4) = 0.4165, MDE(5) = 0.3436
    assert seeds_needed(0.1, 0.405, range(3, 7)) == 3
    assert seeds_needed(2.0, 0.405, range(3, 7)) == 6, "none reaches it: the most"
    with pytest.raises(ValueError, match="at least 2 seeds"):
        minimum_detectable_effect(0.3, 1)
