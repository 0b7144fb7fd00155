"""finetune.tower on the nano tower (random init, CPU): which parameters LoRA and last_blocks train (counted by
hand), that the export's weights stay bit-identical through training, that the swapped attention computes what
open_clip's does, and that the state dict holds the trained weights only."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from radalign.finetune.tower import LORA_TARGETS, TunedModel, export_view, trainable_count, tune_tower
from torch import nn

from radalign import RadalignError

WIDTH, LAYERS = 64, 2  # tests/assets/nano.json: vision width 64, 2 blocks, mlp 4 x width
# (in, out) of each targeted Linear of a block, read off open_clip's ResidualAttentionBlock by hand
SHAPES = {"attn.in_proj": (WIDTH, 3 * WIDTH), "attn.out_proj": (WIDTH, WIDTH), "mlp.c_fc": (WIDTH, 4 * WIDTH),
          "mlp.c_proj": (4 * WIDTH, WIDTH)}


@pytest.fixture(scope="module")
def visual(nano_model_cfg):
    from radalign.pretrain.models import build_model

    torch.manual_seed(0)
    return build_model(nano_model_cfg).visual.eval()


def _lora(visual, rank=4, alpha=8.0, targets=LORA_TARGETS):
    torch.manual_seed(1)
    return tune_tower(copy.deepcopy(visual), {"mode": "lora", "lora_rank": rank, "lora_alpha": alpha,
                                              "lora_targets": list(targets)})


def _images(n=6, seed=2):
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rank", [1, 4, 8])
@pytest.mark.parametrize("targets", [LORA_TARGETS, ("attn.in_proj",), ("attn.out_proj", "mlp.c_proj"),
                                     ("mlp.c_fc",)])
def test_lora_rank_r_trains_exactly_r_in_plus_out_per_targeted_linear(visual, rank, targets):
    tower = _lora(visual, rank, targets=targets)
    expected = LAYERS * sum(rank * (SHAPES[t][0] + SHAPES[t][1]) for t in targets)
    assert trainable_count(tower) == expected
    names = [n for n, p in tower.named_parameters() if p.requires_grad]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert len(names) == 2 * LAYERS * len(targets)


def test_untrained_lora_tower_is_the_export_tower(visual):
    """B starts at zero: the swapped attention (q/k/v and out as called Linears) gives open_clip's output."""
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(_lora(visual)(x), visual(x), atol=1e-5, rtol=1e-5)


def _merged_reference(visual, tower, scale: float) -> nn.Module:
    """The export tower with every adapter's scale * B @ A added into its weights by hand (open_clip's own
    forward, nn.MultiheadAttention's in_proj_weight and out_proj): what the adapters must compute."""
    ref = copy.deepcopy(visual)
    lora = dict(tower.named_parameters())
    names = {"attn.in_proj": "attn.in_proj_weight", "attn.out_proj": "attn.out_proj.weight",
             "mlp.c_fc": "mlp.c_fc.weight", "mlp.c_proj": "mlp.c_proj.weight"}
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for i in range(LAYERS):
            for t, w in names.items():
                a = lora[f"transformer.resblocks.{i}.{t}.lora_A.default.weight"]  # [r, in]
                b = lora[f"transformer.resblocks.{i}.{t}.lora_B.default.weight"]  # [out, r]
                params[f"transformer.resblocks.{i}.{w}"] += scale * b @ a
    return ref


