"""`radalign finetune eval` and `radalign finetune explain` as library calls on a finished run.

    res = evaluate_run("runs/demo/finetune/in_hospital_mortality", out="…/eval")   # metrics.json, report.md, PNGs
    expl = explain_study(RUN, study_id=50000123, index="runs/demo/retrieval/index", k=5)
    finetune.explain.write(expl, "html", "explain.html")

Evaluation: predictions of every saved model on the test split and on validation (thresholds and temperature
are fitted there, never on test), group columns from the split's table rows (sex, age band, race, insurance,
which modalities were present, labs present/absent), and the graceful-degradation logits of the fusion models
(each modality masked at test time). Every saved model (finetune.registry) is scored, late_fusion and gbdt
included; a run trained before they were saved gets their scores from its own predictions files when the
evaluated split is the run's (same table, same studies), else leaves them out (said in metrics.json).

Explanation: one study's exact Shapley values over the fusion model's modalities (every coalition is one
forward pass with `present_override`, in logit space), the [CLS] attention per modality token, a plain
statement of what was used, and, with a retrieval index built by the same encoders, the k most similar cases
of other patients with their outcome in the table and a similarity-weighted neighbour vote.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from radalign.data.shards import find_samples, split_names
from radalign.finetune import clinical as C
from radalign.finetune import explain as X
from radalign.finetune import perclass as P
from radalign.finetune.attribution import explain_ehr
from radalign.finetune.inputs import SplitInputs, task_labels
from radalign.finetune.predict import TrainedRun, load_run
from radalign.finetune.registry import (
    DEGRADATION_MODELS,
    SEEDS_DIR,
    degradation_logits,
    load_model,
    seed_model_name,
)
from radalign.finetune.report import read_class_predictions
from radalign.finetune.tasks import class_names

from radalign import RadalignError
from radalign import report as R
from radalign.io import atomic_write_text
from radalign.lock import output_lock

SAVED_PREDICTIONS = {"test_split": "predictions.csv", "val_split": "predictions_validate.csv"}


# ----------------------------------------------------------------------------------------------------------
# Evaluation


def lab_features(trained: TrainedRun, table: str | None = None) -> list[str]:
    """The run's lab features (the link's `features`, vitals excluded; all EHR features when it has none)."""
    feats = list(trained.featurizer.features) if trained.featurizer is not None else []
    labs = trained.table(table).manifest.get("features")
    return [f for f in feats if f in labs] if labs else feats


def group_frame(trained: TrainedRun, data: SplitInputs, table: str | None = None) -> pd.DataFrame:
    """The split's table rows with `age_band`, `modalities` (presence pattern) and `labs` (present/absent).
    A table without `age` (checked: only when age_band is not asked for) gets unknown ages."""
    labs = [f for f in lab_features(trained, table) if f in data.frame.columns]
    frame = data.frame if "age" in data.frame.columns else data.frame.assign(age=np.nan)
    return C.add_group_columns(frame, data.present, labs)


def group_columns(subgroups: Sequence[str]) -> dict[str, str]:
    """{table column: what needs it} for the subgroup columns (age_band is made from age; modalities and
    labs from what the models read)."""
    derived = {"age_band": "age", "modalities": None, "labs": None}
    need = {}
    for c in subgroups:
        col = derived.get(c, c)
        if col is not None:
            need[col] = f"subgroup {c!r}"
    return need


def degradation_scores(trained: TrainedRun, data: SplitInputs) -> dict[str, dict[str, np.ndarray]] | None:
    """{model: {"all": logits [N], <modality>: logits with it masked}} for the fusion models of the run."""
    out = {}
    for name in DEGRADATION_MODELS:
        if name in trained.models:
            model, meta = trained.models[name]
            out[name] = degradation_logits(model, data, meta["spec"]["modalities"])
    return out or None


def degradation_seed_scores(trained: TrainedRun, data: SplitInputs, main: dict | None) -> dict[str, list] | None:
    """{model: [main[model] (its `degradation_scores`), then each extra training seed's]} from
    RUN/models/degradation_seeds (None when the run trained no extra seeds)."""
    folder = trained.path / "models" / SEEDS_DIR
    if main is None or not folder.is_dir():
        return None
    out = {}
    for name, first in main.items():
        runs = [first]
        for seed in range(trained.cfg.seed + 1, trained.cfg.seed + trained.cfg.baselines.degradation_seeds):
            if not (folder / f"{seed_model_name(name, seed)}.json").is_file():
                break
            model, meta = load_model(folder, seed_model_name(name, seed), checkpoint=trained.export)
            runs.append(degradation_logits(model, data, meta["spec"]["modalities"]))
        out[name] = runs
    n = min(len(r) for r in out.values())
    return {k: r[:n] for k, r in out.items()} if n > 1 else None


def _saved_baselines(trained: TrainedRun, pred: pd.DataFrame, which: str, split: str,
                     table: str | None) -> tuple[pd.DataFrame, list[str]]:
    """Add the run's saved scores of models that are not saved as weights (late_fusion and gbdt of a run
    trained before they were saved) when `split`
    is the run's own `which` split of its own table and the file covers exactly these studies."""
    path = trained.path / SAVED_PREDICTIONS[which]
    own = getattr(trained.cfg.data, which) == split and (table is None or str(table) == str(trained.table_path))
    if not own or not path.is_file():
        return pred, []
    saved = pd.read_csv(path)
    if sorted(saved["study_id"].astype(str)) != sorted(pred["study_id"].astype(str)):
        return pred, []
    extra = [c for c in saved.columns if c.startswith((C.SCORE_PREFIX, C.LOGIT_PREFIX)) and c not in pred.columns]
    keyed = saved.assign(_key=saved["study_id"].astype(str)).set_index("_key")
    add = keyed.loc[pred["study_id"].astype(str), extra].reset_index(drop=True)
    return pd.concat([pred.reset_index(drop=True), add], axis=1), sorted(
        {c.split(":", 1)[1] for c in extra})


def evaluate_run(checkpoint: str | os.PathLike, *, out: str | os.PathLike | None = None,
                 table: str | None = None, split: str | None = None, val_split: str | None = None,
                 shards: str | None = None, model: str = "fusion", threshold_rule: str = "youden",
                 threshold_target: float | None = None, n_boot: int | None = None, seed: int | None = None,
                 min_count: int = 20, subgroups: Sequence[str] | None = None, n_bins: int = 10) -> dict:
    """The whole clinical evaluation of a run on a table split; written to `out` when given.

    Defaults come from the run's config: split = data.test_split, val_split = data.val_split, n_boot =
    bootstrap, seed = seed. subgroups: columns of the table (or the derived age_band, modalities, labs).
    """
    trained = load_run(checkpoint)
    cfg = trained.cfg
    if cfg.task.kind != "binary":
        return evaluate_classes(trained, checkpoint, out=out, table=table, split=split, val_split=val_split,
                                shards=shards, n_boot=n_boot, seed=seed, n_bins=n_bins)
    if model not in trained.models:
        raise RadalignError(f"--model {model!r}: the run has {', '.join(sorted(trained.models))}")
    split, val_split = split or cfg.data.test_split, val_split or cfg.data.val_split
    if split == val_split:
        raise RadalignError(f"--split {split} and --val-split {val_split}: thresholds and the temperature are "
                            "fitted on validation; evaluate on another split than the one they are fitted on")
    columns = list(subgroups) if subgroups is not None else [*C.SUBGROUPS, *C.MISSINGNESS]
    for s in (split, val_split):
        trained.check_columns(s, table, extra=group_columns(columns) if s == split else None,
                              fix="; or leave a subgroup column out of --subgroups (e.g. --subgroups "
                                  "race,insurance)")
    test, val = trained.inputs(split, table, shards), trained.inputs(val_split, table, shards)
    test_pred, extra_t = _saved_baselines(trained, trained.predictions(test), "test_split", split, table)
    val_pred, extra_v = _saved_baselines(trained, trained.predictions(val), "val_split", val_split, table)
    both = set(extra_t) & set(extra_v)  # a baseline needs its validation scores too (operating point)
    test_pred = test_pred.drop(columns=[c for c in test_pred.columns if c.split(":", 1)[-1] in set(extra_t) - both])
    degradation = degradation_scores(trained, test)
    res = C.evaluate_predictions(
        test_pred, val_pred, model=model, groups=group_frame(trained, test, table), subgroup_columns=columns,
        degradation=degradation, degradation_seeds=degradation_seed_scores(trained, test, degradation),
        threshold_rule=threshold_rule,
        threshold_target=threshold_target, n_boot=cfg.bootstrap if n_boot is None else n_boot,
        seed=cfg.seed if seed is None else seed, min_count=min_count, n_bins=n_bins)
    res["run"] = {"checkpoint": str(checkpoint), "task": cfg.task.name, "table": str(table or trained.table_path),
                  "split": split, "val_split": val_split, "n_test": len(test), "n_validation": len(val),
                  "present": {m: int(p.sum()) for m, p in test.present.items()},
                  "baselines_from_saved_predictions": sorted(both),
                  "encoder_checksum": getattr(trained.encoders, "checksum", None)}
    if out is not None:
        res["files"] = C.write_evaluation(out, res, title=f"Clinical evaluation: {cfg.task.name} ({model}, "
                                                         f"{split} split)")
    return res


def evaluate_classes(trained: TrainedRun, checkpoint, *, out=None, table: str | None = None,
                     split: str | None = None, val_split: str | None = None, shards: str | None = None,
                     n_boot: int | None = None, seed: int | None = None, n_bins: int = 10) -> dict:
    """`finetune eval` of a multilabel / multiclass run: per class and macro AUROC of every saved model with
    patient intervals, paired macro differences, the best model on validation and its calibration per class
    (temperature fitted on validation). Thresholds and subgroups are binary-only and said to be skipped."""
    cfg = trained.cfg
    split, val_split = split or cfg.data.test_split, val_split or cfg.data.val_split
    if split == val_split:
        raise RadalignError(f"--split {split} and --val-split {val_split}: the best model and the temperatures are "
                            "chosen on validation; evaluate on another split")
    classes, kind = class_names(cfg.task), cfg.task.kind
    test = trained.inputs(split, table, shards)
    y, probs, logits = read_class_predictions(trained.predictions(test), classes)
    y_val, probs_val, logits_val = read_class_predictions(
        trained.predictions(trained.inputs(val_split, table, shards)), classes)
    kw = dict(n_boot=cfg.bootstrap if n_boot is None else n_boot, seed=cfg.seed if seed is None else seed)
    pid = test.subjects
    models = P.class_metrics(y, {n: probs[n] for n in C.ordered(probs)}, pid, classes, **kw)
    left = {"late_fusion": "its stacker is fitted on validation"} \
        if cfg.baselines.late_fusion == "stacked" and "late_fusion" in trained.models else {}
    sel = P.selection(P.validation_scores(y_val, {n: p for n, p in probs_val.items() if n not in left}), y, probs,
                      pid, P.macro_columns(models, classes), left_out=left, metric="macro AUROC", **kw)
    ref = sel["best"] or next(iter(models))
    res = {"task": cfg.task.name, "split": split, **kw, "kind": kind, "classes": classes, "models": models,
           "paired_differences": P.macro_differences(y, probs, pid, models, classes, ref=ref, **kw),
           "degradation": None, "model": ref, "selection": sel,
           "calibration": P.class_calibration(y, logits[ref], y_val, logits_val[ref], kind, classes, n_bins),
           "thresholds_and_temperature_fitted_on": "validation",
           "skipped": {"operating point, subgroups, degradation": "binary tasks only"},
           "run": {"checkpoint": str(checkpoint), "task": cfg.task.name, "split": split, "val_split": val_split,
                   "n_test": len(test), "table": str(table or trained.table_path)}}
    if out is not None:
        res["files"] = write_class_evaluation(out, res)
    return res


def write_class_evaluation(out_dir, res: dict) -> dict[str, str]:
    """metrics.json and report.md of a multilabel / multiclass evaluation, under the folder's lock."""
    out = Path(out_dir)
    with output_lock(out):
        files = {"metrics": out / "metrics.json", "report": out / "report.md"}
        C.write_metrics(files["metrics"], {k: v for k, v in res.items() if k != "files"})
        lines = [f"# Evaluation: {R.md(res['task'])} ({R.md(res['split'])} split)", "",
                 f"Unit of every interval: the patient ({res['n_boot']} resamples, seed {res['seed']}). "
                 f"Task kind {R.md(res['kind'])}, classes: {R.md(', '.join(res['classes']))}.", "",
                 *P.md_selection(res["selection"]), *C.md_models(res), *P.md_classes(res["models"], res["classes"]),
                 *P.md_calibration(res["calibration"], res["model"]),
                 *[f"Not in this report: {R.md(k)} ({R.md(v)})." for k, v in res["skipped"].items()]]
        atomic_write_text(files["report"], "\n".join(lines) + "\n")
    return {k: str(v) for k, v in files.items()}


# ----------------------------------------------------------------------------------------------------------
# Explanation of one study


def find_study(trained: TrainedRun, study_id, *, table: str | None = None,
               split: str | None = None) -> tuple[str, int]:
    """(split, row) of `study_id` in the table; `split` given: only there. Error names an id that exists."""
    t = trained.table(table)
    splits = [split] if split else list(t.splits)
    for s in splits:
        ids = t.split(s)["study_id"].astype(str).to_numpy()
        rows = np.flatnonzero(ids == str(study_id))
        if rows.size:
            return s, int(rows[0])
    first = t.split(splits[0])["study_id"]
    example = f" (e.g. {first.iloc[0]})" if len(first) else ""
    raise RadalignError(f"--study-id {study_id}: not in split(s) {', '.join(splits)} of {t.path}{example}; "
                        "pass a study_id of the table" + ("" if split is None else ", or another --split"))


def coalition_logit(model: torch.nn.Module, batch: Mapping):
    """f(kept modalities) -> the model's logit for a one-row batch (eval mode, no grad)."""
    def f(kept: frozenset) -> float:
        with torch.no_grad():
            return float(model(batch, present_override=frozenset(kept)).logits[0, 0])
    return f


def attention_weights(model: torch.nn.Module, batch: Mapping) -> dict[str, float]:
    """The [CLS] attention per modality token of the full forward pass (last layer, head mean)."""
    with torch.no_grad():
        out = model(batch)
    if not hasattr(out, "attention"):
        return {}
    return {m: float(a) for m, a in zip(out.modalities, out.attention[0].tolist())}


def used_text(trained: TrainedRun, data: SplitInputs, row: int, modalities: Sequence[str],
              table: str | None = None) -> str:
    present = {m: bool(data.present[m][row]) for m in modalities}
    labs = [f for f in lab_features(trained, table) if f in data.frame.columns]
    details = {"ehr": X.lab_details_from_row(data.frame.iloc[row].to_dict(), labs)} if labs else {}
    return X.used_statement(present, details)


def outcome_lookup(trained: TrainedRun, table: str | None = None) -> dict[str, float | None]:
    """study_id (str) -> the task's label over every split of the table (None: unknown)."""
    out: dict[str, float | None] = {}
    for frame in trained.table(table).splits.values():
        try:
            y = task_labels(frame, trained.cfg.task)[:, 0]
        except (KeyError, RadalignError):
            continue
        out.update({str(s): (None if np.isnan(v) else float(v)) for s, v in zip(frame["study_id"], y)})
    return out


def check_index_encoder(store, trained: TrainedRun) -> None:
    """Refuse an index whose embeddings come from another export than the run's towers (both checksums)."""
    from radalign.retrieval.search import check_encoder

    if trained.encoders is None:
        raise RadalignError(f"--index-dir {store.path}: this run has no image/text towers "
                            f"(modalities {trained.modalities}); similar cases need an image run")
    check_encoder(store.manifest, trained.encoders, f"--index-dir {store.path}")


def similar_neighbours(index: str | os.PathLike, trained: TrainedRun, data: SplitInputs, row: int, k: int,
                       outcomes: Mapping[str, float | None]) -> tuple[list[dict], dict]:
    """The k nearest cases of other patients to the study's image embedding, with the task outcome from the
    table (else the index's `outcomes` field); returns (neighbours, what the search filtered out)."""
    from radalign.retrieval.search import Retriever

    retr = Retriever.load(index)
    check_index_encoder(retr.store, trained)
    retr.encoders = trained.encoders
    if getattr(data, "tokens_of", None) is not None:  # finetune.films.FilmInputs of a tuned tower
        raise RadalignError(f"study {data.studies[row]}: the run's image tower was tuned, so its image token is not "
                            "in the space of the index (built with the frozen export); explain it without "
                            "--index-dir")
    if data.image is None or not data.present.get("image", np.zeros(len(data), bool))[row]:
        raise RadalignError(f"study {data.studies[row]}: no film embedded, so no image to search the index "
                            "with; explain it without --index-dir")
    fr = data.frame.iloc[row]
    res = retr.search(vector=data.image[row], k=k, query_info={
        "kind": "study", "study_id": str(fr["study_id"]), "subject_id": str(fr["subject_id"])})
    label = trained.cfg.task.labels[0]
    cases = []
    for n in res.neighbours:
        outcome = outcomes.get(str(n["study_id"]))
        if outcome is None and isinstance(n.get("outcomes"), Mapping):
            outcome = R.finite_or_none(n["outcomes"].get(label))
        cases.append({"study_id": n["study_id"], "subject_id": n["subject_id"], "similarity": n["similarity"],
                      "labels": list(n["labels"]), "outcome": None if outcome is None else int(outcome),
                      "thumbnail": n.get("thumbnail")})
    return cases, dict(res.filtered)


def study_thumbnail(trained: TrainedRun, data: SplitInputs, row: int, shards: str | None = None,
                    size: int = 192) -> str | None:
    """The study's first film (as the model saw it) as a JPEG data URI, read from the shards; None when
    none of its films is there. Finds it by dicom_id in the shards' json members (table split first) and
    decodes that one image only."""
    from radalign.data.embed import thumbnail_jpeg
    from radalign.data.loader import decode_sample
    from radalign.retrieval.search import data_uri

    enc = trained.encoders
    ids = data.frame.iloc[row].get("dicom_ids")
    wanted = {str(d) for d in (list(ids) if ids is not None else [])}
    if enc is None or not wanted:
        return None
    root = Path(shards or trained.shards)
    splits = sorted(split_names(root), key=lambda s: s != data.name)
    for found in find_samples(root, lambda s: s.id("dicom_id") in wanted, splits=splits):
        sample = decode_sample(found, enc.image_transform())
        if sample is not None:  # a corrupt film is skipped, as the loader skips it
            return data_uri(thumbnail_jpeg(sample["image"], enc.config["mean"], enc.config["std"], size))
    return None


def _text(v) -> str | None:
    return v if isinstance(v, str) and v.strip() else None


def explain_study(checkpoint: str | os.PathLike | TrainedRun, study_id, *, index: str | os.PathLike | None = None,
                  k: int = 5, split: str | None = None, table: str | None = None, shards: str | None = None,
                  model: str = "fusion", thumbnail: bool = False) -> X.Explanation:
    """Explain the prediction of `model` for one study of the run's table (see the module docstring).

    split: where to look for the study (default: every split of the table); thumbnail: read the film from
    the shards for the HTML page. checkpoint: a run folder, or a run already loaded (a service explains many)."""
    trained = checkpoint if isinstance(checkpoint, TrainedRun) else load_run(checkpoint)
    if model not in trained.models:
        raise RadalignError(f"--model {model!r}: the run has {', '.join(sorted(trained.models))}")
    from radalign.finetune.tower import TUNED_KIND

    net, meta = trained.models[model]
    if meta["spec"]["kind"] not in ("fusion", TUNED_KIND):
        fusion = sorted(n for n, (_, m) in trained.models.items() if m["spec"]["kind"] in ("fusion", TUNED_KIND))
        raise RadalignError(f"--model {model}: a {meta['spec']['kind']} model has no modality tokens to explain "
                            f"(Shapley values over masked modalities, attention); use one of {', '.join(fusion)}")
    mods = list(meta["spec"]["modalities"])
    split, at = find_study(trained, study_id, table=table, split=split)
    data, row = trained.inputs(split, table, shards, rows=[at]), 0  # that study only (a tuned run: its films only)
    net.eval()
    if meta["spec"]["kind"] == TUNED_KIND:  # its tower's image token once, then its head as in a frozen run
        from radalign.finetune.tower import study_tokens

        data, net = study_tokens(net, data), net.head
    batch = data.batch([row], mods)
    fr = data.frame.iloc[row]
    neighbours, filtered = (None, {})
    if index is not None:
        neighbours, filtered = similar_neighbours(index, trained, data, row, k, outcome_lookup(trained, table))
    expl = X.explain(coalition_logit(net, batch), mods, study_id=fr["study_id"], subject_id=fr["subject_id"],
                     used=used_text(trained, data, row, mods, table), attention=attention_weights(net, batch),
                     task=trained.cfg.task.name, neighbours=neighbours, k=k,
                     thumbnail=study_thumbnail(trained, data, row, shards) if thumbnail else None,
                     indication=_text(fr.get("indication")),
                     ehr=explain_ehr(trained, net, batch, mods, fr.to_dict(), labs=lab_features(trained, table)))
    if expl.similar is not None:
        expl.similar.skipped["same_patient"] += int(filtered.get("same_patient", 0))
    return expl


__all__ = ["evaluate_run", "explain_study", "find_study", "group_frame", "degradation_scores",
           "degradation_seed_scores", "lab_features",
           "check_index_encoder", "similar_neighbours", "study_thumbnail", "outcome_lookup", "coalition_logit", "attention_weights"]
