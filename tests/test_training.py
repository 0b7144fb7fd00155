"""Shared training plumbing (radalign/training.py, radalign/precision.py), tested without a recipe or shards:
precision choice with an injected probe, pickle-free checksummed checkpoints with verified fallback, the NaN
guard, metric logging on resume."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from radalign import RadalignError
from radalign import precision as prec
from radalign.log import get_logger
from radalign.training import (
    CheckpointManager,
    Meter,
    MetricLogger,
    NonFiniteLoss,
    get_rng_state,
    set_rng_state,
)

# ----------------------------------------------------------------------------------------------------------
# precision: auto


@pytest.fixture(autouse=True)
def _fresh_probe_cache():
    prec.clear_cache()
    yield
    prec.clear_cache()


AVX2_CPUINFO = "processor : 0\nflags : fpu sse sse2 avx avx2 fma\n"
BF16_CPUINFO = "processor : 0\nflags : fpu avx2 avx512f avx512_bf16 amx_bf16\n"


def test_bf16_unit_and_native_rules_from_hand_written_cpuinfo():
    assert not prec.cpu_has_bf16_unit(AVX2_CPUINFO)
    assert prec.cpu_has_bf16_unit(BF16_CPUINFO)
    assert prec.native_bf16("AVX512", True)
    # ATEN_CPU_CAPABILITY=avx2 on a bf16 CPU: ATen dispatches AVX2 kernels, so bf16 is not native any more
    assert not prec.native_bf16("AVX2", True)
    assert not prec.native_bf16("AVX512", False)
    assert not prec.native_bf16("DEFAULT", True)


def test_auto_on_cpu_picks_bf16_only_when_native_and_measured_faster():
    fast = lambda: (1.0, 0.4)  # noqa: E731  bf16 takes 40% of the fp32 time
    slow = lambda: (1.0, 18.0)  # noqa: E731  the AVX2-only case of issue 9
    assert prec.resolve_precision("auto", "cpu", probe=fast, capability="AVX512", native=True)[0] == "bf16"
    choice, reason = prec.resolve_precision("auto", "cpu", probe=slow, capability="AVX2", native=False)
    assert choice == "fp32"
    assert "AVX2" in reason and "18.00x" in reason and "no native bf16" in reason
    # native but measured slower (e.g. tiny ops): fp32
    assert prec.resolve_precision("auto", "cpu", probe=slow, capability="AVX512", native=True)[0] == "fp32"
    # fast-looking timings without native support are not trusted
    assert prec.resolve_precision("auto", "cpu", probe=fast, capability="AVX2", native=False)[0] == "fp32"
    # the threshold: 0.97x is within timer noise, not "faster"
    assert prec.resolve_precision("auto", "cpu", probe=lambda: (1.0, 0.97), capability="AVX512",
                                  native=True)[0] == "fp32"


def test_explicit_bf16_on_emulating_cpu_warns_with_the_measured_slowdown(precision_log):
    choice, _ = prec.resolve_precision("bf16", "cpu", probe=lambda: (0.010, 0.180), capability="AVX2", native=False)
    assert choice == "bf16"  # honoured
    err = " ".join(m for _, m in precision_log)
    assert "about 18.0x slower than fp32" in err and "precision=auto" in err
    precision_log.clear()
    prec.resolve_precision("bf16", "cpu", probe=lambda: (1.0, 0.5), capability="AVX512", native=True)
    assert precision_log and not any("slower" in m for _, m in precision_log)


def test_fp16_on_cpu_and_unknown_precision_are_errors():
    with pytest.raises(RadalignError, match=r"^precision=fp16 needs CUDA \(loss scaling is a GPU feature\); use "
                                            r"precision=auto or fp32 on CPU$"):
        prec.resolve_precision("fp16", "cpu")
    with pytest.raises(RadalignError, match="'fp8'"):
        prec.resolve_precision("fp8", "cpu")
    assert prec.resolve_precision("fp32", "cpu", probe=lambda: 1 / 0) == ("fp32", "asked for fp32")  # never probes


def test_probe_runs_once_per_process(monkeypatch):
    calls = []
    monkeypatch.setattr(prec, "probe_bf16_cpu", lambda: calls.append(1) or (1.0, 2.0))
    for _ in range(3):
        prec.resolve_precision("auto", "cpu", capability="AVX512", native=True)
    assert len(calls) == 1


class _Records(logging.Handler):
    """Every record of one logger as (level, message); radalign's loggers do not propagate to caplog's root."""

    def __init__(self):
        super().__init__()
        self.got: list[tuple[str, str]] = []

    def emit(self, record):
        self.got.append((record.levelname, record.getMessage()))

    @property
    def text(self) -> str:
        return "\n".join(m for _, m in self.got)


@contextlib.contextmanager
def _captured(name: str):
    logger = get_logger(name)
    handler = _Records()
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


@pytest.fixture
def precision_log():
    with _captured("radalign.precision") as records:
        yield records.got


@pytest.fixture
def training_log():
    with _captured("radalign.training") as records:
        yield records


# (name, compute capability, bf16 emulated where not native): what torch.cuda reports on these cards
GPUS = {"A100": ("NVIDIA A100-SXM4-80GB", (8, 0), True), "H100": ("NVIDIA H100 80GB HBM3", (9, 0), True),
        "V100": ("Tesla V100-SXM2-16GB", (7, 0), True), "T4": ("Tesla T4", (7, 5), True),
        "P100": ("Tesla P100-PCIE-16GB", (6, 0), False)}


def _fake_cuda(monkeypatch, gpu: str | None):
    """Mock torch.cuda as on `gpu` (None: no CUDA device), modelling torch's own is_bf16_supported: True from
    compute capability 8.0, and below it True by default where bf16 can be emulated (including_emulation)."""
    if gpu is None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
        return
    name, cap, emulates = GPUS[gpu]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: cap[0] >= 8 or (including_emulation and emulates))


@pytest.mark.parametrize("gpu,expected", [("A100", "bf16"), ("H100", "bf16"), ("V100", "fp32"), ("T4", "fp32"),
                                          ("P100", "fp32")])
def test_auto_on_cuda_picks_bf16_only_where_native_and_logs_why(monkeypatch, precision_log, gpu, expected):
    _fake_cuda(monkeypatch, gpu)
    for device in ("cuda", "cuda:0", torch.device("cuda", 0)):
        precision_log.clear()
        choice, reason = prec.resolve_precision("auto", device, probe=lambda: 1 / 0)  # the CPU probe never runs
        assert choice == expected, (gpu, device)
        name, (major, minor), _ = GPUS[gpu]
        assert name in reason and f"{major}.{minor}" in reason
        assert ("natively" in reason) == (expected == "bf16") and ("no native bf16" in reason) == (expected == "fp32")
        if expected == "fp32":
            assert "precision=fp16" in reason  # fp16 only when asked, never picked by auto
            assert ("(only emulated)" in reason) == (gpu in ("V100", "T4"))  # a P100 has no bf16 at all
        assert precision_log == [("INFO", f"precision {expected} (requested auto): {reason}")]


def test_explicit_precisions_on_cuda(monkeypatch, precision_log):
    _fake_cuda(monkeypatch, "V100")
    assert prec.resolve_precision("fp16", "cuda")[0] == "fp16"  # honoured, never changed
    assert prec.resolve_precision("fp32", "cuda")[0] == "fp32"
    precision_log.clear()
    choice, reason = prec.resolve_precision("bf16", "cuda")  # emulated on a V100: honoured with a warning
    assert choice == "bf16" and "emulated" in reason
    assert precision_log[0] == ("WARNING", "precision=bf16 on Tesla V100-SXM2-16GB (compute capability 7.0): bf16 is "
                                "only emulated there (no bf16 tensor cores), so training will be slower than fp32. "
                                "Use precision=auto (fp32) or precision=fp16.")
    _fake_cuda(monkeypatch, "P100")
    with pytest.raises(RadalignError, match=r"precision=bf16: Tesla P100.* does not support bf16; use precision=auto"):
        prec.resolve_precision("bf16", "cuda")
    _fake_cuda(monkeypatch, "A100")
    precision_log.clear()
    assert prec.resolve_precision("bf16", "cuda")[0] == "bf16"
    assert [lvl for lvl, _ in precision_log] == ["INFO"]  # no warning where bf16 is native


def test_auto_with_cuda_named_but_not_visible_is_fp32(monkeypatch, precision_log):
    _fake_cuda(monkeypatch, None)
    choice, reason = prec.resolve_precision("auto", "cuda")
    assert choice == "fp32" and reason.startswith("CUDA device (none visible) has no native bf16;")
    with pytest.raises(RadalignError, match="does not support bf16"):
        prec.resolve_precision("bf16", "cuda")


def test_auto_on_cpu_logs_the_choice_and_the_measurement(monkeypatch, precision_log):
    _fake_cuda(monkeypatch, "A100")  # a GPU in the machine does not change a CPU run's choice
    choice, reason = prec.resolve_precision("auto", "cpu", probe=lambda: (0.010, 0.030), capability="AVX2",
                                            native=False)
    assert choice == "fp32"
    assert precision_log == [("INFO", f"precision fp32 (requested auto): {reason}")]
    assert "3.00x the fp32 time (30.0 vs 10.0 ms)" in reason
    slow_ms = prec.resolve_precision("auto", "cpu", probe=lambda: (0.100, 0.300), capability="AVX2", native=False)[1]
    assert "3.00x the fp32 time (300.0 vs 100.0 ms)" in slow_ms
    precision_log.clear()
    choice, reason = prec.resolve_precision("auto", torch.device("cpu"), probe=lambda: (0.010, 0.004),
                                            capability="AVX512_BF16", native=True)
    assert choice == "bf16" and precision_log == [("INFO", f"precision bf16 (requested auto): {reason}")]


def test_auto_on_cpu_detects_native_bf16_itself(monkeypatch):
    """Without injected `native`/`capability`: the CPU's flags and ATen's dispatch level decide."""
    fast = lambda: (1.0, 0.5)  # noqa: E731
    monkeypatch.setattr(prec, "cpu_has_bf16_unit", lambda cpuinfo=None: True)
    monkeypatch.setattr(prec, "cpu_capability", lambda: "AVX512")
    choice, reason = prec.resolve_precision("auto", "cpu", probe=fast)
    assert choice == "bf16" and "CPU capability AVX512, native bf16;" in reason
    monkeypatch.setattr(prec, "cpu_capability", lambda: "AVX2")  # ATEN_CPU_CAPABILITY=avx2 on the same CPU
    assert prec.resolve_precision("auto", "cpu", probe=fast)[0] == "fp32"
    monkeypatch.setattr(prec, "cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(prec, "cpu_has_bf16_unit", lambda cpuinfo=None: False)
    choice, reason = prec.resolve_precision("auto", "cpu", probe=fast)
    assert choice == "fp32" and "CPU capability AVX512, no native bf16 (autocast emulates it); probe:" in reason


def test_faster_means_strictly_under_the_margin():
    at = lambda: (1.0, prec.FASTER)  # noqa: E731  exactly at the margin: not faster
    assert prec.resolve_precision("auto", "cpu", probe=at, capability="AVX512", native=True)[0] == "fp32"
    under = lambda: (1.0, 0.94)  # noqa: E731
    assert prec.resolve_precision("auto", "cpu", probe=under, capability="AVX512", native=True)[0] == "bf16"
    assert prec.resolve_precision("auto", "cpu", probe=lambda: (0.0, 0.1), capability="AVX512",
                                  native=True)[0] == "fp32"  # a zero fp32 time: no division, not faster


@pytest.mark.parametrize("flags,expected", [("avx512_bf16", True), ("amx_bf16", True), ("avx512f avx2", False)])
def test_each_bf16_flag_counts_on_x86(flags, expected):
    assert prec.cpu_has_bf16_unit(f"processor : 0\nflags\t\t: fpu sse2 {flags}\n") is expected


def test_every_processor_must_report_bf16():
    with_flag, without = "flags\t\t: fpu avx512f avx512_bf16\n", "flags\t\t: fpu avx512f\n"
    cpus = lambda *lines: "".join(f"processor : {i}\n{x}\n" for i, x in enumerate(lines))  # noqa: E731
    assert prec.cpu_has_bf16_unit(cpus(with_flag, with_flag))
    assert not prec.cpu_has_bf16_unit(cpus(with_flag, without))
    assert not prec.cpu_has_bf16_unit(cpus(without, with_flag))
    assert not prec.cpu_has_bf16_unit("processor : 0\nmodel name : x\n")  # no flags line at all


def test_native_levels_by_hand():
    for cap, native in [("AVX512", True), ("AVX512_BF16", True), ("avx512", True), ("SVE256", True), ("sve", True),
                        ("AVX2", False), ("DEFAULT", False), ("NEON", False)]:
        assert prec.native_bf16(cap, True) is native, cap


def test_probe_times_fp32_without_autocast_and_bf16_with_it(monkeypatch):
    seen = []
    real = torch.autocast

    class Spy(real):
        def __init__(self, device_type, dtype=None, enabled=True, **kw):
            seen.append((device_type, dtype, enabled))
            super().__init__(device_type, dtype=dtype, enabled=enabled, **kw)

    monkeypatch.setattr(torch, "autocast", Spy)
    fp32_s, bf16_s = prec.probe_bf16_cpu(repeats=2)
    assert fp32_s > 0 and bf16_s > 0
    # warm-up (one of each) then 2 interleaved repeats: fp32 plain, bf16 under bf16 autocast
    assert seen == [("cpu", torch.bfloat16, False), ("cpu", torch.bfloat16, True)] * 3


def test_arm_features_line_and_the_host_cpuinfo(monkeypatch):
    assert prec.cpu_has_bf16_unit("processor : 0\nFeatures : fp asimd sve bf16 i8mm\n")
    assert not prec.cpu_has_bf16_unit("processor : 0\nFeatures : fp asimd\nmodel name : bf16 in a name\n")
    from pathlib import Path

    try:  # the host's own /proc/cpuinfo, parsed here by hand
        text = Path("/proc/cpuinfo").read_text()
        host = any(f in line.split(":", 1)[1].split() for line in text.splitlines()
                   if line.lower().startswith(("flags", "features")) for f in ("avx512_bf16", "amx_bf16", "bf16"))
    except OSError:
        host = False
    assert prec.cpu_has_bf16_unit() is host

    def unreadable(self, *a, **k):
        raise OSError("no /proc here")

    monkeypatch.setattr(Path, "read_text", unreadable)
    assert prec.cpu_has_bf16_unit() is False  # no cpuinfo: not native (never a guess of yes)


def test_agreed_precision_on_cuda_resolves_locally(monkeypatch):
    from radalign.training import _agreed_precision

    _fake_cuda(monkeypatch, "T4")
    monkeypatch.setenv("WORLD_SIZE", "2")  # CUDA ranks see the same GPU model: no broadcast needed
    assert _agreed_precision("auto", "cuda")[0] == "fp32"


def test_real_probe_is_sub_second_scale_and_positive():
    fp32_s, bf16_s = prec.probe_bf16_cpu(repeats=1)
    assert 0 < fp32_s < 5 and 0 < bf16_s < 20  # generous: the CI machine is shared


# ----------------------------------------------------------------------------------------------------------
# Checkpoints


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.logit_scale = nn.Parameter(torch.ones(1))


def _trained(seed: int = 0, steps: int = 3):
    torch.manual_seed(seed)
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for _ in range(steps):
        (model.lin(torch.randn(5, 4)).pow(2).mean() * model.logit_scale).sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, sched


def _save_steps(run_dir, steps=(4, 8, 12), keep=3) -> CheckpointManager:
    model, opt, sched = _trained()
    ckpt = CheckpointManager(run_dir, keep=keep)
    for s in steps:
        with torch.no_grad():
            model.lin.bias.fill_(float(s))  # each checkpoint's weights say which step they are
        ckpt.save(s, model=model, optimizer=opt, scheduler=sched, state={"segment": s})
    return ckpt


def test_checkpoint_round_trip_is_exact_and_pickle_free(tmp_path):
    model, opt, sched = _trained()
    ckpt = CheckpointManager(tmp_path / "run", keep=2)
    rng_before = get_rng_state()
    path = ckpt.save(3, model=model, optimizer=opt, scheduler=sched, state={"segment": 0, "note": "x"})
    expected_draw = torch.rand(3)
    files = sorted(p.name for p in path.iterdir())
    assert files == ["checksums.json", "model.safetensors", "optimizer.json", "optimizer.safetensors",
                     "rng-000.safetensors", "scheduler.json", "trainer_state.json"]
    assert not [p for p in path.rglob("*") if p.suffix in (".pkl", ".bin", ".pt")]
    sums = json.loads((path / "checksums.json").read_text())["files"]
    import hashlib

    for name, digest in sums.items():  # independent sha256 of every file
        assert hashlib.sha256((path / name).read_bytes()).hexdigest() == digest

    fresh, fresh_opt, fresh_sched = _trained(seed=1, steps=1)
    loaded = CheckpointManager(tmp_path / "run").load(path, model=fresh, optimizer=fresh_opt, scheduler=fresh_sched)
    assert loaded.step == 3 and loaded.state == {"segment": 0, "note": "x"}
    for (n, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), n
    for p_a, p_b in zip(model.parameters(), fresh.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p_a][key], fresh_opt.state[p_b][key]), key
    assert fresh_sched.last_epoch == sched.last_epoch == 3
    assert fresh_opt.param_groups[0]["lr"] == pytest.approx(0.1 / 4)
    torch.rand(5)  # move the RNG on, then restore the checkpoint's
    set_rng_state(loaded.rng)
    assert torch.equal(torch.rand(3), expected_draw)
    set_rng_state(rng_before)


def test_latest_naming_a_missing_folder_falls_back_to_newest_verified(tmp_path, training_log):
    ckpt = _save_steps(tmp_path / "run")
    shutil.rmtree(ckpt.root / "step-0000012")
    assert (ckpt.root / "latest").read_text().strip() == "step-0000012"
    assert ckpt.resolve("auto") == ckpt.root / "step-0000008"
    assert ckpt.resolve("latest") == ckpt.root / "step-0000008"
    assert (f"{ckpt.root / 'latest'} names step-0000012, which does not exist; looking for the newest complete "
            "checkpoint") in training_log.text


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_newest_checkpoint_is_named_and_skipped(tmp_path, training_log, damage):
    ckpt = _save_steps(tmp_path / "run")
    target = ckpt.root / "step-0000012" / "model.safetensors"
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2] if damage == "truncate" else data[:-1] + bytes([data[-1] ^ 1]))
    chosen = ckpt.resolve("latest")
    assert chosen == ckpt.root / "step-0000008"
    err = training_log.text
    assert "step-0000012/model.safetensors: damaged" in err and "falling back" in err
    # the damaged folder is kept aside, never overwritten by the resumed run
    assert not (ckpt.root / "step-0000012").exists()
    moved = list((ckpt.root / "damaged").iterdir())
    assert len(moved) == 1 and moved[0].name.startswith("step-0000012") and (moved[0] / "model.safetensors").is_file()
    model, opt, sched = _trained(seed=5, steps=1)
    loaded = ckpt.load(chosen, model=model, optimizer=opt, scheduler=sched)
    assert loaded.step == 8 and float(model.lin.bias.detach()[0]) == 8.0


def test_explicit_damaged_folder_is_an_error_naming_file_and_fallback(tmp_path):
    ckpt = _save_steps(tmp_path / "run")
    (ckpt.root / "step-0000012" / "optimizer.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(RadalignError) as e:
        ckpt.resolve(str(ckpt.root / "step-0000012"))
    msg = str(e.value)
    assert "optimizer.safetensors: damaged" in msg and "step-0000008" in msg


def test_never_start_fresh_or_overwrite_when_checkpoints_exist(tmp_path):
    ckpt = _save_steps(tmp_path / "run")
    with pytest.raises(RadalignError, match="already holds checkpoints"):
        ckpt.resolve(None)
    # an older folder while a newer verified one exists: continuing would overwrite another history
    with pytest.raises(RadalignError, match="another run history"):
        ckpt.resolve(str(ckpt.root / "step-0000004"))
    # every checkpoint damaged: auto must not start fresh
    for p in ckpt.checkpoints():
        (p / "checksums.json").unlink()
    with pytest.raises(RadalignError, match="no complete checkpoint"):
        CheckpointManager(tmp_path / "run").resolve("auto")
    assert CheckpointManager(tmp_path / "empty").resolve("auto") is None  # nothing there: fresh is fine


def test_save_refuses_to_overwrite_a_checkpoint_of_another_run(tmp_path):
    _save_steps(tmp_path / "run", steps=(4,))
    model, opt, sched = _trained()
    other = CheckpointManager(tmp_path / "run")  # a new history (fresh run_id)
    before = (tmp_path / "run" / "checkpoints" / "step-0000004" / "model.safetensors").read_bytes()
    with pytest.raises(RadalignError, match="another run history"):
        other.save(4, model=model, optimizer=opt, scheduler=sched)
    assert (tmp_path / "run" / "checkpoints" / "step-0000004" / "model.safetensors").read_bytes() == before


def test_planted_pickle_in_checkpoint_folder_never_runs(tmp_path, training_log):
    ckpt = _save_steps(tmp_path / "run", steps=(4,))
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = ckpt.root / "step-0000004"
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin"):
        (folder / name).write_bytes(pickle.dumps(Evil()))
    model, opt, sched = _trained(seed=3)
    chosen = ckpt.resolve(str(folder))
    ckpt.load(chosen, model=model, optimizer=opt, scheduler=sched)
    assert not marker.exists()
    assert ("file(s) not written by radalign, ignored and never opened: custom_checkpoint_0.pkl, optimizer.bin, "
            "random_states_0.pkl, scheduler.bin") in training_log.text  # named, never opened


def test_prune_keeps_the_newest_complete_checkpoints(tmp_path):
    ckpt = _save_steps(tmp_path / "run", steps=(1, 2, 3, 4), keep=2)
    assert [p.name for p in ckpt.checkpoints()] == ["step-0000003", "step-0000004"]


def test_non_json_state_is_refused_not_pickled(tmp_path):
    model, opt, sched = _trained()
    with pytest.raises(RadalignError, match="not JSON data"):
        CheckpointManager(tmp_path / "run").save(1, model=model, state={"sampler": object()})


def test_rng_state_covers_numpy_and_python(tmp_path):
    import random

    state = get_rng_state()
    expected = (np.random.rand(3), random.random(), torch.rand(2))
    np.random.rand(7), random.random(), torch.rand(4)
    set_rng_state(state)
    assert np.array_equal(np.random.rand(3), expected[0]) and random.random() == expected[1]
    assert torch.equal(torch.rand(2), expected[2])


# ----------------------------------------------------------------------------------------------------------
# Meter (NaN guard) and MetricLogger


class _Acc:
    num_processes = 1


def test_meter_names_the_first_non_finite_step_and_the_last_good_checkpoint():
    meter = Meter(_Acc())
    for step, v in [(1, 2.0), (2, 4.0)]:
        meter.add(step, torch.tensor(v), samples=8)
    row = meter.summary()
    assert row["loss"] == 3.0 and row["samples_per_s"] > 0
    for step, v in [(3, 1.0), (4, math.nan), (5, math.inf)]:
        meter.add(step, torch.tensor(v), samples=8)
    with pytest.raises(NonFiniteLoss, match="at step 4") as e:
        meter.check(last_good="checkpoints/step-0000002", hint="Lower optim.lr.")
    assert e.value.step == 4 and "step-0000002" in str(e.value) and "Lower optim.lr" in str(e.value)


def test_metric_logger_moves_rows_after_the_resumed_step(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "loss": float(s)} for s in range(1, 13)] + [{"step": 12, "val/x": 0.5}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 13, "lo')
    logger = MetricLogger(run, tensorboard=False)
    assert logger.start(8) == 6  # steps 9..12 (4 rows), the val row of 12, the half-written line
    logger.log(9, {"loss": 99.0})
    kept = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in kept] == [1, 2, 3, 4, 5, 6, 7, 8, 9] and kept[-1]["loss"] == 99.0
    moved = (run / "metrics.superseded.jsonl").read_text().splitlines()
    assert len(moved) == 6 and json.loads(moved[0]) == {"step": 9, "loss": 9.0}


def test_model_weights_are_safetensors_loadable_without_radalign(tmp_path):
    model, opt, sched = _trained()
    path = CheckpointManager(tmp_path / "run").save(1, model=model, optimizer=opt, scheduler=sched)
    weights = load_file(str(path / "model.safetensors"))
    assert torch.equal(weights["lin.weight"], model.lin.weight.detach())


# ----------------------------------------------------------------------------------------------------------
# Non-finite loss: NaN, +inf and -inf all stop, on any rank


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_every_non_finite_loss_stops_alone(bad):
    meter = Meter(_Acc())
    for step, v in [(10, 1.0), (11, bad), (12, 0.5)]:
        meter.add(step, torch.tensor(v), samples=4)
    with pytest.raises(NonFiniteLoss, match=f"loss became {bad} at step 11") as e:
        meter.summary()
    assert e.value.step == 11


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_non_finite_in_low_precision_losses_stops(dtype):
    meter = Meter(_Acc())
    meter.add(1, torch.tensor(1.0, dtype=dtype), samples=4)
    meter.add(2, torch.tensor(65504.0, dtype=dtype) * 2, samples=4)  # overflows to inf in fp16 (not in bf16/fp32)
    if dtype == torch.float16:
        with pytest.raises(NonFiniteLoss, match="at step 2"):
            meter.check()
    else:
        meter.check()  # finite: no stop
        assert meter.values == [1.0, pytest.approx(131008.0, rel=1e-2)]  # bf16 rounds 65504 to 65536


class _TwoRanks:
    """A fake 2-process accelerator: `reduce` adds the other rank's non-finite flags (sum over ranks)."""

    num_processes = 2

    def __init__(self, other_bad: list[float]):
        self.other_bad = torch.tensor(other_bad)

    def reduce(self, t, reduction="sum"):
        assert reduction == "sum"
        return t + self.other_bad


