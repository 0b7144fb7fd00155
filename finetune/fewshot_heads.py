"""Few-shot heads on frozen image embeddings that start at the zero-shot classifier and let the k shots move them.

    init = ZeroShotInit(np.stack([t_pos, t_neg]), logit_scale)   # prompt prototypes [2, D] and the logit scale
    head = make_head("anchored").fit(x, y, groups, init, seed=0)  # x [n, D] embeddings, y [n] 0/1, groups [n]
    scores = head.predict_logit(x_test)                           # [m] float64; n = 0: the zero-shot logit
    head.pull_                                                    # the zero-shot prior's share: 1 at k=0, -> 0

The chosen head, `AnchoredLogistic` (docs/fewshot-head.md), is the zero-shot-initialised linear probe of CLAP
(Silva-Rodriguez et al., CVPR 2024) written as a MAP estimate: a logistic regression whose Gaussian prior sits
at the zero-shot head w0 = s (t+ - t-) (prompt_init),

    argmin_{w,b}  sum_i BCE(x_i w + b, y_i) + lam/2 |w - w0|^2          (b unpenalised)

The loss is a SUM over the shots, so the prior is worth `lam` examples and its share is pull = lam / (lam + n).
lam is chosen inside the shots, never on validation or test rows. Below `min_patients_adapt` (64) patients per
class the head is the zero-shot head (pull 1): folds of a dozen patients per class are too noisy to show a gain.
From there, patient-grouped, class-stratified 5-fold cross-validation (3 repeats) scores a grid from the zero-shot
head itself (lam = inf, pull 1) through lam0 x 4^j (256 .. 1/64 with lam0 = 4) to a near-unregularised probe, then
the plain L2 linear probe itself (prior at 0, weight 1 / fewshot.probe_C; pull 0), and the one-standard-error
rule takes the strongest pull whose paired held-out AUROC deficit to the best is within one standard error,
corrected for the overlap of repeated cross-validation (Nadeau & Bengio 2003): small folds are noisy, so a
weaker prior must show a clear gain. A weaker prior is then kept only if
the rule itself, rerun inside each outer grouped fold (nested cross-validation, three outer splits), beats the
zero-shot head on the held-out patients on average: the best of the grid's noisy means is optimistic (Cawley &
Talbot, JMLR 2010). The rule was chosen among the rules compared on the demo's validation
split (docs/fewshot-head.md); its constants are the textbook ones (one SE; three splits as step 2's repeats) and
the patients per class from which it runs (64, of 8 .. 64 compared; the inner rules' 8 kept from the rule before).

The candidates it was compared with (bench/fewshot_heads.py), each adapted to one binary label:
- `AnchoredCV`: the same MAP head with lam in {inf, 4096 .. 1/64} picked by the one-standard-error rule alone.
- `WiseInterpolation`: WiSE-FT (Wortsman et al., CVPR 2022) on the head: the direction (1 - a) w0/|w0| +
  a wp/|wp| between zero-shot and the L2 probe wp, `a` by grouped cross-validation (one-SE rule).
- `ClapHead`: CLAP as published: cosine prototypes initialised at the text prototypes, mean cross-entropy plus
  a per-class L2 penalty toward them weighted by the zero-shot accuracy of that class on the shots.
- `LPPlusPlus`: LP++ (Huang et al., CVPR 2024): logits x w_c + b_c + a_c (x t_c), visual prototypes from the
  class sums, text multipliers from their closed-form init, full-batch steps sized by Lipschitz constants.
- `TipAdapterF`: Tip-Adapter-F (Zhang et al., ECCV 2022): zero-shot logits plus a cache of the shots
  a exp(-b (1 - x k_j)), keys fine-tuned; (a, b) by grouped cross-validation (the paper searched them on the
  evaluation set).
Every head is deterministic given its seed (float64, full batch, seeded folds).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

# scipy's BLAS loads with the module, so one_blas_thread() limits it too
from scipy.linalg.blas import dsyrk
from scipy.linalg.lapack import dposv

from radalign import RadalignError

INF = math.inf
Folds = list[tuple[np.ndarray, np.ndarray]]  # (train rows, held-out rows) per fold


# ----------------------------------------------------------------------------------------------------------
# Inputs


@dataclass
class ZeroShotInit:
    """The zero-shot binary classifier a head starts from."""

    prototypes: np.ndarray
    """[2, D] text prototypes: row 0 the positive prompts' embedding, row 1 the negative prompts'."""
    logit_scale: float
    """The export's logit scale s, as zero-shot classification applies it (zeroshot.classifier.logit_scale_of)."""

    def head(self) -> tuple[np.ndarray, float]:
        """(w0 [D], b0): the zero-shot logit is x w0 + b0 (prompt_init)."""
        p = np.asarray(self.prototypes, np.float64)
        return prompt_init(p[0], p[1], self.logit_scale)

    def logit(self, x) -> np.ndarray:
        """[m] the zero-shot logit of L2-normalised embeddings x [m, D]."""
        w0, b0 = self.head()
        return np.asarray(x, np.float64) @ w0 + b0


