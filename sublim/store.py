"""Content-addressed stage artifacts.

Every stage writes one directory ``<root>/<stage>/<key>/`` where the key hashes the stage name, the
config fields the stage reads, the keys of its upstream artifacts and a schema version. An existing
key is reused, so rerunning a killed sweep resumes and sweeps share stages that do not depend on the
swept field. Work happens in a temporary directory that is renamed into place under a lock, so
concurrent jobs never compute one key twice or read a half-written artifact.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
LINEAGE = "lineage.json"


def content_hash(obj: Any, length: int = 16) -> str:
    """Stable hash of a JSON-serialisable object (key order does not matter)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def file_hash(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes: lineage reaches down to the exact model file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Artifact:
    """A finished stage output on disk."""

    stage: str
    key: str
    path: Path
    reused: bool

    @property
    def lineage(self) -> dict:
        return json.loads((self.path / LINEAGE).read_text())

    def read_json(self, name: str) -> Any:
        return json.loads((self.path / name).read_text())


class Store:
    """The artifact store under ``root`` (usually ``outputs/store``)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def key(self, stage: str, config: dict, upstream: dict[str, Artifact]) -> str:
        return content_hash(
            {
                "stage": stage,
                "schema": SCHEMA_VERSION,
                "config": config,
                "upstream": {name: art.key for name, art in sorted(upstream.items())},
            }
        )

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def get_or_compute(
        self,
        stage: str,
        config: dict,
        upstream: dict[str, Artifact],
        compute: Callable[[Path], None],
    ) -> Artifact:
        """Return the artifact for (stage, config, upstream), computing it into a temp dir if absent."""
        key = self.key(stage, config, upstream)
        final = self.path(stage, key)
        if (final / LINEAGE).exists():
            return self._reused(stage, key, final)
        final.parent.mkdir(parents=True, exist_ok=True)
        with _locked(self.root / ".locks" / f"{stage}-{key}.lock"):
            if (final / LINEAGE).exists():  # another job finished it while we waited
                return self._reused(stage, key, final)
            tmp = final.parent / f".tmp-{key}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            start = time.time()
            try:
                compute(tmp)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            lineage = {
                "stage": stage,
                "key": key,
                "schema": SCHEMA_VERSION,
                "config": config,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "seconds": round(time.time() - start, 2),
                "upstream": {name: art.lineage for name, art in sorted(upstream.items())},
            }
            (tmp / LINEAGE).write_text(json.dumps(lineage, indent=2, default=str))
            shutil.rmtree(final, ignore_errors=True)  # a stray dir without lineage is unfinished work
            os.rename(tmp, final)
        self._event(stage, key, "computed", lineage["seconds"])
        log.info("stage %-9s computed %s in %.1fs", stage, key, lineage["seconds"])
        return Artifact(stage, key, final, reused=False)

    def _reused(self, stage: str, key: str, path: Path) -> Artifact:
        self._event(stage, key, "reused", 0.0)
        log.info("stage %-9s reused   %s", stage, key)
        return Artifact(stage, key, path, reused=True)

    def _event(self, stage: str, key: str, event: str, seconds: float) -> None:
        """Append to events.jsonl: an audit trail of what each job computed or reused."""
        record = {"time": time.time(), "pid": os.getpid(), "stage": stage, "key": key, "event": event,
                  "seconds": seconds}
        with open(self.root / "events.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def events(self) -> list[dict]:
        path = self.root / "events.jsonl"
        return list(read_jsonl(path)) if path.exists() else []


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> Iterator[dict]:
    with open(path) as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, default=str))
