"""finetune.tower's bookkeeping, without a training run: which export a tuned model finds (`_checksum_at`,
`find_tuned_export`, `recorded_export`), what it loads (`load_tuned_tower`) and what its spec records
(`tower_spec`, `tuned_specs`). Exports are fake folders holding only a config.json (all the lookup reads), except
for load_tuned_tower, which loads the session's random-init nano export. Every expected value is written out
by hand."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from radalign.finetune.config import FinetuneConfig
from radalign.finetune.tower import (
    TUNED_KIND,
    _checksum_at,
    export_view,
    find_tuned_export,
    load_tuned_tower,
    recorded_export,
    tower_spec,
    tuned_specs,
)
from radalign.pretrain.files import FORMAT, IMAGE_FILE

from radalign import RadalignError

# Checksums whose first 16 characters differ from their first 17: a message cut at the wrong place shows.
WANT = "a" * 16 + "b" * 48
OTHER = "c" * 16 + "d" * 48


def _fake_export(folder: Path, checksum: str | None, fmt: str = FORMAT) -> Path:
    """An export folder as far as the lookup reads one: config.json with the format and the checksum."""
    folder.mkdir(parents=True, exist_ok=True)
    doc = {"format": fmt} if checksum is None else {"format": fmt, "checksum": checksum}
    (folder / "config.json").write_text(json.dumps(doc))
    return folder


# ----------------------------------------------------------------------------------------------------------
# _checksum_at: the checksum an export (or a run folder's export/) records; None where there is no export.


def test_checksum_at_reads_an_export_folder_and_a_run_folders_export(tmp_path):
    _fake_export(tmp_path / "exp", WANT)
    _fake_export(tmp_path / "run" / "export", OTHER)
    assert _checksum_at(tmp_path / "exp") == WANT
    assert _checksum_at(str(tmp_path / "exp")) == WANT
    assert _checksum_at(tmp_path / "run") == OTHER


def _bad_place(tmp_path: Path, kind: str) -> Path:
    p = tmp_path / "p"
    if kind == "missing":
        return tmp_path / "nowhere"
    if kind == "too_long":  # the file system refuses the name: OSError, not "no file"
        return tmp_path / ("x" * 300)
    p.mkdir()
    if kind == "empty_folder":
        return p
    if kind == "other_format":
        _fake_export(p, WANT, fmt="radalign-export/0")
    elif kind == "corrupt_json":
        (p / "config.json").write_text('{"format": "radalign-export/1", "checksum": ')
    elif kind == "not_utf8":
        (p / "config.json").write_bytes(b'{"format": "\xff\xfe"}')
    elif kind == "no_checksum":
        _fake_export(p, None)
    elif kind.startswith("json_"):  # valid JSON, not an object: another tool's config.json
        (p / "config.json").write_text({"json_list": '["radalign-export/1"]', "json_null": "null",
                                        "json_str": '"radalign-export/1"'}[kind])
    return p


@pytest.mark.parametrize("kind", ["missing", "too_long", "empty_folder", "other_format", "corrupt_json",
                                  "not_utf8", "no_checksum", "json_list", "json_null", "json_str"])
def test_checksum_at_is_none_wherever_no_export_can_be_read(tmp_path, kind):
    assert _checksum_at(_bad_place(tmp_path, kind)) is None


@pytest.mark.parametrize("kind,why", [("json_list", "not a radalign export or run folder"),
                                      ("json_null", "not a radalign export or run folder"),
                                      ("corrupt_json", "corrupt export config"),
                                      ("not_utf8", "corrupt export config")])
def test_find_export_refuses_a_config_json_it_cannot_read_with_its_own_error(tmp_path, kind, why):
    """pretrain.export.find_export, which the lookup calls: a RadalignError naming the folder, not a crash."""
    from radalign.pretrain.export import find_export

    p = _bad_place(tmp_path, kind)
    with pytest.raises(RadalignError, match=why) as e:
        find_export(p)
    assert str(p) in str(e.value)


# ----------------------------------------------------------------------------------------------------------
# recorded_export: the export path a run's tuned model recorded (models/fusion.json, else its training spec).


def _tower(checksum=WANT, export="/old/place/export") -> dict:
    return {"mode": "lora", "export": export, "export_checksum": checksum}


def _finished(run: Path, tower: dict | None = None, raw: str | None = None) -> None:
    """RUN/models/fusion.json as finetune.registry.save_model writes it (the spec nested under "spec")."""
    (run / "models").mkdir(parents=True, exist_ok=True)
    doc = {"format": "m", "name": "fusion", "spec": {"kind": TUNED_KIND, "tower": tower}}
    (run / "models" / "fusion.json").write_text(raw if raw is not None else json.dumps(doc))


def _training(run: Path, tower: dict | None = None, raw: str | None = None) -> None:
    """RUN/train/fusion/spec.json as finetune.trainer writes it (the spec itself at the top)."""
    (run / "train" / "fusion").mkdir(parents=True, exist_ok=True)
    doc = {"kind": TUNED_KIND, "tower": tower}
    (run / "train" / "fusion" / "spec.json").write_text(raw if raw is not None else json.dumps(doc))


def test_recorded_export_reads_the_finished_model_first(tmp_path):
    _finished(tmp_path, _tower(export="/finished/export"))
    assert recorded_export(tmp_path, WANT) == "/finished/export"
    assert recorded_export(str(tmp_path), WANT) == "/finished/export"
    _training(tmp_path, _tower(export="/training/export"))
    assert recorded_export(tmp_path, WANT) == "/finished/export"  # both: the finished model's


def test_recorded_export_reads_the_training_spec_of_a_run_stopped_before_its_model_finished(tmp_path):
    _training(tmp_path, _tower(export="/training/export"))
    assert recorded_export(tmp_path, WANT) == "/training/export"


@pytest.mark.parametrize("finished", [
    pytest.param({"tower": _tower(OTHER, "/finished/export")}, id="another_checksum"),
    pytest.param({"tower": _tower(WANT, "")}, id="no_path"),
    pytest.param({"tower": {"mode": "lora", "export_checksum": WANT}}, id="path_key_missing"),
    pytest.param({"tower": None}, id="frozen_model_no_tower"),
    pytest.param({"raw": '{"spec": {"tower": '}, id="truncated_json"),
    pytest.param({"raw": '["spec", "tower"]'}, id="json_list"),
    pytest.param({"raw": '"tower"'}, id="json_string"),
    pytest.param({"raw": "not json at all"}, id="garbage")])
def test_recorded_export_skips_a_finished_model_that_does_not_record_this_export(tmp_path, finished):
    _finished(tmp_path, **finished)
    assert recorded_export(tmp_path, WANT) is None  # nothing else recorded
    _training(tmp_path, _tower(export="/training/export"))
    assert recorded_export(tmp_path, WANT) == "/training/export"  # the next place is read


@pytest.mark.parametrize("training", [{"tower": _tower(OTHER)}, {"raw": "{"}, {"raw": "[1, 2]"}, {"raw": "null"}])
def test_recorded_export_is_none_when_no_place_records_this_export(tmp_path, training):
    assert recorded_export(tmp_path, WANT) is None  # an empty run folder
    assert recorded_export(tmp_path / "nowhere", WANT) is None
    _training(tmp_path, **training)
    assert recorded_export(tmp_path, WANT) is None


def test_recorded_export_of_a_run_folder_holding_folders_where_files_belong(tmp_path):
    (tmp_path / "models" / "fusion.json").mkdir(parents=True)  # an OSError on reading, not a crash
    _training(tmp_path, _tower(export="/training/export"))
    assert recorded_export(tmp_path, WANT) == "/training/export"


def test_recorded_export_returns_a_str_even_for_a_non_str_record(tmp_path):
    _finished(tmp_path, _tower(export=12))  # JSON allows it; the caller builds a path from it
    assert recorded_export(tmp_path, WANT) == "12"


# ----------------------------------------------------------------------------------------------------------
# find_tuned_export: data.checkpoint first, then the recorded path; neither -> one error naming both.


def test_find_tuned_export_takes_the_runs_checkpoint_when_it_holds_the_export(tmp_path):
    ckpt = _fake_export(tmp_path / "ckpt", WANT)
    rec = _fake_export(tmp_path / "recorded", WANT)
    assert find_tuned_export(_tower(export=str(rec)), checkpoint=ckpt) == ckpt  # both hold it: the checkpoint
    assert find_tuned_export(_tower(export=str(rec)), checkpoint=str(ckpt)) == ckpt


def test_find_tuned_export_returns_the_export_folder_of_a_run_folder(tmp_path):
    _fake_export(tmp_path / "run" / "export", WANT)
    assert find_tuned_export(_tower(export=None), checkpoint=tmp_path / "run") == tmp_path / "run" / "export"
    assert find_tuned_export(_tower(export=str(tmp_path / "run"))) == tmp_path / "run" / "export"


@pytest.mark.parametrize("ckpt_kind", ["none", "other_export", "no_export", "missing"])
def test_find_tuned_export_falls_back_to_the_recorded_path(tmp_path, ckpt_kind):
    rec = _fake_export(tmp_path / "recorded", WANT)
    ckpt = {"none": None, "other_export": _fake_export(tmp_path / "ckpt", OTHER),
            "no_export": _bad_place(tmp_path, "empty_folder"), "missing": tmp_path / "gone"}[ckpt_kind]
    assert find_tuned_export(_tower(export=str(rec)), checkpoint=ckpt) == rec


def _refusal(tower: dict, checkpoint) -> str:
    with pytest.raises(RadalignError) as e:
        find_tuned_export(tower, checkpoint=checkpoint)
    return str(e.value)


def test_find_tuned_export_refuses_naming_each_place_what_it_holds_the_checksum_and_the_fix(tmp_path):
    ckpt = _fake_export(tmp_path / "ckpt", OTHER)
    rec = tmp_path / "old" / "export"
    msg = _refusal(_tower(export=str(rec)), ckpt)
    assert msg == (f"the tuned model was trained on export {'a' * 16} and its adapter / block weights fit that "
                   f"export only, but the run's data.checkpoint {ckpt} holds export {'c' * 16} and the path "
                   f"recorded at training (spec.tower.export) {rec} holds no export. Fix: copy that export "
                   "beside the run and point data.checkpoint in RUN/config.yaml at it (the export whose "
                   f"config.json has checksum {WANT}), or train again on this one")


@pytest.mark.parametrize("ckpt_kind,rec_kind", [("other_export", "other_export"), ("no_export", "other_export"),
                                                ("corrupt", "no_export"), ("missing", "missing")])
def test_find_tuned_export_refusal_states_what_each_place_holds(tmp_path, ckpt_kind, rec_kind):
    def place(name, kind):
        p = tmp_path / name
        if kind == "other_export":
            return _fake_export(p, OTHER)
        if kind in ("no_export", "corrupt"):
            p.mkdir()
            if kind == "corrupt":
                (p / "config.json").write_text("{")
        return p

    ckpt, rec = place("ckpt", ckpt_kind), place("rec", rec_kind)
    holds = {"other_export": f"holds export {'c' * 16}", "no_export": "holds no export",
             "corrupt": "holds no export", "missing": "holds no export"}
    msg = _refusal(_tower(export=str(rec)), ckpt)
    assert f"but the run's data.checkpoint {ckpt} {holds[ckpt_kind]} and the path recorded at training " \
           f"(spec.tower.export) {rec} {holds[rec_kind]}. Fix:" in msg
    assert msg.count("holds") == 2 and f"checksum {WANT})" in msg


def test_find_tuned_export_names_only_the_places_it_had(tmp_path):
    rec = _fake_export(tmp_path / "rec", OTHER)
    msg = _refusal(_tower(export=str(rec)), None)  # no data.checkpoint given
    assert f"export only, but the path recorded at training (spec.tower.export) {rec} holds export " \
           f"{'c' * 16}. Fix:" in msg and "data.checkpoint " not in msg.split("Fix:")[0]
    ckpt = _fake_export(tmp_path / "ckpt", OTHER)
    msg = _refusal(_tower(export=None), ckpt)  # a spec without a recorded path
    assert f"export only, but the run's data.checkpoint {ckpt} holds export {'c' * 16}. Fix:" in msg


def test_an_export_without_a_checksum_never_matches_a_spec_without_one(tmp_path):
    """Both None: "no checksum found" must not read as "the checksum matches"."""
    ckpt = _fake_export(tmp_path / "ckpt", None)
    msg = _refusal(_tower(checksum=None, export=str(tmp_path / "gone")), ckpt)
    assert "trained on export None and" in msg and f"{ckpt} holds no export and" in msg


# ----------------------------------------------------------------------------------------------------------
# load_tuned_tower: the export found, loaded on the device asked for, made trainable as the spec says.

WIDTH, LAYERS = 64, 2  # tests/assets/nano.json
# LoRA parameters of one block at rank r: r * (in + out) per targeted Linear (attn.in_proj 64->192,
# attn.out_proj 64->64, mlp.c_fc 64->256, mlp.c_proj 256->64), worked out by hand.
LORA_PER_RANK = (64 + 192) + (64 + 64) + (64 + 256) + (256 + 64)


@pytest.fixture(scope="module")
def export_weights(tiny_export):
    from radalign.pretrain.export import load_encoders
    from safetensors.torch import load_file

    return load_encoders(tiny_export).checksum, load_file(str(tiny_export / IMAGE_FILE))


def _lora_spec(export, checksum, rank=2):
    return {"mode": "lora", "lora_rank": rank, "lora_alpha": 4.0, "lora_targets": ["attn.in_proj", "attn.out_proj",
            "mlp.c_fc", "mlp.c_proj"], "export": str(export), "export_checksum": checksum}


def _same_weights(tower, weights) -> None:
    got = export_view(tower)
    assert got.keys() == weights.keys()
    for k, v in weights.items():
        assert torch.equal(got[k].cpu(), v), k


def test_load_tuned_tower_loads_the_export_with_lora_adapters_on_the_default_cpu(tiny_export, export_weights):
    checksum, weights = export_weights
    tower = load_tuned_tower(_lora_spec(tiny_export, checksum, rank=3))
    trained = [(n, p) for n, p in tower.named_parameters() if p.requires_grad]
    assert sum(p.numel() for _, p in trained) == LAYERS * 3 * LORA_PER_RANK
    assert all(".lora_A." in n or ".lora_B." in n for n, _ in trained)
    assert {p.device.type for p in tower.parameters()} == {"cpu"}
    _same_weights(tower, weights)


def test_load_tuned_tower_unfreezes_the_last_blocks(tiny_export, export_weights):
    checksum, weights = export_weights
    tower = load_tuned_tower({"mode": "last_blocks", "tune_blocks": 1, "export": str(tiny_export),
                              "export_checksum": checksum})
    trained = {n.split(".")[0] if not n.startswith("transformer") else ".".join(n.split(".")[:3])
               for n, p in tower.named_parameters() if p.requires_grad}
    assert trained == {"transformer.resblocks.1", "ln_post", "proj"}
    _same_weights(tower, weights)


def test_load_tuned_tower_puts_the_tower_on_the_device_asked_for(tiny_export, export_weights):
    """The meta device (no storage) stands in for an accelerator: a device argument dropped shows as cpu."""
    tower = load_tuned_tower(_lora_spec(tiny_export, export_weights[0]), device="meta")
    assert {p.device.type for p in tower.parameters() if not p.requires_grad} == {"meta"}


def test_load_tuned_tower_looks_at_the_runs_checkpoint_first(tiny_export, export_weights, tmp_path):
    checksum, weights = export_weights
    tower = load_tuned_tower(_lora_spec(tmp_path / "moved_away", checksum), checkpoint=tiny_export)
    _same_weights(tower, weights)
    with pytest.raises(RadalignError, match=f"{tmp_path / 'moved_away'} holds no export"):
        load_tuned_tower(_lora_spec(tmp_path / "moved_away", checksum))


def test_load_tuned_tower_refuses_weights_that_do_not_match_their_checksum(tiny_export, tmp_path):
    """config.json claims the spec's checksum, the weight files are other: the load verifies them."""
    copy = tmp_path / "export"
    shutil.copytree(tiny_export, copy)
    meta = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**meta, "checksum": WANT}))
    with pytest.raises(RadalignError, match="weight files do not match the checksum"):
        load_tuned_tower(_lora_spec(copy, WANT))


