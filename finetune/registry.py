"""The finetune model registry: every model kind by name (its spec, builder, logits, save and load).

    specs = model_specs(run)                         # {"fusion": spec, "image_only": spec, ...} of a run's torch models
    model = build_model(spec)                        # untrained: FusionModel, EarlyFusionModel, GBDTBaseline, LateFusion
    save_model(RUN / "models", "fusion", model, spec, info)   # fusion.safetensors + fusion.json
    model, meta = load_model(RUN / "models", "fusion")        # never a pickle
    logits = model_logits(model, meta["spec"], data)          # [N, C] on a SplitInputs, whatever the kind

Every kind keeps the same small protocol: `build_model(spec)` makes it, the recipe fits it (torch:
finetune.trainer; the others: their `fit`), `state_dict()` / `load_state_dict()` move its weights as arrays
(safetensors beside a JSON spec; RUN/models/<name>.{safetensors,json}, format MODEL_FORMAT) and
`model_logits` scores a split. The non-torch kinds: `gbdt` (sklearn's trees exported to arrays,
finetune.baselines.ArrayTrees) and `late_fusion` (the stacker's weights; its members, the unimodal models, are
loaded from the same folder by name). The recipe, `finetune predict`/`eval`/`explain`, few-shot and bench all
take models from here, never from the training recipe; `fewshot_method(spec, pool, test, ...)` makes any
kind fitted on cached inputs a few-shot method (finetune.fewshot).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from radalign.finetune.baselines import EarlyFusionModel, GBDTBaseline, LateFusion, gbdt_matrix
from radalign.finetune.fewshot import SkipDraw
from radalign.finetune.fit import fit_model, logits_of, take_rows
from radalign.finetune.inputs import SplitInputs
from radalign.finetune.models import EHREncoder, FusionModel, build_encoders, dropout_rates_from_presence
from radalign.finetune.tasks import n_outputs
from safetensors import numpy as st_numpy
from safetensors import torch as st_torch
from torch import nn

from radalign import RadalignError
from radalign.io import atomic_path, atomic_write_json, sha256_file

MODEL_FORMAT = "radalign-finetune-model/1"
DEGRADATION_MODELS = ("fusion", "fusion_no_dropout")  # trained with / without modality dropout
SEEDS_DIR = "degradation_seeds"  # RUN/models/<this>/: the extra training seeds (not scored in predictions.csv)


def seed_model_name(name: str, seed: int) -> str:
    return f"{name}_seed{seed}"


# ----------------------------------------------------------------------------------------------------------
# Specs: a JSON dict per model (saved beside its weights, so `finetune predict` rebuilds it)


def model_specs(run, *, tuned: bool = True) -> dict[str, dict]:
    """The torch models of a run (fusion, fusion_no_dropout, <modality>_only, early_fusion), by name; tuned=False:
    as if the image tower were frozen (what not_trained compares against)."""
    cfg, m = run.cfg, run.cfg.model
    dims = {"image_dim": run.train.image.shape[1] if run.train.image is not None else 0,
            "text_dim": run.train.text.shape[1] if run.train.text is not None else 0,
            "n_features": len(run.featurizer.features) if run.featurizer else 0,
            "cardinalities": run.featurizer.cardinalities if run.featurizer else []}
    common = {"d_model": m.d_model, "n_layers": m.n_layers, "n_heads": m.n_heads, "dropout": m.dropout,
              "ehr_d": m.ehr_d, "ehr_blocks": m.ehr_blocks, "ehr_heads": m.ehr_heads,
              "n_outputs": n_outputs(cfg.task), "task": cfg.task.kind, "cls_sees_absent": m.cls_sees_absent,
              **dims}
    rates = dict(m.modality_dropout)
    if m.modality_dropout_from_data:
        rates = dropout_rates_from_presence(run.train.present)
    rates = {k: v for k, v in rates.items() if k in run.modalities}
    specs = {"fusion": {"kind": "fusion", "modalities": run.modalities, "modality_dropout": rates, **common}}
    if cfg.baselines.fusion_without_dropout and len(run.modalities) > 1:
        specs["fusion_no_dropout"] = {**specs["fusion"], "modality_dropout": {}}
    for mod in run.modalities:
        if f"{mod}_only" in cfg.baselines.models:
            specs[f"{mod}_only"] = {"kind": "fusion", "modalities": [mod], "modality_dropout": {}, **common}
    if "early_fusion" in cfg.baselines.models:
        specs["early_fusion"] = {"kind": "early_fusion", "modalities": run.modalities, **common}
    if run.train.patches is not None:  # data.image_patch_tokens: the fusion heads read the patch tokens
        for spec in specs.values():
            if spec["kind"] == "fusion" and "image" in spec["modalities"]:
                spec["image_patches"] = list(run.train.patches.shape[1:])  # [P, W]
    if tuned and m.image_tower != "frozen":  # the image tower trains with the fusion head (finetune.tower)
        from radalign.finetune.tower import tuned_specs

        return tuned_specs(run, specs)
    return specs


def not_trained(run) -> dict[str, str]:
    """{model: why} for the configured models a tuned-tower run does not train (metrics.json `not_trained`)."""
    from radalign.finetune.tower import tuned_specs

    if run.cfg.model.image_tower == "frozen":
        return {}
    frozen = model_specs(run, tuned=False)
    why = (f"reads the frozen image embedding, and model.image_tower={run.cfg.model.image_tower} tunes the tower; "
           "train it in a run with model.image_tower=frozen to compare")
    return {n: why for n in frozen if n not in tuned_specs(run, frozen)}


def gbdt_spec(run) -> dict:
    """The gradient-boosted trees on the EHR features (+ the frozen image embedding when the run has one)."""
    b = run.cfg.baselines
    return {"kind": "gbdt", "task": run.cfg.task.kind, "max_iter": b.gbdt_max_iter,
            "learning_rate": b.gbdt_learning_rate, "seed": run.cfg.seed, "with_image": run.train.image is not None,
            "modalities": ["ehr", "image"] if run.train.image is not None else ["ehr"]}


def late_fusion_spec(run, members: Mapping[str, str]) -> dict:
    """members: {modality: unimodal model name}, in the stacker's column order."""
    return {"kind": "late_fusion", "mode": run.cfg.baselines.late_fusion, "of": dict(members),
            "modalities": list(members)}


