"""The store's command line: ls, show, verify, gc, compute, and how it ends when its reader goes away."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sublim.store import Store
from sublim.store.cli import main
from sublim.store.lock import HOST
from tests.test_store import CODE, _dead_pid, _flip_byte, _make


def test_help_ls_show_and_bad_arguments(tmp_path: Path, capsys) -> None:
    proc = subprocess.run([sys.executable, "-m", "sublim.store", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "usage: python -m sublim.store" in proc.stdout and "gc" in proc.stdout
    art = _make(tmp_path)
    _make(tmp_path)
    assert main(["--root", str(tmp_path), "ls"]) == 0
    out = capsys.readouterr().out
    assert art.key in out and "REUSED" in out and out.splitlines()[1].split()[-2:] == ["1", "1"]
    assert main(["show", f"sample/{art.key}", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "sub/weights.bin" in out and '"hash": "0123456789abcdef"' in out and "torch" in out
    for argv in (["show", "sample"], ["show", "sample/nope"], ["rm", "../etc/x"], ["bogus"], ["ls", "nostage"]):
        with pytest.raises(SystemExit) as exit_:
            main(["--root", str(tmp_path), *argv])
        assert exit_.value.code == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("sublim.store: error: "), err


@pytest.mark.parametrize("command", [["sublim.store", "--root", "{root}", "ls"],
                                     ["sublim.lineage", "--store", "{root}", "sample/{key}"]])
def test_a_reader_that_stops_early_ends_the_listing_quietly(tmp_path: Path, command: list[str]) -> None:
    art = _make(tmp_path)  # `... | head`: the reader is gone before the output is written (Python ignores SIGPIPE)
    argv = [arg.format(root=tmp_path, key=art.key) for arg in command]
    proc = subprocess.Popen([sys.executable, "-m", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    assert proc.wait(timeout=60) == 141 and proc.stderr.read() == b""


def test_compute_skips_a_dir_deleted_while_it_walks(tmp_path: Path, monkeypatch, capsys) -> None:
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "results.json").write_text(json.dumps({"stages": {}}))
    gone = tmp_path / "job" / "wandb" / "tmp"  # W&B deletes it after the report's run ends
    gone.mkdir(parents=True)
    scandir = os.scandir

    def vanishing(path):
        if Path(path) == gone:
            raise FileNotFoundError(path)
        return scandir(path)

    monkeypatch.setattr(os, "scandir", vanishing)
    assert main(["--root", str(tmp_path), "compute", str(tmp_path / "job")]) == 0
    assert capsys.readouterr().out.startswith("1 results.json, 0 artifacts")


def test_verify_exit_codes(tmp_path: Path, capsys) -> None:
    art = _make(tmp_path)
    other = Store(tmp_path).get_or_compute("model", {}, {}, lambda out: (out / "w").write_text("w"), code=CODE)
    assert main(["--root", str(tmp_path), "verify"]) == 0
    assert "2 artifacts: 2 ok, 0 stale, 0 corrupted" in capsys.readouterr().out
    _flip_byte(art.path / "sub" / "weights.bin")
    assert main(["--root", str(tmp_path), "verify"]) == 1
    out = capsys.readouterr().out
    assert f"CORRUPTED  sample/{art.key}: sub/weights.bin's sha256 differs" in out
    assert f"ok         model/{other.key}" in out and f"rm sample/{art.key}" in out
    assert main(["--root", str(tmp_path), "verify", f"model/{other.key}"]) == 0


def test_gc_removes_dead_jobs_temp_dirs_and_locks_only(tmp_path: Path, capsys) -> None:
    store = Store(tmp_path)
    stage = tmp_path / "sample"
    dead, live = _dead_pid(), os.getpid()
    dirs = {name: stage / name for name in (f".tmp-aaaa-{HOST}-{dead}", f".tmp-bbbb-{HOST}-{live}",
                                            f".tmp-cccc-other-host-{live}", f".tmp-dddd-other-host-{live}")}
    for path in dirs.values():
        (path / "deep").mkdir(parents=True)
        (path / "deep" / "part").write_bytes(b"x" * 1000)
    old = time.time() - 2 * 86400
    for path in (dirs[f".tmp-dddd-other-host-{live}"], *dirs[f".tmp-dddd-other-host-{live}"].rglob("*")):
        os.utime(path, (old, old))
    locks = tmp_path / ".locks"
    locks.mkdir()
    for name, pid in (("dead", dead), ("live", live)):
        (locks / f"{name}.lock").write_text(json.dumps({"host": HOST, "pid": pid, "start": 0, "token": name}))
    assert main(["--root", str(store.root), "gc"]) == 0
    out = capsys.readouterr().out
    assert sorted(p.name for p in stage.iterdir()) == [f".tmp-bbbb-{HOST}-{live}", f".tmp-cccc-other-host-{live}"]
    assert sorted(p.name for p in locks.iterdir()) == ["live.lock"]
    assert "freed 2.0 KB" in out and f"{HOST}:{dead}" in out