# ----------------------------------------------------------------------------------------------------------
# tower_spec and tuned_specs: what a tuned model's spec records.


def _cfg(mode: str, patches: bool = False, checkpoint: str = "ckpt") -> FinetuneConfig:
    cfg = FinetuneConfig()
    cfg.model.image_tower, cfg.model.tune_blocks = mode, 3
    cfg.model.lora_rank, cfg.model.lora_alpha, cfg.model.lora_targets = 5, 7.5, ("mlp.c_fc", "attn.in_proj")
    cfg.data.image_patch_tokens, cfg.data.checkpoint = patches, checkpoint
    return cfg


@pytest.mark.parametrize("patches", [False, True])
def test_tower_spec_of_last_blocks(patches):
    want = {"mode": "last_blocks", "export": "/e/export", "export_checksum": WANT, "tune_blocks": 3}
    if patches:
        want["patch_tokens"] = True
    got = tower_spec(_cfg("last_blocks", patches), {"checksum": WANT, "embed_dim": 8}, Path("/e/export"))
    assert got == want and list(got) == [*list(want)[:3], *(["patch_tokens"] if patches else []), "tune_blocks"]


@pytest.mark.parametrize("patches", [False, True])
def test_tower_spec_of_lora(patches):
    want = {"mode": "lora", "export": "/e/export", "export_checksum": OTHER, "lora_rank": 5, "lora_alpha": 7.5,
            "lora_targets": ["mlp.c_fc", "attn.in_proj"]}
    if patches:
        want["patch_tokens"] = True
    got = tower_spec(_cfg("lora", patches), {"checksum": OTHER}, "/e/export")
    assert got == want and type(got["lora_targets"]) is list and type(got["export"]) is str