def test_a_non_finite_loss_on_another_rank_stops_this_one():
    meter = Meter(_TwoRanks([0.0, 1.0, 0.0]))  # the other rank's step 6 was inf; ours were finite
    for step, v in [(5, 1.0), (6, 2.0), (7, 3.0)]:
        meter.add(step, torch.tensor(v), samples=4)
    with pytest.raises(NonFiniteLoss, match="at step 6") as e:
        meter.check()
    assert e.value.step == 6
    fine = Meter(_TwoRanks([0.0, 0.0]))
    fine.add(1, torch.tensor(1.0), samples=4)
    fine.add(2, torch.tensor(3.0), samples=4)
    assert fine.summary()["loss"] == 2.0


# ----------------------------------------------------------------------------------------------------------
# Pruning: the newest `keep` COMPLETE checkpoints stay; incomplete and forensic folders are never deleted


def _folder_bytes(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_prune_never_deletes_incomplete_or_forensic_folders(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    planted = {
        "step-0000001": {"model.safetensors": b"half written"},  # a crashed writer's folder (no checksums.json)
        "step-0000005": {"trainer_state.json": b"{}", "model.safetensors": b"x"},  # incomplete, between saves
        "damaged/step-0000003-20261201T000000": {"model.safetensors": b"kept for forensics", "checksums.json": b"{}"},
        ".step-0000009.tmp": {"model.safetensors": b"being written"},  # another save still in progress
    }
    for folder, files in planted.items():
        (root / folder).mkdir(parents=True)
        for name, data in files.items():
            (root / folder / name).write_bytes(data)
    before = {folder: _folder_bytes(root / folder) for folder in planted}
    ckpt = _save_steps(tmp_path / "run", steps=(2, 4, 6, 8), keep=2)
    assert {folder: _folder_bytes(root / folder) for folder in planted} == before  # untouched, byte for byte
    complete = [p.name for p in ckpt.checkpoints() if (p / "checksums.json").is_file()]
    assert complete == ["step-0000006", "step-0000008"]  # incomplete folders do not count toward keep
    assert sorted(p.name for p in root.iterdir()) == [".step-0000009.tmp", "damaged", "latest", "step-0000001",
                                                      "step-0000005", "step-0000006", "step-0000008"]
    assert ckpt.resolve("latest") == root / "step-0000008"


@pytest.mark.parametrize("keep,expected", [(0, ["step-0000004"]), (1, ["step-0000004"]),
                                           (3, ["step-0000002", "step-0000003", "step-0000004"]),
                                           (9, ["step-0000001", "step-0000002", "step-0000003", "step-0000004"])])
def test_prune_keeps_exactly_the_newest_complete(tmp_path, keep, expected):
    ckpt = _save_steps(tmp_path / "run", steps=(1, 2, 3, 4), keep=keep)
    assert [p.name for p in ckpt.checkpoints()] == expected
    model, opt, sched = _trained(seed=2)
    assert ckpt.load(ckpt.resolve("latest"), model=model, optimizer=opt, scheduler=sched).step == 4


def test_prune_orders_by_step_number_not_by_name(tmp_path):
    ckpt = _save_steps(tmp_path / "run", steps=(9_999_999, 10_000_000, 10_000_001), keep=2)
    assert [p.name for p in ckpt.checkpoints()] == ["step-10000000", "step-10000001"]


# ----------------------------------------------------------------------------------------------------------
# Weight decay groups, by parameter name


def _groups_by_name(model, opt) -> tuple[set[str], set[str]]:
    name_of = {id(p): n for n, p in model.named_parameters()}
    (decay, no_decay) = opt.param_groups
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    d, nd = [name_of[id(p)] for p in decay["params"]], [name_of[id(p)] for p in no_decay["params"]]
    assert len(d) == len(set(d)) and len(nd) == len(set(nd)) and not set(d) & set(nd)  # each once
    return set(d), set(nd)


class _HandBuilt(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)  # a 2-D table: decayed (as open_clip's token embedding)
        self.cls = nn.Parameter(torch.zeros(8))  # a 1-D embedding: not decayed
        self.proj = nn.Linear(8, 8)
        self.conv = nn.Conv1d(8, 8, 3)
        self.ln2d = nn.LayerNorm((4, 8))  # normalises the last two dims: a 2-D weight and bias, still a norm
        self.bn = nn.BatchNorm1d(8)
        self.gn = nn.GroupNorm(2, 8)
        self.rms = nn.RMSNorm(8)
        self.rel_bias = nn.Parameter(torch.zeros(5, 5))  # a 2-D bias table (relative position bias)
        self.attn_in_proj_bias = nn.Parameter(torch.zeros(24))
        self.logit_scale = nn.Parameter(torch.ones(1, 1))  # [1, 1] as some ports store it: excluded by name
        self.logit_bias = nn.Parameter(torch.zeros(1))
        self.debias = nn.Linear(8, 8, bias=False)  # "bias" in a module's name: its weight is still a weight
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)


def test_weight_decay_groups_on_a_hand_built_module():
    from radalign.training import adamw

    model = _HandBuilt()
    decay, no_decay = _groups_by_name(model, adamw(model, lr=1e-3, weight_decay=0.2))
    assert decay == {"emb.weight", "proj.weight", "conv.weight", "debias.weight"}
    assert no_decay == {"cls", "proj.bias", "conv.bias", "ln2d.weight", "ln2d.bias", "bn.weight", "bn.bias",
                        "gn.weight", "gn.bias", "rms.weight", "rel_bias", "attn_in_proj_bias", "logit_scale",
                        "logit_bias"}  # frozen.* in neither group


def test_lr_by_prefix_puts_those_parameters_in_their_own_groups_with_the_decay_rule_kept():
    from radalign.training import adamw

    model = _HandBuilt()
    opt = adamw(model, lr=1e-3, weight_decay=0.2, lr_of={"proj.": 5e-5, "ln": 7e-4})
    names = {id(p): n for n, p in model.named_parameters()}
    got = {(g["lr"], g["weight_decay"]): {names[id(p)] for p in g["params"]} for g in opt.param_groups}
    assert got == {
        (1e-3, 0.2): {"emb.weight", "conv.weight", "debias.weight"},
        (1e-3, 0.0): {"cls", "conv.bias", "bn.weight", "bn.bias", "gn.weight", "gn.bias", "rms.weight", "rel_bias",
                      "attn_in_proj_bias", "logit_scale", "logit_bias"},
        (5e-5, 0.2): {"proj.weight"}, (5e-5, 0.0): {"proj.bias"},
        (7e-4, 0.0): {"ln2d.weight", "ln2d.bias"}}  # no decayed parameter under "ln": that group is left out
    nested = adamw(model, lr=1e-3, weight_decay=0.2, lr_of={"proj": 5e-5, "proj.bias": 1e-6})  # longest wins
    got = {g["lr"]: {names[id(p)] for p in g["params"]} for g in nested.param_groups if g["lr"] != 1e-3}
    assert got == {5e-5: {"proj.weight"}, 1e-6: {"proj.bias"}}
    plain = adamw(model, lr=1e-3, weight_decay=0.2)  # no lr_of: the two groups as ever (old checkpoints resume)
    assert [(g["lr"], g["weight_decay"], len(g["params"])) for g in plain.param_groups] == [(1e-3, 0.2, 4),
                                                                                          (1e-3, 0.0, 14)]


def _expected_no_decay(name: str) -> bool:
    """Written by hand from the towers' parameter lists: norms are the ln_* (open_clip) and LayerNorm (BERT)
    modules; biases end in bias; the logit scale/bias; the 1-D class embedding."""
    parts = name.split(".")
    norm = any(p.startswith("ln_") or p == "LayerNorm" for p in parts[:-1])
    return norm or parts[-1] in ("bias", "in_proj_bias", "logit_scale", "logit_bias", "class_embedding")


@pytest.mark.parametrize("config", ["nano", "tiny-minilm"])
def test_weight_decay_groups_on_real_towers(nano_model_cfg, config):
    from radalign.pretrain.models import build_model, get_model_config

    from radalign.training import adamw

    cfg = dict(nano_model_cfg, init_logit_bias=-10.0) if config == "nano" else get_model_config(config)
    model = build_model(cfg)
    decay, no_decay = _groups_by_name(model, adamw(model, lr=1e-3, weight_decay=0.2))
    names = {n for n, _ in model.named_parameters()}
    assert decay | no_decay == names
    assert no_decay == {n for n in names if _expected_no_decay(n)}
    spot = {"logit_scale": False, "visual.class_embedding": False, "visual.ln_pre.weight": False,
            "visual.conv1.weight": True, "visual.positional_embedding": True, "visual.proj": True,
            "visual.transformer.resblocks.0.attn.in_proj_weight": True,
            "visual.transformer.resblocks.0.attn.in_proj_bias": False,
            "visual.transformer.resblocks.1.ln_2.bias": False}
    if config == "nano":
        spot.update({"logit_bias": False, "token_embedding.weight": True, "positional_embedding": True,
                     "text_projection": True, "ln_final.weight": False})
    else:
        spot.update({"text.transformer.embeddings.word_embeddings.weight": True,
                     "text.transformer.embeddings.LayerNorm.weight": False,
                     "text.transformer.encoder.layer.0.output.LayerNorm.bias": False,
                     "text.transformer.encoder.layer.0.attention.self.query.weight": True, "text.proj.weight": True})
    for name, decayed in spot.items():
        assert (name in decay) == decayed and (name in no_decay) != decayed, name


# ----------------------------------------------------------------------------------------------------------
# Distribution helpers, on CPU with fakes (the survivors of `make mutate` in radalign/training.py)


def test_deepspeed_file_from_our_key_or_the_accelerate_launch_config(monkeypatch):
    from radalign.training import deepspeed_file

    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "/cfg/ds.json")
    assert deepspeed_file(None) is None  # the file alone does not turn DeepSpeed on
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "True")
    assert deepspeed_file(None) == "/cfg/ds.json"
    assert deepspeed_file("zero2") == "zero2"  # our key wins
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
    assert deepspeed_file(None) is None


