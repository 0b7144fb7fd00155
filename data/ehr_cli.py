"""`radalign data link-ehr`: each study of the shards joined to the patient's MIMIC-IV record at the film.

Flags map one-to-one onto `data.ehr.link_ehr` arguments; docs/ehr.md has the rule, columns and manifest.
"""

from __future__ import annotations

import argparse


def register(verbs) -> None:
    p = verbs.add_parser(
        "link-ehr", help="join each study to the patient's MIMIC-IV record as it stood at the film",
        description="One row per study of the shards (all splits): admission, demographics, labs (and ICU vitals)\n"
                    "available at the film's time, outcomes after it -> OUT/ehr.parquet, OUT/finetune/ (datasets),\n"
                    "OUT/manifest.json. See docs/ehr.md.\n"
                    "Example: radalign data link-ehr --mimic-iv /data/mimic-iv/2.2 --shards /data/shards "
                    "--out /data/ehr",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mimic-iv", required=True, metavar="DIR", help="MIMIC-IV folder holding hosp/ (and icu/)")
    p.add_argument("--shards", required=True, metavar="DIR", help="the --out folder of `radalign data prepare`")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--features", default="ehr/core", metavar="NAME",
                   help="feature list: a YAML path or a name under configs/ (default: %(default)s)")
    p.add_argument("--window-hours", type=float, default=24.0, metavar="H",
                   help="a lab counts when drawn within H hours before the film (default: %(default)s)")
    p.add_argument("--memory-limit", default="2GB", metavar="SIZE",
                   help="DuckDB memory limit; it spills to disk beyond (default: %(default)s)")
    p.add_argument("--cache", metavar="DIR",
                   help="folder for the Parquet conversion of labevents/chartevents (default: OUT/cache)")
    p.add_argument("--threads", type=int, default=0, metavar="N", help="DuckDB threads (default: all cores)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an output made with other options (or redo an up-to-date one)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from radalign.data.ehr import link_ehr

    from radalign.log import rprint

    m = link_ehr(args.mimic_iv, args.shards, args.out, features=args.features, window_hours=args.window_hours,
                 memory_limit=args.memory_limit, cache=args.cache, threads=args.threads,
                 overwrite=args.overwrite, progress=not args.no_progress)
    rprint(summary(m, args.out))
    return 0


def summary(m: dict, out) -> str:
    """A few lines: studies, admissions, coverage, skipped counts."""
    lines = [f"{out}: {m['rows_written']['ehr.parquet']:,} studies "
             f"({', '.join(f'{k} {v:,}' for k, v in m['rows_written']['finetune'].items())}) "
             f"in {m.get('seconds', {}).get('total', 0):.1f} s",
             f"  no study_datetime {m['studies_without_datetime']:,}, no admission {m['studies_no_admission']:,}, "
             f"subjects absent from patients {m['subjects_absent_from_patients']:,}, "
             f"films dated after the death date {m['films_after_death']:,} (death outcomes null)"]
    cov = ", ".join(f"{k} {v['fraction']:.0%}" for k, v in m["feature_coverage"].items())
    lines.append(f"  coverage (share of studies with a value): {cov}")
    sk = m["skipped_events"]
    lines.append(f"  in-window events skipped: not yet resulted {sum(v['not_yet_resulted'] for v in sk.values()):,}, "
                 f"non-numeric {sum(v['non_numeric'] for v in sk.values()):,}")
    lines.append(f"  files: {out}/ehr.parquet, {out}/finetune/, {out}/manifest.json")
    return "\n".join(lines)
