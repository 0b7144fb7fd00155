"""Exact attribution inside the EHR token: what in the record (age, sex, each lab's value or its absence)
carried the EHR modality's Shapley value.

    att = ehr_attribution(net, batch, modalities, groups=ehr_groups(featurizer, frame_row))
    att.groups      # [GroupValue] ranked by |value|: name, shown ("1.3 (8.5 h before the film)", "absent"), value
    att.record      # the step from "EHR masked" to "EHR present, nothing known"
    att.total       # record + sum of the groups == the EHR modality's Shapley value (logit)

The game. The players of the EHR modality are its feature groups: each lab (its value, its hours since drawn
and its measured flag together), age, and each categorical demographic (sex, race, insurance, marital status,
language). A group is *removed* by showing it the way an unknown one enters the model: a lab as "not measured"
(the encoder's learned not-measured token; value and hours slots zeroed), age as unknown, a category as index 0
(unknown). v(R, T) is the fusion logit with the other modalities R kept (the rest masked by their mask tokens,
as for the modality Shapley values) and the EHR present with only the groups T known.

Consistency. Owen's coalitional value needs "every EHR group removed" to equal "EHR modality masked". It does not
hold for the fusion model: the EHR token of a record with nothing known (the encoder's output) differs from the
EHR mask token. (The data pipeline never shows the model such a record: `EHRFeatures.present` is False when
nothing is known, so it is masked.) So the record enters first and its groups after it: inside the EHR union
the orderings are those with the record first (Shapley values under a precedence constraint, Faigle and Kern
1992), and the modalities enter in random order with the EHR's players contiguous (Owen 1977). Then

    record = sum_R  w_m(|R|) [v(R, {}) - f(R)]                       f(R): EHR masked
    phi_g  = sum_R  w_m(|R|) sum_{T not containing g} w_n(|T|) [v(R, T + g) - v(R, T)]
    w_k(s) = s! (k - s - 1)! / k!     (m unions: the modalities present; n groups: the known ones)

and record + sum_g phi_g = sum_R w_m(|R|) [f(R + ehr) - f(R)], the EHR modality's Shapley value, exactly. A group
the model ignores gets 0; for a model linear in the groups, phi_g is its coefficient times (value - unknown).

An absent lab or an unknown demographic is the same as its removed state: a null player, 0 exactly, so it is
left out of the enumeration (shown as "absent"/"unknown" with value 0). What the absence of labs contributes is
in `record`: the record with every lab not measured and every demographic unknown, against no record. Cost:
2^(m-1) x 2^n forward passes for n players, batched.

Coarsening. Above MAX_GROUPS known groups the players become sets of groups that enter (and are removed)
together, merged in this order, each step only while there are more than MAX_GROUPS players (`COARSENING`):
the categorical demographics as "demographics", the vital signs as "vital signs", the labs as "labs", age into
"demographics". The formulas above hold unchanged with n = the number of players (a partition of the known
groups, the record still first): still exact, still summing to the EHR modality's value. A merged player's value
is the Owen value of the game in which its groups move together, not the sum of their values in the finer game.
Refused (TooManyGroups) only when even the coarsest partition (demographics with age, vital signs, labs: up to 3
players) has more than MAX_GROUPS players, i.e. MAX_GROUPS set below 3.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from radalign import RadalignError
from radalign.report import finite_or_none


class TooManyGroups(RadalignError):
    """More players than MAX_GROUPS even after every coarsening step: refused (the explanation says why)."""


MAX_GROUPS = 16  # players: 2^16 x 2^(m-1) forward passes of the fusion model (batched)
CHUNK = 4096  # rows per forward pass
EHR = "ehr"
# How a demographic column reads (MIMIC-IV's `gender` is the recorded sex).
DEMOGRAPHIC_NAMES = {"gender": "sex", "marital_status": "marital status"}


# ----------------------------------------------------------------------------------------------------------
# The groups and how one is removed


@dataclass(frozen=True)
class EHRGroup:
    """One player inside the EHR token: which slot of the model's "ehr" input it owns and how it reads."""

    name: str
    """how the group reads ("age", "sex", "creatinine")"""
    kind: str
    """"lab" (value, hours and measured flag), "numeric" (age) or "categorical" (index 0 = unknown)"""
    index: int
    """its column in the input's `measured`/`values` (lab), `num` (numeric) or `cat` (categorical)"""
    shown: str = ""
    """its value for this study as a clinician reads it ("1.3 (8.5 h before the film)", "F", "absent")"""
    vital: bool = False
    """a vital sign (icu/chartevents) rather than a lab (hosp/labevents): read only by the coarsening"""


