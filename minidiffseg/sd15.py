"""Stable Diffusion 1.5 as minidiffseg uses it — tokenizer, text encoder, VAE encoder, U-Net and noise
schedule — loaded from either official layout (DESIGN.md §4):

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
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

import torch

from . import download, ldm
from .clip import CLIPTextModel
from .config import CLIPTextConfig, UNetConfig, VAEConfig
from .errors import UserError
from .loading import PICKLE_SUFFIXES, check_suffix, keys_text, load_strict, read_header
from .schedule import NoiseSchedule
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
class SD15:
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: VAEEncoder
    unet: UNet
    schedule: NoiseSchedule


def load_sd15(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
              variant: str | None = None, tokenizer: str | Path | CLIPTokenizer | None = None) -> SD15:
    """SD1.5 from a diffusers folder or a single LDM .safetensors file, in `dtype` on `device`, in eval
    mode without gradients. `variant`: None prefers the fp32 files of a diffusers folder and falls back
    to the `.fp16` ones; "fp16" takes only those. `tokenizer`: a folder with vocab.json + merges.txt or
    a built CLIPTokenizer, instead of the checkpoint's own tokenizer/ folder. `path` may also be the hub
    id stable-diffusion-v1-5/stable-diffusion-v1-5: its copy in the Hugging Face cache (`minidiffseg download`)."""
    path, device = Path(path), torch.device(device)
    if not path.exists() and str(path) == download.REPOS["sd15"].repo_id:
        path = download.cached("sd15")  # the hub id: its copy in the Hugging Face cache, found without network
    if not path.exists():
        there = f": `{download.command('sd15', dir=path)}` puts it there" if path.suffix != ".safetensors" else ""
        raise UserError(f"{path}: not found; fetch SD1.5 with `minidiffseg download`{there}; or give a diffusers "
                        "SD1.5 folder or a single SD1.5 .safetensors file")
    if path.is_dir():
        tok = _tokenizer(tokenizer, path / "tokenizer", path)  # first: it fails fast, the weights don't
        return SD15(tok, *_load_diffusers(path, variant, dtype, device), NoiseSchedule())
    check_suffix(path)
    tok = _tokenizer(tokenizer, path.parent / "tokenizer", path)
    return SD15(tok, *_load_single_file(path, dtype, device), NoiseSchedule())


def _tokenizer(tokenizer, default: Path, path: Path) -> CLIPTokenizer:
    if isinstance(tokenizer, CLIPTokenizer):
        return tokenizer
    folder = Path(tokenizer) if tokenizer is not None else default
    if not folder.is_dir():
        raise UserError(f"{path}: no tokenizer folder {folder}: put SD1.5's tokenizer/ (vocab.json, merges.txt) "
                        f"there or pass tokenizer=<folder>; {DOWNLOAD}")
    return CLIPTokenizer.from_dir(folder)


def _build(cls, cfg):
    with torch.device("meta"):  # parameters without storage: the checkpoint's tensors are assigned
        return cls(cfg)


def _load_diffusers(folder: Path, variant: str | None, dtype: torch.dtype, device: torch.device):
    absent = [c for c in WEIGHTS if not (folder / c).is_dir()]
    if absent:
        raise UserError(f"{folder}: unknown checkpoint layout: a diffusers SD1.5 folder holds unet/, vae/, "
                        f"text_encoder/ and tokenizer/, this one lacks {', '.join(absent)}/; {DOWNLOAD}, or "
                        "give a single SD1.5 .safetensors file")
    text_cfg = CLIPTextConfig.from_transformers(_config(folder / "text_encoder"))
    vae_cfg = VAEConfig.from_diffusers(_config(folder / "vae"))
    unet_cfg = UNetConfig.from_diffusers(_config(folder / "unet"))
    return (_load_file(CLIPTextModel, text_cfg, folder, "text_encoder", variant, _text_name, dtype, device),
            _load_file(VAEEncoder, vae_cfg, folder, "vae", variant, _vae_name, dtype, device),
            _load_file(UNet, unet_cfg, folder, "unet", variant, lambda key, shape: key, dtype, device))


def _text_name(key: str, shape: tuple[int, ...]) -> str:
    """Official files name the text tower `text_model.…`; files written by transformers >= 5 drop the prefix."""
    return key if key.startswith("text_model.") else f"text_model.{key}"


def _vae_name(key: str, shape: tuple[int, ...]) -> str:
    """Legacy diffusers VAE files spell the mid-attention query/key/value/proj_attn: VAEEncoder's rule."""
    return next(iter(VAEEncoder.rename_legacy({key: torch.empty(shape, device="meta")})))


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


def _load_file(cls, cfg, folder: Path, component: str, variant: str | None, name_of, dtype, device):
    path = _weights(folder / component, variant)
    shapes, _ = read_header(path)
    names = {k: name_of(k, s) for k, s in shapes.items() if not any(fnmatchcase(k, p) for p in IGNORED[component])}
    return load_strict(_build(cls, cfg), path, names, shapes, dtype, device, WHAT[component])


def _load_single_file(path: Path, dtype: torch.dtype, device: torch.device):
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
    if unknown:
        raise UserError(f"{path}: {len(unknown)} unexpected tensor(s): {keys_text(unknown)}; neither an SD1.5 "
                        "single-file tensor nor one ignored by name (minidiffseg.ldm.IGNORED)")
    return tuple(load_strict(_build(cls, cfg), path, names[c], shapes, dtype, device, WHAT[c])
                 for c, cls, cfg in (("text_encoder", CLIPTextModel, text_cfg), ("vae", VAEEncoder, vae_cfg),
                                     ("unet", UNet, unet_cfg)))
