"""`radalign finetune predict`, `eval` and `explain`: their typed configs, parsers and handlers (the work is in
finetune.predict and finetune.evaluate)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Optional

from radalign.cli import add_config_args, config_from_args, old_spelling, print_config
from radalign.config import OUTPUT_FORMATS, output_problems, output_targets

THRESHOLD_RULES = ("youden", "sensitivity", "specificity")
# Old spellings, one release: the run folder was --checkpoint (a pretrain run elsewhere), the table --data.
OLD_RUN_FLAGS = {"--checkpoint": "--run", "--data": "--table"}

EVAL_EXAMPLES = """examples:
  radalign finetune eval --run runs/demo/finetune/in_hospital_mortality \\
      --out runs/demo/finetune/in_hospital_mortality/eval
  radalign finetune eval --run RUN --threshold sensitivity --target 0.9 --bootstrap 2000
"""
EXPLAIN_EXAMPLES = """examples:
  radalign finetune explain --run runs/demo/finetune/in_hospital_mortality --study-id 50000123 \\
      --index-dir runs/demo/retrieval/index --out explain.html
  radalign finetune explain --run RUN --study-id 50000123 --format json
  radalign finetune explain --run RUN --study-id 50000123 --out x.json --out x.md --out x.html   # one run, 3 files
