"""Giving malloc's free memory back to the OS (glibc's `malloc_trim`) while weights stream (docs/memory.md §3)."""

from __future__ import annotations

import ctypes
import mmap
import os

TRIM_BYTES = 64 * 2**20  # the process grown this much above its low point: malloc's free memory goes back


def _glibc():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: no trimming
        return None


_MALLOC_TRIM = _glibc()
_low = [0]  # the lowest resident size seen since the last trim


def _resident() -> int:
    with open("/proc/self/statm", "rb") as f:  # pages: size, resident, ...
        return int(f.read().split()[1]) * mmap.PAGESIZE


def trim_heap() -> None:
    """Give malloc's free memory back to the OS once the process has grown TRIM_BYTES above the lowest size
    it had since the last time. glibc keeps freed activations for reuse, but the U-Net's mix of sizes leaves
    holes it cannot reuse: a streamed bf16 C=4 pass at 512² ends with ~400 MB free in the heap (docs/memory.md
    §3). Trimming costs page faults when the memory is used again, so it waits for that much to pile up.
    Measured from the low point, not from the size right after the last trim: called after every streamed
    block, some calls fall inside a resnet where its activations are alive, and a trim there would set the
    mark that high."""
    if _MALLOC_TRIM is None or not os.path.exists("/proc/self/statm"):
        return
    now = _resident()
    _low[0] = min(_low[0], now) if _low[0] else now
    if now > _low[0] + TRIM_BYTES:
        _MALLOC_TRIM(0)
        _low[0] = _resident()