@pytest.mark.parametrize("rank,alpha", [(4, 8.0), (2, 1.0)])
def test_lora_adapters_act_on_attention_and_mlp_as_merged_weights_would(visual, rank, alpha):
    """Every adapter reaches the output (an adapter on a Linear whose forward is never called, such as
    nn.MultiheadAttention's out_proj, would not) with the scale alpha / r."""
    tower = _lora(visual, rank, alpha)
    with torch.no_grad():
        for n, p in tower.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.05)
    x = _images()
    with torch.no_grad():
        got, want = tower(x), _merged_reference(visual, tower, alpha / rank)(x)
        assert (got - visual(x)).abs().max() > 1e-2  # the adapters change the output
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def _train(tower, steps=3):
    head = nn.Linear(64, 1)
    params = [p for p in [*tower.parameters(), *head.parameters()] if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    tower.train()
    for s in range(steps):
        loss = head(tower(_images(8, seed=10 + s))).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return tower


def test_lora_training_leaves_every_export_weight_bit_identical(visual):
    before = {k: v.clone() for k, v in visual.state_dict().items()}
    tower = _train(_lora(visual))
    after = export_view(tower)
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    for n, p in tower.named_parameters():
        if ".lora_B." in n:
            assert p.abs().sum() > 0, n  # every adapter trained


@pytest.mark.parametrize("n", [1, 2])
def test_last_blocks_trains_only_the_last_n_blocks_the_final_norm_and_the_projection(visual, n):
    tower = tune_tower(copy.deepcopy(visual), {"mode": "last_blocks", "tune_blocks": n})
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    _train(tower)
    tuned = tuple(f"transformer.resblocks.{i}." for i in range(LAYERS - n, LAYERS)) + ("ln_post.", "proj")
    expected = sum(p.numel() for k, p in visual.named_parameters() if k.startswith(tuned))
    assert trainable_count(tower) == expected
    for k, v in tower.state_dict().items():
        if k.startswith(tuned):
            if not k.endswith("in_proj_bias"):  # q/k biases may not move much, the weights must
                assert not torch.equal(v, before[k]), f"{k} did not train"
        else:
            assert torch.equal(v, before[k]), f"{k} changed but is frozen"


def test_bad_options_are_refused_with_the_fix(visual):
    with pytest.raises(RadalignError, match=r"model.tune_blocks: 3; .* 2 blocks: use 1 to 2"):
        tune_tower(copy.deepcopy(visual), {"mode": "last_blocks", "tune_blocks": 3})
    with pytest.raises(RadalignError, match=r"model.lora_targets: \['attn.qkv'\]"):
        _lora(visual, targets=("attn.qkv",))


def _head():
    from radalign.finetune.models import FusionModel, build_encoders

    torch.manual_seed(3)
    return FusionModel(build_encoders(16, image_dim=64), n_outputs=1, d_model=16, n_heads=2, n_layers=1,
                       modality_dropout={})


def _batch(rows=4, seed=4):
    owner = torch.tensor([0, 0, 1, 3])  # row 2 has no film
    present = torch.tensor([True, True, False, True])
    return {"pixels": _images(len(owner), seed), "film_owner": owner, "present": {"image": present[:rows]}}


def test_state_dict_holds_only_the_trained_weights_and_loads_back(visual):
    model = TunedModel(_lora(visual), _head(), "abc")
    sd = model.state_dict()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(sd) == trained  # exactly what trains: head and adapters (buffers are rebuilt from the spec)
    assert not [k for k in sd if k.startswith("tower.") and ".lora_" not in k]
    with torch.no_grad():
        for v in sd.values():
            v.add_(0.01)  # make the loaded weights differ from a fresh build
        model.load_state_dict(sd)
    fresh = TunedModel(_lora(visual), _head(), "abc")
    fresh.load_state_dict(model.state_dict())  # strict: the export's weights are not asked for
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(_batch()).logits, fresh(_batch()).logits)
    with pytest.raises(RuntimeError, match="head.head.weight"):
        fresh.load_state_dict({k: v for k, v in sd.items() if k != "head.head.weight"})


