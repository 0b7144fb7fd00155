"""`radalign summary RUN_ROOT`: the headline numbers of a pipeline run (the demo's closing summary).

It reads only the metrics.json files the stages wrote under RUN_ROOT (the `make demo` layout: zeroshot/,
retrieval/, retrieval/classify/, finetune/<task>/) and imports no stage: the files are the contract. A file that
is not there is named on stderr and left out; the command fails only when none is there.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

# finetune task folder -> the name printed for it (others print the folder name with spaces)
TASK_NAMES = {"in_hospital_mortality": "in-hospital mortality"}


def _zeroshot(m: dict) -> list[str]:
    a = m["macro"]
    return [f"zero-shot macro AUROC {a['auroc']:.3f} [{a['ci_low']:.3f}, {a['ci_high']:.3f}] over "
            f"{', '.join(a['classes'])}; shuffled-label control {m['controls']['shuffled_labels_macro_auroc']:.3f}"]


def _retrieval(m: dict) -> list[str]:
    return ["retrieval: " + json.dumps(m.get("summary", m))[:400]]


def _classify(m: dict) -> list[str]:
    c = m["comparison"]["macro"]
    return [f"retrieval classify (k-NN vote of the index): macro AUROC {c['value_a']:.3f} vs prompt zero-shot "
            f"{c['value_b']:.3f}, paired difference {c['delta']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}] "
            f"over {int(c['n_patients'])} patients"]


def _finetune(m: dict, task: str) -> list[str]:
    """A task's test AUROCs, fusion's paired differences and, when run, the degradation table."""
    models = "; ".join(f"{k} {v['auroc']:.3f} [{v['ci_low']:.3f}, {v['ci_high']:.3f}]"
                       for k, v in m["models"].items())
    diffs = "; ".join(f"{k[len('fusion_vs_'):]} {v['delta']:+.3f} [{v['ci_low']:+.3f}, {v['ci_high']:+.3f}]"
                      for k, v in m["paired_differences"].items())
    lines = [f"{TASK_NAMES.get(task, task.replace('_', ' '))}, test AUROC [95% CI over patients]: {models}",
             f"fusion minus each: {diffs}"]
    d = m.get("degradation")
    if d and d.get("n_seeds"):
        rows = "; ".join(f"{r['removed']} removed {r['with_dropout']['over_seeds']['drop_mean']:+.3f} / "
                         f"{r['without_dropout']['over_seeds']['drop_mean']:+.3f}" for r in d["rows"] if r["removed"])
        lines.append(f"graceful degradation, mean AUROC drop over {int(d['n_seeds'])} training seeds, with / without "
                     f"modality dropout: {rows}")
    elif d:  # one training seed (baselines.degradation_seeds=1): the reported pair's drops, with their intervals
        rows = "; ".join(f"{r['removed']} removed {_drop(r['with_dropout'])} / {_drop(r['without_dropout'])}"
                         for r in d["rows"] if r["removed"])
        lines.append(f"graceful degradation, AUROC drop [95% CI over patients] of one training seed, with / without "
                     f"modality dropout: {rows}")
    return lines


def _drop(r: dict) -> str:
    from radalign.report import ci_of  # the report kit's interval text ("–" where a bound is undefined)

    return str(ci_of(r.get("drop"), "delta", signed=True))


def _sections(root: Path) -> list[tuple[Path, Callable[[dict], list[str]]]]:
    """(metrics.json path, formatter) in the order the demo prints them."""
    out: list[tuple[Path, Callable[[dict], list[str]]]] = [(root / "zeroshot" / "metrics.json", _zeroshot),
                                      (root / "retrieval" / "metrics.json", _retrieval),
                                      (root / "retrieval" / "classify" / "metrics.json", _classify)]
    tasks = sorted(p.parent for p in (root / "finetune").glob("*/metrics.json"))
    tasks = tasks or [root / "finetune" / "in_hospital_mortality"]  # named on stderr when absent
    out += [(t / "metrics.json", partial(_finetune, task=t.name)) for t in tasks]
    return out


def summary_lines(root: str | Path) -> tuple[list[str], list[Path]]:
    """The summary's lines, and the metrics files that were not there."""
    lines, missing = [], []
    for path, fmt in _sections(Path(root)):
        if path.is_file():
            lines += fmt(json.loads(path.read_text()))
        else:
            missing.append(path)
    return lines, missing


def register(sub) -> None:
    p = sub.add_parser("summary", help="print the headline numbers of a pipeline run (e.g. runs/demo)",
                       description="The headline numbers of a run folder laid out like `make demo`'s: zero-shot, "
                                   "retrieval, retrieval classify and each finetune task (read from their "
                                   "metrics.json files).\nExample: radalign summary runs/demo")
    p.add_argument("root", metavar="RUN_ROOT", help="the pipeline's output folder, e.g. runs/demo")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    lines, missing = summary_lines(args.root)
    for path in missing:
        print(f"summary: {path} not found (that step has not run); left out", file=sys.stderr)
    if not lines:
        return 2
    print("\n".join(lines))
    return 0
