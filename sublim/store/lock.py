"""Locks that hold across processes and hosts on shared filesystems (NFS, Lustre), where flock may not.

A lock is a file created with ``O_CREAT|O_EXCL`` that records host, pid and start time, kept fresh by a
heartbeat; a waiter takes over from a dead owner. The store takes one per key it computes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOCK_TIMEOUT = 120.0  # seconds without a heartbeat after which another host's lock is taken over
HEARTBEAT = 10.0
HOST = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "localhost"


def pid_alive(pid: Any) -> bool:
    """Whether a process of this host is running (a zombie, killed but not reaped, counts as dead)."""
    if not isinstance(pid, int) or pid <= 0:
        return True  # not a pid we can check: leave it to the heartbeat timeout
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def lock_owner(content: bytes | None) -> dict | None:
    try:
        owner = json.loads(content or b"")
        return owner if isinstance(owner, dict) else None
    except ValueError:
        return None  # being written right now, or a lock file of the older flock layout


def take_over(path: Path, seen: bytes) -> bool:
    """Move a dead lock aside atomically (only one waiter wins); put back a live one that replaced it."""
    aside = path.with_name(f"{path.name}.stale-{HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    try:
        if aside.read_bytes() != seen:  # a new owner took it between our read and the rename
            try:
                os.link(aside, path)
            except OSError:
                pass
            return False
        return True
    finally:
        aside.unlink(missing_ok=True)


class FileLock:
    """An exclusive lock file created with O_EXCL, which NFS and Lustre honour where flock may not.

    The file records host, pid and start time; a heartbeat thread touches it every ``heartbeat`` seconds.
    A waiter takes over at once from a dead process of its own host, and from any owner whose heartbeat
    (the file's mtime) has not moved for ``timeout`` seconds of the waiter's clock, so clock skew between
    hosts does not matter.
    """

    def __init__(self, path: Path, label: str, timeout: float = LOCK_TIMEOUT, heartbeat: float = HEARTBEAT):
        self.path, self.label, self.timeout, self.heartbeat = path, label, timeout, heartbeat
        self.content = json.dumps({"host": HOST, "pid": os.getpid(), "start": time.time(),
                                   "token": uuid.uuid4().hex, "label": label}).encode()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> FileLock:
        return self if self._thread else self.acquire()

    def acquire(self) -> FileLock:
        """Wait for the lock (taking over a dead owner's), then start the heartbeat."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        poll, waiting, seen, since = min(1.0, max(0.02, self.timeout / 20)), False, None, 0.0
        while not self._create():
            try:
                content, mtime = self.path.read_bytes(), self.path.stat().st_mtime_ns
            except FileNotFoundError:
                continue  # released between our attempts
            owner = lock_owner(content) or {}
            if (content, mtime) != seen:
                seen, since = (content, mtime), time.monotonic()
            dead = owner.get("host") == HOST and not pid_alive(owner.get("pid"))
            dead = dead or (not owner and time.time() - mtime / 1e9 > self.timeout)  # never written / flock era
            if dead or time.monotonic() - since > self.timeout:
                if take_over(self.path, content):
                    log.warning("took over the lock on %s from %s:%s (%s)", self.label, owner.get("host", "?"),
                                owner.get("pid", "?"), "dead" if dead else f"no heartbeat for {self.timeout:.0f}s")
                continue
            if not waiting:
                log.info("waiting for %s held by %s:%s", self.label, owner.get("host", "?"), owner.get("pid", "?"))
                waiting = True
            time.sleep(poll)
        self._thread = threading.Thread(target=self._beat, name=f"lock {self.label}", daemon=True)
        self._thread.start()
        return self

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as handle:
            handle.write(self.content)
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                if self.path.read_bytes() != self.content:
                    raise FileNotFoundError
                os.utime(self.path)
            except FileNotFoundError:
                log.warning("lost the lock on %s (taken over as stale); another job may compute it too", self.label)
                return
            except OSError as err:
                log.warning("cannot refresh the lock on %s: %s", self.label, err)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
            self._thread = None
        try:
            if self.path.read_bytes() == self.content:
                self.path.unlink()
        except FileNotFoundError:
            pass


# --- files -----------------------------------------------------------------------------------------