def test_load_deepspeed_config_takes_batch_and_clip_from_our_config(tmp_path):
    from radalign.training import load_deepspeed_config

    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_batch_size": 512,
                             "gradient_accumulation_steps": 4, "gradient_clipping": "auto"}))
    ds = load_deepspeed_config(str(f), micro_batch=32, grad_clip=None)
    assert ds == {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 32,
                  "gradient_accumulation_steps": 1, "gradient_clipping": 0.0}
    assert load_deepspeed_config(str(f), micro_batch=8, grad_clip=1.5)["gradient_clipping"] == 1.5


@pytest.mark.parametrize("precision,dtype", [("bf16", "bfloat16"), ("fp16", "float16"), ("fp32", None)])
def test_deepspeed_precision_is_torch_autocast_of_the_resolved_precision(precision, dtype):
    """bf16/fp16 reach DeepSpeed as torch_autocast (fp32 weights); its bf16/fp16 sections, which cast the weights
    to 16 bits (and then fail on float32 images), stay off whatever the JSON says."""
    from radalign.training import deepspeed_with_precision

    ds = {"bf16": {"enabled": "auto", "immediate_grad_update": True},
          "fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 12}, "zero_optimization": {"stage": 3},
          "torch_autocast": {"lower_precision_safe_modules": ["torch.nn.Linear"]}}
    got = deepspeed_with_precision(ds, precision)
    autocast = {"lower_precision_safe_modules": ["torch.nn.Linear"], "enabled": dtype is not None}
    assert got == {"bf16": {"enabled": False, "immediate_grad_update": True},
                   "fp16": {"enabled": False, "loss_scale": 0, "initial_scale_power": 12},
                   "zero_optimization": {"stage": 3},
                   "torch_autocast": autocast if dtype is None else {**autocast, "dtype": dtype}}
    assert ds["bf16"] == {"enabled": "auto", "immediate_grad_update": True}  # the caller's dict is not changed
    assert ds["torch_autocast"] == {"lower_precision_safe_modules": ["torch.nn.Linear"]}
    bare = {"bf16": {"enabled": False}, "fp16": {"enabled": False}, "torch_autocast": {"enabled": dtype is not None}}
    if dtype:
        bare["torch_autocast"]["dtype"] = dtype
    assert deepspeed_with_precision({}, precision) == bare


