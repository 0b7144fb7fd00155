"""`radalign export`: open_clip, transformers and ONNX folders give radalign's own embeddings, and the model card.

Round trips load each folder the way a user without radalign would: open_clip and transformers in a fresh Python
process that never imports radalign (checked from sys.modules), ONNX through onnxruntime. References are
radalign's own loader (`load_encoders`) on the same images and texts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from radalign.pretrain.export import export_encoders, load_encoders
from radalign.pretrain.formats import card, common
from radalign.pretrain.models import build_model
from radalign.pretrain.share import ExportConfig, run_export

from radalign import RadalignError
from tests.tiny_towers import hf_model_cfg, write_tiny_bert

TEXTS = ["No acute cardiopulmonary process.", "Small LEFT pleural effusion;  adjacent atelectasis.",
         "ET tube terminates 3.5 cm above the carina.\nNG tube courses below the diaphragm.",
         "Moderate cardiomegaly, unchanged since the prior study (2019-01-02)!",
         "The patient's right-sided PICC line tip is in the low SVC / cavoatrial junction.",
         "Mild pulmonary edema. " * 30]  # longer than the context: truncated
OUR_PACKAGES = ("radalign", "pretrain", "data", "zeroshot", "retrieval", "finetune")

# Runs in a fresh interpreter (-I: no PYTHONPATH, no cwd on sys.path): open_clip or transformers only.
LOADER = r"""
import json, sys
import numpy as np, torch
fmt, folder, io = sys.argv[1], sys.argv[2], sys.argv[3]
images = torch.from_numpy(np.load(io + "/images.npy"))
texts = json.load(open(io + "/texts.json"))
with torch.no_grad():
    if fmt == "open_clip":
        import open_clip
        model, _, _ = open_clip.create_model_and_transforms("local-dir:" + folder)
        tok = open_clip.get_tokenizer("local-dir:" + folder)
        model.eval()
        ids = tok(texts)
        img, txt = model.encode_image(images, normalize=True), model.encode_text(ids, normalize=True)
    else:
        from transformers import AutoModel, AutoTokenizer
        model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        tok = AutoTokenizer.from_pretrained(folder)
        batch = tok(texts, padding="max_length", max_length=int(sys.argv[4]), truncation=True, return_tensors="pt")
        ids = batch["input_ids"]
        img = model.get_image_features(pixel_values=images)
        txt = model.get_text_features(**{k: v for k, v in batch.items() if k != "special_tokens_mask"})
        img = img if torch.is_tensor(img) else img.pooler_output
        txt = txt if torch.is_tensor(txt) else txt.pooler_output
        img, txt = torch.nn.functional.normalize(img, dim=-1), torch.nn.functional.normalize(txt, dim=-1)
np.save(io + "/img.npy", img.numpy()); np.save(io + "/txt.npy", txt.numpy()); np.save(io + "/ids.npy", ids.numpy())
ours = ("radalign", "pretrain", "data", "zeroshot", "retrieval", "finetune")
json.dump({"leaked": sorted(m for m in sys.modules if m.split(".")[0] in ours), "class": type(model).__name__},
          open(io + "/info.json", "w"))
