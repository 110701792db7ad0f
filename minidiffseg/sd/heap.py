"""Giving malloc's free memory back to the OS (glibc's `malloc_trim`) while weights stream (docs/memory.md §3)."""

from __future__ import annotations

import ctypes
import mmap
import os

TRIM_BYTES = 64 * 2**20  # malloc's free memory beyond this goes back to the OS after a streamed block


def _glibc():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: no trimming
        return None


_MALLOC_TRIM = _glibc()
_trimmed_at = [0]  # resident bytes right after the last trim


def _resident() -> int:
    with open("/proc/self/statm", "rb") as f:  # pages: size, resident, ...
        return int(f.read().split()[1]) * mmap.PAGESIZE


def trim_heap() -> None:
    """Give malloc's free memory back to the OS once the process has grown TRIM_BYTES since the last time.
    glibc keeps freed activations for reuse, but the U-Net's mix of sizes leaves holes it cannot reuse:
    a streamed bf16 C=4 pass at 512² ends with ~400 MB free in the heap (docs/memory.md §3). Trimming
    costs page faults when the memory is used again, so it waits for that much to pile up."""
    if _MALLOC_TRIM is None or not os.path.exists("/proc/self/statm"):
        return
    if _resident() > _trimmed_at[0] + TRIM_BYTES:
        _MALLOC_TRIM(0)
        _trimmed_at[0] = _resident()
