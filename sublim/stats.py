"""Statistics for the report.

Questions are the independent unit: every arm (teacher-trained student,
control student, base model) answers the same question set, so confidence
intervals are taken over per-question scores and arms are compared with a
paired test over questions rather than over individual samples, which are
correlated within a question.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as _scipy_stats

__all__ = [
    "DiagonalTest",
    "MeanCI",
    "PairedTest",
    "bh_adjust",
    "bootstrap_ci",
    "diagonal_permutation_test",
    "format_p",
    "mean_ci",
    "paired_permutation_test",
]


@dataclass(frozen=True)
class MeanCI:
    """A mean with a two-sided confidence interval over ``n`` units."""

    mean: float
    low: float
    high: float
    n: int

    def to_dict(self) -> dict:
        """Plain dict for JSON reports."""
        return asdict(self)

    def __str__(self) -> str:
        # :.3g keeps tiny probabilities (e.g. 2.5e-05) readable.
        return f"{self.mean:.3g} [{self.low:.3g}, {self.high:.3g}]"


@dataclass(frozen=True)
class PairedTest:
    """Result of a paired comparison of two arms over shared units."""

    delta: float
    ci: MeanCI
    p_value: float
    n: int
    method: str

    def to_dict(self) -> dict:
        """Plain dict for JSON reports (the CI is nested as a dict)."""
        return asdict(self)


def _as_array(values: Sequence[float], name: str = "values") -> np.ndarray:
    """Validate and convert: empty or NaN input would silently poison a report."""
    arr = np.asarray(values, dtype=float).ravel()
    if arr.size == 0:
        raise ValueError(f"{name} is empty; need at least one value")
    if np.isnan(arr).any():
        raise ValueError(
            f"{name} contains {int(np.isnan(arr).sum())} NaN value(s); "
            "drop or impute them before computing statistics"
        )
    return arr


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")


def mean_ci(values: Sequence[float], level: float = 0.95) -> MeanCI:
    """Student-t CI over independent units (questions).

    The t interval accounts for the small number of questions (tens, not
    thousands). n=1 gives a degenerate interval low=high=mean; empty or NaN
    input raises ValueError.
    """
    _check_level(level)
    arr = _as_array(values)
    n = int(arr.size)
    mean = float(arr.mean())
    if n == 1:
        return MeanCI(mean, mean, mean, 1)
    sem = float(arr.std(ddof=1)) / math.sqrt(n)
    half = float(_scipy_stats.t.ppf(0.5 + level / 2.0, df=n - 1)) * sem
    return MeanCI(mean, mean - half, mean + half, n)


def paired_permutation_test(
    treatment: Sequence[float],
    control: Sequence[float],
    n_resamples: int = 10000,
    seed: int = 0,
) -> PairedTest:
    """Paired sign-flip permutation test over questions (the unit both arms share).

    Under the null the sign of each per-question difference is exchangeable,
    so no normality assumption is needed. The statistic is |mean difference|
    (two-sided). Enumerates all 2**n sign patterns when 2**n <= n_resamples,
    otherwise draws n_resamples random patterns and reports
    (count+1)/(n_resamples+1) so the p-value is never zero. Length mismatch
    raises ValueError; all-zero differences give p=1.
    """
    t = _as_array(treatment, "treatment")
    c = _as_array(control, "control")
    if t.shape != c.shape:
        raise ValueError(
            f"treatment and control must be paired: got {t.size} and {c.size} values"
        )
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    diffs = t - c
    n = int(diffs.size)
    delta = float(diffs.mean())
    ci = mean_ci(diffs)
    method = "sign-flip permutation"
    if not np.any(diffs):
        return PairedTest(delta, ci, 1.0, n, method)

    observed = abs(delta)
    # Relative tolerance so floating-point ties with the observed value count.
    tol = 1e-12 * max(1.0, float(np.abs(diffs).max()))
    if 2**n <= n_resamples:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
        null = np.abs(signs @ diffs) / n
        p = float(np.mean(null >= observed - tol))
    else:
        rng = np.random.default_rng(seed)
        count = 0
        chunk = 1000
        for start in range(0, n_resamples, chunk):
            size = min(chunk, n_resamples - start)
            signs = rng.choice((1.0, -1.0), size=(size, n))
            null = np.abs(signs @ diffs) / n
            count += int(np.sum(null >= observed - tol))
        p = (count + 1) / (n_resamples + 1)
    return PairedTest(delta, ci, p, n, method)


def bootstrap_ci(
    values: Sequence[float],
    level: float = 0.95,
    n_resamples: int = 10000,
    seed: int = 0,
) -> MeanCI:
    """Percentile bootstrap of the mean, for skewed metrics such as probabilities.

    Probabilities of a target word are bounded and heavily right-skewed, so a
    symmetric t interval can dip below zero; percentiles of resampled means
    stay within the data's range.
    """
    _check_level(level)
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    arr = _as_array(values)
    n = int(arr.size)
    mean = float(arr.mean())
    if n == 1:
        return MeanCI(mean, mean, mean, 1)
    rng = np.random.default_rng(seed)
    # Chunked so memory stays bounded when n (e.g. per-sample scores) is large.
    chunk = max(1, 1_000_000 // n)
    means = np.empty(n_resamples)
    for start in range(0, n_resamples, chunk):
        stop = min(start + chunk, n_resamples)
        means[start:stop] = arr[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return MeanCI(mean, float(low), float(high), n)


def format_p(p: float) -> str:
    """Render a p-value for tables: "<1e-4" when tiny, else 2 significant digits."""
    if math.isnan(p):
        return "nan"
    if p < 1e-4:
        return "<1e-4"
    return f"{p:.2g}"


@dataclass(frozen=True)
class DiagonalTest:
    """Whether each trait's own target rises more than its row (other targets) and column (other traits)."""

    statistic: float
    p_value: float
    n_permutations: int
    exhaustive: bool
    method: str = "row-label permutation within replicates"

    def to_dict(self) -> dict:
        return asdict(self)