def prompt_init(t_pos: np.ndarray, t_neg: np.ndarray, scale: float) -> tuple[np.ndarray, float]:
    """The zero-shot binary classifier as a logistic head on L2-normalised image embeddings:
    softmax([s cos(x, t+), s cos(x, t-)])[0] = sigmoid(x . s (t+ - t-)), so w0 = s (t+ - t-), b0 = 0."""
    t_pos = np.asarray(t_pos, np.float64)
    t_neg = np.asarray(t_neg, np.float64)
    t_pos, t_neg = t_pos / np.linalg.norm(t_pos), t_neg / np.linalg.norm(t_neg)
    return float(scale) * (t_pos - t_neg), 0.0


def check_inputs(x, y, groups, init: ZeroShotInit) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x [n, D] float64, y [n] float64 in {0, 1}, groups [n] str; every problem in one error."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64).reshape(-1)
    groups = np.asarray([str(g) for g in groups])
    protos = np.asarray(init.prototypes)
    problems = []
    if x.ndim != 2:
        problems.append(f"x has shape {x.shape}; pass [n, D] embeddings")
    elif not len(x) == len(y) == len(groups):
        problems.append(f"x has {len(x)} rows, y {len(y)}, groups {len(groups)}; pass one label and one patient "
                        "id per row")
    elif not np.isfinite(x).all():
        problems.append(f"x has a non-finite value in row {int(np.argwhere(~np.isfinite(x))[0, 0])}; drop it")
    if protos.ndim != 2 or protos.shape[0] != 2:
        problems.append(f"init.prototypes has shape {protos.shape}; pass [2, D] (positive row, negative row)")
    elif not np.isfinite(protos).all():
        problems.append("init.prototypes hold a non-finite value (a NaN text embedding?); re-embed the prompts "
                        "with the export")
    elif x.ndim == 2 and protos.shape[1] != x.shape[1]:
        problems.append(f"init.prototypes are {protos.shape[1]}-d but x is {x.shape[1]}-d; use the export that "
                        "embedded x")
    bad = ~np.isin(y, (0.0, 1.0))
    if bad.any():
        problems.append(f"y holds {float(y[bad][0])!r} in row {int(np.argmax(bad))}; labels must be 0 or 1 (drop "
                        "unlabelled rows first)")
    elif len(y) and len(np.unique(y)) < 2:
        problems.append(f"y has only class {int(y[0])}; a few-shot head needs shots of both classes (or none)")
    if not (np.isfinite(init.logit_scale) and init.logit_scale > 0):
        problems.append(f"init.logit_scale is {init.logit_scale!r}; pass the export's positive logit scale")
    if problems:
        raise RadalignError("few-shot head: " + "; ".join(problems))
    return x, y, groups


# ----------------------------------------------------------------------------------------------------------
# Patient-grouped cross-validation inside the shots


def patients_per_class(y: np.ndarray, groups: np.ndarray) -> int:
    """Distinct patients of the rarer class."""
    return min(len(set(groups[y == c])) for c in (0.0, 1.0))


def grouped_folds(y: np.ndarray, groups: np.ndarray, seed: int, max_folds: int = 5) -> Folds:
    """Class-stratified folds by patient (no patient on both sides); [] when a class has fewer than 2 patients.

    min(max_folds, patients of the rarer class) folds, so a held-out fold can hold both classes. Seeded: the
    same shots and seed give the same folds: sklearn's StratifiedGroupKFold(shuffle=True, random_state=seed)."""
    n_folds = min(max_folds, patients_per_class(y, groups))
    if n_folds < 2:
        return []
    fold = _stratified_group_fold_of(y.astype(int), groups, n_folds, seed)  # [n] each row's held-out fold
    return [(np.flatnonzero(fold != i), np.flatnonzero(fold == i)) for i in range(n_folds)]


def _stratified_group_fold_of(y: np.ndarray, groups: np.ndarray, n_splits: int, seed: int) -> np.ndarray:
    """[n] the test fold of each row under sklearn's StratifiedGroupKFold(n_splits, shuffle=True,
    random_state=seed), by its own greedy algorithm and arithmetic, so the folds are the same to the row.

    Why not sklearn's: it scores the candidate folds of each patient in a Python loop, which was a quarter of
    the anchored head's time at k = 64 and all (the nested check splits the shots about 20 times per fit); here
    the candidates are scored at once. tests/test_fewshot_folds.py holds the two equal row for row."""
    _, y_inv, y_cnt = np.unique(y, return_inverse=True, return_counts=True)
    _, g_inv, g_cnt = np.unique(groups, return_inverse=True, return_counts=True)
    n_groups, n_classes = len(g_cnt), len(y_cnt)
    counts = np.zeros((n_groups, n_classes))  # [G, C] rows per patient and class
    np.add.at(counts, (g_inv, y_inv), 1)
    perm = np.arange(n_groups)
    np.random.RandomState(seed).shuffle(perm)  # sklearn's check_random_state(int): the same permutation
    counts = counts[perm]
    inv = np.empty_like(perm)
    inv[perm] = np.arange(n_groups)
    per_fold = np.zeros((n_splits, n_classes))  # [S, C]
    fold_of = np.empty(n_groups, np.intp)
    eye = np.eye(n_splits)[:, :, None]  # [S candidates, S, 1]
    for g in np.argsort(-np.std(counts, axis=1), kind="stable"):  # the least balanced patients first
        trial = (per_fold[None] + eye * counts[g]) / y_cnt  # [S candidates, S, C] the patient put in each fold
        dev = trial - trial.sum(axis=1, keepdims=True) / n_splits  # np.std's own steps, in its order
        evals = (np.sqrt((dev * dev).sum(axis=1) / n_splits).sum(axis=-1) / n_classes).tolist()  # [S] mean std
        sizes = per_fold.sum(1).tolist()
        best, min_eval, min_size = 0, math.inf, math.inf
        for i, (e, size) in enumerate(zip(evals, sizes)):  # sklearn's tie-break: np.isclose, then the smaller fold
            if e < min_eval or (abs(e - min_eval) <= 1e-8 + 1e-5 * abs(min_eval) and size < min_size):
                best, min_eval, min_size = i, e, size
        per_fold[best] += counts[g]
        fold_of[g] = best
    return fold_of[inv[g_inv]]