def ehr_groups(features: Sequence[str], numeric: Sequence[str], categorical: Sequence[str],
               row: Mapping | None = None, vitals: Sequence[str] = ()) -> list[EHRGroup]:
    """The EHR encoder's groups, in its token order: each lab feature, each numeric and each categorical
    demographic; `row` (a finetune-table row) gives the values shown; `vitals`: the features that are vital
    signs."""
    row = row or {}
    groups = [EHRGroup(f, "lab", i, _lab_shown(row.get(f), row.get(f"{f}_hours")), vital=f in set(vitals))
              for i, f in enumerate(features)]
    groups += [EHRGroup(DEMOGRAPHIC_NAMES.get(c, c), "numeric", i, _shown(row.get(c)))
               for i, c in enumerate(numeric)]
    groups += [EHRGroup(DEMOGRAPHIC_NAMES.get(c, c), "categorical", i, _shown(row.get(c)))
               for i, c in enumerate(categorical)]
    return groups


def _shown(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)) or not str(v).strip():
        return "unknown"
    x = finite_or_none(v)
    return f"{x:g}" if x is not None and not isinstance(v, str) else str(v)


def _lab_shown(value, hours) -> str:
    x, h = finite_or_none(value), finite_or_none(hours)
    if x is None:
        return "absent"
    return f"{x:g}" + (f" ({h:.1f} h before the film)" if h is not None else "")


def known_groups(groups: Sequence[EHRGroup], ehr: Mapping[str, torch.Tensor]) -> list[bool]:
    """Whether each group is known for row 0 of the model's "ehr" input (a lab measured, age known, a category
    not 0): the ones that are not are their own removed state (null players)."""
    slot = {"lab": ("measured", bool), "numeric": ("num_known", bool), "categorical": ("cat", int)}
    out = []
    for g in groups:
        key, kind = slot[g.kind]
        x = ehr.get(key)
        if x is None or g.index >= x.shape[1]:
            raise RadalignError(f"EHR group {g.name!r} ({g.kind} #{g.index}): the model's EHR input has no "
                                f"{key!r} column {g.index}; the groups must come from the run's featurizer")
        out.append(bool(kind(x[0, g.index])))
    return out


def remove_groups(ehr: Mapping[str, torch.Tensor], groups: Sequence[EHRGroup], keep: torch.Tensor) -> dict:
    """The "ehr" input repeated for each row of `keep` [N, n] bool, each group not kept shown as unknown: a lab
    not measured, a numeric demographic unknown, a category 0 (how a missing value enters the model)."""
    n_rows = keep.shape[0]
    out = {k: v[:1].expand(n_rows, *v.shape[1:]).clone() for k, v in ehr.items()}  # [N, ...] each
    for j, g in enumerate(groups):
        drop = ~keep[:, j]  # [N]
        if g.kind == "lab":
            out["measured"][drop, g.index] = False
            out["values"][drop, g.index] = 0.0
            out["hours"][drop, g.index] = 0.0
        elif g.kind == "numeric":
            out["num_known"][drop, g.index] = False
            out["num"][drop, g.index] = 0.0
        else:
            out["cat"][drop, g.index] = 0
    return out


