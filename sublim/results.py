"""A job's results: the summary (results.json), its CSV, the end-of-run table and what W&B gets.

A one-seed job's results are that seed's; a job over ``seeds`` holds every seed's results under "seeds"
and the across-seed tests under "pooled" (sublim/replication.py says why seeds are the unit).
"""

from __future__ import annotations

import csv
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from sublim.evals import ARMS, EVAL_ARMS, EVALS, EvalKind
from sublim.replication import pooled
from sublim.stage import Job
from sublim.stats import format_p
from sublim.store import Artifact, Store, read_jsonl, result_stages, write_json
from sublim.tracking import Tracker

POOLED_FIELDS = ("mean", "low", "high", "p_value", "n_seeds")
IDENTITY = ("trait", "category", "base", "teacher_base", "source", "student", "modality", "filter", "eval")
ONE_SEED = ("One seed: the p-values above compare these two trained models over the questions; they say nothing "
            "about transfer. seeds=[0,1,2] tests treatment vs control across seeds.")


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
        "arms": arms, "treatment_vs_control": {metric: test | {"unit": "question: these two trained models"}
                                                for metric, test in kind.compare(job, scores).items()},
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def replicate(cfg: DictConfig, per_seed: list[dict]) -> dict:
    """The results of a job over several seeds: each seed's, and the across-seed test of every effect."""
    kind = EVALS[cfg.eval.kind]
    out = ({field: per_seed[0][field] for field in IDENTITY}
           | {"seeds": [{k: v for k, v in r.items() if k != "config"} for r in per_seed],
              "pooled": pooled([kind.effects(r) for r in per_seed])})
    if "generations" in per_seed[0]:  # every generation's effect, tested across seeds like the first
        out["pooled_generations"] = [
            {"generation": k + 1, "pooled": pooled([kind.effects(r["generations"][k]) for r in per_seed])}
            for k in range(len(per_seed[0]["generations"]))]
    return out | {"config": OmegaConf.to_container(cfg, resolve=True)}


def _seeds(results: dict) -> list[dict]:
    return results.get("seeds") or [results]


def write_results(job_dir: Path, results: dict) -> None:
    """results.json; results.csv (a row per seed and arm); pooled.csv (a row per metric) over several seeds."""
    job_dir.mkdir(parents=True, exist_ok=True)
    write_json(job_dir / "results.json", results)
    kind = EVALS[results["eval"]]
    with open(job_dir / "results.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        for i, seed_results in enumerate(_seeds(results)):
            header, rows = kind.csv(seed_results)
            if i == 0:
                writer.writerow(["seed", *header])
            writer.writerows([seed_results["seed"], *row] for row in rows)
    if "pooled" in results:
        with open(job_dir / "pooled.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["generation", "metric", "n_seeds", "mean", "low", "high", "p_value", "p_sign_flip", "sd",
                             "mde", "effects"])
            for generation in results.get("pooled_generations") or [{"generation": 1, "pooled": results["pooled"]}]:
                for metric, test in generation["pooled"].items():
                    writer.writerow([generation["generation"], metric, test["n_seeds"], test["mean"], test["low"],
                                     test["high"], test["p_value"], test["p_sign_flip"], test.get("sd"),
                                     test.get("mde"), " ".join(f"{e:.6g}" for e in test["effects"])])


def format_audit(results: dict) -> str:
    """The audit's lines: each arm's data LLS under the treatment teacher vs the base, and the entangled numbers."""
    audit = results.get("audit") or {}
    if not audit:
        return ""
    kind = "grammar-renormalised" if next(iter(audit.values()))["constrained"] else "full softmax"
    lines = [f"audit: log p(trait teacher) - log p(base) of the data ({kind}; mean [95% bootstrap CI over "
             "examples]); per answer (nats; estimates KL on the teacher's own samples) and per token (LLS):"]
    for arm, summary in audit.items():
        shift, lls, plain = summary["answer_shift"], summary["lls"], summary["lls_plain"]
        lines.append(f"  {arm + ' data':<15} {shift['mean']:+.3f} [{shift['ci'][0]:+.3f}, {shift['ci'][1]:+.3f}]  "
                     f"LLS {lls['mean']:+.4f} [{lls['ci'][0]:+.4f}, {lls['ci'][1]:+.4f}]  full-softmax LLS "
                     f"{plain['mean']:+.4f}  divergent tokens {summary['divergence_fraction']:.1%}")
    if "treatment" in audit and (numbers := audit["treatment"]["entangled"]["numbers"][:5]):
        lines.append("  numbers the trait raises most in the treatment data: "
                     + ", ".join(f"{n['number']} ({n['shift']:+.2f}, n={n['count']})" for n in numbers))
    return "\n".join(lines)


def _with_audit(table: str, results: dict) -> str:
    return f"{table}\n{audit}" if (audit := format_audit(results)) else table


