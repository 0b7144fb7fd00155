"""`radalign data VERB`: synth, prepare (MIMIC-CXR), prepare-csv (any CSV), prepare-dicom (DICOM), info.

Flags of prepare / prepare-csv / prepare-dicom map one-to-one onto `data.prepare.PrepareConfig` fields (their help is the
field's docstring); unset flags keep the dataclass defaults, so the defaults live in one place. Extra
`key=value` arguments set any other field (e.g. `jpeg_quality=85`).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from radalign.data.shards import read_manifest

from radalign.cli import add_config_args, config_from_args, old_spelling, print_config


def register(sub) -> None:
    from radalign.cli import Parser

    class VerbParser(Parser):
        """Reports an unknown option itself, so `Parser.error` can suggest the closest of *this verb's* options
        (left to argparse, the error is raised by the top-level parser, which knows none of them)."""

        def parse_known_args(self, args=None, namespace=None):
            namespace, extras = super().parse_known_args(args, namespace)
            unknown = [a for a in extras if a.startswith("-")]
            if unknown:
                self.error(f"unrecognized arguments: {' '.join(unknown)}")
            return namespace, extras

    p = sub.add_parser("data", help="synthetic data, MIMIC-CXR / CSV / DICOM -> webdataset shards, manifest summary",
                       description="Prepare training data: write webdataset shards from MIMIC-CXR-JPG, a CSV or "
                                   "DICOM files.\n"
                                   "See docs/data.md for the MIMIC files and the exact commands.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = p.add_subparsers(dest="verb", metavar="VERB", parser_class=VerbParser)
    verbs.required = True
    _add_synth(verbs)
    _add_prepare(verbs)
    _add_prepare_csv(verbs)
    _add_prepare_dicom(verbs)
    from radalign.data import ehr_cli

    ehr_cli.register(verbs)  # link-ehr (data/ehr_cli.py)
    info = verbs.add_parser("info", help="summarise a prepared folder's manifest.json",
                            description="Print samples and shards per split, skipped items by reason, options.")
    info.add_argument("dir", metavar="DIR", help="the --out folder of `data prepare` / `data prepare-csv`")
    info.add_argument("--json", action="store_true", help="print the manifest itself")
    info.set_defaults(func=_info)


# ----------------------------------------------------------------------------------------------------------
# Parsers.


@dataclass
class SynthConfig:
    """`radalign data synth`: a deterministic synthetic MIMIC-CXR / MIMIC-IV stand-in."""

    out: str = ""
    """Output folder."""
    patients: int = 2000
    """Number of patients."""
    seed: int = 0
    """Random seed."""
    image_size: int = 256
    """Image short side in pixels."""
    difficulty: float = 0.3
    """0 = obvious visual correlates of each finding, 1 = subtle."""
    num_workers: int = 1
    """Processes."""
    images: bool = True
    """Write the JPEGs (False: every table and report but no JPEG; enough for link-ehr and the truth table, and
    the tables are the same as with images)."""
    icu: bool = True
    """Write mimic-iv/icu (icustays, chartevents, d_items)."""
    dicom: bool = False
    """Also write each film as DICOM (CR/DX, 12-bit, MONOCHROME1/2, some RLE / JPEG 2000) under
    OUT/mimic-cxr/files/, laid out like MIMIC-CXR; each JPG is then the MIMIC-CXR-JPG conversion of its DICOM
    (docs/data.md, DICOM)."""
    progress: bool = True
    """Show a progress bar."""

    def validate(self) -> list[str]:
        return [] if self.out else ["out: none given; pass --out DIR"]


def _add_synth(verbs) -> None:
    p = verbs.add_parser("synth", help="write a synthetic MIMIC-CXR / MIMIC-IV stand-in",
                         description="Deterministic synthetic chest radiographs, reports, labels and labs in the "
                                     "MIMIC-CXR-JPG / mimic-cxr-reports / MIMIC-IV layout.\n"
                                     "Example: radalign data synth --out runs/synth --patients 2000")
    add_config_args(p, SynthConfig, out={"metavar": "DIR"}, image_size={"metavar": "PX"})
    p.add_argument("--overwrite", action="store_true",
                   help="regenerate even when OUT already holds a finished set made with the same arguments")
    old_spelling(p, {"--workers": "--num-workers", "--force": "--overwrite"})
    p.set_defaults(func=_synth)


def _field_help(name: str, docs: dict, defaults: dict) -> str:
    return f"{docs.get(name, '')} (default: {defaults[name]})".replace("%", "%%")


def _common(p, docs: dict, defaults: dict) -> None:
    """Options shared by prepare and prepare-csv."""
    p.add_argument("--out", metavar="DIR", required=True, help=docs["out"])
    p.add_argument("--text", metavar="MODE", help=_field_help("text", docs, defaults))
    p.add_argument("--image-size", type=int, metavar="PX", help=_field_help("image_size", docs, defaults))
    p.add_argument("--shard-size", type=int, metavar="N", help=_field_help("shard_size", docs, defaults))
    p.add_argument("--num-workers", dest="workers", type=int, metavar="N",
                   help="[key workers] " + _field_help("workers", docs, defaults))
    p.add_argument("--max-pixels", type=int, metavar="N", help=_field_help("max_pixels", docs, defaults))
    p.add_argument("--seed", type=int, help=_field_help("seed", docs, defaults))
    p.add_argument("--overwrite", action="store_true",
                   help="rewrite every shard, even when OUT holds complete shards made with other options")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--config", metavar="NAME_OR_YAML",
                   help="a YAML of PrepareConfig fields; flags, then key=value, override it")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="any other PrepareConfig field, e.g. jpeg_quality=85")
    old_spelling(p, {"--workers": "--num-workers"})


def _defaults() -> tuple[dict, dict]:
    from radalign.data.prepare import PrepareConfig

    from radalign.config import describe, field_docs

    return field_docs(PrepareConfig), {k: d for k, d, _ in describe(PrepareConfig)}


def _add_prepare(verbs) -> None:
    docs, defaults = _defaults()
    p = verbs.add_parser(
        "prepare", help="MIMIC-CXR-JPG + reports -> webdataset shards and manifest.json",
        description="Join MIMIC-CXR-JPG metadata, split and labels with the reports; write one sample per image.\n"
                    "Resumable: re-running finishes missing shards and leaves complete ones alone.\n"
                    "Example: radalign data prepare --mimic-cxr /data/mimic-cxr-jpg/2.1.0 "
                    "--reports /data/mimic-cxr-reports --out /data/shards --num-workers 16",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mimic-cxr", metavar="DIR", help=docs["mimic_cxr"])
    p.add_argument("--reports", metavar="DIR", help=docs["reports"])
    p.add_argument("--views", metavar="V1,V2", help=_field_help("views", docs, defaults))
    p.add_argument("--labels", metavar="SOURCE", help=_field_help("labels", docs, defaults))
    _common(p, docs, defaults)
    p.set_defaults(func=_prepare, kind="mimic")


def _add_prepare_csv(verbs) -> None:
    docs, defaults = _defaults()
    p = verbs.add_parser(
        "prepare-csv", help="any CSV of image paths + report text -> the same shards and manifest",
        description="Shards from a CSV with one row per image (CheXpert, Open-i, in-house).\n"
                    "Example: radalign data prepare-csv --csv openi.csv --image-col path --text-col findings "
                    "impression --patient-col uid --out /data/openi-shards",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _csv_flags(p, docs)
    _common(p, docs, defaults)
    p.set_defaults(func=_prepare, kind="csv")


def _csv_flags(p, docs: dict) -> None:
    """The flags naming a CSV of images and texts (prepare-csv, prepare-dicom)."""
    p.add_argument("--csv", metavar="FILE", help=docs["csv"])
    p.add_argument("--image-col", metavar="C", help=docs["image_col"])
    p.add_argument("--text-col", metavar="C", nargs="+", help=docs["text_col"])
    p.add_argument("--label-cols", metavar="C", nargs="+", help=docs["label_cols"] + " Comma lists work too.")
    p.add_argument("--split-col", metavar="C", help=docs["split_col"])
    p.add_argument("--patient-col", metavar="C", help=docs["patient_col"])
    p.add_argument("--study-col", metavar="C", help=docs["study_col"])
    p.add_argument("--image-root", metavar="DIR", help=docs["image_root"])
    p.add_argument("--allow-outside-root", action="store_true", default=None, help=docs["allow_outside_root"])
    p.add_argument("--encoding", metavar="NAME", help=docs["encoding"])


def _add_prepare_dicom(verbs) -> None:
    docs, defaults = _defaults()
    p = verbs.add_parser(
        "prepare-dicom", help="DICOM (MIMIC-CXR layout, or a CSV of .dcm paths + texts) -> the same shards",
        description="Shards from DICOM radiographs, converted as MIMIC-CXR-JPG was made (docs/data.md, DICOM).\n"
                    "MIMIC-CXR layout: --mimic-cxr DIR (files/pNN/pSUBJECT/sSTUDY/DICOM_ID.dcm) --reports DIR\n"
                    "  [--tables DIR with the mimic-cxr-2.0.0-*.csv.gz metadata/split/labels, each used when present]\n"
                    "A CSV of texts: --csv FILE --image-col C --text-col C ... (as prepare-csv; images are .dcm)\n"
                    "Example: radalign data prepare-dicom --mimic-cxr /data/mimic-cxr/2.0.0 --reports "
                    "/data/mimic-cxr-reports --tables /data/mimic-cxr-jpg/2.1.0 --out /data/shards --num-workers 16",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mimic-cxr", metavar="DIR", help="MIMIC-CXR (DICOM) root holding files/p10/... .dcm; give with "
                                                       "--reports (or use --csv)")
    p.add_argument("--reports", metavar="DIR", help=docs["reports"])
    p.add_argument("--tables", metavar="DIR", help=docs["tables"])
    p.add_argument("--views", metavar="V1,V2", help=_field_help("views", docs, defaults) +
                   ". Without a metadata file the DICOM header's ViewPosition decides")
    p.add_argument("--labels", metavar="SOURCE", help=_field_help("labels", docs, defaults))
    p.add_argument("--dicom-transform", metavar="NAME", help=_field_help("dicom_transform", docs, defaults))
    p.add_argument("--modalities", metavar="M1,M2", help=_field_help("modalities", docs, defaults))
    _csv_flags(p, docs)
    _common(p, docs, defaults)
    p.set_defaults(func=_prepare, kind="dicom")


# ----------------------------------------------------------------------------------------------------------
# Handlers.


def _config_from_args(args):
    """Set flags -> PrepareConfig (validated: one RadalignError listing every problem)."""
    from radalign.data.prepare import PrepareConfig

    from radalign.config import load_config

    flags = {"out": args.out, "text": args.text, "image_size": args.image_size, "shard_size": args.shard_size,
             "workers": args.workers, "seed": args.seed, "max_pixels": args.max_pixels}
    if args.kind == "dicom":
        flags.update(dicom=True, tables=args.tables, dicom_transform=args.dicom_transform,
                     modalities=_comma_list(args.modalities))
    if args.kind in ("mimic", "dicom"):
        flags.update(mimic_cxr=args.mimic_cxr, reports=args.reports, labels=args.labels,
                     views=_comma_list(args.views))
    if args.kind in ("csv", "dicom"):
        labels = None
        if args.label_cols is not None:
            labels = [c.strip() for arg in args.label_cols for c in arg.split(",") if c.strip()]
        flags.update(csv=args.csv, image_col=args.image_col, text_col=args.text_col, label_cols=labels,
                     split_col=args.split_col, patient_col=args.patient_col, study_col=args.study_col,
                     image_root=args.image_root, allow_outside_root=args.allow_outside_root,
                     encoding=args.encoding)
    given = {k: (v, f"--{k.replace('_', '-')} {v}") for k, v in flags.items() if v is not None}
    return load_config(PrepareConfig, args.config, args.overrides, stage="data", flags=given)


def _comma_list(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",")] if value is not None else None


def _prepare(args) -> int:
    from radalign.data.prepare import prepare

    from radalign.log import rprint

    cfg = _config_from_args(args)
    if args.print_config:
        return print_config(cfg)
    manifest = prepare(cfg, overwrite=args.overwrite, progress=not args.no_progress)
    rprint(summary(manifest, cfg.out))
    return 0


def _synth(args) -> int:
    from radalign.data.synth import synth_complete, synthesize

    from radalign.log import rprint

    cfg = config_from_args(SynthConfig, args, stage="data")
    if args.print_config:
        return print_config(cfg)
    same = dict(patients=cfg.patients, seed=cfg.seed, image_size=cfg.image_size, difficulty=cfg.difficulty,
                images=cfg.images, icu=cfg.icu, with_dicom=cfg.dicom)
    if not args.overwrite and synth_complete(cfg.out, **same):
        rprint(f"{cfg.out}: a finished synthetic set with these arguments is already there; skipping "
               "(--overwrite regenerates)")
        return 0
    result = synthesize(cfg.out, workers=cfg.num_workers, progress=cfg.progress, **same)
    counts = {k: v for k, v in result.items() if isinstance(v, int)}
    rprint(f"synthetic MIMIC stand-in in {cfg.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    rprint(f"summary with every path written: {Path(cfg.out) / 'synth.json'}")
    return 0


def _info(args) -> int:
    from radalign.log import rprint

    manifest = read_manifest(args.dir)
    rprint(json.dumps(manifest, indent=2) if args.json else summary(manifest, args.dir))
    return 0


def summary(manifest: dict, root) -> str:
    """A few lines: samples and shards per split, skipped by reason, notes, options."""
    lines = [f"{root}: {manifest.get('source', '?')} shards, created {manifest.get('created', '?')}"]
    for split, entry in manifest.get("splits", {}).items():
        lines.append(f"  {split:<9} {entry.get('samples', 0):>9,} samples in {len(entry.get('shards', [])):>5} shards")
    skipped = manifest.get("skipped", {})
    lines.append(f"  skipped   {sum(skipped.values()):>9,}: "
                 + ", ".join(f"{k} {v:,}" for k, v in skipped.items()))
    notes = manifest.get("notes", {})
    if notes:
        lines.append("  notes     " + ", ".join(f"{k} {v:,}" for k, v in notes.items()))
    opts = manifest.get("options", {})
    keys = ("views", "text", "image_size", "shard_size")
    lines.append("  options   " + ", ".join(f"{k}={opts[k]}" for k in keys if k in opts))
    return "\n".join(lines)