@pytest.mark.parametrize("stage", [2, 3])
def test_accelerator_arguments_for_deepspeed_on_cpu(stage, monkeypatch):
    """On a CPU, DeepSpeed needs cpu=False (Accelerate drops the plugin `and not cpu`) with gloo; without
    DeepSpeed, cpu=True keeps torchrun launches one job. The plugin carries our config, read without running it."""
    import deepspeed.ops

    from radalign.training import _accelerator_kwargs, load_deepspeed_config

    monkeypatch.setitem(deepspeed.ops.__compatible_ops__, "deepspeed_shm_comm", True)
    ds = load_deepspeed_config(f"zero{stage}", micro_batch=6, grad_clip=None)
    kw = _accelerator_kwargs(False, 2, ds, "bf16", False)
    assert kw["cpu"] is False and [h.backend for h in kw["kwargs_handlers"]] == ["gloo"]
    plugin = kw["deepspeed_plugin"]
    assert plugin.zero_stage == stage and plugin.gradient_clipping == 0.0
    cfg = plugin.deepspeed_config
    assert cfg["train_micro_batch_size_per_gpu"] == 6 and cfg["gradient_accumulation_steps"] == 1
    assert cfg["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and not cfg["bf16"]["enabled"]
    # the inference-only shared-memory op is not compiled (a C++ build at the first collective otherwise)
    assert deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is False

    ddp = _accelerator_kwargs(False, 2, None, "fp32", True)
    assert ddp["cpu"] is True and "deepspeed_plugin" not in ddp
    assert [type(h).__name__ for h in ddp["kwargs_handlers"]] == ["InitProcessGroupKwargs", "DistributedDataParallelKwargs"]
    assert _accelerator_kwargs(False, 1, None, "fp32", False) == {"kwargs_handlers": [], "cpu": True}
    on_gpu = _accelerator_kwargs(True, 2, ds, "fp32", False)
    assert on_gpu["cpu"] is False and on_gpu["kwargs_handlers"] == []  # NCCL: Accelerate's default backend


@pytest.mark.parametrize("started,processes,problem", [
    ("DEEPSPEED", 2, None),
    ("MULTI_CPU", 2, "deepspeed: Accelerate started MULTI_CPU, not DeepSpeed"),
    ("DEEPSPEED", 1, "WORLD_SIZE=2 processes but Accelerate sees 1"),
])
def test_an_accelerator_that_would_not_train_as_launched_is_refused(started, processes, problem):
    from types import SimpleNamespace

    from radalign.training import _check_started

    acc = SimpleNamespace(distributed_type=started, num_processes=processes)
    if problem is None:
        _check_started(acc, 2, deepspeed=True)
    else:
        with pytest.raises(RadalignError, match=problem):
            _check_started(acc, 2, deepspeed=True)
    _check_started(SimpleNamespace(distributed_type="MULTI_CPU", num_processes=2), 2, deepspeed=False)


def test_agreed_precision_needs_no_process_group_for_fixed_choices(monkeypatch):
    import torch.distributed as dist

    from radalign.training import _agreed_precision

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("no collective for a fixed choice"))
    assert _agreed_precision("fp32", "cpu")[0] == "fp32"
    with pytest.raises(RadalignError, match="fp16 needs CUDA"):
        _agreed_precision("fp16", "cpu")


