"""SD3 as one .safetensors file (Stability AI's releases of SD3-medium), loaded into the same `StableDiffusion3` as
its diffusers folder (sd3/checkpoint.py). The file's prefixes:

    model.diffusion_model.               the MM-DiT in the original names (sd3/ldm.py: fused q/k/v, halves swapped)
    first_stage_model.                   the VAE in LDM's names (sd/ldm.py `vae_rules`); 16 channels, no quant conv
    text_encoders.clip_l.transformer.    CLIP-L in transformers' names (`text_model.…`), without text_projection
    text_encoders.clip_g.transformer.    OpenCLIP bigG in transformers' names, with `text_projection.weight` [P, W]
    text_encoders.t5xxl.transformer.     T5 v1.1 XXL's encoder in transformers' names (sd3/t5.py `checkpoint_names`)

which networks a release holds (as its name says; for SD3.5, as its size does: not verified on the files here):

    sd3_medium.safetensors                           transformer + VAE only: refused in one line (no text towers)
    sd3_medium_incl_clips.safetensors                + CLIP-L, CLIP-G: runs without T5 (zeros in its place)
    sd3_medium_incl_clips_t5xxlfp16.safetensors      + T5 (needs tokenizer_3/ beside the file)
    sd3.5_medium.safetensors                         transformer + VAE only (5.1 GB: the 2.47 B transformer in fp16
                                                     and the VAE, /work/shared/BACKBONES.md B7): refused; SD3.5 is
                                                     loaded from its diffusers folder

An SD3 file is told by its `model.diffusion_model.joint_blocks.` (diffusers' `infer_diffusers_model_type` reads
the same blocks' context_block), SD3.5 from SD3 by its qk RMSNorm, as for folders. The tokenizers come from folders
beside the file, tokenizer/ and tokenizer_2/ (CLIP's BPE, padding with EOS / "!") and tokenizer_3/ (T5), as an SDXL
single file's do.

What the shapes do not tell is the releases' (a file's safetensors metadata may say otherwise,
"minidiffseg.<component>.<field>": the tests' tiny files do): the VAE's shift 0.0609 and scale 1.5305 and float32
under float16 (stabilityai/stable-diffusion-3-medium-diffusers vae/config.json, BACKBONES.md B4), 64-wide heads in
both CLIP towers (ViT-L/14: 768 wide, 12 heads; bigG/14: 1280, 20), CLIP-L's quick GELU and bigG's exact GELU,
T5's relative-attention max distance 128 and norm epsilon 1e-6 (google/t5-v1_1-xxl config.json). T5's heads and
buckets are its relative-attention table's shape [buckets, heads] (XXL: [32, 64]), its gated feed-forward the
presence of `wi_0`.

CLIP-L's projection. SD3's reference code reads CLIP-L's pooled state unprojected (Stability-AI/sd3.5
sd3_infer.py: its `ClipL` is an SDClipModel with `return_projected_pooled=False`), and diffusers' single-file
loader gives CLIP-L an identity projection whatever the file holds (`create_diffusers_clip_model_from_ldm`:
`text_projection.weight = eye(width)`); the releases seem to hold none (kohya-ss/sd-scripts adds a default one when
it loads them; not verified on the files here). The same here, without a matrix:
`CLIPTextModelWithIdentityProjection`; a projection the file holds is ignored by name, as diffusers overwrites it.

Streaming. The transformer of a single file is loaded resident even under `stream=True` or `keep=` (its fused
q/k/v are split when loaded, sd3/ldm.py `to_mmdit`), with a warning; the VAE and the text towers stream (or stay
half precision) as asked. The diffusers folder streams everything.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..sd import ldm
from ..sd.checkpoint import Part, Parts, _dtype_of, _tokenizer, loader
from ..sd.clip import CLIPTextModelWithProjection
from ..sd.config import CLIPTextConfig, VAEConfig
from ..sd.loading import build_on_meta, keys_text, load_strict, read_header
from ..sd.names import WHAT, rename
from ..sd.tokenizer import EOS, CLIPTokenizer
from ..sd.vae import VAEEncoder
from . import ldm as mmdit_ldm
from .backbone import StableDiffusion3
from .checkpoint import assemble, model_kind, model_name
from .config import MMDiTConfig
from .t5 import T5Config, T5Encoder, checkpoint_names
from .t5_tokenizer import T5Tokenizer

PREFIXES = {"text_encoder": "text_encoders.clip_l.transformer.", "text_encoder_2": "text_encoders.clip_g.transformer.",
            "text_encoder_3": "text_encoders.t5xxl.transformer.", "vae": ldm.VAE, "transformer": mmdit_ldm.PREFIX}
CLIP_HEAD_WIDTH = 64  # CLIP ViT-L/14's text tower: 768 wide, 12 heads; OpenCLIP bigG/14's: 1280, 20
CLIP_ACT = {"text_encoder": "quick_gelu", "text_encoder_2": "gelu"}  # SD3's text_encoder{,_2}/config.json
# SD3's vae/config.json (SD3.5-medium's the same): what an LDM VAE without quant conv is told by
SD3_VAE: dict[str, Any] = {"shift_factor": 0.0609, "scaling_factor": 1.5305, "force_upcast": True}
T5_NOT_IN_SHAPES = ("relative_attention_max_distance", "layer_norm_epsilon")  # T5Config's defaults: XXL's
# keys of a CLIP tower under its prefix that SD3 never builds: the position-id buffer, CLIP's contrastive
# temperature, and (CLIP-L only) a projection the reference code does not apply (module docstring)
CLIP_IGNORED = {"text_encoder": ("text_model.embeddings.position_ids", "logit_scale", "text_projection.weight"),
                "text_encoder_2": ("text_model.embeddings.position_ids", "logit_scale")}
# CLIP's (and a saver's) contrastive temperature beside a tower's transformer: ignored by name, as diffusers reads only
# the keys under each tower's `.transformer.`
BESIDE = {f"text_encoders.{tower}.logit_scale": c
          for tower, c in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2"), ("t5xxl", "text_encoder_3"))}
DOWNLOAD = ("give `sd3_medium_incl_clips.safetensors` (or `sd3_medium_incl_clips_t5xxlfp16.safetensors`), or a "
            "diffusers folder: `minidiffseg download --what sd3-medium --dir FOLDER` (SD3.5: --what sd35-medium)")


class CLIPTextModelWithIdentityProjection(CLIPTextModelWithProjection):
    """SD3's CLIP-L from a single file: CLIPTextModelWithProjection whose pooled embedding is the final norm of the
    EOS state, unprojected (the projection an identity, `projection_dim` = `hidden_size`: module docstring)."""

    def __init__(self, cfg: CLIPTextConfig):
        if cfg.projection_dim != cfg.hidden_size:
            raise ValueError(f"an identity projection keeps the width: projection_dim {cfg.projection_dim} != "
                             f"hidden_size {cfg.hidden_size}")
        super().__init__(cfg)
        self.add_module("text_projection", nn.Identity())  # no parameters: nothing in the file fills it


def is_sd3_file(path: str | Path) -> bool:
    """Whether a (checked) safetensors file is an SD3 / SD3.5 single file: it has the MM-DiT's joint blocks."""
    shapes, _ = read_header(path)
    return is_sd3_keys(shapes)


