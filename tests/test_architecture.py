"""Data flows one way (docs/architecture.md). These rules are checked on the import graph of the source (every
`import`/`from` statement, relative ones resolved, function bodies included), not by convention or substrings."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ("data", "pretrain", "zeroshot", "retrieval", "finetune")


def _module_name(path: Path) -> str:
    """`pretrain/models.py` -> `radalign.pretrain.models`; `radalign/metrics.py` -> `radalign.metrics`."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts if parts[0] == "radalign" else ["radalign", *parts])


def _imports(path: Path) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved against its package)."""
    tree = ast.parse(path.read_text())
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            names.add(module)
            names |= {f"{module}.{a.name}" for a in node.names}  # `from pkg import module` imports a module
    return names


def _modules(pkg: str):
    return sorted((REPO / pkg).rglob("*.py"))


def _top(name: str) -> str:
    """The part of the house a module name belongs to: a stage, `core` (radalign's own modules) or the library."""
    parts = name.split(".")
    if parts[0] != "radalign":
        return parts[0]
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else "core"


def test_stages_are_imported_under_the_radalign_namespace():
    """No module imports a stage as a top-level package (`data`, `pretrain`, ...): they install as radalign.<stage>."""
    for pkg in (*STAGES, "radalign", "tests", "bench", "tools"):
        for path in _modules(pkg):
            bad = {n for n in _imports(path) if n.split(".")[0] in (*STAGES, "configs")}
            assert not bad, f"{path.relative_to(REPO)} imports {bad}; write radalign.<stage>"


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
        bad = {n for n in _imports(path) if n.startswith("radalign.pretrain.recipe") or _top(n) in ("accelerate", "deepspeed")}
        assert not bad, f"{path} imports {bad}"


def test_no_library_module_imports_a_cli():
    for pkg in (*STAGES, "radalign"):
        for path in _modules(pkg):
            if path.name in ("cli.py", "__main__.py") or "cli" in path.stem.split("_"):  # a CLI module (ehr_cli.py)
                continue
            bad = {n for n in _imports(path) if n.endswith(".cli")}
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