class _State:
    def __init__(self, plugin=None):
        self.deepspeed_plugin = plugin


class _FakeAcc:
    def __init__(self, plugin=None, main=True, processes=1):
        self.state, self.is_main_process, self.num_processes = _State(plugin), main, processes

    def unwrap_model(self, model):
        return model.module


def test_eval_module_and_is_deepspeed():
    from types import SimpleNamespace

    from radalign.training import eval_module, is_deepspeed

    wrapped = SimpleNamespace(module="core")
    assert eval_module(_FakeAcc(), wrapped) == "core" and not is_deepspeed(_FakeAcc())
    zero2, zero3 = SimpleNamespace(zero_stage=2), SimpleNamespace(zero_stage=3)
    assert eval_module(_FakeAcc(zero2), wrapped) == "core" and is_deepspeed(_FakeAcc(zero2))
    assert eval_module(_FakeAcc(zero3), wrapped) is wrapped  # the engine: parameters are partitioned
    bare = SimpleNamespace(state=SimpleNamespace(), unwrap_model=lambda m: m.module)  # no plugin attribute at all
    assert eval_module(bare, wrapped) == "core" and not is_deepspeed(bare)


def test_gather_to_main_in_one_process():
    from radalign.training import gather_to_main

    assert gather_to_main(_FakeAcc(main=True), {"a": 1}) == [{"a": 1}]
    assert gather_to_main(_FakeAcc(main=False), {"a": 1}) is None


