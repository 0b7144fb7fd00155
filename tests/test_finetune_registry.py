"""The finetune model registry (finetune/registry.py): every registered kind survives save -> load with identical
logits, the gradient-boosted trees exported to arrays predict exactly as sklearn, damaged or foreign model files
are named, the finetune package has no import circle and only the CLI imports the recipes, and few-shot is its
own verb (the train verb's old spelling kept as an alias that warns)."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from radalign.finetune import registry
from radalign.finetune.baselines import ArrayTrees, GBDTBaseline
from radalign.finetune.features import EHRFeatures
from radalign.finetune.fit import fit_model
from radalign.finetune.inputs import SplitInputs
from sklearn.ensemble import HistGradientBoostingClassifier

from radalign import RadalignError

REPO = Path(__file__).resolve().parents[1]
CARDS = [3, 4]  # two categorical demographics, index 0 = unknown


def _split(n: int = 160, seed: int = 0) -> SplitInputs:
    """A split with every modality, absences, unlabelled rows and a label driven by image and EHR."""
    rng = np.random.default_rng(seed)
    f = 4
    measured = rng.random((n, f)) < 0.7
    ehr = EHRFeatures(values=np.where(measured, rng.normal(size=(n, f)), 0).astype(np.float32),
                      hours=np.where(measured, rng.random((n, f)), 0).astype(np.float32), measured=measured,
                      num=rng.normal(size=(n, 1)).astype(np.float32), num_known=rng.random((n, 1)) < 0.9,
                      cat=np.stack([rng.integers(0, c, n) for c in CARDS], axis=1))
    image = rng.normal(size=(n, 16)).astype(np.float32)
    present = {"image": rng.random(n) < 0.8, "text": rng.random(n) < 0.6, "ehr": measured.any(1)}
    signal = image[:, 0] * present["image"] + ehr.values[:, 0] + (ehr.cat[:, 0] == 2)
    y = (signal + rng.normal(size=n) * 0.5 > 0.3).astype(np.float64)[:, None]
    y[::17] = np.nan
    frame = pd.DataFrame({"subject_id": np.arange(n) // 2, "study_id": np.arange(n) + 1000})
    return SplitInputs("train", frame, y, image, rng.normal(size=(n, 8)).astype(np.float32), ehr, present)


def _torch_spec(kind: str, modalities: list[str]) -> dict:
    return {"kind": kind, "modalities": modalities, "modality_dropout": {m: 0.2 for m in modalities},
            "d_model": 16, "n_layers": 1, "n_heads": 2, "dropout": 0.0, "ehr_d": 8, "ehr_blocks": 1, "ehr_heads": 2,
            "n_outputs": 1, "task": "binary", "cls_sees_absent": True, "image_dim": 16, "text_dim": 8,
            "n_features": 4, "cardinalities": CARDS}


def _trained_torch(spec: dict, data: SplitInputs, seed: int = 0):
    torch.manual_seed(seed)
    model = registry.build_model(spec)
    fit_model(model, data.batch(None, spec["modalities"]), data.labels(), task="binary", steps=15, lr=1e-2, seed=seed)
    return model.eval()


def _fitted(kind: str, data: SplitInputs, folder: Path, mode: str = "stacked"):
    """(model, spec) of `kind` fitted on `data`; late fusion's members are saved to `folder` first, as the recipe
    saves the unimodal models before it."""
    if kind in ("fusion", "early_fusion"):
        spec = _torch_spec(kind, ["image", "text", "ehr"])
        return _trained_torch(spec, data), spec
    if kind == "gbdt":
        spec = {"kind": "gbdt", "task": "binary", "max_iter": 25, "learning_rate": 0.1, "seed": 0,
                "with_image": True, "modalities": ["ehr", "image"]}
        return registry.build_model(spec).fit(registry.gbdt_inputs(data, True), data.y), spec
    if kind == "tuned_fusion":
        return _tuned(data, folder)
    assert kind == "late_fusion", f"no round-trip case for registered kind {kind!r}: add one"
    members = {}
    for m in ("image", "ehr"):
        spec = {**_torch_spec("fusion", [m]), "modality_dropout": {}}
        net = _trained_torch(spec, data, seed=1)
        registry.save_model(folder, f"{m}_only", net, spec, {})
        members[m] = (net, spec)
    spec = {"kind": "late_fusion", "mode": mode, "of": {m: f"{m}_only" for m in members},
            "modalities": list(members)}
    lf = registry.build_model(spec)
    lf.fit({m: registry.model_logits(*members[m], data) for m in members}, {m: data.present[m] for m in members},
           data.y)
    lf.members = members
    return lf, spec


def _as_films(data: SplitInputs, seed: int) -> SplitInputs:
    """The split with one random 64 px film per study that has an image (finetune.films.FilmInputs)."""
    from radalign.finetune.films import FilmInputs, FilmStore, split_transform

    g = torch.Generator().manual_seed(seed)
    ids = [[f"{seed}-{i}"] if p else [] for i, p in enumerate(data.present["image"])]
    films = {k[0]: torch.randint(0, 256, (1, 64, 64), dtype=torch.uint8, generator=g) for k in ids if k}
    store = FilmStore(films, split_transform({"image_size": 64, "mean": [0.5] * 3, "std": [0.25] * 3})[1])
    return FilmInputs(data.name, data.frame, data.y, None, data.text, data.ehr, data.present, films=ids, store=store)


def _tuned(data: SplitInputs, folder: Path):
    """A LoRA-tuned nano tower (an export written to `folder`) behind the fusion head (finetune.tower)."""
    from radalign.pretrain.export import export_encoders, load_encoders
    from radalign.pretrain.models import build_model, get_model_config

    cfg = get_model_config(str(REPO / "tests" / "assets" / "nano.json"))
    torch.manual_seed(0)
    export = export_encoders(build_model(cfg), cfg, folder / "export")
    tower = {"mode": "lora", "lora_rank": 2, "lora_alpha": 4.0, "lora_targets": ["attn.in_proj", "mlp.c_fc"],
             "export": str(export), "export_checksum": load_encoders(export).checksum}
    spec = {**_torch_spec("tuned_fusion", ["image", "ehr"]), "image_dim": 64, "tower": tower}
    return _trained_torch(spec, data), spec


@pytest.mark.parametrize("kind", sorted(registry.KINDS))
def test_every_registered_kind_round_trips_with_identical_logits(kind, tmp_path):
    data, other = _split(), _split(seed=5)
    if kind == "tuned_fusion":  # the image tower trains: it reads films, not cached embeddings
        data, other = _as_films(data, 0), _as_films(other, 5)
    model, spec = _fitted(kind, data, tmp_path)
    before = registry.model_logits(model, spec, other)  # [N, 1]
    assert before.shape == (len(other), 1) and np.isfinite(before).all()
    assert np.std(before) > 1e-3  # a model that says the same for every row would round-trip trivially
    registry.save_model(tmp_path, kind, model, spec, {"note": "x"})
    loaded, meta = registry.load_model(tmp_path, kind)
    assert loaded is not model and meta["spec"] == spec and meta["note"] == "x"
    np.testing.assert_array_equal(registry.model_logits(loaded, meta["spec"], other), before)
    assert set(registry.load_models(tmp_path)) >= {kind}


def test_average_late_fusion_round_trips_without_weights(tmp_path):
    data = _split()
    lf, spec = _fitted("late_fusion", data, tmp_path, mode="average")
    registry.save_model(tmp_path, "late_fusion", lf, spec, {})
    loaded, meta = registry.load_model(tmp_path, "late_fusion")
    want = np.zeros(len(data))
    n = np.zeros(len(data))
    for m in ("image", "ehr"):  # the mean of the present modalities' logits, worked by hand
        p = data.present[m]
        want += np.where(p, registry.model_logits(*lf.members[m], data)[:, 0], 0)
        n += p
    want = np.where(n > 0, want / np.maximum(n, 1), np.mean([registry.model_logits(*lf.members[m], data)[:, 0]
                                                             for m in ("image", "ehr")], axis=0))
    np.testing.assert_allclose(registry.model_logits(loaded, meta["spec"], data)[:, 0], want, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# The gradient-boosted trees as arrays against sklearn


def _mixed(n: int, seed: int, unseen: bool = False) -> np.ndarray:
    """Numeric columns with NaN, two categorical columns (one before, one after a numeric one, so sklearn's
    categorical-first column order matters); `unseen`: categories never seen in training and negative ones."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5))
    x[:, 1] = rng.integers(0, 9 if unseen else 5, n)
    x[:, 3] = rng.integers(-1 if unseen else 0, 4, n)
    x[rng.random((n, 5)) < 0.2] = np.nan
    return x


