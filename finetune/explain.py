"""One prediction explained: exact Shapley values over modalities, what was used, and similar past cases.

    values = subset_values(f, ["image", "ehr", "text"])   # f(frozenset of kept modalities) -> logit
    phi = shapley_values(values, ["image", "ehr", "text"])  # {modality: value}, sums to f(all) - f(none)
    expl = Explanation(study_id=..., full=..., empty=..., shapley=phi, used=used_statement(...), ...)
    write(expl, "html", "explain.html")                   # or "json" / "markdown"

Shapley values are exact, per prediction (not per cohort, as HAIM's one-model-per-subset-of-sources): the
players are the modalities present for this study (M <= 5), a coalition keeps its modalities and replaces the
others by the model's mask tokens (the model's job; here a callable), so all 2^M coalition values are computed
once and combined with the Shapley weights |S|! (M-|S|-1)! / M!. Efficiency holds by construction: the values
sum to f(all present) - f(nothing) (up to float rounding). Values are in the model's output space, the logit.

Inside the EHR token, `finetune.attribution` splits the EHR modality's value over its groups (each lab's value
or absence, age, sex, ...: exact Owen values, the record entering first; docs/explain.md); the Explanation
carries it as `ehr` and every renderer shows it as a ranked table.

Similar cases come from a retrieval index (other patients only: a neighbour from the query's own patient is
dropped and counted); the neighbour vote is the similarity-weighted share of neighbours with the outcome,
shown beside the model's probability. Every text is escaped in Markdown and HTML (reports and indications are
free text: `<script>` renders as text).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import TYPE_CHECKING

import numpy as np

from radalign import RadalignError
from radalign import report as R
from radalign.config import OUTPUT_FORMATS
from radalign.io import atomic_write_text

if TYPE_CHECKING:
    from radalign.finetune.attribution import EHRAttribution

FORMATS = OUTPUT_FORMATS  # one list of report formats: radalign.config
MAX_MODALITIES = 5

# How a modality reads in the `used` sentence ("image, labs (...) and indication; no report").
DISPLAY = {"image": "image", "ehr": "labs", "labs": "labs", "text": "indication", "indication": "indication",
           "report": "report", "demographics": "demographics"}


# ----------------------------------------------------------------------------------------------------------
# Exact Shapley values


def subset_values(f: Callable[[frozenset], float], players: Sequence[str]) -> dict[frozenset, float]:
    """f evaluated once on every subset of `players` (2^M calls): {frozenset(kept): logit}.

    f may return one logit, or an array of logits [B] for a whole batch (e.g. `lambda kept: fusion(batch,
    present_override=kept).logits[:, 0]`); shapley_values then returns arrays [B]. A modality a row lacks is a
    null player for that row (keeping it changes nothing), so its Shapley value there is exactly 0.
    """
    players = list(players)
    if len(set(players)) != len(players):
        raise RadalignError(f"modalities {players}: each modality may appear once")
    if len(players) > MAX_MODALITIES:
        raise RadalignError(f"{len(players)} modalities {players}: exact Shapley values enumerate 2^M "
                            f"subsets; at most {MAX_MODALITIES} are supported")
    out: dict[frozenset, float] = {}
    for r in range(len(players) + 1):
        for combo in combinations(players, r):
            s = frozenset(combo)
            v = _as_values(f(s))
            if not np.isfinite(v).all():
                raise RadalignError(f"model output for modalities {sorted(s)} is {v}; "
                                    "expected a finite logit")
            out[s] = float(v) if v.ndim == 0 else v
    return out


def _as_values(v) -> np.ndarray:
    if hasattr(v, "detach"):  # a torch tensor
        v = v.detach().cpu().double().numpy()
    return np.asarray(v, dtype=np.float64).reshape(-1) if np.ndim(v) else np.asarray(v, dtype=np.float64)


def shapley_values(values: Mapping[frozenset, float], players: Sequence[str]) -> dict[str, float]:
    """Exact Shapley value of each player from all 2^M coalition values.

    phi_i = sum over S not containing i of |S|! (M - |S| - 1)! / M! * (v(S + i) - v(S)).
    """
    players = list(players)
    m = len(players)
    subsets = [frozenset(c) for r in range(m + 1) for c in combinations(players, r)]
    missing = [sorted(s) for s in subsets if s not in values]
    if missing:
        raise RadalignError(f"coalition values missing for {len(missing)} subset(s), e.g. {missing[0]}; "
                            "compute them with subset_values(f, players)")
    weight = [math.factorial(k) * math.factorial(m - k - 1) / math.factorial(m) for k in range(m)]
    phi = {}
    for p in players:
        others = [q for q in players if q != p]
        total = 0.0
        for r in range(m):
            for combo in combinations(others, r):
                s = frozenset(combo)
                total += weight[r] * (values[s | {p}] - values[s])
        phi[p] = total
    return phi


# ----------------------------------------------------------------------------------------------------------
# What was used, in words


def lab_details(values: Mapping[str, float | None], hours: Mapping[str, float | None] | None = None) -> str:
    """"9 of 13 measured, latest 3.2 h before the film" from {item: value or None/NaN}, {item: hours}."""
    measured = [k for k, v in values.items() if _present(v)]
    text = f"{len(measured)} of {len(values)} measured"
    hrs = [float(hours[k]) for k in measured if hours and _present(hours.get(k))]
    if hrs:
        text += f", latest {min(hrs):.1f} h before the film"
    return text


def lab_details_from_row(row: Mapping, features: Sequence[str]) -> str:
    """lab_details for one row of the finetune table (columns `{feature}` and `{feature}_hours`)."""
    return lab_details({f: row.get(f) for f in features}, {f: row.get(f"{f}_hours") for f in features})


def _present(v) -> bool:
    """A value that exists: not None and not NaN (any float type: numpy float32 NaN is not a Python float)."""
    if v is None:
        return False
    try:
        return not math.isnan(float(v))
    except (TypeError, ValueError):  # a non-numeric value (text) is present
        return True


def used_statement(present: Mapping[str, bool], details: Mapping[str, str] | None = None) -> str:
    """A plain sentence: "image, labs (9 of 13 measured, ...) and indication; no report".

    `present`: modality -> whether this study has it (order kept); `details`: optional text per modality.
    """
    details = details or {}
    used = [_named(m, details.get(m)) for m, ok in present.items() if ok]
    absent = [DISPLAY.get(m, m) for m, ok in present.items() if not ok]
    text = _join(used) if used else "nothing (every modality masked)"
    return text + (f"; no {_join(absent, 'or')}" if absent else "")


def _named(modality: str, detail: str | None) -> str:
    name = DISPLAY.get(modality, modality)
    return f"{name} ({detail})" if detail else name


def _join(items: list[str], word: str = "and") -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} {word} {items[-1]}"


# ----------------------------------------------------------------------------------------------------------
# Similar cases


@dataclass
class SimilarCases:
    """Neighbours of other patients (best first), the similarity-weighted vote, and what was left out."""

    cases: list[dict]
    vote: float | None
    """similarity-weighted share of neighbours with the outcome (weights: similarity clipped at 0)"""
    skipped: dict[str, int] = field(default_factory=dict)
    """by reason: same_patient (the query's own patient: left out of the list), no_outcome (listed, but
    outcome unknown: left out of the vote)"""


CASE_KEYS = ("study_id", "subject_id", "similarity", "labels", "outcome")


def similar_cases(neighbours: Iterable[Mapping], subject_id, k: int | None = None) -> SimilarCases:
    """Neighbours of other patients (up to k, best first) and the similarity-weighted vote of their outcome.

    Each neighbour: study_id, subject_id, similarity, labels (list of names), outcome (0/1, or None unknown).
    """
    cases, skipped = [], {"same_patient": 0, "no_outcome": 0}
    for n in sorted(neighbours, key=lambda n: -float(n.get("similarity", -math.inf))):  # best first
        miss = [key for key in CASE_KEYS if key not in n]
        if miss:
            raise RadalignError(f"neighbour {dict(n)!r} lacks {miss}; each needs {', '.join(CASE_KEYS)}")
        if str(n["subject_id"]) == str(subject_id):
            skipped["same_patient"] += 1
            continue
        if k is not None and len(cases) >= k:
            break
        case = {key: n[key] for key in CASE_KEYS}
        if n.get("thumbnail"):
            case["thumbnail"] = n["thumbnail"]  # a data URI, for the HTML page only (not in the JSON)
        cases.append(case)
    num = den = 0.0
    for c in cases:
        if not _present(c["outcome"]):
            skipped["no_outcome"] += 1
            continue
        w = max(float(c["similarity"]), 0.0)
        num, den = num + w * float(c["outcome"]), den + w
    return SimilarCases(cases=cases, vote=num / den if den > 0 else None, skipped=skipped)


# ----------------------------------------------------------------------------------------------------------
# The explanation and its renderers


@dataclass
class Explanation:
    """Everything `radalign finetune explain` shows for one study (model outputs in logit space)."""

    study_id: str | int
    full: float
    """the model's logit with every present modality"""
    empty: float
    """the logit with every modality masked"""
    shapley: dict[str, float]
    used: str
    attention: dict[str, float] = field(default_factory=dict)
    """fusion attention weight per modality token"""
    subject_id: str | int | None = None
    task: str = ""
    similar: SimilarCases | None = None
    thumbnail: str | None = None
    """the film as a data URI (HTML only)"""
    indication: str | None = None
    """the order's indication (free text, shown escaped)"""
    ehr: EHRAttribution | None = None
    """the EHR modality's Shapley value split over its groups (finetune.attribution)"""
    ehr_note: str | None = None
    """why there is no split of the EHR value (e.g. more known groups than the exact limit)"""

    @property
    def probability(self) -> float:
        return _sigmoid(self.full)

    def to_dict(self) -> dict:
        sim = self.similar
        return {
            "study_id": self.study_id, "subject_id": self.subject_id, "task": self.task,
            "output": {"space": "logit", "full": self.full, "empty": self.empty,
                       "probability": self.probability},
            "shapley": dict(self.shapley), "attention": dict(self.attention), "used": self.used,
            "indication": self.indication,
            "similar_cases": [{k: c[k] for k in CASE_KEYS} for c in sim.cases] if sim else [],
            "neighbour_vote": sim.vote if sim else None,
            "similar_skipped": dict(sim.skipped) if sim else {},
            "ehr_groups": self.ehr.to_dict() if self.ehr else ({"error": self.ehr_note} if self.ehr_note else None),
        }


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def to_json(expl: Explanation) -> str:
    return json.dumps(expl.to_dict(), indent=2, default=str) + "\n"


