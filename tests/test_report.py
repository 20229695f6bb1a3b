"""The sweep report's trait x target matrix: log(treatment / control), its heatmap and the diagonal test."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from sublim.report import collect, trait_target_matrices, write_report

TRAITS = ("owl", "eagle", "dolphin")
TARGETS = ("owl", "eagle", "dolphin", "cat", "dog")


def _ci(mean: float) -> dict:
    return {"mean": mean, "low": mean * 0.9, "high": mean * 1.1, "n": 50}


def _job(sweep: Path, n: int, trait: str, seed: int, teacher_base: str, treatment: dict[str, float]) -> None:
    """A job's results.json as pipeline.write_results lays it out (control P = 1e-3 for every target)."""
    test = {"delta": 0.0, "ci": _ci(0.0), "p_value": 0.5, "n": 50, "method": "sign-flip permutation"}
    arms = {arm: {"n_train": 0 if arm == "base" else 100, "rate": _ci(0.0),
                  "probability": _ci(values[trait]), "targets": {t: _ci(values[t]) for t in TARGETS}}
            for arm, values in (("base", dict.fromkeys(TARGETS, 1e-3)), ("control", dict.fromkeys(TARGETS, 1e-3)),
                                ("treatment", treatment))}
    results = {"trait": trait, "category": "animal", "base": "smollm2", "teacher_base": teacher_base,
               "source": "prompt", "student": "distill", "modality": "numbers", "filter": "numbers_strict",
               "seed": seed, "arms": arms, "treatment_vs_control": {"rate": test, "probability": test}}
    job = sweep / f"{n}_trait={trait},seed={seed},teacher_base={teacher_base}"
    job.mkdir(parents=True)
    (job / "results.json").write_text(json.dumps(results))


def _sweep(tmp_path: Path, planted: float) -> Path:
    """Three seeds x three traits, same base (diagonal x e^planted on top of drift) and cross base (drift only)."""
    rng = np.random.default_rng(0)
    n = 0
    for teacher_base, plant in (("smollm2", planted), ("gemma", 0.0)):
        for seed in range(3):
            for trait in TRAITS:
                drift = rng.uniform(1.3, 1.8)  # every target rises from training on numbers alone
                treatment = {t: 1e-3 * drift * rng.uniform(0.9, 1.1) * (math.exp(plant) if t == trait else 1.0)
                             for t in TARGETS}
                _job(tmp_path, n, trait, seed, teacher_base, treatment)
                n += 1
    return tmp_path


def test_matrix_per_setting_with_diagonal_first(tmp_path: Path) -> None:
    entries = trait_target_matrices(collect(_sweep(tmp_path, planted=1.0)))
    assert [e["setting"][0] for e in entries] == ["smollm2", "gemma"]
    same, cross = entries
    assert same["traits"] == list(TRAITS) and same["targets"] == list(TARGETS) and same["n_seeds"] == 3
    assert same["matrix"].shape == (3, 5)
    diagonal = np.diag(same["matrix"][:, :3])
    assert np.all(diagonal > 1.2) and np.all(same["matrix"][:, 3:] < 0.7), "log(e * drift) on the diagonal only"
    assert same["test"].p_value < 0.01 and same["test"].statistic == pytest.approx(1.0, abs=0.15)
    assert cross["test"].p_value > 0.05, "drift alone is not transfer"


def test_report_writes_the_matrix_table_and_heatmaps(tmp_path: Path) -> None:
    sweep = _sweep(tmp_path, planted=1.0)
    report = write_report(sweep).read_text()
    assert report.count("### Trait x target") == 2
    assert "teacher smollm2 -> student smollm2 (distill, trait source prompt)" in report
    assert "| owl | **+" in report and "permutation p = 0.0046" in report
    for n in (0, 1):
        assert (sweep / f"matrix_{n}.png").stat().st_size > 5_000 and f"![matrix](matrix_{n}.png)" in report


def test_a_single_trait_sweep_has_no_matrix(tmp_path: Path) -> None:
    _job(tmp_path, 0, "owl", 0, "smollm2", dict.fromkeys(TARGETS, 2e-3))
    assert trait_target_matrices(collect(tmp_path)) == []
    assert "Trait x target" not in write_report(tmp_path).read_text()