@pytest.mark.parametrize("classes", [2, 3])
def test_array_trees_predict_exactly_as_sklearn(classes):
    rng = np.random.default_rng(0)
    x = _mixed(700, 1)
    cat = np.array([False, True, False, True, False])
    missing_like_2 = (x[:, 1] == 2) | np.isnan(x[:, 1])  # so that some categorical splits send missing left
    raw = np.nan_to_num(x[:, 0]) + missing_like_2 * 1.5 - (x[:, 3] == 1) * 1.5 + rng.normal(size=len(x)) * 0.5
    y = np.digitize(raw, np.quantile(raw, np.linspace(0, 1, classes + 1)[1:-1]))
    model = HistGradientBoostingClassifier(categorical_features=cat, max_iter=40, max_leaf_nodes=15,
                                           early_stopping=False, random_state=0).fit(x, y)
    nodes = np.concatenate([p.nodes for it in model._predictors for p in it])
    inner = nodes["is_leaf"] == 0
    # unseen categories follow the missing branch: only a left-going one tells that rule from "always right"
    assert (inner & (nodes["is_categorical"] == 1) & (nodes["missing_go_to_left"] == 1)).any()
    num = nodes[inner & (nodes["is_categorical"] == 0)]
    at = _mixed(len(num), 3)  # a row exactly at each numeric threshold (sklearn: <= goes left)
    original = np.concatenate([np.flatnonzero(cat), np.flatnonzero(~cat)])[num["feature_idx"]]
    at[np.arange(len(num)), original] = num["num_threshold"]
    test = np.concatenate([_mixed(400, 2, unseen=True), at])
    np.testing.assert_array_equal(ArrayTrees.from_sklearn(model).predict_proba(test), model.predict_proba(test))


