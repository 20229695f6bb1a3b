"""The subliminal task: wire the stages of one job, for both arms, through the store.

Arms: treatment (the teacher has the trait) and control (same base, prompts, filter; no trait). The
control arm's stage keys do not contain the trait, so every job of a trait sweep reuses one control.

    model ─┬─ prompts ─ sample[arm] ─ filter[arm] ─ student kind[arm] ─┬─ eval kind[base|control|treatment]
           └─ finetune (trait.source=finetune: the treatment teacher's adapter)   └─ results.json / table / W&B
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from omegaconf import DictConfig, open_dict

from sublim import SublimError, models
from sublim.audit.plots import write_job_plots
from sublim.distill import tokenizer_hash
from sublim.evals import ARMS, EVALS
from sublim.filters import FilterReport
from sublim.judge import model_upstream
from sublim.report import write_job_generations
from sublim.results import format_table, replicate, summarise, track, write_results
from sublim.stage import Job, plain
from sublim.stages.audit import audit_data
from sublim.stages.filter import FILTER
from sublim.stages.finetune import finetune_adapter
from sublim.stages.lls_select import LLS_SELECT
from sublim.stages.model import model_artifact
from sublim.stages.prompts import PROMPTS
from sublim.stages.sample import SAMPLE, preflight
from sublim.store import Artifact, Store
from sublim.store.provenance import write_provenance
from sublim.students import STUDENTS, Arm
from sublim.tracking import Tracker

__all__ = ["format_table", "run", "teacher_system_prompt"]

SOURCES = ("prompt", "finetune")
GENERATION_SEED = 1_000  # generation k of seed s samples, subsets and initialises with seed s + 1000 (k - 1)

log = logging.getLogger(__name__)


def teacher_system_prompt(trait: DictConfig, arm: str) -> str | None:
    """The trait's system prompt for a prompt-trait treatment teacher; a finetuned teacher has it in its weights."""
    if trait.source not in SOURCES:
        raise SublimError(f"trait.source={trait.source} is not one of: {', '.join(SOURCES)}")
    return trait.system_prompt if arm == "treatment" and trait.source == "prompt" else None


def check(job: Job) -> None:
    """What can be known wrong before the first stage runs (the config schema checked the rest)."""
    cfg = job.cfg
    teacher_system_prompt(cfg.trait, "treatment")
    STUDENTS[cfg.student.kind]
    EVALS[cfg.eval.kind]
    if reason := preflight(cfg.sampling.backend, cfg.trait.source == "finetune"):
        raise SublimError(reason)


def check_tokenizers(job: Job, model: Artifact, teacher: Artifact) -> None:
    """Distillation, and masking the audit's positions (the teacher's tokens), across tokenizers is meaningless:
    fail before sampling, not after."""
    cfg = job.cfg
    masked = bool(cfg.filter.get("lls") and cfg.filter.lls.mask_divergence)
    if (cfg.student.kind == "distill" or masked) and teacher.key != model.key and (
            tokenizer_hash(models.load_tokenizer(model, job.base))
            != tokenizer_hash(models.load_tokenizer(teacher, job.teacher))):
        needs, fix = (("student=distill", "use student=lora") if cfg.student.kind == "distill" else
                      ("filter.lls.mask_divergence=true", "set it to false"))
        raise SublimError(f"{needs} needs the teacher's tokenizer to be the student's "
                          f"(teacher_base={job.teacher.name}, base={job.base.name}); {fix}")


def training_size(job: Job, reports: dict[str, dict]) -> int:
    """Both arms are cut to the same size; a filter that keeps nothing stops the job before training."""
    empty = [arm for arm, r in reports.items() if r["kept"] == 0]
    if empty:
        details = "; ".join(f"{arm}: {FilterReport(r['total'], r['kept'], r['rejected']).summary()}"
                            for arm, r in reports.items())
        raise SublimError(
            f"filter={job.cfg.filter.name} kept no examples in the {', '.join(empty)} arm ({details}). "
            "Use sampling.constrained=true for small bases, loosen the filter, or raise data.n_prompts."
        )
    return min(job.cfg.data.n_train, *(r["kept"] for r in reports.values()))


def _filter_upstream(job: Job) -> dict[str, Artifact]:
    """The models of the filter list's judges (a judge filter's verdicts depend on its model)."""
    judges = [spec["judge"] for spec in plain(job.cfg.filter.filters) if spec.get("name") == "judge"]
    return {f"{name}_{i}": art for i, config in enumerate(judges)
            for name, art in model_upstream(config, job.store).items()}


def run(cfg: DictConfig, job_dir: Path, tracker: Tracker | None) -> dict:
    """Run every stage of the job, once per seed of ``seeds`` (reusing what the store has), pool the seeds and
    write results.json / results.csv."""
    seeds = list(cfg.seeds) if cfg.get("seeds") else [cfg.seed]
    per_seed = [run_seed(seed_config(cfg, seed), tracker, f"seed{seed}/" if len(seeds) > 1 else "")
                for seed in seeds]
    results = replicate(cfg, per_seed) if len(seeds) > 1 else per_seed[0]
    write_results(job_dir, results)
    store = Store(cfg.paths.store, verify=cfg.store.verify)
    write_provenance(job_dir, results, store)
    write_job_plots(results, store, job_dir, tracker)
    if cfg.generations > 1:
        for image in write_job_generations(job_dir):
            if tracker:
                tracker.image(image.stem, image)
    if tracker:
        track(tracker, results, store)
    return results