def to_markdown(expl: Explanation) -> str:
    title = f"# Prediction for study {R.md(expl.study_id)}"
    title += f" ({R.md(expl.task)})" if expl.task else ""
    lines = [title, "", f"- probability: {expl.probability:.3f} (logit {expl.full:+.3f}; with every modality "
             f"masked {expl.empty:+.3f})", f"- used: {R.md(expl.used)}"]
    if expl.indication:
        lines.append(f"- indication: {R.md(expl.indication)}")
    if expl.similar:
        lines.append(f"- neighbour vote of {len(expl.similar.cases)} similar cases: "
                     f"{R.num(expl.similar.vote)} "
                     f"(beside the model's {expl.probability:.3f})")
    lines += ["", "## Modality attributions (exact Shapley values, logit)", ""]
    lines += R.md_table(["modality", "Shapley", "attention"],
                        [[m, R.num(v, signed=True), expl.attention.get(m)] for m, v in expl.shapley.items()])
    lines += ["", "The values sum to the full logit minus the all-masked logit "
              f"({expl.full - expl.empty:+.3f}).", ""]
    lines += _md_ehr(expl)
    lines += _md_cases(expl.similar)
    return "\n".join(lines) + "\n"


EHR_TITLE = "Inside the EHR (exact Owen values over its groups, logit)"
RECORD_ROW = "record present, nothing known"


