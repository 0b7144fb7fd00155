"""`radalign data link-ehr`: each study of the shards joined to the patient's MIMIC-IV record at the film.

`LinkEhrConfig`'s fields (flags, YAML, key=value) map one-to-one onto `data.ehr.link_ehr` arguments; docs/ehr.md has the rule, columns and manifest.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Optional

from radalign.cli import add_config_args, config_from_args, print_config


@dataclass
class LinkEhrConfig:
    """`radalign data link-ehr`: each study of the shards joined to the patient's MIMIC-IV record at the film."""

    mimic_iv: str = ""
    """MIMIC-IV folder holding hosp/ (and icu/)."""
    shards: str = ""
    """The --out folder of `radalign data prepare`."""
    out: str = ""
    """Output folder."""
    features: str = "ehr/core"
    """Feature list: a YAML path or a name under configs/."""
    window_hours: float = 24.0
    """A lab counts when drawn within this many hours before the film."""
    memory_limit: str = "2GB"
    """DuckDB memory limit; it spills to disk beyond."""
    cache: Optional[str] = None
    """Folder for the Parquet conversion of labevents/chartevents (None: OUT/cache)."""
    threads: int = 0
    """DuckDB threads (0: all cores)."""
    progress: bool = True
    """Show a progress bar."""

    def validate(self) -> list[str]:
        return [f"{key}: none given; pass --{key.replace('_', '-')} DIR"
                for key in ("mimic_iv", "shards", "out") if not getattr(self, key)]


def register(verbs) -> None:
    p = verbs.add_parser(
        "link-ehr", help="join each study to the patient's MIMIC-IV record as it stood at the film",
        description="One row per study of the shards (all splits): admission, demographics, labs (and ICU vitals)\n"
                    "available at the film's time, outcomes after it -> OUT/ehr.parquet, OUT/finetune/ (datasets),\n"
                    "OUT/manifest.json. See docs/ehr.md.\n"
                    "Example: radalign data link-ehr --mimic-iv /data/mimic-iv/2.2 --shards /data/shards "
                    "--out /data/ehr",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, LinkEhrConfig, mimic_iv={"metavar": "DIR"}, shards={"metavar": "DIR"}, out={"metavar": "DIR"},
                    features={"metavar": "NAME"}, window_hours={"metavar": "H"}, memory_limit={"metavar": "SIZE"},
                    cache={"metavar": "DIR"}, threads={"metavar": "N"})
    p.add_argument("--overwrite", action="store_true",
                   help="replace an output made with other options (or redo an up-to-date one)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from radalign.data.ehr import link_ehr

    from radalign.log import rprint

    cfg = config_from_args(LinkEhrConfig, args, stage="data")
    if args.print_config:
        return print_config(cfg)
    m = link_ehr(cfg.mimic_iv, cfg.shards, cfg.out, features=cfg.features, window_hours=cfg.window_hours,
                 memory_limit=cfg.memory_limit, cache=cfg.cache, threads=cfg.threads,
                 overwrite=args.overwrite, progress=cfg.progress)
    rprint(summary(m, cfg.out))
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
