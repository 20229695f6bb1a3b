"""One job: prompts -> sample -> filter -> train -> evaluate, for both arms, through the store.

Arms: treatment (the teacher has the trait) and control (same base, prompts, filter; no trait). The
control arm's stage keys do not contain the trait, so every job of a trait sweep reuses one control.
Each stage is a function of (the config fields it reads, upstream artifacts) -> artifact.
"""

from __future__ import annotations

import csv
import logging
import random
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from sublim import SublimError, distill, judge, misalignment, modalities, models, vllm_sampling
from sublim.evaluate import SAMPLING_FIELDS, sample_answers, score_preference, target_probabilities
from sublim.filters import FilterReport, apply_filters, build_filters
from sublim.finetune import stage_finetune
from sublim.questions import questions
from sublim.stats import bootstrap_ci, format_p, mean_ci, paired_permutation_test
from sublim.store import Artifact, Store, read_jsonl, write_json, write_jsonl
from sublim.student import ADAPTER_DIR, load_student, train_lora
from sublim.teacher import Sampler, sample_chats
from sublim.tracking import Tracker

SOURCES = ("prompt", "finetune")

log = logging.getLogger(__name__)

ARMS = ("control", "treatment")
EVAL_ARMS = ("base", "control", "treatment")
BACKENDS = ("hf", "vllm")


def _plain(node: DictConfig) -> dict:
    return OmegaConf.to_container(node, resolve=True)


@dataclass
class Job:
    """What the stages of one job share."""

    cfg: DictConfig
    store: Store
    tracker: Tracker

    @property
    def base(self) -> DictConfig:
        """The student's base."""
        return self.cfg.base

    @property
    def teacher(self) -> DictConfig:
        """The teacher's base: teacher_base when set (cross-model grids), else the student's."""
        return self.cfg.get("teacher_base") or self.cfg.base

    @property
    def constrained(self) -> bool:
        """Grammar-constrained sampling: the base decides (numbers only), sampling.constrained forces it."""
        constrained = self.cfg.sampling.constrained
        if constrained is None:
            return self.teacher.constrained_sampling and modalities.has_grammar(self.cfg.modality)
        return bool(constrained)


def stage_prompts(job: Job) -> Artifact:
    cfg = job.cfg
    config = {"modality": _plain(cfg.modality), "n": cfg.data.n_prompts, "seed": cfg.seed}

    def compute(out: Path) -> None:
        write_jsonl(out / "prompts.jsonl", modalities.prompt_rows(cfg.modality, cfg.data.n_prompts, cfg.seed))

    return job.store.get_or_compute("prompts", config, {}, compute)


def teacher_system_prompt(trait: DictConfig, arm: str) -> str | None:
    """The trait's system prompt for a prompt-trait treatment teacher; a finetuned teacher has it in its weights."""
    if trait.source not in SOURCES:
        raise SublimError(f"trait.source={trait.source} is not one of: {', '.join(SOURCES)}")
    return trait.system_prompt if arm == "treatment" and trait.source == "prompt" else None


def load_model(job: Job, model: Artifact, adapter: Artifact | None, base: DictConfig) -> tuple:
    """A base, with a trained adapter merged in when there is one (a student, or a finetuned teacher)."""
    net, tokenizer = models.load(model, base)
    if adapter is not None:
        net = load_student(net, adapter.path / ADAPTER_DIR)
    return net, tokenizer


