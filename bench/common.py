"""Small helpers shared by the benchmarks in bench/: timing, peak memory of a child process, tables.

Benchmarks are scripts (`python bench/<name>.py`), never part of CI. Import this module as
`from bench.common import ...` with the repository root first on sys.path (see `bench/data.py`, whose
name would otherwise shadow the `data` package), or as `from common import ...` from a script in bench/.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class Timer:
    """`with Timer() as t: ...; t.seconds` (wall clock, perf_counter)."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start


def rate(count: float, seconds: float) -> float:
    """Items per second (0 when no time passed)."""
    return count / seconds if seconds > 0 else 0.0


def ratio(a: float, b: float) -> str:
    """`a / b` as "3.20x" (or "n/a" when b is 0)."""
    return f"{a / b:.2f}x" if b else "n/a"


def own_peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


@dataclass
class ChildRun:
    """What `run_measured` saw of one child process."""

    cmd: list[str]
    returncode: int
    seconds: float
    peak_rss_mb: float
    """Peak RSS of the child itself, exact (from the kernel's rusage of that one process)."""
    peak_tree_rss_mb: float
    """Peak of the summed RSS of the child and all its descendants (worker pools), sampled every `interval`."""
    output: str = field(repr=False, default="")


def _tree_rss(proc) -> int:
    import psutil

    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def run_measured(cmd: Sequence[str], *, cwd: str | os.PathLike | None = None, env: dict | None = None,
                 interval: float = 0.05) -> ChildRun:
    """Run `cmd` to completion; return its wall time, exact peak RSS and sampled peak RSS of its process tree.

    Why not RUSAGE_CHILDREN: it holds the maximum over *all* children ever waited for, so a second
    measurement in the same benchmark would report the first one's peak. `os.wait4` gives one child's own.
    """
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    handle = psutil.Process(proc.pid)
    chunks: list[str] = []
    reader = _drain_in_thread(proc, chunks)
    peak_tree = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            break
        try:
            peak_tree = max(peak_tree, _tree_rss(handle))
        except psutil.NoSuchProcess:
            pass
        time.sleep(interval)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4; tell Popen
    reader.join()
    own = usage.ru_maxrss / (1 << 20) if sys.platform == "darwin" else usage.ru_maxrss / 1024
    return ChildRun(list(cmd), proc.returncode, seconds, own, max(peak_tree / (1 << 20), own), "".join(chunks))


def _drain_in_thread(proc: subprocess.Popen, chunks: list[str]):
    """Read the child's output as it comes (a full pipe would block the child)."""
    import threading

    def read():
        assert proc.stdout is not None  # set by Popen(stdout=PIPE)
        for line in proc.stdout:
            chunks.append(line)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain aligned text table (numbers right-aligned, floats with 1 decimal unless given as str)."""

    def cell(v: object) -> str:
        return f"{v:,.1f}" if isinstance(v, float) else (f"{v:,}" if isinstance(v, int) else str(v))

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def line(values: Sequence[str], numeric: Sequence[bool]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric))

    numeric = [all(isinstance(r[i], (int, float)) for r in rows) for i in range(len(headers))] if rows else []
    out = [line(list(headers), numeric or [False] * len(headers)), "  ".join("-" * w for w in widths)]
    out += [line(r, numeric) for r in cells]
    return "\n".join(out)


__all__ = ["REPO", "Timer", "rate", "ratio", "own_peak_rss_mb", "ChildRun", "run_measured", "table"]
