"""The artifact store: verified reuse, lineage, cross-process/host locks, read-only reuse (CLI: test_store_cli.py)."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

import sublim.store as store_mod
from sublim import SublimError
from sublim.store import LINEAGE, Store, read_jsonl, write_jsonl
from sublim.store.cli import main
from sublim.store.lock import HOST, FileLock

ROWS = [{"i": i, "text": f"row {i} " + "x" * 20} for i in range(24)]
CODE = {"version": 1, "hash": "0123456789abcdef"}


def _write_rows(out: Path) -> None:
    write_jsonl(out / "rows.jsonl", ROWS)
    (out / "sub").mkdir()
    (out / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 4)


def _make(root: Path, **kwargs: object):
    return Store(root, **kwargs).get_or_compute("sample", {"n": 24}, {}, _write_rows, code=CODE)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --- keys and lineage ------------------------------------------------------------------------------

def test_code_changes_the_key_and_lineage_records_files_env_code(tmp_path: Path) -> None:
    store = Store(tmp_path)
    keys = {store.key("s", {"a": 1}, {}, code=code) for code in
            (None, CODE, {**CODE, "version": 2}, {**CODE, "hash": "fedcba9876543210"})}
    assert len(keys) == 4
    art = _make(tmp_path)
    assert art.key == store.key("sample", {"n": 24}, {}, code=CODE) and not art.reused
    lineage = art.lineage
    assert lineage["code"] == CODE and lineage["layout"] == store_mod.LAYOUT_VERSION
    assert set(lineage["files"]) == {"rows.jsonl", "sub/weights.bin"}
    weights = art.path / "sub" / "weights.bin"
    assert lineage["files"]["sub/weights.bin"] == {"size": 1024, "sha256": store_mod.file_hash(weights)}
    env = lineage["env"]
    packages = {"sublim", "python", "torch", "transformers", "peft", "pytorch_lightning"}
    assert packages | {"git_commit", "git_dirty"} <= set(env)
    assert env["sublim"] and env["torch"] and env["python"].count(".") == 2
    child = store.get_or_compute("filter", {}, {"data": art}, lambda out: (out / "k").write_text("k"), code=CODE)
    assert child.lineage["upstream"]["data"]["key"] == art.key
    again = _make(tmp_path)
    assert again.reused and again.path == art.path
    assert [e["event"] for e in store.events()] == ["computed", "computed", "reused"]


def test_artifacts_without_file_records_are_recomputed(tmp_path: Path) -> None:
    store = Store(tmp_path)
    old = store.path("sample", store.key("sample", {"n": 24}, {}, code=CODE))
    old.mkdir(parents=True)
    (old / LINEAGE).write_text(json.dumps({"stage": "sample", "schema": 1}))
    art = _make(tmp_path)
    assert not art.reused and "files" in art.lineage and (art.path / "rows.jsonl").exists()


# --- corruption ------------------------------------------------------------------------------------

def _truncate_lines(path: Path) -> None:
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:10]))


def _cut_mid_line(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: data.index(b"\n", len(data) // 2) - 7])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[100] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, problem", [
    (_truncate_lines, r"rows\.jsonl is \d+ bytes, lineage\.json says \d+"),
    (_cut_mid_line, r"rows\.jsonl is \d+ bytes, lineage\.json says \d+"),
    (_flip_byte, r"rows\.jsonl's sha256 differs from lineage\.json's"),
])
def test_a_damaged_artifact_is_refused_with_the_rm_command(tmp_path: Path, damage, problem: str) -> None:
    art = _make(tmp_path)
    damage(art.path / "rows.jsonl")
    ref = f"sample/{art.key}"
    with pytest.raises(SublimError) as err:
        _make(tmp_path)
    message = str(err.value)
    assert message.startswith(f"stored artifact {ref} is corrupted: ")
    assert re.search(problem, message), message
    assert message.endswith(f"Remove it and rerun to recompute: python -m sublim.store --root {tmp_path} rm {ref}")
    assert main(["--root", str(tmp_path), "rm", ref]) == 0
    assert not _make(tmp_path).reused


def test_large_artifacts_check_sizes_always_and_hashes_with_verify(tmp_path: Path, monkeypatch) -> None:
    art = _make(tmp_path)
    monkeypatch.setattr(store_mod, "VERIFY_BELOW", 1000)  # the artifact (~1.7 KB) now counts as large
    _flip_byte(art.path / "rows.jsonl")
    assert _make(tmp_path).reused, "sizes match: a large artifact is not hashed on every reuse"
    with pytest.raises(SublimError, match="sha256 differs"):
        _make(tmp_path, verify=True)
    (art.path / "sub" / "weights.bin").unlink()
    with pytest.raises(SublimError, match="sub/weights.bin is missing"):
        _make(tmp_path)


def test_read_jsonl_names_the_file_and_line_of_a_cut_file(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, ROWS)
    _cut_mid_line(path)
    with pytest.raises(SublimError, match=rf"{path} line 13 is not valid JSON"):
        list(read_jsonl(path))
    assert len(list(read_jsonl(path, skip_bad=True))) == 12
    store = Store(tmp_path)
    _make(tmp_path)
    with open(tmp_path / "events.jsonl", "a") as handle:
        handle.write('{"time": 1, "sta')  # a job killed mid-append
    assert len(store.events()) == 1


# --- CLI -------------------------------------------------------------------------------------------

# --- locks -----------------------------------------------------------------------------------------

def _compute_once(root: str, marker: str, start) -> None:
    """A spawned job: both wait on ``start`` so that they race for the same key."""
    start.wait()

    def compute(out: Path) -> None:
        with open(marker, "a") as handle:
            handle.write(f"{os.getpid()}\n")
        time.sleep(1.0)
        _write_rows(out)

    Store(root, heartbeat=0.2).get_or_compute("sample", {"n": 24}, {}, compute, code=CODE)


def test_two_processes_compute_a_key_once(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    marker = tmp_path / "computed"
    jobs = [ctx.Process(target=_compute_once, args=(str(tmp_path), str(marker), start)) for _ in range(2)]
    for job in jobs:
        job.start()
    time.sleep(0.5)
    start.set()
    for job in jobs:
        job.join(60)
    assert [job.exitcode for job in jobs] == [0, 0]
    assert len(marker.read_text().split()) == 1
    assert sorted(e["event"] for e in Store(tmp_path).events()) == ["computed", "reused"]
    assert not list((tmp_path / ".locks").iterdir()) and not list((tmp_path / "sample").glob(".tmp-*"))


def _lock_path(store: Store) -> Path:
    key = store.key("sample", {"n": 24}, {}, code=CODE)
    return store.root / ".locks" / f"sample-{key}.lock"


def test_a_dead_processes_lock_is_taken_over_at_once(tmp_path: Path) -> None:
    store = Store(tmp_path)  # default 120 s timeout: only the dead pid can make this fast
    lock = _lock_path(store)
    lock.parent.mkdir()
    lock.write_text(json.dumps({"host": HOST, "pid": _dead_pid(), "start": time.time(), "token": "t"}))
    start = time.time()
    assert not _make(tmp_path).reused
    assert time.time() - start < 5 and not lock.exists()


def test_another_hosts_lock_blocks_while_its_heartbeat_is_fresh(tmp_path: Path, caplog) -> None:
    store = Store(tmp_path, lock_timeout=1.0)
    lock = _lock_path(store)
    lock.parent.mkdir()
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 4242, "start": time.time(), "token": "t"}))
    stop = threading.Event()

    def heartbeat() -> None:  # the other host is alive for 1.5 s, then dies
        deadline = time.time() + 1.5
        while time.time() < deadline and not stop.wait(0.1):
            os.utime(lock)

    beat = threading.Thread(target=heartbeat)
    beat.start()
    start = time.time()
    with caplog.at_level(logging.INFO, logger="sublim.store.lock"):
        art = store.get_or_compute("sample", {"n": 24}, {}, _write_rows, code=CODE)
    stop.set()
    beat.join()
    assert not art.reused and time.time() - start >= 2.4
    waits = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting for")]
    assert waits == [f"waiting for sample/{art.key} held by elsewhere:4242"]
    assert any("took over the lock" in r.getMessage() for r in caplog.records)


def test_the_heartbeat_keeps_a_slow_holders_lock(tmp_path: Path) -> None:
    """Same pid (alive): only a missed heartbeat could let the second thread in."""
    calls: list[int] = []

    def slow(out: Path) -> None:
        calls.append(1)
        time.sleep(1.5)
        _write_rows(out)

    def job() -> None:
        Store(tmp_path, lock_timeout=0.5, heartbeat=0.1).get_or_compute("sample", {"n": 24}, {}, slow, code=CODE)

    threads = [threading.Thread(target=job) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1


def test_a_job_whose_lock_was_taken_over_keeps_the_winners_copy(tmp_path: Path) -> None:
    winner = _make(tmp_path)
    loser = winner.path.parent / "loser"
    loser.mkdir()
    (loser / "rows.jsonl").write_text("other")
    Store._install(loser, winner.path)
    assert not loser.exists() and _make(tmp_path).reused
    assert (winner.path / "rows.jsonl").read_text().count("\n") == 24


def test_a_lock_is_released_and_not_stolen_back(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    with FileLock(path, "x", timeout=5, heartbeat=0.05) as lock:
        time.sleep(0.2)
        assert path.read_bytes() == lock.content
    assert not path.exists()


# --- read-only stores ------------------------------------------------------------------------------

READ_ONLY_JOB = """
import json, logging, os, sys
from pathlib import Path
from sublim import SublimError
from sublim.store import Store
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
if os.geteuid() == 0:  # root ignores permissions: become nobody (everything is imported already)
    os.setgid(65534)
    os.setuid(65534)