def test_a_pooled_tower_spec_has_no_patch_tokens_key():
    """Specs recorded before patch tokens existed must still equal a pooled run's (a key added = "changed")."""
    for mode in ("last_blocks", "lora"):
        assert "patch_tokens" not in tower_spec(_cfg(mode), {"checksum": WANT}, "/e")
    assert tower_spec(_cfg("lora"), {}, "/e")["export_checksum"] is None  # an export without a checksum


def _specs() -> dict:
    """finetune.registry.model_specs' shape: the fusion model and the baselines, by modalities."""
    common = {"n_outputs": 1, "d_model": 16}
    return {"fusion": {"kind": "fusion", "modalities": ["image", "text", "ehr"], "modality_dropout": {"image": 0.1},
                       **common},
            "fusion_no_dropout": {"kind": "fusion", "modalities": ["image", "text", "ehr"], "modality_dropout": {},
                                  **common},
            "image_only": {"kind": "fusion", "modalities": ["image"], "modality_dropout": {}, **common},
            "text_only": {"kind": "fusion", "modalities": ["text"], "modality_dropout": {}, **common},
            "early_fusion": {"kind": "early_fusion", "modalities": ["image", "text", "ehr"], **common},
            "ehr_only": {"kind": "fusion", "modalities": ["ehr"], "modality_dropout": {}, **common}}