def test_peak_memory_in_gib(monkeypatch):
    from radalign.training import peak_memory_gb

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 3 * 2**30)
    assert peak_memory_gb() == 3.0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    import resource

    assert peak_memory_gb() == pytest.approx(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, rel=0.05)


def test_find_unused_parameters_reaches_ddp(monkeypatch):
    from radalign.training import make_accelerator, reset_accelerate_state

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    try:
        acc, precision, _ = make_accelerator("fp32", find_unused_parameters=True)
        assert precision == "fp32" and acc.ddp_handler is not None and acc.ddp_handler.find_unused_parameters
        reset_accelerate_state()
        acc, _, _ = make_accelerator("fp32")
        assert acc.ddp_handler is None and acc.mixed_precision == "no"
        reset_accelerate_state()
        monkeypatch.setattr(prec, "_cached_probe", lambda: (1.0, 0.5))  # an explicit bf16 is honoured on CPU
        acc, precision, _ = make_accelerator("bf16")
        assert precision == "bf16" and acc.mixed_precision == "bf16"  # what was resolved reaches Accelerate
    finally:
        reset_accelerate_state()


def test_checksums_file_layout_by_hand(tmp_path):
    import hashlib

    path = _save_steps(tmp_path / "run", steps=(5,)).root / "step-0000005"
    sums = json.loads((path / "checksums.json").read_text())
    assert sums["format"] == "radalign-checksums/1" and set(sums) == {"format", "files"}
    assert sums["files"] == {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                             for p in sorted(path.iterdir()) if p.name != "checksums.json"}