def repeated_folds(y, groups, seed: int, repeats: int, max_folds: int = 5) -> Folds:
    """`repeats` independent grouped fold splits (seeds seed, seed + 1000, ...), concatenated."""
    return [f for r in range(repeats) for f in grouped_folds(y, groups, seed + 1000 * r, max_folds)]


def held_out_aurocs(folds: Folds, y: np.ndarray, scores_for: Callable) -> np.ndarray:
    """[folds, G] held-out AUROC of each grid point (NaN where a fold holds one class).
    `scores_for(train_rows, test_rows)` returns [G, len(test_rows)] scores of models fitted on train_rows."""
    from radalign.metrics import auroc

    rows = []
    for tr, te in folds:
        s = np.asarray(scores_for(tr, te))  # [G, |te|]
        both = len(np.unique(y[te])) == 2
        rows.append([auroc(y[te].astype(int), r) if both else math.nan for r in s])
    return np.asarray(rows, np.float64)


def _mean_se(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard error over folds (rows) per grid point, NaN folds left out; SE inf below 2 folds."""
    ok = ~np.isnan(a)
    n = ok.sum(0)
    mean = np.where(n > 0, np.nansum(a, 0) / np.maximum(n, 1), -np.inf)
    dev = np.where(ok, a - mean, 0.0)
    se = np.where(n > 1, np.sqrt((dev ** 2).sum(0) / np.maximum(n - 1, 1) / np.maximum(n, 1)), np.inf)
    return mean, se


def one_se_choice(a: np.ndarray) -> int:
    """The first grid point (grids run from the strongest pull) whose mean is within one SE of the best."""
    mean, se = _mean_se(a)
    best = int(np.argmax(mean))
    return int(np.flatnonzero(mean >= mean[best] - (se[best] if np.isfinite(se[best]) else 0.0))[0])


def corrected_one_se_choice(a: np.ndarray, n_folds: int, se_mult: float = 1.0) -> int:
    """The one-standard-error rule toward the prior on paired, corrected standard errors.

    a [J, G]: held-out AUROC of J folds (R repeats of n_folds-fold splits) x G grid points, ordered from the
    strongest pull. The first grid point g whose mean deficit to the best, d_j = a[j, best] - a[j, g] paired over
    folds, is at most se_mult x sd(d) sqrt(1/J + 1/(n_folds - 1)): the variance of a mean over repeated K-fold
    estimates, corrected for their overlapping training sets (Nadeau & Bengio 2003; Bouckaert & Frank 2004); the
    naive sd/sqrt(J) counts repeats as new data and lets noise pull the head off its prior. Folds holding one class
    (NaN) are left out; below 2 usable folds, grid point 0."""
    a = a[~np.isnan(a).any(1)] if a.size else a
    if len(a) < 2 or n_folds < 2:
        return 0
    mean = a.mean(0)
    best = int(np.argmax(mean))
    for g in range(a.shape[1]):
        d = a[:, best] - a[:, g]  # [J] paired deficit of g
        if d.mean() <= se_mult * d.std(ddof=1) * math.sqrt(1 / len(d) + 1 / (n_folds - 1)):
            return g
    return best


def shots_seed(y: np.ndarray, groups: np.ndarray) -> int:
    """A fold seed from the shots themselves (their labels and patients, in order): a head seeded by it is a
    function of its shots alone, so the same rows drawn under another seed need no second fit. Not from the
    embeddings' bytes: two embedding passes of the same films differ in the last bits (thread count, instruction
    set), and other folds would change the chosen pull at small k."""
    import hashlib

    h = hashlib.sha256(np.ascontiguousarray(y, np.float64).tobytes())
    h.update("\n".join(map(str, groups)).encode())
    return int.from_bytes(h.digest()[:4], "little")


# ----------------------------------------------------------------------------------------------------------
# MAP logistic regression with a Gaussian prior (damped Newton, float64)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -z))


def _gram(a: np.ndarray) -> np.ndarray:
    """a.T @ a [P, P] by a symmetric rank-k update (BLAS syrk: half the multiplications of a matrix product)."""
    upper = dsyrk(1.0, np.asarray(a, np.float64).T, trans=0, lower=0)  # a.T is Fortran-ordered: no copy
    full = upper + upper.T  # the lower triangle is f2py's zero fill (syrk writes the upper only): mirrored,
    np.fill_diagonal(full, np.diagonal(upper))  # but the diagonal doubled, so it is put back
    return full


def _spd_solve(h: np.ndarray, g: np.ndarray) -> np.ndarray:
    """h^-1 g for a symmetric positive definite h (the prior makes the Hessian so): Cholesky, by LAPACK's posv
    (potrf then potrs, the routines scipy's cho_factor and cho_solve call, without their checks' overhead)."""
    _, x, info = dposv(h, g[:, None])
    if info:
        raise np.linalg.LinAlgError(f"the Hessian is not positive definite (LAPACK dposv info {info})")
    return x[:, 0]


def map_newton(xa: np.ndarray, y: np.ndarray, centre: np.ndarray, prec: np.ndarray, *,
               start: np.ndarray | None = None, max_iter: int = 100, tol: float = 1e-14) -> np.ndarray:
    """argmin_t sum_i BCE(xa_i t, y_i) + 1/2 sum_j prec_j (t_j - centre_j)^2.

    Strictly convex when every prec_j > 0, so damped Newton (Armijo backtracking) reaches the unique minimum
    from any start; `start` warm-starts a path over the prior strength."""
    def objective(t):
        z = xa @ t
        return float(np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * np.sum(prec * (t - centre) ** 2))

    theta = centre.copy() if start is None else np.asarray(start, np.float64).copy()
    f = objective(theta)
    for _ in range(max_iter):
        p = _sigmoid(xa @ theta)
        g = xa.T @ (p - y) + prec * (theta - centre)
        step = _spd_solve(_gram(xa * np.sqrt(p * (1 - p))[:, None]) + np.diag(prec), g)  # Hessian [P, P] \ g
        dec = float(g @ step)  # squared Newton decrement
        if dec / 2 < tol:  # absolute: the distance to the optimum is about sqrt(dec / smallest eigenvalue)
            break
        t = 1.0
        while True:
            cand = theta - t * step
            fc = objective(cand)
            if fc <= f - 0.25 * t * dec or t < 1e-10:
                break
            t *= 0.5
        theta, f = cand, fc
    return theta


def fit_anchored(x: np.ndarray, y: np.ndarray, w0: np.ndarray, lam: float, *,
                 start: np.ndarray | None = None) -> np.ndarray:
    """(w, b) [D + 1] = argmin sum_i BCE(x_i w + b, y_i) + lam/2 |w - w0|^2, b unpenalised."""
    n, d = x.shape
    xa = np.hstack([x, np.ones((n, 1))])  # [n, D+1]
    centre = np.r_[np.asarray(w0, np.float64), 0.0]
    prec = np.r_[np.full(d, float(lam)), 1e-9]  # a whisper on b keeps the Hessian invertible on separable shots
    return map_newton(xa, y, centre, prec, start=start)


def anchored_path(x: np.ndarray, y: np.ndarray, w0: np.ndarray, lams: Sequence[float]) -> list[np.ndarray]:
    """(w, b) for each lam in order (inf: the zero-shot head itself), each fit warm-started from the last."""
    out, start = [], None
    for lam in lams:
        if math.isinf(lam):
            out.append(np.r_[w0, 0.0])
            continue
        start = fit_anchored(x, y, w0, lam, start=start)
        out.append(start)
    return out


def _path_scores(x, y, w0, lams) -> Callable:
    def scores(tr, te):
        return [x[te] @ t[:-1] + t[-1] for t in anchored_path(x[tr], y[tr], w0, lams)]
    return scores


def one_blas_thread():
    """A context with one BLAS thread. The heads solve [D+1, D+1] systems thousands of times: threads do not
    pay there, and OpenBLAS's spin-waiting threads on shared, busy cores cost 10-30x the CPU time."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


