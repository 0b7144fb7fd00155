"""The `radalign` command: `radalign <stage> <verb> [--config YAML] [--flags] [key=value ...]`.

Each stage package has a `cli` module with `register(subparsers)` (adds its parser) and `main(argv)`
(for `python -m radalign.<stage>`). This module dispatches and owns the one CLI convention every verb follows:

- a run verb is backed by a typed config dataclass: `--config` (a YAML path or a name under configs/), one flag
  per field (`add_config_args`: the flag's help is the field's docstring), then `key=value` overrides;
  `config_from_args` merges them in that order and validates once;
- inputs are named by what they are (`--shards`, `--table`, `--export`, `--run`, `--index-dir`); an old
  spelling still works for one release and prints a warning naming the new one (`old_spelling`);
  docs/cli.md lists them ("Old spellings").

No library module imports this one.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import sys
import typing
from typing import Any

from radalign import RadalignError, __version__
from radalign.config import describe, field_docs, load_config, to_yaml

STAGES = ("data", "pretrain", "zeroshot", "retrieval", "finetune")
# Top-level commands -> "module:register function": `radalign export` is implemented by the pretrain stage,
# `radalign summary` by the core (it reads run files and imports no stage).
COMMANDS = {"export": "radalign.pretrain.cli:register_export", "summary": "radalign.summary:register"}


class Parser(argparse.ArgumentParser):
    """argparse with 'did you mean' for misspelt options, and a usage hint on every error."""

    def error(self, message: str):  # noqa: D401 - argparse API
        if "unrecognized arguments" in message:
            known = _all_options(self)
            bad = message.split(":", 1)[1].split()
            hints = []
            for b in bad:
                flag = b.split("=", 1)[0]
                close = difflib.get_close_matches(flag, known, n=1, cutoff=0.5)
                if close:
                    hints.append(f"{flag} -> did you mean {close[0]}?")
            if hints:
                message += " (" + "; ".join(hints) + ")"
        self.exit(2, f"{self.prog}: error: {message}\nRun `{self.prog} --help` for the options.\n")


def _all_options(parser: argparse.ArgumentParser) -> list[str]:
    """Option strings of a parser and all its subparsers (the top parser reports unknown sub-options)."""
    out = []
    for a in parser._actions:
        out += list(a.option_strings)
        if isinstance(a, argparse._SubParsersAction):
            for sub in a.choices.values():
                out += _all_options(sub)
    return sorted(set(out))


def new_parser(prog: str, description: str) -> Parser:
    return Parser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_verbs(parser: argparse.ArgumentParser, dest: str = "verb"):
    sub = parser.add_subparsers(dest=dest, metavar="VERB", parser_class=Parser)
    sub.required = True
    return sub


# ----------------------------------------------------------------------------------------------------------
# Old spellings: accepted for one release, with a warning naming the new one.


class _OldSpelling(argparse.Action):
    """An old option string: warns on stderr, then does exactly what the new option's action does."""

    def __init__(self, option_strings, dest, target: argparse.Action, new: str, **kwargs):
        super().__init__(option_strings, dest=target.dest, nargs=target.nargs, const=target.const,
                         default=argparse.SUPPRESS, type=target.type, choices=target.choices,
                         help=argparse.SUPPRESS, metavar=target.metavar)
        self.target, self.new = target, new

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"warning: {option_string} is the old spelling of {self.new}; it still works in this release and "
              f"will be removed in the next: write {self.new}", file=sys.stderr)
        self.target(parser, namespace, values, self.new)


def old_spelling(parser: argparse.ArgumentParser, old_to_new: dict[str, str]) -> None:
    """Accept each old option string as a warning alias of the already added new one (`--no-x` names the
    negative of a --x/--no-x flag)."""
    for old, new in old_to_new.items():
        target = next((a for a in parser._actions if new in a.option_strings), None)
        if target is None:
            raise ValueError(f"{parser.prog}: no option {new} to alias {old} to")
        parser.add_argument(old, action=_OldSpelling, target=target, new=new)


