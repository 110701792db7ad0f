"""Loading a filter model from a hub folder (docs/design.md §4): `model.safetensors` beside its
`config.json`, read strictly by `minidiffseg.sd.loading` into a module built on `meta`. Keys the
module does not build are listed by name (`ignored`); a missing file says what to download. The folder
may be given as the hub id itself (`openai/clip-vit-large-patch14`): its copy in the Hugging Face cache
(minidiffseg.sd.hub.cached, no network), as `--weights` takes an SD hub id. A folder with only the pickled
`pytorch_model.bin` is refused as the SD loader refuses pickles (they can run code)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar, TypeVar

import torch
from torch import nn

from ..errors import UserError
from ..sd import hub
from ..sd.loading import PICKLE_SUFFIXES, build_on_meta, load_strict, read_header

FILTER_MODELS = ("clip", "blip")  # their hub.REPOS keys


class HubModel(nn.Module):
    """A filter model read from a hub folder by `load_weights`: IGNORED names the file keys it does not build."""

    IGNORED: ClassVar[tuple[str, ...]] = ()


H = TypeVar("H", bound=HubModel)


def resolve_folder(folder: str | Path, hub_id: str) -> Path:
    """`folder` itself, or, when it does not exist and names the model's hub id (current or former), the
    model's copy in the Hugging Face cache (one line naming the download command when it is not there)."""
    path = Path(folder)
    if not path.exists() and (what := hub.what_for(str(folder), FILTER_MODELS)) is not None \
            and hub.REPOS[what].repo_id == hub_id:
        return hub.cached(what)
    return path


def check_folder(folder: str | Path, what: str, hub_id: str) -> Path:
    """The folder's `model.safetensors`, or one line saying what is wrong and what to download where."""
    folder = resolve_folder(folder, hub_id)
    path = folder / "model.safetensors"
    if not path.is_file():
        which = "clip" if "clip" in hub_id.lower() else "blip"
        fetch = f"`minidiffseg download --what {which} --dir {folder}`"
        pickles = sorted(p for p in folder.glob("*") if p.suffix.lower() in PICKLE_SUFFIXES) if folder.is_dir() else []
        if pickles:  # the wording of minidiffseg.sd.loading.check_suffix, naming this model's file
            raise UserError(f"{pickles[0]}: {pickles[0].suffix} files are pickles, which minidiffseg never loads "
                            f"(they can run code): use the model.safetensors of {hub_id} instead, fetched with {fetch}")
        raise UserError(f"{what} weights not found: {path} does not exist; fetch {hub_id} with {fetch}")
    return path


def load_weights(cls: type[H], config_cls, folder: str | Path, what: str, hub_id: str, device="cpu",
                 dtype: torch.dtype = torch.float32) -> H:
    """`cls` built on meta from `folder/config.json` (`config_cls`'s defaults without one), filled strictly
    from `folder/model.safetensors` (our module names are the file's names, `cls.IGNORED` skipped)."""
    folder = resolve_folder(folder, hub_id)
    cfg_file = folder / "config.json"
    cfg = config_cls.from_transformers(json.loads(cfg_file.read_text())) if cfg_file.is_file() else config_cls()
    model = build_on_meta(cls, cfg)
    path = check_folder(folder, what, hub_id)
    shapes, _ = read_header(path)
    names = {k: k for k in shapes if k not in cls.IGNORED}
    return load_strict(model, path, names, dtype, torch.device(device), what)
