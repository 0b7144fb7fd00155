"""Typed configs: dataclasses with a docstring per field, loaded from YAML, overridden by `key=value`.

Built on OmegaConf structured configs (type-checked merges, dotlist overrides, YAML round trip), with
one addition OmegaConf lacks: every problem is collected first and raised once, as one `ConfigError`
that names each key, what is wrong and the fix.

A stage config is a dataclass that may define `validate(self) -> list[str]` for cross-field rules
(impossible combinations); each string is one problem, phrased "key: what is wrong; fix".
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import os
import textwrap
import typing
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from radalign import RadalignError

T = TypeVar("T")


class ConfigError(RadalignError):
    """All problems found in a config, one per line."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in {source}:\n{lines}")


# ----------------------------------------------------------------------------------------------------------
# Finding configs by path or by name (`pretrain/tiny`), from a checkout or an installed wheel.


def configs_root() -> Path:
    """The `configs/` folder shipped with the package (works from a wheel, not only a checkout)."""
    return Path(str(resources.files("radalign.configs")))


def available_configs(subdir: str = "") -> list[str]:
    root = configs_root()
    base = root / subdir if subdir else root
    names = []
    for p in sorted(base.rglob("*")):
        if p.suffix in (".yaml", ".yml", ".json") and p.is_file():
            names.append(str(p.relative_to(root).with_suffix("")))
    return names


def resolve_config_path(name_or_path: str | os.PathLike, stage: str | None = None) -> Path:
    """A YAML path as given, or a name under `configs/` (`pretrain/tiny`, or `tiny` for the stage)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    root = configs_root()
    candidates = [root / p] + [root / f"{p}{ext}" for ext in (".yaml", ".yml", ".json")]
    if stage:
        candidates += [root / stage / p] + [root / stage / f"{p}{ext}" for ext in (".yaml", ".yml", ".json")]
    for c in candidates:
        if c.is_file():
            return c
    known = available_configs(stage or "")
    close = difflib.get_close_matches(str(name_or_path), known, n=3, cutoff=0.4)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ConfigError(
        [f"--config {name_or_path!s}: no such file and no such config name.{hint} "
         f"Available: {', '.join(known) or '(none)'}"], source="--config")


# ----------------------------------------------------------------------------------------------------------
# Field documentation: the string literal right after each field (litgpt style).


def field_docs(cls: type) -> dict[str, str]:
    """Map field name -> docstring written under it in the dataclass body."""
    return dict(_field_docs(cls))


@functools.cache  # parsing the source is most of a CLI parser's build time
def _field_docs(cls: type) -> dict[str, str]:
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, doc) for every leaf field, nested dataclasses flattened with dots."""
    rows = []
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        ftype = hints.get(f.name)
        if dataclasses.is_dataclass(ftype):
            rows += describe(ftype, prefix=key + ".")
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "(required)"
        rows.append((key, repr(default), docs.get(f.name, "")))
    return rows


def format_help(cls: type) -> str:
    lines = ["config keys (set in YAML or as key=value):"]
    for key, default, doc in describe(cls):
        lines.append(f"  {key} = {default}")
        if doc:
            lines += [f"      {line}" for line in textwrap.wrap(doc, 92)]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Loading and validation.


def _check_keys(cls: type, data: Any, prefix: str, problems: list[str], where=lambda key: "",
                retired: set[str] | None = None, saved: bool = False) -> None:
    """Unknown keys (with the closest valid name) at every nesting level; `where(key)` names the source. A key a
    dataclass lists in its `REMOVED_KEYS` ClassVar ({key: why and the fix}) is refused with that text instead,
    unless it is off (false or null) or the config is a saved run's (`saved`: its config.yaml records every
    field, old defaults included, and describes what ran): then it is left out (its full name goes to
    `retired`) and the run still loads."""
    if not isinstance(data, (dict, DictConfig)):
        return
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    removed = getattr(cls, "REMOVED_KEYS", {})
    for key in data:
        full = f"{prefix}{key}"
        if key in removed:
            if saved or data[key] is None or data[key] is False:
                if retired is not None:
                    retired.add(full)
            else:
                problems.append(f"{full}: {removed[key]}{where(full)}")
            continue
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            fix = f"did you mean '{prefix}{close[0]}'?" if close else f"valid keys here: {', '.join(names)}"
            problems.append(f"{full}: unknown key; {fix}{where(full)}")
            continue
        sub = hints.get(key)
        if dataclasses.is_dataclass(sub):
            _check_keys(sub, data[key], full + ".", problems, where, retired, saved)