def old_spellings(parser: argparse.ArgumentParser) -> list[tuple[str, str, str]]:
    """(command, old, new) for every old spelling of `parser` and its sub-commands (docs/cli.md, tests)."""
    out = [(parser.prog, a.option_strings[0], a.new) for a in parser._actions if isinstance(a, _OldSpelling)]
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sub in a.choices.values():
                out += old_spellings(sub)
    return out


# ----------------------------------------------------------------------------------------------------------
# Run verbs: --config, one flag per config field, key=value.

FLAG_DEST = "config_field:"  # argparse dest prefix of the per-field flags (kept apart from the verb's own options)


def add_config_args(p: argparse.ArgumentParser, cls: type, *, default_config: str | None = None,
                    flags: dict[str, str | tuple[str, ...]] | None = None, skip: tuple[str, ...] = (),
                    **field_kwargs: dict) -> None:
    """Add `--config`, `--print-config`, a flag per field of `cls` and the `key=value` positional to `p`.

    A field's flag is `--field-name` (or `flags[field]`: one option string or several); its help is the field's
    docstring and default. Unset flags leave the YAML's (or the dataclass's) value alone. `field_kwargs[field]`
    adds argparse options (choices, metavar, nargs). bool fields get --x/--no-x, list fields a repeatable flag.
    """
    p.add_argument("--config", default=default_config, metavar="NAME_OR_YAML",
                   help="config name under configs/ or a YAML path; flags, then key=value, override it"
                        + (" (default: %(default)s)" if default_config else " (default: the defaults below)"))
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    docs, defaults = field_docs(cls), {key: default for key, default, _ in describe(cls)}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        names = (flags or {}).get(f.name, "--" + f.name.replace("_", "-"))
        names = (names,) if isinstance(names, str) else tuple(names)
        flag = names[0]
        key = "" if flag == "--" + f.name.replace("_", "-") else f"[key {f.name}] "
        helptext = f"{key}{docs.get(f.name, '')} (default: {defaults[f.name]})".replace("%", "%%")
        kwargs = {**_flag_kwargs(hints[f.name]), **field_kwargs.get(f.name, {})}
        if kwargs.get("action") is not argparse.BooleanOptionalAction and "choices" not in kwargs:
            kwargs.setdefault("metavar", f.name.upper())
        p.add_argument(*names, dest=f"{FLAG_DEST}{f.name}={flag}", default=None, help=helptext, **kwargs)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. seed=1")