def test_study_token_is_the_normalised_mean_of_its_films(visual):
    import torch.nn.functional as F

    model = TunedModel(_lora(visual), _head(), "abc").eval()
    b = _batch()
    with torch.no_grad():
        emb = F.normalize(visual(b["pixels"]), dim=-1)  # untrained adapters: the export's embedding
        tokens = model.image_tokens(b, 4)["image"]
    want = torch.stack([F.normalize(emb[:2].mean(0), dim=0), F.normalize(emb[2], dim=0), torch.zeros(64),
                        F.normalize(emb[3], dim=0)])
    torch.testing.assert_close(tokens, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(RadalignError, match=r"scores films, not cached embeddings; give it inputs from "
                                            r"finetune.films \(finetune predict/eval do for a tuned run\)"):
        model({"image": torch.zeros(4, 64), "present": {"image": torch.ones(4, dtype=torch.bool)}})


# data.image_patch_tokens with a tuned tower: the head reads the tower's patch tokens of every step

PATCHES = (64 // 16) ** 2  # the nano tower: 64 px images, 16 px patches


def _patch_head():
    from radalign.finetune.models import FusionModel, build_encoders

    torch.manual_seed(3)
    return FusionModel(build_encoders(16, image_dim=64, image_patches=(PATCHES, WIDTH)), n_outputs=1, d_model=16,
                       n_heads=2, n_layers=1, modality_dropout={})


def _frozen_patch_inputs(visual, b) -> tuple[np.ndarray, np.ndarray]:
    """The frozen path's study inputs of the batch's films, by its own functions: encode_patch_tokens, each
    film's vector / token normalised (as data.embed stores them), then finetune.inputs.study_images per study."""
    from types import SimpleNamespace

    from radalign.finetune.inputs import encode_patch_tokens, study_images

    enc = SimpleNamespace(model=SimpleNamespace(visual=visual), device="cpu")
    with torch.no_grad():
        tokens = F.normalize(encode_patch_tokens(enc, b["pixels"]), dim=-1).numpy()  # [F, P, W]
        pooled = F.normalize(visual(b["pixels"]), dim=-1).numpy()  # [F, D]
    films = [[f"f{i}" for i in range(len(b["film_owner"])) if b["film_owner"][i] == r] for r in range(4)]
    pooled, _, _ = study_images(films, {f"f{i}": v for i, v in enumerate(pooled)}, 64)
    tokens, _, _ = study_images(films, {f"f{i}": v for i, v in enumerate(tokens)}, (PATCHES, WIDTH))
    return pooled, tokens


def test_an_untrained_lora_tower_gives_the_frozen_paths_patch_tokens_and_the_head_reads_them(visual):
    from radalign.finetune.models import PATCH_KEY

    model = TunedModel(_lora(visual), _patch_head(), "abc").eval()
    assert model.reads_patches
    b = _batch()
    with torch.no_grad():
        got = model.image_tokens(b, 4)
        logits = model(b).logits
    pooled, tokens = _frozen_patch_inputs(visual, b)
    assert got[PATCH_KEY].shape == (4, PATCHES, WIDTH) and not got[PATCH_KEY][2].any()  # row 2: no film
    np.testing.assert_allclose(got[PATCH_KEY].numpy(), tokens, atol=1e-5)
    np.testing.assert_allclose(got["image"].numpy(), pooled, atol=1e-5)
    frozen = {"image": torch.as_tensor(pooled), PATCH_KEY: torch.as_tensor(tokens), "present": b["present"]}
    with torch.no_grad():
        torch.testing.assert_close(logits, model.head(frozen).logits, atol=1e-5, rtol=1e-5)
        shuffled = model.head({**frozen, PATCH_KEY: frozen[PATCH_KEY].flip(1)}).logits
    assert not torch.allclose(logits[[0, 1, 3]], shuffled[[0, 1, 3]], atol=1e-4)  # it reads the patches
    assert model.tower.output_tokens is False  # never toggled (inputs.pooled_and_patches)
    none = model.image_tokens({"pixels": torch.zeros(0, 3, 64, 64), "film_owner": torch.zeros(0, dtype=torch.long)}, 3)
    assert {k: tuple(v.shape) for k, v in none.items()} == {"image": (3, 64), PATCH_KEY: (3, PATCHES, WIDTH)}
    assert not any(v.any() for v in none.values())  # no film in the batch: every study absent


def test_with_patch_tokens_the_lora_adapters_train_through_the_patches(visual):
    model = TunedModel(_lora(visual), _patch_head(), "abc").train()
    model(_batch()).logits.sum().backward()
    grads = {n: p.grad for n, p in model.tower.named_parameters() if ".lora_B." in n}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_last_blocks_with_patch_tokens_leaves_the_projection_frozen(visual):
    """The projection acts on the pooled token only: with patch tokens it would train nothing."""
    tower = tune_tower(copy.deepcopy(visual), {"mode": "last_blocks", "tune_blocks": 1, "patch_tokens": True})
    names = {n for n, p in tower.named_parameters() if p.requires_grad}
    assert "proj" not in names and "ln_post.weight" in names
    assert names == {n for n, _ in tower.named_parameters() if n.startswith(("transformer.resblocks.1.", "ln_post."))}
    pooled = tune_tower(copy.deepcopy(visual), {"mode": "last_blocks", "tune_blocks": 1})
    assert {n for n, p in pooled.named_parameters() if p.requires_grad} == names | {"proj"}


def test_a_tower_without_patch_tokens_is_refused_for_a_patch_head(visual):
    class Pooled(nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :64]

    with pytest.raises(RadalignError, match="data.image_patch_tokens: the export's image tower .Pooled. is not an "
                                            "open_clip VisionTransformer"):
        TunedModel(Pooled(), _patch_head(), "abc")


def _geometry(**vision):
    from radalign.finetune.tower import patch_geometry

    return patch_geometry({"model_name": "m", "model_cfg": {"vision_cfg": vision}})


def test_patch_geometry_is_the_towers_own_with_open_clips_defaults(visual, nano_model_cfg):
    from radalign.finetune.models import PATCH_KEY

    b = _batch()
    model = TunedModel(_lora(visual), _patch_head(), "abc").eval()
    with torch.no_grad():
        real = tuple(model._films(b["pixels"])[PATCH_KEY].shape[1:])  # [P, W] the tower gives
    assert _geometry(**nano_model_cfg["vision_cfg"]) == list(real) == [PATCHES, WIDTH]
    assert _geometry(image_size=80, patch_size=16, width=256, layers=6) == [25, 256]  # the demo's tiny-80
    assert _geometry(layers=12) == [(224 // 16) ** 2, 768]  # open_clip's defaults: 224 px, patch 16, width 768
    assert _geometry(image_size=[64, 96], patch_size=16, width=32) == [4 * 6, 32]
    assert _geometry(image_size=[64, 96], patch_size=[16, 32], width=32) == [4 * 3, 32]  # rectangular patches
    assert _geometry(image_size=64, patch_size=16, width=32, timm_model_name=None, pool_type="avg") == [16, 32]


@pytest.mark.parametrize("bad,why", [({"timm_model_name": "vit_base_patch16_224"}, "it is a timm model"),
                                     ({"attentional_pool": True}, "it pools by attention"),
                                     ({"pool_type": "none"}, "its pool_type 'none' gives no patch tokens"),
                                     ({"patch_dropout": 0.5}, "its patch_dropout 0.5 drops patch tokens")])
def test_patch_geometry_refuses_a_tower_without_a_fixed_set_of_patch_tokens(bad, why):
    with pytest.raises(RadalignError, match=f"the export's image tower .m. has no fixed set of patch tokens to train "
                                            f"through: {why}.*Use data.image_patch_tokens=false"):
        _geometry(image_size=64, patch_size=16, width=32, **bad)


def test_a_head_built_for_other_patch_tokens_is_refused_before_any_film(visual):
    from radalign.finetune.models import FusionModel, build_encoders

    head = FusionModel(build_encoders(16, image_dim=64, image_patches=(9, WIDTH)), n_outputs=1, d_model=16,
                       n_heads=2, n_layers=1, modality_dropout={})
    with pytest.raises(RadalignError, match=r"gives patch tokens \(16, 64\) \[P, W\], the head reads \[9, 64\]"):
        TunedModel(_lora(visual), head, "abc")


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", [None, "bool", "float"])
def test_linear_attention_computes_what_multihead_attention_does(batch_first, mask):
    """Both layouts and both mask kinds (nn.MultiheadAttention: a True bool entry blocks; a float one is added)."""
    from radalign.finetune.tower import LinearAttention

    torch.manual_seed(5)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    x = torch.randn(3, 5, 16) if batch_first else torch.randn(5, 3, 16)  # [B, L, D] or [L, B, D]
    m = None
    if mask == "bool":
        m = torch.triu(torch.ones(5, 5, dtype=torch.bool), diagonal=1)  # causal: True = blocked
    elif mask == "float":
        m = torch.randn(5, 5)
    with torch.no_grad():
        want = mha(x, x, x, need_weights=False, attn_mask=m)[0]
        got, weights = LinearAttention(mha)(x, attn_mask=m)
    assert weights is None and got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_linear_attention_refusals_name_the_way_out():
    from radalign.finetune.tower import LinearAttention

    with pytest.raises(RadalignError, match=r"^image tower: an attention layer with separate q/k/v sizes or "
                                            r"bias_k/zero_attn; model.image_tower=lora supports open_clip ViT blocks "
                                            r"only \(use last_blocks\)$"):
        LinearAttention(nn.MultiheadAttention(16, 4, kdim=8, vdim=8))
    att = LinearAttention(nn.MultiheadAttention(16, 4, batch_first=True))
    x = torch.randn(2, 3, 16)
    with pytest.raises(RadalignError, match=r"^LinearAttention: self-attention only \(query, key and value the same "
                                            r"tensor\)$"):
        att(x, x.clone())
    with pytest.raises(RadalignError, match=r"is not an open_clip VisionTransformer \(no transformer.resblocks\); "
                                            r"model.image_tower=last_blocks\|lora need one \(use "
                                            r"model.image_tower=frozen\)"):
        tune_tower(nn.Linear(2, 2), {"mode": "last_blocks", "tune_blocks": 1})


def test_present_override_reaches_the_head(visual):
    model = TunedModel(_lora(visual), _head(), "abc").eval()
    b = _batch()
    off = {"image": torch.zeros(4, dtype=torch.bool)}
    with torch.no_grad():
        tokens = model.image_tokens(b, 4)
        got = model(b, present_override=off).logits
        want = model.head({**b, **tokens}, present_override=off).logits
        plain = model(b).logits
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got[[0, 1, 3]], plain[[0, 1, 3]], atol=1e-5)  # the image masked for every row


def test_a_wrapped_tuned_model_saves_and_loads_its_trained_weights_only(visual):
    """Inside another module (a wrapper's prefix on every key), the export's frozen weights are still left out
    of the state dict and not asked for when it loads back."""
    outer = nn.ModuleDict({"m": TunedModel(_lora(visual), _head(), "abc")})
    sd = outer.state_dict()
    assert sd and all(k.startswith("m.") for k in sd)
    assert {k[2:] for k in sd} == {n for n, p in outer["m"].named_parameters() if p.requires_grad}
    fresh = nn.ModuleDict({"m": TunedModel(_lora(visual), _head(), "abc")})
    fresh.load_state_dict(sd)  # strict
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in sd.items())