root = Path(sys.argv[1])
def recompute(out):
    raise AssertionError("recomputed in a read-only store")
store = Store(root)
arts = [store.get_or_compute("sample", {"n": 24}, {}, recompute, code=json.loads(sys.argv[2])) for _ in range(2)]
try:
    store.get_or_compute("sample", {"n": 25}, {}, recompute)
    missing = "computed"
except SublimError as err:
    missing = str(err)
rows = (arts[0].path / "rows.jsonl").read_text().count("\\n")
print(json.dumps({"missing": missing, "reused": [a.reused for a in arts], "rows": rows,
                  "writable": os.access(root, os.W_OK)}))
"""


def test_a_read_only_store_serves_cached_jobs() -> None:
    root = Path(tempfile.mkdtemp(prefix="sublim-ro-"))  # not under pytest's tmp dir: nobody must traverse it
    try:
        root.chmod(0o755)
        store = root / "store"
        art = _make(store)
        if os.geteuid() != 0:
            for path in [store, *store.rglob("*")]:
                path.chmod(path.stat().st_mode & ~0o222)
        proc = subprocess.run([sys.executable, "-c", READ_ONLY_JOB, str(store), json.dumps(CODE)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout)
        assert result.pop("missing").startswith("cannot compute sample/") and "is not writable" in proc.stdout
        assert result == {"reused": [True, True], "rows": 24, "writable": False}
        assert proc.stderr.count("cannot append to") == 1 and "Traceback" not in proc.stderr
        assert not list((store / ".locks").iterdir()) and len(Store(store).events()) == 1
        assert art.path.exists()
    finally:
        for path in [root, *root.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)
        shutil.rmtree(root)


# --- local checkpoints -----------------------------------------------------------------------------

def test_local_checkpoints_are_keyed_by_content_hashed_once(tmp_path: Path, monkeypatch) -> None:
    from omegaconf import OmegaConf

    from sublim.models import _check_reference

    ckpt = tmp_path / "ckpt"
    (ckpt / ".cache").mkdir(parents=True)
    (ckpt / "config.json").write_text("{}")
    (ckpt / "model.safetensors").write_bytes(b"a" * 4096)
    (ckpt / ".cache" / "meta").write_text("changes on every download")
    base = OmegaConf.create({"source": "local", "path": str(ckpt)})
    cache = tmp_path / "store"
    cache.mkdir()
    first = _check_reference(base, cache)
    assert first["path"] == str(ckpt.resolve()) and len(first["sha256"]) == 64
    assert len(json.loads((cache / ".hashes.json").read_text())) == 2

    def no_hashing(path: Path) -> str:
        raise AssertionError(f"{path} hashed again")

    monkeypatch.setattr(store_mod, "file_hash", no_hashing)
    (ckpt / ".cache" / "meta").write_text("different")
    assert _check_reference(base, cache) == first, "cached by (path, size, mtime); hidden metadata ignored"
    monkeypatch.undo()
    (ckpt / "model.safetensors").write_bytes(b"b" * 4096)  # retrained in place: same name, same size
    second = _check_reference(base, cache)
    assert second["sha256"] != first["sha256"]
    assert len(json.loads((cache / ".hashes.json").read_text())) == 2, "the old weights' entry is replaced"
    assert _check_reference(base) == second  # without a cache dir it still works


def test_an_event_after_a_cut_line_is_kept(tmp_path: Path) -> None:
    """A job killed mid-append leaves a cut line in events.jsonl: the next job's records must stay readable."""
    store = Store(tmp_path)
    store.get_or_compute("sample", {"n": 24}, {}, _write_rows, code=CODE)
    with open(tmp_path / "events.jsonl", "a") as handle:
        handle.write('{"time": 1, "stage": "sam')
    store.get_or_compute("sample", {"n": 24}, {}, _write_rows, code=CODE)
    assert [e["event"] for e in store.events()] == ["computed", "reused"]
