"""SD3 and SD3.5 as minidiffseg uses them, loaded from a diffusers folder (docs/sd3.md §2):

    transformer/      config.json + diffusion_pytorch_model[.fp16].safetensors   the MM-DiT (sd3/mmdit.py)
    vae/              config.json + diffusion_pytorch_model[.fp16].safetensors   16 latent channels, no quant conv
    text_encoder/     config.json + model[.fp16].safetensors                     CLIP-L with its projection
    text_encoder_2/   config.json + model[.fp16].safetensors                     OpenCLIP bigG with its projection
    text_encoder_3/   config.json + model[.fp16]-0000N-of-0000M.safetensors + index   T5-XXL's encoder (optional)
    tokenizer/, tokenizer_2/   CLIP's BPE (vocab.json, merges.txt), padding with EOS / "!"
    tokenizer_3/      tokenizer.json (T5's SentencePiece vocabulary; optional, with text_encoder_3/)
    scheduler/        scheduler_config.json (FlowMatchEulerDiscreteScheduler)

Each network is built on the meta device from its config.json and filled by minidiffseg.sd.loading, as SD1.5's
and SDXL's are (sd/checkpoint.py), resident, streamed or kept in half precision. Which model it is (`model_kind`:
SD3 or SD3.5) is read from the transformer's config, never from a name. T5 is optional: without text_encoder_3/
and tokenizer_3/ the transformer reads zeros in T5's place, as diffusers does without a third encoder; one
without the other is refused in one line, as are networks of different models side by side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import UserError
from ..sd.checkpoint import (Part, Parts, _config, _dtype_of, _text_name, _tokenizer, _vae_name, loader, scheduler_config,
                              weights_file)
from ..sd.clip import CLIPTextModelWithProjection
from ..sd.config import CLIPTextConfig, VAEConfig
from ..sd.loading import build_on_meta, read_header
from ..sd.names import WHAT, not_built
from ..sd.schedule import FlowMatchSchedule

from ..sd.tokenizer import EOS, CLIPTokenizer
from ..sd.vae import VAEEncoder
from .backbone import StableDiffusion3
from .config import MMDiTConfig
from .mmdit import MMDiT
from .t5 import T5Config, T5Encoder, checkpoint_names
from .t5_tokenizer import T5Tokenizer

DOWNLOAD = ("fetch SD3 with `minidiffseg download --what sd3-medium --dir FOLDER` (--what sd35-medium for SD3.5-medium; "
            "--no-t5 leaves out the 9.5 GB T5 encoder)")
STEMS = {"transformer": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
         "text_encoder_2": "model", "text_encoder_3": "model"}
KINDS = {"sd3": "SD3", "sd35": "SD3.5"}  # SD3.5: per-head RMSNorm on the queries and keys (`qk_norm`)


def model_kind(cfg: MMDiTConfig) -> str:
    """"sd35" when the transformer normalises its queries and keys per head (SD3.5's qk RMSNorm), else "sd3"."""
    return "sd35" if cfg.qk_norm else "sd3"


def model_name(kind: str, cfg: MMDiTConfig, t5: bool) -> str:
    """"SD3 (1024², 24 blocks) with T5", "SD3.5 (1024², 24 blocks, dual attention) without T5 (zeros in its place)",
    ...: what the configs tell, and whether T5's states condition the transformer."""
    dual = ", dual attention" if cfg.dual_attention_layers else ""
    text = "with T5" if t5 else "without T5 (zeros in its place)"
    return f"{KINDS[kind]} ({cfg.sample_size * 8}², {cfg.num_layers} blocks{dual}) {text}"


def load_sd3(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             variant: str | None = None, stream: bool = False, keep: torch.dtype | None = None,
             t5: bool = True) -> StableDiffusion3:
    """SD3 / SD3.5 from a diffusers folder, in `dtype` on `device`, eval mode without gradients (the arguments are
    load_sd's, sd/checkpoint.py). `t5=False` leaves T5 out even when the folder has it (zeros in its place)."""
    folder, device = Path(folder), torch.device(device)
    parts = diffusers_parts(folder, variant, t5)
    nets = {c: loader(stream, keep)(p.module, p.file, p.names, _dtype_of(c, p, dtype, True), device, p.what)
            for c, p in parts.items()}
    tok = _tokenizer(None, folder / "tokenizer", folder, EOS)
    tok_2 = _tokenizer(None, folder / "tokenizer_2", folder, "!")
    tok_3 = T5Tokenizer.from_dir(folder / "tokenizer_3") if "text_encoder_3" in nets else None
    _check_scheduler(folder)
    return assemble(nets, tok, tok_2, tok_3)


def assemble(nets: dict[str, nn.Module], tok: CLIPTokenizer, tok_2: CLIPTokenizer, tok_3: T5Tokenizer | None
             ) -> StableDiffusion3:
    """The loaded networks of a folder or a single file (by component name) and the tokenizers as one
    StableDiffusion3, its kind and name read from the transformer's config."""
    transformer, vae = nets["transformer"], nets["vae"]
    text_l, text_g, text_t5 = nets["text_encoder"], nets["text_encoder_2"], nets.get("text_encoder_3")
    assert isinstance(transformer, MMDiT) and isinstance(vae, VAEEncoder)
    assert isinstance(text_l, CLIPTextModelWithProjection) and isinstance(text_g, CLIPTextModelWithProjection)
    assert text_t5 is None or isinstance(text_t5, T5Encoder)
    kind = model_kind(transformer.cfg)
    return StableDiffusion3(tok, tok_2, tok_3, text_l, text_g, text_t5, vae, transformer, FlowMatchSchedule(),
                            model_name(kind, transformer.cfg, text_t5 is not None), kind, transformer.cfg.sample_size * 8)


def _check_scheduler(folder: Path) -> None:
    """SD3's scheduler is a flow's (FlowMatchEulerDiscreteScheduler); a folder that says otherwise is not SD3's."""
    cfg = scheduler_config(folder)
    name = (cfg or {}).get("_class_name", "FlowMatchEulerDiscreteScheduler")
    if "FlowMatch" not in name:
        raise UserError(f"{folder}: scheduler/scheduler_config.json names {name}, but an SD3 transformer is trained "
                        "on a flow (FlowMatchEulerDiscreteScheduler): the folder mixes two models")


def diffusers_parts(folder: Path, variant: str | None = None, t5: bool = True) -> Parts:
    """The networks of an SD3 / SD3.5 diffusers folder, sizes from each config.json, checked against each other."""
    need = ["transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"]
    absent = [c for c in need if not (folder / c).is_dir()]
    if absent:
        raise UserError(f"{folder}: an SD3 diffusers folder holds {', '.join(c + '/' for c in need)} (and optionally "
                        f"text_encoder_3/ + tokenizer_3/, T5); this one lacks {', '.join(c + '/' for c in absent)}; "
                        f"{DOWNLOAD}")
    has_t5, has_t5_tok = (folder / "text_encoder_3").is_dir(), (folder / "tokenizer_3").is_dir()
    if has_t5 != has_t5_tok:
        have, lack = ("text_encoder_3/", "tokenizer_3/") if has_t5 else ("tokenizer_3/", "text_encoder_3/")
        raise UserError(f"{folder}: {have} without {lack}: T5 needs both its encoder and its tokenizer; put the "
                        f"missing folder there, or remove {have} to run without T5 (zeros in its place)")
    def each(name_of: Callable[[str, tuple[int, ...]], str]) -> Callable[[dict], dict[str, str]]:
        return lambda shapes: {k: name_of(k, s) for k, s in shapes.items()}

    specs: dict[str, tuple[type[nn.Module], Callable[[dict], Any], Callable[[dict], dict[str, str]]]] = {
        "text_encoder": (CLIPTextModelWithProjection, CLIPTextConfig.from_transformers, each(_text_name)),
        "text_encoder_2": (CLIPTextModelWithProjection, CLIPTextConfig.from_transformers, each(_text_name))}
    if has_t5 and t5:  # T5's names: its tied embedding under either key, the decoder half left out (sd3/t5.py)
        specs["text_encoder_3"] = (T5Encoder, T5Config.from_transformers, checkpoint_names)
    specs.update({"vae": (VAEEncoder, VAEConfig.from_diffusers, each(_vae_name)),
                  "transformer": (MMDiT, MMDiTConfig.from_diffusers, each(lambda key, shape: key))})
    configs = {c: read(_config(folder / c)) for c, (_, read, _) in specs.items()}  # all sizes before any file
    _check_configs(folder, configs)
    parts = {}
    for component, (cls, _, names_of) in specs.items():
        file = weights_file(folder / component, STEMS[component], variant, DOWNLOAD)
        shapes, _ = read_header(file)
        ours = names_of(shapes)
        ignored = [k for k in shapes if k not in ours or not_built(component, ours[k])]
        names = {k: name for k, name in ours.items() if k not in ignored}
        parts[component] = Part(WHAT[component], file, build_on_meta(cls, configs[component]), names, shapes, ignored)
    return parts


def _check_configs(folder: Path, cfg: dict[str, Any]) -> None:
    """The networks' widths agree: the VAE's latent channels are what the transformer patches, the two CLIP towers'
    widths fit in its text width and their projections make its pooled input, T5 is as wide as its text width."""
    mmdit: MMDiTConfig = cfg["transformer"]
    vae: VAEConfig = cfg["vae"]
    if vae.latent_channels != mmdit.in_channels:
        raise UserError(f"{folder}: the transformer patches {mmdit.in_channels}-channel latents but vae/ makes "
                        f"{vae.latent_channels} (SD3's VAE: 16 channels; SD1.5's and SDXL's: 4): use the SD3 folder's "
                        "own vae/")
    clip_l, clip_g = cfg["text_encoder"], cfg["text_encoder_2"]
    width = clip_l.hidden_size + clip_g.hidden_size
    if width > mmdit.joint_attention_dim:
        raise UserError(f"{folder}: the text towers give {clip_l.hidden_size} + {clip_g.hidden_size} = {width}-wide "
                        f"states but the transformer reads {mmdit.joint_attention_dim}: the folder mixes two models")
    pooled = clip_l.projection_dim + clip_g.projection_dim
    if pooled != mmdit.pooled_projection_dim:
        raise UserError(f"{folder}: the transformer takes a {mmdit.pooled_projection_dim}-wide pooled embedding but the "
                        f"towers project to {clip_l.projection_dim} + {clip_g.projection_dim} = {pooled} (SD3: 768 + "
                        "1280 = 2048): the folder mixes two models")
    if "text_encoder_3" in cfg and cfg["text_encoder_3"].d_model != mmdit.joint_attention_dim:
        raise UserError(f"{folder}: text_encoder_3/ is {cfg['text_encoder_3'].d_model} wide but the transformer reads "
                        f"{mmdit.joint_attention_dim}-wide text (T5-XXL: 4096): the folder mixes two models")

