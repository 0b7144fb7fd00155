"""Exclusive output-folder locks: a second writer is refused while the first lives; a dead one's lock is free."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest

from radalign import RadalignError
from radalign.lock import is_locked, lock_file, output_lock

HOLD = textwrap.dedent("""
    import sys, time
    from radalign.lock import output_lock
    with output_lock(sys.argv[1]):
        print("held", flush=True)
        time.sleep(float(sys.argv[2]))
""")


def _holder(folder, seconds):
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), str(seconds)], stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline().strip()
    if line != "held":  # never leave a child behind (a test runner that waits for its own children trips on it)
        p.kill()
        p.wait()
        pytest.fail(f"the holder process did not take the lock (printed {line!r})")
    return p


def test_second_writer_is_refused_naming_folder_and_pid(tmp_path):
    out = tmp_path / "out"
    p = _holder(out, 30)
    try:
        assert is_locked(out)
        with pytest.raises(RadalignError) as e:
            with output_lock(out):
                pass
        assert str(out) in str(e.value) and f"pid {p.pid}" in str(e.value)
    finally:
        p.kill()
        p.wait()


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    out = tmp_path / "out"
    p = _holder(out, 30)
    p.kill()
    p.wait()
    assert json.loads(lock_file(out).read_text())["pid"] == p.pid  # its record is still there
    assert not is_locked(out)
    with output_lock(out):
        assert json.loads(lock_file(out).read_text())["pid"] != p.pid


def test_released_after_the_block_and_reentrant(tmp_path):
    out = tmp_path / "out"
    with output_lock(out):
        with output_lock(out):  # same process: library code may lock the folder its command holds
            pass
        p = subprocess.run([sys.executable, "-c", HOLD, str(out), "0"], capture_output=True, text=True)
        assert p.returncode != 0 and "in use by another process" in p.stderr
    t = time.time()
    p = subprocess.run([sys.executable, "-c", HOLD, str(out), "0"], capture_output=True, text=True)
    assert p.returncode == 0 and time.time() - t < 30


def test_a_file_is_not_a_folder(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(RadalignError, match="not a folder"):
        with output_lock(f):
            pass


# ----------------------------------------------------------------------------------------------------------
# The lock file lives BESIDE the folder it guards, so replacing or emptying the folder cannot drop it.


def test_the_lock_file_is_beside_the_folder_never_inside(tmp_path):
    out = tmp_path / "runs" / "demo"
    with output_lock(out):
        assert list(out.iterdir()) == []  # nothing of the lock inside the guarded folder
        assert lock_file(out) == tmp_path / "runs" / ".demo.radalign.lock"
        assert lock_file(out).is_file() and json.loads(lock_file(out).read_text())["pid"] > 0
    assert lock_file(tmp_path / "runs" / "x" / ".." / "demo") == lock_file(out)  # one lock per folder, however named


@pytest.mark.parametrize("how", ["rmtree", "replace"])
def test_replacing_the_folder_keeps_a_second_writer_out(tmp_path, how):
    """The holder's job replaces its output folder (an atomic folder write, or a clean-up that deletes it):
    the lock must survive, so a second writer is still refused while the holder lives."""
    import shutil

    out = tmp_path / "out"
    p = _holder(out, 30)
    try:
        (out / "old.txt").write_text("x")
        if how == "rmtree":
            shutil.rmtree(out)
            out.mkdir()
        else:
            new = tmp_path / ".out.tmp"
            new.mkdir()
            (new / "weights").write_text("new")
            old = tmp_path / ".out.old"
            out.rename(old)
            new.rename(out)
            shutil.rmtree(old)
        assert is_locked(out)
        with pytest.raises(RadalignError, match=f"in use by another process \\(pid {p.pid}"):
            with output_lock(out):
                pass
    finally:
        p.kill()
        p.wait()
    with output_lock(out):  # the holder is gone: free again
        pass


def test_two_folders_of_one_parent_have_their_own_locks(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    p = _holder(a, 30)
    try:
        with output_lock(b):  # another folder beside it: not blocked
            assert is_locked(a) and lock_file(a) != lock_file(b)
    finally:
        p.kill()
        p.wait()


def test_a_second_writer_in_another_process_is_refused_while_the_first_lives(tmp_path):
    out = tmp_path / "out"
    with output_lock(out):
        other = subprocess.run([sys.executable, "-c", HOLD, str(out), "0"], capture_output=True, text=True)
        assert other.returncode != 0
        assert f"output folder {out} is in use by another process (pid {__import__('os').getpid()}" in other.stderr
        assert "Wait for it to finish, or choose another folder" in other.stderr
    assert not is_locked(out)
    assert json.loads(lock_file(out).read_text() or "{}") == {}  # the record is cleared on release


def test_is_locked_on_a_folder_never_locked(tmp_path):
    (tmp_path / "fresh").mkdir()
    assert not is_locked(tmp_path / "fresh") and not lock_file(tmp_path / "fresh").exists()
    assert not is_locked(tmp_path / "missing")


def test_taking_over_a_dead_holders_lock_is_logged(tmp_path):
    import logging

    from radalign.log import get_logger

    out = tmp_path / "out"
    p = _holder(out, 30)
    p.kill()
    p.wait()
    got = []

    class Keep(logging.Handler):
        def emit(self, record):
            got.append(record.getMessage())

    logger = get_logger("radalign.lock")
    handler = Keep()
    logger.addHandler(handler)
    try:
        with output_lock(out):
            pass
        with output_lock(out):  # the record was cleared on release: nothing stale the second time
            pass
    finally:
        logger.removeHandler(handler)
    assert got == [f"{out}: took over a stale lock left by pid {p.pid} (no longer running)"]


def test_pid_alive_never_signals_the_process(monkeypatch):
    import os
    import signal

    from radalign.lock import _pid_alive

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert _pid_alive(child.pid) and _pid_alive(os.getpid())
        assert child.poll() is None  # still running: probed with signal 0, not hung up or killed
    finally:
        child.kill()
        child.wait()
    assert not _pid_alive(child.pid)  # reaped: gone
    sent = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: sent.append(sig) or (_ for _ in ()).throw(PermissionError()))
    assert _pid_alive(12345) and sent == [0]  # another user's live process: alive, not ours to signal
    assert signal.SIGHUP not in sent
