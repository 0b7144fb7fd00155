"""bench/gpu.sh + bench/gpu.py (issue 23's GPU check): the dry run of the cheap parts through the shell entry,
the orchestration's failure handling (a crashing part, a part past its limit, always exit 0), and the helpers
that turn measurements into figures, against hand-worked numbers."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import gpu  # noqa: E402

from .conftest import NANO  # noqa: E402


def _read(out: Path, name: str) -> dict:
    return json.loads((out / name).read_text())


def _dry_plan(tmp_path: Path, **kw) -> gpu.Plan:
    plan = gpu.dry_plan(gpu.Plan(dry_run=True, device="cpu", out=str(tmp_path / "out"), work=str(tmp_path / "work")))
    return gpu.replace(plan, **kw)


# ----------------------------------------------------------------------------------------------------------
# The dry run through bench/gpu.sh


@pytest.fixture(scope="module")
def dry_run(synth_shards, tmp_path_factory):
    """`bench/gpu.sh --dry-run --parts faiss,embed` with the session's shards in its work folder (the dry plan's
    shards are the fixture's: 40 patients, 64 px, 16 per shard; making them again would cost seconds)."""
    root = tmp_path_factory.mktemp("gpu-dry")
    out, work = root / "out", root / "work"
    shutil.copytree(synth_shards, work / "shards-p40-64px")
    env = {**os.environ, "OUT": str(out)}
    done = subprocess.run([str(REPO / "bench" / "gpu.sh"), "--dry-run", "--parts", "faiss,embed", "--work", str(work)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    return done, out, work


def test_dry_run_exits_0_and_every_part_writes_its_json_with_a_status(dry_run):
    done, out, _ = dry_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["0-machine.json", "4-faiss.json", "5-embed.json", "gpu-log.txt"]
    for name in ("4-faiss.json", "5-embed.json"):
        part = _read(out, name)
        assert part["status"] == "ok", part
        assert part["dry_run"] is True and part["device"] == "cpu"
        assert all(c["status"] in ("ok", "skipped", "failed") for c in part["checks"].values())
    machine = _read(out, "0-machine.json")
    assert machine["parts"] == {"faiss": "ok", "embed": "ok"}
    assert machine["shards"]["status"] == "ok" and machine["shards"]["reused"] is True
    assert machine["setup"] == "the repository's .venv" and machine["gpu"] is None
    assert "GPU check (dry run on cpu)" in (out / "gpu-log.txt").read_text()


def test_dry_run_faiss_flat_is_exact_and_gpu_figures_are_skipped_with_the_reason(dry_run):
    _, out, _ = dry_run
    part = _read(out, "4-faiss.json")
    flat, ivf = part["checks"]["flat"], part["checks"]["ivf_flat"]
    assert flat["cpu"]["recall_at_10"] == 1.0  # a flat index is exact search
    assert 0.0 < ivf["cpu"]["recall_at_10"] <= 1.0 and ivf["cpu"]["nprobe"] == 8
    assert ivf["factory"] == "IVF64,Flat"
    for c in (flat, ivf):
        assert c["cpu"]["queries_per_s"] == pytest.approx(200 / c["cpu"]["search_s"], rel=1e-3)
        assert c["gpu"] == {"status": "skipped", "reason": "GPU only: no CUDA device here"}
    assert part["data"]["vectors"] == [20_000, 64] and part["data"]["queries"] == 200


def test_dry_run_embedding_pass_embeds_every_train_image_of_the_manifest(dry_run):
    _, out, work = dry_run
    manifest = json.loads((work / "shards-p40-64px" / "manifest.json").read_text())
    train = sum(s["samples"] for s in manifest["shards"] if s["split"] == "train") if "shards" in manifest else None
    emb = _read(out, "5-embed.json")["checks"]["embed"]
    from radalign.data.loader import split_samples

    assert emb["images"] == emb["expected"] == split_samples(work / "shards-p40-64px", "train") > 0
    if train is not None:
        assert emb["images"] == train
    assert emb["lost"] == {} and emb["workers"] == 2 and emb["device"] == "cpu"
    assert emb["images_per_s"] > 0 and len(emb["seconds"]) == 2


# ----------------------------------------------------------------------------------------------------------
# Orchestration: failures are results, the exit code is always 0


def test_a_part_past_its_limit_is_failed_and_its_children_are_killed(synth_shards, tmp_path):
    import psutil

    plan = _dry_plan(tmp_path)
    shutil.copytree(synth_shards, Path(plan.work) / "shards-p40-64px")
    argv = ["--dry-run", "--out", plan.out, "--work", plan.work]
    Path(plan.out).mkdir(parents=True)
    t = time.time()
    gpu.run_part(plan, "precision", 6, argv)  # its first `radalign pretrain` alone takes longer
    assert time.time() - t < 30
    part = _read(Path(plan.out), "3-precision.json")
    # the part's own limit, or (on a loaded machine) a check's shorter limit inside it, stops it first
    assert part["status"] == "failed" and ("ran past its limit of 6 s" in part["reason"]
                                           or "ran past its time limit" in part["reason"]), part
    # on a loaded machine the part may not have reached its first check; none is left "running"
    # a GPU-only check is skipped before it starts; every other one that started was stopped as failed
    assert all(c["status"] == "failed" or (c["status"] == "skipped" and "GPU only" in c.get("reason", ""))
               for c in part["checks"].values()), part
    time.sleep(1)
    left = [p for p in psutil.process_iter(["cmdline"]) if any(plan.work in a for a in (p.info["cmdline"] or []))]
    assert left == []


# A process that starts a grandchild in a session of its own (as torchrun starts its workers), prints the
# grandchild's pid, and sleeps; SIGTERM is ignored when asked (a hung part).
SPAWNER = """
import signal, subprocess, sys, time
if sys.argv[1] == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
print(child.pid, flush=True)
time.sleep(600)
"""


def _spawned(tmp_path: Path, mode: str):
    import psutil

    log = tmp_path / f"{mode}.log"
    proc = gpu.start([sys.executable, "-c", SPAWNER, mode], log)
    for _ in range(600):
        if log.read_text().strip():
            break
        time.sleep(0.1)
    return proc, psutil.Process(int(log.read_text()))


@pytest.mark.parametrize("stop", ["kill", "stop_part"])
def test_stopping_a_command_kills_descendants_in_other_sessions(tmp_path, stop):
    import psutil

    proc, grandchild = _spawned(tmp_path, "ignore-term" if stop == "stop_part" else "plain")
    try:
        assert grandchild.is_running() and os.getsid(grandchild.pid) != os.getsid(proc.pid)
        (gpu.kill if stop == "kill" else gpu.stop_part)(proc)
        assert proc.poll() is not None
        with pytest.raises(psutil.NoSuchProcess):
            grandchild.wait(timeout=5)  # reaped by init once killed: gone
            grandchild.status()
    finally:  # a failing run leaves nothing behind
        for p in (psutil.Process(proc.pid) if proc.poll() is None else None, grandchild):
            with contextlib.suppress(psutil.NoSuchProcess, AttributeError):
                p.kill()


def test_a_crashing_part_is_failed_with_its_traceback(tmp_path, monkeypatch):
    plan = _dry_plan(tmp_path)
    Path(plan.out).mkdir(parents=True)

    def boom(plan, report, clock):
        report.check("fine", lambda: {"x": 1})
        raise ValueError("planted")

    monkeypatch.setitem(gpu.RUNNERS, "faiss", boom)
    assert gpu.one_part(plan, "faiss", time.time() + 60) == 0
    part = _read(Path(plan.out), "4-faiss.json")
    assert part["status"] == "failed" and part["reason"] == "ValueError: planted"
    assert "raise ValueError" in part["traceback_tail"] and part["checks"]["fine"] == {"status": "ok", "x": 1}


def test_checks_report_ok_skipped_and_failed_with_figures(tmp_path):
    plan = _dry_plan(tmp_path)
    Path(plan.out).mkdir(parents=True)
    report = gpu.Report(plan, "embed")
    assert json.loads(report.path.read_text())["status"] == "running"  # on disk before anything ran

    def failed():
        raise gpu.Failed("too slow", {"samples_per_s": 3.0})

    def crashed():
        return {"x": 1 / 0}

    report.check("a", lambda: {"v": 2})
    report.check("b", lambda: gpu._raise(gpu.Skip("GPU only")))
    report.check("c", failed)
    report.check("d", crashed)
    report.finish()
    d = json.loads(report.path.read_text())
    assert d["checks"]["a"] == {"status": "ok", "v": 2}
    assert d["checks"]["b"] == {"status": "skipped", "reason": "GPU only"}
    assert d["checks"]["c"] == {"status": "failed", "reason": "too slow", "samples_per_s": 3.0}
    assert d["checks"]["d"]["status"] == "failed" and "ZeroDivisionError" in d["checks"]["d"]["reason"]
    assert d["status"] == "failed" and d["reason"].startswith("c: too slow; d: ZeroDivisionError")


@pytest.mark.parametrize("left, rc, want", [
    (None, None, "ran past its limit of 9 s before writing its JSON"),
    (None, -9, "its process ended with exit -9 before writing its JSON"),
    ("running", None, "ran past its limit of 9 s; "),
])
def test_finalize_turns_an_unfinished_part_into_failed(tmp_path, left, rc, want):
    plan = _dry_plan(tmp_path)
    Path(plan.out).mkdir(parents=True)
    if left:
        r = gpu.Report(plan, "deepspeed")  # on disk with status running, as a part killed mid-way leaves it
        r.data["checks"] = {"zero2": {"status": "ok"}, "zero3": {"status": "running"}}
        r.save()
    gpu.finalize_part(plan, "deepspeed", rc, 9, 9.5, "the log's last line")
    d = _read(Path(plan.out), "2-deepspeed.json")
    assert d["status"] == "failed" and d["reason"].startswith(want), d
    assert d["traceback_tail"] == "the log's last line"
    if left:
        assert d["checks"] == {"zero2": {"status": "ok"}, "zero3": {"status": "failed", "reason": "ran past its "
                                                                                               "limit of 9 s"}}


def test_a_finished_part_is_left_as_it_wrote_itself(tmp_path):
    plan = _dry_plan(tmp_path)
    Path(plan.out).mkdir(parents=True)
    gpu.write_part(plan, "faiss", "skipped", "no faiss")
    gpu.finalize_part(plan, "faiss", 0, 9, 1.0, "")
    assert _read(Path(plan.out), "4-faiss.json")["status"] == "skipped"


def test_gpu_sh_exits_0_even_when_the_script_refuses_its_arguments(tmp_path):
    done = subprocess.run([str(REPO / "bench" / "gpu.sh"), "--dry-run", "--parts", "nonsense"], cwd=REPO,
                          env={**os.environ, "OUT": str(tmp_path)}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0
    assert "--parts: unknown nonsense" in (tmp_path / "gpu-log.txt").read_text()


def test_full_run_without_a_gpu_skips_every_part_with_the_reason(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    assert gpu.main(["--parts", "faiss,embed", "--out", str(tmp_path), "--work", str(tmp_path / "w")]) == 0
    for name in ("4-faiss.json", "5-embed.json"):
        d = _read(tmp_path, name)
        assert d["status"] == "skipped" and d["reason"].startswith("no CUDA device: the full run needs a GPU")
    assert not (tmp_path / "w").exists()  # no shards made for nothing


def test_the_budget_skips_the_parts_it_cannot_fit(tmp_path):
    plan = _dry_plan(tmp_path, budget=5.0)
    gpu.orchestrate(plan, ["faiss"], [])
    d = _read(Path(plan.out), "4-faiss.json")
    assert d["status"] == "skipped" and "budget of 5 s was spent" in d["reason"] and "--parts faiss" in d["reason"]


# ----------------------------------------------------------------------------------------------------------
# Helpers against hand-worked numbers


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0),  # the SXM part reports its memory type
    ("NVIDIA H100 SXM5 80GB", 989.0),
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H200", 989.0),
    ("NVIDIA H100 NVL", None),  # not in the table: MFU is skipped unless --peak-tflops gives it
    ("NVIDIA A100-SXM4-80GB", None),
])
def test_bf16_peak_by_gpu_name(name, peak):
    assert gpu.bf16_peak_tflops(name) == peak


def test_mfu_by_hand():
    # 3,000 samples/s x 123.26 GFLOP per sample = 369.8 TFLOP/s; over 989 TFLOP/s = 0.37389...
    assert gpu.mfu(3000.0, 123.26e9, 989.0) == pytest.approx(369.78 / 989.0, rel=1e-6)


def test_analytic_flops_of_vit_b16_by_hand_and_against_the_published_count():
    from radalign.pretrain.models import get_model_config

    cfg = get_model_config("ViT-B-16")
    # Forward, by hand: vision patch embedding 2*196*768*768 = 231,211,008; 12 blocks over 197 tokens of width 768
    # 12*(24*197*768^2 + 4*197^2*768) = 34,894,909,440; projection 2*768*512 = 786,432. Text: 12 blocks over 77
    # tokens of width 512: 12*(24*77*512^2 + 4*77^2*512) = 5,959,016,448; projection 2*512*512 = 524,288.
    forward = 231_211_008 + 34_894_909_440 + 786_432 + 5_959_016_448 + 524_288
    # training: 3 x forward, less one patch embedding forward (the images need no input gradient)
    assert gpu.analytic_train_flops(cfg) == 3 * forward - 231_211_008 == 123_028_131_840
    # without the attention terms 12*4*197^2*768 and 12*4*77^2*512, three times each
    assert gpu.analytic_train_flops(cfg, attention=False) == 123_028_131_840 - 3 * (1_430_654_976 + 145_711_104)
    # timm lists vit_base_patch16_224 at 17.58 GMACs (35.16 GFLOPs) forward: our vision tower is that ViT
    vision = 231_211_008 + 34_894_909_440 + 786_432
    assert vision == pytest.approx(2 * 17.58e9, rel=0.005)


def test_flop_counter_agrees_with_the_analytic_count(tmp_path):
    """Two independent counts of one training step of the nano model: torch's FlopCounterMode and the formula."""
    plan = _dry_plan(tmp_path, model=str(NANO))
    got = gpu.count_flops(plan)
    assert got["counted_over_analytic"] == pytest.approx(1.0, abs=0.005), got
    assert got["analytic_counts_attention"] is False  # the CPU attention kernel is not counted by torch
    assert got["batch"] == 4 and got["context_length"] == 32 and got["image_size"] == 64


def test_batch_search_keeps_the_largest_batch_under_the_cap():
    assert gpu.doubling(64, 1000) == [64, 128, 256, 512]
    assert gpu.doubling(8, 8) == [8] and gpu.doubling(16, 8) == []
    gib = 2**30
    trials = [{"batch": 256, "fits": True, "peak_bytes": 20 * gib}, {"batch": 512, "fits": True, "peak_bytes": 40 * gib},
              {"batch": 1024, "fits": True, "peak_bytes": 75 * gib}, {"batch": 2048, "fits": False, "peak_bytes": None}]
    assert gpu.choose_batch(trials, 76 * gib) == 1024
    assert gpu.choose_batch(trials, 0.9 * 80 * gib) == 512  # 75 GiB is over 90% of an 80 GiB card
    assert gpu.choose_batch(trials, 40 * gib) == 512  # a peak equal to the cap is kept
    assert gpu.choose_batch(trials, 10 * gib) is None
    assert gpu.choose_batch(trials[3:], 100 * gib) is None


def test_compare_curves_splits_before_and_after_the_kill():
    straight = {1: 2.0, 2: 1.9, 3: 1.8, 4: 1.7, 5: 1.6}
    resumed = {1: 2.0, 2: 1.9 + 1e-7, 3: 1.8 + 5e-7, 4: 1.7 + 3e-6, 5: 1.6 + 2e-7}
    got = gpu.compare_curves(straight, resumed, after=3)  # steps 1-3 trained before the kill, 4-5 after
    assert got["compared_steps"] == [1, 2, 3, 4, 5] and got["missing_steps"] == []
    assert got["max_abs_diff_before_kill"] == pytest.approx(5e-7, rel=1e-6)
    assert got["max_abs_diff_resumed"] == pytest.approx(3e-6, rel=1e-6)
    at_kill = gpu.compare_curves(straight, {**straight, 3: 1.8 + 9e-6, 4: 1.7 + 1e-6}, after=3)
    assert at_kill["max_abs_diff_before_kill"] == pytest.approx(9e-6, rel=1e-6)  # the kill step was trained before
    assert at_kill["max_abs_diff_resumed"] == pytest.approx(1e-6, rel=1e-6)
    late = gpu.compare_curves(straight, {**straight, 5: 1.6 + 4e-7}, after=4)
    assert late["max_abs_diff_before_kill"] == 0.0 and late["max_abs_diff_resumed"] == pytest.approx(4e-7, rel=1e-6)
    short = gpu.compare_curves(straight, {1: 2.0, 2: 1.9, 6: 0.1}, after=3)
    assert short["missing_steps"] == [3, 4, 5, 6] and short["max_abs_diff_resumed"] is None


def _judged(**kw) -> dict:
    base = {"missing_steps": [], "compared_steps": [1, 2, 3, 4], "killed_before_end": True,
            "loaded_after_check": True, "resumed_from": "step-0000002", "max_abs_diff_resumed": 0.0,
            "max_abs_diff_before_kill": 0.0, "checkpoint": {"deepspeed_files": ["deepspeed/x.pt"]}}
    return {**base, **kw}


@pytest.mark.parametrize("figures, message", [
    (_judged(max_abs_diff_resumed=2e-6), "resumed losses differ from the uninterrupted run by up to 2.00e-06"),
    (_judged(killed_before_end=False), "the run ended before the kill"),
    (_judged(loaded_after_check=False), "does not say it resumed from step-0000002"),
    (_judged(missing_steps=[4], compared_steps=[1, 2, 3]), "loss curves cover different steps"),
    (_judged(checkpoint={"deepspeed_files": []}), "DeepSpeed was not active"),
])
def test_resume_judgement_names_what_went_wrong(figures, message):
    with pytest.raises(gpu.Failed, match=message):
        gpu._judge_resume(figures, 4)
    gpu._judge_resume(_judged(max_abs_diff_resumed=1e-6), 4)  # at the tolerance: passes


def _checkpoint(folder: Path) -> Path:
    (folder / "deepspeed").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"abc")
    (folder / "deepspeed" / "mp_rank_00_model_states.pt").write_bytes(b"abc")
    abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # sha256("abc"), FIPS 180-2 example
    (folder / "checksums.json").write_text(json.dumps({"files": {"model.safetensors": abc,
                                                                 "deepspeed/mp_rank_00_model_states.pt": abc}}))
    return folder