def _flag_kwargs(hint: Any) -> dict:
    """argparse options for a field type: bool -> --x/--no-x, list -> repeatable, Optional[T] -> T."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union and len(args) == 1:
        hint = args[0]
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(hint) is list:
        return {"action": "append"}
    return {"type": hint} if hint in (int, float) else {}


def config_from_args(cls: type, args: argparse.Namespace, stage: str | None = None, **positionals: Any):
    """The config of a run verb: YAML (`--config`), then the flags that were set (and `positionals`, a verb's
    positional arguments by field name), then `key=value`; validated once (radalign.config.ConfigError lists
    every problem, naming the flag or override as typed)."""
    flags = {key: (value, str(value)) for key, value in positionals.items() if value is not None}
    for dest, value in vars(args).items():
        if dest.startswith(FLAG_DEST) and value is not None:
            key, flag = dest[len(FLAG_DEST):].split("=", 1)
            if isinstance(value, bool):
                flags[key] = (value, flag if value else "--no-" + flag[2:])
            else:
                flags[key] = (value, f"{flag} {' '.join(map(str, value)) if isinstance(value, list) else value}")
    return load_config(cls, args.config, args.overrides, stage=stage, flags=flags)


def print_config(cfg) -> int:
    print(to_yaml(cfg), end="")
    return 0


def run_entry(func, args) -> int:
    """Call a verb's handler; print user errors (RadalignError) without a traceback."""
    try:
        rc = func(args)
        return int(rc or 0)
    except RadalignError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def build_parser(stages: tuple[str, ...] = STAGES) -> Parser:
    """The parser; with `stages`, only those stages' modules are imported (fast start, isolated failures)."""
    parser = new_parser("radalign", "Contrastive vision-language pretraining for chest radiographs.")
    parser.add_argument("--version", action="version", version=f"radalign {__version__}")
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", parser_class=Parser)
    sub.required = True
    for stage in (s for s in stages if s in STAGES):
        mod = importlib.import_module(f"radalign.{stage}.cli")
        mod.register(sub)
    for command, target in COMMANDS.items():
        if command in stages or tuple(stages) == STAGES:
            module, func = target.split(":")
            getattr(importlib.import_module(module), func)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    known = (*STAGES, *COMMANDS)
    if argv and argv[0] not in known and not argv[0].startswith("-"):
        close = difflib.get_close_matches(argv[0], known, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        print(f"radalign: unknown stage '{argv[0]}'.{hint} Stages: {', '.join(STAGES)}; commands: "
              f"{', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    parser = build_parser((argv[0],) if argv and argv[0] in known else STAGES)
    args = parser.parse_args(_with_default_verb(argv))
    return run_entry(args.func, args)


def _with_default_verb(argv: list[str]) -> list[str]:
    """`radalign finetune --config X` -> `radalign finetune train --config X`: a stage whose cli module names a
    DEFAULT_VERB gets it when the next word is not one of its VERBS (help flags excepted)."""
    if not argv or argv[0] not in STAGES:
        return argv
    mod = importlib.import_module(f"radalign.{argv[0]}.cli")
    default, verbs = getattr(mod, "DEFAULT_VERB", None), getattr(mod, "VERBS", ())
    if default and (len(argv) == 1 or (argv[1] not in verbs and argv[1] not in ("-h", "--help"))):
        return [argv[0], default, *argv[1:]]
    return argv


def stage_main(stage: str, argv: list[str] | None = None) -> int:
    """`python -m <stage> ...` is `radalign <stage> ...`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return main([stage, *argv])




CONVENTION = """## One convention

`radalign <stage> <verb> [--config NAME_OR_YAML] [--flags] [key=value ...]` (a stage's default verb may be left
out: `radalign finetune --config X` is `radalign finetune train --config X`, `radalign zeroshot --export ...` is
`radalign zeroshot eval --export ...`).

- Every run verb is backed by a typed config (a dataclass, a docstring per field): `--config` loads a YAML (a path,
  or a name under configs/), each flag sets one field (its help is the field's docstring), `key=value` sets any
  field; later wins (YAML, then flags, then key=value), and every problem is reported at once.
  `--print-config` prints the resolved config and exits.
- Inputs are named by what they are: `--shards` (a shards folder of `radalign data prepare`), `--table` (the EHR
  table of `radalign data link-ehr`), `--export` (a pretrain run or its export/ folder), `--run` (a finetune run
  folder), `--index-dir` (a retrieval index folder) versus `--index-type` (the FAISS index type); outputs are
  `--out`. `--overwrite` replaces an output; `--num-workers` sets worker processes."""


def reference_markdown() -> str:
    """The CLI reference (docs/cli.md), generated from the parsers themselves; a test keeps the file in sync."""
    parser = build_parser()
    lines = ["# CLI reference", "", "Generated by `python -m radalign.cli --write-reference docs/cli.md`; "
             "`tests/test_cli.py` fails when this file is out of date.", "", *CONVENTION.splitlines(), ""]
    lines += ["## Old spellings", "", "Accepted in this release, each with a warning naming the new spelling; "
              "they go in the next release.", "", "| command | old | new |", "|---|---|---|"]
    lines += [f"| `{prog}` | `{old}` | `{new}` |" for prog, old, new in old_spellings(parser)]
    lines.append("")

    def walk(p: argparse.ArgumentParser, name: str, depth: int) -> None:
        lines.extend([f"{'#' * depth} `{name}`", "", "```", p.format_help().rstrip(), "```", ""])
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    walk(sub, f"{name} {sub_name}", min(depth + 1, 4))

    walk(parser, "radalign", 2)
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    if sys.argv[1:2] == ["--write-reference"]:
        import os

        os.environ["COLUMNS"] = "100"
        Path = __import__("pathlib").Path
        # the stage modules use radalign.cli's classes, not this __main__ copy's (old_spellings tests isinstance)
        Path(sys.argv[2]).write_text(importlib.import_module("radalign.cli").reference_markdown())
        sys.exit(0)
    sys.exit(main())
