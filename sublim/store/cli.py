"""``python -m sublim.store``: list, inspect, verify and clean the artifact store.

A corrupted artifact's error message names ``rm`` here as the fix, and killed jobs leave temp dirs and
lock files that only ``gc`` can tell from a running job's (by host and pid), so these commands exist
instead of asking people to ``rm -rf`` inside a store that other jobs are using.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

from sublim import SublimError, quiet_on_closed_pipe
from sublim.store import LINEAGE, LOCKS, Store, check_files, default_root, tmp_name
from sublim.store.lock import HOST, LOCK_TIMEOUT, lock_owner, pid_alive, take_over
from sublim.store.provenance import job_provenance, read_provenance, write_provenance

TMP_MAX_AGE = 86400.0  # another host's temp dir this old is abandoned (its pid cannot be checked from here)


class _Parser(argparse.ArgumentParser):
    """Bad arguments: one line and exit 2, not a usage dump (``--help`` still prints it)."""

    def error(self, message: str) -> NoReturn:
        _fail(message)


def _fail(message: str) -> NoReturn:
    print(f"sublim.store: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _parser() -> _Parser:
    root_help = "the store (default: $SUBLIM_ROOT/outputs/store, or ./outputs/store)"
    common = _Parser(add_help=False)
    common.add_argument("--root", default=argparse.SUPPRESS, help=root_help)
    parser = _Parser(prog="python -m sublim.store", description="List, inspect, verify and clean the artifact store.")
    parser.add_argument("--root", default=None, help=root_help)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cmd = commands.add_parser("ls", parents=[common], help="list artifacts: key, size, created, reuses, code version")
    cmd.add_argument("stage", nargs="?", help="only this stage")
    cmd = commands.add_parser("show", parents=[common], help="an artifact's lineage: config, code, upstream, files")
    cmd.add_argument("artifact", metavar="STAGE/KEY")
    cmd = commands.add_parser("verify", parents=[common], help="check every file's sha256 (exit 1 if corrupted)")
    cmd.add_argument("artifacts", nargs="*", metavar="STAGE/KEY", help="default: every artifact")
    cmd = commands.add_parser("rm", parents=[common], help="remove artifacts (recomputed by the next run)")
    cmd.add_argument("artifacts", nargs="+", metavar="STAGE/KEY")
    commands.add_parser("gc", parents=[common], help="remove temp dirs and lock files of dead jobs")
    cmd = commands.add_parser("compute", parents=[common],
                              help="the compute time of every artifact some jobs used, and of its upstream, per stage")
    cmd.add_argument("jobs", nargs="+", type=Path, metavar="DIR", help="job or sweep dirs (their results.json files)")
    cmd = commands.add_parser("provenance", parents=[common],
                              help="write provenance.json beside each results.json that lacks it (older jobs)")
    cmd.add_argument("jobs", nargs="+", type=Path, metavar="DIR", help="job or sweep dirs (their results.json files)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    root = Path(args.root) if args.root else default_root()
    if not root.is_dir():
        _fail(f"no artifact store at {root} (pass --root DIR or set SUBLIM_ROOT)")
    store = Store(root)
    try:
        with quiet_on_closed_pipe():
            return {"ls": _ls, "show": _show, "verify": _verify, "rm": _rm, "gc": _gc,
                    "compute": _compute, "provenance": _provenance}[args.command](store, args)
    except SublimError as err:
        print(f"sublim.store: {err}", file=sys.stderr)
        return 1


# --- commands --------------------------------------------------------------------------------------

def _ls(store: Store, args: argparse.Namespace) -> int:
    if args.stage and not (store.root / args.stage).is_dir():
        _fail(f"no stage {args.stage!r} in {store.root}")
    reuses = Counter((e.get("stage"), e.get("key")) for e in store.events() if e.get("event") == "reused")
    rows = [("STAGE", "KEY", "SIZE", "CREATED", "REUSED", "CODE")]
    for stage, key in _artifacts(store, args.stage):
        lineage = _lineage(store, stage, key)
        code = lineage.get("code") or {}
        rows.append((stage, key, _bytes(_size(store.path(stage, key), lineage)), lineage.get("created", "?"),
                     str(reuses[stage, key]), str(code.get("version", "-"))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def _show(store: Store, args: argparse.Namespace) -> int:
    stage, key = _ref(store, args.artifact)
    lineage = _lineage(store, stage, key)
    path = store.path(stage, key)
    print(f"{stage}/{key}  {path}")
    print(f"created  {lineage.get('created', '?')} on {lineage.get('host', '?')} "
          f"in {lineage.get('seconds', '?')} s, layout {lineage.get('layout', 1)}")
    print(f"code     {json.dumps(lineage.get('code'))}")
    env = lineage.get("env") or {}
    print("env      " + (", ".join(f"{name} {value}" for name, value in env.items()) if env else "(not recorded)"))
    print("config\n  " + json.dumps(lineage.get("config"), indent=2, sort_keys=True, default=str).replace("\n", "\n  "))
    print("upstream" + ("" if lineage.get("upstream") else "  (none)"))
    for line in _chain(lineage.get("upstream") or {}, "  "):
        print(line)
    files = lineage.get("files")
    if files is None:
        print("files    (not recorded: written before file records; the next run recomputes it)")
        return 0
    print(f"files    {len(files)}, {_bytes(sum(f['size'] for f in files.values()))}")
    for rel, record in sorted(files.items()):
        print(f"  {rel}  {_bytes(record['size'])}  sha256 {record['sha256'][:16]}")
    return 0


def _chain(upstream: dict, indent: str) -> Iterator[str]:
    for name, lineage in sorted(upstream.items()):
        code = (lineage.get("code") or {}).get("version", "-")
        yield f"{indent}{name}: {lineage.get('stage')}/{lineage.get('key')}  created {lineage.get('created', '?')}" \
              f"  code v{code}"
        yield from _chain(lineage.get("upstream") or {}, indent + "  ")


def _verify(store: Store, args: argparse.Namespace) -> int:
    refs = [_ref(store, ref) for ref in args.artifacts] or list(_artifacts(store))
    corrupted, stale = [], 0
    for stage, key in refs:
        try:
            lineage = json.loads((store.path(stage, key) / LINEAGE).read_text())
        except ValueError as err:
            lineage = {"files": {}}
            problem: str | None = f"{LINEAGE} is unreadable ({err})"
        else:
            if "files" not in lineage:
                stale += 1
                print(f"stale      {stage}/{key}: written before file records (the next run recomputes it)")
                continue
            problem = check_files(store.path(stage, key), lineage["files"], full=True, fresh=True)
        if problem:
            corrupted.append((stage, key, problem))
            print(f"CORRUPTED  {stage}/{key}: {problem}")
        else:
            print(f"ok         {stage}/{key}")
    print(f"{len(refs)} artifacts: {len(refs) - len(corrupted) - stale} ok, {stale} stale, {len(corrupted)} corrupted")
    if corrupted:
        print("remove the corrupted ones and rerun to recompute them:\n  python -m sublim.store"
              + ("" if store.root == default_root().resolve() else f" --root {store.root}")
              + " rm " + " ".join(f"{stage}/{key}" for stage, key, _ in corrupted))
        return 1
    return 0


def _rm(store: Store, args: argparse.Namespace) -> int:
    refs = [_ref(store, ref) for ref in args.artifacts]  # all checked before anything is removed
    total = 0
    for stage, key in refs:
        path = store.path(stage, key)
        size = _tree_size(path)
        doomed = path.parent / tmp_name(key)  # renamed first: no reader sees half a directory; gc ends a cut rm
        os.rename(path, doomed)
        shutil.rmtree(doomed)
        total += size
        print(f"removed {stage}/{key} ({_bytes(size)})")
    print(f"freed {_bytes(total)}")
    return 0


def _gc(store: Store, args: argparse.Namespace) -> int:
    total, now = 0, time.time()
    for stage_dir in sorted(p for p in store.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for tmp in sorted(stage_dir.glob(".tmp-*")):
            _, host, pid = parse_tmp(tmp.name)
            dead = host == HOST and pid is not None and not pid_alive(pid)
            if dead or now - _newest_mtime(tmp) > TMP_MAX_AGE:
                size = _tree_size(tmp)
                shutil.rmtree(tmp, ignore_errors=True)
                total += size
                print(f"removed {tmp.relative_to(store.root)} ({_bytes(size)}, {'dead job' if dead else 'abandoned'})")
    locks = store.root / LOCKS
    for lock in sorted(locks.glob("*.lock")) if locks.is_dir() else []:
        content = _read(lock)
        if content is not None and lock_is_dead(lock, LOCK_TIMEOUT) and take_over(lock, content):
            owner = lock_owner(content) or {}
            print(f"removed {lock.relative_to(store.root)} (held by {owner.get('host', '?')}:{owner.get('pid', '?')})")
    for aside in sorted(locks.glob("*.stale-*")) if locks.is_dir() else []:  # left by a waiter killed mid-takeover
        if now - aside.stat().st_mtime > 60:
            aside.unlink(missing_ok=True)
    print(f"freed {_bytes(total)}")
    return 0


# --- helpers ---------------------------------------------------------------------------------------

def _results(jobs: list[Path]) -> list[Path]:
    """os.walk, not Path.glob: a W&B run dir that its background process deletes mid-walk is skipped, not fatal."""
    found = sorted({(Path(top) / "results.json").resolve() for job in jobs for top, _, files in os.walk(job)
                    if "results.json" in files})
    if not found:
        _fail(f"no results.json under {', '.join(map(str, jobs))}: pass job or sweep dirs")
    return found


def _compute(store: Store, args: argparse.Namespace) -> int:
    """Each artifact counts once (however many jobs reused it), with the seconds its lineage recorded when it was
    computed: what the whole study cost, not what each rerun took. A job's provenance.json stands in for the
    store, so a study run over several sittings sums after their stores are gone."""
    found = _results(args.jobs)
    artifacts: dict[str, dict] = {}
    unknown = 0
    for path in found:
        provenance = read_provenance(path.parent)
        if provenance is None:
            provenance, missing = job_provenance(json.loads(path.read_text()), store)
            unknown += len(missing)
        artifacts |= provenance["artifacts"]
    per_stage: dict[str, list[float]] = {}
    for ref, record in artifacts.items():
        per_stage.setdefault(ref.split("/")[0], []).append(float(record.get("seconds") or 0.0))
    total = [value for values in per_stage.values() for value in values]
    print(f"{len(found)} results.json, {len(artifacts)} artifacts"
          + (f" ({unknown} neither in the store nor in a provenance.json: not counted)" if unknown else ""))
    for stage, values in sorted(per_stage.items(), key=lambda item: -sum(item[1])):
        print(f"  {stage:<12} {len(values):>5}  {_duration(sum(values))}")
    print(f"  {'total':<12} {len(total):>5}  {_duration(sum(total))}")
    return 0


def _provenance(store: Store, args: argparse.Namespace) -> int:
    written = 0
    for path in _results(args.jobs):
        if read_provenance(path.parent) is None:
            print(f"wrote {write_provenance(path.parent, json.loads(path.read_text()), store)}")
            written += 1
    print(f"{written} provenance.json written")
    return 0


def _duration(seconds: float) -> str:
    return f"{int(seconds // 3600)}h {int(seconds % 3600 // 60):02d}m {seconds % 60:04.1f}s"


def parse_tmp(name: str) -> tuple[str, str | None, int | None]:
    """(key, host, pid) of a temp dir name; host None for the older ``.tmp-<key>-<pid>`` form."""
    key, _, rest = name.removeprefix(".tmp-").partition("-")
    host, _, pid = rest.rpartition("-")
    return key, host or None, int(pid) if pid.isdigit() else None


def lock_is_dead(path: Path, timeout: float) -> bool:
    """Owned by a dead process of this host, or no heartbeat for ``timeout`` (by this host's clock)."""
    content = _read(path)
    try:
        age = time.time() - path.stat().st_mtime
    except OSError:
        return False
    owner = lock_owner(content)
    if owner and owner.get("host") == HOST and not pid_alive(owner.get("pid")):
        return True
    return age > timeout


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _artifacts(store: Store, only: str | None = None) -> Iterator[tuple[str, str]]:
    """(stage, key) of every finished artifact; other dirs in the root (assembled wheels) are skipped."""
    stages = [store.root / only] if only else sorted(store.root.iterdir())
    for stage_dir in stages:
        if stage_dir.is_dir() and not stage_dir.name.startswith("."):
            for path in sorted(stage_dir.iterdir()):
                if not path.name.startswith(".") and (path / LINEAGE).is_file():
                    yield stage_dir.name, path.name


def _ref(store: Store, ref: str) -> tuple[str, str]:
    """STAGE/KEY (or the artifact's path) to (stage, key); anything else exits 2."""
    path = Path(ref)
    if path.is_absolute() or ref.startswith("."):
        try:
            path = path.resolve().relative_to(store.root)
        except ValueError:
            _fail(f"{ref} is not inside the store {store.root}")
    parts = path.parts
    if len(parts) != 2 or any(part.startswith(".") for part in parts):
        _fail(f"{ref!r} is not STAGE/KEY (e.g. sample/0123456789abcdef)")
    if not (store.path(*parts) / LINEAGE).is_file():
        _fail(f"no artifact {parts[0]}/{parts[1]} in {store.root}")
    return parts[0], parts[1]


def _lineage(store: Store, stage: str, key: str) -> dict:
    try:
        return store.lineage(stage, key)
    except SublimError:
        return {}


def _size(path: Path, lineage: dict) -> int:
    files = lineage.get("files")
    return sum(f["size"] for f in files.values()) if files is not None else _tree_size(path)


def _tree_size(path: Path) -> int:
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file())


def _newest_mtime(path: Path) -> float:
    """A temp dir's age is its newest file's: a long compute writes deep inside it, not to the dir itself."""
    return max([path.stat().st_mtime, *(p.lstat().st_mtime for p in path.rglob("*"))])


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


if __name__ == "__main__":
    sys.exit(main())