# ----------------------------------------------------------------------------------------------------------
# Kinds: builder and logits


def _build_fusion(spec: dict) -> FusionModel:
    mods = spec["modalities"]
    ehr = EHREncoder(spec["n_features"], spec["cardinalities"], d=spec["ehr_d"], n_blocks=spec["ehr_blocks"],
                     n_heads=spec["ehr_heads"], dropout=spec["dropout"]) if "ehr" in mods else None
    enc = build_encoders(spec["d_model"], image_dim=spec["image_dim"] if "image" in mods else None,
                         text_dim=spec["text_dim"] if "text" in mods else None, ehr=ehr,
                         image_patches=spec.get("image_patches"))
    return FusionModel(enc, n_outputs=spec["n_outputs"], task=spec["task"], d_model=spec["d_model"],
                       n_layers=spec["n_layers"], n_heads=spec["n_heads"], dropout=spec["dropout"],
                       modality_dropout=spec["modality_dropout"], cls_sees_absent=spec["cls_sees_absent"])


def _build_tuned(spec: dict, checkpoint=None):
    """checkpoint: where to look for the export first (the run's data.checkpoint; finetune.tower.find_tuned_export)."""
    from radalign.finetune.tower import TunedModel, load_tuned_tower

    tower = load_tuned_tower(spec["tower"], checkpoint=checkpoint)
    return TunedModel(tower, _build_fusion(spec), spec["tower"]["export_checksum"])


