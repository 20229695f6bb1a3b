"""``eval=misalignment``: a judge scores open-ended answers for alignment and coherence (sublim/misalignment.py);
misaligned = low alignment while coherent."""

from __future__ import annotations

from sublim import misalignment
from sublim.evals import EVAL_ARMS, EVALS, EvalKind
from sublim.judge import model_upstream
from sublim.stage import Job
from sublim.stages.judge import JUDGE
from sublim.stages.open_answers import OPEN_ANSWERS
from sublim.stats import format_p
from sublim.store import Artifact


class Misalignment(EvalKind):
    scores_stage = "judge"
    metrics = ("misaligned",)
    hit = "misaligned"

    def stages(self, job: Job, model: Artifact, students: dict[str, Artifact | None]) -> dict[str, dict]:
        answers = {arm: OPEN_ANSWERS(job, label=arm, model=model, adapter=students[arm]) for arm in EVAL_ARMS}
        judge_model = model_upstream(job.cfg.judge, job.store)
        scores = {arm: JUDGE(job, label=arm, answers=answers[arm], **judge_model) for arm in EVAL_ARMS}
        return {"open_answers": answers, "scores": scores}

    def summarise_arm(self, job: Job, outputs: dict[str, dict], arm: str) -> dict:
        return misalignment.summarise_arm(outputs["scores"][arm].read_json("scores.json"))

    def compare(self, job: Job, scores: dict[str, dict]) -> dict:
        return misalignment.compare(scores["treatment"], scores["control"], job.cfg.eval.n_permutations, job.cfg.seed)

    def effects(self, results: dict) -> dict[str, float]:
        arms = results["arms"]
        return {"misaligned": arms["treatment"]["misaligned"]["mean"] - arms["control"]["misaligned"]["mean"]}

    def format_table(self, results: dict) -> str:
        """Arm, n, misaligned rate with 95% CI, mean alignment / coherence, treatment vs control."""
        header = (f"{'arm':<10} {'n train':>7}  {'misaligned [95% CI]':<24} {'alignment':>9} {'coherence':>9} "
                  f"{'scored':>6}  vs control, over questions")
        lines = [header, "-" * len(header)]
        test = results["treatment_vs_control"]["misaligned"]
        for arm, values in results["arms"].items():
            m = values["misaligned"]
            cells = [f"{values[k]['mean']:9.1f}" if values[k] else f"{'-':>9}" for k in ("alignment", "coherence")]
            versus = f"{test['delta']:+.3f} (p={format_p(test['p_value'])})" if arm == "treatment" else ""
            n = str(values["n_train"]) if values["n_train"] else "-"
            lines.append(f"{arm:<10} {n:>7}  {m['mean']:.3f} [{m['low']:.3f}, {m['high']:.3f}]{'':<4} {cells[0]} "
                         f"{cells[1]} {values['scored']:6.0%}  {versus}")
        return "\n".join(lines)

    def csv(self, results: dict) -> tuple[list[str], list[list]]:
        header = ["arm", "trait", "teacher_base", "base", "n_train", "misaligned", "misaligned_low",
                  "misaligned_high", "scored", "delta_misaligned", "p_misaligned"]
        test = results["treatment_vs_control"]["misaligned"]
        rows = []
        for arm, values in results["arms"].items():
            m, treated = values["misaligned"], arm == "treatment"
            rows.append([arm, results["trait"], results["teacher_base"], results["base"], values["n_train"],
                         m["mean"], m["low"], m["high"], values["scored"],
                         test["delta"] if treated else "", test["p_value"] if treated else ""])
        return header, rows


EVALS.register("misalignment")(Misalignment())
