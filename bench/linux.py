"""What Linux says about a process and about the machine: the one place in bench/ that reads /proc.

Memory of a process:
- `status(field, pid)`: a field of /proc/PID/status in bytes: VmRSS (resident now), VmHWM (peak resident),
  RssAnon (resident anonymous memory, i.e. not file pages), ...;
- `reset_peak_rss()`: VmHWM := VmRSS (writing "5" to /proc/self/clear_refs, Linux >= 4.0), which gives a
  peak per stage (`ru_maxrss` can't be reset and is inherited across fork/exec, so it is not used);
- `release_free_memory()`: glibc keeps freed memory for reuse, so the resident set stays high after a
  stage frees its tensors and the next stage's growth would hide in it; malloc_trim(0) gives it back;
- `major_faults()`: page faults that read from disk.

The machine:
- `cpu_seconds()`: busy and total CPU seconds of all CPUs since boot (/proc/stat); `busy_share(seconds)`;
- `OthersCPU`: the share of the CPUs that other processes took while a block ran (timings on a small
  shared machine are only comparable when it is near 0);
- `load_average()`, `cpu_model()`;
- `evict(files)`: drop files' pages from the page cache, for a cold start without root.

Standard library only and cheap to import: the child processes that measure their own memory import it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
import resource
import time
from pathlib import Path


def status(field: str, pid: int | str = "self") -> int:
    """Field `field` of /proc/PID/status in bytes; KeyError where the process has no such line (an exiting
    process loses its memory lines), OSError where it is gone."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # the file's unit is kB
    raise KeyError(field)


def reset_peak_rss() -> bool:
    """Set this process's VmHWM to its current VmRSS; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@functools.cache
def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def release_free_memory() -> None:
    """Give the allocator's free pages back to the system (glibc's malloc_trim(0)) before measuring growth."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def major_faults() -> int:
    """This process's page faults that read from disk (field 12 of /proc/self/stat): memory-mapped weights
    evicted under memory pressure and read again show up here."""
    stat = Path("/proc/self/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[9])


def cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, all CPUs (/proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(fields[:8]) - idle) / hz, sum(fields[:8]) / hz


def busy_share(seconds: float = 3.0) -> float:
    """The fraction of the machine's CPUs busy over the next `seconds` (0..1)."""
    b0, t0 = cpu_seconds()
    time.sleep(seconds)
    b1, t1 = cpu_seconds()
    return (b1 - b0) / max(t1 - t0, 1e-9)


def children_seconds() -> float:
    """User + system CPU seconds of this process's children that have ended and been waited for."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class OthersCPU:
    """`with OthersCPU() as others: <start a child process and wait for it>`, then `others.share`: the
    fraction of the machine's CPU time during the block that was busy with anything but the children this
    process waited for in it. This process's own work counts as the others' (the callers only wait)."""

    share: float

    def __enter__(self) -> "OthersCPU":
        (self._busy, self._total), self._children = cpu_seconds(), children_seconds()
        return self

    def __exit__(self, *exc) -> bool:
        (busy, total), children = cpu_seconds(), children_seconds()
        self.share = max(busy - self._busy - (children - self._children), 0) / max(total - self._total, 1e-9)
        return False


def load_average(digits: int = 2) -> tuple[float, float, float] | None:
    """The 1, 5 and 15 minute load averages, rounded, or None where the system has none."""
    try:
        return tuple(round(x, digits) for x in os.getloadavg())
    except OSError:
        return None


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def evict(files: list[Path]) -> None:
    """Drop the files' clean pages that no process maps from the page cache (posix_fadvise DONTNEED): the
    next read comes from the disk, a cold start without root."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
