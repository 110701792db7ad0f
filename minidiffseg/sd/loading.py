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
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..errors import UserError

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")
RELEASE_BYTES = 256 * 2**20  # file bytes converted before the mapping is reopened (bounds the overshoot)
MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header
SHOWN = 5  # keys quoted in an error message; the rest are counted
# bytes per element of the safetensors dtypes minidiffseg can read (the format's names)
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
            "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def keys_text(keys) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - SHOWN} more)" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more


def check_suffix(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UserError(f"{path}: {path.suffix} files are pickles, which minidiffseg never loads (they can run "
                        "code): use the .safetensors file of the same checkpoint (e.g. v1-5-pruned-emaonly"
                        ".safetensors) or fetch the diffusers folder with `minidiffseg download`")
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"{path}: not a .safetensors file; minidiffseg loads only safetensors checkpoints")


def read_header(path: str | Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Check that `path` is a complete safetensors file; return ({key: shape}, metadata)."""
    path = Path(path)
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
                            "not an SD1.5 checkpoint, or corrupt: download it again")
        if math.prod(shapes[key]) * ITEMSIZE[dtype] != nbytes:
            raise UserError(f"{path}: corrupt header: tensor {key} is {list(shapes[key])} {dtype} "
                            f"({math.prod(shapes[key]) * ITEMSIZE[dtype]} bytes) but its data offsets span {nbytes} "
                            "bytes; download the file again")
    if 8 + n + end > size:
        raise UserError(f"{path}: truncated: its header describes {8 + n + end} bytes but the file has {size}; "
                        "the download was cut short, download it again")
    return shapes, header.get("__metadata__") or {}


def build_on_meta(cls, cfg) -> nn.Module:
    """`cls(cfg)` with parameters on the meta device (no storage): `load_strict` assigns the file's tensors."""
    with torch.device("meta"):
        return cls(cfg)


def load_strict(module: nn.Module, path: Path, names: dict[str, str], shapes: dict[str, tuple[int, ...]],
                dtype: torch.dtype, device: torch.device, what: str) -> nn.Module:
    """Fill `module` (built on meta) from `path`: `names` maps each file key to load to a parameter
    name, `shapes` are the file's (from read_header). Every parameter must be filled, every name must
    exist, every shape must match; returns the module in eval mode without gradients."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    floating = {k for k, v in module.state_dict().items() if v.is_floating_point()}
    keys_of: dict[str, list[str]] = {}
    for key, name in names.items():
        keys_of.setdefault(name, []).append(key)
    twice = [" and ".join(keys) for keys in keys_of.values() if len(keys) > 1]
    if twice:  # e.g. a VAE file with both the legacy and the current attention names
        raise UserError(f"{path}: {len(twice)} {what} parameter(s) stored twice under different names: "
                        f"{keys_text(twice)}; the file is not a valid SD1.5 checkpoint")
    missing = expected.keys() - set(names.values())
    if missing:
        raise UserError(f"{path}: {len(missing)} {what} tensor(s) missing: {keys_text(missing)}; the file is "
                        "incomplete or not an SD1.5 checkpoint: download it again (`minidiffseg download`)")
    unexpected = [k for k, n in names.items() if n not in expected]
    if unexpected:
        raise UserError(f"{path}: {len(unexpected)} unexpected {what} tensor(s): {keys_text(unexpected)}; "
                        "the file is not an SD1.5 checkpoint of the size its config describes")
    for key, name in names.items():
        got, want = shapes[key], expected[name]
        if got != want and not (len(want) == 2 and got == (*want, 1, 1)):  # 1×1 conv [O,I,1,1] -> linear [O,I]
            raise UserError(f"{path}: tensor {key} has shape {list(got)} but the {what} expects {list(want)} "
                            f"for {name}; the file does not match its config (mixed-up files?)")
    state = {}
    for key, t in _read(path, list(names), dtype, device):
        if names[key] in floating and not t.is_floating_point():
            raise UserError(f"{path}: tensor {key} is stored as {t.dtype} but the {what}'s {names[key]} holds "
                            "floating-point weights; the file is corrupt or not an SD1.5 checkpoint: download it again")
        state[names[key]] = t.reshape(expected[names[key]])
    module.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
    if left:  # a buffer that no checkpoint holds must be created in forward, not in __init__
        raise RuntimeError(f"bug: {what} tensors not filled by any checkpoint stayed on meta: {left}")
    return module.eval().requires_grad_(False)


def _read(path: Path, keys: list[str], dtype: torch.dtype, device: torch.device):
    """Yield (key, tensor) in `dtype` (floating-point tensors only) on `device`, one at a time."""
    f, converted = None, 0
    try:
        for key in keys:
            if f is None or converted > RELEASE_BYTES:
                f, converted = safe_open(str(path), framework="pt"), 0  # the old mapping goes with its views
            t = f.get_tensor(key)  # a view of the memory-mapped file: nothing is read yet
            target = dtype if t.is_floating_point() else t.dtype
            if t.dtype == target and device.type == "cpu":
                yield key, t
            else:
                converted += t.nbytes
                yield key, t.to(device=device, dtype=target)
    except SafetensorError as e:
        raise UserError(f"{path}: unreadable safetensors file ({e}); download it again") from None