# ----------------------------------------------------------------------------------------------------------
# Heads


@dataclass
class FewshotHead:
    """Base: fit(x, y, groups, init, seed) -> self; predict_logit(x) -> [m] float64; pull_ in [0, 1]."""

    name = "head"
    seed_free = False  # True: fit() ignores `seed` (a function of the shots alone; few-shot sweeps reuse it)
    w_: np.ndarray | None = field(default=None, repr=False)
    """[D] fitted weights (the head's logit is x w_ + b_); None before fit."""
    b_: float = 0.0
    """Fitted intercept."""
    pull_: float = 1.0
    """The zero-shot prior's share of the fit: 1 = zero-shot, 0 = nothing pulls toward it (NaN: no such term)."""
    info_: dict = field(default_factory=dict)
    """What was chosen and why: n, the hyper-parameter, the held-out AUROC per grid point."""
    folds_: Folds = field(default_factory=list, repr=False)
    """The grouped folds the inner cross-validation used (empty when it did not run)."""

    def fit(self, x, y, groups, init: ZeroShotInit, seed: int = 0) -> FewshotHead:
        x, y, groups = check_inputs(x, y, groups, init)
        self.w_, self.b_ = init.head()
        self.pull_, self.info_, self.folds_ = 1.0, {"n": len(y)}, []
        if len(y):
            with one_blas_thread():
                self._fit(x, y, groups, init, seed)
        return self

    def _fit(self, x, y, groups, init: ZeroShotInit, seed: int) -> None:
        """Override: set w_, b_, pull_, info_ from n >= 2 shots of both classes."""

    def predict_logit(self, x) -> np.ndarray:
        if self.w_ is None:
            raise RadalignError(f"few-shot head {self.name}: predict_logit before fit; call fit(x, y, groups, init)")
        return np.asarray(x, np.float64) @ self.w_ + self.b_


@dataclass
class ZeroShotHead(FewshotHead):
    """The prompt classifier itself (the shots are ignored): the k=0 point of every curve."""

    name = "zero_shot"
    seed_free = True


