"""MODEL_CARD.md, generated from what the run recorded (never typed by hand), written by every export.

    facts = gather(export_folder, run_dir=RUN, evals=[...])   # RunFacts: manifests, config, checkpoints, metrics
    text = render(facts)                                      # Markdown; every recorded string escaped

Sources, all files the pipeline wrote: the export's config.json (model config, checksum, training data), the run
folder's config.yaml, latest checkpoint state (precision, skipped samples) and metrics.jsonl, the shards'
manifest.json (sources, counts, skipped by reason; its sha256 must match the one the export recorded), the shards
themselves (the patient overlap check reads each sample's subject_id), and `radalign zeroshot` metrics.json
files made with these exact weights (their checkpoint checksum equals the export's).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from radalign.data.labels import SPLITS
from radalign.data.shards import split_subjects

from radalign.log import get_logger
from radalign.report import md  # recorded text for Markdown: the kit's one escaping rule

log = get_logger(__name__)

CARD_FILE = "MODEL_CARD.md"
MIMIC_DATA_USE = ("derived from credentialed data: share under the source's data use agreement (MIMIC-CXR: "
                  "PhysioNet Credentialed Health Data Use Agreement 1.5.0; every recipient needs their own "
                  "credentialed access)")
SYNTHETIC_DATA_USE = ("derived from radalign's synthetic stand-in data only (no patient data); no data use "
                      "agreement applies, and the model has no clinical meaning")
UNKNOWN_DATA_USE = ("not recorded: the training data's licence is unknown to radalign; state it with "
                    "`radalign export --data-use TEXT` before sharing")



def _num(x, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def _int(x) -> str:
    return "n/a" if x is None else f"{int(x):,}"


# ----------------------------------------------------------------------------------------------------------
# Gathering


@dataclass
class RunFacts:
    """Everything the card says, read from files; `notes` are what could not be read (stated in the card)."""

    meta: dict
    params: dict
    files: list[tuple[str, int]] = field(default_factory=list)
    run_dir: Path | None = None
    run_cfg: dict = field(default_factory=dict)
    ckpt_state: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    manifest: dict | None = None
    synthetic: bool = False
    overlap: dict | None = None
    evals: list[tuple[str, dict]] = field(default_factory=list)
    excluded_evals: list[tuple[str, str]] = field(default_factory=list)
    data_use: str | None = None
    license: str | None = None
    notes: list[str] = field(default_factory=list)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def param_counts(folder: Path) -> dict:
    """Tensor elements per tower, from the safetensors headers of an export (no weights loaded)."""
    from radalign.pretrain.files import IMAGE_FILE, TEXT_FILE
    from safetensors import safe_open

    out = {}
    for part, name in (("image", IMAGE_FILE), ("text", TEXT_FILE)):
        total = 0
        with safe_open(str(folder / name), framework="pt") as f:
            for key in f.keys():
                n = 1
                for d in f.get_slice(key).get_shape():
                    n *= d
                total += n
        out[part] = total
    out["total"] = out["image"] + out["text"]
    return out


def _history(run_dir: Path) -> list[dict]:
    rows = []
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash; the rest is still the run's record
    return rows


def _checkpoint_state(run_dir: Path) -> dict:
    root = run_dir / "checkpoints"
    pointer = root / "latest"
    if not pointer.is_file():
        return {}
    state = _read_json(root / pointer.read_text().strip() / "trainer_state.json") or {}
    return state.get("state") or {}


def _run_config(run_dir: Path) -> dict:
    import yaml

    path = run_dir / "config.yaml"
    try:
        return yaml.safe_load(path.read_text()) or {} if path.is_file() else {}
    except yaml.YAMLError:
        return {}


def _manifest(meta: dict, notes: list[str]) -> tuple[dict | None, Path | None]:
    """The training shards' manifest, only if its sha256 is the one the export recorded."""
    import hashlib

    data = meta.get("data") or {}
    shards, sha = data.get("shards"), data.get("manifest_sha256")
    if not shards or not sha:
        notes.append("the export does not record its training shards (exported by an older radalign)")
        return None, None
    path = Path(shards) / "manifest.json"
    if not path.is_file():
        notes.append(f"the training shards' manifest {path} is not readable here; data counts are missing")
        return None, None
    if hashlib.sha256(path.read_bytes()).hexdigest() != sha:
        notes.append(f"{path} changed since training (sha256 differs from the recorded {sha[:12]}); "
                     "its counts are not reported")
        return None, None
    return _read_json(path), Path(shards)