def _flatten(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(data, (dict, DictConfig)):
        out = []
        for k, v in data.items():
            if isinstance(v, (dict, DictConfig)) and v:
                out += _flatten(v, f"{prefix}{k}.")
            else:
                out.append((f"{prefix}{k}", v))
        return out
    return [(prefix.rstrip("."), data)]


def _type_name(cls: type, dotted: str) -> str:
    obj: Any = cls
    for part in dotted.split("."):
        hints = typing.get_type_hints(obj) if dataclasses.is_dataclass(obj) else {}
        obj = hints.get(part, Any)
    return getattr(obj, "__name__", str(obj).replace("typing.", ""))


def parse_overrides(overrides: list[str]) -> DictConfig:
    problems = [f"{o}: override must look like key=value" for o in overrides if "=" not in o]
    if problems:
        raise ConfigError(problems, source="command line")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:
        raise ConfigError([f"{overrides}: {e}"], source="command line") from None


@dataclasses.dataclass
class _Layer:
    """One source of values: the YAML file or the command line (with each override's own text)."""

    label: str
    data: Any
    texts: dict[str, str] = dataclasses.field(default_factory=dict)  # dotted key -> "key=value" as typed

    def where(self, key: str) -> str:
        if key in self.texts:
            return f" (command line: {self.texts[key]})"
        return f" (in {self.label})"


def _layers(source, overrides, stage, flags=None) -> list[_Layer]:
    layers: list[_Layer] = []
    if isinstance(source, dict):
        layers.append(_Layer("the config dict", OmegaConf.create(source)))
    elif source is not None:
        path = resolve_config_path(source, stage)
        try:
            layers.append(_Layer(str(path), OmegaConf.load(path) or OmegaConf.create({})))
        except Exception as e:  # YAML syntax errors carry line numbers; pass them on
            raise ConfigError([f"{path}: cannot parse YAML: {e}"], source=str(path)) from None
    if flags:  # {key: (value, "--flag value" as typed)}: after the YAML, before key=value
        layers.append(_Layer("command-line flags", OmegaConf.create({k: v for k, (v, _) in flags.items()}),
                             {k: text for k, (_, text) in flags.items()}))
    if overrides:
        texts = {o.split("=", 1)[0].strip().lstrip("+~"): o for o in overrides}
        layers.append(_Layer("command line", parse_overrides(list(overrides)), texts))
    return layers


def load_config(cls: type[T], source: str | os.PathLike | dict | None = None,
                overrides: list[str] | tuple[str, ...] = (), stage: str | None = None,
                flags: dict[str, tuple[Any, str]] | None = None, saved: bool = False) -> T:
    """Build `cls` from a YAML file/name (or dict), then command-line `flags`, then `key=value` overrides;
    validate everything. `flags` maps a top-level key to (value, the flag as typed), e.g.
    `{"shards": ("runs/demo/shards", "--shards runs/demo/shards")}` (radalign.cli.config_from_args builds it).

    Raises one ConfigError listing every problem at once: unknown keys, wrong types, missing values and failed
    `validate()` rules. Each unknown key or bad value names its source: the YAML file, or the override as typed
    on the command line. `saved`: the config.yaml of a finished run (retired keys are left out whatever their
    value, see _check_keys).
    """
    layers = _layers(source, overrides, stage, flags)
    label = " + ".join(layer.label for layer in layers) or "config"
    problems: list[str] = []
    retired: set[str] = set()
    for layer in layers:
        _check_keys(cls, layer.data, "", problems, layer.where, retired, saved)

    unknown = {p.split(":", 1)[0] for p in problems}
    merged = OmegaConf.structured(cls)
    bad: set[str] = set()
    for layer in layers:
        for key, value in _flatten(layer.data):
            if key in retired:
                continue
            try:
                OmegaConf.update(merged, key, value, merge=True)
            except OmegaConfBaseException as e:
                if any(key == u or key.startswith(u + ".") for u in unknown):
                    continue  # reported above as an unknown key
                msg = str(e).splitlines()[0]
                bad.add(key)
                problems.append(f"{key}: {value!r} is not a valid {_type_name(cls, key)} ({msg}){layer.where(key)}")

    missing = sorted(OmegaConf.missing_keys(merged))
    problems += [f"{k}: required; set it in the YAML or as {k}=..." for k in missing if k not in bad]
    if missing:
        raise ConfigError(problems, source=label)
    cfg = OmegaConf.to_object(merged)
    # cross-field rules on the values that did load (a key with a bad value keeps its default: skip its rules)
    problems += [p for p in _validate_tree(cfg) if p.split(":", 1)[0] not in bad]
    if problems:
        raise ConfigError(problems, source=label)
    return cfg  # type: ignore[return-value]


def _validate_tree(cfg: Any, prefix: str = "") -> list[str]:
    """Run `validate()` on the config and every nested dataclass, prefixing keys."""
    problems = []
    for f in dataclasses.fields(cfg):
        sub = getattr(cfg, f.name)
        if dataclasses.is_dataclass(sub):
            problems += _validate_tree(sub, f"{prefix}{f.name}.")
    if hasattr(cfg, "validate"):
        problems += [f"{prefix}{p}" for p in cfg.validate()]
    return problems


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def save_resolved(cfg: Any, run_dir: str | os.PathLike, name: str = "config.yaml") -> Path:
    """Write the resolved config into the run folder (atomically)."""
    from radalign.io import atomic_write_text

    path = Path(run_dir) / name
    atomic_write_text(path, to_yaml(cfg))
    return path


# ----------------------------------------------------------------------------------------------------------
# Report outputs (`--format`, `--out`): one computation written in several formats, each file's from its suffix.

OUTPUT_FORMATS = ("json", "markdown", "html")
_SUFFIX_FORMAT = {".json": "json", ".md": "markdown", ".markdown": "markdown", ".html": "html", ".htm": "html"}


def output_problems(fmt: str | None, outs: typing.Sequence[str], key: str = "out") -> list[str]:
    """Config problems of a `format` / `out` pair (`out` a list: repeatable `--out`); [] when fine."""
    p: list[str] = []
    if fmt is not None and fmt not in OUTPUT_FORMATS:
        p.append(f"format: {fmt!r} is not one of {', '.join(OUTPUT_FORMATS)}")
    if fmt is not None and len(outs) > 1:
        p.append(f"format: {fmt!r} given with {len(outs)} {key} files; drop it (each file's format comes from its "
                 f"suffix: {', '.join(_SUFFIX_FORMAT)})")
    if fmt is None:
        p += [f"{key}: {o!r} has no report suffix ({', '.join(_SUFFIX_FORMAT)}); rename it or pass --format"
              for o in outs if Path(o).suffix.lower() not in _SUFFIX_FORMAT]
    dup = sorted({o for o in outs if list(outs).count(o) > 1})
    if dup:
        p.append(f"{key}: {', '.join(dup)} named more than once; name each file once")
    return p


def output_targets(fmt: str | None, outs: typing.Sequence[str]) -> list[tuple[str, str | None]]:
    """(format, file) per output of a valid pair; no file: [(format or json, None)], i.e. print."""
    if not outs:
        return [(fmt or "json", None)]
    if fmt is not None:
        return [(fmt, outs[0])]
    return [(_SUFFIX_FORMAT[Path(o).suffix.lower()], o) for o in outs]


__all__ = [
    "ConfigError", "load_config", "save_resolved", "to_yaml", "to_dict", "field_docs", "describe",
    "format_help", "resolve_config_path", "available_configs", "configs_root", "ListConfig",
    "OUTPUT_FORMATS", "output_problems", "output_targets",
]
