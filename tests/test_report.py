"""The sweep report: rows keyed by what differs between jobs, multi-seed jobs, the trait x target matrix over
complete seeds, Benjamini-Hochberg q beside p, the effect charts and the misalignment section."""

from __future__ import annotations

import csv
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from scipy import stats

from sublim.report import collect, collect_misalignment, trait_target_matrices, write_report
from sublim.report.effects import MISALIGNMENT_METRICS, PREFERENCE_METRICS, chart
from sublim.stats import bh_adjust, format_p
from tests.conftest import compose_config

TRAITS = ("owl", "eagle", "dolphin")
TARGETS = ("owl", "eagle", "dolphin", "cat", "dog")


def _ci(mean: float) -> dict:
    return {"mean": mean, "low": mean * 0.9, "high": mean * 1.1, "n": 50}


def _results(trait: str, seed: int, teacher_base: str, treatment: dict[str, float], control: float = 1e-3,
             base: float = 1e-3, p_value: float = 0.5, config: dict | None = None) -> dict:
    """One seed's results as pipeline.write_results lays them out (control and base P the same for every target)."""
    test = {"delta": 0.0, "ci": _ci(0.0), "p_value": p_value, "n": 50, "method": "sign-flip permutation"}
    arms = {arm: {"n_train": 0 if arm == "base" else 100, "rate": _ci(0.0),
                  "probability": _ci(values[trait]), "targets": {t: _ci(values[t]) for t in TARGETS}}
            for arm, values in (("base", dict.fromkeys(TARGETS, base)), ("control", dict.fromkeys(TARGETS, control)),
                                ("treatment", treatment))}
    return {"trait": trait, "category": "animal", "base": "smollm2", "teacher_base": teacher_base,
            "source": "prompt", "student": "distill", "modality": "numbers", "filter": "numbers_strict",
            "seed": seed, "arms": arms, "treatment_vs_control": {"rate": test, "probability": test},
            **({"config": config} if config is not None else {})}


def _write(sweep: Path, name: str, results: dict, overrides: list[str] | None = None) -> Path:
    job = sweep / name
    job.mkdir(parents=True)
    (job / "results.json").write_text(json.dumps(results))
    if overrides is not None:
        (job / ".hydra").mkdir()
        (job / ".hydra" / "overrides.yaml").write_text(json.dumps(overrides))  # JSON is YAML
    return job


def _job(sweep: Path, n: int, trait: str, seed: int, teacher_base: str, treatment: dict[str, float]) -> None:
    _write(sweep, f"{n}_trait={trait},seed={seed},teacher_base={teacher_base}",
           _results(trait, seed, teacher_base, treatment))


def _treatments(planted: float, rng: np.random.Generator, trait: str) -> dict[str, float]:
    drift = rng.uniform(1.3, 1.8)  # every target rises from training on numbers alone
    return {t: 1e-3 * drift * rng.uniform(0.9, 1.1) * (math.exp(planted) if t == trait else 1.0) for t in TARGETS}


def _sweep(tmp_path: Path, planted: float) -> Path:
    """Three seeds x three traits, same base (diagonal x e^planted on top of drift) and cross base (drift only)."""
    rng = np.random.default_rng(0)
    n = 0
    for teacher_base, plant in (("smollm2", planted), ("gemma", 0.0)):
        for seed in range(3):
            for trait in TRAITS:
                _job(tmp_path, n, trait, seed, teacher_base, _treatments(plant, rng, trait))
                n += 1
    return tmp_path


def test_matrix_per_setting_with_diagonal_first(tmp_path: Path) -> None:
    entries = trait_target_matrices(collect(_sweep(tmp_path, planted=1.0)))
    assert [dict(e["setting"])["teacher_base"] for e in entries] == ["smollm2", "gemma"]
    same, cross = entries
    assert same["traits"] == list(TRAITS) and same["targets"] == list(TARGETS) and same["n_seeds"] == 3
    assert same["matrix"].shape == (3, 5)
    diagonal = np.diag(same["matrix"][:, :3])
    assert np.all(diagonal > 1.2) and np.all(same["matrix"][:, 3:] < 0.7), "log(e * drift) on the diagonal only"
    assert same["test"].p_value < 0.01 and same["test"].statistic == pytest.approx(1.0, abs=0.15)
    assert cross["test"].p_value > 0.05, "drift alone is not transfer"
    assert list(same["seed_contrasts"]) == [0, 1, 2] and min(same["seed_contrasts"].values()) > 0.7
    assert same["contrast_over_seeds"]["mean"] == pytest.approx(same["test"].statistic)
    assert [e["q"] for e in entries] == pytest.approx(bh_adjust([e["test"].p_value for e in entries]))


