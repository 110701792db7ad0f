"""Stable Diffusion 1.5 as minidiffseg uses it — tokenizer, text encoder, VAE encoder, U-Net and noise
schedule — loaded from either official layout (docs/design.md §4):

- a diffusers folder: unet/, vae/, text_encoder/ (each a config.json and a safetensors file, fp32
  or the `.fp16` variant) and tokenizer/ (vocab.json + merges.txt). Sizes come from the config.json
  files; our parameter names are the files' names.
- a single original-LDM file (v1-5-pruned-emaonly[-fp16].safetensors): names translated by the rules
  of minidiffseg.ldm, sizes read from the tensor shapes; the tokenizer from a tokenizer/ folder
  beside it or the `tokenizer=` argument.

Either way each network is built on the meta device and filled by minidiffseg.loading (strict,
memory-mapped, one copy of the weights). Keys we never build are ignored by name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

import torch
from torch import nn

from . import hub, ldm
from .clip import CLIPTextModel
from .config import CLIPTextConfig, UNetConfig, VAEConfig
from ..errors import UserError
from .loading import PICKLE_SUFFIXES, build_on_meta, check_suffix, keys_text, load_strict, read_header
from .schedule import NoiseSchedule
from .stream import stream_weights
from .tokenizer import CLIPTokenizer
from .unet import UNet
from .vae import VAEEncoder

DOWNLOAD = "fetch SD1.5 with `minidiffseg download --what sd15 --dir FOLDER`"
WHAT = {"unet": "U-Net", "vae": "VAE", "text_encoder": "text encoder"}
WEIGHTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
IGNORED = {"unet": (),  # keys of the diffusers files that we never build
           "vae": ("decoder.*", "post_quant_conv.*"),  # the decoder half
           "text_encoder": ("text_model.embeddings.position_ids", "embeddings.position_ids")}  # arange(77)


@dataclass
class Part:
    """One network of a checkpoint, before loading: its module (built on meta), the file, and which file
    key fills which parameter. `load_sd15` fills it; `minidiffseg inspect-weights` checks it."""

    what: str
    file: Path
    module: nn.Module
    names: dict[str, str]  # file key -> parameter name, for the keys that are loaded
    shapes: dict[str, tuple[int, ...]]  # every tensor of the file (its header)
    ignored: list[str] = field(default_factory=list)  # file keys skipped by name (decoder, EMA, position_ids, ...)


@dataclass
class SD15:
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: VAEEncoder
    unet: UNet
    schedule: NoiseSchedule


def load_sd15(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
              variant: str | None = None, tokenizer: str | Path | CLIPTokenizer | None = None,
              stream: bool = False) -> SD15:
    """SD1.5 from a diffusers folder or a single LDM .safetensors file, in `dtype` on `device`, in eval
    mode without gradients. `variant`: None prefers the fp32 files of a diffusers folder and falls back
    to the `.fp16` ones; "fp16" takes only those. `tokenizer`: a folder with vocab.json + merges.txt or
    a built CLIPTokenizer, instead of the checkpoint's own tokenizer/ folder. `path` may also be the hub
    id stable-diffusion-v1-5/stable-diffusion-v1-5: its copy in the Hugging Face cache (`minidiffseg download`).
    `stream`: keep no weights resident; each block is read from the file when it runs (sd/stream.py:
    the same checks first, the same results, a fraction of the memory)."""
    path, device = Path(path), torch.device(device)
    if not path.exists() and str(path) == hub.REPOS["sd15"].repo_id:
        path = hub.cached("sd15")  # the hub id: its copy in the Hugging Face cache, found without network
    if not path.exists():
        there = f": `{hub.command('sd15', dir=path)}` puts it there" if path.suffix != ".safetensors" else ""
        raise UserError(f"{path}: not found; fetch SD1.5 with `minidiffseg download`{there}; or give a diffusers "
                        "SD1.5 folder or a single SD1.5 .safetensors file")
    if path.is_dir():
        tok = _tokenizer(tokenizer, path / "tokenizer", path)  # first: it fails fast, the weights don't
        parts = diffusers_parts(path, variant)
    else:
        check_suffix(path)
        tok = _tokenizer(tokenizer, path.parent / "tokenizer", path)
        parts, unknown = single_file_parts(path)
        if unknown:
            raise UserError(f"{path}: {len(unknown)} unexpected tensor(s): {keys_text(unknown)}; neither an SD1.5 "
                            "single-file tensor nor one ignored by name (minidiffseg.ldm.IGNORED)")
    load = stream_weights if stream else load_strict
    text_encoder, vae, unet = (load(p.module, p.file, p.names, dtype, device, p.what) for p in parts)
    return SD15(tok, text_encoder, vae, unet, NoiseSchedule())


def _tokenizer(tokenizer, default: Path, path: Path) -> CLIPTokenizer:
    if isinstance(tokenizer, CLIPTokenizer):
        return tokenizer
    folder = Path(tokenizer) if tokenizer is not None else default
    if not folder.is_dir():
        raise UserError(f"{path}: no tokenizer folder {folder}: put SD1.5's tokenizer/ (vocab.json, merges.txt) "
                        f"there or pass tokenizer=<folder>; {DOWNLOAD}")
    return CLIPTokenizer.from_dir(folder)


def diffusers_parts(folder: Path, variant: str | None = None) -> list[Part]:
    """Text encoder, VAE encoder and U-Net of a diffusers folder, sizes from each config.json."""
    absent = [c for c in WEIGHTS if not (folder / c).is_dir()]
    if absent:
        raise UserError(f"{folder}: unknown checkpoint layout: a diffusers SD1.5 folder holds unet/, vae/, "
                        f"text_encoder/ and tokenizer/, this one lacks {', '.join(absent)}/; {DOWNLOAD}, or "
                        "give a single SD1.5 .safetensors file")
    specs = {"text_encoder": (CLIPTextModel, CLIPTextConfig.from_transformers, _text_name),
             "vae": (VAEEncoder, VAEConfig.from_diffusers, _vae_name),
             "unet": (UNet, UNetConfig.from_diffusers, lambda key, shape: key)}
    configs = {c: read(_config(folder / c)) for c, (_, read, _) in specs.items()}  # all sizes before any file
    parts = []
    for component, (cls, _, name_of) in specs.items():
        file = _weights(folder / component, variant)
        shapes, _ = read_header(file)
        ignored = [k for k in shapes if any(fnmatchcase(k, p) for p in IGNORED[component])]
        names = {k: name_of(k, s) for k, s in shapes.items() if k not in ignored}
        parts.append(Part(WHAT[component], file, build_on_meta(cls, configs[component]), names, shapes, ignored))
    return parts


def _text_name(key: str, shape: tuple[int, ...]) -> str:
    """Official files name the text tower `text_model.…`; files written by transformers >= 5 drop the prefix."""
    return key if key.startswith("text_model.") else f"text_model.{key}"


# The first diffusers releases spelled the VAE's mid-block attention projections differently.
LEGACY_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _vae_name(key: str, shape: tuple[int, ...]) -> str:
    """Legacy diffusers VAE files name the mid-attention `query/key/value/proj_attn`; their 1×1-conv-shaped
    weights [C, C, 1, 1] are reshaped to the linear's [C, C] by the loader."""
    *head, proj, leaf = key.split(".")
    if "attentions" in head and proj in LEGACY_VAE_ATTENTION:
        return ".".join([*head, LEGACY_VAE_ATTENTION[proj], leaf])
    return key


