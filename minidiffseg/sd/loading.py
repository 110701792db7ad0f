"""Strict safetensors loading into modules built on the `meta` device (docs/design.md §4).

Only safetensors are read — never pickle (`.ckpt`, `.bin`, `.pt` can run code when loaded). A file
is first checked by hand (its 8-byte header length, JSON header, each tensor's byte span against
its shape and dtype, the data size against the file size), so a wrong, corrupt or truncated file gives one
clear error instead of a library panic; an integer tensor where a weight is expected is refused too. Then:
    module built on meta (no memory)  +  every tensor memory-mapped by `safe_open`
    -> each converted to the target dtype/device on its own -> load_state_dict(strict, assign=True)
When the file already holds the target dtype on CPU the mapped tensor itself becomes the parameter
(no copy at all: pages are read on first use). Otherwise the mapping is reopened every
`RELEASE_BYTES` so the pages already converted are let go: peak ≈ one copy of the weights.

A sharded checkpoint (sd/shards.py: several .safetensors files and their index .json) is passed as its index's
path wherever a file is: each shard is checked as above, the index against the shards, and the set reads as the
one file it was split from (`ShardedLayout`); errors name the shard at fault.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..errors import UserError
from .shards import ShardSet, is_index, read_index

M = TypeVar("M", bound=nn.Module)  # a network class, kept through building and loading

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")
RELEASE_BYTES = 256 * 2**20  # file bytes converted before the mapping is reopened (bounds the overshoot)
MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header
SHOWN = 5  # keys quoted in an error message; the rest are counted
# bytes per element of the safetensors dtypes minidiffseg can read (the format's names)
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
            "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def keys_text(keys) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - SHOWN} more)" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more


def check_suffix(path: Path) -> None:
    """Refuse a path that is not a .safetensors file (pickles with their own reason) or a shard set's index."""
    if is_index(path):  # sd/shards.py: its shards are checked as .safetensors files when it is read
        return
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UserError(f"{path}: {path.suffix} files are pickles, which minidiffseg never loads (they can run "
                        "code): use the .safetensors file of the same checkpoint (e.g. v1-5-pruned-emaonly"
                        ".safetensors) or fetch the diffusers folder with `minidiffseg download`")
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"{path}: not a .safetensors file; minidiffseg loads only safetensors checkpoints")


@dataclass
class Layout:
    """A checked safetensors file's header: where each tensor's bytes are (minidiffseg.sd.stream reads them)."""

    shapes: dict[str, tuple[int, ...]]  # key -> shape
    metadata: dict[str, str]
    spans: dict[str, tuple[str, int, int]]  # key -> (safetensors dtype, first byte, end byte) in the file
    size: int  # the file's size in bytes when it was checked


@dataclass
class ShardedLayout(Layout):
    """A checked shard set (sd/shards.py) as one Layout: `shapes` and `metadata` (the shards' own) of all its
    shards, `spans` the byte spans in each tensor's own shard, `size` the shards' total; `file_of` says which
    shard holds a tensor, `shards` each shard's own Layout."""

    index: Path
    file_of: dict[str, Path]  # key -> its shard
    shards: dict[Path, Layout]  # shard -> its Layout