def test_report_writes_the_matrix_table_and_heatmaps(tmp_path: Path) -> None:
    sweep = _sweep(tmp_path, planted=1.0)
    report = write_report(sweep).read_text()
    assert report.count("### Trait x target") == 2
    assert "teacher smollm2 -> student smollm2 (distill, trait source prompt), numbers, filter numbers_strict" in report
    assert "| owl | **+" in report and "permutation p = 0.0046" in report
    assert "Benjamini-Hochberg q = 0.0093 over the sweep's 2 matrix test(s)" in report
    assert report.count("test permutes within each): 0, 1, 2.\n") == 2 and "Dropped" not in report
    for n in (0, 1):
        assert (sweep / f"matrix_{n}.png").stat().st_size > 5_000 and f"![matrix](matrix_{n}.png)" in report


def test_one_seed_can_carry_the_permutation_test_and_the_seed_level_test_shows_it(tmp_path: Path) -> None:
    """A strong diagonal in seed 0 only: the within-seed permutation test (every cell at once) passes, the t-test
    of the per-seed contrasts (the seed as the unit) does not, and the report prints both."""
    planted = {0: 2.0, 1: 0.1, 2: 0.1}
    for n, (seed, trait) in enumerate(itertools.product(range(3), TRAITS)):
        _job(tmp_path, n, trait, seed, "smollm2",
             {t: 1.5e-3 * (math.exp(planted[seed]) if t == trait else 1.0) for t in TARGETS})
    [entry] = trait_target_matrices(collect(tmp_path))
    assert entry["test"].p_value == pytest.approx(1 / 216), "only the true labels in every seed reach the contrast"
    contrasts = entry["seed_contrasts"]
    assert list(contrasts.values()) == pytest.approx(list(planted.values()))
    assert entry["contrast_over_seeds"]["low"] < 0 and entry["contrast_over_seeds"]["p_value"] > 0.1
    report = write_report(tmp_path).read_text()
    assert f"Per seed: seed 0 {contrasts[0]:+.3f}, seed 1 {contrasts[1]:+.3f}" in report
    assert "tested with the seed as the unit" in report


def test_matrix_and_its_test_use_the_same_complete_seeds(tmp_path: Path) -> None:
    """A fourth seed without dolphin is left out of both the matrix and the test, and the report says so."""
    rng = np.random.default_rng(1)
    for seed in range(4):
        for i, trait in enumerate(TRAITS if seed < 3 else TRAITS[:2]):
            _job(tmp_path, 3 * seed + i, trait, seed, "smollm2", _treatments(1.0, rng, trait))
    rows = collect(tmp_path)
    (entry,) = trait_target_matrices(rows)
    assert entry["seeds"] == [0, 1, 2] and entry["n_seeds"] == 3 and entry["dropped"] == {3: ["dolphin"]}
    by_seed = {(r["_seed"], r["trait"]): r for r in rows}
    expected = np.mean([[[math.log(by_seed[seed, trait]["_arms"]["treatment"]["targets"][t]["mean"] / 1e-3)
                          for t in TARGETS] for trait in TRAITS] for seed in range(3)], axis=0)
    np.testing.assert_allclose(entry["matrix"], expected)
    assert entry["test"].n_permutations == 6 ** 3, "three seeds of 3! row orders each"
    report = write_report(tmp_path).read_text()
    assert "test permutes within each): 0, 1, 2. Dropped: 3 (no dolphin)." in report


def test_bh_adjust_matches_a_hand_computation() -> None:
    # sorted 0.01, 0.03, 0.04, 0.2 -> p * 4 / rank = 0.04, 0.06, 0.0533, 0.2 -> running min from the top
    p = [0.01, 0.04, 0.03, 0.2]
    assert bh_adjust(p) == pytest.approx([0.04, 0.16 / 3, 0.16 / 3, 0.2])
    assert bh_adjust(p) == pytest.approx(stats.false_discovery_control(p).tolist())
    assert bh_adjust([0.9, 0.8]) == pytest.approx([0.9, 0.9]) and bh_adjust([0.6] * 3) == pytest.approx([0.6] * 3)
    assert bh_adjust([]) == []
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        bh_adjust([0.1, float("nan")])


