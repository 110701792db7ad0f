"""One safetensors file read with `pread` while weights stream (docs/memory.md §1, §3): no memory mapping, so
nothing of the file stays in the process once a block is done. Each tensor is read straight into place
when the file stores the compute dtype, else through a small staging buffer and converted. A sharded checkpoint
(sd/shards.py) is read as one file by `ShardedWeightFile`: each tensor from its shard's WeightFile."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import UserError
from .loading import TORCH_DTYPE, Layout, ShardedLayout, read_layout

STAGE_BYTES = 4 * 2**20  # file bytes read per pread when a tensor is converted: bounds the staging space


class WeightFile:
    """One safetensors file held open for `pread`, with the identity it had when it was checked."""

    def __init__(self, path: Path, layout: Layout):
        self.path, self.layout = Path(path), layout
        self.fd = os.open(self.path, os.O_RDONLY)
        self.stamp = self._stamp()
        if self.stamp[0] != layout.size:
            raise self.changed()

    def __del__(self):
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)

    def _stamp(self) -> tuple[int, int]:
        st = os.fstat(self.fd)
        return st.st_size, st.st_mtime_ns

    def changed(self) -> UserError:
        return UserError(f"{self.path}: the file changed or was cut short while minidiffseg was streaming its "
                         "weights (--stream reads them again at every pass); leave the weights untouched during "
                         "a run, check the file (`minidiffseg inspect-weights`) and run again")

    def check(self) -> None:
        if self._stamp() != self.stamp:
            raise self.changed()

    def part(self, key: str) -> "WeightFile":
        """The file holding the tensor `key`: this one (a ShardedWeightFile answers with the key's shard)."""
        return self

    def stored(self, key: str) -> tuple[torch.dtype, int, int]:
        """(dtype, first byte, end byte) of the tensor `key` in the file."""
        dtype, begin, end = self.layout.spans[key]
        return TORCH_DTYPE[dtype], begin, end

    def read_into(self, buffer: torch.Tensor, offset: int) -> None:
        """Fill `buffer` (uint8, contiguous, CPU) with the file's bytes from `offset`; a short read means the
        file was cut short."""
        view, done = buffer.numpy().data, 0  # the array's memoryview
        while done < len(view):
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n == 0:
                raise self.changed()
            done += n

    def fill(self, key: str, out: torch.Tensor, stage: torch.Tensor) -> None:
        """`out` (contiguous) := the tensor `key`, converted to out.dtype through `stage` where it differs."""
        stored, begin, end = self.stored(key)
        if stored == out.dtype and out.device.type == "cpu":  # straight into place
            self.read_into(out.view(-1).view(torch.uint8), begin)
            return
        flat, item = out.view(-1), stored.itemsize
        step = stage.numel() // (1 + 4 // item) if via_float(stored, out.dtype) else stage.numel()
        raw, wide = stage[:step], stage[step:step + step // item * 4].view(torch.float32)
        for start in range(begin, end, step):
            n = min(step, end - start)
            self.read_into(raw[:n], start)
            first, part = (start - begin) // item, raw[:n].view(stored)
            if via_float(stored, out.dtype):  # fp16 -> fp32 (exact) -> bf16: 4× faster than torch's direct cast
                part = wide[:n // item].copy_(part)
            flat[first:first + n // item].copy_(part)  # the rounding `.to(dtype)` makes

    def stage_bytes(self, keys: list[str], dtype: torch.dtype) -> int:
        """Scratch bytes `fill` needs to convert these tensors to `dtype` (0 when all are stored in it)."""
        need = 0
        for stored, begin, end in map(self.stored, keys):
            if stored != dtype:
                raw = min(STAGE_BYTES, end - begin)
                need = max(need, raw + (raw // stored.itemsize * 4 if via_float(stored, dtype) else 0))
        return need


class ShardedWeightFile:
    """A checked shard set (`ShardedLayout`) read as one WeightFile: each shard held open for `pread` with its own
    identity, each tensor read from its shard (`part`); a change to any shard under a run names that shard."""

    def __init__(self, layout: ShardedLayout):
        self.path, self.layout = layout.index, layout
        self.files = {shard: WeightFile(shard, part) for shard, part in layout.shards.items()}

    def part(self, key: str) -> WeightFile:
        return self.files[self.layout.file_of[key]]

    def check(self) -> None:
        for f in self.files.values():
            f.check()

    def stored(self, key: str) -> tuple[torch.dtype, int, int]:
        """(dtype, first byte, end byte) of the tensor `key` in its shard."""
        return self.part(key).stored(key)

    def fill(self, key: str, out: torch.Tensor, stage: torch.Tensor) -> None:
        self.part(key).fill(key, out, stage)

    def stage_bytes(self, keys: list[str], dtype: torch.dtype) -> int:
        return max((self.part(key).stage_bytes([key], dtype) for key in keys), default=0)


def open_weights(path: Path) -> WeightFile | ShardedWeightFile:
    """The checked file at `path` (sd/loading.py `read_layout`) held open for streaming: a WeightFile, or for a
    shard set's index a ShardedWeightFile."""
    layout = read_layout(path)
    return ShardedWeightFile(layout) if isinstance(layout, ShardedLayout) else WeightFile(path, layout)


def via_float(stored: torch.dtype, dtype: torch.dtype) -> bool:
    """Whether converting `stored` to `dtype` goes through float32: torch's own fp16 -> bf16 cast runs at
    ~0.3 G elements/s on CPU, the two steps at ~1.3 (docs/memory.md §3); fp16 -> fp32 is exact and fp32 -> bf16
    is the rounding the direct cast makes, so the result is the same bits."""
    return stored == torch.float16 and dtype == torch.bfloat16