def _is_synthetic(manifest: dict) -> bool:
    """The input folder sits in a `radalign data synth` output (its marker file is beside it)."""
    from radalign.data.synth import MARKER

    opts = manifest.get("options") or {}
    for key in ("mimic_cxr", "csv"):
        if opts.get(key) and (Path(opts[key]).parent / MARKER).is_file():
            return True
    return False


def overlap_check(shards: Path, train_split: str) -> dict:
    """Patients of the training split found in the other splits (0 everywhere: the split is by patient)."""
    from radalign import RadalignError

    try:
        subjects = {s: split_subjects(shards, s) for s in SPLITS}
    except (RadalignError, OSError) as e:
        return {"checked": False, "reason": f"shards not readable ({e})"}
    train = subjects.get(train_split, set())
    return {"checked": True, "patients": {s: len(v) for s, v in subjects.items()},
            "shared_with_train": {s: len(train & v) for s, v in subjects.items() if s != train_split}}


def _zeroshot_candidates(run_dir: Path | None) -> list[Path]:
    if run_dir is None:
        return []
    found = []
    for root in (run_dir, run_dir.parent):
        for folder in sorted(root.glob("zeroshot*")):
            found += [folder / "metrics.json"] + sorted(folder.glob("*/metrics.json"))
    return [p for p in found if p.is_file()]


def _evaluations(paths: list[Path], checksum: str, facts: RunFacts) -> None:
    """Keep zero-shot results computed with exactly these weights; say why the others are left out."""
    seen = set()
    for path in paths:
        path = path / "metrics.json" if path.is_dir() else path
        if path.resolve() in seen:
            continue
        seen.add(path.resolve())
        m = _read_json(path)
        if not isinstance(m, dict) or "macro" not in m or "checkpoints" not in m:
            facts.excluded_evals.append((str(path), "not a `radalign zeroshot` metrics.json"))
            continue
        sums = [c.get("checksum") for c in m["checkpoints"]]
        if sums != [checksum]:
            why = (f"an ensemble of {len(sums)} checkpoints" if len(sums) > 1
                   else f"made with other weights (checksum {str(sums[0])[:12]})")
            facts.excluded_evals.append((str(path), why))
            continue
        facts.evals.append((str(path), m))


def gather(export_folder: Path, *, run_dir: Path | None = None, evals: list[Path] | tuple = (),
           data_use: str | None = None, license: str | None = None, overlap: bool = True) -> RunFacts:
    """Read every record the card uses. Missing records become notes, never errors: a card is always written."""
    from radalign import RadalignError

    meta = _read_json(export_folder / "config.json") or {}
    facts = RunFacts(meta=meta, params=param_counts(export_folder), run_dir=run_dir, data_use=data_use,
                     license=license)
    facts.files = [(p.name, p.stat().st_size) for p in sorted(export_folder.iterdir()) if p.is_file()]
    if run_dir is not None:
        facts.run_cfg, facts.ckpt_state, facts.history = _run_config(run_dir), _checkpoint_state(run_dir), _history(run_dir)
    else:
        facts.notes.append("no run folder beside the export: training settings are those config.json records")
    facts.manifest, shards = _manifest(meta, facts.notes)
    if facts.manifest is not None:
        facts.synthetic = _is_synthetic(facts.manifest)
        if overlap:
            try:
                facts.overlap = overlap_check(shards, (meta.get("data") or {}).get("train_split", "train"))
            except RadalignError as e:
                facts.overlap = {"checked": False, "reason": str(e)}
    _evaluations([Path(p) for p in evals] + _zeroshot_candidates(run_dir), meta.get("checksum", ""), facts)
    return facts


