"""Where a network's weights are while it runs (docs/memory.md §1, §2).

Every network (U-Net, VAE encoder, text encoder) has a `weights` attribute that its forward asks,
block by block, for the block's parameters:

    with weights.block(resnet):      # the block's tensors are in the module inside, and only there
        x = resnet(x, temb)

- `RESIDENT` (the default): the weights live in the modules, as `load_state_dict` put them;
  `block` is a context that does nothing.
- `StreamedWeights`: the modules hold empty placeholders (a NaN scalar expanded to each parameter's
  shape: no memory, the right shape, dtype and device); `block` reads the block's tensors from the
  safetensors file with `pread` (no memory mapping: nothing is left in this process once the block
  is done), converts them to the compute dtype, puts them in with `load_state_dict(strict=True,
  assign=True)`, and puts the placeholders back when the block is done, which frees the tensors.
  At most one block's weights are alive at a time.

The grain — a resnet, a transformer (norm, proj_in, attention ×2, feed-forward, proj_out), a down/up
sampler, the small stems — is chosen in the networks' forward (docs/memory.md §2). The file checks
of `load_strict` (header, names, shapes, dtypes) run in `streamed()` before any pass; while a run
streams, the file's size and modification time are compared before and after every block's reads
and a short read is refused, so a file changed or cut short under a run raises one UserError line.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import mmap
import os
import threading
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from .loading import TORCH_DTYPE, Layout, _read, check, read_layout

STAGE_BYTES = 4 * 2**20  # file bytes read per pread when a tensor is converted: bounds the staging space
ALIGN = 64  # bytes: a cache line; each tensor of a block starts on one, plus its resident twin's residue
TAIL_BYTES = 32 * 2**20  # an arena tail unused by the current block larger than this goes back to the OS
TRIM_BYTES = 64 * 2**20  # malloc's free memory beyond this goes back to the OS after a streamed block


class Resident:
    """The weights live in the modules: a block needs nothing fetched."""

    _nothing = contextlib.nullcontext()

    def block(self, *modules: nn.Module):
        return self._nothing


RESIDENT = Resident()


class BlockWeights:
    """Weights fetched per block into a network whose modules hold placeholders: a block's tensors are
    views of the process's ARENA while the block runs. Subclasses say where the bytes come from (`fill`)."""

    def __init__(self, network: nn.Module, names: dict[str, str], dtype: torch.dtype, device: torch.device):
        self.network, self.dtype, self.device = network, dtype, torch.device(device)
        self.key_of = {name: key for key, name in names.items()}  # parameter name -> file key
        self.prefix = {m: name for name, m in network.named_modules()}
        self.fetched = 0  # bytes fetched so far (the benchmark reads it)
        self.to(device, dtype)
        network.eval().requires_grad_(False)

    def to(self, device: torch.device, dtype: torch.dtype) -> None:
        """Fetch the blocks in `dtype` onto `device` from now on (Segmenter.to): the placeholders follow."""
        self.dtype, self.device = dtype, torch.device(device)
        nan = torch.full((), float("nan"), dtype=dtype, device=self.device)
        self.empty = {name: nan.expand(p.shape) for name, p in self.network.state_dict().items()}
        self.network.load_state_dict(self.empty, strict=True, assign=True)

    @contextlib.contextmanager
    def block(self, *modules: nn.Module):
        """The parameters of `modules` (parts of this network) filled from the file inside the context."""
        with ARENA.hold():  # one block at a time in the process: its tensors live in the arena
            for m, state in zip(modules, self.read(modules)):
                m.load_state_dict(state, strict=True, assign=True)
            try:
                yield
            finally:  # placeholders back: nothing refers to the arena any more
                for m in modules:
                    m.load_state_dict(self._named(m, lambda full, p: self.empty[full]), strict=True, assign=True)

    def read(self, modules) -> list[dict[str, torch.Tensor]]:
        """Per module {parameter name: tensor in the compute dtype on the device}, filled into the arena."""
        keys = [self._named(m, lambda full, p: (self.key_of[full], p.shape)) for m in modules]
        cpu, item = self.device.type == "cpu", self.dtype.itemsize
        starts, end = [], 0  # each tensor's first byte in the buffer: on a cache line, plus its residue
        for k in keys:
            starts.append([])
            for key, shape in k.values():
                at = (end + ALIGN - 1) // ALIGN * ALIGN + self.residue(key)
                starts[-1].append(at)
                end = at + math.prod(shape) * item
        stage = self.staging([key for k in keys for key, _ in k.values()])
        buffer = self.buffer(end + stage if cpu else stage)  # (bytes,) uint8
        states = []
        for k, at_of in zip(keys, starts):
            state = {}
            for (name, (key, shape)), at in zip(k.items(), at_of):
                out = (buffer[at:at + math.prod(shape) * item].view(self.dtype).view(shape) if cpu
                       else torch.empty(shape, dtype=self.dtype, device=self.device))
                self.fill(key, out, buffer[buffer.numel() - stage:])
                self.fetched += out.numel() * item
                state[name] = out
            states.append(state)
        return states

    def residue(self, key: str) -> int:
        """Where in its cache line the tensor `key` starts (bytes past an ALIGN boundary): the same as the
        resident tensor's, so both give the same bits (see `StreamedWeights.residue`)."""
        return 0

    def buffer(self, nbytes: int) -> torch.Tensor:
        """Where a block's tensors go: the arena (bench/stream_mechanisms.py measures the alternatives)."""
        return ARENA.take(nbytes)

    def _named(self, module: nn.Module, value) -> dict:
        prefix = self.prefix[module] + "." if self.prefix[module] else ""
        return {name: value(prefix + name, p) for name, p in module.named_parameters()}

    def staging(self, keys: list[str]) -> int:
        """Bytes of scratch space `fill` needs for these file keys."""
        return 0

    def fill(self, key: str, out: torch.Tensor, stage: torch.Tensor) -> None:
        """Write the file tensor `key`, converted to out.dtype, into `out` (contiguous)."""
        raise NotImplementedError


