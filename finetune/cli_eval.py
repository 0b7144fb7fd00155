"""`radalign finetune eval` and `radalign finetune explain` (parsers and handlers)."""

from __future__ import annotations


def register_eval(verbs) -> None:
    pass