def is_sd3_keys(keys) -> bool:
    return any(k.startswith(f"{mmdit_ldm.PREFIX}joint_blocks.") for k in keys)


def component_of(key: str) -> str:
    """The network a key of an SD3 single file belongs to, by prefix; anything else goes with the transformer."""
    return next((c for c, prefix in PREFIXES.items() if key.startswith(prefix)), "transformer")


def _within(shapes: dict, prefix: str) -> dict[str, tuple[int, ...]]:
    """The keys under `prefix`, without it."""
    return {k[len(prefix):]: s for k, s in shapes.items() if k.startswith(prefix)}


def infer_vae_config(shapes: dict[str, tuple], metadata: dict[str, str] | None = None) -> VAEConfig:
    """The VAE encoder's sizes from its LDM-named shapes under first_stage_model.: levels, widths and layers as
    sd/ldm.py reads them, the latent channels from encoder.conv_out (mean | logvar); without a quant conv SD3's
    shift, scale and float32 upcast (`SD3_VAE`). Raises KeyError naming the first key it needs that the file lacks."""
    e = f"{ldm.VAE}encoder."
    levels = ldm._count(shapes, rf"{re.escape(e)}down\.(\d+)\.")
    quant = f"{ldm.VAE}quant_conv.weight" in shapes
    vae = VAEConfig(
        in_channels=shapes[f"{e}conv_in.weight"][1], latent_channels=shapes[f"{e}conv_out.weight"][0] // 2,
        block_out_channels=tuple(shapes[f"{e}down.{i}.block.0.conv1.weight"][0] for i in range(levels)),
        layers_per_block=ldm._count(shapes, rf"{re.escape(e)}down\.0\.block\.(\d+)\."), use_quant_conv=quant,
        **({} if quant else SD3_VAE))
    return ldm._with_metadata(vae, "vae", metadata)