def test_array_trees_of_numeric_features_only():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 4))
    x[rng.random(x.shape) < 0.3] = np.nan
    y = (np.nan_to_num(x[:, 0]) - np.isnan(x[:, 2]) > 0).astype(int)
    model = HistGradientBoostingClassifier(max_iter=30, early_stopping=False, random_state=0).fit(x, y)
    test = rng.normal(size=(200, 4))
    test[rng.random(test.shape) < 0.3] = np.nan
    np.testing.assert_array_equal(ArrayTrees.from_sklearn(model).predict_proba(test), model.predict_proba(test))


def test_gbdt_state_round_trip_keeps_the_dropped_columns():
    data = _split()
    x, cat = registry.gbdt_inputs(data, True)
    x[:, 2] = np.nan  # a column never measured in training is left out, and must stay out after loading
    g = GBDTBaseline("binary", max_iter=10).fit((x, cat), data.y)
    again = GBDTBaseline("binary")
    again.load_state_dict(g.state_dict())
    assert again.dropped_columns == g.dropped_columns == 1
    np.testing.assert_array_equal(again.predict_logits((x, cat)), g.predict_logits((x, cat)))


# ----------------------------------------------------------------------------------------------------------
# Bad files


def test_damaged_or_foreign_model_files_are_named(tmp_path):
    data = _split()
    model, spec = _fitted("gbdt", data, tmp_path)
    registry.save_model(tmp_path, "gbdt", model, spec, {})
    w = tmp_path / "gbdt.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(RadalignError, match=r"gbdt\.safetensors: damaged model weights"):
        registry.load_model(tmp_path, "gbdt")
    registry.save_model(tmp_path, "odd", model, spec, {})
    meta = (tmp_path / "odd.json").read_text().replace('"kind": "gbdt"', '"kind": "xgboost"')
    (tmp_path / "odd.json").write_text(meta)
    with pytest.raises(RadalignError, match=r"odd\.json: model kind 'xgboost' is not one of fusion, early_fusion"):
        registry.load_model(tmp_path, "odd")
    with pytest.raises(RadalignError, match=r"model 'absent' is not there"):
        registry.load_model(tmp_path, "absent")


