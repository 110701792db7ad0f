"""Where a network's weights are while it runs (docs/memory.md §1, §2), applied from outside the network.

A network declares its streaming grain and nothing else: `stream_blocks`, a class attribute naming the
module types that are fetched as a whole (the U-Net: resnet, transformer, down/up sampler, time
embedding). `blocks(network)` walks the module tree: the outermost modules of those types are blocks,
and so is every other module holding parameters of its own (conv_in, the final norm and conv, ...),
with its whole subtree. The blocks hold every parameter exactly once (tests/test_stream.py).

- Resident weights (the default, `weights_of(network) is RESIDENT`): the weights live in the modules,
  as `load_state_dict` put them; nothing is attached, the forwards run bare.
- A `BlockWeights` source (`StreamedWeights`: the file, read per block; `UpcastWeights`: half-precision
  tensors kept resident, up-cast per block): the modules hold empty placeholders (a NaN scalar expanded
  to each parameter's shape: no memory, the right shape, dtype and device). A forward pre-hook on each
  block puts the block's tensors in (`load_state_dict(strict=True, assign=True)`) and a forward hook
  (always called, also when the forward raises) puts the placeholders back, which frees them. At most
  one block's weights are alive at a time, in the process's arena (sd/arena.py).

The file checks of `load_strict` (header, names, shapes, dtypes) run in `stream_weights()` before any
pass; while a run streams, the file's size and modification time are compared before and after every
block's reads and a short read is refused (sd/weightfile.py), so a file changed or cut short under a run
raises one UserError line. A sharded checkpoint (sd/shards.py) is passed as its index: every shard is checked
the same way, each tensor read from its shard.
"""

from __future__ import annotations

import contextlib
import math
import threading
from pathlib import Path

import torch
from torch import nn

from .arena import ARENA
from .loading import _read, check
from .weightfile import ShardedWeightFile, WeightFile, open_weights, via_float

ALIGN = 64  # bytes: a cache line; each tensor of a block starts on one, plus its resident twin's residue


class Resident:
    """The weights live in the modules: nothing is attached, a block needs nothing fetched."""


RESIDENT = Resident()


def weights_of(network: nn.Module) -> "Resident | BlockWeights":
    """The source of `network`'s weights: RESIDENT unless a BlockWeights source is attached."""
    return getattr(network, "weights", RESIDENT)


def blocks(network: nn.Module) -> list[nn.Module]:
    """The modules of `network` fetched as a whole, in module order (see the module docstring)."""
    kinds = tuple(getattr(network, "stream_blocks", ()))
    found: list[nn.Module] = []

    def walk(module: nn.Module) -> None:
        if module is not network and (isinstance(module, kinds) or any(True for _ in module.parameters(recurse=False))):
            found.append(module)
            return
        for child in module.children():
            walk(child)

    walk(network)
    return found


_open = threading.local()  # the block this thread has filled and not yet released