# ----------------------------------------------------------------------------------------------------------
# Rendering


def _data_use(f: RunFacts) -> str:
    if f.data_use:
        return f.data_use
    if f.manifest is None:
        return UNKNOWN_DATA_USE
    if f.synthetic:
        return SYNTHETIC_DATA_USE
    opts = f.manifest.get("options") or {}
    if f.manifest.get("source") == "mimic-cxr" or opts.get("mimic_cxr"):
        return MIMIC_DATA_USE
    return UNKNOWN_DATA_USE


def _model_section(f: RunFacts) -> list[str]:
    cfg, meta, p = f.meta.get("model_cfg") or {}, f.meta, f.params
    v, t = cfg.get("vision_cfg") or {}, cfg.get("text_cfg") or {}
    vision = v.get("timm_model_name") or f"ViT {v.get('layers')} x {v.get('width')}, patch {v.get('patch_size')}"
    text = t.get("hf_model_name") or f"transformer {t.get('layers')} x {t.get('width')}, BPE vocabulary {t.get('vocab_size')}"
    return ["## Model", "",
            "| field | value |", "|---|---|",
            f"| model config | {md(meta.get('model_name', 'n/a'))}: {md(cfg.get('description', ''))} |",
            f"| image tower | {md(vision)}, {md(meta.get('image_size'))} px input |",
            f"| text tower | {md(text)}, context {md(t.get('context_length'))} tokens |",
            f"| embedding dimension | {md(meta.get('embed_dim'))} |",
            f"| parameters | {_int(p['total'])} (image {_int(p['image'])}, text {_int(p['text'])}) |",
            f"| image normalisation | mean {md(meta.get('mean'))}, std {md(meta.get('std'))} |",
            f"| learned logit scale | {_num(meta.get('logit_scale'), '.2f')} |",
            f"| weights checksum (sha256 of both tower files) | {md(meta.get('checksum', 'n/a'))} |", ""]


def _split_rule(manifest: dict) -> str:
    opts = manifest.get("options") or {}
    if manifest.get("source") == "mimic-cxr" or opts.get("mimic_cxr"):
        return ("MIMIC-CXR's official split file (mimic-cxr-2.0.0-split.csv.gz), which keeps each patient in one "
                "split; images missing from it were set aside")
    if opts.get("split_col"):
        return f"the CSV's column {opts['split_col']} (train / validate / test)"
    if opts.get("patient_col"):
        return (f"by patient (column {opts['patient_col']}): {opts.get('val_fraction')} of patients to validate, "
                f"{opts.get('test_fraction')} to test, seeded hash (seed {opts.get('seed')})")
    return "by row (no patient column was given: one patient per row)"


def _data_section(f: RunFacts) -> list[str]:
    lines = ["## Training data", ""]
    m = f.manifest
    if m is None:
        return lines + ["Not reported: " + md("; ".join(n for n in f.notes if "shards" in n or "manifest" in n)
                                             or "no manifest"), ""]
    data, opts = f.meta.get("data") or {}, m.get("options") or {}
    splits = m.get("splits") or {}
    lines += [f"- source: {md(m.get('source'))}" + (" (**synthetic stand-in, no patient data**)" if f.synthetic else ""),
              f"- shards: {md(data.get('shards'))}, manifest sha256 {md(data.get('manifest_sha256'))}, "
              f"created {md(m.get('created'))}",
              "- inputs: " + md(", ".join(f"{k}={opts[k]}" for k in ("mimic_cxr", "reports", "csv") if opts.get(k))),
              f"- text: {md(opts.get('text'))}; views: {md(opts.get('views'))}; stored image size: "
              f"{md(opts.get('image_size'))} px; labels: {md(opts.get('labels'))}",
              f"- trained on split: {md(data.get('train_split', 'train'))}",
              "", "| split | samples | shards |", "|---|---|---|"]
    for name, s in splits.items():
        lines.append(f"| {md(name)} | {_int(s.get('samples'))} | {len(s.get('shards') or [])} |")
    skipped = m.get("skipped") or {}
    lines += ["", "Skipped while preparing, by reason: "
              + (md(", ".join(f"{k} {v}" for k, v in skipped.items())) or "none recorded") + "."]
    if m.get("notes"):
        lines.append("Notes: " + md(", ".join(f"{k} {v}" for k, v in m["notes"].items())) + ".")
    lines += ["", "### Split rule", "", md(_split_rule(m)) + ".", ""]
    return lines + _overlap_lines(f)


