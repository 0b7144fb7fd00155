"""`radalign data link-ehr`: placeholder until data/ehr.py lands (owned by the EHR-linkage work)."""

from __future__ import annotations


def register(verbs) -> None:
    p = verbs.add_parser("link-ehr", help="join each study to the patient's MIMIC-IV record at the film (WIP)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from radalign import RadalignError

    raise RadalignError("link-ehr is not implemented yet")
