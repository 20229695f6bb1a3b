"""The powered study's decision script (studies/powered/analyze.py) applies the fixed rule: a planted diagonal is
called transfer, drift alone is not, and before every planned seed is in there is no verdict."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from sublim.report import write_report
from sublim.stats import bh_adjust, format_p
from tests.test_report import TRAITS, _results, _treatments, _write

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def analyze():
    spec = importlib.util.spec_from_file_location("analyze", ROOT / "studies" / "powered" / "analyze.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _runs(tmp_path: Path, planted: float, seeds: list[int], draw: int = 7, experiment: str = "powered") -> Path:
    """runs/<experiment>/seed<k>/<n>_trait=<t>: each sitting one seed, every trait; the audit's answer shift
    follows the planted effect's size per cell."""
    rng = np.random.default_rng(draw)
    for seed in seeds:
        for n, trait in enumerate(TRAITS):
            results = _results(trait, seed, "smollm2", _treatments(planted, rng, trait))
            shift = float(rng.normal(planted, 0.1))
            results["audit"] = {arm: {"answer_shift": {"mean": value, "ci": [value, value], "n": 100}}
                                for arm, value in (("control", 0.0), ("treatment", shift))}
            _write(tmp_path / "runs" / experiment / f"seed{seed}", f"{n}_trait={trait}", results,
                   [f"trait={trait}", f"experiment={experiment}", f"seeds=[{seed}]"])
    return tmp_path / "runs"


def test_a_planted_diagonal_is_transfer_over_the_planned_seeds(analyze, tmp_path: Path) -> None:
    runs = _runs(tmp_path, 1.0, analyze.PLANNED)
    analyze.main(runs)
    [decision] = json.loads((runs / "decision.json").read_text())
    assert decision["final"] and decision["verdict"] == "transfer"
    assert decision["seeds"] == analyze.PLANNED and decision["p_matrix"] < 0.05 and decision["contrast"] > 0.5
    assert all(t["mean"] > 0.5 and t["n_seeds"] == 3 for t in decision["own"].values())
    assert decision["spearman"]["n"] == 9
    per_seed = decision["seed_contrasts"]
    assert len(per_seed) == 3 and np.isclose(np.mean(list(per_seed.values())), decision["contrast"])
    assert min(per_seed.values()) > 0.5, "a planted diagonal shows in every seed"
    over_seeds = decision["contrast_over_seeds"]
    assert np.isclose(over_seeds["mean"], decision["contrast"]) and over_seeds["low"] > 0 and over_seeds["n_seeds"] == 3
    text = (runs / "decision.md").read_text()
    assert "**Verdict: transfer.**" in text and "INTERIM" not in text
    assert (runs / "decision.png").stat().st_size > 10_000, "the per-seed figure beside decision.md"


def test_drift_alone_is_rarely_transfer_and_fewer_seeds_no_verdict(analyze, tmp_path: Path) -> None:
    """Twenty null studies (every animal drifts, no diagonal): about 5% may pass the rule by chance, not more."""
    verdicts = [analyze.variant(_runs(tmp_path / f"null{draw}", 0.0, analyze.PLANNED, draw) / "powered")["verdict"]
                for draw in range(20)]
    assert set(verdicts) <= {"transfer", "no transfer detected"}
    assert verdicts.count("transfer") <= 4, verdicts  # P(>= 5 of 20 at a 5% rate) = 0.003
    early = _runs(tmp_path / "early", 1.0, analyze.PLANNED[:1])
    [decision] = [analyze.variant(early / "powered")]
    assert not decision["final"] and decision["verdict"] is None
    assert decision["own"]["owl"]["p_value"] is None, "one seed: no across-seed test"
    assert "INTERIM: 1 of the 3 planned seeds" in analyze.markdown(decision)