def stage_sample(job: Job, model: Artifact, adapter: Artifact | None, prompts: Artifact, arm: str) -> Artifact:
    """The teacher's answers: ``model`` (+ the finetuned trait ``adapter``, if any) with its system prompt."""
    cfg = job.cfg
    system = teacher_system_prompt(cfg.trait, arm)
    config = {"system_prompt": system, "sampling": _plain(cfg.sampling) | {"constrained": job.constrained},
              "seed": cfg.seed}
    upstream = {"model": model, "prompts": prompts} | ({"adapter": adapter} if adapter else {})

    if cfg.sampling.backend not in BACKENDS:
        raise SublimError(f"sampling.backend={cfg.sampling.backend} is not one of: {', '.join(BACKENDS)}")
    if cfg.sampling.backend == "vllm" and (reason := vllm_sampling.unavailable()):
        raise SublimError(f"sampling.backend=vllm: {reason}; use sampling.backend=hf")
    if cfg.sampling.backend == "vllm" and adapter is not None:
        raise SublimError("sampling.backend=vllm samples base weights only; a finetuned teacher "
                          "(trait.source=finetune) samples with sampling.backend=hf")

    def compute(out: Path) -> None:
        rows = list(read_jsonl(prompts.path / "prompts.jsonl"))
        for row in rows:
            row["messages"] = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": row["prompt"]}]
        sampling = cfg.sampling
        grammar = (lambda row: modalities.grammar(cfg.modality, row)) if job.constrained else None
        log.info("sampling %d %s teacher answers with %s (constrained=%s, backend=%s)", len(rows), arm,
                 job.teacher.name, job.constrained, sampling.backend)
        if sampling.backend == "vllm":
            tokenizer = models.load_tokenizer(model, job.teacher)
            samples = vllm_sampling.sample(*models.locate(model), tokenizer, rows, sampling, job.teacher.dtype,
                                           cfg.seed, grammar)
        else:
            net, tokenizer = load_model(job, model, adapter, job.teacher)
            sampler = Sampler(net, tokenizer, temperature=sampling.temperature, top_p=sampling.top_p,
                              greedy=sampling.greedy, max_new_tokens=sampling.max_new_tokens, seed=cfg.seed,
                              grammar=grammar)
            samples = sample_chats(sampler, rows, sampling.batch_size, job.teacher.precision)
        for row in samples:
            del row["messages"]
        write_jsonl(out / "samples.jsonl", samples)

    return job.store.get_or_compute("sample", config, upstream, compute)


def stage_filter(job: Job, samples: Artifact) -> Artifact:
    """Parse (code keeps its code block), then the filter list; judge verdicts are cached with the result."""
    specs = _plain(job.cfg.filter.filters)
    # A judge filter's model is part of the key: the same samples judged by another model are another artifact.
    judges = [spec["judge"] for spec in specs if spec.get("name") == "judge"]
    upstream = {"samples": samples} | {f"{name}_{i}": art for i, config in enumerate(judges)
                                       for name, art in judge.model_upstream(config, job.store).items()}

    def compute(out: Path) -> None:
        try:
            filters = build_filters(specs, job.store)
        except ValueError as err:
            raise SublimError(f"filter={job.cfg.filter.name}: {err}") from err
        rows = [modalities.parse(job.cfg.modality, row) for row in read_jsonl(samples.path / "samples.jsonl")]
        kept, report = apply_filters(rows, filters)
        write_jsonl(out / "kept.jsonl", kept)
        write_jsonl(out / "rejected.jsonl", [row for row in rows if "rejected_by" in row])
        write_json(out / "report.json", report.to_dict())

    return job.store.get_or_compute("filter", {"filters": specs}, upstream, compute)


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


def stage_train(job: Job, model: Artifact, data: Artifact, n_train: int, arm: str) -> Artifact:
    cfg = job.cfg
    config = {"student": _plain(cfg.student), "n_train": n_train, "seed": cfg.seed}

    def compute(out: Path) -> None:
        rows = list(read_jsonl(data.path / "kept.jsonl"))
        rows = random.Random(cfg.seed).sample(rows, n_train)  # the paper's random subset of the kept data
        net, tokenizer = models.load(model, job.base)
        log.info("training the %s student on %d examples", arm, n_train)
        metrics = train_lora(net, tokenizer, rows, cfg.student, cfg.seed, out,
                             job.tracker.lightning_loggers(f"train/{arm}"))
        write_json(out / "metrics.json", metrics)

    return job.store.get_or_compute("train", config, {"model": model, "data": data}, compute)