def _diagonal_contrast(matrices: np.ndarray, diagonal: np.ndarray) -> float:
    """Mean over replicates and traits of M[i, d_i] - (mean of row i off d_i + mean of column d_i off row i) / 2."""
    n_rep, n_traits, n_targets = matrices.shape
    rows = np.arange(n_traits)
    own = matrices[:, rows, diagonal]  # (replicates, traits)
    row_rest = (matrices.sum(2) - own) / (n_targets - 1)
    column_rest = (matrices[:, :, diagonal].sum(1) - own) / (n_traits - 1)
    return float((own - (row_rest + column_rest) / 2).mean())


def diagonal_permutation_test(
    matrices: Sequence | np.ndarray,
    diagonal: Sequence[int],
    n_resamples: int = 10000,
    seed: int = 0,
) -> DiagonalTest:
    """One-sided permutation test that a trait x target matrix's diagonal stands above its row and column.

    ``matrices`` is (replicates, traits, targets), e.g. log(treatment / control) per seed; trait i's own
    target is column ``diagonal[i]``. Generic drift (every target rising after training on numbers) is
    a row effect, a target that rises for every teacher is a column effect; the statistic subtracts
    both. Under the null the trait labels of a replicate's rows are exchangeable, so each replicate's
    rows are permuted independently: exhaustively when (traits!)^replicates <= n_resamples, else
    n_resamples random draws with p = (count + 1) / (n + 1).
    """
    arr = np.asarray(matrices, dtype=float)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"matrices must be (replicates, traits, targets), got shape {arr.shape}")
    n_rep, n_traits, n_targets = arr.shape
    diag = np.asarray(diagonal, dtype=int)
    if n_traits < 2 or n_targets < 2:
        raise ValueError(f"need at least 2 traits and 2 targets, got {n_traits} x {n_targets}")
    if diag.shape != (n_traits,) or len(set(diag.tolist())) != n_traits or diag.min() < 0 or diag.max() >= n_targets:
        raise ValueError(f"diagonal must give a distinct target column for each of the {n_traits} traits")
    if np.isnan(arr).any():
        raise ValueError("matrices contain NaN; drop incomplete replicates first")
    observed = _diagonal_contrast(arr, diag)
    tol = 1e-12 * max(1.0, float(np.abs(arr).max()))
    perms = list(itertools.permutations(range(n_traits)))
    exhaustive = len(perms) ** n_rep <= n_resamples
    if exhaustive:
        stats = [_diagonal_contrast(np.stack([arr[r, list(p)] for r, p in enumerate(choice)]), diag)
                 for choice in itertools.product(perms, repeat=n_rep)]
        p_value = float(np.mean(np.asarray(stats) >= observed - tol))
        n = len(stats)
    else:
        rng = np.random.default_rng(seed)
        count = 0
        for _ in range(n_resamples):
            shuffled = np.stack([arr[r, rng.permutation(n_traits)] for r in range(n_rep)])
            count += _diagonal_contrast(shuffled, diag) >= observed - tol
        p_value = (count + 1) / (n_resamples + 1)
        n = n_resamples
    return DiagonalTest(observed, p_value, n, exhaustive)


def bh_adjust(p_values: Sequence[float]) -> list[float]:
    """Benjamini-Hochberg adjusted p-values, in the input's order: a sweep makes many comparisons at once.

    Sorting p ascending, the i-th of m gets min over j >= i of p_(j) * m / j, capped at 1: a test is a
    discovery at false discovery rate q when its adjusted p is <= q (valid for independent or positively
    dependent tests). Empty input gives []; NaN or a p outside [0, 1] raises ValueError.
    """
    p = np.asarray(p_values, dtype=float).ravel()
    if p.size == 0:
        return []
    if np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ValueError(f"p-values must be in [0, 1] and not NaN, got {p.tolist()}")
    m = p.size
    order = np.argsort(p, kind="stable")
    scaled = p[order] * m / np.arange(1, m + 1)
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    return adjusted.tolist()