"""


@dataclass
class _TrainedRun:
    """A trained finetune run and the data it is applied to."""

    run: str = ""
    """Finetune run folder (run_dir of `radalign finetune train`)."""
    table: Optional[str] = None
    """Finetune table (None: the run's data.table)."""
    shards: Optional[str] = None
    """Shards holding the table's films (None: the run's data.shards)."""

    def validate(self) -> list[str]:
        return [] if self.run else ["run: none given; pass --run RUN (a finetune run folder)"]


@dataclass
class PredictConfig(_TrainedRun):
    """`radalign finetune predict`: probabilities of every saved model of the run."""

    split: str = "test"
    """Table split to score."""
    out: str = ""
    """Predictions CSV to write."""

    def validate(self) -> list[str]:
        return super().validate() + ([] if self.out else ["out: none given; pass --out predictions.csv"])


@dataclass
class EvalConfig(_TrainedRun):
    """`radalign finetune eval`: clinical evaluation of one saved model of the run."""

    model: str = "fusion"
    """Saved model to evaluate."""
    split: Optional[str] = None
    """Split to evaluate (None: the run's data.test_split)."""
    val_split: Optional[str] = None
    """Split the threshold and temperature are fitted on (None: the run's data.val_split; never the evaluated
    split)."""
    out: str = ""
    """Folder for metrics.json, report.md and the PNGs."""
    threshold: str = "youden"
    """Decision-threshold rule, applied on validation: youden, sensitivity or specificity (the last two need
    target)."""
    target: Optional[float] = None
    """Target sensitivity/specificity for threshold=sensitivity|specificity, e.g. 0.9."""
    bootstrap: Optional[int] = None
    """Patient bootstrap resamples (None: the run's bootstrap)."""
    seed: Optional[int] = None
    """Bootstrap seed (None: the run's seed)."""
    min_count: int = 20
    """Smallest labelled group (or cell) that is scored; smaller ones are counted only."""
    subgroups: Optional[str] = None
    """Comma-separated subgroup columns (None: gender,age_band,race,insurance,modalities,labs)."""

    def validate(self) -> list[str]:
        p = super().validate() + ([] if self.out else ["out: none given; pass --out DIR"])
        if self.threshold not in THRESHOLD_RULES:
            p.append(f"threshold: {self.threshold!r} is not one of {', '.join(THRESHOLD_RULES)}")
        elif self.threshold != "youden" and self.target is None:
            p.append(f"target: --threshold {self.threshold} needs --target, e.g. --target 0.9")
        if self.bootstrap is not None and self.bootstrap < 1:
            p.append(f"bootstrap: {self.bootstrap}: need at least 1 resample (e.g. 1000)")
        return p


@dataclass
class ExplainConfig(_TrainedRun):
    """`radalign finetune explain`: one prediction explained."""

    study_id: str = ""
    """Study to explain (a study_id of the table)."""
    model: str = "fusion"
    """Saved model to explain."""
    split: Optional[str] = None
    """Table split holding the study (None: look in every split)."""
    index_dir: Optional[str] = None
    """Retrieval index built with the run's encoders (`radalign retrieval build`), for similar cases."""
    k: int = 5
    """Similar cases to show."""
    format: Optional[str] = None
    """Output format: json, markdown or html (None: each `out` file's suffix, .json .md .html; json when printed)."""
    out: list[str] = field(default_factory=list)
    """File(s) to write, repeatable (`--out x.json --out x.html`: one explanation, several formats); none: print."""

    def validate(self) -> list[str]:
        p = super().validate() + ([] if self.study_id else ["study_id: none given; pass --study-id ID"])
        return p + output_problems(self.format, self.out)


def register_eval(verbs) -> None:
    """The predict, eval and explain verbs of `radalign finetune`."""
    pr = verbs.add_parser("predict", help="score new studies with a trained run",
                          description="Probabilities of every saved model of RUN for the studies of a table "
                                      "split (same feature list as training, or refused).")
    _run_args(pr, PredictConfig)
    pr.set_defaults(func=_predict)

    ev = verbs.add_parser("eval", help="clinical evaluation: intervals, calibration, thresholds, subgroups, "
                                       "missingness patterns, degradation",
                          description="Evaluate a trained run on a table split: AUROC/AUPRC/sensitivity/"
                                      "specificity with patient-level bootstrap intervals and paired differences "
                                      "against the baselines, calibration before/after temperature scaling "
                                      "(fitted on validation), a validation-chosen decision threshold, subgroups "
                                      "and missingness patterns, graceful degradation. Writes OUT/metrics.json, "
                                      "report.md, reliability.png, subgroups.png.",
                          epilog=EVAL_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _run_args(ev, EvalConfig, threshold={"choices": THRESHOLD_RULES}, bootstrap={"metavar": "N"})
    ev.set_defaults(func=_eval)

    ex = verbs.add_parser("explain", help="explain one prediction: Shapley values over modalities, attention, "
                                          "what was used, similar past cases",
                          description="Exact Shapley values over the fusion model's modalities (logit space; they "
                                      "sum to f(all) - f(none)), the fusion attention per modality, a plain "
                                      "statement of what was used and, with --index-dir, the k most similar cases "
                                      "of other patients and their neighbour vote.",
                          epilog=EXPLAIN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _run_args(ex, ExplainConfig, format={"choices": OUTPUT_FORMATS}, out={"metavar": "FILE"})
    old_spelling(ex, {"--index": "--index-dir"})
    ex.set_defaults(func=_explain)


def _run_args(p, cls, **field_kwargs) -> None:
    add_config_args(p, cls, run={"metavar": "RUN"}, table={"metavar": "TABLE"}, **field_kwargs)
    old_spelling(p, OLD_RUN_FLAGS)


def _predict(args) -> int:
    from radalign.finetune.predict import predict_split

    from radalign.io import atomic_write_text

    cfg = config_from_args(PredictConfig, args, stage="finetune")
    if args.print_config:
        return print_config(cfg)
    frame = predict_split(cfg.run, table=cfg.table, split=cfg.split, shards=cfg.shards)
    atomic_write_text(cfg.out, frame.to_csv(index=False))
    print(f"{len(frame)} studies scored by {sum(c.startswith('score:') for c in frame.columns)} models -> {cfg.out}")
    return 0


def _eval(args) -> int:
    from radalign.finetune.evaluate import evaluate_run

    cfg = config_from_args(EvalConfig, args, stage="finetune")
    if args.print_config:
        return print_config(cfg)
    subgroups = [c.strip() for c in cfg.subgroups.split(",") if c.strip()] if cfg.subgroups else None
    res = evaluate_run(cfg.run, out=cfg.out, table=cfg.table, split=cfg.split, val_split=cfg.val_split,
                       shards=cfg.shards, model=cfg.model, threshold_rule=cfg.threshold,
                       threshold_target=cfg.target, n_boot=cfg.bootstrap, seed=cfg.seed,
                       min_count=cfg.min_count, subgroups=subgroups)
    au, cal = res["discrimination"]["metrics"]["auroc"], res["calibration"]
    print(f"{res['model']} on {res['run']['split']}: AUROC {_f(au['value'])} ({_f(au['ci_low'])} to "
          f"{_f(au['ci_high'])}), ECE {_f(cal['ece_before'])} -> {_f(cal['ece_after'])} after temperature "
          f"{_f(cal['temperature'], '.2f')} (fitted on {res['run']['val_split']})")
    print("written: " + ", ".join(res["files"].values()))
    return 0


def _f(v, spec: str = ".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def _explain(args) -> int:
    from radalign.finetune.evaluate import explain_study
    from radalign.finetune.explain import write

    cfg = config_from_args(ExplainConfig, args, stage="finetune")
    if args.print_config:
        return print_config(cfg)
    targets = output_targets(cfg.format, cfg.out)
    expl = explain_study(cfg.run, cfg.study_id, index=cfg.index_dir, k=cfg.k, split=cfg.split,
                         table=cfg.table, shards=cfg.shards, model=cfg.model,
                         thumbnail=any(fmt == "html" for fmt, _ in targets))
    for fmt, out in targets:  # one explanation, written in every format asked for
        text = write(expl, fmt, out)
        if out:
            print(f"study {expl.study_id}: probability {expl.probability:.3f} -> {out}")
        else:
            print(text, end="")
    return 0