# ----------------------------------------------------------------------------------------------------------
# The players: the known groups, or a coarser partition of them


@dataclass(frozen=True)
class Player:
    """One player of the EHR union: a known group, or several known groups that enter and leave together."""

    name: str
    """the group's name, or the merged set's ("demographics", "vital signs", "labs")"""
    members: tuple[EHRGroup, ...]
    """the groups it holds (in token order); one for an unmerged group"""

    @property
    def merged(self) -> bool:
        return len(self.members) > 1

    @property
    def kind(self) -> str:
        return "merged" if self.merged else self.members[0].kind

    @property
    def shown(self) -> str:
        """A merged player reads as its members and their values ("sex F; race WHITE; ...")."""
        return "; ".join(f"{g.name} {g.shown}" for g in self.members) if self.merged else self.members[0].shown


def singletons(groups: Sequence[EHRGroup]) -> list[Player]:
    return [Player(g.name, (g,)) for g in groups]


# (name of the merged player, what the step merges, which groups belong): applied in this order, each only while
# the players outnumber MAX_GROUPS; a step merges every current player whose groups all belong (two or more).
COARSENING: tuple[tuple[str, str, Callable[[EHRGroup], bool]], ...] = (
    ("demographics", "the categorical demographics", lambda g: g.kind == "categorical"),
    ("vital signs", "the vital signs", lambda g: g.kind == "lab" and g.vital),
    ("labs", "the labs", lambda g: g.kind == "lab" and not g.vital),
    ("demographics", "age with the demographics", lambda g: g.kind in ("numeric", "categorical")),
)


def _merge(players: list[Player], name: str, belongs: Callable[[EHRGroup], bool]) -> tuple[list[Player], int]:
    """(players with those wholly inside the family merged as one, at the first one's place; groups merged)."""
    inside = [p for p in players if all(belongs(g) for g in p.members)]
    if len(inside) < 2:
        return players, 0
    merged = Player(name, tuple(g for p in inside for g in p.members))
    out = [merged if p is inside[0] else p for p in players if p is inside[0] or p not in inside]
    return out, len(merged.members)


def partition(known: Sequence[EHRGroup], n_others: int) -> tuple[list[Player], str | None]:
    """(players, why and how the partition was coarsened, or None): the known groups as players, merged by
    `COARSENING` until at most MAX_GROUPS remain; TooManyGroups when even the coarsest partition has more."""
    players, steps = singletons(known), []
    for name, what, belongs in COARSENING:
        if len(players) <= MAX_GROUPS:
            break
        players, n_merged = _merge(players, name, belongs)
        if n_merged:
            steps.append(f"{what} ({n_merged} groups) as one player, {name!r}")
    if len(players) > MAX_GROUPS:
        raise TooManyGroups(
            f"{len(known)} EHR groups are known for this study and even the coarsest partition ("
            f"{', '.join(p.name for p in players)}) has {len(players)} players, above MAX_GROUPS = {MAX_GROUPS} "
            f"(2^{len(players)} x 2^{n_others} forward passes); set finetune.attribution.MAX_GROUPS to at least "
            f"{len(players)} (16 is the default), or read the modality Shapley values alone")
    if not steps:
        return players, None
    return players, (f"{len(known)} EHR groups are known, more than the exact limit of {MAX_GROUPS} players "
                     f"(2^players coalitions), so groups enter together: {'; '.join(steps)}; {len(players)} "
                     "players, still exact")


# ----------------------------------------------------------------------------------------------------------
# The values from the coalition table (numpy only)


def shapley_weights(k: int) -> np.ndarray:
    """w[s] = s! (k - s - 1)! / k! for s = 0..k-1: the weight of a coalition of s of the other k-1 players."""
    return np.array([math.factorial(s) * math.factorial(k - s - 1) / math.factorial(k) for s in range(k)])