def _run(tmp_path, mode="lora", patches=False, nano=None) -> SimpleNamespace:
    ckpt = _fake_export(tmp_path / "pretrain" / "export", WANT)
    export_config = {"checksum": WANT, "embed_dim": 64, "model_name": "nano",
                     "model_cfg": nano or {"vision_cfg": {"image_size": 64, "patch_size": 16, "width": 64}}}
    return SimpleNamespace(run_dir=tmp_path / "run", export_config=export_config,
                           cfg=_cfg(mode, patches, checkpoint=str(ckpt.parent)))


def test_tuned_specs_makes_fusion_the_tuned_kind_and_drops_the_frozen_image_readers(tmp_path, monkeypatch):
    run = _run(tmp_path)
    monkeypatch.chdir(tmp_path)
    run.cfg.data.checkpoint = "pretrain"  # relative to the working folder: recorded as an absolute path
    specs = _specs()
    got = tuned_specs(run, specs)
    tower = {"mode": "lora", "export": str(tmp_path.resolve() / "pretrain" / "export"), "export_checksum": WANT,
             "lora_rank": 5, "lora_alpha": 7.5, "lora_targets": ["mlp.c_fc", "attn.in_proj"]}
    assert got == {"fusion": {**specs["fusion"], "kind": "tuned_fusion", "image_dim": 64, "tower": tower},
                   "text_only": specs["text_only"], "ehr_only": specs["ehr_only"]}
    assert list(got) == ["fusion", "text_only", "ehr_only"]
    assert specs == _specs()  # the frozen specs are not changed in place


