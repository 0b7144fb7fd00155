"""A finetune run as the explainer of `radalign retrieval serve --finetune-run RUN` (registered under the
`radalign.serve_explainers` entry point in setup.cfg, so retrieval finds it without importing finetune).

    ex = StudyExplainer(RUN, INDEX_DIR)      # the run loaded once
    ex.explain("50000123", k=5)              # what `radalign finetune explain --format json` writes, or None
    ex.demographics()                        # {study_id: {"sex": ..., "age_band": ...}} for the filters

The explanation is `evaluate.explain_study`'s (exact modality Shapley values, the EHR value split over its
groups, attention, the similar cases of other patients with the neighbour vote): nothing is recomputed here.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict

import numpy as np
from radalign.finetune.clinical import age_bands
from radalign.finetune.evaluate import explain_study
from radalign.finetune.explain import to_json
from radalign.finetune.predict import load_run

from radalign import RadalignError

CACHED = 64  # explanations kept (a study query and then its case view ask for the same one)


class StudyExplainer:
    """Explains studies of one finetune run's table, with similar cases from one index."""

    def __init__(self, run: str | os.PathLike, index_dir: str | os.PathLike):
        self.trained = load_run(run)
        self.index_dir = index_dir
        self.task = self.trained.cfg.task.name
        # A tuned tower's image token is not in the index's space (built with the frozen export): its studies are
        # explained without the run's neighbour vote; the service's own search of the film still shows cases.
        self.tuned = self.trained.tuned_model() is not None
        self._studies = {str(s) for frame in self.trained.table().splits.values() for s in frame["study_id"]}
        self._cache: OrderedDict[tuple[str, int], dict] = OrderedDict()

    def explain(self, study_id: str, k: int) -> dict | None:
        """The run's explanation of `study_id` as JSON-ready data (task, probability, Shapley values, similar
        cases); None when the study is not in the run's table (an uploaded film has no record)."""
        if str(study_id) not in self._studies:
            return None
        key = (str(study_id), int(k))
        if key not in self._cache:  # the EHR attribution may take seconds: computed once per study and k
            self._cache[key] = self._explain(str(study_id), k)
            while len(self._cache) > CACHED:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return json.loads(json.dumps(self._cache[key]))  # a copy: the caller may edit it

    def _explain(self, study_id: str, k: int) -> dict:
        try:
            expl = explain_study(self.trained, study_id, index=None if self.tuned else self.index_dir, k=k)
        except RadalignError as e:  # e.g. a study whose film was not embedded: say why on the page
            return {"study_id": study_id, "task": self.task, "error": str(e)}
        out = json.loads(to_json(expl))  # exactly `finetune explain --format json` (numpy ids as text)
        if self.tuned:
            out["similar_note"] = ("no neighbour vote: the run's image tower was tuned, so its image token is not "
                                   "in the space of the index (built with the frozen export)")
        return out

    def demographics(self) -> dict[str, dict]:
        """study_id -> sex (MIMIC-IV `gender`) and age band (`finetune eval`'s bands) from the run's table."""
        out: dict[str, dict] = {}
        for frame in self.trained.table().splits.values():
            sex = frame["gender"] if "gender" in frame.columns else [None] * len(frame)
            bands = age_bands(frame["age"]) if "age" in frame.columns else np.full(len(frame), None)
            for s, g, b in zip(frame["study_id"], sex, bands):
                out[str(s)] = {"sex": g if isinstance(g, str) and g else None, "age_band": b}
        return out


__all__ = ["StudyExplainer"]