def popcount(n_bits: int) -> np.ndarray:
    """[2^n_bits] the number of set bits of each index (coalition size of a bitmask)."""
    idx = np.arange(1 << n_bits)
    return np.array([bin(i).count("1") for i in idx], dtype=np.int64) if n_bits else np.zeros(1, np.int64)


def group_values(v: np.ndarray, masked: np.ndarray) -> tuple[np.ndarray, float]:
    """(phi [n] per group, record) from v [2^o, 2^n] and masked [2^o] (see the module docstring).

    v[r, t]: the logit with the other modalities in bitmask r kept and the EHR groups in bitmask t known (bit j =
    group j); masked[r]: the logit with the EHR masked. o = the other modalities present, m = o + 1 unions."""
    v = np.asarray(v, dtype=np.float64)
    masked = np.asarray(masked, dtype=np.float64)
    n_r, n_t = v.shape
    o, n = n_r.bit_length() - 1, n_t.bit_length() - 1
    if n_r != 1 << o or n_t != 1 << n or masked.shape != (n_r,):
        raise RadalignError(f"coalition table of shape {v.shape} (masked {masked.shape}): expected "
                            "[2^others, 2^groups] and [2^others]")
    wr = shapley_weights(o + 1)[popcount(o)]  # [2^o] the weight of each coalition of other modalities
    record = float(wr @ (v[:, 0] - masked))
    if n == 0:
        return np.zeros(0), record
    size = popcount(n)
    wn = shapley_weights(n)
    phi = np.zeros(n)
    for j in range(n):
        bit = 1 << j
        without = np.flatnonzero((np.arange(n_t) & bit) == 0)  # [2^(n-1)] coalitions T not holding j
        phi[j] = wr @ (v[:, without | bit] - v[:, without]) @ wn[size[without]]
    return phi, record


# ----------------------------------------------------------------------------------------------------------
# The fusion model's coalition table