def test_checksums_verify_a_good_checkpoint_and_name_the_damaged_file(tmp_path):
    good = gpu.verify_checksums(_checkpoint(tmp_path / "good"))
    assert good == {"files": 2, "deepspeed_files": ["deepspeed/mp_rank_00_model_states.pt"], "bytes": 6}
    altered = _checkpoint(tmp_path / "altered")
    (altered / "deepspeed" / "mp_rank_00_model_states.pt").write_bytes(b"abd")
    with pytest.raises(gpu.Failed, match="mp_rank_00_model_states.pt: sha256 .* differs"):
        gpu.verify_checksums(altered)
    planted = _checkpoint(tmp_path / "planted")
    (planted / "custom_checkpoint_0.pkl").write_bytes(b"x")
    with pytest.raises(gpu.Failed, match="not in checksums.json: \\['custom_checkpoint_0.pkl'\\]"):
        gpu.verify_checksums(planted)
    missing = _checkpoint(tmp_path / "missing")
    (missing / "checksums.json").unlink()
    with pytest.raises(gpu.Failed, match="checksums.json: missing"):
        gpu.verify_checksums(missing)


def test_checksums_accept_what_radalign_writes(tmp_path):
    import torch

    from radalign.training import CheckpointManager

    path = CheckpointManager(tmp_path).save(3, model=torch.nn.Linear(2, 2), state={"segment": 0})
    got = gpu.verify_checksums(path)
    digest = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
    assert got["files"] >= 3 and json.loads((path / "checksums.json").read_text())["files"]["model.safetensors"] == digest


@pytest.mark.parametrize("statuses, want", [
    ({"a": "ok", "b": "skipped"}, "ok"),
    ({"a": "skipped", "b": "skipped"}, "skipped"),
    ({"a": "ok", "b": "failed"}, "failed"),
    ({"a": "ok", "b": "running"}, "failed"),
    ({}, "skipped"),
])
def test_part_status_from_its_checks(statuses, want):
    assert gpu.overall({k: {"status": v, "reason": k} for k, v in statuses.items()})[0] == want