"""


def _fresh_process(fmt: str, folder: Path, images: torch.Tensor, texts: list[str], work: Path,
                   context: int = 0) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    np.save(work / "images.npy", images.numpy())
    (work / "texts.json").write_text(json.dumps(texts))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(work / "hf_modules"))
    proc = subprocess.run([sys.executable, "-I", "-c", LOADER, fmt, str(folder), str(work), str(context)],
                          cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((work / "info.json").read_text())
    assert info["leaked"] == [], f"the loader imported radalign modules: {info['leaked']}"
    return {"img": torch.from_numpy(np.load(work / "img.npy")), "txt": torch.from_numpy(np.load(work / "txt.npy")),
            "ids": torch.from_numpy(np.load(work / "ids.npy")), "class": info["class"]}


def _export(source: Path, fmt: str, out: Path, **kw) -> Path:
    return run_export(ExportConfig(source=str(source), format=fmt, out=str(out), **kw))


def _images(encoders, n: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randn(n, 3, encoders.image_size, encoders.image_size, generator=g)  # [n, 3, S, S]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


def _upto_eot(row: torch.Tensor) -> list[int]:
    ids = row.tolist()
    return ids[: ids.index(common.EOT_ID) + 1]


@pytest.fixture(scope="module")
def hf_exports(tmp_path_factory) -> dict[str, Path]:
    """Exports of nano ViTs with a tiny BERT tower in the three ways radalign pools and projects HF towers."""
    root = tmp_path_factory.mktemp("hf_towers")
    tower = root / "tower"
    write_tiny_bert(tower)
    out = {}
    for name, pooler, proj in (("mean-linear", "mean_pooler", "linear"), ("cls-linear", "cls_pooler", "linear"),
                               ("cls-hidden-mlp", "cls_last_hidden_state_pooler", "mlp")):
        cfg = hf_model_cfg(tower, pooler=pooler, proj=proj)
        torch.manual_seed(3)
        out[name] = export_encoders(build_model(cfg), cfg, root / name / "export")
    return out


# ----------------------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("fmt", ["open_clip", "transformers"])
def test_builtin_text_tower_round_trip_in_a_fresh_process(tiny_export, tmp_path, fmt):
    enc = load_encoders(tiny_export)
    out = _export(tiny_export, fmt, tmp_path / fmt)
    images = _images(enc)
    got = _fresh_process(fmt, out, images, TEXTS, tmp_path / "io", context=enc.config["model_cfg"]["text_cfg"]["context_length"])
    assert _max_diff(got["img"], enc.encode_images(images)) <= 1e-5
    assert _max_diff(got["txt"], enc.encode_texts(TEXTS)) <= 1e-5
    assert got["class"] == ("CLIP" if fmt == "open_clip" else "CLIPModel")
    ours = enc.tokenize(TEXTS)
    if fmt == "open_clip":  # the same BPE: identical ids, padding included
        assert torch.equal(got["ids"], ours)
    else:  # CLIPTokenizer built from open_clip's vocabulary: same ids up to end-of-text, then it pads with it
        for a, b in zip(got["ids"], ours):
            assert _upto_eot(a) == _upto_eot(b)
            assert set(a[len(_upto_eot(a)):].tolist()) <= {common.EOT_ID}
        assert _upto_eot(got["ids"][-1])[-1] == common.EOT_ID and len(_upto_eot(got["ids"][-1])) == ours.shape[1]


@pytest.mark.parametrize("variant,fmt,cls", [
    ("cls-linear", "transformers", "VisionTextDualEncoderModel"),
    ("mean-linear", "transformers", "RadalignDualEncoderModel"),
    ("cls-hidden-mlp", "transformers", "RadalignDualEncoderModel"),
    ("cls-hidden-mlp", "open_clip", "CustomTextCLIP"),
])
def test_hf_text_tower_round_trip_in_a_fresh_process(hf_exports, tmp_path, variant, fmt, cls):
    enc = load_encoders(hf_exports[variant])
    out = _export(hf_exports[variant], fmt, tmp_path / fmt)
    images = _images(enc)
    ctx = enc.config["model_cfg"]["text_cfg"]["context_length"]
    got = _fresh_process(fmt, out, images, TEXTS, tmp_path / "io", context=ctx)
    assert got["class"] == cls
    assert _max_diff(got["img"], enc.encode_images(images)) <= 1e-5
    assert _max_diff(got["txt"], enc.encode_texts(TEXTS)) <= 1e-5
    assert torch.equal(got["ids"], enc.tokenize(TEXTS))  # the tower's own tokenizer files, copied


@pytest.mark.parametrize("variant", ["nano", "cls-hidden-mlp"])
def test_onnx_round_trip_through_onnxruntime(tiny_export, hf_exports, tmp_path, variant):
    import onnx
    import onnxruntime as ort

    source = tiny_export if variant == "nano" else hf_exports[variant]
    enc = load_encoders(source)
    out = _export(source, "onnx", tmp_path / "onnx", opset=14)
    record = json.loads((out / "export.json").read_text())
    assert record["details"]["opset"] == 14
    for name in ("image_encoder.onnx", "text_encoder.onnx"):
        versions = {o.domain: o.version for o in onnx.load(str(out / name)).opset_import}
        assert versions[""] == 14
    for n in (1, 5):  # the batch axis is dynamic
        images, texts = _images(enc, n), (TEXTS * 2)[:n]
        img = ort.InferenceSession(str(out / "image_encoder.onnx")).run(None, {"pixel_values": images.numpy()})[0]
        ids = enc.tokenize(texts).numpy()
        txt = ort.InferenceSession(str(out / "text_encoder.onnx")).run(None, {"input_ids": ids})[0]
        assert _max_diff(torch.from_numpy(img), enc.encode_images(images)) <= 1e-4
        assert _max_diff(torch.from_numpy(txt), enc.encode_texts(texts)) <= 1e-4
    assert record["details"]["text"]["pad_id"] == 0  # open_clip's BPE pads with 0; the tiny BERT's [PAD] is 0
    assert record["details"]["image"]["preprocess"]["size"] == enc.image_size


def test_onnx_export_leaves_the_encoders_in_eval_mode(hf_exports, tmp_path):
    """torch's exporter restores every module to its wrapper's mode: a wrapper left in training mode switched the
    towers' dropout on (BERT's is 0.1) for every later embedding of the process."""
    from radalign.pretrain.formats import onnx_format

    enc = load_encoders(hf_exports["mean-linear"])
    before = enc.encode_texts(TEXTS)
    (tmp_path / "o").mkdir()
    onnx_format.write(enc, tmp_path / "o")
    assert not any(m.training for m in enc.model.modules())
    assert torch.equal(enc.encode_texts(TEXTS), before)


def test_transformers_export_of_a_quickgelu_clip_round_trips(nano_model_cfg, tmp_path):
    """OpenAI-style towers (QuickGELU, as CheXzero's): transformers' CLIP must use the same activation."""
    cfg = {**json.loads(json.dumps(nano_model_cfg)), "quick_gelu": True}
    torch.manual_seed(4)
    source = export_encoders(build_model(cfg), cfg, tmp_path / "export")
    out = _export(source, "transformers", tmp_path / "hf")  # run_export's own round trip at 1e-5
    verified = json.loads((out / "export.json").read_text())["verified"]
    assert max(verified["max_abs_diff_image"], verified["max_abs_diff_text"]) <= 1e-5
    assert json.loads((out / "config.json").read_text())["vision_config"]["hidden_act"] == "quick_gelu"


def test_exported_image_preprocessing_matches_radalign(tiny_export, tmp_path):
    """The transform each target builds from the folder turns an 8-bit radiograph into radalign's tensor."""
    import open_clip
    from PIL import Image
    from transformers import AutoImageProcessor

    enc = load_encoders(tiny_export)
    _, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{_export(tiny_export, 'open_clip', tmp_path / 'oc', verify=False)}")
    processor = AutoImageProcessor.from_pretrained(str(_export(tiny_export, "transformers", tmp_path / "hf", verify=False)))
    one_level = 1 / 255 / min(enc.config["std"])  # one 8-bit grey level after normalisation
    rng = np.random.default_rng(0)
    for w, h in ((100, 80), (64, 64), (37, 90), (200, 150)):
        img = Image.fromarray(rng.integers(0, 256, size=(h, w), dtype=np.uint8), mode="L")
        ref = enc.image_transform()(img)  # [3, S, S]
        assert _max_diff(preprocess(img), ref) <= 1e-6
        if (max(w, h) * 64 / min(w, h)) % 1 >= 0.5:
            continue  # transformers rounds such a resized long side up where torchvision truncates (docs)
        got = processor(images=img.convert("RGB"), return_tensors="pt")["pixel_values"][0]
        assert _max_diff(got, ref) <= 1.01 * one_level  # its own pixel rounding: at most one grey level apart


@pytest.mark.parametrize("kind", ["cls_pooler", "cls_last_hidden_state_pooler", "mean_pooler"])
def test_shipped_poolers_equal_open_clips(kind):
    """modeling_radalign.py (copied beside the weights) pools as open_clip's HF adapter does, padding included."""
    from open_clip.hf_model import _POOLERS
    from radalign.pretrain.formats.modeling_radalign import _pool
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    g = torch.Generator().manual_seed(0)
    hidden, pooled = torch.randn(3, 7, 5, generator=g), torch.randn(3, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0, 0]])
    out = BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled)
    ref = _POOLERS[kind]()(out, mask)
    assert torch.allclose(_pool(kind, out, mask), ref, atol=1e-6)
    if kind == "mean_pooler":  # a mean, not a sum: [row 0] averages its 3 tokens
        assert torch.allclose(_pool(kind, out, mask)[0], hidden[0, :3].mean(0), atol=1e-6)