def infer_clip_config(shapes: dict[str, tuple], component: str, metadata: dict[str, str] | None = None
                      ) -> CLIPTextConfig:
    """A CLIP tower's sizes from its transformers-named shapes under PREFIXES[component]: CLIP-L's projection the
    identity (projection_dim = width), bigG's from text_projection [P, W]. Raises KeyError as infer_vae_config."""
    p = PREFIXES[component]
    cfg = ldm._clip_config(shapes, p)
    cfg = replace(cfg, num_attention_heads=max(cfg.hidden_size // CLIP_HEAD_WIDTH, 1), hidden_act=CLIP_ACT[component],
                  projection_dim=shapes[f"{p}text_projection.weight"][0] if component == "text_encoder_2"
                  else cfg.hidden_size)
    cfg = ldm._with_metadata(cfg, component, metadata)
    return replace(cfg, projection_dim=cfg.hidden_size) if component == "text_encoder" else cfg


def infer_t5_config(shapes: dict[str, tuple], metadata: dict[str, str] | None = None) -> T5Config:
    """T5's encoder sizes from its transformers-named shapes under PREFIXES["text_encoder_3"]: the table
    relative_attention_bias [buckets, heads] gives both, q [heads·d_kv, d_model] the head width, wi_0 a gated
    feed-forward. Raises KeyError as infer_vae_config."""
    t5 = _within(shapes, PREFIXES["text_encoder_3"])
    vocab, width = t5.get("encoder.embed_tokens.weight") or t5["shared.weight"]
    attention, ff = "encoder.block.0.layer.0.SelfAttention.", "encoder.block.0.layer.1.DenseReluDense."
    buckets, heads = t5[f"{attention}relative_attention_bias.weight"]
    gated = f"{ff}wi_0.weight" in t5
    given = {f: json.loads(metadata[f"minidiffseg.text_encoder_3.{f}"])
             for f in T5_NOT_IN_SHAPES if metadata and f"minidiffseg.text_encoder_3.{f}" in metadata}
    return T5Config(vocab_size=vocab, d_model=width, d_kv=t5[f"{attention}q.weight"][0] // heads,
                    d_ff=t5[f"{ff}{'wi_0' if gated else 'wi'}.weight"][0],
                    num_layers=ldm._count(t5, r"encoder\.block\.(\d+)\."), num_heads=heads,
                    relative_attention_num_buckets=buckets, feed_forward_proj="gated-gelu" if gated else "relu",
                    **given)


def sd3_file_parts(path: Path) -> tuple[Parts, list[str]]:
    """The networks of an SD3 single file (sizes from its shapes, checked against each other), and the file keys
    that no network holds nor is ignored by name (an error for loading, a finding for inspection). A file without
    its text towers or its VAE is refused in one line."""
    shapes, metadata = read_header(path)
    towers = {"CLIP-L": PREFIXES["text_encoder"], "CLIP-G": PREFIXES["text_encoder_2"]}
    lacking = [f"{what} ({prefix}…)" for what, prefix in towers.items() if not any(k.startswith(prefix) for k in shapes)]
    if lacking:
        kind = "an SD3.5" if f"{mmdit_ldm.PREFIX}joint_blocks.0.x_block.attn.ln_q.weight" in shapes else "an SD3"
        alone = " (the transformer and VAE alone, as in sd3_medium.safetensors and sd3.5_medium.safetensors)" \
            if len(lacking) == 2 else ""
        raise UserError(f"{path}: {kind} single file without its text encoders: no {' and no '.join(lacking)}{alone}; "
                        f"{DOWNLOAD}")
    if not any(k.startswith(ldm.VAE) for k in shapes):
        raise UserError(f"{path}: an SD3 single file without its VAE ({ldm.VAE}…): the file is incomplete; {DOWNLOAD}")
    has_t5 = any(k.startswith(PREFIXES["text_encoder_3"]) for k in shapes)
    try:
        mmdit = mmdit_ldm.infer_config(shapes, metadata)
        vae_cfg = infer_vae_config(shapes, metadata)
        configs: dict[str, Any] = {"text_encoder": infer_clip_config(shapes, "text_encoder", metadata),
                                   "text_encoder_2": infer_clip_config(shapes, "text_encoder_2", metadata)}
        if has_t5:
            configs["text_encoder_3"] = infer_t5_config(shapes, metadata)
    except KeyError as e:
        raise UserError(f"{path}: tensor {e.args[0]} missing, so the architecture sizes cannot be read; the file is "
                        "incomplete or not SD3's: download it again") from None
    configs.update(vae=vae_cfg, transformer=mmdit)  # in SD3_COMPONENTS' order
    _check_widths(path, configs)
    names: dict[str, dict[str, str]] = {c: {} for c in configs}
    ignored: dict[str, list[str]] = {c: [] for c in configs}
    names["transformer"], unknown = mmdit_ldm.transformer_names(shapes, mmdit)
    vae = {theirs: ours for ours, theirs in ldm.vae_rules(len(vae_cfg.block_out_channels),
                                                          vae_cfg.layers_per_block).items()}
    if has_t5:  # the tied embedding under either name, a decoder half ignored (sd3/t5.py)
        t5 = PREFIXES["text_encoder_3"]
        names["text_encoder_3"] = {t5 + k: name for k, name in checkpoint_names(_within(shapes, t5)).items()}
    placed = set(names["transformer"]) | set(names.get("text_encoder_3", {})) | set(unknown)
    for key in shapes:
        component = component_of(key)
        rest = key[len(PREFIXES[component]):]
        if key in placed:
            continue
        if key in BESIDE:
            ignored[BESIDE[key] if BESIDE[key] in ignored else "text_encoder"].append(key)
            continue
        if component == "vae":
            if ldm.is_ignored(key):  # the decoder half, post_quant_conv
                ignored["vae"].append(key)
            elif (name := rename(key, vae)) is not None:
                names["vae"][key] = name
            else:
                unknown.append(key)
        elif component in CLIP_IGNORED:  # transformers' names as they are
            if rest in CLIP_IGNORED[component]:
                ignored[component].append(key)
            else:
                names[component][key] = rest
        elif component == "text_encoder_3":
            ignored["text_encoder_3"].append(key)
        else:  # under no network's prefix, or under the transformer's but not one of its tensors
            unknown.append(key)
    classes: dict[str, type[nn.Module]] = {
        "text_encoder": CLIPTextModelWithIdentityProjection, "text_encoder_2": CLIPTextModelWithProjection,
        "text_encoder_3": T5Encoder, "vae": VAEEncoder, "transformer": mmdit_ldm.MMDiTFileWeights}
    parts = {c: Part(WHAT[c], path, build_on_meta(classes[c], cfg), names[c], shapes, ignored[c],
                     finish=mmdit_ldm.to_mmdit if c == "transformer" else None)
             for c, cfg in configs.items()}
    return parts, unknown


def parts_name(parts: Parts) -> str:
    """The display name of the model `sd3_file_parts` found ("SD3 (1024², 24 blocks) with T5", ...)."""
    weights = parts["transformer"].module
    assert isinstance(weights, mmdit_ldm.MMDiTFileWeights)
    return model_name(model_kind(weights.cfg), weights.cfg, "text_encoder_3" in parts)


def _check_widths(path: Path, cfg: dict) -> None:
    """The networks of the file fit each other (as sd3/checkpoint.py checks a folder's): the VAE makes the latents
    the transformer patches, the towers' states fit its text width and their pooled outputs make its pooled input,
    T5 is as wide as its text."""
    mmdit: MMDiTConfig = cfg["transformer"]
    clip_l, clip_g = cfg["text_encoder"], cfg["text_encoder_2"]
    problems = []
    if cfg["vae"].latent_channels != mmdit.in_channels:
        problems.append(f"its VAE makes {cfg['vae'].latent_channels}-channel latents, the transformer patches "
                        f"{mmdit.in_channels} (SD3: 16)")
    if clip_l.hidden_size + clip_g.hidden_size > mmdit.joint_attention_dim:
        problems.append(f"its CLIP towers give {clip_l.hidden_size} + {clip_g.hidden_size}-wide states, the "
                        f"transformer reads {mmdit.joint_attention_dim}")
    if clip_l.projection_dim + clip_g.projection_dim != mmdit.pooled_projection_dim:
        problems.append(f"its CLIP towers pool {clip_l.projection_dim} + {clip_g.projection_dim}, the transformer "
                        f"takes {mmdit.pooled_projection_dim} (SD3: 768 + 1280 = 2048)")
    if "text_encoder_3" in cfg and cfg["text_encoder_3"].d_model != mmdit.joint_attention_dim:
        problems.append(f"its T5 is {cfg['text_encoder_3'].d_model} wide, the transformer reads "
                        f"{mmdit.joint_attention_dim} (T5-XXL: 4096)")
    if problems:
        raise UserError(f"{path}: {'; '.join(problems)}: the file mixes the networks of two models")


def load_sd3_file(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  tokenizer: str | Path | CLIPTokenizer | None = None, stream: bool = False,
                  keep: torch.dtype | None = None) -> StableDiffusion3:
    """SD3 from a single file, in `dtype` on `device`, eval mode without gradients (the arguments are load_sd's,
    sd/checkpoint.py; `tokenizer` replaces both CLIP tokenizer folders, as for SDXL). T5 when the file holds it
    (tokenizer_3/ beside it then), else zeros in its place. The transformer is resident whatever `stream` and `keep`
    say (module docstring)."""
    path, device = Path(path), torch.device(device)
    parts, unknown = sd3_file_parts(path)
    if unknown:
        raise UserError(f"{path}: {len(unknown)} unexpected tensor(s): {keys_text(unknown)}; neither a tensor of an "
                        "SD3 single file nor one ignored by name")
    here = path.parent
    tok = _tokenizer(tokenizer, here / "tokenizer", path, EOS)
    tok_2 = _tokenizer(tokenizer, here / "tokenizer_2", path, "!")
    tok_3 = None
    if "text_encoder_3" in parts:
        if not (here / "tokenizer_3").is_dir():
            raise UserError(f"{path}: the file holds T5 ({PREFIXES['text_encoder_3']}…) but there is no tokenizer_3/ "
                            f"beside it (T5's tokenizer.json): put the diffusers folder's tokenizer_3/ in {here}")
        tok_3 = T5Tokenizer.from_dir(here / "tokenizer_3")
    if stream or keep is not None:
        warnings.warn(f"{path.name}: the transformer of an SD3 single file is loaded resident (its fused q/k/v "
                      f"projections are split when loaded); {'streaming' if stream else 'half-precision keeping'} "
                      "applies to its VAE and text encoders; the diffusers folder streams the transformer too",
                      stacklevel=3)
    load = loader(stream, keep)
    nets = {c: (load_strict if p.finish else load)(p.module, p.file, p.names, _dtype_of(c, p, dtype, True), device,
                                                   p.what) for c, p in parts.items()}
    return assemble({c: finish(net) if (finish := parts[c].finish) is not None else net for c, net in nets.items()},
                    tok, tok_2, tok_3)