def _build_early_fusion(spec: dict) -> EarlyFusionModel:
    mods = spec["modalities"]
    return EarlyFusionModel(image_dim=spec["image_dim"] if "image" in mods else 0,
                            text_dim=spec["text_dim"] if "text" in mods else 0,
                            n_features=spec["n_features"] if "ehr" in mods else 0,
                            cardinalities=spec["cardinalities"] if "ehr" in mods else (),
                            n_outputs=spec["n_outputs"], task=spec["task"], dropout=spec["dropout"])


def _build_gbdt(spec: dict) -> GBDTBaseline:
    return GBDTBaseline(spec["task"], max_iter=spec["max_iter"], learning_rate=spec["learning_rate"],
                        seed=spec["seed"])


def _build_late_fusion(spec: dict) -> LateFusion:
    lf = LateFusion(spec["mode"])
    lf.modalities = list(spec["of"])
    return lf


@torch.no_grad()
def logits_on(model: nn.Module, data: SplitInputs, modalities, present_override=None,
              batch_size: int = 2048) -> np.ndarray:
    """[N, C] logits of a torch model (eval mode) on a whole split."""
    was = model.training
    model.eval()
    out = []
    for i in range(0, len(data), batch_size):
        rows = np.arange(i, min(i + batch_size, len(data)))
        b = data.batch(rows, modalities)
        o = model(b, present_override=present_override) if present_override is not None else model(b)
        out.append(logits_of(o).float().cpu().numpy())
    model.train(was)
    return np.concatenate(out) if out else np.zeros((0, data.y.shape[1]), np.float32)


def gbdt_inputs(data: SplitInputs, with_image: bool):
    """The trees' input matrix of a split (an absent film's embedding is NaN, not zeros)."""
    return gbdt_matrix(data.ehr, data.image if with_image else None,
                       data.present.get("image") if with_image else None)


def _torch_logits(model, spec: dict, data: SplitInputs, present_override=None) -> np.ndarray:
    return logits_on(model, data, spec["modalities"], present_override)


def _tuned_logits(model, spec: dict, data: SplitInputs, present_override=None) -> np.ndarray:
    """The head on the tower's study tokens of the split (finetune.tower.study_tokens: computed once per film,
    or taken from `data` when it holds this tower's tokens already)."""
    from radalign.finetune.tower import study_tokens

    return logits_on(model.head, study_tokens(model, data), spec["modalities"], present_override)


def _gbdt_logits(model: GBDTBaseline, spec: dict, data: SplitInputs, present_override=None) -> np.ndarray:
    _no_override(spec, present_override)
    return model.predict_logits(gbdt_inputs(data, spec["with_image"]))


def _late_fusion_logits(model: LateFusion, spec: dict, data: SplitInputs, present_override=None) -> np.ndarray:
    """The members' logits on `data`, combined (the members ride on the model: `load_model` puts them there)."""
    _no_override(spec, present_override)
    if set(model.members) != set(model.modalities):
        raise RadalignError(f"late_fusion: member models {sorted(model.members)} for modalities "
                            f"{model.modalities}; load it with registry.load_model")
    logits = {m: model_logits(*model.members[m], data) for m in model.modalities}
    return model.combine(logits, {m: data.present[m] for m in model.modalities})


def _no_override(spec: dict, present_override) -> None:
    if present_override is not None:
        raise RadalignError(f"a {spec['kind']} model cannot mask modalities at test time (present_override); "
                            "use a fusion model")


@dataclass(frozen=True)
class Kind:
    build: Callable[[dict], Any]  # spec -> an untrained model
    logits: Callable[..., np.ndarray]  # (model, spec, data, present_override=None) -> [N, C]
    torch: bool  # weights through safetensors.torch (nn.Module) or safetensors.numpy (arrays)