class Arena:
    """The memory every streamed block's tensors are read into, reused block after block, so a pass costs
    neither allocations nor page faults (a fresh page costs ~8 µs to fault in on the machine measured:
    1.7 GB of new bf16 weights per U-Net pass would add ~3.7 s, docs/memory.md §3). It grows to the
    largest block; when a block needs much less, the unused tail's pages go back to the OS, so the
    64² blocks at the end of the U-Net (the activations' peak) don't sit on the 8² blocks' weights.
    An anonymous mapping: outside malloc's heap."""

    def __init__(self):
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
        """Exclusive use of the arena for one block (streamed blocks of any model run one at a time)."""
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

    def stored(self, key: str) -> tuple[torch.dtype, int, int]:
        """(dtype, first byte, end byte) of the tensor `key` in the file."""
        dtype, begin, end = self.layout.spans[key]
        return TORCH_DTYPE[dtype], begin, end

    def read_into(self, buffer: torch.Tensor, offset: int) -> None:
        """Fill `buffer` (uint8, contiguous, CPU) with the file's bytes from `offset`; a short read means the
        file was cut short."""
        view, done = memoryview(buffer.numpy()), 0
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


def via_float(stored: torch.dtype, dtype: torch.dtype) -> bool:
    """Whether converting `stored` to `dtype` goes through float32: torch's own fp16 -> bf16 cast runs at
    ~0.3 G elements/s on CPU, the two steps at ~1.3 (docs/memory.md §3); fp16 -> fp32 is exact and fp32 -> bf16
    is the rounding the direct cast makes, so the result is the same bits."""
    return stored == torch.float16 and dtype == torch.bfloat16


