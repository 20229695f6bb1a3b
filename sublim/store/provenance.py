"""A job's provenance.json: how every artifact its results.json names was made, kept beside the results.

results.json names each stage's store key; the store's lineage says what made it (code version and source hash,
sublim's git commit, library versions, host, seconds, the sha256 of every file). The store is a cache, local to one
machine and cleaned at will, so a study run over several sittings (its seeds in different sessions, or on
different machines) would lose that record with it. provenance.json keeps it with the results, so that

- the sweep report can check that the seeds it pools were computed by the same stage code, and that what the
  traits of one seed share (its control student) is the same files in every job (sublim/report/provenance.py);
- ``python -m sublim.store compute`` can sum a study's compute after the store that ran it is gone.

The pipeline writes it at the end of every job; ``python -m sublim.store provenance DIR`` writes it for jobs that
finished before it existed, from a store that still holds their artifacts.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from sublim import SublimError
from sublim.store import Store, named_stages, write_json

PROVENANCE = "provenance.json"
FORMAT = 1


def content_hash(files: dict[str, dict]) -> str | None:
    """One sha256 over an artifact's file records: equal iff every file is byte-identical (None: not recorded)."""
    if not files:
        return None
    listing = "\n".join(f"{rel} {record['sha256']}" for rel, record in sorted(files.items()))
    return hashlib.sha256(listing.encode()).hexdigest()[:16]


def _record(lineage: dict) -> dict:
    return {"code": lineage.get("code"), "created": lineage.get("created"), "seconds": lineage.get("seconds"),
            "host": lineage.get("host"), "env": lineage.get("env"), "content": content_hash(lineage.get("files") or {}),
            "upstream": sorted(f"{u['stage']}/{u['key']}" for u in (lineage.get("upstream") or {}).values())}


def job_provenance(results: dict, store: Store) -> tuple[dict, list[str]]:
    """(provenance, the artifacts the store no longer holds). Artifacts are ``stage/key``; each is recorded once
    with its upstream, so the artifacts' seconds sum to what the job's results cost, reuse counted once."""
    artifacts: dict[str, dict] = {}
    missing: list[str] = []

    def visit(lineage: dict) -> None:
        ref = f"{lineage['stage']}/{lineage['key']}"
        if ref not in artifacts:
            artifacts[ref] = _record(lineage)
            for upstream in (lineage.get("upstream") or {}).values():
                visit(upstream)

    stages = []
    for seed, generation, name, entry in named_stages(results):
        stage, key = entry.get("stage") or name.split("/")[0], entry["key"]
        if "stage" not in entry and not (store.root / stage).is_dir():
            continue  # results.json older than its stage field: "teacher_model" names no stage dir
        stages.append({"seed": seed, "generation": generation, "name": name, "artifact": f"{stage}/{key}"})
        if store.path(stage, key).is_dir():
            visit(store.lineage(stage, key))
        else:
            missing.append(f"{stage}/{key}")
    return {"format": FORMAT, "stages": stages, "artifacts": artifacts}, missing


def write_provenance(job_dir: Path, results: dict, store: Store) -> Path:
    """provenance.json in the job dir; an error naming what is missing when the store lacks an artifact."""
    provenance, missing = job_provenance(results, store)
    if missing:
        raise SublimError(f"{job_dir}: the store at {store.root} no longer holds {len(missing)} of the job's "
                          f"artifacts ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); its "
                          "provenance can only be written from the store that computed it")
    write_json(job_dir / PROVENANCE, provenance)
    return job_dir / PROVENANCE


def read_provenance(job_dir: Path) -> dict | None:
    """A job's provenance.json, or None for a job older than it."""
    path = job_dir / PROVENANCE
    return json.loads(path.read_text()) if path.exists() else None


def seed_provenance(provenance: dict, seed: int | None) -> dict[str, dict]:
    """One seed's stages, ``name`` (``gen<k>/name`` past generation 1) -> its artifact's record plus ``artifact``."""
    return {(s["name"] if s["generation"] == 1 else f"gen{s['generation']}/{s['name']}"):
            {"artifact": s["artifact"], **provenance["artifacts"][s["artifact"]]}
            for s in provenance["stages"] if s["seed"] == seed}
