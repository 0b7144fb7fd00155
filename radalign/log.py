"""One place for console output: rank-zero printing and a module logger.

Why not `print`: under `accelerate launch` every process prints; users want one copy of each line.
"""

from __future__ import annotations

import logging
import os
import sys


def rank() -> int:
    """Global rank of this process (0 when not distributed). Reads torch.distributed if initialised."""
    # Only look at torch.distributed when torch is already loaded: importing torch costs seconds and
    # hundreds of MB in light processes (data synth workers, `radalign --help`).
    if "torch" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_rank_zero() -> bool:
    return rank() == 0


def rprint(*args, **kwargs) -> None:
    """`print` on global rank 0 only, flushed (logs of launched jobs are often piped)."""
    if is_rank_zero():
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def get_logger(name: str) -> logging.Logger:
    """A logger that writes `name: message` to stderr on rank 0 and stays quiet elsewhere."""
    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO if is_rank_zero() else logging.ERROR)
    return logger
