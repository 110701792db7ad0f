"""Which dtype to compute in, given the one asked for and the processor (docs/precision.md).

Half precision halves the weights' memory and, on a CPU with bf16 instructions (AVX-512-BF16, AMX; ARM's
BF16 extension), runs ~2.5× faster than float32. On a CPU without them torch emulates it: on a 2-core
AMD EPYC with AVX2 only a 1024² bf16 matmul ran at 0.8 GFLOP/s against 88.6 in float32, a 3×3
convolution 450× slower. There, a half-precision request keeps the weights in half precision (the memory
saving) and computes in float32, each block's weights up-cast as it runs (sd/stream.py `UpcastWeights`):
the results are those of a float32 run from the same half-precision weights, bit for bit.

The decision is made once per process (`fast_on_cpu`): from torch's CPU queries on x86, where they
answer; elsewhere (ARM, other architectures) from a GEMM probe of a few milliseconds.
"""

from __future__ import annotations

import functools
import platform
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

HALF = (torch.float16, torch.bfloat16)
X86 = ("x86_64", "amd64", "i386", "i686")
PROBE_SIDE = 256  # the probe's square matmul: 34 MFLOP, ~0.5 ms in float32 on one core of the machines measured


def name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class Precision:
    """How a model runs: `compute` is the arithmetic's dtype; `keep`, when set, the half-precision dtype
    its weights are kept in between blocks (up-cast to `compute` block by block); `note` says why the
    request was changed (shown once as a warning)."""

    compute: torch.dtype
    keep: torch.dtype | None = None
    note: str | None = None


def decide(dtype: torch.dtype, machine: str, queries: dict[str, bool], probe: Callable[[torch.dtype], bool]) -> bool:
    """Whether `dtype` arithmetic is fast on a CPU: `machine` is platform.machine(); `queries` torch's answers
    (avx512_bf16, amx_tile, amx_fp16); `probe(dtype)` measures (called only where the queries don't answer)."""
    if dtype not in HALF:
        return True
    if machine.lower() in X86:  # the instruction sets that torch's kernels use for half precision
        if dtype == torch.bfloat16:
            return queries["avx512_bf16"] or queries["amx_tile"]
        return queries["amx_fp16"]
    return probe(dtype)


def probe(dtype: torch.dtype, side: int = PROBE_SIDE) -> bool:
    """Whether a `side`² matmul in `dtype` takes no longer than in float32 (best of 3, after a warm-up)."""
    def best(dt: torch.dtype) -> float:
        a = torch.randn(side, side).to(dt)
        torch.mm(a, a)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            torch.mm(a, a)
            times.append(time.perf_counter() - start)
        return min(times)

    return best(dtype) <= best(torch.float32)


def _queries() -> dict[str, bool]:
    def ask(query: str) -> bool:  # private torch functions: absent in some versions means "no"
        fn = getattr(torch.cpu, f"_is_{query}_supported", None)
        return bool(fn()) if fn is not None else False

    return {q: ask(q) for q in ("avx512_bf16", "amx_tile", "amx_fp16")}


@functools.cache
def fast_on_cpu(dtype: torch.dtype) -> bool:
    """Whether this process's CPU computes `dtype` fast (decided once per dtype, then cached)."""
    return decide(dtype, platform.machine(), _queries(), probe)


def cpu_name() -> str:
    """What torch's CPU kernels use here, for messages: e.g. "AVX2", "AVX512"."""
    return torch.backends.cpu.get_cpu_capability()


def precision(dtype: torch.dtype, device: str | torch.device, fast: Callable[[torch.dtype], bool] | None = None,
              warn: bool = True) -> Precision:
    """How to run a model asked to compute in `dtype` on `device`. On a GPU, and for float32/float64, as asked.
    On a CPU, half precision as asked where it is fast; float16 in bfloat16 where only that is fast; else
    float32 with the weights kept in the half dtype asked for. `warn`: say so (warnings.warn) when changed.
    `fast`: whether a dtype is fast on this CPU (default `fast_on_cpu`)."""
    fast = fast or fast_on_cpu
    if torch.device(device).type != "cpu" or dtype not in HALF or fast(dtype):
        return Precision(dtype)
    if dtype == torch.float16 and fast(torch.bfloat16):
        note = "float16 arithmetic is slow on this CPU; computing in bfloat16 instead (use float32 for full precision)"
        p = Precision(torch.bfloat16, note=note)
    else:
        note = (f"this CPU ({cpu_name()}) has no fast {name(dtype)} arithmetic (~100× slower than float32 here): "
                f"computing in float32 with the weights kept in half precision, up-cast block by block (the memory "
                f"of {name(dtype)} weights at float32 speed)")
        p = Precision(torch.float32, keep=dtype, note=note)
    if warn:
        warnings.warn(note, stacklevel=3)
    return p