def test_tuned_specs_keeps_the_export_path_the_run_recorded(tmp_path):
    run = _run(tmp_path)
    _finished(run.run_dir, _tower(WANT, "/where/it/was/trained"))
    assert tuned_specs(run, _specs())["fusion"]["tower"]["export"] == "/where/it/was/trained"
    _finished(run.run_dir, _tower(OTHER, "/another/export"))  # recorded for another export: not this one's
    assert tuned_specs(run, _specs())["fusion"]["tower"]["export"] == str((tmp_path / "pretrain" / "export")
                                                                          .resolve())


def test_tuned_specs_with_patch_tokens_records_the_patch_geometry(tmp_path, nano_model_cfg):
    run = _run(tmp_path, mode="last_blocks", patches=True, nano=nano_model_cfg)
    fusion = tuned_specs(run, _specs())["fusion"]
    assert fusion["image_patches"] == [(64 // 16) ** 2, 64]  # nano: 64 px, patch 16, width 64
    assert fusion["tower"]["patch_tokens"] is True and fusion["tower"]["tune_blocks"] == 3
    assert "image_patches" not in tuned_specs(_run(tmp_path / "pooled"), _specs())["fusion"]


# ----------------------------------------------------------------------------------------------------------
# tune_tower: a mode it does not know is refused, naming the modes it knows.


@pytest.mark.parametrize("mode", ["frozen", "LoRA", "last-blocks"])
def test_tune_tower_refuses_an_unknown_mode_naming_the_known_ones(mode):
    from radalign.finetune.tower import tune_tower

    with pytest.raises(RadalignError) as e:
        tune_tower(torch.nn.Linear(2, 2), {"mode": mode})
    assert str(e.value) == f"model.image_tower: {mode!r} is not one of last_blocks, lora"


# ----------------------------------------------------------------------------------------------------------
# TunedModel and LinearAttention edge cases (survivors of a 250-mutant sample of finetune/tower.py).


@pytest.fixture(scope="module")
def nano_visual(nano_model_cfg):
    from radalign.pretrain.models import build_model

    torch.manual_seed(0)
    return build_model(nano_model_cfg).visual.eval()


def _tuned(visual, patches: bool = False):
    import copy

    from radalign.finetune.models import FusionModel, build_encoders
    from radalign.finetune.tower import TunedModel, tune_tower

    torch.manual_seed(3)
    head = FusionModel(build_encoders(16, image_dim=64, image_patches=(16, 64) if patches else None), n_outputs=1,
                       d_model=16, n_heads=2, n_layers=1, modality_dropout={})
    tower = tune_tower(copy.deepcopy(visual), {"mode": "last_blocks", "tune_blocks": 1, "patch_tokens": patches})
    return TunedModel(tower, head, "abc").eval()


@pytest.mark.parametrize("patches", [False, True])
def test_a_batch_without_films_gives_zero_tokens_under_the_heads_keys(nano_visual, patches):
    from radalign.finetune.models import PATCH_KEY

    empty = {"pixels": torch.zeros(0, 3, 64, 64), "film_owner": torch.zeros(0, dtype=torch.long)}
    got = _tuned(nano_visual, patches).image_tokens(empty, 3)
    want = {"image": (3, 64), **({PATCH_KEY: (3, 16, 64)} if patches else {})}  # nano: 64-d, 16 patches x 64
    assert {k: tuple(v.shape) for k, v in got.items()} == want
    assert all(not v.any() for v in got.values())


@pytest.mark.parametrize("patches", [False, True])
def test_study_tokens_are_made_on_the_films_device(nano_visual, patches):
    """The meta device stands in for an accelerator: per-study sums built on the CPU would not mix with it."""
    model = _tuned(nano_visual, patches).to("meta")
    batch = {"pixels": torch.zeros(4, 3, 64, 64, device="meta"), "film_owner": torch.tensor([0, 0, 1, 3],
                                                                                              device="meta")}
    got = model.image_tokens(batch, 4)
    assert got and {v.device.type for v in got.values()} == {"meta"}
    empty = {"pixels": torch.zeros(0, 3, 64, 64, device="meta"), "film_owner": torch.zeros(0, dtype=torch.long)}
    assert {v.device.type for v in model.image_tokens(empty, 2).values()} == {"meta"}  # no films: zeros there too


@pytest.mark.parametrize("drop", ["pixels", "film_owner"])
def test_image_tokens_refuse_a_batch_missing_either_film_entry(nano_visual, drop):
    batch = {"pixels": torch.zeros(2, 3, 64, 64), "film_owner": torch.tensor([0, 1])}
    del batch[drop]
    with pytest.raises(RadalignError, match=r"^this model trains the image tower: it scores films, not cached "
                                            r"embeddings; give it inputs from finetune.films"):
        _tuned(nano_visual).image_tokens(batch, 2)


class _NotAViT(torch.nn.Module):
    """Passes check_patch_tower (it has forward_intermediates, no attention pooling) but lacks a ViT's geometry."""

    def forward_intermediates(self, x, **kw):
        raise AssertionError("never reached: the geometry check refuses first")

    def __init__(self, grid: bool):
        super().__init__()
        if grid:
            self.grid_size = (4, 4)
        self.proj = torch.nn.Linear(2, 2)


@pytest.mark.parametrize("grid", [False, True], ids=["no_grid_size", "no_transformer_width"])
def test_a_patch_head_on_a_tower_without_patch_geometry_is_refused_with_the_fix(nano_visual, grid):
    from radalign.finetune.models import FusionModel, build_encoders
    from radalign.finetune.tower import TunedModel

    head = FusionModel(build_encoders(16, image_dim=64, image_patches=(16, 64)), n_outputs=1, d_model=16,
                       n_heads=2, n_layers=1, modality_dropout={})
    with pytest.raises(RadalignError) as e:
        TunedModel(_NotAViT(grid), head, "abc")
    assert str(e.value) == ("data.image_patch_tokens: the tuned tower gives patch tokens None [P, W], the head reads "
                            "[16, 64] (spec image_patches): the run's spec was made for another export; train the "
                            "run again on this one")


@pytest.mark.parametrize("kw", [{"add_bias_kv": True}, {"add_zero_attn": True},
                                {"add_bias_kv": True, "add_zero_attn": True}, {"kdim": 8, "vdim": 8}])
def test_linear_attention_refuses_each_attention_it_cannot_compute(kw):
    from radalign.finetune.tower import LinearAttention

    with pytest.raises(RadalignError, match="model.image_tower=lora supports open_clip ViT blocks only"):
        LinearAttention(torch.nn.MultiheadAttention(16, 4, **kw))


def test_linear_attention_drops_attention_weights_while_training_only():
    """nn.MultiheadAttention's dropout acts on the attention weights in training, never in eval."""
    from radalign.finetune.tower import LinearAttention

    torch.manual_seed(6)
    att = LinearAttention(torch.nn.MultiheadAttention(16, 4, dropout=0.5, batch_first=True))
    x = torch.randn(2, 6, 16)
    with torch.no_grad():
        att.eval()
        ev = att(x)[0]
        torch.testing.assert_close(att(x)[0], ev)  # deterministic in eval
        att.train()
        tr1, tr2 = att(x)[0], att(x)[0]
    assert (tr1 - ev).abs().max() > 1e-3 and (tr1 - tr2).abs().max() > 1e-3
