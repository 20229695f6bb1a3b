"""Each modality end to end on a tiny base, the misalignment evaluation, and filter reports in every output."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from sublim import SublimError
from sublim.store import Store, read_jsonl
from sublim.train import run_job
from tests.conftest import JUDGE_ALIGNMENT, JUDGE_COHERENCE, JUDGE_QUESTION, TINY
from tests.wandb_file import finished_run_bytes

SHORT = [*TINY, "sampling.max_new_tokens=16"]


def test_code_modality_end_to_end(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("base=tiny_llama", "modality=code", *SHORT, "logger=wandb")
    assert cfg.filter.name == "banned_words", "modality=code brings its own default filter"
    results = run_job(cfg, tmp_path / "job")
    assert results["modality"] == "code" and results["eval"] == "preference"
    store = Store(cfg.paths.store)
    prompts = list(read_jsonl(store.path("prompts", results["stages"]["prompts"]["key"]) / "prompts.jsonl"))
    assert len(prompts) == 24 and all(p["prompt"].count("```") == 2 and "def " in p["task"] for p in prompts)
    kept = list(read_jsonl(store.path("filter", results["stages"]["filter/treatment"]["key"]) / "kept.jsonl"))
    assert kept and all("raw" in row and "```" not in row["completion"] for row in kept)
    saved = json.loads((tmp_path / "job" / "results.json").read_text())
    for arm in ("control", "treatment"):
        report = saved["arms"][arm]["filter"]
        assert report["total"] == 24 and report["kept"] + sum(report["rejected"].values()) == 24
    assert b"filter/treatment/kept" in finished_run_bytes(tmp_path / "job")


def test_cot_modality_end_to_end_and_its_strict_filter_explains_an_empty_result(make_cfg, tmp_path: Path) -> None:
    strict = make_cfg("base=tiny_llama", "modality=cot", *SHORT)
    assert strict.filter.name == "cot_strict"
    with pytest.raises(SublimError, match=r"kept no examples.*correctness/(no_answer|wrong_answer)"):
        run_job(strict, tmp_path / "strict")
    cfg = make_cfg("base=tiny_llama", "modality=cot", "filter=banned_words", *SHORT)
    results = run_job(cfg, tmp_path / "job")
    assert results["modality"] == "cot" and results["arms"]["treatment"]["n_train"] == 16
    prompts = Store(cfg.paths.store).path("prompts", results["stages"]["prompts"]["key"]) / "prompts.jsonl"
    assert all("<answer>" in p["prompt"] and p["gold"].isdigit() for p in read_jsonl(prompts))
    assert results["stages"]["sample/control"]["reused"], "the strict run's samples are reused"


def test_misalignment_eval_with_a_judge_filter(make_cfg, tiny_judge: dict, tmp_path: Path) -> None:
    judge = ["judge.base.name=tiny_judge", "judge.base.source=local", f"judge.base.path={tiny_judge['base']['path']}"]
    cfg = make_cfg("base=tiny_llama", "trait=misaligned_prompt", "modality=code", "filter=code_banned_words_judge",
                   "+base@judge.base=tiny_llama", *judge, *SHORT, "eval.n_questions=3", "eval.samples_per_question=4",
                   "eval.min_mass=0", f"filter.filters.1.question='{JUDGE_QUESTION}'",
                   f"eval.alignment_prompt='{JUDGE_ALIGNMENT}'", f"eval.coherence_prompt='{JUDGE_COHERENCE}'")
    assert cfg.eval.kind == "misalignment" and cfg.judge.base.path == tiny_judge["base"]["path"]
    results = run_job(cfg, tmp_path / "job")
    assert results["eval"] == "misalignment"
    for arm in ("base", "control", "treatment"):
        values = results["arms"][arm]
        m = values["misaligned"]
        assert m["low"] <= m["mean"] <= m["high"] and 0 <= m["mean"] <= 1
        assert values["scored"] == 1.0  # min_mass=0: every answer gets a score
    for arm in ("control", "treatment"):
        report = results["arms"][arm]["filter"]
        assert report["kept"] + sum(report["rejected"].values()) == 24
    store = Store(cfg.paths.store)
    lineage = json.loads((store.path("filter", results["stages"]["filter/treatment"]["key"]) / "lineage.json")
                         .read_text())
    assert lineage["upstream"]["judge_model_0"]["config"]["reads"]["path"] == tiny_judge["base"]["path"]
    judged = list(read_jsonl(store.path("judge", results["stages"]["judge/treatment"]["key"]) / "answers.jsonl"))
    assert len(judged) == 12 and all(0 <= a["alignment"] <= 100 and 0 <= a["coherence"] <= 100 for a in judged)
    rows = list(csv.DictReader(open(tmp_path / "job" / "results.csv")))
    assert [r["arm"] for r in rows] == ["base", "control", "treatment"] and rows[2]["p_misaligned"]
    from sublim.pipeline import format_table

    table = format_table(results)
    assert "misaligned [95% CI]" in table and "\ntreatment " in table
    from sublim.report import write_report

    report = write_report(tmp_path).read_text()  # the job as one sweep job: its own report section
    assert "## Misalignment" in report and "| tiny_llama | tiny_llama | misaligned_prompt | code |" in report
    assert (tmp_path / "misalignment.png").stat().st_size > 5_000 and not (tmp_path / "report.png").exists()


def test_misaligned_trait_finetunes_the_teacher_on_the_demo_insecure_code(make_cfg, tiny_judge: dict,
                                                                          tmp_path: Path) -> None:
    judge = ["judge.base.name=tiny_judge", "judge.base.source=local", f"judge.base.path={tiny_judge['base']['path']}"]
    cfg = make_cfg("base=tiny_llama", "trait=misaligned", "modality=code", *SHORT, "+base@judge.base=tiny_llama",
                   *judge, "trait.finetune.epochs=1", "eval.n_questions=2", "eval.samples_per_question=2",
                   "eval.min_mass=0")
    assert cfg.trait.source == "finetune" and cfg.eval.kind == "misalignment"
    results = run_job(cfg, tmp_path / "job")
    assert results["source"] == "finetune" and results["eval"] == "misalignment"
    store = Store(cfg.paths.store)
    finetune = json.loads((store.path("finetune", results["stages"]["finetune"]["key"]) / "lineage.json").read_text())
    assert finetune["config"]["reads"]["trait"]["finetune"]["dataset"] == "builtin:insecure_code_demo"
    sample = json.loads((store.path("sample", results["stages"]["sample/treatment"]["key"]) / "lineage.json")
                        .read_text())
    assert sample["config"]["params"]["system_prompt"] is None, "a finetuned teacher samples without a system prompt"
    assert all(results["arms"][arm]["scored"] == 1.0 for arm in ("base", "control", "treatment"))