KINDS = {"fusion": Kind(_build_fusion, _torch_logits, True),
         "early_fusion": Kind(_build_early_fusion, _torch_logits, True),
         "tuned_fusion": Kind(_build_tuned, _tuned_logits, True),  # finetune.tower: the image tower trains too
         "gbdt": Kind(_build_gbdt, _gbdt_logits, False),
         "late_fusion": Kind(_build_late_fusion, _late_fusion_logits, False)}


def _kind(spec: Mapping, where: str = "spec") -> Kind:
    kind = spec.get("kind")
    if kind not in KINDS:
        raise RadalignError(f"{where}: model kind {kind!r} is not one of {', '.join(KINDS)}; retrain the run "
                            "with this release")
    return KINDS[kind]


def build_model(spec: dict, *, checkpoint=None):
    """An untrained model of `spec` (torch kinds: initialised from torch's current RNG state). checkpoint: the
    run's data.checkpoint, where a tuned_fusion model looks for its export before the path its spec recorded."""
    kind = _kind(spec)
    return _build_tuned(spec, checkpoint) if spec["kind"] == "tuned_fusion" else kind.build(spec)


def model_logits(model, spec: dict, data: SplitInputs, present_override=None) -> np.ndarray:
    """[N, C] logits of any registered model on a split."""
    return _kind(spec).logits(model, spec, data, present_override)


def degradation_logits(model: nn.Module, data: SplitInputs, modalities) -> dict[str, np.ndarray]:
    """Test logits with every modality, then with each one removed (masked) at test time. A tuned model's tower
    runs once per film for all of them (finetune.tower.study_tokens), then its head once per condition."""
    from radalign.finetune.tower import TunedModel, study_tokens

    if isinstance(model, TunedModel):
        model, data = model.head, study_tokens(model, data)
    out = {"all": logits_on(model, data, modalities)[:, 0]}
    for m in modalities:
        out[m] = logits_on(model, data, modalities, present_override={m: False})[:, 0]
    return out


# ----------------------------------------------------------------------------------------------------------
# Save and load: safetensors + JSON


def save_model(folder: Path, name: str, model, spec: dict, info: dict) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / f"{name}.safetensors") as tmp:
        if _kind(spec).torch:
            st_torch.save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
        else:
            st_numpy.save_file({k: np.ascontiguousarray(v) for k, v in model.state_dict().items()}, str(tmp))
    atomic_write_json(folder / f"{name}.json", {"format": MODEL_FORMAT, "name": name, "spec": spec, **info,
                                               "weights_sha256": sha256_file(folder / f"{name}.safetensors")})


def load_model(folder: Path, name: str, *, checkpoint=None) -> tuple[Any, dict]:
    """A finished model (weights + spec) from RUN/models; never a pickle. checkpoint: as build_model's."""
    folder = Path(folder)
    meta_f, w_f = folder / f"{name}.json", folder / f"{name}.safetensors"
    if not meta_f.is_file() or not w_f.is_file():
        raise RadalignError(f"{folder}: model {name!r} is not there ({meta_f.name} and {w_f.name} expected); "
                            "train it with `radalign finetune` first")
    meta = json.loads(meta_f.read_text())
    if meta.get("format") != MODEL_FORMAT:
        raise RadalignError(f"{meta_f}: format {meta.get('format')!r}, expected {MODEL_FORMAT}")
    kind = _kind(meta["spec"], str(meta_f))
    if meta.get("weights_sha256") not in (None, sha256_file(w_f)):  # a flipped byte loads without an error
        raise RadalignError(f"{w_f}: damaged model weights (sha256 differs from {meta_f.name}); retrain the model "
                            f"(delete {w_f} and run `radalign finetune` again)")
    model = build_model(meta["spec"], checkpoint=checkpoint)
    try:
        model.load_state_dict((st_torch if kind.torch else st_numpy).load_file(str(w_f)))
    except Exception as e:  # safetensors raises its own error type on a truncated file
        raise RadalignError(f"{w_f}: damaged model weights ({type(e).__name__}: {e}); retrain the model "
                            f"(delete {w_f} and run `radalign finetune` again)") from None
    if meta["spec"]["kind"] == "late_fusion":
        for m, member in meta["spec"]["of"].items():
            net, member_meta = load_model(folder, member, checkpoint=checkpoint)
            model.members[m] = (net, member_meta["spec"])
    return (model.eval() if kind.torch else model), meta