@dataclass
class AnchoredLogistic(FewshotHead):
    """MAP logistic regression with its prior at the zero-shot head; the prior's weight lam chosen inside the shots
    by patient-grouped cross-validation over a grid from the zero-shot head itself (lam = inf, pull 1) to a
    near-unregularised probe, with the one-standard-error rule toward the prior (the chosen head)."""

    name = "anchored"
    seed_free = True  # its folds are seeded by the shots (shots_seed), never by `seed`
    lam0: float = 4.0
    """Scale of the grid of finite prior weights (in examples): lam0 x 4^j for j = 3 .. -4 (64 lam0 .. lam0/256)."""
    lams: Sequence[float] | None = None
    """The finite prior weights tried beside inf (the zero-shot head); None: the lam0 grid above."""
    se_mult: float = 1.0
    """A weaker prior is taken only when the strongest one's mean held-out AUROC is more than se_mult corrected
    standard errors of the paired difference below the best (1: the one-standard-error rule)."""
    min_patients_cv: int = 8
    """Patients per class below which the rule (`choose`) runs no cross-validation and picks the zero-shot head;
    the nested check's inner rules, on four fifths of the shots, use it too."""
    min_patients_adapt: int = 64
    """Patients per class below which the head is the zero-shot head (pull 1), with no cross-validation at all:
    held-out folds of a dozen patients per class cannot tell a gain of a few hundredths from noise (Varoquaux,
    "Cross-validation failure: small sample sizes lead to large error bars", NeuroImage 2018), and on the demo's
    validation split the rule misses fewer cells held to 64 than to 8 (docs/fewshot-head.md). 8 (=
    min_patients_cv) is the rule until session 11."""
    repeats: int = 3
    """Independent grouped K-fold splits whose held-out AUROCs are pooled (1 from `one_repeat_above`)."""
    one_repeat_above: int = 256
    """Patients per class from which one split is enough (and three would be slow)."""
    max_folds: int = 5
    """Folds per split (fewer when a class has fewer patients)."""
    nested: bool = True
    """Keep a weaker prior than zero-shot only when the rule itself, run again inside each outer grouped fold of
    the shots (nested cross-validation: its own inner folds and choice, refitted there), beats the zero-shot head on
    the held-out patients (`nested_gains`). The inner table's best of its grid's noisy means is optimistic
    (Varma & Simon 2006; Cawley & Talbot, JMLR 2010); about 5 x nested_repeats x the fits where it runs."""
    nested_repeats: int = 3
    """Independent outer grouped splits of the nested check (seeds shots_seed + 7, + 1007, ...), pooled."""
    nested_se_mult: float = 0.0
    """The nested gains' mean must exceed nested_se_mult naive standard errors (0: a positive mean)."""
    probe_lam: float | None = 1.0
    """Also try the plain linear probe (its prior at 0, not at zero-shot, of weight probe_lam: sklearn's
    LogisticRegression(C = 1 / probe_lam), the recipe's `linear_probe` at fewshot.probe_C = 1 / probe_lam) as the
    grid's weakest point; None: the grid toward zero-shot only (the rule until 2026-12-06, session 10)."""

    def grid(self) -> list[float]:
        """Prior weights from the strongest pull: inf (the zero-shot head), then the finite ones, decreasing."""
        lams = [self.lam0 * 4.0 ** j for j in range(3, -5, -1)] if self.lams is None else list(self.lams)
        bad = [v for v in [self.lam0, *lams] if not (0 < v < INF)]
        if bad:
            raise RadalignError(f"anchored head: prior weight {bad[0]!r}; lam0 and lams must be finite and > 0 "
                                "(inf, the zero-shot head, is always in the grid)")
        return [INF, *sorted(set(lams), reverse=True)]

    def candidates(self, w0) -> list[tuple[float, np.ndarray]]:
        """(prior weight, prior centre) per column of the table: the grid toward w0 (inf: the zero-shot head), then
        the linear probe (centre 0) when probe_lam is set."""
        out = [(lam, np.asarray(w0, np.float64)) for lam in self.grid()]
        if self.probe_lam is not None:
            if not (isinstance(self.probe_lam, (int, float)) and 0 < self.probe_lam < INF):
                raise RadalignError(f"anchored head: probe_lam {self.probe_lam!r}; use a finite number > 0 "
                                    "(1 / fewshot.probe_C) or None (no probe in the grid)")
            out.append((float(self.probe_lam), np.zeros_like(out[0][1])))
        return out

    def cv_table(self, x, y, groups, w0) -> tuple[np.ndarray, int]:
        """Held-out AUROCs [folds, grid] of the grid's fits inside the shots, and the folds per split (K); sets
        `folds_`. Folds are seeded by the shots, not the draw: the same shots (every seed at k=all) give the same
        table. Empty when a class has fewer than 2 patients (no grouped fold exists)."""
        npc = patients_per_class(y, groups)
        repeats = 1 if npc >= self.one_repeat_above else self.repeats
        self.folds_ = repeated_folds(y, groups, shots_seed(y, groups), repeats, self.max_folds) if npc >= 2 else []
        if not self.folds_:
            return np.zeros((0, len(self.candidates(w0)))), 0
        return held_out_aurocs(self.folds_, y, self._scores(x, y, w0)), len(self.folds_) // repeats

    def _scores(self, x, y, w0) -> Callable:
        """scores(train rows, held-out rows) -> [candidates, |held-out|]: the grid's path, then the probe."""
        path, extra = _path_scores(x, y, w0, self.grid()), self.candidates(w0)[len(self.grid()):]

        def scores(tr, te):
            return [*path(tr, te), *(x[te] @ t[:-1] + t[-1] for t in
                                     (fit_anchored(x[tr], y[tr], c, lam) for lam, c in extra))]
        return scores

    def choose(self, x, y, groups, w0) -> tuple[int, np.ndarray]:
        """(the rule's column of `candidates` (0: the zero-shot head), its cross-validation table [folds,
        candidates]; empty below min_patients_cv)."""
        if patients_per_class(y, groups) < self.min_patients_cv:
            return 0, np.zeros((0, len(self.candidates(w0))))
        a, n_folds = self.cv_table(x, y, groups, w0)
        return corrected_one_se_choice(a, n_folds, self.se_mult), a

    def fit_candidate(self, x, y, w0, i: int) -> np.ndarray:
        """(w, b) [D + 1] of column i of `candidates` fitted on (x, y); column 0 is the zero-shot head."""
        lam, centre = self.candidates(w0)[i]
        return np.r_[w0, 0.0] if math.isinf(lam) else fit_anchored(x, y, centre, lam)

    def nested_gains(self, x, y, groups, w0) -> np.ndarray:
        """[outer folds] held-out AUROC of the rule run and refitted on each outer fold's training part alone,
        minus the zero-shot head's (0 where the rule keeps zero-shot there); folds holding one class left out.
        Outer folds: `nested_repeats` grouped splits seeded by the shots (shots_seed + 7, apart from the inner ones)."""
        from radalign.metrics import auroc

        if not (isinstance(self.nested_repeats, int) and self.nested_repeats >= 1):
            raise RadalignError(f"anchored head: nested_repeats {self.nested_repeats!r}; use an integer >= 1")
        if not (isinstance(self.nested_se_mult, (int, float)) and 0 <= self.nested_se_mult < INF):
            raise RadalignError(f"anchored head: nested_se_mult {self.nested_se_mult!r}; use a finite number >= 0 "
                                "(0: keep the weaker prior on a positive mean gain)")
        out, inner = [], replace(self, nested=False, info_={}, folds_=[])  # this head keeps its own folds_
        for tr, te in repeated_folds(y, groups, shots_seed(y, groups) + 7, self.nested_repeats, self.max_folds):
            if len(np.unique(y[te])) < 2:
                continue
            i, _ = inner.choose(x[tr], y[tr], groups[tr], w0)
            if i == 0:
                out.append(0.0)
                continue
            theta = inner.fit_candidate(x[tr], y[tr], w0, i)
            yt = y[te].astype(int)
            out.append(auroc(yt, x[te] @ theta[:-1] + theta[-1]) - auroc(yt, x[te] @ w0))
        return np.asarray(out, np.float64)

    def _fit(self, x, y, groups, init, seed) -> None:
        w0, _ = init.head()
        cands, n_grid, npc = self.candidates(w0), len(self.grid()), patients_per_class(y, groups)
        if not (isinstance(self.min_patients_adapt, int) and self.min_patients_adapt >= 0):
            raise RadalignError(f"anchored head: min_patients_adapt {self.min_patients_adapt!r}; use an integer "
                                ">= 0 (patients per class below which the head stays zero-shot)")
        if npc < self.min_patients_adapt:  # too few patients to tell a gain from noise: no table, no fit
            i, a = 0, np.zeros((0, len(cands)))
        else:
            i, a = self.choose(x, y, groups, w0)
        self.info_["cv_lam"] = cands[i][0]  # the one-SE rule's choice, before the nested check
        if len(a):
            names = [str(lam) if j < n_grid else "probe" for j, (lam, _) in enumerate(cands)]
            self.info_["cv_auroc"] = dict(zip(names, _mean_se(a)[0].tolist()))
        if self.nested and i:
            d = self.nested_gains(x, y, groups, w0)
            se = d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else math.inf
            self.info_["nested_gain"] = {"mean": float(d.mean()) if len(d) else None, "se": se, "folds": len(d)}
            if not (len(d) > 1 and d.mean() > self.nested_se_mult * se):
                i = 0  # the rule's gain over zero-shot does not survive its own selection
        lam = cands[i][0]
        if i:
            theta = self.fit_candidate(x, y, w0, i)
            self.w_, self.b_ = theta[:-1], float(theta[-1])
            self.pull_ = lam / (lam + len(y)) if i < n_grid else 0.0  # the probe: no pull to zero-shot
        self.info_.update(lam=lam, prior="zero_shot" if i < n_grid else "zero", patients_per_class=npc)


