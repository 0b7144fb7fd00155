"""`precision: auto`: the fastest numerically safe training precision for the device at hand.

    precision, reason = resolve_precision("auto", "cpu")     # -> ("fp32", "CPU capability AVX2: ...")

Rules (`requested` is one of `auto`, `bf16`, `fp16`, `fp32`):

- CUDA: `auto` -> bf16 when the GPU runs it natively (`torch.cuda.is_bf16_supported(including_emulation=False)`:
  compute capability >= 8.0, or ROCm), fp32 otherwise, e.g. on a V100 or T4 where torch only emulates bf16 (fp16
  with loss scaling is never chosen automatically: ask for it with `precision=fp16`). An explicit `bf16` on an
  emulating GPU is honoured with a warning; on a GPU without bf16 at all it is an error.
- CPU: `auto` -> bf16 only where bf16 is native *and* measured faster. Native: ATen's dispatch level
  (`torch.backends.cpu.get_cpu_capability()`) is an AVX512 (or SVE) level and the CPU reports a bf16 unit
  (`avx512_bf16` / `amx_bf16` / ARM `bf16` in /proc/cpuinfo). Faster: a sub-second probe times a model-like
  matmul + conv in fp32 and under bf16 autocast (best of a few interleaved repeats). On AVX2-only CPUs autocast
  emulates bf16 and a tiny training step is ~18x slower (issue 9), so `auto` gives fp32 there.
- CPU with an explicit `bf16`: honoured, but when bf16 is not native or measured slower, a warning gives the
  measured slowdown and the fix (`precision=auto` or `fp32`). `fp16` on CPU is an error (loss scaling is a GPU
  feature).

The probe runs once per process (cached); tests inject `probe=` / `capability=` / `native=` so they never
depend on the host CPU. `ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2` emulates an AVX2-only CPU.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path

from radalign import RadalignError
from radalign.log import get_logger

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
FASTER = 0.95  # bf16 must take under 95% of the fp32 time in the probe to count as faster (timer noise margin)

Probe = Callable[[], tuple[float, float]]  # -> (fp32 seconds, bf16-autocast seconds) of the same work


def cpu_capability() -> str:
    """ATen's CPU dispatch level ("AVX512", "AVX2", "DEFAULT", ...; honours ATEN_CPU_CAPABILITY)."""
    import torch

    return str(torch.backends.cpu.get_cpu_capability())


BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 AVX512-BF16 / AMX-BF16, ARM BF16


