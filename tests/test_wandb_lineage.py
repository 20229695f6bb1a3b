"""A job's store artifacts in its offline W&B run: one artifact per stage, by reference, each naming its upstream;
and the run file read only once complete."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sublim.store import Store
from sublim.tracking import artifact_name
from sublim.train import run_job
from tests.conftest import TINY
from tests.wandb_file import BLOCK, finished_records, read_records, run_file


def test_offline_run_holds_every_stage_artifact_and_its_upstream(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("base=tiny_llama", *[o for o in TINY if not o.startswith("logger=")], "logger=wandb")
    results = run_job(cfg, tmp_path / "job")
    records = finished_records(run_file(tmp_path / "job"))
    # what CI once read right after run.finish(): the first 32 KiB block and part of a chunk, no exit record
    data = run_file(tmp_path / "job").read_bytes()
    assert len(data) > BLOCK, "the run spans more than one block"
    partial = tmp_path / "partial.wandb"
    partial.write_bytes(data[:BLOCK + 100])
    assert 0 < len(read_records(partial)) < len(records)
    with pytest.raises(AssertionError, match="holds no exit record"):
        finished_records(partial, timeout=1.0)
    logged = {r.artifact.name: r.artifact for r in records if r.WhichOneof("record_type") == "artifact"}
    store = Store(cfg.paths.store)
    names = {}
    for arm in ("control", "treatment"):
        for stage in ("sample", "filter", "train"):
            lineage = store.lineage(stage, results["stages"][f"{stage}/{arm}"]["key"])
            names[stage, arm] = artifact_name(lineage)
            artifact = logged[names[stage, arm]]
            assert artifact.type == stage
            [entry] = [e for e in artifact.manifest.contents if e.path == "lineage.json"]
            assert entry.ref == f"file://{store.path(stage, lineage['key'])}/lineage.json", "a reference, no upload"
    upstream = json.loads(logged[names["train", "treatment"]].metadata)["upstream"]
    assert upstream["data"] == names["filter", "treatment"] and upstream["model"] in logged
    assert json.loads(logged[names["filter", "treatment"]].metadata)["upstream"]["samples"] == names["sample",
                                                                                                       "treatment"]
    assert any(artifact.type == "prompts" for artifact in logged.values()), "upstream of a listed stage"
