"""Data flows one way (docs/architecture.md). These rules are checked on the source, not by convention."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ("data", "pretrain", "zeroshot", "retrieval", "finetune")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _modules(pkg: str):
    return sorted((REPO / pkg).rglob("*.py"))


def _top(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize("path", _modules("data"), ids=lambda p: p.name)
def test_data_imports_no_stage(path):
    bad = {n for n in _imports(path) if _top(n) in STAGES and _top(n) != "data"}
    assert not bad, f"{path.name} imports {bad}"


@pytest.mark.parametrize("name", ["models.py", "loss.py", "export.py", "validation.py"])
def test_model_and_loss_modules_know_nothing_of_distribution(name):
    path = REPO / "pretrain" / name
    if not path.exists():
        pytest.skip(f"{name} not present")
    bad = {n for n in _imports(path) if _top(n) in ("accelerate", "deepspeed")}
    assert not bad


@pytest.mark.parametrize("pkg", ["zeroshot", "retrieval", "finetune"])
def test_later_stages_never_import_the_recipe(pkg):
    for path in _modules(pkg):
        bad = {n for n in _imports(path) if n.startswith("pretrain.recipe") or _top(n) in ("accelerate", "deepspeed")}
        assert not bad, f"{path} imports {bad}"


def test_no_library_module_imports_a_cli():
    for pkg in (*STAGES, "radalign"):
        for path in _modules(pkg):
            if path.name in ("cli.py", "__main__.py"):
                continue
            bad = {n for n in _imports(path) if n.endswith(".cli") or n == "radalign.cli"}
            assert not bad, f"{path} imports {bad}"


@pytest.mark.parametrize("path", [p for p in _modules("radalign") if p.name != "cli.py"], ids=lambda p: p.name)
def test_radalign_core_imports_no_stage(path):
    """Only radalign/cli.py dispatches to stages; the shared core (training, metrics, precision...) never does."""
    bad = {n for n in _imports(path) if _top(n) in STAGES}
    assert not bad, f"{path.name} imports {bad}"


@pytest.mark.parametrize("name", ["metrics.py", "precision.py", "config.py", "io.py", "lock.py", "log.py"])
def test_core_modules_other_than_training_know_nothing_of_distribution(name):
    path = REPO / "radalign" / name
    if not path.exists():
        pytest.skip(f"{name} not present")
    bad = {n for n in _imports(path) if _top(n) in ("accelerate", "deepspeed")}
    assert not bad, f"radalign/{name} imports {bad}; distribution lives in radalign/training.py and recipes"


def test_finetune_models_never_import_distribution():
    for path in _modules("finetune"):
        if path.name in ("recipe.py", "cli.py", "__main__.py"):
            continue
        bad = {n for n in _imports(path) if _top(n) in ("accelerate", "deepspeed")}
        assert not bad, f"{path} imports {bad}"


def test_pretrain_validation_does_not_touch_the_accelerator():
    src = (REPO / "pretrain" / "validation.py").read_text()
    assert "accelerator" not in src.lower() or "radalign.training" in src
    bad = {n for n in _imports(REPO / "pretrain" / "validation.py") if _top(n) in ("accelerate", "deepspeed")}
    assert not bad