def stage_answers(job: Job, model: Artifact, adapter: Artifact | None, arm: str) -> Artifact:
    """Sampled answers to the eval's questions; trait-free, so shared by every trait of a category."""
    cfg = job.cfg
    misaligned = cfg.eval.kind == "misalignment"
    if misaligned:
        config = {"eval": {"kind": "misalignment"} | {f: cfg.eval[f] for f in misalignment.SAMPLING_FIELDS},
                  "seed": cfg.seed}
    else:
        config = {"eval": {f: cfg.eval[f] for f in SAMPLING_FIELDS}, "category": cfg.trait.category, "seed": cfg.seed}
    upstream = {"model": model} | ({"adapter": adapter} if adapter else {})

    def compute(out: Path) -> None:
        net, tokenizer = load_model(job, model, adapter, job.base)
        log.info("sampling answers of the %s model", arm)
        if misaligned:
            answers = misalignment.sample_answers(net, tokenizer, cfg.eval, cfg.seed, job.base.precision)
        else:
            answers = sample_answers(net, tokenizer, cfg.eval, cfg.trait.category, cfg.seed, job.base.precision)
        write_jsonl(out / "answers.jsonl", answers)

    return job.store.get_or_compute("answers", config, upstream, compute)


def stage_evaluate(job: Job, model: Artifact, adapter: Artifact | None, answers: Artifact, arm: str) -> Artifact:
    cfg = job.cfg
    config = {"eval": _plain(cfg.eval), "category": cfg.trait.category, "words": list(cfg.trait.words),
              "seed": cfg.seed}
    upstream = {"model": model, "answers": answers} | ({"adapter": adapter} if adapter else {})

    def compute(out: Path) -> None:
        net, tokenizer = load_model(job, model, adapter, job.base)
        log.info("scoring the %s model for %s", arm, cfg.trait.name)
        score_preference(net, tokenizer, cfg.eval, cfg.trait, list(read_jsonl(answers.path / "answers.jsonl")),
                         job.base.precision, out)

    return job.store.get_or_compute("evaluate", config, upstream, compute)


def stage_judge(job: Job, answers: Artifact, arm: str) -> Artifact:
    """eval=misalignment: the judge scores every answer; needs only the answers and the judge."""
    cfg = job.cfg
    config = {"eval": _plain(cfg.eval), "judge": judge.identity(cfg.judge), "seed": cfg.seed}
    upstream = {"answers": answers} | judge.model_upstream(cfg.judge, job.store)

    def compute(out: Path) -> None:
        log.info("judging the %s model's answers", arm)
        scored, scores = misalignment.score(judge.make_judge(cfg.judge, job.store), cfg.eval,
                                            list(read_jsonl(answers.path / "answers.jsonl")))
        write_jsonl(out / "answers.jsonl", scored)
        write_json(out / "scores.json", scores)

    return job.store.get_or_compute("evaluate", config, upstream, compute)


EVAL_KINDS = ("preference", "misalignment")


def job_targets(cfg: DictConfig) -> dict[str, list[str]]:
    """Targets every model is scored for (eval.targets, plus the job's own trait): name -> words."""
    # a category without a target list (or an eval without targets) scores the job's own trait only
    targets = OmegaConf.select(cfg, "eval.targets", default=None, throw_on_resolution_failure=False)
    targets = OmegaConf.to_container(targets, resolve=True) if targets else {}
    return targets | ({} if cfg.trait.name in targets else {cfg.trait.name: list(cfg.trait.words)})


def stage_targets(job: Job, model: Artifact, adapter: Artifact | None, arm: str) -> Artifact:
    """P(answer is X) per question for every target X: the specificity matrix's row of one model."""
    cfg = job.cfg
    targets = job_targets(cfg)
    config = {"n_questions": cfg.eval.n_questions, "category": cfg.trait.category, "targets": targets}
    upstream = {"model": model} | ({"adapter": adapter} if adapter else {})

    def compute(out: Path) -> None:
        net, tokenizer = load_model(job, model, adapter, job.base)
        prompts = questions(cfg.trait.category, cfg.eval.n_questions)
        log.info("scoring the %s model for %d targets", arm, len(targets))
        write_json(out / "targets.json", target_probabilities(net, tokenizer, prompts, targets, job.base.precision))

    return job.store.get_or_compute("targets", config, upstream, compute)