class BlockWeights:
    """Weights fetched per block into a network whose modules hold placeholders: a block's tensors are
    views of `arena` (sd/arena.py) while the block runs. Subclasses say where the bytes come from (`fill`)."""

    arena = ARENA  # where a block's tensors go (anything with `take(nbytes)` and `hold()`)

    def __init__(self, network: nn.Module, names: dict[str, str], dtype: torch.dtype, device: torch.device):
        self.network, self.dtype, self.device = network, dtype, torch.device(device)
        self.key_of = {name: key for key, name in names.items()}  # parameter name -> file key
        self.prefix = {m: name for name, m in network.named_modules()}
        self.to(device, dtype)
        network.eval().requires_grad_(False)
        self.attach()

    def attach(self) -> None:
        """Become `network`'s weight source: a pre-hook fills each block, a hook empties it."""
        for handle in getattr(self.network, "_block_hooks", []):  # a previous source's
            handle.remove()
        hooks = []
        for m in blocks(self.network):
            hooks.append(m.register_forward_pre_hook(self._enter))
            hooks.append(m.register_forward_hook(self._leave, always_call=True))
        # ignore: torch types Module.__setattr__'s value as Tensor | Module, though any attribute may be set
        self.network._block_hooks = hooks  # type: ignore[assignment]
        self.network.weights = self  # type: ignore[assignment]

    def _enter(self, module: nn.Module, args) -> None:
        stale = getattr(_open, "stack", None)
        if stale is not None:  # a block left by an interrupt (KeyboardInterrupt skips the hooks): release it
            _open.stack = None
            stale.close()
        stack = contextlib.ExitStack()
        stack.enter_context(self.block(module))
        _open.stack = stack

    def _leave(self, module: nn.Module, args, output) -> None:
        stack, _open.stack = getattr(_open, "stack", None), None
        if stack is not None:
            stack.close()

    def to(self, device: torch.device, dtype: torch.dtype) -> None:
        """Fetch the blocks in `dtype` onto `device` from now on (Segmenter.to): the placeholders follow."""
        self.dtype, self.device = dtype, torch.device(device)
        nan = torch.full((), float("nan"), dtype=dtype, device=self.device)
        self.empty = {name: nan.expand(p.shape) for name, p in self.network.state_dict().items()}
        self.network.load_state_dict(self.empty, strict=True, assign=True)

    @contextlib.contextmanager
    def block(self, module: nn.Module):
        """The parameters of `module` (a block of this network) filled inside the context."""
        with self.arena.hold():  # one block at a time in the process: its tensors live in the arena
            module.load_state_dict(self.read(module), strict=True, assign=True)
            try:
                yield
            finally:  # placeholders back: nothing refers to the arena any more
                module.load_state_dict(self._named(module, lambda full, p: self.empty[full]), strict=True, assign=True)

    def keys(self, module: nn.Module) -> dict[str, tuple[str, torch.Size]]:
        """{parameter name in `module`: (file key, shape)}."""
        return self._named(module, lambda full, p: (self.key_of[full], p.shape))

    def read(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """{parameter name: tensor in the compute dtype on the device}, filled into the arena."""
        keys = self.keys(module)
        cpu, item = self.device.type == "cpu", self.dtype.itemsize
        starts, end = [], 0  # each tensor's first byte in the buffer: on a cache line, plus its residue
        for key, shape in keys.values():
            at = (end + ALIGN - 1) // ALIGN * ALIGN + self.residue(key)
            starts.append(at)
            end = at + math.prod(shape) * item
        stage = self.stage_bytes([key for key, _ in keys.values()])
        buffer = self.arena.take(end + stage if cpu else stage)  # (bytes,) uint8
        state = {}
        for (name, (key, shape)), at in zip(keys.items(), starts):
            out = (buffer[at:at + math.prod(shape) * item].view(self.dtype).view(shape) if cpu
                   else torch.empty(shape, dtype=self.dtype, device=self.device))
            self.fill(key, out, buffer[buffer.numel() - stage:])
            state[name] = out
        return state

    def residue(self, key: str) -> int:
        """Where in its cache line the tensor `key` starts (bytes past an ALIGN boundary): the same as the
        resident tensor's, so both give the same bits (see `StreamedWeights.residue`)."""
        return 0

    def _named(self, module: nn.Module, value) -> dict:
        prefix = self.prefix[module] + "." if self.prefix[module] else ""
        return {name: value(prefix + name, p) for name, p in module.named_parameters()}

    def stage_bytes(self, keys: list[str]) -> int:
        """Bytes of scratch space `fill` needs for these file keys."""
        return 0

    def fill(self, key: str, out: torch.Tensor, stage: torch.Tensor) -> None:
        """Write the file tensor `key`, converted to out.dtype, into `out` (contiguous)."""
        raise NotImplementedError


class StreamedWeights(BlockWeights):
    """Each block read from the file when it runs, released after (see the module docstring)."""

    staged = False  # the device path on the CPU too (tests compare it with the CPU path there)

    def __init__(self, network: nn.Module, names: dict[str, str], file: WeightFile | ShardedWeightFile,
                 dtype: torch.dtype, device: torch.device):
        self.file = file
        self.host: torch.Tensor | None = None  # the device path's pinned staging buffer, grown to the largest block
        self.copied: torch.cuda.Event | None = None  # a CUDA event: the last copy out of `host` is done
        super().__init__(network, names, dtype, device)

    def read(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """On a GPU (docs/memory.md §9): the block's bytes as stored are read into one pinned host buffer, copied to
        the device in one asynchronous copy, and converted to the compute dtype there; the CPU path (the arena,
        converted on the CPU) otherwise."""
        if self.device.type == "cpu" and not self.staged:
            return super().read(module)
        keys = self.keys(module)
        spans, end = [], 0  # (stored dtype, file offset, bytes, offset in the buffer) per tensor
        for key, _ in keys.values():
            stored, begin, stop = self.file.stored(key)
            at = (end + ALIGN - 1) // ALIGN * ALIGN + self.residue(key)  # as the CPU path places it
            spans.append((stored, begin, stop - begin, at))
            end = at + stop - begin
        host = self.host_buffer(end)
        for (key, _), (stored, begin, nbytes, at) in zip(keys.values(), spans):
            self.file.part(key).read_into(host[at:at + nbytes], begin)  # (a shard set: the key's shard)
        raw = host[:end].to(self.device, non_blocking=True)  # (bytes,) uint8; on the CPU the buffer itself
        if self.device.type == "cuda":  # `host` may be refilled once this copy is done
            self.copied = torch.cuda.Event()
            self.copied.record()
        state = {}
        for (name, (key, shape)), (stored, _, nbytes, at) in zip(keys.items(), spans):
            t = raw[at:at + nbytes].view(stored).view(shape)
            if stored != self.dtype:  # converted on the device, with the rounding `.to(dtype)` makes
                t = (t.float() if via_float(stored, self.dtype) else t).to(self.dtype)
            state[name] = t
        return state

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        """`nbytes` of host memory for one block's bytes: pinned (page-locked) for a GPU, so the copy is one
        asynchronous DMA; the arena on the CPU."""
        if self.device.type == "cpu":
            return self.arena.take(nbytes)
        if self.copied is not None:
            self.copied.synchronize()  # the previous block's copy has left the buffer
        if self.host is None or self.host.numel() < nbytes:
            self.host = None
            self.host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        return self.host

    @contextlib.contextmanager
    def block(self, module: nn.Module):
        self.file.check()
        with super().block(module):
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

    def stage_bytes(self, keys: list[str]) -> int:
        return self.file.stage_bytes(keys, self.dtype)

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
    Returns `module` (built on meta) holding placeholders, with UpcastWeights attached."""
    check(module, path, names).raise_first(path, what)
    tensors = dict(_read(path, list(names), keep, torch.device("cpu"), as_stored=(torch.float16, torch.bfloat16)))
    weights = UpcastWeights(module, names, tensors, dtype, device)
    if torch.device(device).type != "cpu":
        weights.to(device, dtype)
    return module


def stream_weights(module: nn.Module, path: Path, names: dict[str, str], dtype: torch.dtype, device: torch.device,
                   what: str) -> nn.Module:
    """`load_strict`'s counterpart for streaming: the same checks, now; the tensors at every pass.
    Returns `module` (built on meta) holding placeholders, with StreamedWeights attached (reading the file)."""
    check(module, path, names).raise_first(path, what)
    StreamedWeights(module, names, open_weights(path), dtype, device)
    return module
