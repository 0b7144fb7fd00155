"""`radalign finetune eval` and `radalign finetune explain` (parsers and handlers; the work is in
finetune.evaluate)."""

from __future__ import annotations

import argparse

EVAL_EXAMPLES = """examples:
  radalign finetune eval --checkpoint runs/demo/finetune/in_hospital_mortality \\
      --out runs/demo/finetune/in_hospital_mortality/eval
  radalign finetune eval --checkpoint RUN --threshold sensitivity --target 0.9 --bootstrap 2000
"""
EXPLAIN_EXAMPLES = """examples:
  radalign finetune explain --checkpoint runs/demo/finetune/in_hospital_mortality --study-id 50000123 \\
      --index runs/demo/retrieval/index --format html --out explain.html
  radalign finetune explain --checkpoint RUN --study-id 50000123 --format json
"""


def register_eval(verbs) -> None:
    ev = verbs.add_parser("eval", help="clinical evaluation: intervals, calibration, thresholds, subgroups, "
                                       "missingness patterns, degradation",
                          description="Evaluate a trained run on a table split: AUROC/AUPRC/sensitivity/"
                                      "specificity with patient-level bootstrap intervals and paired differences "
                                      "against the baselines, calibration before/after temperature scaling "
                                      "(fitted on validation), a validation-chosen decision threshold, subgroups "
                                      "and missingness patterns, graceful degradation. Writes OUT/metrics.json, "
                                      "report.md, reliability.png, subgroups.png.",
                          epilog=EVAL_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _run_args(ev)
    ev.add_argument("--split", help="split to evaluate (default: the run's data.test_split)")
    ev.add_argument("--val-split", help="split the threshold and temperature are fitted on (default: the run's "
                                        "data.val_split; never the evaluated split)")
    ev.add_argument("--out", required=True, help="folder for metrics.json, report.md and the PNGs")
    ev.add_argument("--threshold", default="youden", choices=("youden", "sensitivity", "specificity"),
                    help="decision-threshold rule, applied on validation (default: %(default)s)")
    ev.add_argument("--target", type=float, help="target sensitivity/specificity for --threshold "
                                                 "sensitivity|specificity, e.g. 0.9")
    ev.add_argument("--bootstrap", type=int, metavar="N", help="patient bootstrap resamples (default: the run's "
                                                               "bootstrap)")
    ev.add_argument("--seed", type=int, help="bootstrap seed (default: the run's seed)")
    ev.add_argument("--min-count", type=int, default=20, help="smallest labelled group (or cell) that is scored; "
                                                              "smaller ones are counted only (default: %(default)s)")
    ev.add_argument("--subgroups", help="comma-separated subgroup columns (default: gender,age_band,race,"
                                        "insurance,modalities,labs)")
    ev.set_defaults(func=_eval)

    ex = verbs.add_parser("explain", help="explain one prediction: Shapley values over modalities, attention, "
                                          "what was used, similar past cases",
                          description="Exact Shapley values over the fusion model's modalities (logit space; they "
                                      "sum to f(all) - f(none)), the fusion attention per modality, a plain "
                                      "statement of what was used and, with --index, the k most similar cases of "
                                      "other patients and their neighbour vote.",
                          epilog=EXPLAIN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _run_args(ex)
    ex.add_argument("--study-id", required=True, help="study to explain (a study_id of the table)")
    ex.add_argument("--split", help="table split holding the study (default: look in every split)")
    ex.add_argument("--index", metavar="INDEX_DIR", help="retrieval index built with the run's encoders "
                                                         "(`radalign retrieval build`) for similar cases")
    ex.add_argument("--k", type=int, default=5, help="similar cases to show (default: %(default)s)")
    ex.add_argument("--format", default="json", choices=("json", "markdown", "html"),
                    help="output format (default: %(default)s)")
    ex.add_argument("--out", metavar="FILE", help="file to write (default: print)")
    ex.set_defaults(func=_explain)


def _run_args(p) -> None:
    p.add_argument("--checkpoint", required=True, metavar="RUN", help="finetune run folder")
    p.add_argument("--data", metavar="TABLE", help="finetune table (default: the run's data.table)")
    p.add_argument("--shards", help="shards holding the table's films (default: the run's data.shards)")
    p.add_argument("--model", default="fusion", help="saved model to evaluate/explain (default: %(default)s)")


def _eval(args) -> int:
    from radalign.finetune.evaluate import evaluate_run

    from radalign import RadalignError

    if args.threshold != "youden" and args.target is None:
        raise RadalignError(f"--threshold {args.threshold} needs --target, e.g. --target 0.9")
    if args.bootstrap is not None and args.bootstrap < 1:
        raise RadalignError(f"--bootstrap {args.bootstrap}: need at least 1 resample (e.g. 1000)")
    subgroups = [c.strip() for c in args.subgroups.split(",") if c.strip()] if args.subgroups else None
    res = evaluate_run(args.checkpoint, out=args.out, table=args.data, split=args.split, val_split=args.val_split,
                       shards=args.shards, model=args.model, threshold_rule=args.threshold,
                       threshold_target=args.target, n_boot=args.bootstrap, seed=args.seed,
                       min_count=args.min_count, subgroups=subgroups)
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

    expl = explain_study(args.checkpoint, args.study_id, index=args.index, k=args.k, split=args.split,
                         table=args.data, shards=args.shards, model=args.model, thumbnail=args.format == "html")
    text = write(expl, args.format, args.out)
    if args.out:
        print(f"study {expl.study_id}: probability {expl.probability:.3f} -> {args.out}")
    else:
        print(text, end="")
    return 0
