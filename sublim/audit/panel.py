"""The trait panel: which trait of a category does this data carry most?

The data is audited against the teacher of every trait of ``trait.category`` (the trait yamls in conf/trait/,
with the job's own trait config in its name's place), all against one reference pass (shared, cached), and the
traits are ranked by the **answer shift**: per example, the sum over its answer tokens of log p_teacher -
log p_reference (the log-likelihood ratio of the whole answer), averaged over examples. On samples drawn from
trait A's teacher, answer shift(A) - answer shift(B) estimates KL(p_A || p_B) over answers, >= 0: the generating
trait ranks first in expectation (for constrained data, over the grammar-renormalised distributions the samples
were drawn from). The per-token mean LLS has no such guarantee when answers differ in length: dividing by the
length weighs the end-of-turn token of a short answer more than a long one's (on SmolLM2's owl data five animals
beat owl on it, none on the answer shift). LLS is shown beside it. Margins are paired over examples (a
bootstrap CI of the per-example difference), which is tighter than comparing two CIs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf, open_dict

from sublim import SublimError
from sublim.audit.summary import ci_of
from sublim.pipeline import teacher_system_prompt
from sublim.stage import Job
from sublim.stages.audit import audit_data
from sublim.stages.finetune import finetune_adapter
from sublim.store import Artifact, read_jsonl

CONF = Path(__file__).resolve().parents[2] / "conf"
PANEL = "_panel"  # where the composed traits are put, one package each, before each is read as `trait`


def trait_teacher(job: Job, teacher: Artifact) -> tuple[str | None, Artifact | None]:
    """(system prompt, adapter) of the job's trait teacher, built as the pipeline's treatment teacher is."""
    if job.cfg.trait.source == "finetune":
        return None, finetune_adapter(job, teacher)
    return teacher_system_prompt(job.cfg.trait, "treatment"), None


def _composed(overrides: list[str]) -> DictConfig:
    if GlobalHydra.instance().is_initialized():  # inside python -m sublim.audit
        return compose("config", overrides=overrides)
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides)


def category_traits(cfg: DictConfig) -> list[DictConfig]:
    """Every trait of ``cfg.trait.category`` (one compose for all: each yaml under its own package, read as it
    would be as ``trait=<name>``; their interpolations all point into ``trait``); the job's trait in its place."""
    names = [path.stem for path in sorted((CONF / "trait").glob("*.yaml")) if not path.name.startswith("_")]
    composed = _composed([f"+trait@{PANEL}.{name}={name}" for name in names])
    traits = {}
    for name in names:
        trait = OmegaConf.create({"trait": OmegaConf.to_container(composed[PANEL][name], resolve=False)}).trait
        if trait.category == cfg.trait.category:
            traits[trait.name] = trait
    traits[cfg.trait.name] = cfg.trait
    if len(traits) < 2:
        raise SublimError(f"audit.panel=true ranks the traits of trait.category={cfg.trait.category}, which has "
                          f"only {', '.join(traits)}; add a trait yaml of that category to conf/trait/ (as owl.yaml "
                          "is for animals) or set audit.panel=false")
    return list(traits.values())


def with_trait(cfg: DictConfig, trait: DictConfig) -> DictConfig:
    out = cfg.copy()
    with open_dict(out):
        out.trait = trait
    return out


def answer_shifts(artifact: Artifact) -> np.ndarray:
    """Per example of an audit, the sum of its per-token shifts."""
    return np.array([row["answer_shift"] for row in read_jsonl(artifact.path / "examples.jsonl")], dtype=float)


def run_panel(cfg: DictConfig, job: Job, data: Artifact, teacher: Artifact, reference: Artifact | None,
              traits: list[DictConfig]) -> list[dict]:
    """Audit ``data`` under every trait's teacher; the traits ranked by mean answer shift, each with its paired
    margin over the next and over the job's own trait."""
    rows, values = [], {}
    for trait in traits:
        trait_job = Job(with_trait(cfg, trait), job.store, job.tracker)
        system, adapter = trait_teacher(trait_job, teacher)
        artifact = audit_data(trait_job, data, teacher, system, adapter, reference, label=trait.name)
        summary = artifact.read_json("summary.json")
        values[trait.name] = answer_shifts(artifact)
        rows.append({"trait": trait.name, "answer": ci_of(values[trait.name].tolist(), cfg.audit.bootstrap),
                     "lls": summary["lls"], "lls_plain": summary["lls_plain"],
                     "divergence_fraction": summary["divergence_fraction"], "key": artifact.key,
                     "reused": artifact.reused})
    rows.sort(key=lambda r: -r["answer"]["mean"])

    def paired(first: str, second: str) -> dict:  # the per-example difference's mean, bootstrap CI over examples
        return {"trait": second, **ci_of((values[first] - values[second]).tolist(), cfg.audit.bootstrap)}

    for rank, (row, below) in enumerate(zip(rows, rows[1:] + [None], strict=True), 1):
        row |= {"rank": rank, "margin_next": below and paired(row["trait"], below["trait"]),
                "minus_trait": paired(row["trait"], cfg.trait.name)}
    return rows


def rank_of(panel: list[dict], trait: str) -> int:
    return next(row["rank"] for row in panel if row["trait"] == trait)


def format_ci(stat: dict, digits: int = 3) -> str:
    return f"{stat['mean']:+.{digits}f} [{stat['ci'][0]:+.{digits}f}, {stat['ci'][1]:+.{digits}f}]"


def headline(panel: list[dict], category: str, trait: str) -> str:
    """"this data carries owl more than any other animal: +x [ci] nats per answer, next eagle +y [ci]" and the
    paired margin (and where the job's trait ranks when it is not first)."""
    top, nxt = panel[0], panel[1]
    margin = top["margin_next"]
    line = (f"this data carries {top['trait']} more than any other {category}: {format_ci(top['answer'])} nats "
            f"per answer (LLS {top['lls']['mean']:+.4f} per token), next {nxt['trait']} {format_ci(nxt['answer'])} "
            f"(LLS {nxt['lls']['mean']:+.4f}); {top['trait']} - {nxt['trait']} {format_ci(margin)} paired over "
            f"{margin['n']} examples")
    if margin["ci"][0] <= 0:
        line += f" (not separated from {nxt['trait']}: the paired CI includes 0)"
    if top["answer"]["ci"][1] < 0:
        line += "; every teacher in the panel explains this data worse than the reference"
    if top["trait"] != trait:
        line += (f"; trait={trait} ranks {rank_of(panel, trait)} of {len(panel)} ({top['trait']} - {trait} "
                 f"{format_ci(top['minus_trait'])} paired)")
    return line


def format_panel(panel: list[dict], category: str, trait: str) -> str:
    """The ranking, one line a trait, and the headline."""
    lines = [f"trait panel ({category}): the data under each trait's teacher vs the reference, mean over examples "
             "[95% bootstrap CI]: answer shift (nats per answer), LLS (per token), full-softmax LLS, divergent tokens"]
    for row in panel:
        lines.append(f"  {row['rank']:>2}. {row['trait']:<18} {format_ci(row['answer'])}  LLS "
                     f"{format_ci(row['lls'], 4)}  full softmax {row['lls_plain']['mean']:+.4f}  divergent "
                     f"{row['divergence_fraction']:.1%}")
    lines.append(headline(panel, category, trait))
    return "\n".join(lines)
