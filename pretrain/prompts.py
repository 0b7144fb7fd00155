"""Prompt sets: per class, lists of positive (and negative) report phrasings, loaded from YAML.

The code lives beside the encoders' prompt classifier (`pretrain.classifier`); the built-in sets stay data, in
`configs/zeroshot/*.yaml`.

A prompt set file (see `configs/zeroshot/*.yaml`):

    name: chexpert14
    mode: binary            # binary: softmax over [positive, negative] per class (CheXzero)
                            # multiclass: softmax over the classes (5x200 style); negatives unused
    macro_classes: [...]    # optional: the classes of the headline macro AUROC (default: all)
    classes:
      Cardiomegaly:
        positive: [Moderate cardiomegaly., The heart is enlarged.]
        negative: [Heart size is normal., No cardiomegaly.]

"No Finding" is a class of its own whose negatives are finding prompts; a negative that merely says
"no finding" would score the label with the wrong meaning, so it is rejected.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from radalign.config import ConfigError, configs_root

MODES = ("binary", "multiclass")
_TOP_KEYS = ("name", "description", "mode", "macro_classes", "classes")
_CLASS_KEYS = ("positive", "negative")


@dataclass(frozen=True)
class ClassPrompts:
    name: str
    positive: tuple[str, ...]
    negative: tuple[str, ...] = ()


@dataclass(frozen=True)
class PromptSet:
    name: str
    mode: str
    classes: tuple[ClassPrompts, ...]
    macro_classes: tuple[str, ...]
    source: str = "<memory>"
    description: str = ""

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    def subset(self, names: list[str]) -> PromptSet:
        """The same set restricted to `names` (kept in the file's order)."""
        keep = [c for c in self.classes if c.name in set(names)]
        return replace(self, classes=tuple(keep),
                       macro_classes=tuple(n for n in self.macro_classes if n in set(names)))

    def with_macro(self, names: list[str]) -> PromptSet:
        unknown = [n for n in names if n not in self.class_names]
        if unknown:
            raise ConfigError([f"--classes {', '.join(unknown)}: not a class of prompt set {self.name!r}; "
                               f"choose from {', '.join(self.class_names)}"], source="--classes")
        return replace(self, macro_classes=tuple(names))


def available_prompt_sets() -> list[str]:
    return sorted(p.stem for p in (configs_root() / "zeroshot").glob("*.yaml"))


def resolve_prompt_path(name_or_path: str | os.PathLike) -> Path:
    """A YAML path as given, or a prompt set name under configs/zeroshot/ (`chexpert14`, `5x200`)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    cand = configs_root() / "zeroshot" / f"{p.name}.yaml"
    if cand.is_file() and p.suffix not in (".yaml", ".yml"):
        return cand
    known = available_prompt_sets()
    close = difflib.get_close_matches(str(name_or_path), known, n=2, cutoff=0.4)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ConfigError([f"--prompts {name_or_path}: no such file and no such prompt set.{hint} "
                       f"Built-in sets: {', '.join(known)}; or pass a YAML path"], source="--prompts")


def _prompt_list(value, where: str, problems: list[str]) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        problems.append(f"{where}: must be a list of strings (got {type(value).__name__})")
        return ()
    out = []
    for i, v in enumerate(value):
        if not isinstance(v, str) or not v.strip():
            problems.append(f"{where}[{i}]: {v!r} is not a non-empty string; write the prompt as text")
        else:
            out.append(v.strip())
    dups = sorted({v for v in out if out.count(v) > 1})
    if dups:
        problems.append(f"{where}: duplicate prompt(s) {dups}; each phrasing once (duplicates tilt the ensemble)")
    return tuple(out)


def _parse_class(name: str, body, mode: str, problems: list[str]) -> ClassPrompts | None:
    where = f"classes.{name}"
    if not isinstance(body, dict):
        problems.append(f"{where}: must be a mapping with 'positive' (and 'negative') prompt lists")
        return None
    for key in body:
        if key not in _CLASS_KEYS:
            problems.append(f"{where}.{key}: unknown key; use 'positive' and 'negative'")
    pos = _prompt_list(body.get("positive"), f"{where}.positive", problems)
    neg = _prompt_list(body.get("negative"), f"{where}.negative", problems)
    if not pos:
        problems.append(f"{where}.positive: empty class; give at least one positive prompt")
    if mode == "binary" and not neg:
        problems.append(f"{where}.negative: empty; binary mode scores positive vs negative prompts, "
                        "so give at least one negative prompt")
    if name == "No Finding":
        bad = [p for p in neg if "no finding" in p.lower()]
        if bad:
            problems.append(f"{where}.negative: {bad} negate the label by wording; No Finding's negatives must "
                            "be finding prompts (e.g. 'Moderate cardiomegaly.')")
    return ClassPrompts(name, pos, neg)


def parse_prompt_set(data, source: str = "<memory>") -> PromptSet:
    """Validate a parsed YAML mapping; raises one ConfigError listing every problem."""
    problems: list[str] = []
    if not isinstance(data, dict):
        raise ConfigError([f"{source}: a prompt set must be a YAML mapping with 'classes'"], source=source)
    for key in data:
        if key not in _TOP_KEYS:
            close = difflib.get_close_matches(str(key), _TOP_KEYS, n=1)
            problems.append(f"{key}: unknown key; " + (f"did you mean '{close[0]}'?" if close
                                                       else f"valid keys: {', '.join(_TOP_KEYS)}"))
    mode = data.get("mode", "binary")
    if mode not in MODES:
        problems.append(f"mode: {mode!r} is not one of {', '.join(MODES)}")
    classes_raw = data.get("classes")
    if not isinstance(classes_raw, dict) or not classes_raw:
        problems.append("classes: missing or empty; map each class name to its prompts")
        classes_raw = {}
    classes = [c for n, b in classes_raw.items() if (c := _parse_class(str(n), b, mode, problems))]
    if mode == "multiclass" and len(classes_raw) < 2:
        problems.append("classes: multiclass mode needs at least two classes")
    names = [c.name for c in classes]
    macro = data.get("macro_classes") or names
    if not isinstance(macro, list):
        problems.append("macro_classes: must be a list of class names")
        macro = names
    for m in macro:
        if m not in classes_raw:
            problems.append(f"macro_classes: {m!r} is not a class of this set; choose from {', '.join(names)}")
    if problems:
        raise ConfigError(problems, source=source)
    return PromptSet(name=str(data.get("name") or Path(source).stem), mode=mode, classes=tuple(classes),
                     macro_classes=tuple(macro), source=source, description=str(data.get("description", "")))


def load_prompt_set(name_or_path: str | os.PathLike) -> PromptSet:
    path = resolve_prompt_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError([f"{path}: cannot parse YAML: {e}"], source=str(path)) from None
    return parse_prompt_set(data, source=str(path))
