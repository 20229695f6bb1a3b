"""Content-addressed, verified stage artifacts.

Every stage writes one directory ``<root>/<stage>/<key>/`` where the key hashes the stage name, the
config fields the stage reads, the keys of its upstream artifacts and the stage's code (a version and a
source hash). An existing key is reused, so rerunning a killed sweep resumes and sweeps share stages
that do not depend on the swept field. Work happens in a temporary directory renamed into place under a
lock file that works across processes and hosts on shared filesystems, so concurrent jobs never compute
one key twice or read a half-written artifact.

``lineage.json`` records each file's size and sha256: a reused artifact is checked against it (sizes
always, hashes for small artifacts or with ``verify=True``), so a truncated or bit-flipped file fails with
the command that removes it instead of feeding garbage into hours of downstream work. It also records the
environment (sublim's git commit, torch/transformers/peft versions) so a surprising number can be traced.
A read-only store (a shared cache) serves reuse: reading takes no lock and event logging is best-effort.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

from sublim import SublimError
from sublim.store.lock import HEARTBEAT, HOST, LOCK_TIMEOUT, FileLock

log = logging.getLogger(__name__)

LAYOUT_VERSION = 2  # lineage/directory format; recorded, not keyed (the key hashes the stage's code instead)
LINEAGE = "lineage.json"
EVENTS = "events.jsonl"
HASHES = ".hashes.json"
LOCKS = ".locks"
VERIFY_BELOW = 64 << 20  # artifacts smaller than this get every sha256 checked on each reuse
ENV_PACKAGES = ("torch", "transformers", "peft", "pytorch_lightning")


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


def cached_file_hashes(paths: Iterable[Path], cache_dir: Path | None) -> dict[Path, str]:
    """sha256 of each file, remembered in ``<cache_dir>/.hashes.json`` by (path, size, mtime_ns).

    A 15 GB local checkpoint is then hashed once, not on every job; a read-only cache dir only costs
    the rehash.
    """
    cache_file = cache_dir / HASHES if cache_dir else None
    known = _load_json(cache_file) if cache_file else {}
    out, fresh = {}, {}
    for path in paths:
        real = Path(path).resolve()
        st = real.stat()
        entry = f"{real}|{st.st_size}|{st.st_mtime_ns}"
        out[Path(path)] = known.get(entry) or fresh.setdefault(entry, file_hash(real))
    if fresh and cache_file:
        renewed = {entry.rsplit("|", 2)[0] for entry in fresh}  # drop what these files hashed to before
        merged = {entry: digest for entry, digest in _load_json(cache_file).items()  # re-read: other jobs add too
                  if entry.rsplit("|", 2)[0] not in renewed} | fresh
        try:
            tmp = cache_file.with_name(f"{HASHES}.{HOST}-{os.getpid()}")
            tmp.write_text(json.dumps(merged, indent=0, sort_keys=True))
            os.replace(tmp, cache_file)
        except OSError as err:
            log.debug("cannot update %s (%s); the hashes are recomputed next time", cache_file, err)
    return out


def _load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


@cache
def environment() -> dict:
    """What can change a result without changing a key: recorded in lineage to trace a surprising number."""
    env: dict[str, Any] = {"sublim": _version("sublim"), "python": platform.python_version()}
    env |= {name: _version(name) for name in ENV_PACKAGES}
    return env | _git(Path(__file__).resolve().parent)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git(package: Path) -> dict:
    """The commit of the sublim checkout (None for an installed wheel) and whether sublim/ has edits."""

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(package), *args], capture_output=True, text=True, timeout=20,
                              check=True).stdout.strip()

    try:
        if git("ls-files", "--", "__init__.py"):  # else: some other repository that merely contains a venv
            return {"git_commit": git("rev-parse", "HEAD"),
                    "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no", "--", "."))}
    except (OSError, subprocess.SubprocessError):
        pass
    return {"git_commit": None, "git_dirty": None}


def default_root() -> Path:
    return Path(os.environ.get("SUBLIM_ROOT", ".")) / "outputs" / "store"


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
    """The artifact store under ``root`` (usually ``outputs/store``; config ``paths.store``).

    ``verify`` (config ``store.verify``) checks every file's sha256 on reuse even for large artifacts.
    ``lock_timeout``/``heartbeat`` tune how fast a crashed job's lock is taken over (tests shorten them).
    """

    def __init__(self, root: str | Path, verify: bool = False, *, lock_timeout: float = LOCK_TIMEOUT,
                 heartbeat: float = HEARTBEAT) -> None:
        self.root = Path(root).resolve()
        self.verify = verify
        self.lock_timeout = lock_timeout
        self.heartbeat = heartbeat
        self._events_warned = False
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            if not self.root.is_dir():
                raise SublimError(f"cannot create the artifact store at {self.root}: {err}") from None

    def key(self, stage: str, config: dict, upstream: dict[str, Artifact], code: dict | None = None) -> str:
        return content_hash(
            {
                "stage": stage,
                "code": code,
                "config": config,
                "upstream": {name: art.key for name, art in sorted(upstream.items())},
            }
        )

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def rm_command(self, stage: str, key: str) -> str:
        root = "" if self.root == default_root().resolve() else f" --root {self.root}"
        return f"python -m sublim.store{root} rm {stage}/{key}"

    def get_or_compute(
        self,
        stage: str,
        config: dict,
        upstream: dict[str, Artifact],
        compute: Callable[[Path], None],
        *,
        code: dict | None = None,
    ) -> Artifact:
        """Return the artifact for (stage, config, upstream, code), computing it into a temp dir if absent."""
        key = self.key(stage, config, upstream, code=code)
        final = self.path(stage, key)
        if self._ready(stage, key):  # reuse takes no lock: a read-only store serves cached jobs
            return self._reused(stage, key, final)
        lock = FileLock(self.root / LOCKS / f"{stage}-{key}.lock", f"{stage}/{key}", self.lock_timeout,
                        self.heartbeat)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            lock.acquire()
        except PermissionError as err:
            raise SublimError(f"cannot compute {stage}/{key}: the store {self.root} is not writable ({err}). "
                              "Run once where it is writable, or point paths.store elsewhere.") from None
        with lock:
            if self._ready(stage, key):  # another job finished it while we waited
                return self._reused(stage, key, final)
            tmp = final.parent / tmp_name(key)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            start = time.time()
            try:
                compute(tmp)
                lineage = {
                    "stage": stage,
                    "key": key,
                    "layout": LAYOUT_VERSION,
                    "code": code,
                    "config": config,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "seconds": round(time.time() - start, 2),
                    "host": HOST,
                    "env": environment(),
                    "files": file_records(tmp),
                    "upstream": {name: art.lineage for name, art in sorted(upstream.items())},
                }
                write_json(tmp / LINEAGE, lineage)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            self._install(tmp, final)
        self._event(stage, key, "computed", lineage["seconds"])
        log.info("stage %-9s computed %s in %.1fs", stage, key, lineage["seconds"])
        return Artifact(stage, key, final, reused=False)

    @staticmethod
    def _install(tmp: Path, final: Path) -> None:
        """Rename the finished temp dir into place, replacing unfinished work or an older layout's artifact.

        A finished current one there means our lock was taken over (a missed heartbeat) and the other job
        won: keep its copy, which readers may already hold, and drop ours.
        """
        if "files" not in _load_json(final / LINEAGE):
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if "files" not in _load_json(final / LINEAGE):
                raise
            shutil.rmtree(tmp, ignore_errors=True)

    def _ready(self, stage: str, key: str) -> bool:
        """Whether a finished, intact artifact exists; a corrupted one raises (recomputing would hide it)."""
        path = self.path(stage, key)
        if not (path / LINEAGE).exists():
            return False
        lineage = self.lineage(stage, key)
        if "files" not in lineage:
            log.info("stage %-9s %s predates file records; recomputing it", stage, key)
            return False
        problem = check_files(path, lineage["files"], full=self.verify)
        if problem:
            raise self.corrupted(stage, key, problem)
        return True

    def lineage(self, stage: str, key: str) -> dict:
        try:
            return json.loads((self.path(stage, key) / LINEAGE).read_text())
        except ValueError as err:
            raise self.corrupted(stage, key, f"{LINEAGE} is unreadable ({err})") from None

    def corrupted(self, stage: str, key: str, problem: str) -> SublimError:
        return SublimError(f"stored artifact {stage}/{key} is corrupted: {problem}. Remove it and rerun to "
                           f"recompute: {self.rm_command(stage, key)}")

    def _reused(self, stage: str, key: str, path: Path) -> Artifact:
        self._event(stage, key, "reused", 0.0)
        log.info("stage %-9s reused   %s", stage, key)
        return Artifact(stage, key, path, reused=True)

    def _event(self, stage: str, key: str, event: str, seconds: float) -> None:
        """Append to events.jsonl: an audit trail of what each job computed or reused (best-effort)."""
        record = {"time": time.time(), "host": HOST, "pid": os.getpid(), "stage": stage, "key": key,
                  "event": event, "seconds": seconds}
        line = (json.dumps(record) + "\n").encode()
        try:
            with open(self.root / EVENTS, "a+b") as handle:
                end = handle.seek(0, os.SEEK_END)
                if end:
                    handle.seek(end - 1)
                    if handle.read(1) != b"\n":  # a job killed mid-append left a cut line: do not glue onto it
                        line = b"\n" + line
                handle.write(line)  # append mode writes at the end wherever the handle was read
        except OSError as err:
            if not self._events_warned:
                log.warning("cannot append to %s (%s); not recording store events", self.root / EVENTS, err)
                self._events_warned = True

    def events(self) -> list[dict]:
        path = self.root / EVENTS
        return list(read_jsonl(path, skip_bad=True)) if path.exists() else []


def named_stages(results: dict) -> Iterator[tuple[int | None, int, str, dict]]:
    """(seed, generation, name, {key, reused}) of every stage a job's results.json names, over its seeds and
    generations (1 when the job has no chain)."""
    for seed in results.get("seeds") or [results]:
        for generation, entry in enumerate(seed.get("generations") or [seed], start=1):
            for name, stage in entry.get("stages", {}).items():
                yield seed.get("seed"), generation, name, stage


def result_stages(results: dict) -> list[tuple[str, str]]:
    """(stage, key) of every artifact a job's results.json names. Older results.json files record no stage: a
    name's stage is then its first part ("sample/treatment" -> sample; "teacher_model" is no stage dir)."""
    return [(entry.get("stage") or name.split("/")[0], entry["key"]) for _, _, name, entry in named_stages(results)]