@dataclass
class AnchoredCV(FewshotHead):
    """The same MAP head, lam from {inf (zero-shot), 4096 .. 1/64} by the one-standard-error rule alone."""

    name = "anchored_cv"
    lams: Sequence[float] = field(default_factory=lambda: [INF] + [2.0 ** e for e in range(12, -7, -1)])
    """Prior strengths, in examples (inf keeps the zero-shot head)."""
    max_folds: int = 5
    """Folds of the grouped split (fewer when a class has fewer patients)."""

    def _fit(self, x, y, groups, init, seed) -> None:
        w0, _ = init.head()
        self.folds_ = grouped_folds(y, groups, seed, self.max_folds)
        if not self.folds_:
            self.info_["lam"] = INF
            return
        grid = sorted(self.lams, reverse=True)
        lam = grid[one_se_choice(held_out_aurocs(self.folds_, y, _path_scores(x, y, w0, grid)))]
        self.info_["lam"] = lam
        if not math.isinf(lam):
            theta = fit_anchored(x, y, w0, lam)
            self.w_, self.b_ = theta[:-1], float(theta[-1])
            self.pull_ = lam / (lam + len(y))


def _probe_weights(x, y, C: float, seed: int) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=C, max_iter=5000, random_state=seed).fit(x, y.astype(int))
    return clf.coef_[0].astype(np.float64)