def stage_train_student(job: Job, model: Artifact, teacher: Artifact, teacher_adapter: Artifact | None,
                        data: Artifact, n_train: int, arm: str) -> tuple[Artifact, Artifact | None]:
    """The arm's student by ``student.kind``: SFT on the answers, or distillation of the teacher's logits."""
    kind = job.cfg.student.kind
    if kind == "lora":
        return stage_train(job, model, data, n_train, arm), None
    if kind == "distill":
        system = teacher_system_prompt(job.cfg.trait, arm)
        if teacher.key == model.key and teacher_adapter is None and system is None:
            return distill.stage_identity_student(job, model, n_train), None
        logits = distill.stage_teacher_logits(job, teacher, teacher_adapter, data, system, arm)
        return distill.stage_train_distill(job, model, data, logits, n_train, arm), logits
    raise SublimError(f"student.kind={kind} is not one of: lora, distill (student=lora or student=distill)")


def check_distill_tokenizers(job: Job, model: Artifact, teacher: Artifact) -> None:
    """Distillation across tokenizers is meaningless: fail before sampling, not after."""
    if job.cfg.student.kind != "distill" or teacher.key == model.key:
        return
    if (distill.tokenizer_hash(models.load_tokenizer(model, job.base))
            != distill.tokenizer_hash(models.load_tokenizer(teacher, job.teacher))):
        raise SublimError(f"student=distill needs the teacher's tokenizer to be the student's "
                          f"(teacher_base={job.teacher.name}, base={job.base.name}); use student=lora")


def run(cfg: DictConfig, job_dir: Path, tracker: Tracker) -> dict:
    """Run every stage of the job (reusing what the store has) and write results.json / results.csv."""
    job = Job(cfg, Store(cfg.paths.store), tracker)
    model = models.model_artifact(cfg.base, job.store)
    teacher = models.model_artifact(job.teacher, job.store) if cfg.get("teacher_base") else model
    check_distill_tokenizers(job, model, teacher)
    teacher_system_prompt(cfg.trait, "treatment")  # an unknown trait.source fails before any work
    prompts = stage_prompts(job)
    finetuned = stage_finetune(job, teacher) if cfg.trait.source == "finetune" else None
    teacher_adapters = {"control": None, "treatment": finetuned}
    samples = {arm: stage_sample(job, teacher, teacher_adapters[arm], prompts, arm) for arm in ARMS}
    filtered = {arm: stage_filter(job, samples[arm]) for arm in ARMS}
    reports = {arm: filtered[arm].read_json("report.json") for arm in ARMS}
    if cfg.eval.kind not in EVAL_KINDS:
        raise SublimError(f"eval.kind={cfg.eval.kind} is not one of: {', '.join(EVAL_KINDS)}")
    for arm, report in reports.items():
        log.info("filter %s arm: %s", arm, FilterReport(report["total"], report["kept"], report["rejected"]).summary())
        tracker.log({f"filter/{arm}/yield": report["yield"], f"filter/{arm}/kept": report["kept"]}
                    | {f"filter/{arm}/rejected/{reason}": count for reason, count in report["rejected"].items()})
    n_train = training_size(job, reports)
    trained = {arm: stage_train_student(job, model, teacher, teacher_adapters[arm], filtered[arm], n_train, arm)
               for arm in ARMS}
    adapters = {arm: adapter for arm, (adapter, _) in trained.items()}
    # a distilled student of its own base is the base (distill.stage_identity_student): its scores are the base's
    students = {"base": None} | {arm: None if adapter.read_json("metrics.json").get("identity") else adapter
                                 for arm, adapter in adapters.items()}
    answers = {arm: stage_answers(job, model, students[arm], arm) for arm in EVAL_ARMS}
    if cfg.eval.kind == "misalignment":
        evals = {arm: stage_judge(job, answers[arm], arm) for arm in EVAL_ARMS}
        targets = {}  # the specificity matrix is a preference measure
    else:
        evals = {arm: stage_evaluate(job, model, students[arm], answers[arm], arm) for arm in EVAL_ARMS}
        # the job's own trait alone is already the evaluate stage's probability
        extra = set(job_targets(cfg)) != {cfg.trait.name}
        targets = {arm: stage_targets(job, model, students[arm], arm) for arm in EVAL_ARMS} if extra else {}

    results = summarise(cfg, n_train, reports, adapters, evals, targets)
    optional = [("finetune", finetuned), *((f"teacher_logits/{a}", trained[a][1]) for a in ARMS)]
    results["stages"] = {name: {"key": art.key, "reused": art.reused} for name, art in [
        ("model", model), ("teacher_model", teacher), ("prompts", prompts),
        *((f"sample/{a}", samples[a]) for a in ARMS),
        *((f"filter/{a}", filtered[a]) for a in ARMS), *((f"train/{a}", adapters[a]) for a in ARMS),
        *((f"answers/{a}", answers[a]) for a in EVAL_ARMS), *((f"evaluate/{a}", evals[a]) for a in EVAL_ARMS),
        *((f"targets/{a}", targets[a]) for a in targets), *((n, a) for n, a in optional if a is not None)]}
    write_results(job_dir, results)
    _track(tracker, results, samples, evals)
    return results