def _seed_table(results: dict) -> str:
    """One seed's table(s): its arms and audit, or one block per generation of its chain."""
    kind = EVALS[results["eval"]]
    if "generations" not in results:
        return _with_audit(kind.format_table(results), results)
    return "\n\n".join(f"generation {g['generation']} (teacher: "
                        f"{'the trait teacher' if g['generation'] == 1 else 'each arm of the generation before'})\n"
                        f"{_with_audit(kind.format_table(g), g)}" for g in results["generations"])


def format_table(results: dict) -> str:
    """The end-of-run table of the job's eval kind and the audit: per seed (and generation), then the
    across-seed test."""
    if "pooled" not in results:
        return f"{_seed_table(results)}\n\n{ONE_SEED}"
    blocks = [f"seed {r['seed']}\n{_seed_table(r)}" for r in results["seeds"]]
    lines = [f"treatment vs control across {len(results['seeds'])} seeds (the unit of replication; "
             "per-seed effects, mean [95% t CI], t-test p, exact sign-flip p; MDE: the effect a one-sided t-test "
             "at 0.05 would detect with 80% power given these seeds' spread):"]
    chain = results.get("pooled_generations") or [{"generation": None, "pooled": results["pooled"]}]
    for generation in chain:
        if generation["generation"] is not None:
            lines.append(f" generation {generation['generation']}")
        for metric, test in generation["pooled"].items():
            effects = ", ".join(f"{e:+.3g}" for e in test["effects"])
            lines.append(f"  {metric:<22} {test['mean']:+.3g} [{test['low']:+.3g}, {test['high']:+.3g}]  "
                         f"p={format_p(test['p_value'])}  sign-flip p={format_p(test['p_sign_flip'])}  "
                         f"(seeds: {effects}){_detectable(test)}")
    return "\n\n".join(blocks) + "\n\n" + "\n".join(lines)


def _flat(kind: EvalKind, results: dict, prefix: str) -> dict[str, float]:
    """One seed's (or generation's) arm means, question-level tests and audit, as W&B scalars under ``prefix``."""
    flat = {}
    for arm, values in results["arms"].items():
        flat |= {f"{prefix}{arm}/{metric}": values[metric]["mean"] for metric in kind.metrics}
        flat[f"{prefix}{arm}/n_train"] = values["n_train"]
    for metric, test in results["treatment_vs_control"].items():
        flat |= {f"{prefix}delta/{metric}": test["delta"], f"{prefix}p_value/{metric}": test["p_value"]}
    for arm, audit in results.get("audit", {}).items():
        flat |= {f"{prefix}audit/{arm}/lls": audit["lls"]["mean"], f"{prefix}audit/{arm}/answer_shift":
                 audit["answer_shift"]["mean"], f"{prefix}audit/{arm}/lls_plain": audit["lls_plain"]["mean"],
                 f"{prefix}audit/{arm}/divergence": audit["divergence_fraction"]}
    return flat


def _detectable(test: dict) -> str:
    """What a null could have seen: the effect these seeds' spread detects with 80% power (one-sided, 0.05)."""
    return f"  MDE {test['mde']:.3g}" if test.get("sd") else ""  # no spread (every seed 0): no t-test to size


def track(tracker: Tracker, results: dict, store: Store) -> None:
    """Per-seed arm means and question-level tests, the across-seed tests in the summary, sample tables."""
    kind = EVALS[results["eval"]]
    several = "pooled" in results
    flat = {}
    by_generation = []
    for seed_results in _seeds(results):
        for generation in seed_results.get("generations") or [seed_results]:
            k = generation.get("generation")
            prefix = ("".join([f"seed{seed_results['seed']}/" if several else "", f"gen{k}/" if k else ""]))
            flat |= _flat(kind, generation, prefix)
            by_generation += [{"seed": seed_results["seed"], "generation": k or 1, "arm": arm}
                              | {metric: values[metric]["mean"] for metric in kind.metrics}
                              for arm, values in generation["arms"].items()]
    for generation in results.get("pooled_generations") or [{"generation": None, "pooled": results.get("pooled", {})}]:
        prefix = f"pooled/gen{generation['generation']}/" if generation["generation"] else "pooled/"
        for metric, test in generation["pooled"].items():
            flat |= {f"{prefix}{metric}/{field}": test[field] for field in POOLED_FIELDS}
    tracker.log(flat)
    tracker.summary(flat)
    if "generations" in _seeds(results)[0]:
        tracker.table("generations", by_generation)
    tracker.artifacts(store, result_stages(results))
    first = _seeds(results)[0]["stages"]
    tracker.table("teacher_samples", [
        {"arm": arm, "prompt": r["prompt"], "completion": r["completion"]}
        for arm in ARMS for r in list(read_jsonl(store.path("sample", first[f"sample/{arm}"]["key"])
                                                 / "samples.jsonl"))[:25]])
    tracker.table("student_answers", [
        {"arm": arm, "question": r["question"], "answer": r["completion"], kind.hit: r[kind.hit]}
        for arm in EVAL_ARMS for r in list(read_jsonl(store.path(kind.scores_stage,
                                                                 first[f"{kind.scores_stage}/{arm}"]["key"])
                                                      / "answers.jsonl"))[:20]])
