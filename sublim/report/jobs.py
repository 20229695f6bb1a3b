"""A sweep report's rows: one per job and seed, keyed by everything that differs between the sweep's jobs.

Two jobs of a sweep over ``student.lr`` have the same trait, bases, modality and filter; without the
learning rate in their key, their rows (and their cells of the trait x target matrix) would collide. So a
row carries every field that differs between the sweep's jobs: their Hydra overrides
(``<job>/.hydra/overrides.yaml``) or, for jobs without them, the leaves of their resolved configs.
A job over several ``seeds`` gives one row per seed, like a sweep over ``seed=``.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sublim.stats import bh_adjust
from sublim.store.provenance import read_provenance, seed_provenance

log = logging.getLogger(__name__)

ARMS = ("base", "control", "treatment")
# Each has its own column (and eval kinds their own tables), so the varying fields leave them out.
IDENTITY = ("teacher_base", "base", "trait", "modality", "filter", "eval")
# Never part of a setting: the replicate (seed), what a setting compares (trait), where files go, logging.
IGNORED = ("seed", "seeds", "trait", "paths", "logger", "hydra", "dry_run")
# What a setting is, besides the varying fields (student and source are not columns, but split settings),
# with the defaults of results.json files older than these fields.
SETTING = {"teacher_base": None, "base": None, "student": "lora", "source": "prompt", "modality": None, "filter": None}
HEAD = ["job", "teacher_base", "base", "trait", "modality", "filter"]
PREFERENCE_TAIL = ["seed", "n", "control_rate", "treatment_rate", "delta_rate", "delta_rate_low", "delta_rate_high",
                   "p_rate", "p_rate_bh", "control_p", "treatment_p", "delta_p", "delta_p_low", "delta_p_high", "p_p",
                   "p_p_bh"]
MISALIGNMENT_TAIL = ["seed", "n", *(f"{arm}_misaligned" for arm in ARMS), "delta_misaligned", "delta_misaligned_low",
                     "delta_misaligned_high", "p_misaligned", "p_misaligned_bh"]


@dataclass(frozen=True)
class Job:
    """One seed of one job: its results (a single-seed results.json's layout) and its sweep-varying fields."""

    name: str
    results: dict
    varying: dict[str, str]
    provenance: dict[str, dict] | None = None  # this seed's stages (name -> artifact record); None: not recorded


def columns(rows: list[dict], tail: list[str]) -> list[str]:
    """CSV / W&B columns: what identifies a row, the sweep's varying fields, then the numbers."""
    return [*HEAD, *(rows[0]["_varying"] if rows else []), *tail]


def per_seed(results: dict) -> list[dict]:
    """A multi-seed job's results per seed (each with the job's config), or a single-seed job's own."""
    if not results.get("seeds"):
        return [results]
    shared = {key: value for key, value in results.items() if key not in ("seeds", "pooled")}
    return [shared | seed for seed in results["seeds"]]


def _of_kind(results: dict, kind: str) -> bool:
    return "treatment_vs_control" in results and results.get("eval", "preference") == kind


def jobs(sweep_dir: Path, kind: str) -> list[Job]:
    """The sweep's finished LLM jobs of one eval kind, one per seed, in job order."""
    loaded = []
    for path in sorted(sweep_dir.glob("**/results.json"), key=_job_order):
        results = json.loads(path.read_text())
        if any(_of_kind(r, kind) for r in per_seed(results)):
            loaded.append((path.parent, results))
    out = []
    for (job, results), varying in zip(loaded, varying_fields(loaded), strict=True):
        name = str(job.relative_to(sweep_dir))
        provenance = read_provenance(job)
        out += [Job(f"{name} seed={r['seed']}" if results.get("seeds") else name, r, varying,
                    seed_provenance(provenance, r.get("seed")) if provenance else None)
                for r in per_seed(results) if _of_kind(r, kind)]
    return out


def _job_order(path: Path) -> tuple:
    """Hydra job dirs start with the job number: sort 2_ before 10_."""
    head = path.parent.name.split("_", 1)[0]
    return (int(head) if head.isdigit() else sys.maxsize, str(path))


def varying_fields(loaded: list[tuple[Path, dict]]) -> list[dict[str, str]]:
    """Per job, the fields that differ between the jobs: Hydra overrides when every job has them, else config leaves.

    Config leaves that the identity columns determine (base.path follows base, filter word lists follow the
    trait) are left out, and a config group's leaves that its name or kind determines are shown as the group.
    """
    overrides = [_overrides(job) for job, _ in loaded]
    if all(o is not None for o in overrides):
        return [{k: v for k, v in fields.items() if k not in IDENTITY} for fields in _differing(overrides)]
    fields = _differing([_leaves(results.get("config", {})) for _, results in loaded])
    identities = [tuple(results.get(k) for k in IDENTITY) for _, results in loaded]
    keys = [k for k in (fields[0] if fields else {}) if not _function_of([f[k] for f in fields], identities)]
    shown: dict[str, str] = {}  # column -> leaf
    for key in keys:
        group = key.split(".")[0]
        named = next((f"{group}.{n}" for n in ("name", "kind") if f"{group}.{n}" in keys), None)
        if named is None:
            shown[key] = key
        elif key == named or not _function_of([f[key] for f in fields], [f[named] for f in fields]):
            shown[group if key == named else key] = key
    return [{column: f[leaf] for column, leaf in shown.items()} for f in fields]


def _overrides(job: Path) -> dict[str, str] | None:
    """The job's Hydra overrides (key -> value as typed), None when Hydra left none."""
    path = job / ".hydra" / "overrides.yaml"
    if not path.exists():
        return None
    pairs = [str(o).partition("=") for o in yaml.safe_load(path.read_text()) or []]
    return {key.lstrip("+~"): value for key, _, value in pairs}


def _leaves(tree: Any, prefix: str = "") -> dict[str, str]:
    """Dotted path -> value as text of every leaf (lists are leaves)."""
    if not isinstance(tree, dict):
        return {prefix: _text(tree)}
    return {path: value for key, sub in tree.items()
            for path, value in _leaves(sub, f"{prefix}.{key}" if prefix else str(key)).items()}


def _text(value: Any) -> str:
    """A leaf as a table cell: null and missing are both empty."""
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value)


