"""`radalign finetune`: not built yet (see the finetune issue); the command says so instead of failing."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune with EHR encoders and a fusion head (not yet available)",
                       description="Fine-tuning is not implemented yet in this release.")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from radalign import RadalignError

    raise RadalignError("`radalign finetune` is not implemented yet; it is planned after pretrain, "
                        "zeroshot and retrieval.")
