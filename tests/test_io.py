"""radalign.io: atomic writes of files and folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from radalign.io import atomic_path, atomic_write_bytes, atomic_write_text


def test_atomic_file_write_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a" / "x.json"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in target.parent.iterdir()] == ["x.json"]


def test_atomic_folder_replaces_an_existing_folder(tmp_path):
    target = tmp_path / "export"
    for version in ("old", "new"):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "weights").write_text(version)
            (tmp / version).write_text("")
    assert sorted(p.name for p in target.iterdir()) == ["new", "weights"]  # nothing of the old folder left
    assert (target / "weights").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no .tmp or .old folders behind


def test_failed_folder_write_keeps_the_old_folder(tmp_path):
    target = tmp_path / "export"
    target.mkdir()
    (target / "weights").write_text("good")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "weights").write_text("half")
            raise RuntimeError("disk full")
    assert (target / "weights").read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_read_format_json_names_the_file_and_the_fix(tmp_path):
    from radalign import RadalignError
    from radalign.io import read_format_json

    f = tmp_path / "manifest.json"
    kw = dict(what="the --out folder of `x build`", fix="re-run `x build`")
    with pytest.raises(RadalignError, match=r"no manifest.json; point at the --out folder of `x build`"):
        read_format_json(f, "x/1", **kw)
    f.write_text("{not json")
    with pytest.raises(RadalignError, match=r"manifest.json: not readable JSON .*re-run `x build`"):
        read_format_json(f, "x/1", **kw)
    atomic_write_text(f, '{"format": "x/0"}')
    with pytest.raises(RadalignError, match=r"format 'x/0', expected 'x/1'; re-run `x build` with this version"):
        read_format_json(f, "x/1", **kw)
    atomic_write_text(f, '{"format": "x/1", "n": 3}')
    assert read_format_json(f, "x/1", **kw) == {"format": "x/1", "n": 3}


# ----------------------------------------------------------------------------------------------------------
# Planted faults for atomic_write_bytes: a write that fails midway (disk full / file-size limit) must leave the
# previous content whole and no temporary behind. A direct `open(path, "wb").write(data)` fails these tests.

_FILL_THEN_FAIL = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)          # EFBIG as an OSError instead of a kill
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # no file of this process may grow past 4 KiB
from radalign.io import atomic_write_bytes
try:
    atomic_write_bytes(sys.argv[1], b"n" * 65536)
except OSError as e:
    print("errno", e.errno)
    sys.exit(3)
"""


def _package_root():
    import radalign.io

    return Path(radalign.io.__file__).resolve().parents[1]  # import the same copy (mutation runs use a copy)


def test_write_failing_midway_keeps_the_old_content(tmp_path):
    import errno
    import subprocess
    import sys

    target = tmp_path / "manifest.json"
    target.write_bytes(b'{"old": true}\n')
    proc = subprocess.run([sys.executable, "-c", _FILL_THEN_FAIL, str(target)], cwd=_package_root(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stdout + proc.stderr  # the planted fault did fire
    assert f"errno {errno.EFBIG}" in proc.stdout
    assert target.read_bytes() == b'{"old": true}\n'  # not truncated, not half-new
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # the partial temporary is gone


def test_crash_before_the_rename_keeps_the_old_content(tmp_path, monkeypatch):
    target = tmp_path / "latest"
    target.write_text("step-100")

    def crash(src, dst):
        raise OSError(5, "planted crash before rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="planted crash"):
        atomic_write_text(target, "step-200")
    monkeypatch.undo()
    assert target.read_text() == "step-100"
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]


def test_data_reaches_the_disk_before_the_rename(tmp_path, monkeypatch):
    """fsync of the complete temporary, then os.replace onto the target: never a rename of unsynced data."""
    target = tmp_path / "prepare-state.json"
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.fstat(fd).st_size, os.fstat(fd).st_ino))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.stat(src).st_ino, Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_write_bytes(target, b"x" * 1000)
    monkeypatch.undo()
    assert [e[0] for e in events] == ["fsync", "replace"]
    assert events[0][1] == 1000  # the whole payload was written before the sync
    assert events[0][2] == events[1][1]  # the synced file is the one renamed
    assert events[1][2] == target
    assert target.read_bytes() == b"x" * 1000


# ----------------------------------------------------------------------------------------------------------
# A crash mid-write, for real: SIGKILL while the temporary is half written.

_WRITE_SLOWLY = """
import os, sys, time
from radalign.io import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    with open(tmp, "wb") as f:
        f.write(b"new" * 1000)
        f.flush()
        print(tmp, flush=True)
        time.sleep(60)  # killed here
"""


def test_sigkill_mid_write_leaves_the_old_file_and_the_next_write_works(tmp_path):
    import signal
    import subprocess
    import sys

    target = tmp_path / "manifest.json"
    target.write_bytes(b'{"old": 1}\n')
    proc = subprocess.Popen([sys.executable, "-c", _WRITE_SLOWLY, str(target)], cwd=_package_root(),
                            stdout=subprocess.PIPE, text=True)
    try:
        tmp = Path(proc.stdout.readline().strip())
        assert tmp.parent == target.parent and tmp.stat().st_size == 3000  # beside it: one file system, one rename
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert target.read_bytes() == b'{"old": 1}\n'  # whole and old
    atomic_write_text(target, '{"new": 2}\n')
    assert target.read_text() == '{"new": 2}\n'


def test_folder_swap_failing_midway_puts_the_old_folder_back(tmp_path, monkeypatch):
    target = tmp_path / "export"
    target.mkdir()
    (target / "weights").write_text("good")
    real = os.replace
    calls = []

    def second_fails(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:  # old folder moved aside, then the new one fails to take its place
            raise OSError(28, "planted: no space left")
        real(src, dst)

    monkeypatch.setattr(os, "replace", second_fails)
    with pytest.raises(OSError, match="planted"):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "weights").write_text("new")
    monkeypatch.undo()
    assert (target / "weights").read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no .old or .tmp folder left behind


def test_checksum_of_a_file_larger_than_one_read(tmp_path):
    import hashlib

    from radalign.io import sha256_file

    data = os.urandom(3 * (1 << 20) + 7)  # 3 MiB + 7: several default-size reads and a short tail
    f = tmp_path / "model.safetensors"
    f.write_bytes(data)
    assert sha256_file(f) == hashlib.sha256(data).hexdigest()
    f.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit of the last byte
    assert sha256_file(f) != hashlib.sha256(data).hexdigest()
