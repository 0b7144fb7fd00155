"""The `radalign` command: `radalign <stage> [verb] [--flags] [key=value ...]`.

Each stage package has a `cli` module with `register(subparsers)` (adds its parser) and `main(argv)`
(for `python -m <stage>`). This module only dispatches; no library module imports it.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys

from radalign import RadalignError, __version__

STAGES = ("data", "pretrain", "zeroshot", "retrieval", "finetune")
# Top-level commands implemented by a stage: `radalign export` lives in pretrain/cli.py (`register_export`).
COMMANDS = {"export": "pretrain"}


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
    for command, stage in COMMANDS.items():
        if stage in stages or command in stages:
            getattr(importlib.import_module(f"radalign.{stage}.cli"), f"register_{command}")(sub)
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




def reference_markdown() -> str:
    """The CLI reference (docs/cli.md), generated from the parsers themselves; a test keeps the file in sync."""
    parser = build_parser()
    lines = ["# CLI reference", "", "Generated by `python -m radalign.cli --write-reference docs/cli.md`; "
             "`tests/test_cli.py` fails when this file is out of date.", ""]

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
        Path(sys.argv[2]).write_text(reference_markdown())
        sys.exit(0)
    sys.exit(main())