def test_bpe_padding_never_reaches_the_embedding(tiny_export, tmp_path):
    """The converted CLIPTokenizer pads with <|endoftext|>, open_clip with 0: the same text embedding."""
    from transformers import AutoTokenizer

    enc = load_encoders(tiny_export)
    out = _export(tiny_export, "transformers", tmp_path / "hf", verify=False)
    ctx = enc.config["model_cfg"]["text_cfg"]["context_length"]
    hf_ids = AutoTokenizer.from_pretrained(str(out))(TEXTS, padding="max_length", max_length=ctx, truncation=True,
                                                      return_tensors="pt").input_ids
    assert not torch.equal(hf_ids, enc.tokenize(TEXTS))  # the padding differs...
    with torch.no_grad():
        a = enc.model.encode_text(hf_ids)
        b = enc.model.encode_text(enc.tokenize(TEXTS))
    assert _max_diff(a, b) <= 1e-5  # ...and does not matter


def test_bpe_vocab_files_match_open_clip(tiny_export, tmp_path):
    from open_clip.tokenizer import SimpleTokenizer

    out = _export(tiny_export, "transformers", tmp_path / "hf", verify=False)
    vocab = json.loads((out / "vocab.json").read_text())
    bpe = SimpleTokenizer()
    assert len(vocab) == len(bpe.encoder) == 49408
    assert vocab["<|startoftext|>"] == bpe.encoder["<start_of_text>"] == common.SOT_ID
    assert vocab["<|endoftext|>"] == bpe.encoder["<end_of_text>"] == common.EOT_ID
    assert all(vocab[t] == i for t, i in bpe.encoder.items() if not t.startswith("<"))
    merges = (out / "merges.txt").read_text().splitlines()
    assert merges[0].startswith("#version")
    assert [tuple(m.split()) for m in merges[1:]] == sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)


