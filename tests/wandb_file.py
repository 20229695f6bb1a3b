"""Reading a job's offline W&B run file, as tests check what a job logged.

wandb 0.31 reads .wandb files only in its Go core, so the run file is read here with its LevelDB-log framing.
wandb-core writes that file in 32 KiB blocks and flushes the last, partial one when it closes the run's stream, which
can be after ``run.finish()`` returns: readers wait for the run's exit record, which is logged after everything else."""

from __future__ import annotations

import struct
import time
from pathlib import Path

from wandb.proto.wandb_internal_pb2 import Record

BLOCK, HEADER, FIRST, MIDDLE = 32768, 7, 2, 3  # LevelDB log: 32 KiB blocks, 7-byte chunk header (crc, length, type)


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
        if kind not in (FIRST, MIDDLE):  # a full record or the last chunk of one
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


def run_file(job: Path) -> Path:
    """The job's one offline run file."""
    [path] = (job / "wandb").glob("offline-run-*/run-*.wandb")
    return path


def finished_run_bytes(job: Path) -> bytes:
    """The job's run file, complete."""
    path = run_file(job)
    finished_records(path)
    return path.read_bytes()