def load_models(folder: Path, *, checkpoint=None) -> dict[str, tuple[Any, dict]]:
    """{name: (model, meta)} of every finished model in `folder` (RUN/models); checkpoint: as build_model's."""
    return {n: load_model(folder, n, checkpoint=checkpoint) for n in sorted(p.stem for p in Path(folder).glob("*.json"))}


# ----------------------------------------------------------------------------------------------------------
# A registry model as a few-shot method (finetune.fewshot.Method)

FEWSHOT_KINDS = ("fusion", "early_fusion", "gbdt")  # late_fusion fits its stacker on validation; tuned_fusion
# trains the image tower from films, not from the cached inputs a draw indexes


def fewshot_method(spec: dict, pool: SplitInputs, evaluate: SplitInputs, *, steps: int, lr: float,
                   weight_decay: float, batch_size: int | None = None) -> Callable[[np.ndarray, np.ndarray, int],
                                                                                   np.ndarray]:
    """fit(rows of `pool`, their labels [n], seed) -> the model's logits [m] on `evaluate` (model_logits, as
    `finetune predict` scores it). The model sees the drawn rows only: a torch kind is built after
    torch.manual_seed(seed) and trained `steps` AdamW steps (finetune.fit.fit_model: no validation, no early
    stopping) on the whole draw, or on seeded minibatches of `batch_size` rows when the draw is larger (so a
    k=all fit costs what a k=batch_size/2 one does); gbdt fits its fixed iterations (build_model(spec).fit) on
    the drawn rows' EHR (+ image) matrix, and skips (fewshot.SkipDraw) a draw of fewer rows than a tree needs to
    split. Binary tasks (the few-shot protocol draws k per class of one label)."""
    if spec.get("kind") not in FEWSHOT_KINDS:
        raise RadalignError(f"few-shot method: model kind {spec.get('kind')!r} cannot be fitted on a draw; use one "
                            f"of {', '.join(FEWSHOT_KINDS)} (late_fusion fits on validation, tuned_fusion on films)")
    if spec["kind"] == "gbdt":
        x, categorical = gbdt_inputs(pool, spec["with_image"])  # [N, F], [F]
        least = build_model(spec).min_rows

        def fit_gbdt(rows, y, seed):
            if len(rows) < least:  # one-leaf trees: the same score for every study, an AUROC of 0.5 by construction
                raise SkipDraw(f"gbdt: fewer than {least} drawn rows; no tree can split (sklearn's min_samples_leaf "
                               f"{least // 2} on each side), so every study would get the same score")
            model = build_model(spec).fit((x[rows], categorical), np.asarray(y, np.float64)[:, None])
            return model_logits(model, spec, evaluate)[:, 0]
        fit_gbdt.seed_free = True  # its trees use spec["seed"], not the draw's: run_sweep fits k=all once
        return fit_gbdt
    batch = pool.batch(None, spec["modalities"])

    def fit_torch(rows, y, seed):
        torch.manual_seed(seed)
        model = build_model(spec)
        fit_model(model, take_rows(batch, torch.as_tensor(rows)), torch.as_tensor(y, dtype=torch.float32)[:, None],
                  task=spec["task"], steps=steps, lr=lr, weight_decay=weight_decay, seed=seed, batch_size=batch_size)
        return model_logits(model, spec, evaluate)[:, 0]
    return fit_torch