def summarise(cfg: DictConfig, n_train: int, reports: dict[str, dict], adapters: dict[str, Artifact],
              evals: dict[str, Artifact], targets: dict[str, Artifact]) -> dict:
    scores = {arm: evals[arm].read_json("scores.json") for arm in EVAL_ARMS}
    misaligned = cfg.eval.kind == "misalignment"
    target_scores = {arm: targets[arm].read_json("targets.json") for arm in targets}
    arms = {}
    for arm in EVAL_ARMS:
        trained = arm in adapters
        arms[arm] = {
            "n_train": n_train if trained else 0,
            "filter_yield": reports[arm]["yield"] if trained else None,
            "filter": reports[arm] if trained else None,
            "train": adapters[arm].read_json("metrics.json") if trained else None,
        }
        if misaligned:
            arms[arm] |= misalignment.summarise_arm(scores[arm])
        else:
            arms[arm] |= {
                "rate": mean_ci(scores[arm]["rate"]).to_dict(),
                # probabilities are skewed and tiny: a percentile bootstrap keeps the interval inside [0, 1]
                "probability": bootstrap_ci(scores[arm]["probability"], seed=cfg.seed).to_dict(),
                "targets": {name: bootstrap_ci(values, seed=cfg.seed).to_dict()
                            for name, values in target_scores.get(
                                arm, {cfg.trait.name: scores[arm]["probability"]}).items()},
                "top_answers": scores[arm]["top_answers"],
            }
    n_permutations = cfg.eval.n_permutations
    if misaligned:
        tests = misalignment.compare(scores["treatment"], scores["control"], n_permutations, cfg.seed)
    else:
        tests = {metric: paired_permutation_test(scores["treatment"][metric], scores["control"][metric],
                                                 n_resamples=n_permutations, seed=cfg.seed).to_dict()
                 for metric in ("rate", "probability")}
    return {
        "trait": cfg.trait.name, "category": cfg.trait.category, "base": cfg.base.name,
        "teacher_base": (cfg.get("teacher_base") or cfg.base).name, "source": cfg.trait.source,
        "student": cfg.student.kind,
        "modality": cfg.modality.name, "filter": cfg.filter.name, "eval": cfg.eval.kind, "seed": cfg.seed,
        "arms": arms, "treatment_vs_control": tests,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def write_results(job_dir: Path, results: dict) -> None:
    job_dir.mkdir(parents=True, exist_ok=True)
    write_json(job_dir / "results.json", results)
    if results["eval"] == "misalignment":
        with open(job_dir / "results.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["arm", "trait", "teacher_base", "base", "n_train", "misaligned", "misaligned_low",
                             "misaligned_high", "scored", "delta_misaligned", "p_misaligned"])
            test = results["treatment_vs_control"]["misaligned"]
            for arm, values in results["arms"].items():
                m, treated = values["misaligned"], arm == "treatment"
                writer.writerow([arm, results["trait"], results["teacher_base"], results["base"], values["n_train"],
                                 m["mean"], m["low"], m["high"], values["scored"],
                                 test["delta"] if treated else "", test["p_value"] if treated else ""])
        return
    with open(job_dir / "results.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["arm", "trait", "teacher_base", "base", "n_train", "rate", "rate_low", "rate_high",
                         "probability", "probability_low", "probability_high", "delta_rate", "p_rate",
                         "delta_probability", "p_probability"])
        for arm, values in results["arms"].items():
            rate, prob = values["rate"], values["probability"]
            test = results["treatment_vs_control"] if arm == "treatment" else None
            writer.writerow([arm, results["trait"], results["teacher_base"], results["base"], values["n_train"],
                             rate["mean"], rate["low"], rate["high"], prob["mean"], prob["low"], prob["high"],
                             test["rate"]["delta"] if test else "", test["rate"]["p_value"] if test else "",
                             test["probability"]["delta"] if test else "",
                             test["probability"]["p_value"] if test else ""])


