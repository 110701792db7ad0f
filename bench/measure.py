"""Measuring one process: a clock per stage (time, peak memory, FLOPs), the GEMM rate, the machine.

CPU: wall time by `perf_counter`; memory is the resident set size (linux.py): VmHWM, the process's
peak RSS, is reset to the current RSS before each stage, which gives a peak per stage; before it, free
memory the allocator kept is released (outside the timed block) so that a stage's growth shows. Every
configuration runs in its own fresh process (worker.py).
CUDA: CUDA events around the stage (the GPU's time, not the launch's) and `max_memory_allocated`.

FLOPs: `torch.utils.flop_counter.FlopCounterMode` (2 per multiply-add) during the warm-up only. It
has no formula for the CPU's fused attention kernel, so one is given here (two matmuls: QKᵀ, PV).
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from contextlib import contextmanager, nullcontext
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.linux import cpu_model, major_faults, release_free_memory, reset_peak_rss, status

GiB = 2**30


def sdpa_cpu_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    """aten._scaled_dot_product_flash_attention_for_cpu on shapes q (B, h, N, d), k (B, h, T, d), v (B, h, T, dv)."""
    b, h, n, d = q
    t, dv = k[-2], v[-1]
    return 2 * b * h * n * t * d + 2 * b * h * n * t * dv


CUSTOM_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: sdpa_cpu_flops}


class Clock:
    """`with clock("VAE encode"): ...` records seconds and memory of the block, when `clock.timed`;
    with `clock.count_flops` it also counts the block's FLOPs (per op, for the profile table)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.timed = False
        self.count_flops = False
        self.per_stage_peaks = True  # False where the peak RSS can't be reset: peaks are cumulative
        self.iteration = 0  # a stage clocked twice in one iteration (once per class) adds up
        self.records: dict[str, list[dict]] = {}  # stage -> [{seconds, peak, extra, iteration}] per timed iteration
        self.flops: dict[str, dict[str, int]] = {}  # stage -> {op: FLOPs}, of the iteration that counted

    def next_iteration(self, timed: bool, count_flops: bool = False):
        self.iteration += 1
        self.timed, self.count_flops = timed, count_flops

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _memory_before(self) -> int:
        self._sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return torch.cuda.memory_allocated(self.device)
        release_free_memory()
        self.per_stage_peaks &= reset_peak_rss()
        return status("VmRSS")

    def _peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return status("VmHWM")

    @contextmanager
    def __call__(self, stage: str):
        before = self._memory_before()
        counter = FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOPS) if self.count_flops else nullcontext()
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        faults = major_faults() if self.device.type == "cpu" else 0
        t0 = time.perf_counter()
        with counter:
            yield
        if self.device.type == "cuda":
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            seconds = time.perf_counter() - t0
            faults = major_faults() - faults
        peak = self._peak()
        if self.count_flops:
            self._add_flops(stage, {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()})
        if self.timed:
            self._record(stage, dict(seconds=seconds, peak=peak, extra=max(peak - before, 0), faults=faults))

    def _record(self, stage: str, r: dict):
        rows = self.records.setdefault(stage, [])
        if rows and rows[-1]["iteration"] == self.iteration:
            last = rows[-1]
            last.update(seconds=last["seconds"] + r["seconds"], peak=max(last["peak"], r["peak"]),
                        extra=max(last["extra"], r["extra"]), faults=last["faults"] + r["faults"])
        else:
            rows.append(dict(r, iteration=self.iteration))

    def _add_flops(self, stage: str, counts: dict[str, int]):
        total = self.flops.setdefault(stage, {})
        for op, n in counts.items():
            total[op] = total.get(op, 0) + n

    def add(self, stage: str, parts: list[str]):
        """Record `stage` as the sum of this iteration's records of `parts` (peak: their largest)."""
        if self.count_flops:
            for p in parts:
                self._add_flops(stage, self.flops.get(p, {}))
        if self.timed:
            last = [self.records[p][-1] for p in parts]
            self._record(stage, dict(seconds=sum(r["seconds"] for r in last), peak=max(r["peak"] for r in last),
                                     extra=max(r["extra"] for r in last), faults=sum(r["faults"] for r in last)))

    def summary(self) -> dict[str, dict]:
        """Per stage: median seconds, the largest peak and extra memory over the timed iterations, FLOPs."""
        out = {}
        for stage, rows in self.records.items():
            out[stage] = dict(seconds=statistics.median(r["seconds"] for r in rows),
                              all_seconds=[r["seconds"] for r in rows],
                              peak_bytes=max(r["peak"] for r in rows), extra_bytes=max(r["extra"] for r in rows),
                              major_faults=sum(r["faults"] for r in rows),
                              flops=sum(self.flops.get(stage, {}).values()) or None)
        return out


def gemm_rate(dtype: torch.dtype, device: torch.device, sizes: tuple[int, ...], repeats: int = 5) -> float:
    """The machine's matrix-multiply rate in FLOP/s: best of `repeats` square n×n products, best size."""
    best = 0.0
    for n in sizes:
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        clock = Clock(device)
        for i in range(repeats + 1):  # the first is a warm-up
            clock.next_iteration(timed=i > 0)
            with clock("mm"):
                a @ b
        best = max(best, 2 * n**3 / min(r["seconds"] for r in clock.records["mm"]))
    return best


def source_revision() -> str:
    """The commit the measured code is (`+ local changes` when the tree differs from it: minidiffseg/, bench/ and
    the reference builders bench/ uses, tests/reference_sd.py), or "unknown"."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "minidiffseg", "bench/*.py",
                                "tests/reference_sd.py"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + (" + local changes" if dirty else "")


def machine(device: torch.device) -> dict:
    """What the numbers were measured on."""
    info = dict(cpu=cpu_model(), logical_cpus=os.cpu_count(), torch_threads=torch.get_num_threads(),
                torch=torch.__version__, python=platform.python_version(),
                date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB, 1)
    except (ValueError, OSError):
        pass
    if device.type == "cpu":  # what decides --dtype bf16 here (sd/precision.py): without it bf16 rows are skipped
        from minidiffseg.sd.precision import fast_on_cpu

        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        info["fast_bf16"] = fast_on_cpu(torch.bfloat16)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    for package in ("diffusers", "transformers"):
        try:
            info[package] = __import__(package).__version__
        except ImportError:
            info[package] = None
    return info
