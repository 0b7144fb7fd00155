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
    assert p.stdout.readline().strip() == "held"
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