def _differing(per_job: list[dict[str, str]]) -> list[dict[str, str]]:
    """Per job, only the fields (outside IGNORED) whose values are not the same for every job."""
    keys = [k for k in dict.fromkeys(k for fields in per_job for k in fields)
            if k.split(".")[0] not in IGNORED and len({fields.get(k, "") for fields in per_job}) > 1]
    return [{k: fields.get(k, "") for k in keys} for fields in per_job]


def _function_of(values: list, by: list) -> bool:
    """Whether jobs equal in ``by`` are always equal in ``values`` (then the values add nothing to ``by``)."""
    seen: dict = {}
    return all(seen.setdefault(b, v) == v for b, v in zip(by, values, strict=True))


def _row(job: Job) -> dict:
    """What identifies a row, and what the tables, charts, matrix and W&B need."""
    r, seed = job.results, job.results.get("seed", 0)
    setting = tuple((k, r.get(k, default)) for k, default in SETTING.items()) + tuple(job.varying.items())
    return {"job": job.name, **{k: r[k] for k in HEAD[1:]}, **job.varying, "seed": seed,
            "n": r["arms"]["treatment"]["n_train"], "_arms": r["arms"],
            "_logger": r.get("config", {}).get("logger", {}), "_setting": setting, "_varying": list(job.varying),
            "_seed": seed,  # what the matrix and charts group replicates by (older than the seed column)
            "_generations": r.get("generations"), "_provenance": job.provenance, "_audit": r.get("audit") or {}}


def _adjust(rows: list[dict], *p_columns: str) -> list[dict]:
    """Benjamini-Hochberg over the rows (every job and seed of the sweep), each p column its own family."""
    for column in p_columns:
        for row, q in zip(rows, bh_adjust([r[column] for r in rows]), strict=True):
            row[f"{column}_bh"] = q
    _warn_duplicates(rows)
    return rows


def _warn_duplicates(rows: list[dict]) -> None:
    """Two jobs alike in everything but their directory (a job run twice) would count as two replicates."""
    seen: dict[tuple, str] = {}
    for row in rows:
        other = seen.setdefault((row["_setting"], row["trait"], row["_seed"]), row["job"])
        if other != row["job"]:
            log.warning("jobs %s and %s have the same setting, trait and seed: both count as replicates",
                        other, row["job"])


def collect(sweep_dir: Path) -> list[dict]:
    """One row per preference job and seed of the sweep (other tasks and eval kinds are skipped)."""
    rows = []
    for job in jobs(sweep_dir, "preference"):
        arms, tests = job.results["arms"], job.results["treatment_vs_control"]
        rate, prob = tests["rate"], tests["probability"]
        rows.append(_row(job) | {
            "control_rate": arms["control"]["rate"]["mean"], "treatment_rate": arms["treatment"]["rate"]["mean"],
            "delta_rate": rate["delta"], "delta_rate_low": rate["ci"]["low"], "delta_rate_high": rate["ci"]["high"],
            "p_rate": rate["p_value"],
            "control_p": arms["control"]["probability"]["mean"],
            "treatment_p": arms["treatment"]["probability"]["mean"],
            "delta_p": prob["delta"], "delta_p_low": prob["ci"]["low"], "delta_p_high": prob["ci"]["high"],
            "p_p": prob["p_value"]})
    return _adjust(rows, "p_rate", "p_p")


def collect_misalignment(sweep_dir: Path) -> list[dict]:
    """One row per misalignment job and seed: the misaligned-answer rate per arm and treatment vs control."""
    rows = []
    for job in jobs(sweep_dir, "misalignment"):
        arms, test = job.results["arms"], job.results["treatment_vs_control"]["misaligned"]
        rows.append(_row(job) | {f"{arm}_misaligned": arms[arm]["misaligned"]["mean"] for arm in ARMS} | {
            "delta_misaligned": test["delta"], "delta_misaligned_low": test["ci"]["low"],
            "delta_misaligned_high": test["ci"]["high"], "p_misaligned": test["p_value"]})
    return _adjust(rows, "p_misaligned")
