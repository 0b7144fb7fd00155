"""`radalign finetune`: train on a clinical task, few-shot, predict, evaluate, explain (also `python -m
radalign.finetune`, `accelerate launch -m radalign.finetune`).

    radalign finetune --config finetune/in_hospital_mortality [--overwrite] [key=value ...]   (`train` implied)
    radalign finetune fewshot --config finetune/fewshot_chexpert [--overwrite] [key=value ...]
    radalign finetune predict --run RUN --table TABLE [--split test] --out predictions.csv
    radalign finetune eval --run RUN [--table TABLE] [--split test] --out DIR
    radalign finetune explain --run RUN --study-id ID [--index-dir INDEX_DIR] --format json|markdown|html
"""

from __future__ import annotations

import argparse

VERBS = ("train", "fewshot", "predict", "eval", "explain")
DEFAULT_VERB = "train"  # `radalign finetune --config X` is `radalign finetune train --config X`

EXAMPLES = """examples:
  radalign finetune --config finetune/in_hospital_mortality run_dir=runs/demo/finetune/in_hospital_mortality
  radalign finetune fewshot --config finetune/fewshot_chexpert fewshot.label="Pleural Effusion"
  accelerate launch --num_processes 2 -m radalign.finetune --config finetune/mortality_30d
  radalign finetune predict --run runs/demo/finetune/in_hospital_mortality \\
      --table runs/demo/ehr/finetune --split test --out predictions.csv
  radalign finetune eval --run runs/demo/finetune/in_hospital_mortality --out .../eval
  radalign finetune explain --run RUN --study-id 50000123 --index-dir runs/demo/retrieval/index --format html
"""


def register(sub) -> None:
    from radalign.finetune.config import FinetuneConfig

    from radalign.cli import add_verbs
    from radalign.config import format_help

    p = sub.add_parser("finetune", help="EHR + image + indication fusion for clinical tasks (train, predict, "
                                        "eval, explain)",
                       description="Fine-tune a fusion head over the pretrained towers, the order's indication "
                                   "and the linked EHR; baselines, few-shot, evaluation and explanations.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = add_verbs(p)
    t = verbs.add_parser("train", help="train the fusion model and baselines (the default verb)",
                         description="Train on a task config; writes RUN/predictions.csv, metrics.json, "
                                     "report.md, roc.png.", epilog=format_help(FinetuneConfig),
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    _recipe_args(t, "finetune/in_hospital_mortality")
    t.set_defaults(func=_train)
    fs = verbs.add_parser("fewshot", help="few-shot learning curve: k labelled studies per class, by patient",
                          description="The few-shot recipe: every fewshot.method over every k of fewshot.ks and "
                                      "fewshot.seeds draws by patient, scored on the test split; writes "
                                      "RUN/fewshot.json, draws/, learning_curve.png, report.md.",
                          epilog=format_help(FinetuneConfig), formatter_class=argparse.RawDescriptionHelpFormatter)
    _recipe_args(fs, "finetune/fewshot_chexpert")
    fs.set_defaults(func=_fewshot)

    from radalign.finetune.cli_eval import register_eval

    register_eval(verbs)


def _recipe_args(p, config: str) -> None:
    p.add_argument("--config", default=config, help="config name under configs/ or a YAML path (default: "
                                                     "%(default)s)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--overwrite", action="store_true",
                   help="train afresh in run_dir: remove its models, checkpoints and reports first (without it, "
                        "a run_dir trained with another config is refused, naming the changed keys)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.epochs=10")


def _config(args, *implied: str):
    """The resolved config (`implied` overrides last), or None when --print-config printed it."""
    from radalign.finetune.config import FinetuneConfig

    from radalign.config import load_config, to_yaml

    cfg = load_config(FinetuneConfig, args.config, [*args.overrides, *implied], stage="finetune")
    if args.print_config:
        print(to_yaml(cfg), end="")
        return None
    return cfg


def _train(args) -> int:
    cfg = _config(args)
    if cfg is None:
        return 0
    if cfg.fewshot.enabled:  # the spelling of the release before `finetune fewshot`: kept one release
        from radalign.log import get_logger

        get_logger("radalign.finetune").warning(
            f"--config {args.config}: fewshot.enabled=true runs the few-shot recipe; `radalign finetune "
            "[train] --config` for it is deprecated, use `radalign finetune fewshot --config` instead")
        return _run_fewshot(cfg, args)
    from radalign.finetune.recipe import run_finetune

    run_finetune(cfg, overwrite=args.overwrite)
    return 0


def _fewshot(args) -> int:
    cfg = _config(args, "fewshot.enabled=true")
    return 0 if cfg is None else _run_fewshot(cfg, args)


def _run_fewshot(cfg, args) -> int:
    from radalign.finetune.fewshot_recipe import run_fewshot_recipe

    run_fewshot_recipe(cfg, overwrite=args.overwrite)
    return 0


def main(argv: list[str] | None = None) -> int:
    from radalign.cli import stage_main

    return stage_main("finetune", argv)