def test_a_checkpoint_at_step_zero_is_a_checkpoint(tmp_path, capsys):
    ckpt = _save_steps(tmp_path / "run", steps=(0,))
    assert [p.name for p in ckpt.checkpoints()] == ["step-0000000"]
    assert ckpt.resolve("auto") == ckpt.root / "step-0000000"
    model, opt, sched = _trained(seed=4)
    assert ckpt.load(ckpt.root / "step-0000000", model=model, optimizer=opt, scheduler=sched).step == 0
    assert f"resumed from {ckpt.root / 'step-0000000'} at step 0" in capsys.readouterr().out


def test_resolve_on_several_processes_broadcasts_the_main_choice(tmp_path, monkeypatch):
    import torch.distributed as dist

    ckpt = _save_steps(tmp_path / "run", steps=(4, 8))
    sent = []
    monkeypatch.setattr(dist, "broadcast_object_list", lambda obj, src: sent.append((list(obj), src)))
    ckpt.acc = _FakeAcc(main=True, processes=2)
    assert ckpt.resolve("auto") == ckpt.root / "step-0000008"
    assert sent == [([ckpt.root / "step-0000008"], 0)]


def test_resume_messages_name_what_to_do(tmp_path, training_log):
    ckpt = _save_steps(tmp_path / "run", steps=(4,))
    (ckpt.root / "step-0000004" / "model.safetensors").write_bytes(b"x")
    with pytest.raises(RadalignError, match=r"model.safetensors: damaged .*\. No earlier complete checkpoint exists\.$"):
        ckpt.resolve(str(ckpt.root / "step-0000004"))
    with pytest.raises(RadalignError, match="no complete checkpoint found"):
        ckpt.resolve("latest")
    assert "falling back to the previous complete checkpoint" in training_log.text


