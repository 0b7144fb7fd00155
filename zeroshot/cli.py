"""`radalign zeroshot`: prompted classification with bootstrap CIs, and the 5x200 list builders.

    radalign zeroshot --checkpoint RUN_OR_EXPORT --data SHARDS_OR_CSV --prompts chexpert14 --out DIR
    radalign zeroshot build-5x200 --chexpert-csv valid.csv --out lists/chexpert-5x200.csv [--seed 0]
    radalign zeroshot build-5x200 --shards runs/demo/shards --split test --out lists/mimic-5x200.csv
    radalign zeroshot list-prompts
"""

from __future__ import annotations

import argparse

EXAMPLES = """examples:
  radalign zeroshot --checkpoint runs/demo/pretrain --data runs/demo/shards --split test \\
      --prompts chexpert14 --out runs/demo/zeroshot
  radalign zeroshot --checkpoint runA --checkpoint runB --data chexpert/valid.csv \\
      --image-root chexpert --prompts competition5 --prompts chexpert14 --out out/   # checkpoint ensemble
  radalign zeroshot --checkpoint run --data lists/chexpert-5x200.csv --image-root chexpert \\
      --prompts 5x200 --out out/5x200
  radalign zeroshot --checkpoint run --data runs/demo/shards --subset lists/mimic-5x200.csv \\
      --prompts 5x200 --out out/mimic-5x200
"""