def file_records(directory: Path) -> dict[str, dict]:
    """{relative path: {size, sha256}} of every file under ``directory`` except lineage.json."""
    records = {}
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory).as_posix()
        if rel != LINEAGE and path.is_file():
            records[rel] = {"size": path.stat().st_size, "sha256": file_hash(path)}
    return records


_verified: dict[Path, tuple] = {}  # artifact -> file stats whose sha256s this process has checked


def check_files(path: Path, files: dict[str, dict], full: bool, fresh: bool = False) -> str | None:
    """The first problem with an artifact's files, or None: sizes always, sha256s when small or ``full``.

    Hashes checked once stay trusted in this process while the files' stats are unchanged, unless ``fresh``.
    """
    stats = []
    for rel, record in sorted(files.items()):
        try:
            st = (path / rel).stat()
        except OSError:
            return f"{rel} is missing"
        if st.st_size != record["size"]:
            return f"{rel} is {st.st_size} bytes, {LINEAGE} says {record['size']}"
        stats.append((rel, st.st_size, st.st_mtime_ns, st.st_ino))
    if not full and sum(record["size"] for record in files.values()) >= VERIFY_BELOW:
        return None
    if not fresh and _verified.get(path) == tuple(stats):  # reused again in this process, unchanged since checked
        return None
    for rel, record in sorted(files.items()):
        if file_hash(path / rel) != record["sha256"]:
            return f"{rel}'s sha256 differs from {LINEAGE}'s"
    _verified[path] = tuple(stats)
    return None


def tmp_name(key: str) -> str:
    """A compute's temp dir: host and pid in the name so gc can tell a dead job's from a running one's."""
    return f".tmp-{key}-{HOST}-{os.getpid()}"


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: Path, skip_bad: bool = False) -> Iterator[dict]:
    """Rows of a JSON-lines file; a cut or corrupted line raises SublimError naming it (or is skipped)."""
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8"))
            except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
                if skip_bad:
                    continue
                raise SublimError(f"{path} line {number} is not valid JSON ({err}): the file is cut or "
                                  "corrupted; remove it (or the artifact holding it) and rerun") from None
            yield row


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, default=str))