def _config(component: Path) -> dict:
    path = component / "config.json"
    if not path.is_file():
        raise UserError(f"{path}: not found, so the {component.name} sizes are unknown; the diffusers folder is "
                        f"incomplete: {DOWNLOAD}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e}); download the folder again") from None


def _weights(component: Path, variant: str | None) -> Path:
    stem = WEIGHTS[component.name]
    tried = ([f"{stem}.safetensors", f"{stem}.fp16.safetensors"] if variant is None
             else [f"{stem}.{variant}.safetensors"])
    for name in tried:
        if (component / name).is_file():
            return component / name
    pickles = sorted(p for p in component.glob(f"{stem}*") if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        check_suffix(pickles[0])  # refuses it, pointing at safetensors
    raise UserError(f"{component}: no {' or '.join(tried)} found; {DOWNLOAD}")


def single_file_parts(path: Path) -> tuple[list[Part], list[str]]:
    """Text encoder, VAE encoder and U-Net of an LDM single file (sizes from the tensor shapes), and the
    file keys that are neither translated nor ignored (an error for loading, a finding for inspection)."""
    shapes, metadata = read_header(path)
    prefixes = {"U-Net": ldm.UNET, "VAE": ldm.VAE, "text encoder": f"{ldm.TEXT}text_model."}
    absent = [f"{what} ({prefix}…)" for what, prefix in prefixes.items()
              if not any(k.startswith(prefix) for k in shapes)]
    if absent:
        raise UserError(f"{path}: unknown checkpoint layout: no {', '.join(absent)} tensors, so not an SD1.5 "
                        "single file (an SD2/SDXL file, or a lone component?); give an SD1.5 single file "
                        f"or a diffusers folder ({DOWNLOAD})")
    try:
        unet_cfg, vae_cfg, text_cfg = ldm.infer_configs(shapes, metadata)
    except KeyError as e:
        raise UserError(f"{path}: tensor {e.args[0]} missing, so the architecture sizes cannot be read; the file "
                        "is incomplete or not SD1.5: download it again") from None
    names, unknown = ldm.from_ldm(shapes, unet_cfg, vae_cfg)
    parts = [Part(WHAT[c], path, build_on_meta(cls, cfg), names[c], shapes) for c, cls, cfg in
             (("text_encoder", CLIPTextModel, text_cfg), ("vae", VAEEncoder, vae_cfg), ("unet", UNet, unet_cfg))]
    for key in shapes:
        if ldm.is_ignored(key):
            part_of(parts, key).ignored.append(key)
    return parts, unknown


def part_of(parts: list[Part], key: str) -> Part:
    """The network a single-file key belongs to, by prefix; the rest (EMA copy, DDPM schedule) goes with the U-Net."""
    return parts[0] if key.startswith(ldm.TEXT) else parts[1] if key.startswith(ldm.VAE) else parts[2]
