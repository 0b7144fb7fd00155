"""Exclusive locks on output folders: one writer per `--out` / `run_dir`.

Two processes writing one folder interleave or delete each other's temporary files. Every command that writes
a folder holds `output_lock(folder)` for its whole run:

    with output_lock(out):
        ...  # write

The lock is an `fcntl.flock` on `.<name>.radalign.lock` beside the folder (not inside it: folders replaced
atomically, and steps that remove stray files, would take a lock file inside with them), which also records the holder's pid, host and
command. `flock` locks die with their process, so a lock file left by a killed job (a "stale lock") is taken
over silently by the kernel's rules; we still log that a previous holder's record was found. A live holder
makes the second writer fail at once with an error naming the folder and the holder's pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from radalign import RadalignError
from radalign.log import get_logger

LOCK_SUFFIX = ".radalign.lock"

try:  # POSIX; on Windows the lock degrades to the pid record alone
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

_HELD: dict[str, int] = {}  # folder -> nesting depth in this process (re-entrant within one process)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_record(file: Path) -> dict:
    try:
        return json.loads(file.read_text() or "{}")
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike, *, what: str = "output folder") -> Iterator[Path]:
    """Hold an exclusive lock on `folder` (created if needed) for the duration of the block; yields `folder`.

    Raises RadalignError if another live process holds it. Re-entrant within one process (a command that
    locks its folder may call library code that locks the same folder).
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise RadalignError(f"{what} {folder} exists and is not a folder; choose another path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (OSError, FileExistsError) as e:
        raise RadalignError(f"{what} {folder}: cannot create it ({e}); choose a writable folder") from None
    key = str(folder.resolve())
    if _HELD.get(key):
        _HELD[key] += 1
        try:
            yield folder
        finally:
            _HELD[key] -= 1
        return
    file = lock_file(folder)
    try:
        fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise RadalignError(f"{what} {folder}: cannot write its lock file ({e}); choose a writable folder") from None
    try:
        previous = _read_record(file)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_record(file)
                raise RadalignError(
                    f"{what} {folder} is in use by another process (pid {holder.get('pid', '?')} on "
                    f"{holder.get('host', '?')}, started {holder.get('started', '?')}: {holder.get('command', '?')}). "
                    "Wait for it to finish, or choose another folder.") from None
        elif previous.get("pid") and _pid_alive(int(previous["pid"])) and previous.get("pid") != os.getpid():
            raise RadalignError(f"{what} {folder} is in use by pid {previous['pid']}; wait or choose another folder")
        if previous.get("pid") and previous.get("pid") != os.getpid() and not _pid_alive(int(previous["pid"])):
            get_logger("radalign.lock").warning(
                f"{folder}: took over a stale lock left by pid {previous['pid']} (no longer running)")
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(record) + "\n").encode())
        _HELD[key] = 1
        try:
            yield folder
        finally:
            _HELD.pop(key, None)
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the flock


def lock_file(folder: str | os.PathLike) -> Path:
    """The lock file of `folder`: `.<name>.radalign.lock` in its parent."""
    folder = Path(folder).resolve()
    return folder.parent / f".{folder.name}{LOCK_SUFFIX}"


def is_locked(folder: str | os.PathLike) -> bool:
    """True when another process holds `folder`'s lock (for tests and `data info`)."""
    file = lock_file(folder)
    if fcntl is None or not file.is_file():
        return False
    fd = os.open(file, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