def coalition_rows(n_others: int, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """(r, t) bitmasks of every row of the table, t fastest: [2^o * 2^n] each."""
    r, t = np.divmod(np.arange((1 << n_others) << n_groups), 1 << n_groups)
    return r, t


def _bits(x: np.ndarray, n: int) -> torch.Tensor:
    return torch.as_tensor((x[:, None] >> np.arange(n)) & 1 == 1)  # [N, n] bool


def _repeat(batch: Mapping, n: int) -> dict:
    """Row 0 of a batch (tensors, nested dicts) as n rows."""
    out = {}
    for k, x in batch.items():
        if isinstance(x, Mapping):
            out[k] = _repeat(x, n)
        elif isinstance(x, torch.Tensor):
            out[k] = x[:1].expand(n, *x.shape[1:])
        else:
            out[k] = x
    return out


def _logits(net: torch.nn.Module, batch: Mapping, override: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return net(batch, present_override=override).logits[:, 0].double().cpu().numpy()


class _CachedEHR(torch.nn.Module):
    """Stands in for the fusion model's EHR tokenizer: the token of coalition `ehr["coalition"]` [N], looked up
    in `tokens` [2^n, T, d] (computed once per EHR coalition, not once per coalition of the other modalities)."""

    def __init__(self, tokens: torch.Tensor):
        super().__init__()
        self.tokens = tokens

    def forward(self, ehr: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.tokens[ehr["coalition"]]  # a masked row's index is blanked to 0: its token is unused


def _with_cached_ehr(net: torch.nn.Module, tokens: torch.Tensor) -> torch.nn.Module:
    """A shallow copy of the fusion model sharing every parameter, its EHR tokenizer replaced by the cache (the
    model itself is left untouched: a service may be explaining with it concurrently)."""
    clone = copy.copy(net)
    clone._modules = dict(net._modules)
    clone._modules["encoders"] = torch.nn.ModuleDict({**net.encoders, EHR: _CachedEHR(tokens)})
    return clone


def ehr_tokens(net: torch.nn.Module, batch: Mapping, players: Sequence[Player], chunk: int = CHUNK) -> torch.Tensor:
    """[2^n, T, d] the fusion model's EHR token(s) for every coalition of the n players (bit j = player j; a
    player's groups are kept or removed together)."""
    groups = [g for p in players for g in p.members]
    owner = torch.as_tensor(np.repeat(np.arange(len(players)), [len(p.members) for p in players]), dtype=torch.long)
    t_all = np.arange(1 << len(players))
    out = []
    with torch.no_grad():
        for start in range(0, len(t_all), chunk):
            keep = _bits(t_all[start:start + chunk], len(players))[:, owner]  # [N, groups] from [N, players]
            out.append(net.encoders[EHR](remove_groups(batch[EHR], groups, keep)))
    return torch.cat(out)


def coalition_table(net: torch.nn.Module, batch: Mapping, modalities: Sequence[str], players: Sequence[Player],
                    others: Sequence[str], chunk: int = CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """(v [2^o, 2^n], masked [2^o]) for a one-row batch: the fusion model run on every coalition, `chunk` rows
    per forward pass. others: the other modalities present (order = bit order); players: the EHR's n players.
    The EHR tokenizer (most of the cost) runs once per EHR coalition, 2^n times, whatever o."""
    mods = list(modalities)
    o, n = len(others), len(players)
    r_all, t_all = coalition_rows(o, n)
    col = {m: mods.index(m) for m in [*others, EHR]}
    cached = _with_cached_ehr(net, ehr_tokens(net, batch, players, chunk))
    v = np.empty(len(r_all))
    for start in range(0, len(r_all), chunk):
        r, t = r_all[start:start + chunk], t_all[start:start + chunk]
        sub = _repeat(batch, len(r))
        sub[EHR] = {**sub[EHR], "coalition": torch.as_tensor(t)}
        v[start:start + len(r)] = _logits(cached, sub, _override(r, others, col, len(mods), ehr=True))
    r_masked = np.arange(1 << o)
    masked = _logits(net, _repeat(batch, len(r_masked)), _override(r_masked, others, col, len(mods), ehr=False))
    return v.reshape(1 << o, 1 << n), masked


def _override(r: np.ndarray, others: Sequence[str], col: Mapping[str, int], n_mods: int, ehr: bool) -> torch.Tensor:
    keep = torch.zeros(len(r), n_mods, dtype=torch.bool)  # [N, M]: a modality not named stays masked
    keep[:, col[EHR]] = ehr
    bits = _bits(r, len(others))
    for j, m in enumerate(others):
        keep[:, col[m]] = bits[:, j]
    return keep


# ----------------------------------------------------------------------------------------------------------
# The attribution


@dataclass
class GroupValue:
    """One player's share of the EHR modality's Shapley value (logit): a group, or a merged set of groups."""

    name: str
    kind: str
    """the group's kind, or "merged" for a set of groups that moved together"""
    shown: str
    """its value for the study ("absent" for a lab not measured, "unknown" for a demographic; a merged player's
    members and their values, "sex F; race WHITE; ...")"""
    value: float
    known: bool
    """False: absent/unknown, the same as removed, so its value is exactly 0"""
    members: list[str] = field(default_factory=list)
    """a merged player's group names (empty for a single group)"""


@dataclass
class EHRAttribution:
    """The EHR modality's Shapley value split over its groups, ranked by |value| (the null ones last)."""

    groups: list[GroupValue]
    record: float
    """the record entering with nothing known (every lab not measured, demographics unknown) against no
    record (the EHR mask token), Shapley-weighted over the other modalities"""
    total: float
    """record + sum of the groups: the EHR modality's Shapley value"""
    removal: str = ("a removed group is shown as unknown: a lab as not measured, age unknown, a category as "
                    "unknown; the record itself enters first")
    forward_passes: int = 0
    """rows the fusion model was run on: every coalition of (other modalities, known groups), and the masked ones"""
    others: list[str] = field(default_factory=list)
    """the other modalities present (the unions besides the EHR)"""
    coarsened: str | None = None
    """why and how known groups were merged into set-players (more known groups than MAX_GROUPS); None: each
    known group is its own player"""

    def to_dict(self) -> dict:
        return {"method": "Owen value (EHR groups inside the EHR modality; the record enters first)",
                "space": "logit", "removal": self.removal, "total": self.total, "record": self.record,
                "groups": [{"name": g.name, "kind": g.kind, "shown": g.shown, "value": g.value, "known": g.known,
                            "members": g.members} for g in self.groups],
                "coarsened": self.coarsened, "forward_passes": self.forward_passes}


def attribute(table: Callable[[list[Player], list[str]], tuple[np.ndarray, np.ndarray]],
              groups: Sequence[EHRGroup], known: Sequence[bool], others: Sequence[str]) -> EHRAttribution:
    """EHRAttribution from `table(players, others) -> (v, masked)` over the players: the known groups, merged
    into sets (`partition`) when there are more than MAX_GROUPS."""
    players, coarsened = partition([g for g, k in zip(groups, known) if k], len(others))
    v, masked = table(players, list(others))
    phi, record = group_values(v, masked)
    rows = [GroupValue(p.name, p.kind, p.shown, float(x), True, [g.name for g in p.members] if p.merged else [])
            for p, x in zip(players, phi)]
    rows += [GroupValue(g.name, g.kind, "absent" if g.kind == "lab" else "unknown", 0.0, False)
             for g, k in zip(groups, known) if not k]
    rows.sort(key=lambda g: (not g.known, -abs(g.value)))
    return EHRAttribution(rows, record, record + float(phi.sum()), forward_passes=v.size + masked.size,
                          others=list(others), coarsened=coarsened)


def ehr_attribution(net: torch.nn.Module, batch: Mapping, modalities: Sequence[str],
                    groups: Sequence[EHRGroup]) -> EHRAttribution | None:
    """The EHR attribution of a fusion model's prediction for a one-row batch; None when the model has no EHR
    modality or the study has no EHR (its Shapley value is 0: nothing to split)."""
    mods = list(modalities)
    if EHR not in mods or batch.get(EHR) is None:
        return None
    with torch.no_grad():
        present = net.presence(batch)[0].tolist()  # [M] the study's modalities (data present)
    if not present[mods.index(EHR)]:
        return None
    others = [m for m, p in zip(mods, present) if p and m != EHR]  # absent modalities: null unions, left out
    return attribute(lambda players, oth: coalition_table(net, batch, mods, players, oth),
                     groups, known_groups(groups, batch[EHR]), others)


def explain_ehr(trained, net: torch.nn.Module, batch: Mapping, modalities: Sequence[str],
                row: Mapping, labs: Sequence[str] | None = None) -> EHRAttribution | str | None:
    """`finetune explain`'s EHR attribution for one study of a run (`row`: its finetune-table row; `labs`: the
    run's lab features, the others are vital signs, None: all labs); the reason as text when it is refused (even
    the coarsest partition above MAX_GROUPS players), None when there is no EHR to split."""
    from radalign.finetune.features import CATEGORICAL

    fz = trained.featurizer
    if fz is None:
        return None
    vitals = [f for f in fz.features if f not in set(labs)] if labs is not None else []
    groups = ehr_groups(fz.features, fz.numeric, list(CATEGORICAL), row, vitals=vitals)
    try:
        return ehr_attribution(net, batch, modalities, groups)
    except TooManyGroups as e:
        return str(e)


__all__ = ["TooManyGroups", "explain_ehr", "MAX_GROUPS", "EHRGroup", "ehr_groups", "known_groups", "remove_groups",
           "Player", "singletons", "COARSENING", "partition", "shapley_weights",
           "group_values", "coalition_rows", "ehr_tokens", "coalition_table", "GroupValue", "EHRAttribution", "attribute",
           "ehr_attribution"]