def test_json_safe_names_the_key_it_cannot_save(tmp_path):
    model, opt, sched = _trained()
    with pytest.raises(RadalignError, match=r"^checkpoint: state.sampler.rng is a object, not JSON data; it cannot be "
                                            r"saved without pickle$"):
        CheckpointManager(tmp_path / "run").save(1, model=model, state={"sampler": {"rng": object()}})


def test_metric_logger_writes_tensorboard_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    run.mkdir()
    logger = MetricLogger(run, tensorboard=True)
    logger.start(0)
    logger.log(1, {"loss": 2.5, "lr": 1e-3, "note": "text is not a scalar"})
    logger.log(2, {"loss": 1.5})
    logger.close()
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["loss", "lr"]
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 2.5), (2, 1.5)]


def test_resaving_a_step_of_the_same_history_replaces_it(tmp_path):
    run = tmp_path / "run"
    first = _save_steps(run, steps=(4,))
    state = json.loads((first.root / "step-0000004" / "trainer_state.json").read_text())
    assert state == {"format": "radalign-checkpoint/1", "step": 4, "run_id": first.run_id, "state": {"segment": 4}}
    resumed = CheckpointManager(run, keep=3)
    model, opt, sched = _trained(seed=6)
    resumed.load(resumed.resolve("latest"), model=model, optimizer=opt, scheduler=sched)
    assert resumed.run_id == first.run_id  # the resumed run continues the same history
    with torch.no_grad():
        model.lin.bias.fill_(44.0)
    resumed.save(4, model=model, optimizer=opt, scheduler=sched, state={"segment": 44})
    assert sorted(p.name for p in resumed.root.iterdir()) == ["latest", "step-0000004"]  # no .old/.tmp left
    assert load_file(str(resumed.root / "step-0000004" / "model.safetensors"))["lin.bias"][0] == 44.0
    assert resumed.verify(resumed.root / "step-0000004") is None


def test_metric_rows_without_a_step_are_kept_and_the_move_is_logged(tmp_path, training_log):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"note": "header row, no step"}, {"step": 1, "loss": 1.0}, {"step": 5, "loss": 0.5},
            {"step": 6, "loss": 0.4}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert MetricLogger(run, tensorboard=False).start(4) == 2
    kept = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert kept == rows[:2]  # a row without a step counts as step 0: history, kept
    assert training_log.got == [("WARNING", f"{run / 'metrics.jsonl'}: 2 row(s) after step 4 belong to a history "
                                            "that was not resumed; moved to metrics.superseded.jsonl")]


# A training step in miniature, on glibc's malloc itself: two activation-sized buffers allocated, written, freed
# (the newest first, so the heap's top grows as in a backward pass); minor page faults per repeated step after the
# heap has settled (memory touched afresh = memory the allocator had handed back to the OS).
_STEP_FAULTS = """
import ctypes, resource, sys
if sys.argv[1] == "keep":
    from radalign.training import keep_freed_memory
    print(keep_freed_memory(), file=sys.stderr)
elif sys.argv[1] == "accelerator":  # what every training process starts with
    from radalign.training import make_accelerator
    make_accelerator("fp32")
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
SIZE = 64 << 20  # above glibc's largest dynamic mmap threshold (32 MiB)
def step():
    bufs = [libc.malloc(SIZE) for _ in range(2)]
    for p in bufs:
        ctypes.memset(p, 1, SIZE)
    for p in reversed(bufs):
        libc.free(p)
for _ in range(4):  # the heap settles over the first steps
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


def _step_faults(mode: str, env: dict | None = None) -> float:
    import subprocess
    import sys

    run_env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", _STEP_FAULTS, mode], env={**run_env, **(env or {})},
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_keep_freed_memory_stops_refaulting_each_step():
    """With glibc's defaults a buffer above 32 MiB is mapped on allocation and unmapped on free, so every step
    faults its pages in again (2 x 64 MiB = 32,768 pages of 4 KiB); with only the mmap threshold raised, the freed
    heap top is trimmed and faults the same; with keep_freed_memory the next step reuses the memory."""
    default, kept = _step_faults("default"), _step_faults("keep")
    assert default > 30_000, default   # the case exists: 128 MiB of fresh pages per step
    assert kept < 7_000, kept          # reused (measured 0; one more heap growth in five steps would be 6,554)
    assert _step_faults("accelerator") < 7_000  # a training process gets it from make_accelerator
    assert _step_faults("default", {"MALLOC_MMAP_THRESHOLD_": str(256 << 20)}) > 30_000  # why the trim threshold
    # A user's own setting wins: nothing is changed, so the defaults' faults come back.
    assert _step_faults("keep", {"MALLOC_ARENA_MAX": "4"}) > 30_000


def test_keep_freed_memory_leaves_a_users_allocator_alone(monkeypatch):
    from radalign import training

    for key, value in (("MALLOC_TRIM_THRESHOLD_", "1"), ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1"),
                       ("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")):
        with monkeypatch.context() as m:
            for k in ("MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES", "LD_PRELOAD", *training._USER_MALLOC_ENV):
                m.delenv(k, raising=False)
            m.setenv(key, value)
            m.setattr("platform.libc_ver", lambda: ("glibc", "2.36"))
            assert training.keep_freed_memory() == f"left as is ({key} set by the user)"
    monkeypatch.setattr("platform.libc_ver", lambda: ("", ""))
    assert training.keep_freed_memory() == "left as is (not glibc)"
