"""A job's store artifacts in its offline W&B run: one artifact per stage, by reference, each naming its upstream.

wandb 0.31 reads .wandb files only in its Go core, so the run file is read here with its LevelDB-log framing.
wandb-core writes that file in 32 KiB blocks and flushes the last, partial one when it closes the run's stream, which
can be after ``run.finish()`` returns: the test waits for the run's exit record before reading what was logged."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

from wandb.proto.wandb_internal_pb2 import Record

from sublim.store import Store
from sublim.tracking import artifact_name
from sublim.train import run_job
from tests.conftest import TINY

BLOCK, HEADER, FIRST, LAST = 32768, 7, 2, 4  # LevelDB log: 32 KiB blocks, 7-byte chunk header (crc, length, type)


def read_records(path: Path) -> list[Record]:
    """Every record of a .wandb run file (its 7-byte file header, then LevelDB-log chunks)."""
    data, records, pending, offset = path.read_bytes(), [], b"", HEADER
    while offset + HEADER <= len(data):
        if BLOCK - offset % BLOCK < HEADER:  # a block's tail too short for a chunk header is padding
            offset += BLOCK - offset % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[offset:offset + HEADER])
        if offset + HEADER + length > len(data):  # a chunk still being written
            break
        pending += data[offset + HEADER:offset + HEADER + length]
        offset += HEADER + length
        if kind not in (FIRST, FIRST + 1):  # a full record or the last chunk of one
            record = Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def finished_records(path: Path, timeout: float = 120.0) -> list[Record]:
    """The run file's records once it holds the run's exit record (every record logged before it is then on disk)."""
    deadline = time.monotonic() + timeout
    while True:
        records = read_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        assert time.monotonic() < deadline, f"{path} holds no exit record {timeout:.0f} s after run.finish()"
        time.sleep(0.5)


def test_offline_run_holds_every_stage_artifact_and_its_upstream(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("base=tiny_llama", *[o for o in TINY if not o.startswith("logger=")], "logger=wandb")
    results = run_job(cfg, tmp_path / "job")
    [run_file] = (tmp_path / "job" / "wandb").glob("offline-run-*/run-*.wandb")
    records = finished_records(run_file)
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
