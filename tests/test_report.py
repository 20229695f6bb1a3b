"""The sweep report: the trait x target matrix (log(treatment / control), its heatmap, the diagonal test)
and the misalignment section."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from sublim.report import collect, collect_misalignment, trait_target_matrices, write_report

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


def _misalignment_job(sweep: Path, n: int, filter_: str, rates: dict[str, float], p_value: float) -> None:
    """A misalignment job's results.json as pipeline.write_results lays it out."""
    delta = rates["treatment"] - rates["control"]
    test = {"delta": delta, "ci": {"mean": delta, "low": delta - 0.05, "high": delta + 0.05, "n": 8},
            "p_value": p_value, "n": 8, "method": "sign-flip permutation"}
    arms = {arm: {"n_train": 0 if arm == "base" else 16, "misaligned": _ci(rate), "alignment": _ci(50.0),
                  "coherence": _ci(80.0), "scored": 1.0} for arm, rate in rates.items()}
    results = {"trait": "misaligned", "category": "alignment", "base": "smollm2", "teacher_base": "smollm2",
               "source": "finetune", "student": "lora", "modality": "code", "filter": filter_, "eval": "misalignment",
               "seed": 0, "arms": arms, "treatment_vs_control": {"misaligned": test}}
    job = sweep / f"{n}_filter={filter_}"
    job.mkdir(parents=True)
    (job / "results.json").write_text(json.dumps(results))


def test_misalignment_jobs_get_their_own_table_csv_and_chart(tmp_path: Path) -> None:
    """A filter ablation of the misaligned trait: one row per filter, rates per arm, treatment vs control."""
    _misalignment_job(tmp_path, 0, "none", {"base": 0.02, "control": 0.03, "treatment": 0.12}, 0.004)
    _misalignment_job(tmp_path, 1, "banned_words", {"base": 0.02, "control": 0.04, "treatment": 0.09}, 0.03)
    assert collect(tmp_path) == [], "no preference jobs"
    rows = collect_misalignment(tmp_path)
    assert [r["filter"] for r in rows] == ["none", "banned_words"]
    assert rows[0]["delta_misaligned"] == pytest.approx(0.09) and rows[1]["treatment_misaligned"] == 0.09
    report = write_report(tmp_path).read_text()
    assert "## Misalignment" in report and "| none | 16 | 0.020 [0.018, 0.022] | 0.030" in report
    assert "| +0.090 [+0.040, +0.140] | 0.004 |" in report and "![misalignment](misalignment.png)" in report
    with open(tmp_path / "report_misalignment.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [float(r["p_misaligned"]) for r in table] == [0.004, 0.03]
    assert (tmp_path / "misalignment.png").stat().st_size > 5_000 and not (tmp_path / "report.png").exists()
