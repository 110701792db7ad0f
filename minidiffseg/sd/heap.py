"""Giving malloc's free memory back to the OS (glibc's `malloc_trim`) while weights stream (docs/memory.md §3)."""

from __future__ import annotations

import ctypes
import mmap
import os

TRIM_BYTES = 64 * 2**20  # malloc's free memory beyond this goes back to the OS after a streamed block


class _MallInfo2(ctypes.Structure):  # glibc >= 2.33 `struct mallinfo2`: all size_t
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc: no trimming
        return None, None
    info = getattr(libc, "mallinfo2", None)  # absent before glibc 2.33
    if info is not None:
        info.restype = _MallInfo2
    return trim, info


_MALLOC_TRIM, _MALLINFO2 = _glibc()
_trimmed_at = [0]  # resident bytes right after the last trim (where mallinfo2 is missing)


def _resident() -> int:
    with open("/proc/self/statm", "rb") as f:  # pages: size, resident, ...
        return int(f.read().split()[1]) * mmap.PAGESIZE


def trim_heap() -> None:
    """Give malloc's free memory back to the OS once TRIM_BYTES of it have piled up. glibc keeps freed
    activations for reuse, but the U-Net's mix of sizes leaves holes it cannot reuse: a streamed bf16 C=4 pass
    at 512² ends with ~400 MB free in the heap (docs/memory.md §3). Trimming costs page faults when the memory
    is used again, so it waits for that much. The free bytes are malloc's own count (mallinfo2); without it,
    the process's growth since the last trim stands in for them."""
    if _MALLOC_TRIM is None:
        return
    if _MALLINFO2 is not None:
        if _MALLINFO2().fordblks > TRIM_BYTES:
            _MALLOC_TRIM(0)
        return
    if os.path.exists("/proc/self/statm") and _resident() > _trimmed_at[0] + TRIM_BYTES:
        _MALLOC_TRIM(0)
        _trimmed_at[0] = _resident()
