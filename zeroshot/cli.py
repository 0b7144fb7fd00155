"""`radalign zeroshot`: prompted classification with bootstrap CIs, and the 5x200 list builders.

    radalign zeroshot eval --export RUN_OR_EXPORT --shards SHARDS --prompts chexpert14 --out DIR [key=value]
    radalign zeroshot eval --export RUN_OR_EXPORT --csv valid.csv --image-root chexpert --out DIR
    radalign zeroshot build-5x200 --chexpert-csv valid.csv --out lists/chexpert-5x200.csv [--seed 0]
    radalign zeroshot build-5x200 --shards runs/demo/shards --split test --out lists/mimic-5x200.csv
    radalign zeroshot list-prompts

`eval` is the default verb: `radalign zeroshot --export ...` is `radalign zeroshot eval --export ...`.
"""

from __future__ import annotations

import argparse

from radalign.zeroshot.config import BLANK_POLICIES, UNCERTAIN_POLICIES, Build5x200Config, ZeroshotConfig

from radalign.cli import add_config_args, add_verbs, config_from_args, old_spelling, print_config

VERBS = ("eval", "build-5x200", "list-prompts")
DEFAULT_VERB = "eval"

EXAMPLES = """examples:
  radalign zeroshot eval --export runs/demo/pretrain --shards runs/demo/shards --split test \\
      --prompts chexpert14 --out runs/demo/zeroshot
  radalign zeroshot eval --export runA --export runB --csv chexpert/valid.csv \\
      --image-root chexpert --prompts competition5 --prompts chexpert14 --out out/   # checkpoint ensemble
  radalign zeroshot eval --export run --csv lists/chexpert-5x200.csv --image-root chexpert \\
      --prompts 5x200 --out out/5x200
  radalign zeroshot eval --export run --shards runs/demo/shards --subset lists/mimic-5x200.csv \\
      --prompts 5x200 --out out/mimic-5x200 bootstrap=200
"""


def register(sub) -> None:
    p = sub.add_parser(
        "zeroshot", help="zero-shot classification with prompt sets (AUROC with bootstrap CIs)",
        description="Score images against prompt sets with exported encoders (eval), build 5x200 lists, list the "
                    "prompt sets.", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = add_verbs(p)
    e = verbs.add_parser("eval", help="AUROC per class and macro, with bootstrap CIs (the default verb)",
                         description="Score images against prompt sets with exported encoders; writes "
                                     "metrics.json, predictions.csv, roc.png and metrics.md.",
                         epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(
        e, ZeroshotConfig, flags={"checkpoints": "--export", "data": ("--shards", "--csv"),
                                  "macro_classes": "--classes", "shuffled_control": "--control"},
        checkpoints={"metavar": "RUN_OR_EXPORT"}, data={"metavar": "SHARDS_OR_CSV"},
        prompts={"metavar": "NAME_OR_YAML"}, macro_classes={"nargs": "+", "action": "store", "metavar": "CLASS"},
        label_columns={"nargs": "+", "action": "store", "metavar": "COLUMN"},
        uncertain={"choices": UNCERTAIN_POLICIES}, blank={"choices": BLANK_POLICIES})
    old_spelling(e, {"--checkpoint": "--export", "--data": "--shards"})
    e.set_defaults(func=_evaluate)

    b = verbs.add_parser("build-5x200", help="build a seeded CheXpert-5x200 or MIMIC-5x200 image list",
                         description="Write a 5x200 list (CSV) and its JSON sidecar (seed, rule, sha256).")
    add_config_args(b, Build5x200Config)
    old_spelling(b, {"--blank-not-negative": "--no-blank-as-negative"})
    b.set_defaults(func=_build)
    ls = verbs.add_parser("list-prompts", help="list the built-in prompt sets")
    ls.set_defaults(func=_list_prompts)


def _list_prompts(args) -> int:
    from radalign.pretrain.prompts import available_prompt_sets, load_prompt_set

    for name in available_prompt_sets():
        ps = load_prompt_set(name)
        print(f"{name:14s} {ps.mode:10s} {len(ps.classes):2d} classes  {ps.description}")
    return 0


def _evaluate(args) -> int:
    cfg = config_from_args(ZeroshotConfig, args, stage="zeroshot")
    if args.print_config:
        return print_config(cfg)
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

    cfg = config_from_args(Build5x200Config, args, stage="zeroshot")
    if args.print_config:
        return print_config(cfg)
    common = dict(seed=cfg.seed, per_class=cfg.per_class, blank_as_negative=cfg.blank_as_negative)
    if cfg.chexpert_csv:
        out = build_chexpert_5x200(cfg.chexpert_csv, cfg.out, **common)
    else:
        out = build_mimic_5x200(cfg.shards, cfg.out, split=cfg.split, **common)
    rprint(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from radalign.cli import stage_main

    return stage_main("zeroshot", argv)