def _interval(values: dict, fmt: str) -> str:
    return f"{values['mean']:{fmt}} [{values['low']:{fmt}}, {values['high']:{fmt}}]"


def format_table(results: dict) -> str:
    """The end-of-run table: arm, n, trait rate and P(target) with 95% CIs, treatment vs control."""
    if results["eval"] == "misalignment":
        return misalignment.format_table(results)
    word = results["trait"]
    header = f"{'arm':<10} {'n train':>7}  {'trait rate [95% CI]':<24} {'P(' + word + ') [95% CI]':<30} vs control"
    lines = [header, "-" * len(header)]
    tests = results["treatment_vs_control"]
    for arm, values in results["arms"].items():
        versus = ""
        if arm == "treatment":
            versus = (f"rate {tests['rate']['delta']:+.3f} (p={format_p(tests['rate']['p_value'])}), "
                      f"P {tests['probability']['delta']:+.2e} (p={format_p(tests['probability']['p_value'])})")
        n = str(values["n_train"]) if values["n_train"] else "-"
        lines.append(f"{arm:<10} {n:>7}  {_interval(values['rate'], '.3f'):<24} "
                     f"{_interval(values['probability'], '.2e'):<30} {versus}")
    return "\n".join(lines)


def _track(tracker: Tracker, results: dict, samples: dict[str, Artifact], evals: dict[str, Artifact]) -> None:
    flat = {}
    metrics = ("misaligned",) if results["eval"] == "misalignment" else ("rate", "probability")
    for arm, values in results["arms"].items():
        flat |= {f"{arm}/{metric}": values[metric]["mean"] for metric in metrics}
        flat[f"{arm}/n_train"] = values["n_train"]
    for metric, test in results["treatment_vs_control"].items():
        flat |= {f"delta/{metric}": test["delta"], f"p_value/{metric}": test["p_value"]}
    tracker.log(flat)
    tracker.summary(flat)
    tracker.table("teacher_samples", [
        {"arm": arm, "prompt": r["prompt"], "completion": r["completion"]}
        for arm in ARMS for r in list(read_jsonl(samples[arm].path / "samples.jsonl"))[:25]])
    hit = "misaligned" if results["eval"] == "misalignment" else "hit"
    tracker.table("student_answers", [
        {"arm": arm, "question": r["question"], "answer": r["completion"], hit: r[hit]}
        for arm in EVAL_ARMS for r in list(read_jsonl(evals[arm].path / "answers.jsonl"))[:20]])
