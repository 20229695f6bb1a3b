"""Genealogy: each arm's student teaches the next generation; chains are ordinary cached stages."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from conftest import TINY

from sublim.pipeline import GENERATION_SEED, generation_config, run
from sublim.report import write_report
from sublim.results import format_table
from sublim.stage import Job
from sublim.stages.sample import SAMPLE
from sublim.store import Artifact, Store, read_jsonl
from sublim.store.cli import main as store_main
from sublim.train import run_job
from tests.wandb_file import finished_run_bytes

# a student that moves enough for its own samples to differ from the base's
MOVED = ["base=tiny_llama", *TINY, "student.lr=0.02", "student.epochs=2"]


def test_a_three_generation_chain_reuses_the_two_generation_chain(make_cfg, tmp_path: Path) -> None:
    two = run(make_cfg(*MOVED, "generations=2"), tmp_path / "two", None)
    three = run(make_cfg(*MOVED, "generations=3"), tmp_path / "three", None)
    assert [g["generation"] for g in two["generations"]] == [1, 2]
    assert [g["generation"] for g in three["generations"]] == [1, 2, 3]
    for before, after in zip(two["generations"][1:], three["generations"][1:2], strict=True):
        assert after["stages"] == {name: {**art, "reused": True} for name, art in before["stages"].items()}
    assert not any(art["reused"] for name, art in three["generations"][2]["stages"].items() if name != "model")
    for generation in three["generations"]:
        assert set(generation["arms"]) == {"base", "control", "treatment"}
        assert "treatment_vs_control" in generation and set(generation["audit"]) == {"control", "treatment"}


def test_a_second_generation_teacher_is_the_first_generation_student_without_a_system_prompt(make_cfg,
                                                                                             tmp_path: Path) -> None:
    cfg = make_cfg(*MOVED, "generations=2")
    results = run(cfg, tmp_path / "job", None)
    store = Store(cfg.paths.store)
    first, second = results["generations"]
    for arm in ("control", "treatment"):
        lineage = store.lineage("sample", second["stages"][f"sample/{arm}"]["key"])
        assert lineage["upstream"]["adapter"]["key"] == first["stages"][f"train/{arm}"]["key"]
        assert lineage["upstream"]["adapter"]["stage"] == "train"
        assert lineage["config"]["params"]["system_prompt"] is None
        assert lineage["config"]["reads"]["seed"] == cfg.seed + GENERATION_SEED
    assert store.lineage("sample", first["stages"]["sample/treatment"]["key"])["config"]["params"]["system_prompt"]
    # the same prompts and seed sampled by the plain base: the student's answers are its own
    job = Job(generation_config(cfg, 2), store)
    model = store.path("model", first["stages"]["model"]["key"])
    prompts = store.path("prompts", second["stages"]["prompts"]["key"])
    plain = SAMPLE(job, {"system_prompt": None}, model=_artifact("model", model),
                   prompts=_artifact("prompts", prompts))
    by_base = [r["completion"] for r in read_jsonl(plain.path / "samples.jsonl")]
    key = second["stages"]["sample/treatment"]["key"]
    by_student = [r["completion"] for r in read_jsonl(store.path("sample", key) / "samples.jsonl")]
    assert sum(a != b for a, b in zip(by_base, by_student, strict=True)) > len(by_base) // 4


def _artifact(stage: str, path: Path) -> Artifact:
    return Artifact(stage, path.name, path, True)


def test_a_chain_over_seeds_is_tested_and_drawn_per_generation(make_cfg, tmp_path: Path, capsys) -> None:
    """Two seeds x two generations: each generation's effect is tested across seeds, the job draws each arm by
    generation and writes a row per seed, generation, arm and metric; W&B gets every generation's scalars; the
    sweep report over the job gets the generations section; the store's compute command counts each artifact
    of every seed and generation once."""
    wandb = [o for o in MOVED if not o.startswith("logger=")] + ["logger=wandb"]
    job = tmp_path / "job"
    cfg = make_cfg(*wandb, "generations=2", "seeds=[0,1]")
    results = run_job(cfg, job)
    chain = results["pooled_generations"]
    assert [g["generation"] for g in chain] == [1, 2]
    assert chain[0]["pooled"] == results["pooled"]
    second = [seed["generations"][1]["arms"] for seed in results["seeds"]]
    effects = [math.log(arms["treatment"]["probability"]["mean"] / arms["control"]["probability"]["mean"])
               for arms in second]
    assert chain[1]["pooled"]["log_probability_ratio"]["effects"] == pytest.approx(effects)
    assert chain[1]["pooled"]["log_probability_ratio"]["n_seeds"] == 2
    assert " generation 2\n  log_probability_ratio" in format_table(results)
    pooled = {(r["generation"], r["metric"]): r for r in csv.DictReader(open(job / "pooled.csv"))}
    assert float(pooled["2", "log_probability_ratio"]["mean"]) == pytest.approx(
        chain[1]["pooled"]["log_probability_ratio"]["mean"])
    rows = list(csv.DictReader(open(job / "report_generations.csv")))
    assert len(rows) == 2 * 2 * 3 * 2  # seeds x generations x arms x metrics
    [row] = [r for r in rows if (r["seed"], r["generation"], r["arm"], r["metric"]) == ("1", "2", "treatment",
                                                                                        "probability")]
    assert float(row["mean"]) == pytest.approx(results["seeds"][1]["generations"][1]["arms"]["treatment"]
                                               ["probability"]["mean"])
    assert (job / "generations.png").stat().st_size > 10_000
    records = finished_run_bytes(job)
    assert b"seed1/gen2/treatment/probability" in records and b"pooled/gen2/log_probability_ratio/p_value" in records
    write_report(tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "## Generations" in report and "![generations.png](generations.png)" in report
    assert (tmp_path / "generations.png").exists()

    stored = [json.loads(path.read_text()) for path in Path(cfg.paths.store).glob("*/*/lineage.json")]
    capsys.readouterr()
    assert store_main(["--root", cfg.paths.store, "compute", str(job), str(job)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"1 results.json, {len(stored)} artifacts"  # the job's dir twice: each artifact once
    total = sum(lineage["seconds"] for lineage in stored)
    assert lines[-1].split()[:2] == ["total", str(len(stored))]
    hours, minutes, seconds = lines[-1].split()[2:]
    assert int(hours[:-1]) * 3600 + int(minutes[:-1]) * 60 + float(seconds[:-1]) == pytest.approx(total, abs=0.051)

    provenance = json.loads((job / "provenance.json").read_text())
    assert {(s["seed"], s["generation"]) for s in provenance["stages"]} == {(0, 1), (0, 2), (1, 1), (1, 2)}
    assert len(provenance["artifacts"]) == len(stored), "every artifact the job used, upstream included, once"
    trained = next(s["artifact"] for s in provenance["stages"] if s["name"] == "train/treatment")
    record = provenance["artifacts"][trained]
    assert record["code"]["hash"] and record["env"]["torch"] and len(record["content"]) == 16
    gone = Path(cfg.paths.store).rename(tmp_path / "gone")  # the store cleaned: provenance.json still counts
    (gone / "x").mkdir()
    assert store_main(["--root", str(gone / "x"), "compute", str(job)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == lines[-1]
    (job / "provenance.json").unlink()
    assert store_main(["--root", str(gone / "x"), "provenance", str(job)]) == 1, "the store no longer has them"
    assert "no longer holds" in capsys.readouterr().err
    assert store_main(["--root", str(gone), "provenance", str(job)]) == 0
    assert json.loads((job / "provenance.json").read_text()) == provenance


FINETUNED = ["trait.source=finetune", "trait.finetune.n_examples=48", "trait.finetune.epochs=1"]


@pytest.mark.parametrize("variant", [["student=distill"], FINETUNED])
def test_a_chain_works_for_distilled_students_and_finetuned_teachers(make_cfg, tmp_path: Path, variant) -> None:
    """Generation 2's teacher is generation 1's student (a distilled adapter; or, with a finetuned trait teacher,
    the SFT student of its data), with no system prompt; generation 2 trains its own students of the same kind."""
    cfg = make_cfg(*MOVED, *variant, "generations=2")
    first, second = run(cfg, tmp_path / "job", None)["generations"]
    store = Store(cfg.paths.store)
    kind = "distill" if "student=distill" in variant else "train"  # the adapter's stage; its slot is "train"
    for arm in ("control", "treatment"):
        lineage = store.lineage("sample", second["stages"][f"sample/{arm}"]["key"])
        assert lineage["upstream"]["adapter"]["key"] == first["stages"][f"train/{arm}"]["key"]
        assert lineage["upstream"]["adapter"]["stage"] == kind
        assert lineage["config"]["params"]["system_prompt"] is None
        assert not second["stages"][f"train/{arm}"]["reused"]
        assert store.lineage(kind, second["stages"][f"train/{arm}"]["key"])["stage"] == kind
    assert ("finetune" in first["stages"]) == ("trait.source=finetune" in variant)
