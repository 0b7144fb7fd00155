"""Shared fixtures: a small synthetic MIMIC set, its shards, and a random-init exported model.

Built once per test session (they cost seconds); tests that change them must copy first.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ASSETS = Path(__file__).parent / "assets"
NANO = ASSETS / "nano.json"  # a 2-layer ViT + text transformer at 64 px: the fastest model that still learns


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """~40 synthetic patients laid out like MIMIC-CXR-JPG + reports + MIMIC-IV."""
    from radalign.data.synth import synthesize

    out = tmp_path_factory.mktemp("synth")
    synthesize(out, patients=40, seed=0, image_size=64, workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def synth_shards(synth_root, tmp_path_factory) -> Path:
    """`radalign data prepare` output for `synth_root` (64 px images, small shards so there are several)."""
    from radalign.cli import main

    out = tmp_path_factory.mktemp("shards")
    rc = main(["data", "prepare", "--mimic-cxr", str(synth_root / "mimic-cxr-jpg"),
               "--reports", str(synth_root / "mimic-cxr-reports"), "--out", str(out),
               "--image-size", "64", "--shard-size", "16", "--num-workers", "1"])
    assert rc == 0
    return out


@pytest.fixture(scope="session")
def nano_model_cfg() -> dict:
    from radalign.pretrain.models import get_model_config

    return get_model_config(str(NANO))


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory, nano_model_cfg) -> Path:
    """A random-init nano model exported like `radalign pretrain` does (for zeroshot/retrieval tests)."""
    import torch
    from radalign.pretrain.export import export_encoders
    from radalign.pretrain.models import build_model

    torch.manual_seed(0)
    model = build_model(nano_model_cfg)
    return export_encoders(model, nano_model_cfg, tmp_path_factory.mktemp("run") / "export")


@pytest.fixture
def embed_log():
    """Messages of the `data.embed` logger (it does not propagate to the root, so caplog misses it)."""
    import logging

    got: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            got.append(record.getMessage())

    logger = logging.getLogger("radalign.data.embed")
    h = Keep()
    logger.addHandler(h)
    yield got
    logger.removeHandler(h)


def _export_recording(model_cfg, out: Path, shards: Path, seed: int) -> Path:
    """A random-init export that records the shards it was 'trained' on, as `radalign pretrain` does."""
    import hashlib

    import torch
    from radalign.pretrain.export import export_encoders
    from radalign.pretrain.models import build_model

    torch.manual_seed(seed)
    sha = hashlib.sha256((shards / "manifest.json").read_bytes()).hexdigest()
    return export_encoders(build_model(model_cfg), model_cfg, out, extra={
        "data": {"shards": str(shards), "manifest_sha256": sha, "train_split": "train"}})


@pytest.fixture(scope="session")
def ft_cohort(tmp_path_factory, nano_model_cfg) -> dict:
    """300 synthetic patients for the finetune tests: shards, the link-ehr table, a random-init nano export (the
    towers) and a second export with other weights (an index built with it must be refused)."""
    from radalign.data.ehr import link_ehr
    from radalign.data.synth import synthesize

    from radalign.cli import main

    root = tmp_path_factory.mktemp("ftcohort")
    synthesize(root / "synth", patients=300, seed=3, image_size=64, workers=1, progress=False)
    shards = root / "shards"
    assert main(["data", "prepare", "--mimic-cxr", str(root / "synth" / "mimic-cxr-jpg"), "--reports",
                 str(root / "synth" / "mimic-cxr-reports"), "--out", str(shards), "--image-size", "64",
                 "--shard-size", "64", "--num-workers", "1"]) == 0
    link_ehr(root / "synth" / "mimic-iv", shards, root / "ehr", progress=False)
    return {"root": root, "shards": shards, "table": root / "ehr" / "finetune",
            "export": _export_recording(nano_model_cfg, root / "pretrain" / "export", shards, seed=0),
            "other_export": _export_recording(nano_model_cfg, root / "other" / "export", shards, seed=1)}


def nearest_other_patients(x, q, subjects, studies, subject, k: int) -> list[int]:
    """Reference for the retrieval filters: rows of `x` [N, D] by descending x @ q (stable), leaving out
    `subject`'s rows and keeping the best image per study, the first k."""
    import numpy as np

    seen, rows = set(), []
    for j in np.argsort(-(x @ q), kind="stable"):
        if subjects[j] == subject or studies[j] in seen:
            continue
        seen.add(studies[j])
        rows.append(int(j))
        if len(rows) == k:
            break
    return rows