def _unit(v: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v


def _rows_unit(a: np.ndarray) -> np.ndarray:
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


@dataclass
class WiseInterpolation(FewshotHead):
    """WiSE-FT on the head: w = |w0| ((1 - a) w0/|w0| + a wp/|wp|), wp the L2 probe; `a` by grouped CV."""

    name = "wise"
    alphas: Sequence[float] = field(default_factory=lambda: [i / 10 for i in range(11)])
    """Mixing weights tried, from zero-shot (0) to the probe (1)."""
    C: float = 1.0
    """The probe's inverse L2 strength (sklearn C), as today's linear_probe."""
    max_folds: int = 5
    """Folds of the grouped split."""

    def _fit(self, x, y, groups, init, seed) -> None:
        w0, _ = init.head()
        u0 = _unit(w0)
        self.folds_ = grouped_folds(y, groups, seed, self.max_folds)
        if not self.folds_:
            self.info_["alpha"] = 0.0
            return
        alphas = sorted(self.alphas)

        def scores(tr, te):
            up = _unit(_probe_weights(x[tr], y[tr], self.C, seed))
            return [x[te] @ ((1 - a) * u0 + a * up) for a in alphas]
        a = alphas[one_se_choice(held_out_aurocs(self.folds_, y, scores))]
        up = _unit(_probe_weights(x, y, self.C, seed))
        self.w_, self.b_ = float(np.linalg.norm(w0)) * ((1 - a) * u0 + a * up), 0.0
        self.pull_ = 1.0 - a
        self.info_["alpha"] = a


@dataclass
class ClapHead(FewshotHead):
    """CLAP: class prototypes W [2, D] initialised at the unit text prototypes T; logits s x W^/|W| (cosine);
    loss mean CE + mean_c alpha_c |W_c - T_c|^2 with alpha_c the mean zero-shot softmax probability of class c
    on its own shots (the paper's initial multipliers). Full-batch L-BFGS to the optimum."""

    name = "clap"

    def _fit(self, x, y, groups, init, seed) -> None:
        t = torch.as_tensor(_rows_unit(np.asarray(init.prototypes, np.float64)[[1, 0]]))  # [2, D] class 0, 1
        xt = torch.as_tensor(_rows_unit(x))
        yt = torch.as_tensor(y.astype(np.int64))
        s = float(init.logit_scale)
        with torch.no_grad():
            p0 = torch.softmax(s * xt @ t.T, dim=1)  # [n, 2] zero-shot probabilities
            alpha = torch.stack([p0[yt == c, c].mean() for c in (0, 1)])  # [2]
        w = t.clone().requires_grad_(True)

        def loss():
            logits = s * xt @ torch.nn.functional.normalize(w, dim=1).T  # [n, 2]
            return torch.nn.functional.cross_entropy(logits, yt) + (alpha * ((w - t) ** 2).sum(1)).mean()
        opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe", tolerance_grad=1e-9,
                                tolerance_change=1e-12)

        def closure():
            opt.zero_grad()
            value = loss()
            value.backward()
            return value
        opt.step(closure)
        wn = torch.nn.functional.normalize(w.detach(), dim=1).numpy()
        self.w_, self.b_ = s * (wn[1] - wn[0]), 0.0  # class-1 minus class-0 logit of a unit x
        self.pull_ = float(alpha.mean())  # a constraint weight against a MEAN loss: it does not shrink with k
        self.info_["alpha"] = alpha.tolist()

    def predict_logit(self, x) -> np.ndarray:
        if not self.info_.get("n"):  # no shots: the zero-shot logit exactly, as every head
            return super().predict_logit(x)
        return super().predict_logit(_rows_unit(np.asarray(x, np.float64)))


