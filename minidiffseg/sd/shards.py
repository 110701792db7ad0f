"""Sharded safetensors checkpoints: one network's weights stored as several .safetensors files and an index.

transformers and diffusers split a large state dict when they save it (`save_pretrained(max_shard_size=...)`);
SD3's T5-XXL encoder (9.5 GB in fp16) is stored that way:

    text_encoder_3/model-00001-of-00002.safetensors, model-00002-of-00002.safetensors, model.safetensors.index.json
    the fp16 variant: model.fp16-00001-of-00002.safetensors, ..., model.safetensors.index.fp16.json

The index is JSON, {"metadata": {"total_size": ...}, "weight_map": {tensor key: shard file name}}, the shards
beside it. (Variant names follow transformers' and diffusers' `_add_variant`: the variant goes before the last
suffix; diffusers' older, legacy naming put it after the shard number, `model-00001-of-00002.fp16.safetensors`
with `model.safetensors.fp16.index.json`. The shard names are read from the index, so only the index's own
name matters here.)

Everywhere minidiffseg takes a weights file (sd/loading.py `read_header`, `read_layout`, `check`, `load_strict`;
sd/stream.py `stream_weights`, `upcast_weights`; `minidiffseg inspect-weights`) the index's path stands for the
whole set: the shards are checked one by one as single files (so a truncated or corrupt shard is named), every
key the index maps to a shard must be in that shard and no shard may hold a key the index does not map to it,
and the set then reads as the one file it was split from. This module only parses the index and finds the
files; it reads no tensor (sd/loading.py does, with `ShardedLayout`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

FIX = "fetch the model again with `minidiffseg download` (weights/README.md)"


def is_index(path: str | Path) -> bool:
    """Whether `path` names the index of a sharded safetensors checkpoint (`*.safetensors.index.json`,
    `*.safetensors.index.fp16.json`, diffusers' legacy `*.safetensors.fp16.index.json`), by its name only."""
    name = Path(path).name.lower()
    return name.endswith(".json") and ".safetensors." in name and ".index." in name


def index_names(stem: str, variant: str | None) -> list[str]:
    """The names an index of `stem`'s shards has: without a variant `{stem}.safetensors.index.json`; with one,
    transformers'/diffusers' `{stem}.safetensors.index.{variant}.json`, then diffusers' legacy
    `{stem}.safetensors.{variant}.index.json`."""
    if variant is None:
        return [f"{stem}.safetensors.index.json"]
    return [f"{stem}.safetensors.index.{variant}.json", f"{stem}.safetensors.{variant}.index.json"]


@dataclass(frozen=True)
class ShardSet:
    """A parsed index: which shard (a file beside the index) holds each tensor. Not yet checked against the
    shards themselves (sd/loading.py `read_layout` does that)."""

    index: Path
    metadata: dict  # the index's own "metadata" (transformers writes total_size, total_parameters)
    file_of: dict[str, Path]  # tensor key -> the shard holding it, in the index's order

    @property
    def shards(self) -> list[Path]:
        """The shard files, in name order (model-00001-of-00002..., model-00002-of-00002...)."""
        return sorted(set(self.file_of.values()))


def read_index(path: str | Path) -> ShardSet:
    """Parse the index at `path` (see the module docstring); one-line UserError when it is missing, not JSON, or
    not a {"weight_map": {key: shard file name}} of plain file names."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a safetensors index (not valid JSON: {e}); {FIX}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise UserError(f"{path}: not a safetensors index (no \"weight_map\" from tensor names to shard file names); "
                        f"{FIX}")
    for key, name in weight_map.items():
        if Path(name).name != name or name in ("", ".", ".."):  # a shard lies beside its index, nowhere else
            raise UserError(f"{path}: maps tensor {key} to {name!r}, which is not a file name beside the index; the "
                            f"index is corrupt: {FIX}")
    metadata = index.get("metadata")
    return ShardSet(path, metadata if isinstance(metadata, dict) else {},
                    {key: path.parent / name for key, name in weight_map.items()})


def shard_files(path: str | Path) -> list[Path]:
    """The files holding a checkpoint's tensors: the shards of an index, else `path` itself."""
    return read_index(path).shards if is_index(path) else [Path(path)]
