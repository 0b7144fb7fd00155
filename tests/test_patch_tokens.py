"""data.image_patch_tokens (issue 20 §2): the fusion head attends over the frozen image tower's patch tokens.

Model level: shapes against a hand computation; the output depends on the patches' order and content (not only
on their mean, so a head that pools them first fails); a study without an image (absent, dropped in training,
masked) masks every patch token: its output is the no-image path's, whatever the patch slots hold.
Data level: the tokens are the ViT's last layer (a forward by hand), cached as safetensors and read back without
the tower, averaged per study as the pooled embedding is. Run level: the fusion heads read the patch tokens and
nothing else of the image, predict / eval / explain repeat the run, resume is exact, old configs load.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from radalign.finetune.config import FinetuneConfig
from radalign.finetune.models import PATCH_KEY, EmbeddingTokens, FusionModel, build_encoders
from safetensors.torch import load_file

from radalign import RadalignError
from radalign.config import load_config

P, W, D, B = 5, 12, 10, 6


def _model(cls_sees_absent=True, rates=None, seed=0):
    torch.manual_seed(seed)
    enc = build_encoders(32, image_dim=D, text_dim=8, image_patches=(P, W))
    return FusionModel(enc, d_model=32, n_heads=4, dropout=0.0, modality_dropout=rates or {},
                       cls_sees_absent=cls_sees_absent).eval()


def _batch(seed=0, image_present=(True, False, True, True, False, True)):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(B, D, generator=g), PATCH_KEY: torch.randn(B, P, W, generator=g),
            "text": torch.randn(B, 8, generator=g),
            "present": {"image": torch.tensor(image_present), "text": torch.tensor([True, True, False] * 2)}}


# ----------------------------------------------------------------------------------------------------------
# Model


def test_patch_tokens_are_layer_norm_projection_plus_a_position_each():
    torch.manual_seed(0)
    tok = EmbeddingTokens(W, 32, P, PATCH_KEY)
    x = torch.randn(B, P, W)
    z = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    ref = (z * tok.norm.weight + tok.norm.bias) @ tok.proj.weight.T + tok.proj.bias + tok.pos[None]  # [B, P, 32]
    assert tok(x).shape == (B, P, 32) and torch.allclose(tok(x), ref, atol=1e-5)
    assert tok.pos.shape == (P, 32) and EmbeddingTokens(D, 32).pos is None  # one pooled token: no position
    model = _model()
    assert model.n_tokens == {"image": P, "text": 1} and model.input_keys["image"] == PATCH_KEY
    out = model(_batch())
    assert out.logits.shape == (B, 1) and out.attention.shape == (B, 2)
    assert torch.allclose(out.attention.sum(1) + out.attention_cls, torch.ones(B), atol=1e-5)
    blocked = model._attention_mask(out.present, torch.tensor([-1] + [0] * P + [1]))
    assert blocked.shape == (B * 4, 2 + P, 2 + P)


def _differs_per_row(a: torch.Tensor, b: torch.Tensor, rows) -> bool:
    return all(not torch.allclose(a[r], b[r], atol=1e-6) for r in rows)


def test_output_depends_on_patch_order_and_content_not_only_their_mean():
    """A head that reads only the pooled embedding, or pools the patch tokens before attending, fails here."""
    model, batch = _model(), _batch()
    ref = model(batch).logits
    present = batch["present"]["image"].nonzero()[:, 0].tolist()
    flipped = {**batch, PATCH_KEY: batch[PATCH_KEY].flip(1)}  # the same tokens in reverse order
    assert _differs_per_row(model(flipped).logits, ref, present)
    noise = torch.randn(B, P, W, generator=torch.Generator().manual_seed(5))
    same_mean = {**batch, PATCH_KEY: batch[PATCH_KEY] + noise - noise.mean(1, keepdim=True)}
    assert torch.allclose(same_mean[PATCH_KEY].mean(1), batch[PATCH_KEY].mean(1), atol=1e-5)
    assert _differs_per_row(model(same_mean).logits, ref, present)
    one = batch[PATCH_KEY].clone()
    one[:, 2] = torch.randn(B, W, generator=torch.Generator().manual_seed(6))  # one patch of five
    assert _differs_per_row(model({**batch, PATCH_KEY: one}).logits, ref, present)
    pooled = {**batch, "image": torch.randn(B, D)}  # the pooled embedding is not this head's input
    assert torch.equal(model(pooled).logits, ref)


def _no_image(batch):
    return {k: v for k, v in batch.items() if k not in ("image", PATCH_KEY)}


@pytest.mark.parametrize("cls_sees_absent", [True, False])
def test_a_study_without_image_masks_every_patch_token(cls_sees_absent):
    """Rows without an image give the no-image path's output (the batch without the image at all: every patch
    slot the mask token), whatever their patch slots hold (NaN included), and so does the override."""
    model, batch = _model(cls_sees_absent), _batch()
    absent = ~batch["present"]["image"]
    junk = batch[PATCH_KEY].clone()
    junk[absent] = float("nan")
    ref = model(batch)
    for out in (model({**batch, PATCH_KEY: junk}), model(_no_image(batch))):
        assert torch.equal(out.logits[absent], ref.logits[absent])
    everyone = model(batch, present_override={"image": torch.zeros(B, dtype=torch.bool)})
    assert torch.allclose(everyone.logits, model(_no_image(batch)).logits, atol=1e-6)
    if not cls_sees_absent:  # no query sees any of the P absent tokens
        assert torch.all(ref.attention[absent, 0] == 0)
    half = batch[PATCH_KEY].clone()
    half[absent, 1:] = 0.0  # only the first token of an absent image masked would leak the others: it does not
    assert torch.equal(model({**batch, PATCH_KEY: half}).logits[absent], ref.logits[absent])


def test_modality_dropout_drops_all_patch_tokens_together():
    """A row whose image is dropped in training equals the eval output with its image masked (dropout 0 in the
    layers, so train and eval differ only by the modality draw)."""
    model = _model(rates={"image": 0.5, "text": 0.0})
    batch = _batch(image_present=(True,) * B)
    u = torch.ones(B, 2)
    u[[1, 4], 0] = 0.1  # below 0.5: image dropped on rows 1 and 4
    trained = model.train()({**batch, "dropout_u": u})
    keep = torch.ones(B, dtype=torch.bool)
    keep[[1, 4]] = False
    masked = model.eval()(batch, present_override={"image": keep})
    assert torch.equal(trained.present[:, 0], keep)
    assert torch.allclose(trained.logits, masked.logits, atol=1e-6)
    assert not torch.allclose(trained.logits[[1, 4]], model(batch).logits[[1, 4]], atol=1e-6)
    no_image = model(_no_image(batch)).logits  # every patch slot the mask token
    assert torch.allclose(trained.logits[[1, 4]], no_image[[1, 4]], atol=1e-6)


def test_a_patch_model_refuses_the_pooled_embedding_alone():
    with pytest.raises(RadalignError, match="patch tokens"):
        _model()({"image": torch.randn(B, D), "text": torch.randn(B, 8)})
    with pytest.raises(RadalignError, match=r"expects \[B, 5, 12\]"):
        _model()({PATCH_KEY: torch.randn(B, P + 1, W)})


# ----------------------------------------------------------------------------------------------------------
# Data: the tower's tokens, the cache, per study


@pytest.fixture(scope="module")
def cohort(ft_cohort):
    return ft_cohort


def _tokens_by_hand(visual, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip ViT forward written out: (pooled [B, D] before normalising, patch tokens [B, P, W])."""
    h = visual.conv1(x).flatten(2).transpose(1, 2)  # [B, P, W]
    cls = visual.class_embedding.expand(h.shape[0], 1, -1)
    h = visual.ln_pre(torch.cat([cls, h], 1) + visual.positional_embedding)
    for block in visual.transformer.resblocks:
        h = block(h)
    h = visual.ln_post(h)
    return h[:, 0] @ visual.proj, h[:, 1:]