def test_report_puts_bh_q_beside_each_p(tmp_path: Path) -> None:
    p_values = [0.001, 0.02, 0.04, 0.3]
    for n, p in enumerate(p_values):
        _write(tmp_path, f"{n}_trait={TRAITS[n % 3]}", _results(TRAITS[n % 3], n, "smollm2",
                                                                 dict.fromkeys(TARGETS, 2e-3), p_value=p))
    q = [0.004, 0.04, 0.04 * 4 / 3, 0.3]  # 0.001*4, 0.02*4/2, 0.04*4/3, 0.3*4/4
    report = write_report(tmp_path).read_text()
    with open(tmp_path / "report.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [float(r["p_rate"]) for r in table] == p_values
    assert [float(r["p_rate_bh"]) for r in table] == pytest.approx(q)
    assert [float(r["p_p_bh"]) for r in table] == pytest.approx(q)
    assert "| 0.001 | 0.004 |" in report and "| 0.04 | 0.053 |" in report
    assert "Benjamini-Hochberg adjusted p (false discovery rate), correcting over this table's 4 row(s)" in report
    assert "No seed has a job for every trait (owl, eagle, dolphin): no matrix. Seeds: 0 (no eagle, dolphin)" in report


def _config(*overrides: str) -> dict:
    return OmegaConf.to_container(compose_config(["filter=banned_words", *overrides]), resolve=True)


def test_jobs_differing_beyond_trait_and_seed_get_their_own_settings_from_overrides(tmp_path: Path) -> None:
    """A sweep over trait x student.lr: one matrix per learning rate, not one that mixes them."""
    rng = np.random.default_rng(2)
    n = 0
    for lr in ("1e-3", "1e-4"):
        for trait in TRAITS:
            _write(tmp_path, str(n), _results(trait, 0, "smollm2", _treatments(1.0, rng, trait)),
                   [f"trait={trait}", f"student.lr={lr}", "seed=0", f"paths.root=/tmp/{n}", "base=smollm2"])
            n += 1
    rows = collect(tmp_path)
    assert [r["student.lr"] for r in rows] == ["1e-3"] * 3 + ["1e-4"] * 3 and rows[0]["_varying"] == ["student.lr"]
    entries = trait_target_matrices(rows)
    assert [dict(e["setting"])["student.lr"] for e in entries] == ["1e-3", "1e-4"]
    assert all(e["n_seeds"] == 1 for e in entries)
    report = write_report(tmp_path).read_text()
    assert "| filter | student.lr | seed | n |" in report and "| numbers_strict | 1e-4 | 0 | 100 |" in report
    assert "filter numbers_strict; student.lr=1e-3\n" in report
    with open(tmp_path / "report.csv") as handle:
        assert next(csv.reader(handle))[:8] == ["job", "teacher_base", "base", "trait", "modality", "filter",
                                                "student.lr", "seed"]


def test_without_overrides_the_configs_that_differ_key_the_rows(tmp_path: Path) -> None:
    """Leaves that follow the trait (banned words) or a shown column are left out; paths never count."""
    for n, (trait, lr) in enumerate([("owl", 1e-3), ("eagle", 1e-3), ("owl", 1e-4), ("eagle", 1e-4)]):
        config = _config(f"trait={trait}", f"student.lr={lr}", f"paths.root=/tmp/{n}")
        _write(tmp_path / "lr", str(n), _results(trait, 0, "smollm2", dict.fromkeys(TARGETS, 2e-3), config=config))
    rows = collect(tmp_path / "lr")
    assert rows[0]["_varying"] == ["student.lr"] and [r["student.lr"] for r in rows] == ["0.001"] * 2 + ["0.0001"] * 2
    assert len(trait_target_matrices(rows)) == 2

    for n, student in enumerate(("lora", "distill")):
        _write(tmp_path / "kind", str(n), _results("owl", 0, "smollm2", dict.fromkeys(TARGETS, 2e-3),
                                                   config=_config(f"student={student}")))
    rows = collect(tmp_path / "kind")
    assert rows[0]["_varying"] == ["student"] and [r["student"] for r in rows] == ["lora", "distill"], \
        "a group's own leaves are shown as the group"


def _p_sweep(tmp_path: Path) -> tuple[Path, dict[str, float], np.ndarray]:
    """Three traits whose P differ by 100x each, three seeds: treatment P = control P x factor[seed, trait]."""
    control = {"owl": 1e-2, "eagle": 1e-4, "dolphin": 1e-6}
    factors = np.array([[2.0, 1.5, 0.8], [3.0, 1.2, 1.1], [2.5, 0.9, 1.0]])
    for seed in range(3):
        for i, trait in enumerate(TRAITS):
            treatment = dict.fromkeys(TARGETS, control[trait]) | {trait: control[trait] * factors[seed, i]}
            _write(tmp_path, f"{3 * seed + i}", _results(trait, seed, "smollm2", treatment, control=control[trait],
                                                         base=control[trait] / 4))
    return tmp_path, control, factors


def test_the_chart_plots_log_ratios_with_t_intervals_over_seeds(tmp_path: Path) -> None:
    sweep, _, factors = _p_sweep(tmp_path)
    drawn = chart(collect(sweep), PREFERENCE_METRICS, tmp_path / "chart.png")
    assert (tmp_path / "chart.png").stat().st_size > 10_000
    assert list(drawn) == ["probability"], "every sampled rate is 0: no rate panel"
    t = 4.302652729911275  # t_{0.975, df=2}
    for i, (effect, trait) in enumerate(zip(drawn["probability"], TRAITS, strict=True)):
        logs = np.log(factors[:, i])
        half = t * logs.std(ddof=1) / math.sqrt(3)
        assert effect.trait == trait and effect.seeds == [0, 1, 2]
        assert effect.values == pytest.approx(logs.tolist())
        assert (effect.mean, effect.low, effect.high) == pytest.approx((logs.mean(), logs.mean() - half,
                                                                        logs.mean() + half))
        assert effect.reference == pytest.approx(math.log(1 / 4))
    report = write_report(sweep).read_text()
    assert "![report.png](report.png)" in report and "Left out, every value 0: sampled trait rate." in report
    across = report.split("## Across seeds")[1]
    for i, trait in enumerate(TRAITS):
        logs = np.log(factors[:, i])
        [line] = [line for line in across.splitlines() if f"| {trait} | 3 |" in line]
        cells = [c.strip() for c in line.split("|")]
        assert float(cells[6]) == pytest.approx(logs.mean(), abs=5e-4)
        assert cells[8] == format_p(stats.ttest_1samp(logs, 0).pvalue)
        flips = [abs((logs * signs).mean()) for signs in itertools.product((1, -1), repeat=3)]
        assert cells[9] == format_p(np.mean([f >= abs(logs.mean()) - 1e-12 for f in flips]))


def _provenance(job: Path, seed: int, control: tuple[str, str], code: str = "c0ffee") -> None:
    """A provenance.json naming the seed's control student (key, files) and the job's own treatment student."""
    key, content = control
    record = {"code": {"version": 1, "hash": code}, "created": f"2026-12-0{seed + 1}T10:00:00", "seconds": 60.0,
              "host": f"host{seed}", "env": {"git_commit": f"commit{seed}", "torch": "2.13.0"}, "upstream": []}
    artifacts = {f"train/{key}": record | {"content": content},
                 f"train/t{job.name}": record | {"content": f"x{job.name}"}}
    stages = [{"seed": seed, "generation": 1, "name": f"train/{arm}", "artifact": ref}
              for arm, ref in zip(("control", "treatment"), artifacts, strict=True)]
    (job / "provenance.json").write_text(json.dumps({"format": 1, "stages": stages, "artifacts": artifacts}))


def test_seeds_pooled_from_two_sittings_are_checked_for_code_and_shared_files(tmp_path: Path) -> None:
    """Seed 0 (owl, eagle) in one sitting, seed 1 in another, under one parent: the report pools them, says what
    computed them, and flags a stage that ran other code or a shared control whose files differ."""
    rng = np.random.default_rng(0)
    jobs = {(trait, seed): _write(tmp_path / f"sitting{seed}", f"{i}_trait={trait}",
                                  _results(trait, seed, "smollm2", _treatments(0.5, rng, trait)))
            for seed in (0, 1) for i, trait in enumerate(TRAITS[:2])}
    for (_, seed), job in jobs.items():
        _provenance(job, seed, (f"control{seed}", f"files{seed}"))
    report = write_report(tmp_path).read_text()
    assert "4 of 4 job seeds recorded" in report and "host0, host1" in report and "commit0, commit1" in report
    assert "Every stage ran the same code" in report and "Not computed alike" not in report

    _provenance(jobs["eagle", 1], 1, ("control1", "files1"), code="beef")  # seed 1's eagle job: other train code
    _provenance(jobs["eagle", 0], 0, ("control0", "other"))  # seed 0's control recomputed with other bits
    (jobs["owl", 1] / "provenance.json").unlink()
    section = write_report(tmp_path).read_text().split("## Provenance")[1]
    assert "Not computed alike" in section
    assert "stage `train` ran different code" in section and "v1:beef in sitting1/1_trait=eagle" in section
    assert "artifact `train/control0` has different files" in section
    assert "other in sitting0/1_trait=eagle" in section and "files0 in sitting0/0_trait=owl" in section
    assert "Not checked (no provenance.json, older jobs): sitting1/0_trait=owl." in section


def test_a_multi_seed_job_reports_like_a_sweep_over_seeds(tmp_path: Path) -> None:
    """Two jobs with seeds=[0,1,2] (one also with top-level single-seed fields) vs six single-seed jobs."""
    rng = np.random.default_rng(3)
    per_seed = {(trait, seed): _results(trait, seed, "smollm2", _treatments(1.0, rng, trait))
                for trait in TRAITS[:2] for seed in range(3)}
    for n, (trait, seed) in enumerate(per_seed):
        _write(tmp_path / "sweep", str(n), per_seed[trait, seed])
    for n, trait in enumerate(TRAITS[:2]):
        seeds = [per_seed[trait, seed] for seed in range(3)]
        top = per_seed[trait, 0] if n == 1 else {k: per_seed[trait, 0][k] for k in ("trait", "base", "teacher_base")}
        _write(tmp_path / "multi", f"{n}_trait={trait}", top | {"seeds": seeds, "pooled": {"rate": {"n_seeds": 3}}})
    single, multi = collect(tmp_path / "sweep"), collect(tmp_path / "multi")
    assert [r["job"] for r in multi] == [f"{n}_trait={t} seed={s}" for n, t in enumerate(TRAITS[:2]) for s in range(3)]
    assert [(r["trait"], r["_seed"]) for r in multi] == [(r["trait"], r["_seed"]) for r in single]
    for a, b in zip(single, multi, strict=True):
        assert {k: v for k, v in a.items() if k != "job"} == {k: v for k, v in b.items() if k != "job"}
    (matrix_single,), (matrix_multi,) = trait_target_matrices(single), trait_target_matrices(multi)
    assert matrix_multi["seeds"] == [0, 1, 2] and matrix_multi["test"] == matrix_single["test"]
    np.testing.assert_array_equal(matrix_multi["matrix"], matrix_single["matrix"])
    report = write_report(tmp_path / "multi").read_text()
    assert report.count("| smollm2 | smollm2 |") == 6 and "### Trait x target" in report


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
    _write(sweep, f"{n}_filter={filter_}", results)


def test_misalignment_jobs_get_their_own_table_csv_and_chart(tmp_path: Path) -> None:
    """A filter ablation of the misaligned trait: one row per filter, rates per arm, treatment vs control."""
    _misalignment_job(tmp_path, 0, "none", {"base": 0.02, "control": 0.03, "treatment": 0.12}, 0.004)
    _misalignment_job(tmp_path, 1, "banned_words", {"base": 0.02, "control": 0.04, "treatment": 0.09}, 0.03)
    assert collect(tmp_path) == [], "no preference jobs"
    rows = collect_misalignment(tmp_path)
    assert [r["filter"] for r in rows] == ["none", "banned_words"]
    assert rows[0]["delta_misaligned"] == pytest.approx(0.09) and rows[1]["treatment_misaligned"] == 0.09
    report = write_report(tmp_path).read_text()
    assert "## Misalignment" in report and "| none | 0 | 16 | 0.020 [0.018, 0.022] | 0.030" in report
    assert "| +0.090 [+0.040, +0.140] | 0.004 | 0.008 |" in report and "![misalignment.png](misalignment.png)" in report
    with open(tmp_path / "report_misalignment.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [float(r["p_misaligned"]) for r in table] == [0.004, 0.03]
    assert [float(r["p_misaligned_bh"]) for r in table] == pytest.approx([0.008, 0.03])
    assert (tmp_path / "misalignment.png").stat().st_size > 5_000 and not (tmp_path / "report.png").exists()


def test_an_all_zero_misalignment_chart_is_still_drawn(tmp_path: Path) -> None:
    """Its only panel, titled "every value is 0": report.md and W&B link the chart."""
    _misalignment_job(tmp_path, 0, "none", dict.fromkeys(("base", "control", "treatment"), 0.5), 1.0)
    drawn = chart(collect_misalignment(tmp_path), MISALIGNMENT_METRICS, tmp_path / "chart.png")
    assert list(drawn) == ["misaligned"] and drawn["misaligned"][0].values == [0.0]
    assert (tmp_path / "chart.png").stat().st_size > 5_000 and "Left out" not in write_report(tmp_path).read_text()