def _ehr_rows(att: EHRAttribution) -> list[tuple[str, str, float | None]]:
    """(group, its value for the study, contribution): the record first, then the groups ranked by |value|; an
    absent lab or unknown demographic (the same as removed) contributes exactly 0."""
    rows = [(RECORD_ROW, "every lab not measured, demographics unknown", att.record)]
    return rows + [(g.name, g.shown, g.value) for g in att.groups]


def _ehr_sum(expl: Explanation) -> str:
    att = expl.ehr
    text = f"The rows sum to {att.total:+.3f}"
    ehr = expl.shapley.get("ehr")
    text += f", the EHR modality's Shapley value ({ehr:+.3f})" if ehr is not None else ""
    return text + f"; {att.removal}; {att.forward_passes} coalitions evaluated"  # the serve page's wording too


def _coarsened(att: EHRAttribution) -> str:
    return f"Partition coarsened: {att.coarsened}."


def _md_ehr(expl: Explanation) -> list[str]:
    if expl.ehr is None:
        return [f"## {EHR_TITLE}", "", f"Not computed: {R.md(expl.ehr_note)}.", ""] if expl.ehr_note else []
    rows = [[R.md(name), R.md(shown), R.num(v, signed=True)] for name, shown, v in _ehr_rows(expl.ehr)]
    return [f"## {EHR_TITLE}", "", *R.md_table(["group", "value", "contribution"], rows), "",
            f"{R.md(_ehr_sum(expl))}.", "", *([f"{R.md(_coarsened(expl.ehr))}", ""] if expl.ehr.coarsened else [])]


