"""One process at a time in an output folder.

A run or a study creates ``<out_dir>/.lock`` (exclusively, ``O_CREAT | O_EXCL``) holding its pid,
host and start time, and removes it when it ends, whatever the reason. A second process that
finds the file refuses at once and names the holder. A lock whose process is gone (same host, pid
not running: the holder was killed) is stale: it is replaced, and the run says so.
"""

from __future__ import annotations

import json
import os
import socket
from datetime import datetime
from pathlib import Path

LOCK_NAME = ".lock"


class FolderLocked(FileExistsError):
    """Another live process holds the output folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class FolderLock:
    """``with FolderLock(out_dir, "fastpe train"):`` holds ``out_dir`` for this process."""

    def __init__(self, folder: str | Path, what: str = "fastpe"):
        self.path = Path(folder) / LOCK_NAME
        self.what = what
        self.note = ""  # set when a stale lock was replaced
        self.held = False

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "what": self.what,
                       "started": datetime.now().astimezone().isoformat(timespec="seconds")}, handle)
        return True

    def acquire(self) -> "FolderLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            if self._create():
                self.held = True
                return self
            holder = self._holder()
            pid, host = holder.get("pid"), holder.get("host")
            same_host = host == socket.gethostname()
            if isinstance(pid, int) and same_host and not _alive(pid):
                self.note = (f"replaced the stale lock of {holder.get('what', 'a run')} (pid {pid}, started "
                             f"{holder.get('started', '?')}), which is no longer running")
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
                continue  # another process may win the race to recreate it: then it holds the folder
            where = f"pid {pid}" + ("" if same_host or host is None else f" on {host}")
            raise FolderLocked(f"{self.path.parent} is in use by {holder.get('what', 'another run')} ({where}, "
                               f"started {holder.get('started', '?')}); wait for it, or use another --out-dir. If "
                               f"that process is gone, delete {self.path}")
        raise FolderLocked(f"{self.path.parent} was locked by another process at the same moment; use another "
                           "--out-dir")

    def release(self) -> None:
        if self.held:
            self.held = False
            try:
                if self._holder().get("pid") == os.getpid():
                    self.path.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
