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
- `UpcastWeights`: the half-precision tensors of the file stay resident (memory-mapped, read once)
  and each block is converted to the compute dtype when it runs (fp16 → fp32 is exact).

The grain — a resnet, a transformer (norm, proj_in, attention ×2, feed-forward, proj_out), a down/up
sampler, the small stems — is chosen in the networks' forward (docs/memory.md §2). The file checks
of `load_strict` (header, names, shapes, dtypes) run in `streamed()` before any pass; while a run
streams, the file's size and modification time are compared before and after every block's reads
and a short read is refused, so a file changed or cut short under a run raises one UserError line.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from .loading import TORCH_DTYPE, Layout, check, read_layout

STAGE_BYTES = 16 * 2**20  # file bytes read per pread when converting: bounds the staging buffer, not a tuning knob


class Resident:
    """The weights live in the modules: a block needs nothing fetched."""

    _nothing = contextlib.nullcontext()

    def block(self, *modules: nn.Module):
        return self._nothing


RESIDENT = Resident()


class BlockWeights:
    """Weights fetched per block into a network whose modules hold placeholders. `fetch(key, shape)`
    returns one file tensor in the compute dtype, on the device; subclasses say where it comes from."""

    def __init__(self, network: nn.Module, names: dict[str, str], dtype: torch.dtype, device: torch.device):
        self.network, self.dtype, self.device = network, dtype, torch.device(device)
        self.key_of = {name: key for key, name in names.items()}  # parameter name -> file key
        self.prefix = {m: name for name, m in network.named_modules()}
        self.fetched = 0  # bytes fetched so far (the benchmark reads it)
        nan = torch.full((), float("nan"), dtype=dtype, device=self.device)
        self.empty = {name: nan.expand(p.shape) for name, p in network.state_dict().items()}
        network.load_state_dict(self.empty, strict=True, assign=True)
        network.eval().requires_grad_(False)

    @contextlib.contextmanager
    def block(self, *modules: nn.Module):
        """The parameters of `modules` (parts of this network) filled from the file inside the context."""
        for m in modules:
            m.load_state_dict(self.read(m), strict=True, assign=True)
        try:
            yield
        finally:  # placeholders back: the block's tensors are freed here
            for m in modules:
                m.load_state_dict(self.placeholders(m), strict=True, assign=True)

    def read(self, module: nn.Module) -> dict[str, torch.Tensor]:
        prefix = self.prefix[module] + "." if self.prefix[module] else ""
        return {name: self.fetch(self.key_of[prefix + name], p.shape) for name, p in module.named_parameters()}

    def placeholders(self, module: nn.Module) -> dict[str, torch.Tensor]:
        prefix = self.prefix[module] + "." if self.prefix[module] else ""
        return {name: self.empty[prefix + name] for name, _ in module.named_parameters()}

    def fetch(self, key: str, shape: torch.Size) -> torch.Tensor:
        raise NotImplementedError


class WeightFile:
    """One safetensors file held open for `pread`, with the identity it had when it was checked."""

    def __init__(self, path: Path, layout: Layout):
        self.path, self.layout = Path(path), layout
        self.fd = os.open(self.path, os.O_RDONLY)
        self.stamp = self._stamp()
        if self.stamp[0] != layout.size:
            raise self.changed()
        self.stage: torch.Tensor | None = None  # (STAGE_BYTES,) uint8, made on first conversion

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

    def read_into(self, buffer: torch.Tensor, offset: int) -> None:
        """Fill `buffer` (uint8, contiguous, CPU) with the file's bytes from `offset`."""
        view, done = memoryview(buffer.numpy()), 0
        while done < len(view):
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n == 0:  # end of file before the tensor's end: the file was cut short
                raise self.changed()
            done += n

    def tensor(self, key: str, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The tensor `key` in `dtype` on `device`, shaped `shape` (a 1×1 conv stored for a linear fits)."""
        stored, begin, end = self.layout.spans[key]
        stored = TORCH_DTYPE[stored]
        if stored == dtype and device.type == "cpu":  # read straight into the tensor
            raw = torch.empty(end - begin, dtype=torch.uint8)
            self.read_into(raw, begin)
            return raw.view(dtype).view(shape)
        out = torch.empty(shape, dtype=dtype, device=device)
        flat, item = out.view(-1), stored.itemsize
        if self.stage is None:
            self.stage = torch.empty(STAGE_BYTES, dtype=torch.uint8)
        for start in range(begin, end, STAGE_BYTES):  # convert through one small staging buffer
            n = min(STAGE_BYTES, end - start)
            self.read_into(self.stage[:n], start)
            first = (start - begin) // item
            flat[first:first + n // item].copy_(self.stage[:n].view(stored))  # the conversion `.to` makes
        return out


class StreamedWeights(BlockWeights):
    """Each block read from the file when it runs, released after (see the module docstring)."""

    def __init__(self, network: nn.Module, names: dict[str, str], file: WeightFile, dtype: torch.dtype,
                 device: torch.device):
        super().__init__(network, names, dtype, device)
        self.file = file

    @contextlib.contextmanager
    def block(self, *modules: nn.Module):
        self.file.check()
        with super().block(*modules):
            self.file.check()  # the bytes just read were the file's as checked
            yield

    def fetch(self, key: str, shape: torch.Size) -> torch.Tensor:
        t = self.file.tensor(key, shape, self.dtype, self.device)
        self.fetched += t.numel() * t.element_size()
        return t


class UpcastWeights(BlockWeights):
    """Half-precision tensors resident (as loaded: memory-mapped views), converted per block."""

    def __init__(self, network: nn.Module, names: dict[str, str], tensors: dict[str, torch.Tensor],
                 dtype: torch.dtype, device: torch.device):
        super().__init__(network, names, dtype, device)
        self.tensors = tensors  # file key -> stored tensor

    def fetch(self, key: str, shape: torch.Size) -> torch.Tensor:
        t = self.tensors[key].to(device=self.device, dtype=self.dtype).view(shape)
        self.fetched += t.numel() * t.element_size()
        return t


def stream_weights(module: nn.Module, path: Path, names: dict[str, str], dtype: torch.dtype, device: torch.device,
                   what: str) -> nn.Module:
    """`load_strict`'s counterpart for streaming: the same checks, now; the tensors at every pass.
    Returns `module` (built on meta) holding placeholders, with `module.weights` reading the file."""
    check(module, path, names).raise_first(path, what)
    layout = read_layout(path)
    module.weights = StreamedWeights(module, names, WeightFile(path, layout), dtype, device)
    return module


def upcast_weights(module: nn.Module, path: Path, names: dict[str, str], dtype: torch.dtype, device: torch.device,
                   what: str) -> nn.Module:
    """The file's tensors resident as stored (memory-mapped, like `load_strict` keeps a file already in the
    compute dtype), converted to `dtype` per block as the forward runs."""
    from safetensors import safe_open

    check(module, path, names).raise_first(path, what)
    with safe_open(str(path), framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in names}
    module.weights = UpcastWeights(module, names, tensors, dtype, device)
    return module