def cpu_has_bf16_unit(cpuinfo: str | None = None) -> bool:
    """True when EVERY processor in /proc/cpuinfo (or `cpuinfo`) reports bf16 instructions (BF16_FLAGS): a
    thread may run on any core, so one core without them makes bf16 emulated there. False when unreadable."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    per_cpu = [set(line.split(":", 1)[-1].split()) for line in cpuinfo.splitlines()
               if line.lower().startswith(("flags", "features"))]
    return bool(per_cpu) and all(flags & BF16_FLAGS for flags in per_cpu)


def native_bf16(capability: str, has_unit: bool) -> bool:
    """bf16 runs on hardware: ATen dispatches at an AVX512/SVE level and the CPU has a bf16 unit."""
    cap = capability.upper()
    return has_unit and (cap.startswith("AVX512") or cap.startswith("SVE"))


def probe_bf16_cpu(repeats: int = 2) -> tuple[float, float]:
    """(fp32 s, bf16-autocast s): best of `repeats` interleaved runs of a ViT-like op mix (two 512-wide linear
    layers over 512 tokens, a patch-embedding conv) on CPU; about 0.3 s where bf16 is native, 1 s where not.

    Smaller ops mislead: at 64x192 oneDNN's bf16 overhead dominates and even a native CPU measures bf16 slower.
    """
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 512, generator=g)  # [tokens, width]
    layers = nn.Sequential(nn.Linear(512, 512), nn.GELU(), nn.Linear(512, 512))
    conv = nn.Conv2d(3, 64, 16, stride=16)
    img = torch.randn(8, 3, 128, 128, generator=g)  # [B, C, H, W]

    def timed(bf16: bool) -> float:
        t = time.perf_counter()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for _ in range(2):
                layers(x)  # [512, 512]
                conv(img)  # [8, 64, 8, 8]
        return time.perf_counter() - t

    for _ in range(1):  # warm-up: kernel selection, oneDNN primitive caches, weight casts
        timed(False), timed(True)
    fp32, bf16 = [], []
    for _ in range(repeats):
        fp32.append(timed(False))
        bf16.append(timed(True))
    return min(fp32), min(bf16)


@functools.cache
def _cached_probe() -> tuple[float, float]:
    return probe_bf16_cpu()


def clear_cache() -> None:
    """Forget the cached probe (tests)."""
    _cached_probe.cache_clear()


def _device_type(device) -> str:
    return str(getattr(device, "type", device)).split(":")[0]


def resolve_precision(requested: str, device, *, probe: Probe | None = None, capability: str | None = None,
                      native: bool | None = None) -> tuple[str, str]:
    """(`bf16` | `fp16` | `fp32`, reason) for `requested` on `device` ("cpu", "cuda", a torch.device).

    `probe`, `capability` and `native` replace the measurement, `cpu_capability()` and the bf16-unit check
    (tests). Logs the choice and the reason; warns when an explicit bf16 is slow on this CPU.
    """
    if requested not in PRECISIONS:
        raise RadalignError(f"precision={requested!r}: not one of {', '.join(PRECISIONS)}")
    kind = _device_type(device)
    log = get_logger("radalign.precision")
    if kind == "cuda":
        precision, reason = _resolve_cuda(requested, log)
    else:
        precision, reason = _resolve_cpu(requested, probe, capability, native, log)
    log.info(f"precision {precision} (requested {requested}): {reason}")
    return precision, reason


def _resolve_cuda(requested: str, log) -> tuple[str, str]:
    """CUDA rule: bf16 only where the GPU runs it natively (compute capability >= 8.0, or ROCm)."""
    import torch

    available = torch.cuda.is_available()
    # torch's default `is_bf16_supported()` also says True where bf16 is only emulated (e.g. a V100, 7.0):
    # slow, and not what `auto` promises. Native support is the emulation-free answer.
    native = available and torch.cuda.is_bf16_supported(including_emulation=False)
    emulated = available and not native and torch.cuda.is_bf16_supported()
    name = "CUDA device (none visible)"
    if available:
        dev = torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(dev)
        name = f"{torch.cuda.get_device_name(dev)} (compute capability {major}.{minor})"
    if requested == "bf16" and not native:
        if not emulated:
            raise RadalignError(f"precision=bf16: {name} does not support bf16; use precision=auto (fp32) or fp16")
        log.warning(f"precision=bf16 on {name}: bf16 is only emulated there (no bf16 tensor cores), so training "
                    "will be slower than fp32. Use precision=auto (fp32) or precision=fp16.")
        return "bf16", f"asked for bf16 on {name} (emulated)"
    if requested != "auto":
        return requested, f"asked for {requested} on {name}"
    if native:
        return "bf16", f"{name} supports bf16 natively"
    return "fp32", (f"{name} has no native bf16{' (only emulated)' if emulated else ''}; fp16 is used only when "
                    "asked: precision=fp16")


def _resolve_cpu(requested: str, probe: Probe | None, capability: str | None, native: bool | None,
                 log) -> tuple[str, str]:
    if requested == "fp16":
        raise RadalignError("precision=fp16 needs CUDA (loss scaling is a GPU feature); use precision=auto or "
                            "fp32 on CPU")
    if requested == "fp32":
        return "fp32", "asked for fp32"
    cap = capability if capability is not None else cpu_capability()
    is_native = native if native is not None else native_bf16(cap, cpu_has_bf16_unit())
    fp32_s, bf16_s = (probe or _cached_probe)()
    ratio = bf16_s / fp32_s if fp32_s > 0 else float("inf")
    measured = f"probe: bf16 autocast {ratio:.2f}x the fp32 time ({bf16_s * 1e3:.1f} vs {fp32_s * 1e3:.1f} ms)"
    native_txt = "native bf16" if is_native else "no native bf16 (autocast emulates it)"
    fast = is_native and ratio < FASTER
    if requested == "bf16":
        if not fast:
            log.warning(f"precision=bf16 on a CPU with capability {cap}, {native_txt}: {measured}, so training "
                        f"will be about {ratio:.1f}x slower than fp32. Use precision=auto or precision=fp32.")
        return "bf16", f"asked for bf16; CPU capability {cap}, {native_txt}; {measured}"
    choice = "bf16" if fast else "fp32"
    return choice, f"CPU capability {cap}, {native_txt}; {measured}"


__all__ = ["PRECISIONS", "BF16_FLAGS", "resolve_precision", "probe_bf16_cpu", "cpu_capability", "cpu_has_bf16_unit",
           "native_bf16", "clear_cache"]