def test_non_fusion_models_refuse_a_modality_mask():
    data = _split()
    model, spec = _fitted("gbdt", data, Path("."))
    with pytest.raises(RadalignError, match="gbdt model cannot mask modalities"):
        registry.model_logits(model, spec, data, present_override={"image": False})
    with pytest.raises(RadalignError, match="late_fusion: member models"):
        lf_spec = {"kind": "late_fusion", "mode": "average", "of": {"image": "image_only"}, "modalities": ["image"]}
        registry.model_logits(registry.build_model(lf_spec), lf_spec, data)


# ----------------------------------------------------------------------------------------------------------
# The import graph of finetune


def _finetune_imports() -> dict[str, set[str]]:
    graph = {}
    for path in sorted((REPO / "finetune").glob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
                names.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        graph[path.stem] = {n.split(".")[2] for n in names if n.startswith("radalign.finetune.")} - {path.stem}
    return graph


def test_finetune_has_no_import_circle():
    graph = _finetune_imports()
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            assert state.get(n) != 1, f"import circle: {' -> '.join(path + [m, n])}"
            if n not in state:
                visit(n, path + [m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


def test_only_the_cli_imports_the_recipes():
    graph = _finetune_imports()
    for mod, deps in graph.items():
        if mod in ("cli", "__main__"):
            continue
        assert "recipe" not in deps, f"finetune/{mod}.py imports the training recipe"
        if mod != "fewshot_recipe":
            assert "fewshot_recipe" not in deps, f"finetune/{mod}.py imports the few-shot recipe"
    for mod in ("predict", "evaluate", "fewshot_recipe"):  # inference and few-shot never import training code
        assert not {"recipe", "trainer"} & graph[mod], (mod, graph[mod])


# ----------------------------------------------------------------------------------------------------------
# Few-shot as its own verb


def test_fewshot_is_its_own_verb_and_the_train_spelling_warns(monkeypatch, capsys, tmp_path):
    from radalign.finetune import fewshot_recipe, recipe
    from radalign.finetune.config import FinetuneConfig

    from radalign.cli import main
    from radalign.config import load_config

    real_run_finetune, real_run_fewshot = recipe.run_finetune, fewshot_recipe.run_fewshot_recipe
    calls = []
    monkeypatch.setattr(fewshot_recipe, "run_fewshot_recipe", lambda cfg, overwrite=False: calls.append(cfg))
    monkeypatch.setattr(recipe, "run_finetune", lambda cfg, overwrite=False: pytest.fail("trained, not few-shot"))
    assert main(["finetune", "fewshot", "--config", "finetune/fewshot_chexpert", f"run_dir={tmp_path}"]) == 0
    assert len(calls) == 1 and calls[0].fewshot.label == "Pleural Effusion"
    assert "deprecated" not in capsys.readouterr().err
    assert main(["finetune", "--config", "finetune/fewshot_chexpert", f"run_dir={tmp_path}"]) == 0
    assert len(calls) == 2 and "use `radalign finetune fewshot --config` instead" in capsys.readouterr().err
    assert main(["finetune", "fewshot", "--config", "finetune/fewshot_chexpert", "--print-config"]) == 0
    assert "fewshot:" in capsys.readouterr().out and len(calls) == 2
    # the verb implies fewshot.enabled=true, so the config's few-shot checks apply to a config without it
    assert main(["finetune", "fewshot", "--config", "finetune/in_hospital_mortality"]) == 2
    assert "fewshot.label: the few-shot task needs a binary label column" in capsys.readouterr().err
    with pytest.raises(RadalignError, match="fewshot.enabled=false"):
        real_run_fewshot(load_config(FinetuneConfig, "finetune/in_hospital_mortality", [], stage="finetune"))
    cfg = load_config(FinetuneConfig, "finetune/fewshot_chexpert", [f"run_dir={tmp_path}"], stage="finetune")
    with pytest.raises(RadalignError, match="radalign finetune fewshot --config"):
        real_run_finetune(cfg)  # the training recipe refuses a few-shot config, before taking the folder
    assert not (tmp_path / "config.yaml").exists()