def register(sub) -> None:
    from radalign.cli import Parser

    p = sub.add_parser(
        "zeroshot", help="zero-shot classification with prompt sets (AUROC with bootstrap CIs)",
        description="Score images against prompt sets with exported encoders; writes metrics.json, "
                    "predictions.csv, roc.png and metrics.md.", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _eval_flags(p)
    verbs = p.add_subparsers(dest="verb", metavar="VERB", parser_class=Parser)
    b = verbs.add_parser("build-5x200", help="build a seeded CheXpert-5x200 or MIMIC-5x200 image list",
                         description="Write a 5x200 list (CSV) and its JSON sidecar (seed, rule, sha256).")
    src = b.add_mutually_exclusive_group(required=True)
    src.add_argument("--chexpert-csv", help="a CheXpert-format CSV (Path, Frontal/Lateral, 14 labels)")
    src.add_argument("--shards", help="a shards folder from `radalign data prepare` (MIMIC-5x200)")
    b.add_argument("--split", default="test", help="shard split to draw from (default: %(default)s)")
    b.add_argument("--out", required=True, help="the list to write (.csv; the sidecar gets .json)")
    b.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    b.add_argument("--per-class", type=int, default=200, help="images per class (default: %(default)s)")
    b.add_argument("--blank-not-negative", action="store_true",
                   help="require other labels to be explicitly 0 (default: blank counts as negative)")
    verbs.add_parser("list-prompts", help="list the built-in prompt sets")
    p.set_defaults(func=_run)


def _eval_flags(p) -> None:
    p.add_argument("--checkpoint", action="append", default=[], metavar="RUN_OR_EXPORT",
                   help="run folder or export folder; repeat to ensemble checkpoints")
    p.add_argument("--data", help="shards folder, CheXpert-format CSV, or CSV with an image column")
    p.add_argument("--prompts", action="append", default=[], metavar="NAME_OR_YAML",
                   help="prompt set (chexpert14, competition5, 5x200 or a YAML path); repeatable "
                        "(default: chexpert14)")
    p.add_argument("--out", help="output folder")
    p.add_argument("--split", default="test", help="shard split to evaluate (default: %(default)s)")
    p.add_argument("--val-split", help="shard split for choosing thresholds (never the test split)")
    p.add_argument("--val-data", help="CSV input: validation CSV for choosing thresholds")
    p.add_argument("--subset", help="a 5x200 list CSV: evaluate only its images, with its classes")
    p.add_argument("--image-root", help="CSV input: folder image paths are relative to (default: CSV folder)")
    p.add_argument("--image-column", help="CSV input: image path column (default: Path/path/image/image_path)")
    p.add_argument("--class-column", default="class", help="multi-class CSV: class column (default: %(default)s)")
    p.add_argument("--label-columns", nargs="+", help="CSV input: label columns (each must have prompts)")
    p.add_argument("--uncertain", default="exclude", choices=("exclude", "positive", "negative"),
                   help="label -1 (default: %(default)s from that class's metric, counted)")
    p.add_argument("--blank", default="exclude", choices=("exclude", "negative"),
                   help="blank label (default: %(default)s from that class's metric, counted)")
    p.add_argument("--classes", nargs="+", metavar="CLASS", help="classes of the headline macro AUROC")
    p.add_argument("--min-per-label", type=int, default=10,
                   help="a class enters the macro only with at least this many positives and negatives "
                        "(default: %(default)s; its own AUROC is reported either way)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap / control seed (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward (default: %(default)s)")
    p.add_argument("--num-workers", type=int, default=0, help="image loading workers (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    p.add_argument("--no-cache", action="store_true", help="do not cache image embeddings in OUT/cache")
    p.add_argument("--no-control", action="store_true", help="skip the shuffled-label control")


def _run(args) -> int:
    if args.verb == "build-5x200":
        return _build(args)
    if args.verb == "list-prompts":
        from radalign.pretrain.prompts import available_prompt_sets, load_prompt_set

        for name in available_prompt_sets():
            ps = load_prompt_set(name)
            print(f"{name:14s} {ps.mode:10s} {len(ps.classes):2d} classes  {ps.description}")
        return 0
    return _evaluate(args)


def _evaluate(args) -> int:
    from radalign import RadalignError
    from radalign.config import load_config

    if not args.out:
        raise RadalignError("--out: required; the folder for metrics.json, predictions.csv, roc.png")
    from radalign.zeroshot.config import ZeroshotConfig

    cfg = load_config(ZeroshotConfig, {
        "checkpoints": args.checkpoint, "data": args.data or "", "out": args.out,
        "prompts": args.prompts or ["chexpert14"], "split": args.split, "val_split": args.val_split,
        "val_data": args.val_data, "subset": args.subset, "image_root": args.image_root,
        "image_column": args.image_column, "class_column": args.class_column, "label_columns": args.label_columns,
        "uncertain": args.uncertain, "blank": args.blank, "macro_classes": args.classes,
        "min_per_label": args.min_per_label, "bootstrap": args.bootstrap, "seed": args.seed,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers, "device": args.device, "cache": not args.no_cache,
        "shuffled_control": not args.no_control,
    })
    from radalign.zeroshot.evaluate import run_zeroshot

    from radalign.log import rprint

    results = run_zeroshot(cfg)
    for name, m in results.items():
        mac = m["macro"]
        ci = f"[{mac['ci_low']:.3f}, {mac['ci_high']:.3f}]" if mac["ci_low"] is not None else "[no CI]"
        auc = f"{mac['auroc']:.3f}" if mac["auroc"] is not None else "n/a"
        unit = f"{mac.get('n_units')} {mac.get('unit', 'image')}s resampled"
        rprint(f"{name}: macro AUROC {auc} {ci} ({round(100 * mac['level'])}% CI, {unit}) over "
               f"{len(mac['classes'])} classes, {m['data']['n_scored']} images")
        left_out = {"no AUROC (one label value)": mac.get("classes_without_auroc"),
                    f"fewer than {cfg.min_per_label} positives or negatives": mac.get("classes_too_few")}
        for why, names in left_out.items():
            if names:
                rprint(f"  left out of the macro, {why}: {', '.join(names)}")
    rprint(f"wrote {cfg.out}")
    return 0


def _build(args) -> int:
    from radalign.zeroshot.benchmarks import build_chexpert_5x200, build_mimic_5x200

    from radalign.log import rprint

    common = dict(seed=args.seed, per_class=args.per_class, blank_as_negative=not args.blank_not_negative)
    if args.chexpert_csv:
        out = build_chexpert_5x200(args.chexpert_csv, args.out, **common)
    else:
        out = build_mimic_5x200(args.shards, args.out, split=args.split, **common)
    rprint(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from radalign.cli import stage_main

    return stage_main("zeroshot", argv)