def _html_ehr(expl: Explanation) -> list[str]:
    e = R.html_text
    if expl.ehr is None:
        return [f"<h2>{EHR_TITLE}</h2><p class='muted'>Not computed: {e(expl.ehr_note)}.</p>"] if expl.ehr_note \
            else []
    rows = _ehr_rows(expl.ehr)
    scale = max([abs(v) for _, _, v in rows] + [0.0])
    parts = [f"<h2>{EHR_TITLE}</h2><table class='ehr-groups'><tr><th>group</th><th>value</th>"
             "<th>contribution</th><th></th></tr>"]
    parts += [f"<tr><td>{e(name)}</td><td>{e(shown)}</td><td>{v:+.3f}</td><td>{_bar(v, scale)}</td></tr>"
              for name, shown, v in rows]
    parts.append(f"</table><p class='muted'>{e(_ehr_sum(expl))}.</p>")
    if expl.ehr.coarsened:
        parts.append(f"<p class='muted'>{e(_coarsened(expl.ehr))}</p>")
    return parts


def _md_cases(sim: SimilarCases | None) -> list[str]:
    if sim is None:
        return ["No retrieval index given: no similar cases."]
    rows = [[i, c["similarity"], str(c["study_id"]), str(c["subject_id"]), ", ".join(map(str, c["labels"] or [])),
             _outcome(c["outcome"])] for i, c in enumerate(sim.cases, 1)]
    return [f"## {len(sim.cases)} similar past cases (other patients)", "",
            *R.md_table(["#", "similarity", "study", "patient", "labels", "outcome"], rows), "",
            f"{R.md(_skipped(sim.skipped))}."]


def _outcome(v) -> str:
    return "unknown" if not _present(v) else str(v)


def _skipped(skipped: Mapping[str, int]) -> str:
    return (f"{skipped.get('same_patient', 0)} neighbour(s) of the query's own patient left out of the list; "
            f"{skipped.get('no_outcome', 0)} with an unknown outcome left out of the vote")


def _bar(v: float, scale: float) -> str:
    width = round(120 * abs(v) / scale) if scale > 0 else 0
    return f"<span class='{'pos' if v >= 0 else 'neg'}' style='width:{width}px'></span>"


def to_html(expl: Explanation) -> str:
    """A self-contained page (thumbnail as a data URI, CSS inline, no external assets); all text escaped."""
    e = R.html_text
    title = f"Prediction for study {expl.study_id}" + (f" ({expl.task})" if expl.task else "")
    parts = [R.html_img(expl.thumbnail, "the film", "large")] if expl.thumbnail else []
    parts.append(f"<p>Probability <b>{expl.probability:.3f}</b> (logit {expl.full:+.3f}; every modality "
                 f"masked {expl.empty:+.3f})</p><p>Used: {e(expl.used)}</p>")
    if expl.indication:
        parts.append(f"<p>Indication: {e(expl.indication)}</p>")
    scale = max([abs(v) for v in expl.shapley.values()] + [0.0])
    parts.append("<h2>Modality attributions (exact Shapley values, logit)</h2><table><tr><th>modality</th>"
                 "<th>Shapley</th><th></th><th>attention</th></tr>")
    for m, v in expl.shapley.items():
        parts.append(f"<tr><td>{e(str(m))}</td><td>{v:+.3f}</td><td>{_bar(v, scale)}</td>"
                     f"<td>{R.num(expl.attention.get(m))}</td></tr>")
    parts.append(f"</table><p class='muted'>Red raises the risk, blue lowers it; the values sum to "
                 f"{expl.full - expl.empty:+.3f}.</p>")
    parts += _html_ehr(expl)
    parts += _html_cases(expl.similar, expl.probability)
    return R.html_page(title, parts)