def test_patch_tokens_are_the_towers_last_layer(cohort):
    from radalign.finetune.inputs import encode_patch_tokens
    from radalign.pretrain.export import load_encoders

    enc = load_encoders(cohort["export"])
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    tokens = encode_patch_tokens(enc, x)
    pooled, ref = _tokens_by_hand(enc.model.visual, x)
    assert tokens.shape == (3, (64 // 16) ** 2, 64) and torch.allclose(tokens, ref, atol=1e-5)
    assert torch.allclose(F.normalize(pooled, dim=-1), enc.encode_images(x), atol=1e-5)  # the same forward


@pytest.mark.parametrize("kw", [{}, {"pool_type": "avg"}, {"final_ln_after_pool": True}])
def test_pooled_and_patches_is_open_clips_forward_with_output_tokens(kw):
    """The helper (forward_intermediates, no flag toggled) against open_clip's own forward with output_tokens set,
    for each pooling the patch path accepts, while the tower trains (gradient reaches the same weights)."""
    from open_clip.transformer import VisionTransformer
    from radalign.finetune.inputs import pooled_and_patches

    torch.manual_seed(0)
    vit = VisionTransformer(image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_ratio=2.0,
                            output_dim=16, **kw)
    x = torch.randn(2, 3, 32, 32)
    pooled, tokens = pooled_and_patches(vit, x)
    assert vit.output_tokens is False  # never toggled: a concurrent plain forward still gets one tensor
    vit.output_tokens = True
    ref_pooled, ref_tokens = vit(x)
    assert tokens.shape == (2, 16, 32)
    torch.testing.assert_close(pooled, ref_pooled)
    torch.testing.assert_close(tokens, ref_tokens)
    (pooled.sum() + tokens.square().sum()).backward()
    grads = {n: p.grad.clone() for n, p in vit.named_parameters() if p.grad is not None}
    vit.zero_grad()
    (ref_pooled.sum() + ref_tokens.square().sum()).backward()
    assert grads.keys() == {n for n, p in vit.named_parameters() if p.grad is not None}
    for n, g in grads.items():
        torch.testing.assert_close(g, dict(vit.named_parameters())[n].grad, msg=n)


def test_patch_tokens_are_cached_and_averaged_per_study(cohort, tmp_path, monkeypatch):
    import radalign.finetune.inputs as I
    from radalign.pretrain.export import load_encoders

    monkeypatch.setenv("RADALIGN_EMBED_CACHE", str(tmp_path / "embeddings"))
    enc = load_encoders(cohort["export"])
    calls = []
    real = I.encode_patch_tokens
    monkeypatch.setattr(I, "encode_patch_tokens", lambda e, x: calls.append(len(x)) or real(e, x))
    first = I.EmbeddingCache(enc, cohort["shards"], tmp_path / "ft", progress=False, patch_tokens=True)
    lookup = first.patches("test")
    assert calls and all(v.shape == (16, 64) for v in lookup.values())
    norms = np.linalg.norm(np.stack(list(lookup.values())), axis=-1)
    assert np.allclose(norms, 1.0, atol=1e-5)  # each token L2-normalised (the head's LayerNorm ignores scale)
    docs = [json.loads(f.read_text()) for f in (tmp_path / "embeddings").glob("test-*.json")]
    assert [d["key"].get("output") for d in docs] == ["patch_tokens"]
    assert len(list((tmp_path / "embeddings").glob("test-*.safetensors"))) == 1
    calls.clear()
    again = I.EmbeddingCache(enc, cohort["shards"], tmp_path / "ft", progress=False, patch_tokens=True)
    hit = again.patches("test")
    assert not calls and hit.keys() == lookup.keys()
    assert all(np.array_equal(hit[k], lookup[k]) for k in lookup)
    pooled = again.images("test")  # its own entry: the patch entry never serves the pooled pass
    assert all(v.shape == (64,) for v in pooled.values()) and len(list((tmp_path / "embeddings").glob("test-*.json"))) == 2

    table = I.load_table(cohort["table"])
    cfg = load_config(FinetuneConfig, "finetune/long_stay", [], stage="finetune")
    data = I.split_inputs("test", table.split("test"), cfg.task, ["image"], cache=again, featurizer=None)
    all_films = {**lookup}
    for s in ("train", "validate"):
        all_films.update(again.patches(s))
    assert data.patches.shape == (len(data), 16, 64)
    many = 0
    for i, ids in enumerate(data.frame["dicom_ids"]):
        films = [all_films[str(d)] for d in (ids if ids is not None else []) if str(d) in all_films]
        if not films:
            assert not data.present["image"][i] and not data.patches[i].any()
            continue
        many += len(films) > 1
        mean = np.mean(films, axis=0)  # position by position over the study's films, each token normalised again
        ref = mean / np.linalg.norm(mean, axis=-1, keepdims=True)
        np.testing.assert_allclose(data.patches[i], ref, atol=1e-6)
    assert many, "the cohort needs a study with several films for this test to mean anything"
    b = data.batch([0, 2], ["image"])
    assert b[PATCH_KEY].shape == (2, 16, 64) and b["image"].shape == (2, 64)


def _drop_films(per_split: dict[str, dict], films) -> None:
    """Take `films` out of a cache pass's {shard split: {dicom_id: ...}} (as if the shards lost them)."""
    for lookup in per_split.values():
        for f in films:
            lookup.pop(str(f), None)


# (pass that loses the first study's films, pass that loses the second's): patch tokens only, pooled only, one each
LOST_IN = [("_patches", "_patches"), ("_images", "_images"), ("_patches", "_images")]


@pytest.mark.parametrize("first,second", LOST_IN)
def test_a_film_read_in_one_pass_and_lost_in_the_other_is_refused(cohort, tmp_path, monkeypatch, first, second):
    """The pooled pass and the patch pass read the shards separately; a study with an image embedding but no
    patch tokens (or the reverse) means the shards changed in between: refused, naming the shards folder and the
    number of such studies (counted by hand here), through split_inputs on a real cache whose lookups lack films."""
    import radalign.finetune.inputs as I
    from radalign.pretrain.export import load_encoders

    monkeypatch.setenv("RADALIGN_EMBED_CACHE", str(tmp_path / "embeddings"))
    enc = load_encoders(cohort["export"])
    frame = I.load_table(cohort["table"]).split("test")
    task = load_config(FinetuneConfig, "finetune/long_stay", [], stage="finetune").task
    cache = I.EmbeddingCache(enc, cohort["shards"], tmp_path / "ft", progress=False, patch_tokens=True)
    whole = I.split_inputs("test", frame, task, ["image"], cache=cache, featurizer=None)  # both passes agree
    with_image = np.flatnonzero(whole.present["image"])
    assert whole.patches[with_image].any(axis=(1, 2)).all() and len(with_image) >= 2
    studies = [frame["dicom_ids"].iloc[i] for i in with_image[:2]]
    _drop_films(getattr(cache, first), studies[0])
    _drop_films(getattr(cache, second), studies[1])
    with pytest.raises(RadalignError) as e:
        I.split_inputs("test", frame, task, ["image"], cache=cache, featurizer=None)
    msg = str(e.value)
    assert msg.startswith(f"{cohort['shards']}: 2 studies have an image embedding but no patch tokens or the reverse")
    assert "the shards changed between the two passes" in msg and "Run again" in msg
    # one study lost in both passes is absent in both: no image, no patch tokens, nothing refused
    _drop_films(cache._images if first == "_patches" else cache._patches, studies[0])
    _drop_films(cache._images if second == "_patches" else cache._patches, studies[1])
    again = I.split_inputs("test", frame, task, ["image"], cache=cache, featurizer=None)
    assert not again.present["image"][with_image[:2]].any() and not again.patches[with_image[:2]].any()
    assert again.present["image"].sum() == whole.present["image"].sum() - 2


# ----------------------------------------------------------------------------------------------------------
# Config


def test_config_key_loads_old_files_takes_a_tuned_tower_and_refuses_no_image(tmp_path):
    from radalign.config import to_yaml

    cfg = load_config(FinetuneConfig, "finetune/in_hospital_mortality", [], stage="finetune")
    assert cfg.data.image_patch_tokens is False
    text = to_yaml(cfg)
    assert "image_patch_tokens: false" in text
    (tmp_path / "old.yaml").write_text(text)  # a run saved with the key off
    assert load_config(FinetuneConfig, tmp_path / "old.yaml", [], stage="finetune") == cfg
    (tmp_path / "older.yaml").write_text(text.replace("  image_patch_tokens: false\n", ""))  # saved without it
    assert load_config(FinetuneConfig, tmp_path / "older.yaml", [], stage="finetune") == cfg
    on = load_config(FinetuneConfig, tmp_path / "old.yaml", ["data.image_patch_tokens=true"], stage="finetune")
    assert on.data.image_patch_tokens is True
    for tower in ("last_blocks", "lora"):  # the tuned tower gives its patch tokens (finetune.tower)
        tuned = load_config(FinetuneConfig, "finetune/in_hospital_mortality", [
            f"model.image_tower={tower}", "data.image_patch_tokens=true"], stage="finetune")
        assert tuned.data.image_patch_tokens and tuned.model.image_tower == tower
    with pytest.raises(RadalignError, match=r"data.image_patch_tokens: true, but data.modalities \['ehr'\]"):
        load_config(FinetuneConfig, "finetune/in_hospital_mortality",
                    ["data.image_patch_tokens=true", "data.modalities=[ehr]"], stage="finetune")


# ----------------------------------------------------------------------------------------------------------
# Run: train, predict, eval, explain, resume


def _cfg(cohort, run_dir, *overrides) -> FinetuneConfig:
    base = [f"run_dir={run_dir}", f"data.table={cohort['table']}", f"data.shards={cohort['shards']}",
            f"data.checkpoint={cohort['export']}", f"data.cache={cohort['root'] / 'cache'}", "bootstrap=50",
            "optim.epochs=2", "optim.batch_size=64", "model.d_model=32", "model.ehr_d=16", "model.n_layers=1",
            "model.ehr_blocks=1", "progress=false", "precision=fp32", "data.image_patch_tokens=true",
            "baselines.degradation_seeds=1"]
    return load_config(FinetuneConfig, "finetune/long_stay", base + list(overrides), stage="finetune")


@pytest.fixture(scope="module")
def patch_run(cohort, tmp_path_factory):
    from radalign.finetune.recipe import run_finetune

    run_dir = tmp_path_factory.mktemp("patchrun") / "long_stay"
    run_finetune(_cfg(cohort, run_dir, "baselines.models=[image_only,early_fusion,gbdt]"))
    return run_dir


def test_the_fusion_heads_read_the_patch_tokens_and_the_baselines_the_pooled_embedding(patch_run):
    from radalign.finetune.predict import load_run

    trained = load_run(patch_run)
    specs = {n: meta["spec"] for n, (_, meta) in trained.models.items()}
    for name in ("fusion", "fusion_no_dropout", "image_only"):
        assert specs[name]["image_patches"] == [16, 64], name
        assert load_file(str(patch_run / "models" / f"{name}.safetensors"))["encoders.image.pos"].shape == (16, 32)
    assert "image_patches" not in specs["early_fusion"] and specs["gbdt"]["with_image"]
    data = trained.inputs("test")
    assert data.patches.shape == (len(data), 16, 64) and data.image.shape == (len(data), 64)
    base = {n: trained.logits(data, n) for n in ("fusion", "image_only", "early_fusion", "gbdt")}
    rng = np.random.default_rng(0)
    pooled, patches = data.image.copy(), data.patches.copy()
    data.image = rng.normal(size=pooled.shape).astype(np.float32)  # another pooled embedding ...
    for name in ("fusion", "image_only"):
        np.testing.assert_array_equal(trained.logits(data, name), base[name])  # ... the patch heads ignore
    for name in ("early_fusion", "gbdt"):
        assert not np.allclose(trained.logits(data, name), base[name])  # ... the baselines read it
    data.image = pooled
    data.patches = np.ascontiguousarray(patches[:, ::-1])  # the same tokens, other positions
    img = data.present["image"]
    for name in ("fusion", "image_only"):
        assert (np.abs(trained.logits(data, name) - base[name])[img] > 1e-6).mean() > 0.9, name


def test_predict_eval_and_explain_repeat_the_run(patch_run):
    from radalign.finetune.evaluate import evaluate_run, explain_study
    from radalign.finetune.predict import predict_split
    from sklearn.metrics import roc_auc_score

    frame = predict_split(patch_run)
    saved = pd.read_csv(patch_run / "predictions.csv")
    assert frame["study_id"].astype(str).tolist() == saved["study_id"].astype(str).tolist()
    scored = sorted(c for c in saved.columns if c.startswith(("score:", "logit:")))
    assert scored == sorted(c for c in frame.columns if c.startswith(("score:", "logit:")))
    for c in scored:
        np.testing.assert_allclose(frame[c].to_numpy(), saved[c].to_numpy(), rtol=1e-6, atol=1e-6, err_msg=c)
    res = evaluate_run(patch_run, n_boot=20)
    lab = saved[saved["label"].notna()]
    auroc = res["discrimination"]["metrics"]["auroc"]["value"]
    assert auroc == pytest.approx(roc_auc_score(lab["label"], lab["score:fusion"]), abs=1e-9)
    row = int(np.flatnonzero(saved["label"].notna().to_numpy())[0])
    expl = explain_study(patch_run, saved["study_id"].iloc[row])
    assert expl.full == pytest.approx(saved["logit:fusion"].iloc[row], abs=1e-5)
    assert sum(expl.shapley.values()) == pytest.approx(expl.full - expl.empty, abs=1e-6)


def test_the_frozen_runs_head_behind_an_untrained_lora_tower_scores_as_the_frozen_run(cohort, patch_run):
    """The tuned path's patch tokens (films through the tower every time, finetune.tower) are the frozen path's
    cached ones: the frozen run's trained head behind the export's tower with zero-update LoRA adapters gives
    the frozen run's logits."""
    from radalign.finetune.films import film_inputs, load_films
    from radalign.finetune.inputs import EmbeddingCache
    from radalign.finetune.predict import load_run
    from radalign.finetune.registry import logits_on
    from radalign.finetune.tower import TunedModel, study_tokens, tune_tower
    from radalign.pretrain.export import load_encoders

    trained = load_run(patch_run)
    head, meta = trained.models["fusion"]
    mods = meta["spec"]["modalities"]
    frozen = trained.inputs("test")
    enc = load_encoders(cohort["export"])
    tower = tune_tower(enc.model.visual, {"mode": "lora", "lora_rank": 2, "lora_alpha": 4.0,
                                          "lora_targets": ["attn.in_proj", "mlp.c_fc"]})
    model = TunedModel(tower, head, enc.checksum).eval()
    frame = trained.table().split("test")
    store = load_films(cohort["shards"], trained.export_config(), [frame])
    texts = EmbeddingCache(trained.encoders, cohort["shards"], trained.cfg.data.cache, progress=False)
    films = film_inputs("test", frame, trained.cfg.task, mods, cache=texts, featurizer=trained.featurizer,
                        store=store)
    tuned = study_tokens(model, films)
    np.testing.assert_allclose(tuned.patches, frozen.patches, atol=2e-5)
    np.testing.assert_array_equal(tuned.present["image"], frozen.present["image"])
    np.testing.assert_allclose(logits_on(head, tuned, mods), logits_on(head, frozen, mods), atol=1e-4)
    np.testing.assert_allclose(logits_on(model, films, mods), logits_on(head, frozen, mods), atol=1e-4)


def test_a_tower_without_patch_tokens_is_refused_with_the_fix():
    """Not an open_clip ViT (no forward_intermediates), or one pooling by attention: one error naming the fix."""
    from radalign.finetune.inputs import check_patch_tower

    from radalign import RadalignError

    attn = torch.nn.Module()
    attn.forward_intermediates, attn.attn_pool = (lambda x, **kw: None), torch.nn.Identity()
    for visual in (torch.nn.Linear(2, 2), attn):
        with pytest.raises(RadalignError, match=r"has no patch tokens to give; use data.image_patch_tokens=false"):
            check_patch_tower(visual)