class StreamedWeights(BlockWeights):
    """Each block read from the file when it runs, released after (see the module docstring)."""

    staged = False  # the device path on the CPU too (tests compare it with the CPU path there)

    def __init__(self, network: nn.Module, names: dict[str, str], file: WeightFile, dtype: torch.dtype,
                 device: torch.device):
        super().__init__(network, names, dtype, device)
        self.file = file
        self.host: torch.Tensor | None = None  # the device path's pinned staging buffer, grown to the largest block
        self.copied = None  # a CUDA event: the last copy out of `host` is done

    def read(self, modules) -> list[dict[str, torch.Tensor]]:
        """On a GPU (docs/memory.md §9): the block's bytes as stored are read into one pinned host buffer, copied to
        the device in one asynchronous copy, and converted to the compute dtype there; the CPU path (the arena,
        converted on the CPU) otherwise."""
        if self.device.type == "cpu" and not self.staged:
            return super().read(modules)
        keys = [self._named(m, lambda full, p: (self.key_of[full], p.shape)) for m in modules]
        spans, end = [], 0  # (file key, stored dtype, file offset, bytes, offset in the buffer) per tensor
        for k in keys:
            for key, _ in k.values():
                stored, begin, stop = self.file.stored(key)
                at = (end + ALIGN - 1) // ALIGN * ALIGN + self.residue(key)  # as the CPU path places it
                spans.append((key, stored, begin, stop - begin, at))
                end = at + stop - begin
        host = self.host_buffer(end)
        for key, stored, begin, nbytes, at in spans:
            self.file.read_into(host[at:at + nbytes], begin)
        raw = host[:end].to(self.device, non_blocking=True)  # (bytes,) uint8; on the CPU the buffer itself
        if self.device.type == "cuda":  # `host` may be refilled once this copy is done
            self.copied = torch.cuda.Event()
            self.copied.record()
        states, spans = [], iter(spans)
        for k in keys:
            state = {}
            for name, (key, shape) in k.items():
                _, stored, _, nbytes, at = next(spans)
                t = raw[at:at + nbytes].view(stored).view(shape)
                if stored != self.dtype:  # converted on the device, with the rounding `.to(dtype)` makes
                    t = (t.float() if via_float(stored, self.dtype) else t).to(self.dtype)
                self.fetched += t.numel() * t.element_size()
                state[name] = t
            states.append(state)
        return states

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        """`nbytes` of host memory for one block's bytes: pinned (page-locked) for a GPU, so the copy is one
        asynchronous DMA; the arena on the CPU."""
        if self.device.type == "cpu":
            return ARENA.take(nbytes)
        if self.copied is not None:
            self.copied.synchronize()  # the previous block's copy has left the buffer
        if self.host is None or self.host.numel() < nbytes:
            self.host = None
            self.host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        return self.host

    @contextlib.contextmanager
    def block(self, *modules: nn.Module):
        self.file.check()
        with super().block(*modules):
            self.file.check()  # the bytes just read were the file's as checked
            yield

    def residue(self, key: str) -> int:
        """A resident tensor that the file holds in the compute dtype is a view of the memory-mapped file
        (sd/loading.py), so it starts at its file offset past a page boundary; any other one is a fresh
        allocation, on a cache line. The BLAS of some CPUs gives results that depend on where an operand
        starts (an AVX2 AMD EPYC: a matrix-vector product differs in the last bits between a weight at
        8 and at 0 mod 16, docs/memory.md §8), so each streamed tensor starts where its resident twin does,
        modulo ALIGN: then the two weight sources give the same bits on every CPU."""
        stored, begin, _ = self.file.stored(key)
        return begin % ALIGN if stored == self.dtype and self.device.type == "cpu" else 0

    def staging(self, keys: list[str]) -> int:
        need = 0
        for dtype, begin, end in map(self.file.stored, keys):
            if dtype != self.dtype or self.device.type != "cpu":
                raw = min(STAGE_BYTES, end - begin)
                need = max(need, raw + (raw // dtype.itemsize * 4 if via_float(dtype, self.dtype) else 0))
        return need

    def fill(self, key: str, out: torch.Tensor, stage: torch.Tensor) -> None:
        self.file.fill(key, out, stage)


class UpcastWeights(BlockWeights):
    """Weights kept resident in half precision (`tensors`: file key -> the kept tensor, a view of the mapped
    file where the file stores that dtype) and up-cast to the compute dtype block by block as the network
    runs, into the arena: float32 arithmetic on a CPU without fast half-precision instructions, with the
    memory of half-precision weights (sd/precision.py). fp16/bf16 -> fp32 is exact, so the results are those
    of float32 weights converted from the same half-precision tensors at load."""

    def __init__(self, network: nn.Module, names: dict[str, str], tensors: dict[str, torch.Tensor],
                 dtype: torch.dtype, device: torch.device):
        self.tensors = tensors
        super().__init__(network, names, dtype, device)

    def to(self, device: torch.device, dtype: torch.dtype) -> None:
        if torch.device(device) != self.tensors_device():  # the kept tensors move, in their own dtype
            self.tensors = {k: t.to(device) for k, t in self.tensors.items()}
        super().to(device, dtype)

    def tensors_device(self) -> torch.device:
        return next(iter(self.tensors.values())).device if self.tensors else torch.device(self.device)

    def fill(self, key: str, out: torch.Tensor, stage: torch.Tensor) -> None:
        out.copy_(self.tensors[key].view(out.shape))


def upcast_weights(module: nn.Module, path: Path, names: dict[str, str], dtype: torch.dtype, device: torch.device,
                   what: str, keep: torch.dtype) -> nn.Module:
    """`load_strict`'s counterpart for half-precision weights computed in `dtype`: the same checks; each
    tensor kept in the file's half dtype when it has one (fp16, bf16: no copy), else converted to `keep`.
    Returns `module` (built on meta) holding placeholders, with `module.weights` up-casting per block."""
    check(module, path, names).raise_first(path, what)
    tensors = dict(_read(path, list(names), keep, torch.device("cpu"), as_stored=(torch.float16, torch.bfloat16)))
    module.weights = UpcastWeights(module, names, tensors, dtype, device)
    if torch.device(device).type != "cpu":
        module.weights.to(device, dtype)
    return module


def stream_weights(module: nn.Module, path: Path, names: dict[str, str], dtype: torch.dtype, device: torch.device,
                   what: str) -> nn.Module:
    """`load_strict`'s counterpart for streaming: the same checks, now; the tensors at every pass.
    Returns `module` (built on meta) holding placeholders, with `module.weights` reading the file."""
    check(module, path, names).raise_first(path, what)
    layout = read_layout(path)
    module.weights = StreamedWeights(module, names, WeightFile(path, layout), dtype, device)
    return module