def _html_cases(sim: SimilarCases | None, probability: float) -> list[str]:
    e = R.html_text
    if sim is None:
        return ["<p class='muted'>No retrieval index given: no similar cases.</p>"]
    parts = [f"<h2>{len(sim.cases)} similar past cases (other patients)</h2><p>Neighbour vote "
             f"<b>{R.num(sim.vote)}</b> beside the model's probability <b>{probability:.3f}</b></p>"
             "<table><tr><th>#</th><th>image</th><th>similarity</th><th>study</th><th>patient</th>"
             "<th>labels</th><th>outcome</th></tr>"]
    for i, c in enumerate(sim.cases, 1):
        parts.append(f"<tr><td>{i}</td><td>{R.html_img(c.get('thumbnail'), 'film')}</td>"
                     f"<td>{c['similarity']:.3f}</td><td>{e(str(c['study_id']))}</td>"
                     f"<td>{e(str(c['subject_id']))}</td><td>{e(', '.join(map(str, c['labels'] or [])))}</td>"
                     f"<td>{e(_outcome(c['outcome']))}</td></tr>")
    parts.append(f"</table><p class='muted'>{e(_skipped(sim.skipped))}.</p>")
    return parts


def _scalar(v, study_id) -> float:
    a = np.asarray(v, dtype=np.float64).reshape(-1)
    if a.size != 1:
        raise RadalignError(f"study {study_id}: the model returned {a.size} logits per subset; explain one "
                            "study (a batch of 1, one output) at a time")
    return float(a[0])


def render(expl: Explanation, fmt: str) -> str:
    if fmt == "json":
        return to_json(expl)
    if fmt == "markdown":
        return to_markdown(expl)
    if fmt == "html":
        return to_html(expl)
    raise RadalignError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")


def write(expl: Explanation, fmt: str, out: str | os.PathLike | None) -> str:
    """Render; write atomically to `out` when given. Returns the text."""
    text = render(expl, fmt)
    if out:
        atomic_write_text(out, text)
    return text


def explain(f: Callable[[frozenset], float], players: Sequence[str], *, study_id, used: str,
            attention: Mapping[str, float] | None = None, subject_id=None, task: str = "",
            neighbours: Iterable[Mapping] | None = None, k: int | None = None,
            thumbnail: str | None = None, indication: str | None = None,
            ehr: EHRAttribution | str | None = None) -> Explanation:
    """Assemble an Explanation: 2^M calls of f, exact Shapley values, and the similar cases when given.
    ehr: the EHR attribution (finetune.attribution.explain_ehr), or why there is none."""
    values = {k: _scalar(v, study_id) for k, v in subset_values(f, players).items()}
    return Explanation(study_id=study_id, full=values[frozenset(players)], empty=values[frozenset()],
                       shapley=shapley_values(values, players), used=used, attention=dict(attention or {}),
                       subject_id=subject_id, task=task, thumbnail=thumbnail, indication=indication,
                       similar=similar_cases(neighbours, subject_id, k) if neighbours is not None else None,
                       ehr=None if isinstance(ehr, str) else ehr, ehr_note=ehr if isinstance(ehr, str) else None)


__all__ = ["FORMATS", "DISPLAY", "subset_values", "shapley_values", "lab_details",
           "lab_details_from_row", "used_statement", "SimilarCases", "similar_cases", "Explanation",
           "explain", "to_json", "to_markdown", "to_html", "render", "write"]
