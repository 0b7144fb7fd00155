"""`radalign pretrain [train] --config NAME_OR_YAML [key=value ...]` (also `python -m radalign.pretrain`,
`accelerate launch -m radalign.pretrain`, `torchrun -m radalign.pretrain`), and `radalign export`."""

from __future__ import annotations

import argparse

from radalign.cli import add_config_args, add_verbs, config_from_args, print_config

VERBS = ("train",)
DEFAULT_VERB = "train"  # `radalign pretrain --config X` is `radalign pretrain train --config X`


def register(sub) -> None:
    from radalign.pretrain.config import PretrainConfig

    from radalign.config import format_help

    p = sub.add_parser(
        "pretrain", help="contrastive image-report pretraining (Accelerate / DeepSpeed)",
        description="Train image and report encoders with InfoNCE on prepared shards, then export them.\n"
                    "Example: radalign pretrain --config pretrain/tiny data.shards=runs/demo/shards steps=300 "
                    "(`train` is the default verb)", formatter_class=argparse.RawDescriptionHelpFormatter)
    t = add_verbs(p).add_parser(
        "train", help="train and export (the default verb)",
        description="Train image and report encoders with InfoNCE on prepared shards, then export them.\n"
                    "Example: radalign pretrain train --config pretrain/tiny data.shards=runs/demo/shards steps=300",
        epilog=format_help(PretrainConfig), formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--config", default="pretrain/tiny",
                   help="config name under configs/ (e.g. pretrain/tiny) or a YAML path (default: %(default)s)")
    t.add_argument("--list-models", action="store_true", help="list registered model configs and exit")
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. steps=500")
    t.set_defaults(func=_run)


def _run(args) -> int:
    from radalign.pretrain.config import PretrainConfig

    from radalign.config import load_config, to_yaml

    if args.list_models:
        from radalign.pretrain.models import list_models

        print("\n".join(list_models()))
        return 0
    cfg = load_config(PretrainConfig, args.config, args.overrides, stage="pretrain")
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    from radalign.pretrain.recipe import run_pretrain

    run_pretrain(cfg)
    return 0


EXPORT_EXAMPLES = """examples:
  radalign export --format open_clip runs/demo/pretrain --out share/open_clip
  radalign export --format transformers runs/demo/pretrain --out share/hf
  radalign export --format onnx runs/demo/pretrain/export --out share/onnx --opset 17
Each folder also holds MODEL_CARD.md (from what the run recorded) and export.json (what was exported, and the
round-trip check against radalign's own loader). See docs/pretrain.md, "Sharing a model".
"""


def register_export(sub) -> None:
    """`radalign export` (a top-level command implemented by the pretrain stage)."""
    from radalign.pretrain.formats import FORMATS
    from radalign.pretrain.share import ExportConfig


    p = sub.add_parser(
        "export", help="write a pretrain run in open_clip, transformers or ONNX layout, with a model card",
        description="Write a pretrain run (or its export folder) in a layout other libraries load without "
                    "radalign, check it against radalign's own loader, and write MODEL_CARD.md.",
        epilog=EXPORT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", nargs="?", metavar="RUN_OR_EXPORT",
                   help="pretrain run folder or its export/ folder (or source=... in the YAML)")
    add_config_args(p, ExportConfig, skip=("source",), flags={"evals": "--eval"}, format={"choices": FORMATS},
                    out={"metavar": "DIR"}, evals={"metavar": "METRICS_JSON"})
    p.set_defaults(func=_export)


def _export(args) -> int:
    from radalign.pretrain.share import ExportConfig, run_export

    cfg = config_from_args(ExportConfig, args, stage="pretrain", source=args.source)
    if args.print_config:
        return print_config(cfg)
    out = run_export(cfg)
    print(f"{cfg.format} export written to {out}; model card {out / 'MODEL_CARD.md'}")
    return 0
