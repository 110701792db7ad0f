"""Loading a filter model from a hub folder (docs/design.md §4): `model.safetensors` beside its
`config.json`, read strictly by `minidiffseg.sd.loading` into a module built on `meta`. Keys the
module does not build are listed by name (`ignored`); a missing file says what to download."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..sd.loading import build_on_meta, load_strict, read_header


def check_folder(folder: str | Path, what: str, hub_id: str) -> Path:
    """The folder's `model.safetensors`, or one line saying what to download where."""
    path = Path(folder) / "model.safetensors"
    if not path.is_file():
        which = "clip" if "clip" in hub_id.lower() else "blip"
        raise UserError(f"{what} weights not found: {path} does not exist; fetch {hub_id} with "
                        f"`minidiffseg download --what {which} --dir {Path(folder)}`")
    return path


def load_weights(cls, config_cls, folder: str | Path, what: str, hub_id: str, device="cpu",
                 dtype: torch.dtype = torch.float32) -> nn.Module:
    """`cls` built on meta from `folder/config.json` (`config_cls`'s defaults without one), filled strictly
    from `folder/model.safetensors` (our module names are the file's names, `cls.IGNORED` skipped)."""
    folder = Path(folder)
    cfg_file = folder / "config.json"
    cfg = config_cls.from_transformers(json.loads(cfg_file.read_text())) if cfg_file.is_file() else config_cls()
    model = build_on_meta(cls, cfg)
    path = check_folder(folder, what, hub_id)
    shapes, _ = read_header(path)
    names = {k: k for k in shapes if k not in cls.IGNORED}
    return load_strict(model, path, names, dtype, torch.device(device), what)