def test_a_variant_without_the_diagonal_is_set_below_the_main_design_seed_by_seed(analyze, tmp_path: Path) -> None:
    runs = _runs(tmp_path, 1.0, analyze.PLANNED)
    _runs(tmp_path, 0.0, analyze.PLANNED, draw=8, experiment="powered_cross_base")
    analyze.main(runs)
    main, cross = json.loads((runs / "decision.json").read_text())
    assert (main["verdict"], cross["verdict"]) == ("transfer", "no transfer detected")
    [line] = [line for line in (runs / "decision.md").read_text().splitlines() if line.startswith("- ")]
    difference = cross["contrast"] - main["contrast"]
    assert line.startswith(f"- powered_cross_base minus powered: {difference:+.3f} [") and difference < -0.5
    p_text = line.split("p = ")[1].split()[0]
    assert p_text.startswith("<") or float(p_text) < 0.05, line


@pytest.mark.slow
def test_the_committed_decision_is_what_the_current_code_computes(analyze, tmp_path: Path) -> None:
    """studies/powered/runs/decision.md and report.md/csv hold the study's result in README: recomputing them from
    the committed job dirs with today's analyze.py and report code must give the same text, so a change to that
    code cannot leave a stale result behind."""
    committed = ROOT / "studies" / "powered" / "runs"
    runs = tmp_path / "runs"
    for results in committed.glob("*/seed*/*/results.json"):
        shutil.copytree(results.parent, runs / results.parent.relative_to(committed))
    analyze.main(runs)
    write_report(runs)
    report = "python -m sublim.report"
    for name, command in (("decision.md", "python studies/powered/analyze.py"), ("report.md", report),
                          ("report.csv", report)):
        assert (runs / name).read_text() == (committed / name).read_text(), (
            f"stale {name}: rerun `{command} studies/powered/runs` and commit it")


def _readme_tables() -> dict[str, list[str]]:
    """README's study section: each table row's cells after the first, keyed by its first cell."""
    text = (ROOT / "README.md").read_text()
    start = text.index("## What transfers at 135M")
    section = text[start:text.index("\n## ", start + 1)]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| ") and not line.startswith("|---")]
    return {cells[0]: cells[1:] for cells in rows}


DESIGNS = {"main": "powered", "LLS-top: the top half of 2,100 samples": "powered_lls_top",
           "cross-base: Gemma-3-270M teachers": "powered_cross_base"}


def test_the_readme_quotes_the_committed_decision() -> None:
    """Every figure in README's study tables is the committed decision.json's (which the slow test above ties to
    today's code), so a rerun that changes the study's result cannot leave README behind."""
    decisions = {v["experiment"]: v for v in json.loads((ROOT / "studies/powered/runs/decision.json").read_text())}
    rows = _readme_tables()
    main = decisions["powered"]
    for i, (trait, own) in enumerate(main["own"].items()):
        cells = rows[f"{trait} -> P({trait})"]
        assert cells[:3] == [f"{e:+.2f}" for e in own["effects"]], trait
        assert cells[3].startswith(f"{own['mean']:+.2f} [{own['low']:+.2f}, {own['high']:+.2f}]"), trait
        assert cells[3].endswith(f"p = {format_p(own['p_value'])}"), trait
        assert rows[trait] == [f"**{x:+.2f}**" if j == i else f"{x:+.2f}" for j, x in enumerate(main["matrix"][i][:3])
                               ] + [f"{np.mean(main['matrix'][i][3:]):+.2f}"], trait
    seeds = main["contrast_over_seeds"]
    assert rows["diagonal contrast"] == [*(f"{e:+.2f}" for e in seeds["effects"]), f"{seeds['mean']:+.2f} ["
                                         f"{seeds['low']:+.2f}, {seeds['high']:+.2f}]; permutation p = "
                                         f"{format_p(main['p_matrix'])}"]
    assert [v["q_matrix"] for v in decisions.values()] == bh_adjust([v["p_matrix"] for v in decisions.values()])
    assert {DESIGNS[name] for name in DESIGNS if name in rows} == set(decisions), "one README row per design"
    for name, experiment in DESIGNS.items():
        v = decisions[experiment]
        per_seed = ", ".join(f"{c:+.2f}" for c in v["seed_contrasts"].values())
        assert rows[name] == [f"{v['contrast']:+.3f} ({per_seed})", format_p(v["p_matrix"]), format_p(v["q_matrix"]),
                              ", ".join(f"{t['mean']:+.2f}" for t in v["own"].values()),
                              v["verdict"] or f"interim, {len(v['seeds'])} of {len(v['planned_seeds'])} seeds"], name