def _overlap_lines(f: RunFacts) -> list[str]:
    lines = ["### Patient overlap check", ""]
    o = f.overlap
    if o is None:
        return lines + ["Not run (`--no-overlap-check`, or no readable shards).", ""]
    if not o.get("checked"):
        return lines + [f"Not run: {md(o.get('reason'))}.", ""]
    shared = o["shared_with_train"]
    verdict = "passed" if not any(shared.values()) else "**FAILED**: evaluation patients were seen in training"
    counts = ", ".join(f"{k} {v}" for k, v in o["patients"].items())
    return lines + [f"Patients per split (subject_id in each sample): {md(counts)}. Patients of the training split "
                    f"also in: " + md(", ".join(f"{k} {v}" for k, v in shared.items())) + f". Result: {verdict}.", ""]


def _training_section(f: RunFacts) -> list[str]:
    c, s = f.run_cfg, f.ckpt_state
    optim, loss, model = c.get("optim") or {}, c.get("loss") or {}, c.get("model") or {}
    last_loss = next((r["loss"] for r in reversed(f.history) if "loss" in r), None)
    skipped = s.get("skipped") or {}
    init = model.get("pretrained") or "random (Hugging Face text towers start from their own weights)"
    return ["## Training", "",
            "| field | value |", "|---|---|",
            f"| steps | {_int(f.meta.get('trained_steps'))} of {_int(c.get('steps'))} planned |",
            f"| batch | {md(c.get('batch_size', 'n/a'))} per process x {md(c.get('accum_freq', 1))} accumulation "
            f"(global batch = that x processes) |",
            f"| precision | {md(s.get('precision', 'n/a'))} (setting: {md(c.get('precision', 'n/a'))}) |",
            f"| loss | {md(loss.get('kind', 'n/a'))}, false negatives {md(loss.get('false_negatives', 'n/a'))} |",
            f"| optimiser | AdamW lr {md(optim.get('lr', 'n/a'))}, weight decay {md(optim.get('weight_decay', 'n/a'))}, "
            f"warm-up {md(optim.get('warmup_steps', 'n/a'))} steps, cosine |",
            f"| seed | {md(c.get('seed', 'n/a'))} |",
            f"| initial weights | {md(init)} |",
            f"| final training loss | {_num(last_loss)} ({md(loss.get('kind', 'contrastive'))}, nats) |",
            f"| samples skipped while training | {md(', '.join(f'{k} {v}' for k, v in skipped.items()) or 'none')} |",
            ""]


def _eval_section(f: RunFacts) -> list[str]:
    lines = ["## Evaluation", ""]
    if not f.evals:
        lines += ["No held-out evaluation made with these weights was found. Run `radalign zeroshot eval --export RUN "
                  "--shards SHARDS --split test --out RUN/../zeroshot`, then export again to include it here.", ""]
    for path, m in f.evals:
        lines += _one_eval(path, m)
    val = next((r for r in reversed(f.history) if "val/zeroshot_macro_auroc" in r), None)
    if val:
        lines += [f"Monitoring during training (validate split, no interval, not an evaluation): zero-shot macro "
                  f"AUROC {_num(val['val/zeroshot_macro_auroc'])}, image-to-report recall@10 "
                  f"{_num(val.get('val/i2t_R@10'))}.", ""]
    for path, why in f.excluded_evals:
        lines.append(f"- not included: {md(path)} ({md(why)})")
    return lines + ([""] if f.excluded_evals else [])