# ----------------------------------------------------------------------------------------------------------
# Refusals and planted faults


def test_a_writer_that_changes_the_weights_is_caught_and_nothing_is_kept(tiny_export, tmp_path, monkeypatch):
    real = common.full_state_dict

    def off_by_a_little(encoders):
        state = real(encoders)
        state["visual.proj"][0] += 1e-3  # a conversion slip in one row (a uniform scale would not show)
        return state

    monkeypatch.setattr(common, "full_state_dict", off_by_a_little)
    for fmt in ("open_clip", "transformers"):
        with pytest.raises(RadalignError, match="does not reproduce radalign's embeddings"):
            _export(tiny_export, fmt, tmp_path / fmt)
        assert not any((tmp_path / fmt).iterdir()) if (tmp_path / fmt).exists() else True


def test_out_folder_rules(tiny_export, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(RadalignError, match="not empty; pass --overwrite"):
        _export(tiny_export, "open_clip", tmp_path / "busy", verify=False)
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    with pytest.raises(RadalignError, match="inside \\(or around\\) the source"):
        _export(tiny_export, "open_clip", tiny_export / "shared", verify=False)
    with pytest.raises(RadalignError, match="inside \\(or around\\) the source"):
        _export(tiny_export, "open_clip", tiny_export.parent, verify=False)
    _export(tiny_export, "open_clip", tmp_path / "busy", overwrite=True, verify=False)
    assert not (tmp_path / "busy" / "keep.txt").exists() and (tmp_path / "busy" / "open_clip_config.json").is_file()


def test_transformers_format_names_what_it_cannot_express():
    from radalign.pretrain.formats import hf

    biomedclip = {"embed_dim": 512, "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "image_size": 224},
                  "text_cfg": {"hf_model_name": "x"}}
    assert "timm_model_name" in hf.vision_problems(biomedclip)[0]
    odd = {"embed_dim": 8, "vision_cfg": {"pool_type": "avg", "final_ln_after_pool": True},
           "text_cfg": {"pool_type": "last", "vocab_size": 1000}}
    problems = hf.vision_problems(odd) + hf.text_problems(odd)
    assert any("pool_type='avg'" in p for p in problems) and any("final_ln_after_pool" in p for p in problems)
    assert any("pool_type='last'" in p for p in problems) and any("vocab_size=1000" in p for p in problems)


def test_cli_export_and_bad_format(tiny_export, tmp_path, capsys):
    from radalign.cli import main

    assert main(["export", "--format", "onnx", str(tiny_export), "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "image_encoder.onnx").is_file() and (tmp_path / "o" / "MODEL_CARD.md").is_file()
    with pytest.raises(SystemExit) as e:
        main(["export", "--format", "tensorflow", str(tiny_export), "--out", str(tmp_path / "t")])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err
    assert main(["export", "--format", "onnx", str(tmp_path / "nope"), "--out", str(tmp_path / "n")]) == 2


# ----------------------------------------------------------------------------------------------------------
# The model card


def _subjects(shards: Path, split: str) -> set[str]:
    """Independent reading of the patients of a split (tar members' JSON)."""
    found = set()
    for tar_path in sorted((shards / split).glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    found.add(str(json.load(tar.extractfile(m))["subject_id"]))
    return found


def _fake_run(tmp_path: Path, shards: Path, nano_model_cfg: dict, *, checksum_evals: bool = True) -> Path:
    """A pretrain run folder as the recipe leaves it: config.yaml, metrics.jsonl, a checkpoint state, export/."""
    import hashlib

    import yaml

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({
        "steps": 40, "batch_size": 8, "accum_freq": 2, "precision": "auto", "seed": 5,
        "loss": {"kind": "infonce", "false_negatives": True}, "model": {"name": "nano", "pretrained": None},
        "optim": {"lr": 0.001, "weight_decay": 0.2, "warmup_steps": 4}}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 40, "loss": 1.2345}) + "\n{broken line\n"
                                       + json.dumps({"step": 40, "val/zeroshot_macro_auroc": 0.61,
                                                     "val/i2t_R@10": 0.3}) + "\n")
    state = run / "checkpoints" / "step-0000040"
    state.mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step-0000040")
    (state / "trainer_state.json").write_text(json.dumps({"state": {"precision": "fp32",
                                                                    "skipped": {"corrupt_image": 3}}}))
    sha = hashlib.sha256((shards / "manifest.json").read_bytes()).hexdigest()
    torch.manual_seed(0)
    export_encoders(build_model(nano_model_cfg), nano_model_cfg, run / "export",
                    extra={"trained_steps": 40, "model_name": "nano",
                           "data": {"shards": str(shards), "manifest_sha256": sha, "train_split": "train"}})
    return run


def _zeroshot_metrics(checksums: list[str]) -> dict:
    return {"prompt_set": "chexpert14", "mode": "binary", "checkpoints": [{"path": "x", "checksum": c} for c in checksums],
            "data": {"source": "shards:test", "n_images": 50, "n_scored": 50, "n_patients": 9},
            "bootstrap": {"unit": "patient", "n_units": 9, "n_boot": 200, "level": 0.95},
            "label_policy": {"uncertain": "exclude", "blank": "negative"},
            "classes": {"Cardiomegaly": {"auroc": 0.7123, "ci_low": 0.5012, "ci_high": 0.8899, "n_pos": 7, "n_neg": 43}},
            "macro": {"auroc": 0.6543, "ci_low": 0.4321, "ci_high": 0.8771, "level": 0.95, "unit": "patient",
                      "classes": ["Cardiomegaly"]}}


def test_model_card_reports_what_the_run_recorded(synth_shards, nano_model_cfg, tmp_path):
    run = _fake_run(tmp_path, synth_shards, nano_model_cfg)
    checksum = json.loads((run / "export" / "config.json").read_text())["checksum"]
    (tmp_path / "zeroshot").mkdir()
    (tmp_path / "zeroshot" / "metrics.json").write_text(json.dumps(_zeroshot_metrics([checksum])))
    (tmp_path / "zeroshot-old").mkdir()
    (tmp_path / "zeroshot-old" / "metrics.json").write_text(json.dumps(_zeroshot_metrics(["f" * 64])))
    (tmp_path / "zeroshot-ens").mkdir()
    (tmp_path / "zeroshot-ens" / "metrics.json").write_text(json.dumps(_zeroshot_metrics([checksum, "e" * 64])))
    out = _export(run, "open_clip", tmp_path / "share", verify=False)
    text = (out / "MODEL_CARD.md").read_text()
    manifest = json.loads((synth_shards / "manifest.json").read_text())
    # data: manifest sha256, per-split counts, skipped by reason, the split rule
    assert json.loads((run / "export" / "config.json").read_text())["data"]["manifest_sha256"] in text
    for split, entry in manifest["splits"].items():
        assert re.search(rf"\| {split} \| {entry['samples']:,} \| {len(entry['shards'])} \|", text), split
    for reason, n in manifest["skipped"].items():
        assert f"{reason.replace('_', chr(92) + '_')} {n}" in text
    assert "official split file" in text
    # model: parameter counts from the model itself
    model = build_model(nano_model_cfg)
    total = sum(p.numel() for p in model.parameters()) - model.logit_scale.numel()
    visual = sum(p.numel() for p in model.visual.parameters())
    assert f"| parameters | {total:,} (image {visual:,}, text {total - visual:,}) |" in text
    # training: steps, precision (resolved and setting), final loss, skipped samples, batch
    assert "| steps | 40 of 40 planned |" in text and "| precision | fp32 (setting: auto) |" in text
    assert "1.234 (infonce" in text and "corrupt\\_image 3" in text and "8 per process x 2 accumulation" in text
    # evaluation: the matching result with interval and unit; the others named with the reason
    assert "**0.654** [0.432, 0.877] (95% CI, percentile bootstrap over patients (9, 200 resamples))" in text
    assert "| Cardiomegaly | 0.712 | 0.501 | 0.890 | 7 | 43 |" in text
    assert "made with other weights (checksum ffffffffffff)" in text and "an ensemble of 2 checkpoints" in text
    assert "validate split, no interval, not an evaluation): zero-shot macro AUROC 0.610" in text
    # the patient overlap check, against an independent count
    subjects = {s: _subjects(synth_shards, s) for s in ("train", "validate", "test")}
    shared_v, shared_t = len(subjects["train"] & subjects["validate"]), len(subjects["train"] & subjects["test"])
    assert (f"train {len(subjects['train'])}, validate {len(subjects['validate'])}, test {len(subjects['test'])}"
            in text)
    assert f"also in: validate {shared_v}, test {shared_t}. Result: passed" in text
    # the synthetic stand-in is named as such, in data and in the licence field
    assert "synthetic stand-in, no patient data" in text and card.SYNTHETIC_DATA_USE in text
    for section in ("## Known limitations", "## Licence and data use", "### Split rule", "### Patient overlap check"):
        assert section in text


def test_model_card_ignores_a_manifest_changed_since_training(synth_shards, nano_model_cfg, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text((synth_shards / "manifest.json").read_text())
    run = _fake_run(tmp_path, shards, nano_model_cfg)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["splits"]["train"]["samples"] = 123456  # the shards were re-prepared after training
    (shards / "manifest.json").write_text(json.dumps(manifest))
    text = card.render(card.gather(run / "export", run_dir=run))
    assert "123,456" not in text and "changed since training" in text
    assert card.UNKNOWN_DATA_USE.split(":")[0] in text  # no recorded data: no data-use default either


def test_overlap_check_counts_a_planted_leak(synth_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(synth_shards, shards)
    victim = next(iter(sorted(_subjects(shards, "train"))))
    path = sorted((shards / "validate").glob("*.tar"))[0]
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    done = False
    with tarfile.open(path, "w") as tar:
        for m, data in members:
            if m.name.endswith(".json") and not done:
                rec = json.loads(data)
                rec["subject_id"] = int(victim) if str(victim).isdigit() else victim
                data, done = json.dumps(rec).encode(), True
            m.size = len(data)
            import io

            tar.addfile(m, io.BytesIO(data))
    result = card.overlap_check(shards, "train")
    assert result["shared_with_train"]["validate"] == 1
    assert result["shared_with_train"]["test"] == len(_subjects(shards, "train") & _subjects(shards, "test"))


def test_model_card_default_data_use_for_mimic_and_hostile_strings_are_escaped(synth_shards, nano_model_cfg, tmp_path):
    shards = tmp_path / "hostile-shards"
    shards.mkdir()
    manifest = json.loads((synth_shards / "manifest.json").read_text())
    manifest["options"]["mimic_cxr"] = "/data/<script>alert(1)</script>/mimic | x * y _z_ [link](http://e.vil)"
    manifest["options"]["views"] = ["PA\n## injected heading", "AP|`rm -rf`"]
    manifest["skipped"] = {"<img src=x onerror=alert(2)>": 4}
    manifest["created"] = "2026-01-01</td><b>bold</b>"
    (shards / "manifest.json").write_text(json.dumps(manifest))
    cfg = {**nano_model_cfg, "description": "evil\n\n# heading\n| injected | cells |"}
    run = _fake_run(tmp_path, shards, cfg)
    text = (run / "export" / "MODEL_CARD.md").read_text()  # written by the recipe's own export
    cell = next(ln for ln in text.splitlines() if ln.startswith("| model config |"))
    assert "evil \\# heading \\| injected \\| cells \\|" in cell  # one line, one cell: newlines and pipes neutralised
    assert "<script>" not in text and "<img" not in text and "<b>" not in text and "</td>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text and "&lt;img src=x onerror=alert(2)&gt; 4" in text
    assert "\\[link\\](http://e.vil)" in text and "\\`rm -rf\\`" in text
    assert not any(line.startswith("## injected") for line in text.splitlines())
    assert card.MIMIC_DATA_USE in text  # MIMIC-derived (no synthetic marker beside the input): the default
    assert "derived from credentialed data: share under the source's data use agreement" in text
    rows = [ln for ln in text.splitlines() if ln.startswith("| train |")]
    assert rows and all(ln.count(" | ") == 2 for ln in rows)  # pipes in recorded text never add table cells


def test_a_card_that_cannot_be_built_never_costs_the_export(nano_model_cfg, tmp_path, monkeypatch):
    def broken(*a, **k):
        raise ValueError("disk on fire")

    monkeypatch.setattr(card, "gather", broken)
    torch.manual_seed(0)
    out = export_encoders(build_model(nano_model_cfg), nano_model_cfg, tmp_path / "export")
    assert "Not generated: ValueError: disk on fire" in (out / "MODEL_CARD.md").read_text()
    assert load_encoders(out).embed_dim == nano_model_cfg["embed_dim"]  # the weights are complete