def seed_config(cfg: DictConfig, seed: int) -> DictConfig:
    """The job's config for one seed: a seed's stages are those of the same job run with ``seed=<seed>``."""
    out = cfg.copy()
    with open_dict(out):
        out.seed, out.seeds = seed, None
    return out


def generation_config(cfg: DictConfig, generation: int) -> DictConfig:
    """Generation k >= 2 of a seed: the teacher is the base with the previous generation's student merged (no
    system prompt, so no teacher_base), and a seed of its own: fresh prompts, samples, subset and init."""
    out = cfg.copy()
    with open_dict(out):
        out.seed, out.teacher_base = cfg.seed + GENERATION_SEED * (generation - 1), None
    return out


def run_seed(cfg: DictConfig, tracker: Tracker | None, prefix: str) -> dict:
    """Every stage of one seed, generation by generation; its results (the question-level test describes these
    two trained models). With ``generations`` > 1 each arm's student teaches the next generation of its chain."""
    job = Job(cfg, Store(cfg.paths.store, verify=cfg.store.verify), tracker)
    check(job)
    model = model_artifact(cfg.base, job.store)
    teacher = model_artifact(job.teacher, job.store) if cfg.get("teacher_base") else model
    check_tokenizers(job, model, teacher)
    stages: dict[str, Artifact] = {"model": model, "teacher_model": teacher}
    adapters: dict[str, Artifact | None] = {"control": None, "treatment": None}
    if cfg.trait.source == "finetune":
        adapters["treatment"] = stages["finetune"] = finetune_adapter(job, teacher)
    systems = {arm: teacher_system_prompt(cfg.trait, arm) for arm in ARMS}
    results, students = run_generation(job, model, teacher, adapters, systems, prefix, stages)
    chain = []
    for generation in range(2, cfg.generations + 1):
        job = Job(generation_config(cfg, generation), job.store, tracker)
        later, students = run_generation(job, model, model, {arm: students[arm] for arm in ARMS},
                                         dict.fromkeys(ARMS), f"{prefix}gen{generation}/", {"model": model})
        chain.append({k: v for k, v in later.items() if k != "config"} | {"generation": generation})
    if chain:
        first = {k: v for k, v in results.items() if k != "config"} | {"generation": 1}
        results["generations"] = [first, *chain]
    return results


def run_generation(job: Job, model: Artifact, teacher: Artifact, adapters: dict[str, Artifact | None],
                   systems: dict[str, str | None], prefix: str,
                   stages: dict[str, Artifact]) -> tuple[dict, dict[str, Artifact | None]]:
    """One generation: each arm's teacher (``teacher`` + its adapter + its system prompt) answers fresh prompts, the
    data is filtered and audited, a fresh student of ``model`` learns it; evaluated against base and control."""
    cfg, tracker = job.cfg, job.tracker
    prompts = stages["prompts"] = PROMPTS(job)
    judges = _filter_upstream(job)
    arms = {}
    for arm in ARMS:
        samples = SAMPLE(job, {"system_prompt": systems[arm]}, label=arm, model=teacher, prompts=prompts,
                         adapter=adapters[arm])
        filtered = FILTER(job, label=arm, samples=samples, **judges)
        stages |= {f"sample/{arm}": samples, f"filter/{arm}": filtered}
        arms[arm] = Arm(arm, teacher, adapters[arm], systems[arm], filtered)
    training_size(job, {arm: arms[arm].data.read_json("report.json") for arm in ARMS})  # nothing kept: stop now
    audits = {}
    if cfg.audit.enabled:  # both arms' data scored under the treatment teacher against the plain base
        for arm in ARMS:
            audits[arm] = stages[f"audit/{arm}"] = audit_data(
                job, arms[arm].data, teacher, systems["treatment"], adapters["treatment"], label=arm)
    if cfg.filter.get("lls"):  # defences (docs/defences.md): each arm's data cut / masked by its own audit
        for arm in ARMS:
            selected = stages[f"lls_select/{arm}"] = LLS_SELECT(job, label=arm, data=arms[arm].data,
                                                                audit=audits[arm])
            arms[arm] = replace(arms[arm], data=selected)
    reports = {arm: arms[arm].data.read_json("report.json") for arm in ARMS}
    for arm, report in reports.items():
        log.info("filter %s arm: %s", arm, FilterReport(report["total"], report["kept"], report["rejected"]).summary())
        if tracker:
            tracker.log({f"{prefix}filter/{arm}/yield": report["yield"], f"{prefix}filter/{arm}/kept": report["kept"]}
                        | {f"{prefix}filter/{arm}/rejected/{reason}": n for reason, n in report["rejected"].items()})
    n_train = training_size(job, reports)
    students: dict[str, Artifact | None] = {"base": None}
    for arm in ARMS:
        trained = STUDENTS[cfg.student.kind](job, model, arms[arm], n_train)
        students[arm] = trained["train"]
        stages |= {f"{slot}/{arm}": art for slot, art in trained.items()}
    outputs = EVALS[cfg.eval.kind].stages(job, model, students)
    stages |= {f"{art.stage}/{arm}": art for slot in outputs.values() for arm, art in slot.items()}
    results = summarise(job, n_train, reports, students, outputs)
    results["audit"] = {arm: art.read_json("summary.json") for arm, art in audits.items()}
    results["stages"] = {name: {"stage": art.stage, "key": art.key, "reused": art.reused}
                         for name, art in stages.items()}
    return results, students
