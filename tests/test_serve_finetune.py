"""`radalign retrieval serve --finetune-run`: the finetune explainer found through its entry point, and its
answers equal `radalign finetune explain`'s (explain_study) for the same study, index and k; sex and age band
filters from the run's table equal the table's own columns. Slow: it trains a small run."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ft(ft_cohort, tmp_path_factory):
    from radalign.finetune.config import FinetuneConfig
    from radalign.finetune.recipe import run_finetune

    from radalign.cli import main
    from radalign.config import load_config

    c = ft_cohort
    root = tmp_path_factory.mktemp("serve_ft")
    over = [f"run_dir={root / 'run'}", f"data.table={c['table']}", f"data.shards={c['shards']}",
            f"data.checkpoint={c['export']}", "bootstrap=20", "optim.epochs=1", "optim.batch_size=64",
            "model.d_model=16", "model.ehr_d=8", "model.n_layers=1", "model.ehr_blocks=1", "model.n_heads=2",
            "model.ehr_heads=2", "progress=false", "precision=fp32", "baselines.models=[]"]
    run = run_finetune(load_config(FinetuneConfig, "finetune/long_stay", over, stage="finetune"))
    index = root / "index"
    assert main(["retrieval", "build", "--checkpoint", str(c["export"]), "--data", str(c["shards"]), "--split",
                 "train", "--out", str(index)]) == 0
    return {"run": run, "index": index, "table": c["table"]}


def test_study_answers_carry_finetune_explain(ft, tmp_path):
    from fastapi.testclient import TestClient
    from radalign.finetune.clinical import age_bands
    from radalign.finetune.evaluate import explain_study
    from radalign.finetune.inputs import load_table
    from radalign.retrieval.serve import ServeConfig
    from radalign.retrieval.serve_api import create_app
    from radalign.retrieval.store import IndexStore

    app = create_app(ft["index"], finetune_run=ft["run"], config=ServeConfig(audit_log=None))
    client = TestClient(app, base_url="http://127.0.0.1")
    store = IndexStore.load(ft["index"])
    table = load_table(ft["table"]).split("train")
    study = str(table["study_id"].iloc[int(np.flatnonzero(table["dicom_ids"].notna().to_numpy())[0])])
    assert len(store.rows_of_study(study))  # a train study of the table is in the (train) index
    ans = client.post("/api/search/study", json={"study_id": study, "k": 4}).json()
    want = explain_study(ft["run"], study, index=ft["index"], k=4).to_dict()
    got = ans["explanation"]
    assert got["shapley"] == pytest.approx(want["shapley"]) and got["output"] == pytest.approx(want["output"])
    assert [c["study_id"] for c in got["similar_cases"]] == [c["study_id"] for c in want["similar_cases"]]
    assert sum(got["shapley"].values()) == pytest.approx(got["output"]["full"] - got["output"]["empty"], abs=1e-6)
    # the EHR attribution: the same as finetune explain's, and it splits the EHR modality's value
    assert got["ehr_groups"]["groups"] == want["ehr_groups"]["groups"]
    assert got["ehr_groups"]["total"] == pytest.approx(got["shapley"]["ehr"], abs=1e-4)
    assert client.get("/api/info").json()["task"] == want["task"]
    assert client.get(f"/api/case/{study}?k=4").json()["explanation"]["shapley"] == pytest.approx(want["shapley"])

    # sex and age band per case, from the run's table, equal the table's columns
    row = table.loc[table["study_id"].astype(str) == study].iloc[0]
    first = ans["neighbours"][0]
    match = table.loc[table["study_id"].astype(str) == first["study_id"]]
    if len(match):
        assert first["sex"] == match["gender"].iloc[0] and first["age_band"] == age_bands(match["age"])[0]
    sex = row["gender"]
    f = client.post("/api/search/text", json={"text": "effusion", "k": 10, "filters": {"sex": [sex]}}).json()
    by_study = {str(s): g for frame in load_table(ft["table"]).splits.values()
                for s, g in zip(frame["study_id"], frame["gender"])}
    assert f["neighbours"] and all(by_study[n["study_id"]] == sex for n in f["neighbours"])