def read_header(path: str | Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Check that `path` is a complete safetensors file; return ({key: shape}, metadata)."""
    layout = read_layout(path)
    return layout.shapes, layout.metadata


def read_layout(path: str | Path) -> Layout:
    """Check that `path` is a complete safetensors file (see read_header); return its Layout. For a shard set's
    index, check every shard and the index against them; return their ShardedLayout."""
    path = Path(path)
    return _sharded_layout(read_index(path)) if is_index(path) else _file_layout(path)


def _file_layout(path: Path) -> Layout:
    """`read_layout` of one safetensors file."""
    check_suffix(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)  # little-endian u64: the JSON header's length, then the header's "{"
        n = int.from_bytes(head[:8], "little")
        if len(head) < 9 or head[8:] != b"{" or n > MAX_HEADER:
            pickle = head[:2] == b"PK" or head[:1] == b"\x80"  # torch.save's zip, or a bare pickle
            raise UserError(f"{path}: not a safetensors file " + ("but a PyTorch pickle checkpoint; get the real "
                            ".safetensors file" if pickle else f"({size} bytes, no safetensors header); check "
                            "the path or download the file again"))
        if 8 + n > size:
            raise UserError(f"{path}: truncated: its header alone needs {8 + n} bytes but the file has {size}; "
                            "the download was cut short, download it again")
        try:
            f.seek(8)
            header = json.loads(f.read(n))
            tensors = {k: v for k, v in header.items() if k != "__metadata__"}
            end = max((v["data_offsets"][1] for v in tensors.values()), default=0)
            shapes = {k: tuple(v["shape"]) for k, v in tensors.items()}
            spans = {k: (v["dtype"], v["data_offsets"][1] - v["data_offsets"][0]) for k, v in tensors.items()}
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise UserError(f"{path}: not a safetensors file (its header is not safetensors JSON); "
                            "check the path or download the file again") from None
    for key, (dtype, nbytes) in spans.items():
        if dtype not in ITEMSIZE:
            raise UserError(f"{path}: tensor {key} has dtype {dtype}, which minidiffseg does not read; the file is "
                            "not a checkpoint minidiffseg loads (Stable Diffusion 1.5 or 2.x, CLIP, BLIP), or corrupt: "
                            "download it again")
        if math.prod(shapes[key]) * ITEMSIZE[dtype] != nbytes:
            raise UserError(f"{path}: corrupt header: tensor {key} is {list(shapes[key])} {dtype} "
                            f"({math.prod(shapes[key]) * ITEMSIZE[dtype]} bytes) but its data offsets span {nbytes} "
                            "bytes; download the file again")
    if 8 + n + end > size:
        raise UserError(f"{path}: truncated: its header describes {8 + n + end} bytes but the file has {size}; "
                        "the download was cut short, download it again")
    return Layout(shapes, header.get("__metadata__") or {},
                  {k: (v["dtype"], 8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1]) for k, v in tensors.items()},
                  size)


def _sharded_layout(shards: ShardSet) -> ShardedLayout:
    """The shards of `shards` checked one by one as safetensors files, then against the index: every key it maps to a
    shard is in that shard, and no shard holds a key it does not map to that shard."""
    index, layouts = shards.index, {}
    mapped = {shard: [k for k, f in shards.file_of.items() if f == shard] for shard in shards.shards}
    for shard, keys in mapped.items():  # every name, then every file, before any file is read
        if shard.suffix.lower() in PICKLE_SUFFIXES:
            check_suffix(shard)  # refused as a pickle
        if shard.suffix.lower() != ".safetensors":
            raise UserError(f"{index}: maps {len(keys)} tensor(s) to {shard.name}, which is not a .safetensors file; "
                            "minidiffseg loads only safetensors checkpoints")
    for shard, keys in mapped.items():
        if not shard.is_file():
            raise UserError(f"{shard}: shard not found: {index.name} maps {len(keys)} tensor(s) to it "
                            f"({keys_text(keys)}); the download is incomplete: download the folder again")
    for shard, keys in mapped.items():
        layout = layouts[shard] = _file_layout(shard)
        lacking = set(keys) - layout.shapes.keys()
        if lacking:
            raise UserError(f"{shard}: lacks {len(lacking)} tensor(s) that {index.name} maps to it: "
                            f"{keys_text(lacking)}; the shards and the index are not from one download: download "
                            "the folder again")
        extra = layout.shapes.keys() - set(keys)
        if extra:
            raise UserError(f"{shard}: holds {len(extra)} tensor(s) that {index.name} does not map to it: "
                            f"{keys_text(extra)}; the shards and the index are not from one download: download the "
                            "folder again")
    parts = list(layouts.values())
    return ShardedLayout(shapes={k: s for p in parts for k, s in p.shapes.items()},
                         metadata={k: v for p in parts for k, v in p.metadata.items()},
                         spans={k: s for p in parts for k, s in p.spans.items()}, size=sum(p.size for p in parts),
                         index=index, file_of={k: f for f, p in layouts.items() for k in p.shapes}, shards=layouts)


def _file_of(path: Path, keys) -> dict[str, Path]:
    """The safetensors file holding each of `keys`: `path` itself, or for a shard set's index the key's shard
    (the set checked first: `read_layout`)."""
    if not is_index(path):
        return dict.fromkeys(keys, path)
    layout = read_layout(path)
    assert isinstance(layout, ShardedLayout)
    absent = [k for k in keys if k not in layout.file_of]
    if absent:  # names come from the header read_header returned: a bug, or the index changed since
        raise UserError(f"{path}: {len(absent)} tensor(s) not in its weight_map: {keys_text(absent)}; the index "
                        "changed since it was read: check the folder and run again")
    return {k: layout.file_of[k] for k in keys}


def build_on_meta(cls: type[M], cfg) -> M:
    """`cls(cfg)` with parameters on the meta device (no storage): `load_strict` assigns the file's tensors."""
    with torch.device("meta"):
        return cls(cfg)


# safetensors dtype name -> torch dtype, for the messages that name a stored dtype
TORCH_DTYPE = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
               "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
               "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


@dataclass
class Report:
    """What loading `names` of a file into a module would find, without reading any tensor data. The one
    set of checks behind both `load_strict` (which raises on the first kind of problem) and
    `minidiffseg inspect-weights` (which lists them all)."""

    dtypes: Counter  # safetensors dtype -> number of loaded tensors
    params: int  # elements of the loaded tensors
    twice: list[str]  # "key1 and key2": one parameter filled by two file keys
    missing: list[str]  # parameters that no file key fills
    unexpected: list[str]  # file keys whose parameter the module lacks
    bad_shape: list[tuple[str, tuple, tuple, str]]  # (key, stored shape, expected shape, parameter)
    bad_dtype: list[tuple[str, str, str]]  # (key, stored dtype, parameter): integers/bools for float weights

    @property
    def ok(self) -> bool:
        return not (self.twice or self.missing or self.unexpected or self.bad_shape or self.bad_dtype)

    def raise_first(self, path: Path, what: str) -> None:
        """One line for the first kind of problem found (the order loading meets them), or nothing."""
        if self.twice:  # e.g. a VAE file with both the legacy and the current attention names
            raise UserError(f"{path}: {len(self.twice)} {what} parameter(s) stored twice under different names: "
                            f"{keys_text(self.twice)}; the file is not a valid {what} checkpoint")
        if self.missing:
            raise UserError(f"{path}: {len(self.missing)} {what} tensor(s) missing: {keys_text(self.missing)}; the "
                            "file is incomplete or holds another model: download it again (`minidiffseg download`)")
        if self.unexpected:
            raise UserError(f"{path}: {len(self.unexpected)} unexpected {what} tensor(s): {keys_text(self.unexpected)}; "
                            f"the file holds a {what} of another model or size than its config describes")
        for key, got, want, name in self.bad_shape[:1]:
            raise UserError(f"{path}: tensor {key} has shape {list(got)} but the {what} expects {list(want)} "
                            f"for {name}; the file does not match its config (mixed-up files?)")
        for key, dtype, name in self.bad_dtype[:1]:
            raise UserError(f"{path}: tensor {key} is stored as {TORCH_DTYPE[dtype]} but the {what}'s {name} holds "
                            "floating-point weights; the file is corrupt or holds another model: download it again")


def check(module: nn.Module, path: Path, names: dict[str, str]) -> Report:
    """Check that the file keys `names` (file key -> parameter name) fill `module` (built on meta) exactly:
    every parameter filled once, every name known, every shape equal (a 1×1 conv [O, I, 1, 1] may fill a
    linear [O, I]), floating-point data where the module holds floats. Reads the header only."""
    expected = {k: (tuple(v.shape), v.is_floating_point()) for k, v in module.state_dict().items()}
    files: dict[Path, list[str]] = {}  # `path` itself, or the shards of an index
    for key, file in _file_of(path, names).items():
        files.setdefault(file, []).append(key)
    info = {}
    for file, keys in files.items():
        try:
            with safe_open(str(file), framework="pt") as f:  # slices read no tensor data
                info.update({k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in keys})
        except SafetensorError as e:
            raise UserError(f"{file}: unreadable safetensors file ({e}); download it again") from None
    keys_of: dict[str, list[str]] = {}
    for key, name in names.items():
        keys_of.setdefault(name, []).append(key)
    bad_shape, bad_dtype = [], []
    for key, name in names.items():
        if name not in expected:
            continue
        (got, dtype), (want, floating) = info[key], expected[name]
        if got != want and not (len(want) == 2 and got == (*want, 1, 1)):  # 1×1 conv stored for a linear
            bad_shape.append((key, got, want, name))
        if floating and dtype not in FLOAT_DTYPES:
            bad_dtype.append((key, dtype, name))
    return Report(dtypes=Counter(dtype for _, dtype in info.values()),
                  params=sum(math.prod(shape) for shape, _ in info.values()),
                  twice=[" and ".join(keys) for keys in keys_of.values() if len(keys) > 1],
                  missing=sorted(expected.keys() - set(names.values())),
                  unexpected=sorted(k for k, n in names.items() if n not in expected),
                  bad_shape=bad_shape, bad_dtype=bad_dtype)


def load_strict(module: M, path: Path, names: dict[str, str], dtype: torch.dtype, device: torch.device,
                what: str) -> M:
    """Fill `module` (built on meta) from `path`: `names` maps each file key to load to a parameter name.
    `check` runs first (every parameter filled, every name known, every shape and dtype right); returns
    the module in eval mode without gradients."""
    check(module, path, names).raise_first(path, what)
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    state = {names[key]: t.reshape(shapes[names[key]]) for key, t in _read(path, list(names), dtype, device)}
    module.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
    if left:  # a buffer that no checkpoint holds must be created in forward, not in __init__
        raise RuntimeError(f"bug: {what} tensors not filled by any checkpoint stayed on meta: {left}")
    return module.eval().requires_grad_(False)


def _read(path: Path, keys: list[str], dtype: torch.dtype, device: torch.device, as_stored: tuple = ()):
    """Yield (key, tensor) in `dtype` (floating-point tensors only; those stored in an `as_stored` dtype stay
    in it) on `device`, one at a time. `path` may be a shard set's index: each tensor from its shard."""
    file_of, converted, at = _file_of(path, keys), 0, path
    opened: dict[Path, Any] = {}  # file -> its safe_open handle (one file, or the shards of an index)
    try:
        for key in keys:
            at = file_of[key]
            if converted > RELEASE_BYTES:
                opened, converted = {}, 0  # the old mappings go with their views
            if at not in opened:
                opened[at] = safe_open(str(at), framework="pt")
            t = opened[at].get_tensor(key)  # a view of the memory-mapped file: nothing is read yet
            target = dtype if t.is_floating_point() and t.dtype not in as_stored else t.dtype
            if t.dtype == target and device.type == "cpu":
                yield key, t
            else:
                converted += t.nbytes
                yield key, t.to(device=device, dtype=target)
    except SafetensorError as e:
        raise UserError(f"{at}: unreadable safetensors file ({e}); download it again") from None
