"""``eval=preference``: does a model name the trait's target when asked for its favourite?

Per question: the trait rate of k sampled answers and P(target) teacher-forced (sublim/evaluate.py); with
``eval.targets``, P(X) for every target X too (the trait x target matrix of a sweep's report).
"""

from __future__ import annotations

import math

from omegaconf import DictConfig, OmegaConf

from sublim.evals import EVAL_ARMS, EVALS, EvalKind
from sublim.stage import Job
from sublim.stages.answers import ANSWERS
from sublim.stages.evaluate import EVALUATE
from sublim.stages.targets import TARGETS
from sublim.stats import bootstrap_ci, format_p, mean_ci, paired_permutation_test
from sublim.store import Artifact


def job_targets(cfg: DictConfig) -> dict[str, list[str]]:
    """Targets every model is scored for (eval.targets, plus the job's own trait): name -> words."""
    # a category without a target list (or an eval without targets) scores the job's own trait only
    targets = OmegaConf.select(cfg, "eval.targets", default=None, throw_on_resolution_failure=False)
    targets = OmegaConf.to_container(targets, resolve=True) if targets else {}
    return targets | ({} if cfg.trait.name in targets else {cfg.trait.name: list(cfg.trait.words)})


def _interval(values: dict, fmt: str) -> str:
    return f"{values['mean']:{fmt}} [{values['low']:{fmt}}, {values['high']:{fmt}}]"


class Preference(EvalKind):
    scores_stage = "evaluate"
    metrics = ("rate", "probability")
    hit = "hit"

    def stages(self, job: Job, model: Artifact, students: dict[str, Artifact | None]) -> dict[str, dict]:
        answers = {arm: ANSWERS(job, label=arm, model=model, adapter=students[arm]) for arm in EVAL_ARMS}
        scores = {arm: EVALUATE(job, label=arm, model=model, answers=answers[arm], adapter=students[arm])
                  for arm in EVAL_ARMS}
        outputs = {"answers": answers, "scores": scores}
        targets = job_targets(job.cfg)
        if set(targets) != {job.cfg.trait.name}:  # the job's own trait alone is already P(target) above
            outputs["targets"] = {arm: TARGETS(job, {"targets": targets}, label=arm, model=model,
                                               adapter=students[arm]) for arm in EVAL_ARMS}
        return outputs

    def summarise_arm(self, job: Job, outputs: dict[str, dict], arm: str) -> dict:
        scores, seed = outputs["scores"][arm].read_json("scores.json"), job.cfg.seed
        targets = (outputs["targets"][arm].read_json("targets.json") if "targets" in outputs
                   else {job.cfg.trait.name: scores["probability"]})
        return {
            "rate": mean_ci(scores["rate"]).to_dict(),
            # probabilities are skewed and tiny: a percentile bootstrap keeps the interval inside [0, 1]
            "probability": bootstrap_ci(scores["probability"], seed=seed).to_dict(),
            "targets": {name: bootstrap_ci(values, seed=seed).to_dict() for name, values in targets.items()},
            "top_answers": scores["top_answers"],
        }

    def compare(self, job: Job, scores: dict[str, dict]) -> dict:
        return {metric: paired_permutation_test(scores["treatment"][metric], scores["control"][metric],
                                                n_resamples=job.cfg.eval.n_permutations, seed=job.cfg.seed).to_dict()
                for metric in self.metrics}

    def effects(self, results: dict) -> dict[str, float]:
        """log(P_treatment / P_control) of the question-averaged P(target) (P spans orders of magnitude across
        traits, so the ratio is what is comparable), and the difference of trait rates."""
        arms = results["arms"]
        return {"log_probability_ratio": math.log(arms["treatment"]["probability"]["mean"]
                                                  / arms["control"]["probability"]["mean"]),
                "rate": arms["treatment"]["rate"]["mean"] - arms["control"]["rate"]["mean"]}

    def format_table(self, results: dict) -> str:
        """Arm, n, trait rate and P(target) with 95% CIs, treatment vs control."""
        word = results["trait"]
        header = (f"{'arm':<10} {'n train':>7}  {'trait rate [95% CI]':<24} {'P(' + word + ') [95% CI]':<30} "
                  "vs control, over questions")
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

    def csv(self, results: dict) -> tuple[list[str], list[list]]:
        header = ["arm", "trait", "teacher_base", "base", "n_train", "rate", "rate_low", "rate_high", "probability",
                  "probability_low", "probability_high", "delta_rate", "p_rate", "delta_probability", "p_probability"]
        rows = []
        for arm, values in results["arms"].items():
            rate, prob = values["rate"], values["probability"]
            test = results["treatment_vs_control"] if arm == "treatment" else None
            rows.append([arm, results["trait"], results["teacher_base"], results["base"], values["n_train"],
                         rate["mean"], rate["low"], rate["high"], prob["mean"], prob["low"], prob["high"],
                         test["rate"]["delta"] if test else "", test["rate"]["p_value"] if test else "",
                         test["probability"]["delta"] if test else "", test["probability"]["p_value"] if test else ""])
        return header, rows


EVALS.register("preference")(Preference())
