"""A job's results: the summary (results.json), its CSV, the end-of-run table and what W&B gets."""

from __future__ import annotations

import csv
from pathlib import Path

from omegaconf import OmegaConf

from sublim.evals import ARMS, EVAL_ARMS, EVALS
from sublim.stage import Job
from sublim.store import Artifact, read_jsonl, write_json
from sublim.tracking import Tracker


def summarise(job: Job, n_train: int, reports: dict[str, dict], students: dict[str, Artifact | None],
              outputs: dict[str, dict]) -> dict:
    cfg = job.cfg
    kind = EVALS[cfg.eval.kind]
    arms = {}
    for arm in EVAL_ARMS:
        trained = students[arm] is not None
        arms[arm] = {
            "n_train": n_train if trained else 0,
            "filter_yield": reports[arm]["yield"] if trained else None,
            "filter": reports[arm] if trained else None,
            "train": students[arm].read_json("metrics.json") if trained else None,
        } | kind.summarise_arm(job, outputs, arm)
    scores = {arm: outputs["scores"][arm].read_json("scores.json") for arm in ARMS}
    return {
        "trait": cfg.trait.name, "category": cfg.trait.category, "base": cfg.base.name,
        "teacher_base": job.teacher.name, "source": cfg.trait.source, "student": cfg.student.kind,
        "modality": cfg.modality.name, "filter": cfg.filter.name, "eval": cfg.eval.kind, "seed": cfg.seed,
        "arms": arms, "treatment_vs_control": kind.compare(job, scores),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def write_results(job_dir: Path, results: dict) -> None:
    job_dir.mkdir(parents=True, exist_ok=True)
    write_json(job_dir / "results.json", results)
    header, rows = EVALS[results["eval"]].csv(results)
    with open(job_dir / "results.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def format_table(results: dict) -> str:
    """The end-of-run table of the job's eval kind."""
    return EVALS[results["eval"]].format_table(results)


def track(tracker: Tracker, results: dict, samples: dict[str, Artifact], scores: dict[str, Artifact]) -> None:
    kind = EVALS[results["eval"]]
    flat = {}
    for arm, values in results["arms"].items():
        flat |= {f"{arm}/{metric}": values[metric]["mean"] for metric in kind.metrics}
        flat[f"{arm}/n_train"] = values["n_train"]
    for metric, test in results["treatment_vs_control"].items():
        flat |= {f"delta/{metric}": test["delta"], f"p_value/{metric}": test["p_value"]}
    tracker.log(flat)
    tracker.summary(flat)
    tracker.table("teacher_samples", [
        {"arm": arm, "prompt": r["prompt"], "completion": r["completion"]}
        for arm in ARMS for r in list(read_jsonl(samples[arm].path / "samples.jsonl"))[:25]])
    tracker.table("student_answers", [
        {"arm": arm, "question": r["question"], "answer": r["completion"], kind.hit: r[kind.hit]}
        for arm in EVAL_ARMS for r in list(read_jsonl(scores[arm].path / "answers.jsonl"))[:20]])
