"""Atomic file writes: write to a temporary file beside the target, then `os.replace`.

A reader (or a resumed job) never sees a half-written checkpoint, shard or manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from radalign import RadalignError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path`, on error it is removed.

    Folders too: `os.replace` cannot replace a non-empty folder, so an existing one is first renamed aside and
    deleted only after the new one is in place (the old content is never gone before the new is complete).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        if tmp.is_dir() and path.is_dir():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)  # the new folder could not take its place: put the old one back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj, indent: int = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False, default=str) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_format_json(file: str | os.PathLike, expected: str, *, what: str, fix: str) -> dict:
    """A JSON object whose "format" is `expected` (a folder's manifest); otherwise one RadalignError that names
    the file, what it should have been (`what`, e.g. "the --out folder of `radalign data prepare`") and the
    fix (`fix`, e.g. "re-run `radalign data prepare`")."""
    file = Path(file)
    if not file.is_file():
        hint = " (the folder does not exist)" if not file.parent.exists() else ""
        raise RadalignError(f"{file}: no {file.name}{hint}; point at {what}")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RadalignError(f"{file}: not readable JSON ({e}); {fix}") from None
    if not isinstance(data, dict) or data.get("format") != expected:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise RadalignError(f"{file}: format {found!r}, expected {expected!r}; {fix} with this version")
    return data
