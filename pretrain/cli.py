"""`radalign pretrain --config NAME_OR_YAML [key=value ...]` (also `python -m pretrain`, `accelerate launch -m
pretrain`, `torchrun -m pretrain`)."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    from pretrain.config import PretrainConfig
    from radalign.config import format_help

    p = sub.add_parser(
        "pretrain", help="contrastive image-report pretraining (Accelerate / DeepSpeed)",
        description="Train image and report encoders with InfoNCE on prepared shards, then export them.\n"
                    "Example: radalign pretrain --config pretrain/tiny data.shards=runs/demo/shards steps=300",
        epilog=format_help(PretrainConfig), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="pretrain/tiny",
                   help="config name under configs/ (e.g. pretrain/tiny) or a YAML path (default: %(default)s)")
    p.add_argument("--list-models", action="store_true", help="list registered model configs and exit")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. steps=500")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from pretrain.config import PretrainConfig
    from radalign.config import load_config, to_yaml

    if args.list_models:
        from pretrain.models import list_models

        print("\n".join(list_models()))
        return 0
    cfg = load_config(PretrainConfig, args.config, args.overrides, stage="pretrain")
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    from pretrain.recipe import run_pretrain

    run_pretrain(cfg)
    return 0
