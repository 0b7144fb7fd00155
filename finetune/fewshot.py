"""Few-shot protocol: k labelled examples per class drawn by patient, seeded, several draws, every draw written.

    draw = draw_k_per_class(y, patients, ids, k=4, seed=0, exclude_patients=val_and_test_patients)
    write_draw(out / "draws" / "k4-seed0.json", draw)        # ids, seed, sha256 of the sorted ids
    anchored = head_method(lambda: anchored_head(), x_pool, x_test, patients, init)   # finetune.fewshot_heads
    res = run_sweep(anchored, y, patients, ids, eval_y=y_test, ks=(0, 1, 2, 4, "all"), seeds=range(5),
                    zero_shot_auroc=zs)
    write_sweep(out, res)                                     # fewshot-<method>.json, draws/, learning_curve.png

The protocol (docs/finetune.md):
- a draw takes, for each class (rarest first), k distinct PATIENTS that have an example of it, then one of that
  patient's examples of the class; a patient enters a draw once. Every film of the other patients stays out.
  "all" takes every labelled row; k = 0 takes none (a head that starts at zero-shot scores zero-shot there).
  Patients of validation or test (`exclude_patients`) are never drawn.
- the seed fixes the draw: `numpy.random.default_rng(seed)` over rows sorted by id, so the same table and seed
  give the same subset anywhere; the JSON carries the ids and the sha256 of their sorted, newline-joined list.
- validation: none. Each method is a fixed recipe or chooses its own hyper-parameter inside the shots (the
  anchored head's pull, by patient-grouped cross-validation), so the validation split is never touched.
- a class with fewer than k patients is an error naming the class and how many there are.
- methods: `head_method` (a head of finetune.fewshot_heads: `anchored`, the zero-shot-anchored MAP probe whose
  pull toward the prompt classifier shrinks with k, and `zero_shot`, the prompt classifier itself),
  `linear_probe_method` (L2 logistic regression on frozen embeddings) and finetune.registry.fewshot_method (any
  registry model: fusion, ehr_only, early_fusion, gbdt, ...).
- a method that cannot fit a draw raises `SkipDraw(reason)` (gbdt on fewer rows than a tree needs to split:
  finetune.registry.fewshot_method); a draw whose AUROC is undefined is skipped too
  (UNSCORED). Each skipped (k, seed) stays in per_draw with its reason, out of the summary's draws, and is
  counted by reason (`skipped_by_reason`).
- summary per k over draws: mean, sample standard deviation, min/max and a t-interval of the mean over draws
  (the spread due to which examples were drawn; the unit is the draw), and the mean pull toward zero-shot of a
  head that reports one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import textwrap
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from radalign.finetune.fewshot_heads import FewshotHead, ZeroShotInit, one_blas_thread
from radalign.finetune.fewshot_heads import prompt_init as prompt_init  # re-exported: it lives with the heads

from radalign import RadalignError
from radalign import report as R
from radalign.io import atomic_write_json

FORMAT = "radalign-fewshot-draw/1"
DEFAULT_KS = (1, 2, 4, 8, 16, 32)
ALL = "all"
VALIDATION = "none: fixed recipes, or choices made inside the shots (grouped cross-validation); no early stopping"
UNSCORED = "unscored: the evaluation rows hold one class (AUROC undefined)"


class SkipDraw(RadalignError):
    """A method cannot fit this draw; the message is the reason counted in fewshot.json, and the sweep goes on."""


@dataclass
class FewshotDraw:
    k: int | str
    seed: int
    ids: list[str]  # the drawn rows' ids (study ids), in draw order
    patients: list[str]  # their patients, same order
    classes: dict[str, int]  # class -> rows drawn
    sha256: str = ""  # of "\n".join(sorted(ids))
    rows: list[int] = field(default_factory=list, repr=False)  # indices into the pool (not written)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("rows")
        return {"format": FORMAT, **d}


def ids_sha256(ids: Iterable) -> str:
    return hashlib.sha256("\n".join(sorted(str(i) for i in ids)).encode("utf-8")).hexdigest()


def _class_name(c: float) -> str:
    return str(int(c)) if float(c).is_integer() else str(c)


def draw_k_per_class(y: Sequence[float], patients: Sequence, ids: Sequence, k: int | str, seed: int, *,
                     exclude_patients: Iterable = ()) -> FewshotDraw:
    """k examples per class, one per patient, seeded. `y` [N] class per row (NaN = unlabelled, never drawn)."""
    y = np.asarray(y, np.float64)
    pat = np.asarray([str(p) for p in patients])
    sid = np.asarray([str(i) for i in ids])
    if not (len(y) == len(pat) == len(sid)):
        raise RadalignError(f"few-shot pool: {len(y)} labels, {len(pat)} patients, {len(sid)} ids; must match")
    if len(set(sid)) != len(sid):
        raise RadalignError("few-shot pool: row ids are not unique; use study ids (one row per study)")
    excluded = {str(p) for p in exclude_patients}
    order = np.argsort(sid, kind="stable")  # draw over rows sorted by id: independent of table order
    ok = order[~np.isnan(y[order]) & ~np.isin(pat[order], list(excluded))]
    if k == ALL:
        rows = list(ok)
        return _finish(k, seed, rows, y, pat, sid)
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 0:
        raise RadalignError(f"few-shot k: {k!r}; use a positive integer, 0 (no shots) or 'all'")
    if k == 0:
        return _finish(0, seed, [], y, pat, sid)
    rng = np.random.default_rng(seed)
    classes = sorted(np.unique(y[ok]))
    per_class = {c: sorted(set(pat[ok][y[ok] == c])) for c in classes}
    used: set[str] = set()
    rows: list[int] = []
    for c in sorted(classes, key=lambda c: (len(per_class[c]), c)):
        avail = [p for p in per_class[c] if p not in used]
        if len(avail) < k:
            taken = len(per_class[c]) - len(avail)
            note = f" ({taken} more already drawn for another class)" if taken else ""
            raise RadalignError(f"few-shot k={k}: class {_class_name(c)} has {len(avail)} patient(s) with a "
                                f"labelled example outside validation/test{note}; lower k or use k=all")
        for p in rng.permutation(np.array(avail, dtype=object))[:k]:
            cand = ok[(pat[ok] == p) & (y[ok] == c)]
            rows.append(int(cand[rng.integers(len(cand))]))
            used.add(str(p))
    return _finish(int(k), seed, rows, y, pat, sid)


def _finish(k, seed, rows, y, pat, sid) -> FewshotDraw:
    classes: dict[str, int] = {}
    for r in rows:
        classes[_class_name(y[r])] = classes.get(_class_name(y[r]), 0) + 1
    ids = [str(sid[r]) for r in rows]
    return FewshotDraw(k=k, seed=int(seed), ids=ids, patients=[str(pat[r]) for r in rows],
                       classes=dict(sorted(classes.items())), sha256=ids_sha256(ids), rows=[int(r) for r in rows])


def check_disjoint(draw: FewshotDraw, **splits: Iterable) -> None:
    """Refuse a draw that shares a patient with any named split (validate=..., test=...)."""
    drawn = set(draw.patients)
    for name, patients in splits.items():
        both = drawn & {str(p) for p in patients}
        if both:
            raise RadalignError(f"few-shot draw k={draw.k} seed={draw.seed}: {len(both)} patient(s) also in "
                                f"{name} (e.g. {sorted(both)[0]}); draw from the training split only")


def write_draw(path: str | os.PathLike, draw: FewshotDraw) -> None:
    atomic_write_json(path, draw.to_dict())


def read_draw(path: str | os.PathLike) -> FewshotDraw:
    d = json.loads(Path(path).read_text(encoding="utf-8"))
    if d.get("format") != FORMAT:
        raise RadalignError(f"{path}: not a few-shot draw (format {d.get('format')!r}, expected {FORMAT!r})")
    if ids_sha256(d["ids"]) != d["sha256"]:
        raise RadalignError(f"{path}: the ids do not match the recorded sha256; the file was edited or truncated")
    d.pop("format")
    return FewshotDraw(**d)


# ----------------------------------------------------------------------------------------------------------
# Methods: fit(rows of the pool drawn, seed) -> scores on the evaluation rows.

# (train rows, their labels, seed) -> eval scores [m], or (eval scores, {what the fit chose: pull, lam})
Method = Callable[[np.ndarray, np.ndarray, int], "np.ndarray | tuple[np.ndarray, dict]"]


def linear_probe_method(x_pool: np.ndarray, x_eval: np.ndarray, C: float = 1.0) -> Method:
    """L2 logistic regression on frozen embeddings (sklearn lbfgs, deterministic)."""
    from sklearn.linear_model import LogisticRegression

    def fit(rows, y, seed):
        clf = LogisticRegression(C=C, max_iter=2000, random_state=seed).fit(x_pool[rows], y.astype(int))
        return clf.decision_function(x_eval)
    fit.seed_free = True  # lbfgs ignores random_state: the same rows give the same probe (run_sweep reuses it)
    return fit


def head_method(make_head: Callable[[], FewshotHead], x_pool: np.ndarray, x_eval: np.ndarray, groups: Sequence,
                init: ZeroShotInit) -> Method:
    """A few-shot head (finetune.fewshot_heads) fitted on the drawn rows with their patients as its inner
    cross-validation's groups; returns (scores on x_eval, {"pull": the zero-shot prior's share, "lam"}).
    No rows (k = 0): the zero-shot logit, exactly."""
    x_pool = np.asarray(x_pool, np.float64)
    x_eval = np.asarray(x_eval, np.float64)
    groups = np.asarray([str(g) for g in groups])

    def fit(rows, y, seed):
        head = make_head().fit(x_pool[rows], y, groups[rows], init, seed=seed)
        chosen = {"pull": R.finite_or_none(head.pull_), "lam": R.finite_or_none(head.info_.get("lam"))}
        if "prior" in head.info_:  # the anchored head: its prior's centre, zero_shot or zero (the linear probe)
            chosen["prior"] = head.info_["prior"]
        return head.predict_logit(x_eval), chosen
    fit.seed_free = make_head().seed_free  # a head of its shots alone: run_sweep reuses its fit on the same rows
    return fit


# ----------------------------------------------------------------------------------------------------------
# Sweep and summary.


def _t975(df: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.975, df))


def summarise(values: Sequence[float], bounds: tuple[float, float] = (0.0, 1.0)) -> dict:
    """Mean, sample SD, min, max and the 95% t-interval of the mean over draws (NaN draws left out, counted).

    The interval is clipped to `bounds` (an AUROC's range): with 5 spread-out draws the t-interval's half
    width can exceed the distance to 1, and an AUROC interval ending at 1.07 means nothing."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
    out = {"n_draws": int(v.size), "n_unscored": int(len(values) - v.size), "unit": "draw"}
    if v.size == 0:
        return {**out, "mean": None, "sd": None, "min": None, "max": None, "ci_low": None, "ci_high": None}
    sd = float(v.std(ddof=1)) if v.size > 1 else 0.0
    half = _t975(v.size - 1) * sd / math.sqrt(v.size) if v.size > 1 else 0.0
    return {**out, "mean": float(v.mean()), "sd": sd, "min": float(v.min()), "max": float(v.max()),
            "ci_low": float(max(v.mean() - half, bounds[0])), "ci_high": float(min(v.mean() + half, bounds[1]))}


@dataclass
class SweepResult:
    method: str
    ks: list
    seeds: list[int]
    per_draw: list[dict]  # {k, seed, auroc, sha256, n}
    summary: dict  # str(k) -> summarise()
    zero_shot_auroc: float | None
    draws: list[FewshotDraw] = field(repr=False, default_factory=list)
    no_zero_shot: str | None = None  # why the curve has no zero-shot point (a task without prompts)


def run_sweep(method: Method, y: Sequence[float], patients: Sequence, ids: Sequence, *, eval_y: np.ndarray,
              ks: Sequence = DEFAULT_KS, seeds: Iterable[int] = range(5), exclude_patients: Iterable = (),
              zero_shot_auroc: float | None = None, method_name: str = "method", progress: bool = False,
              no_zero_shot: str | None = None) -> SweepResult:
    """Every (k, seed): draw from the pool, fit, score the evaluation rows, AUROC (radalign.metrics.auroc).
    `no_zero_shot`: why there is no zero-shot point (the curve and the JSON say it)."""
    from tqdm import tqdm

    from radalign.metrics import auroc

    seeds = list(seeds)
    if len(seeds) < 5:
        raise RadalignError(f"few-shot: {len(seeds)} seed(s); the protocol needs at least 5 draws per k")
    y = np.asarray(y, np.float64)
    eval_y = np.asarray(eval_y, np.float64)
    keep = ~np.isnan(eval_y)
    per_draw, draws = [], []
    fits: dict[bytes, object] = {}  # a seed-free method's output per distinct draw: every seed draws all at k=all
    for k, seed in tqdm([(k, s) for k in ks for s in seeds], desc=f"few-shot {method_name}", disable=not progress):
        d = draw_k_per_class(y, patients, ids, k, seed, exclude_patients=exclude_patients)
        rows = np.asarray(d.rows, int)
        row = {"k": k, "seed": seed, "auroc": None, "sha256": d.sha256, "n": len(rows)}
        key = rows.tobytes() if getattr(method, "seed_free", False) else None
        if key in fits:
            out, row["reused"] = fits[key], True  # same rows, same fit: not fitted again
        else:
            try:
                with one_thread():
                    out = method(rows, y[rows], seed)
            except SkipDraw as e:
                per_draw.append({**row, "skipped": str(e)})
                draws.append(d)
                continue
            if key is not None:
                fits[key] = out
        scores, chosen = out if isinstance(out, tuple) else (out, {})
        a = auroc(eval_y[keep].astype(int), np.asarray(scores, np.float64)[keep])
        per_draw.append({**row, "auroc": None if np.isnan(a) else a, **chosen,
                         **({"skipped": UNSCORED} if np.isnan(a) else {})})
        draws.append(d)
    summary = {str(k): _summary_of_k([r for r in per_draw if r["k"] == k]) for k in ks}
    return SweepResult(method_name, list(ks), seeds, per_draw, summary, zero_shot_auroc, draws, no_zero_shot)


@contextmanager
def one_thread():
    """One BLAS thread (finetune.fewshot_heads.one_blas_thread) and one torch thread for a draw's fit: the fits
    are small (k rows per class, minibatches of optim.batch_size), and on shared, busy cores the threads of
    either pool spend their time spin-waiting at each op's barrier, not computing."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with one_blas_thread():
            yield
    finally:
        torch.set_num_threads(n)


def _summary_of_k(rows: list[dict]) -> dict:
    """summarise() of the scored draws' AUROCs, the skipped ones counted by reason, plus the mean pull toward
    zero-shot where the method reports one."""
    out = summarise([r["auroc"] for r in rows if "skipped" not in r])
    out["n_skipped"] = sum("skipped" in r for r in rows)
    out["n_reused"] = sum(bool(r.get("reused")) for r in rows)  # draws scored with an earlier identical draw's fit
    out["skipped_by_reason"] = skipped_by_reason(rows)
    pulls = [r["pull"] for r in rows if r.get("pull") is not None]
    if pulls:
        out["pull"] = float(np.mean(pulls))
    return out


def skipped_by_reason(per_draw: Iterable[dict]) -> dict[str, int]:
    """{reason: skipped draws}, most frequent first."""
    from collections import Counter

    return dict(Counter(r["skipped"] for r in per_draw if "skipped" in r).most_common())


def write_sweep(out: str | os.PathLike, res: SweepResult) -> dict:
    """out/fewshot.json (summary, per draw, the eval unit), out/draws/k{k}-seed{s}.json, out/learning_curve.png."""
    out = Path(out)
    for d in res.draws:
        write_draw(out / "draws" / f"{res.method}-k{d.k}-seed{d.seed}.json", d)
    doc = {"method": res.method, "ks": res.ks, "seeds": res.seeds, "zero_shot_auroc": res.zero_shot_auroc,
           "no_zero_shot": res.no_zero_shot, "summary": res.summary, "per_draw": res.per_draw, "metric": "auroc on the evaluation split",
           "validation": VALIDATION}
    atomic_write_json(out / f"fewshot-{res.method}.json", doc)
    plot_learning_curve([res], out / f"learning_curve-{res.method}.png")
    return doc


def plot_learning_curve(results: Sequence[SweepResult], path: str | os.PathLike) -> None:
    """AUROC mean over draws (error bars: the t-interval) against k (numeric k in order, then "all"), zero-shot
    at k=0 (the zero_shot method and every k = 0 point are that baseline, not series); without one, the x label
    says why (a result's `no_zero_shot`)."""
    every = list(dict.fromkeys(k for r in results for k in r.ks if k != 0))  # k = 0 is the zero-shot baseline
    ks = [k for k in every if k != ALL] + ([ALL] if ALL in every else [])
    series = {res.method: [(k, s["mean"], s["ci_low"], s["ci_high"]) for k in res.ks
                           if k != 0 and (s := res.summary[str(k)])["mean"] is not None]
              for res in results if res.method != "zero_shot"}  # a flat line: the baseline draws it
    zs = next((r.zero_shot_auroc for r in results if r.zero_shot_auroc is not None), None)
    why = next((r.no_zero_shot for r in results if r.no_zero_shot), None)
    xlabel = "k labelled examples per class (drawn by patient)"
    if zs is None and why:
        xlabel += "\n" + "\n".join(textwrap.wrap(why, 80))
    R.learning_curve_plot(path, series, ticks=ks, xlabel=xlabel,
                          ylabel="AUROC (mean over draws, 95% t-interval)",
                          baseline=None if zs is None else ("zero-shot (k=0)", zs))