@dataclass
class LPPlusPlus(FewshotHead):
    """LP++: logits_c = x w_c + b_c + a_c (x t_c); w starts at the class sums of the shots, a at 250 times the
    mean class-centroid text logit (the authors' 250/k x mean(centroid x k): k cancels); `steps` full-batch steps
    of size 4n / lambda_max(X'X) for (w, b) (momentum 0.9) and n / (4 max_c sum_i (x_i t_c)^2) for a (every 10
    steps), as the authors' code."""

    name = "lppp"
    steps: int = 300
    """Full-batch optimisation steps (the paper's 300 epochs)."""

    def _fit(self, x, y, groups, init, seed) -> None:
        n = len(y)
        xt = torch.as_tensor(x)
        yt = torch.as_tensor(y.astype(np.int64))
        t = torch.as_tensor(_rows_unit(np.asarray(init.prototypes, np.float64)[[1, 0]]))  # [2, D]
        onehot = torch.nn.functional.one_hot(yt, 2).double()  # [n, 2]
        text = xt @ t.T  # [n, 2] text logits
        w = (onehot.T @ xt).requires_grad_(True)  # [2, D] class sums
        b = torch.zeros(2, dtype=torch.float64, requires_grad=True)
        centroid_text = (onehot.T @ text) / onehot.sum(0)[:, None]  # [2, 2]
        a = torch.full((2,), float(250 * centroid_text.mean()), dtype=torch.float64,
                       requires_grad=True)
        lr_w = 4 * n / float(np.linalg.eigvalsh(x.T @ x).max())
        lr_a = n / (4 * float((text ** 2).sum(0).max()))
        opt = torch.optim.SGD([w, b], lr=lr_w, momentum=0.9)
        for step in range(self.steps):
            loss = torch.nn.functional.cross_entropy(xt @ w.T + b + a * text, yt)
            opt.zero_grad()
            a.grad = None
            loss.backward()
            opt.step()
            if (step + 1) % 10 == 0:
                with torch.no_grad():
                    a -= lr_a * a.grad
        wd, ad, tn = w.detach().numpy(), a.detach().numpy(), t.numpy()
        self.w_ = (wd[1] + ad[1] * tn[1]) - (wd[0] + ad[0] * tn[0])
        self.b_ = float(b[1] - b[0])
        self.pull_ = math.nan  # no penalty toward zero-shot: the text multipliers are learnt
        self.info_["text_multipliers"] = ad.tolist()


@dataclass
class TipAdapterF(FewshotHead):
    """Tip-Adapter-F: logit = x w0 + a sum_j exp(-b (1 - x k_j)) (2 y_j - 1) on unit x, keys k starting at the
    shots and fine-tuned (AdamW lr 1e-3, `epochs` full-batch steps); (a, b) by grouped CV on the training-free
    cache (best mean held-out AUROC)."""

    name = "tip_f"
    alphas: Sequence[float] = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
    """Cache weights tried (0: zero-shot)."""
    betas: Sequence[float] = (1.0, 3.0, 5.5, 8.0)
    """Cache sharpness tried."""
    epochs: int = 20
    """Key fine-tuning steps (the paper's 20 epochs)."""
    max_folds: int = 5
    """Folds of the grouped split."""
    cache_: tuple | None = field(default=None, repr=False)
    """(keys [n, D], signed labels [n], a, b) after fit; None: zero-shot."""

    def fit(self, x, y, groups, init: ZeroShotInit, seed: int = 0) -> TipAdapterF:
        self.cache_ = None
        return super().fit(x, y, groups, init, seed)

    def _fit(self, x, y, groups, init, seed) -> None:
        xu = _rows_unit(x)
        self.folds_ = grouped_folds(y, groups, seed, self.max_folds)
        if not self.folds_:
            return
        grid = [(a, b) for a in sorted(self.alphas) for b in self.betas]

        def scores(tr, te):
            return [self._cache_logit(xu[te], (xu[tr], 2 * y[tr] - 1, a, b)) for a, b in grid]
        a_cv = held_out_aurocs(self.folds_, y, scores)
        a, b = grid[int(np.argmax(_mean_se(a_cv)[0]))]
        self.info_.update(alpha=a, beta=b)
        if a > 0:
            self.cache_ = (self._finetune(xu, y, a, b, seed), 2 * y - 1, a, b)
            self.pull_ = 1.0 / (1.0 + a)

    def _cache_logit(self, xq: np.ndarray, cache) -> np.ndarray:
        keys, signs, a, b = cache
        z0 = xq @ self.w_
        return z0 if a == 0 else z0 + a * np.exp(-b * (1 - xq @ keys.T)) @ signs  # [m]

    def _finetune(self, xu, y, a, b, seed) -> np.ndarray:
        torch.manual_seed(seed)
        xt = torch.as_tensor(xu)
        keys = xt.clone().requires_grad_(True)
        z0 = xt @ torch.as_tensor(self.w_)
        signs, target = torch.as_tensor(2 * y - 1), torch.as_tensor(y)
        opt = torch.optim.AdamW([keys], lr=1e-3, weight_decay=0.01)
        for _ in range(self.epochs):
            z = z0 + a * torch.exp(-b * (1 - xt @ keys.T)) @ signs
            loss = torch.nn.functional.binary_cross_entropy_with_logits(z, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return keys.detach().numpy()

    def predict_logit(self, x) -> np.ndarray:
        if self.cache_ is None:
            return super().predict_logit(x)
        return self._cache_logit(_rows_unit(np.asarray(x, np.float64)), self.cache_)


HEADS: dict[str, type[FewshotHead]] = {h.name: h for h in (ZeroShotHead, AnchoredLogistic, AnchoredCV,
                                                             WiseInterpolation, ClapHead, LPPlusPlus, TipAdapterF)}


def anchored_head(lam0: float = 4.0, probe_C: float = 1.0,
                  min_patients_adapt: int = AnchoredLogistic.min_patients_adapt) -> AnchoredLogistic:
    """The chosen head, its grid of finite prior weights scaled by lam0 (fewshot.lam0), its probe candidate the
    recipe's linear probe (fewshot.probe_C), its floor fewshot.min_patients_adapt."""
    return AnchoredLogistic(lam0=lam0, probe_lam=1.0 / probe_C, min_patients_adapt=min_patients_adapt)


def make_head(name: str, **options) -> FewshotHead:
    """A head by name (HEADS), with dataclass options."""
    if name not in HEADS:
        raise RadalignError(f"few-shot head {name!r}: unknown; use one of {', '.join(HEADS)}")
    return HEADS[name](**options)
