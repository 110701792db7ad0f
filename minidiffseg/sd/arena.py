"""The memory a streamed block's weights are read into (docs/memory.md §3): one anonymous mapping per
process, reused block after block, so a pass costs neither allocations nor page faults (a fresh page
costs ~8 µs to fault in on the machine measured: 1.7 GB of new bf16 weights per U-Net pass would add
~3.7 s). It grows to the largest block; when a block needs much less, the unused tail's pages go back
to the OS, so the 64² blocks at the end of the U-Net (the activations' peak) don't sit on the 8²
blocks' weights. An anonymous mapping: outside malloc's heap."""

from __future__ import annotations

import contextlib
import mmap
import threading

import torch

from .heap import trim_heap

TAIL_BYTES = 32 * 2**20  # an arena tail unused by the current block larger than this goes back to the OS


class Arena:
    """Bytes for one block at a time: `take(n)` inside `hold()`."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.owner: int | None = None  # the thread whose block is in the arena
        self.map: mmap.mmap | None = None
        self.used = 0  # bytes whose pages may be resident

    def take(self, nbytes: int) -> torch.Tensor:
        """`nbytes` of the arena as a uint8 tensor (valid until the next `take`)."""
        if self.map is None or len(self.map) < nbytes:
            self.map = None  # the old mapping goes first (no tensor views it between blocks)
            self.map, self.used = mmap.mmap(-1, nbytes), 0
        keep = (nbytes + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
        if self.used - keep > TAIL_BYTES:
            self.map.madvise(mmap.MADV_DONTNEED, keep, self.used - keep)
            self.used = keep
        self.used = max(self.used, nbytes)
        return torch.frombuffer(self.map, dtype=torch.uint8, count=nbytes) if nbytes else torch.empty(0, dtype=torch.uint8)

    @contextlib.contextmanager
    def hold(self):
        """Exclusive use of the arena for one block (streamed blocks of any model run one at a time); malloc's
        free memory is trimmed after it (sd/heap.py)."""
        if self.owner == threading.get_ident():
            raise RuntimeError("bug: a streamed block entered inside another one (the arena holds one block)")
        with self.lock:
            self.owner = threading.get_ident()
            try:
                yield
            finally:
                self.owner = None
                trim_heap()

    def release(self) -> None:
        """Give all the arena's memory back (e.g. when the streamed models are no longer used)."""
        with self.lock:
            self.map, self.used = None, 0


ARENA = Arena()  # one per process