def _one_eval(path: str, m: dict) -> list[str]:
    mac, boot, data = m.get("macro") or {}, m.get("bootstrap") or {}, m.get("data") or {}
    level = round(100 * float(mac.get("level") or boot.get("level") or 0.95))
    unit = f"{level}% CI, percentile bootstrap over {md(boot.get('unit', 'patient'))}s ({_int(boot.get('n_units'))}, " \
           f"{_int(boot.get('n_boot'))} resamples)"
    lines = [f"### Zero-shot, prompt set {md(m.get('prompt_set'))} ({md(m.get('mode'))})", "",
             f"From {md(path)}. Data: {md(data.get('source'))}, {_int(data.get('n_scored'))} images of "
             f"{_int(data.get('n_patients'))} patients; label policy: "
             + md(", ".join(f"{k} {v}" for k, v in (m.get("label_policy") or {}).items())) + ".", "",
             f"Macro AUROC over {md(', '.join(mac.get('classes') or []))}: **{_num(mac.get('auroc'))}** "
             f"[{_num(mac.get('ci_low'))}, {_num(mac.get('ci_high'))}] ({unit}).", "",
             "| finding | AUROC | CI low | CI high | positives | negatives |", "|---|---|---|---|---|---|"]
    for name, c in (m.get("classes") or {}).items():
        lines.append(f"| {md(name)} | {_num(c.get('auroc'))} | {_num(c.get('ci_low'))} | {_num(c.get('ci_high'))} | "
                     f"{_int(c.get('n_pos'))} | {_int(c.get('n_neg'))} |")
    return lines + [""]


def _limitations(f: RunFacts) -> list[str]:
    opts = (f.manifest or {}).get("options") or {}
    out = []
    if f.synthetic:
        out.append("Trained on synthetic stand-in images and reports: the model has no clinical meaning.")
    elif (f.manifest or {}).get("source") == "mimic-cxr":
        out.append("Single-centre data (MIMIC-CXR: Beth Israel Deaconess Medical Center, Boston): expect lower "
                   "performance on other hospitals, scanners and populations.")
    if opts.get("views"):
        out.append(f"Trained on {md(', '.join(map(str, opts['views'])))} views only; other views are out of scope.")
    out.append(f"Images are seen at {md(f.meta.get('image_size'))} px: findings smaller than a few pixels at that "
               "size cannot be detected.")
    out.append("Reports are English; zero-shot scores depend on the prompt wording (see the prompt sensitivity "
               "table of `radalign zeroshot`).")
    if not f.evals:
        out.append("No held-out evaluation is recorded for these weights.")
    if f.overlap and f.overlap.get("checked") and any(f.overlap["shared_with_train"].values()):
        out.append("Evaluation patients were seen in training: evaluation numbers on those splits are optimistic.")
    out.append("A research model, not a medical device: do not use it for diagnosis.")
    return ["## Known limitations", ""] + [f"- {x}" for x in out] + [""]


def _licence(f: RunFacts) -> list[str]:
    init = (f.run_cfg.get("model") or {}).get("pretrained")
    lines = ["## Licence and data use", "",
             f"- data use: {md(_data_use(f))}",
             f"- weights licence: {md(f.license or 'as the data use above allows; the radalign code is Apache-2.0')}"]
    if init:
        lines.append(f"- initial weights {md(init)} keep their own licence (docs/models.md lists the public ones)")
    return lines + [""]


def render(f: RunFacts, *, title: str | None = None, extra: list[str] | None = None) -> str:
    name = f.meta.get("model_name") or "radalign model"
    lines = [f"# {md(title or f'Model card: {name}')}", "",
             f"Generated by radalign on {time.strftime('%Y-%m-%d %H:%M')} from what the run recorded. Values in "
             "this card are read from files, not typed: regenerate it with `radalign export` rather than editing.",
             ""]
    lines += _model_section(f) + _data_section(f) + _training_section(f) + _eval_section(f)
    lines += _limitations(f) + _licence(f) + (extra or [])
    lines += ["## Files", "", "| file | bytes |", "|---|---|"]
    lines += [f"| {md(n)} | {_int(b)} |" for n, b in f.files]
    if f.notes:
        lines += ["", "## Notes", ""] + [f"- {md(n)}" for n in f.notes]
    return "\n".join(lines) + "\n"
