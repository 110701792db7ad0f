"""Stable Diffusion 1.5 and 2.x as minidiffseg uses them — tokenizer, text encoder, VAE encoder, U-Net and
noise schedule — loaded from either official layout (docs/design.md §4, docs/sd2.md §2, §3):

- a diffusers folder: unet/, vae/, text_encoder/ (each a config.json and a safetensors file, fp32
  or the `.fp16` variant) and tokenizer/ (vocab.json + merges.txt). Sizes come from the config.json
  files; our parameter names are the files' names.
- a single original-LDM file (v1-5-pruned-emaonly[-fp16].safetensors): names translated by the rules
  of minidiffseg.sd.ldm, sizes read from the tensor shapes; the tokenizer from a tokenizer/ folder
  beside it or the `tokenizer=` argument.

Either way each network is built on the meta device and filled by minidiffseg.sd.loading (strict,
memory-mapped, one copy of the weights). The networks are called by their component names
(minidiffseg.sd.names.COMPONENTS: "text_encoder", "vae", "unet"), and keys we never build are ignored by name
(names.NOT_BUILT). Which model it is, its `kind` (`model_kind`: SD1.x, SD2.x base or 768-v), is read once
from the same configs and shapes, never from a file or repo name; the display name and the tokenizer's
default padding follow from it. An SD2.x single file's text tower is OpenCLIP's, loaded under its own names
and then split (minidiffseg.sd.openclip).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import hub, ldm, openclip
from .backbone import StableDiffusion
from .clip import CLIPTextModel, CLIPTextModelWithProjection
from .config import CLIPTextConfig, UNetConfig, VAEConfig
from ..errors import UserError
from .loading import PICKLE_SUFFIXES, build_on_meta, check_suffix, keys_text, load_strict, read_header
from .names import WHAT, not_built
from .shards import index_names
from .schedule import NoiseSchedule
from .stream import stream_weights, upcast_weights
from .tokenizer import EOS, CLIPTokenizer
from .unet import UNet
from .vae import VAEEncoder
from .xl import StableDiffusionXL

if TYPE_CHECKING:
    from ..sd3.backbone import StableDiffusion3

DOWNLOAD = ("fetch Stable Diffusion with `minidiffseg download --what sd15 --dir FOLDER` (SD1.5; --what sd21-base, "
            "sd21 or sd-turbo for SD2.x, sdxl or sdxl-turbo for SDXL, sd3-medium or sd35-medium for SD3)")
WEIGHTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
           "text_encoder_2": "model"}
# which Stable Diffusion a checkpoint is (`model_kind`), and the family each kind belongs to (for messages)
KINDS = {"sd1": "SD1.5",  # SD1.x: 1×1-conv projections in the U-Net's transformers, OpenAI's CLIP text tower
         "sd2": "SD2.x",  # an SD2.x single file: its training size and prediction type are not stored
         "sd2-base": "SD2.x",  # an SD2.x folder trained at 512² (SD2.1-base, SD-Turbo)
         "sd2-v": "SD2.x",  # an SD2.x folder trained at another size (SD2.1 768-v)
         "sdxl": "SDXL",  # the U-Net takes the pooled text and time ids (`text_time`); two text towers
         "sdxl-turbo": "SDXL"}  # an SDXL folder whose scheduler is SDXL-Turbo's (trailing timesteps): 512²
SDXL_KINDS = ("sdxl", "sdxl-turbo")


@dataclass
class Part:
    """One network of a checkpoint, before loading: its module (built on meta), the file, and which file
    key fills which parameter. `load_sd` fills it; `minidiffseg inspect-weights` checks it."""

    what: str
    file: Path
    module: nn.Module
    names: dict[str, str]  # file key -> parameter name, for the keys that are loaded
    shapes: dict[str, tuple[int, ...]]  # every tensor of the file (its header)
    ignored: list[str] = field(default_factory=list)  # file keys skipped by name (decoder, EMA, position_ids, ...)
    finish: Callable[[Any], nn.Module] | None = None  # the loaded module -> the network (OpenCLIP's split)


Parts = dict[str, Part]  # the networks of one checkpoint by component name (names.COMPONENTS), in that order


def load_sd(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
            variant: str | None = None, tokenizer: str | Path | CLIPTokenizer | None = None,
            stream: bool = False, keep: torch.dtype | None = None, revision: str | None = None
            ) -> "StableDiffusion | StableDiffusionXL | StableDiffusion3":
    """SD1.5, SD2.x or SDXL from a diffusers folder or a single LDM .safetensors file, in `dtype` on `device`, in eval
    mode without gradients; `.kind` and `.name` say which (decided from the files, docs/sd2.md §2). `variant`: None
    prefers the fp32 files of a diffusers folder and falls back to the `.fp16` ones; "fp16" takes only those. `tokenizer`: a folder with vocab.json + merges.txt or
    a built CLIPTokenizer, instead of the checkpoint's own tokenizer/ folder. `path` may also be a hub id
    of hub.STABLE_DIFFUSION (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5): its copy in the Hugging Face
    cache (`minidiffseg download`); `revision` (a commit hash, branch or tag) takes that commit's copy there.
    `stream`: keep no weights resident; each block is read from the file when it runs (sd/stream.py:
    the same checks first, the same results, a fraction of the memory).
    `keep` (fp16 or bf16, without `stream`): keep the weights resident in that half precision (the file's
    own fp16/bf16 tensors as stored) and up-cast each block to `dtype` as it runs (sd/precision.py).
    A diffusers folder with transformer/ instead of unet/ is SD3 / SD3.5's: minidiffseg.sd3.checkpoint loads it;
    an SD3 single file, minidiffseg.sd3.single_file."""
    path, device = Path(path), torch.device(device)
    if not path.exists() and (what := hub.what_for(str(path))) is not None:
        path = hub.cached(what, revision)  # the hub id: its copy in the Hugging Face cache, found without network
    if not path.exists():
        there = f": `{hub.command('sd15', dir=path)}` puts SD1.5 there" if path.suffix != ".safetensors" else ""
        raise UserError(f"{path}: not found; fetch Stable Diffusion with `minidiffseg download`{there}; or give a "
                        "diffusers folder or a single .safetensors file of Stable Diffusion (SD1.5 or SD2.x)")
    if is_sd3_folder(path):  # a diffusion transformer
        from ..sd3.checkpoint import load_sd3  # SD3's package builds on this one: imported where it is needed

        return load_sd3(path, device, dtype, variant, stream, keep)
    single_file = not path.is_dir()
    if single_file:
        check_suffix(path)
        from ..sd3.single_file import is_sd3_file, load_sd3_file  # an MM-DiT's single file (its joint blocks)

        if is_sd3_file(path):
            return load_sd3_file(path, device, dtype, tokenizer, stream, keep)
        parts, unknown = single_file_parts(path)
    else:
        parts, unknown = diffusers_parts(path, variant), []  # configs and headers: the weights are read below
    scheduler = None if single_file else scheduler_config(path)
    kind = model_kind(unet_config(parts), single_file, scheduler)
    here = path.parent if single_file else path
    # the padding token where the folder names none: OpenAI's CLIP (SD1.x's, SDXL's first tower) pads with EOS,
    # OpenCLIP's tokenizers (SD2.x's, SDXL's second) with "!" (id 0)
    tok = _tokenizer(tokenizer, here / "tokenizer", path, EOS if kind in ("sd1", *SDXL_KINDS) else "!")
    if unknown:
        raise UserError(f"{path}: {len(unknown)} unexpected tensor(s): {keys_text(unknown)}; neither a tensor of an "
                        f"{KINDS[kind]} single file nor one ignored by name (minidiffseg.sd.ldm.IGNORED)")
    load = loader(stream, keep)
    # an SD2.x single file's text tower is filled under OpenCLIP's names and then split (`finish`): it is
    # loaded resident even when the rest streams (docs/sd2.md §3)
    nets = {c: (load_strict if p.finish else load)(p.module, p.file, p.names,
                                                   _dtype_of(c, p, dtype, kind in SDXL_KINDS), device, p.what)
            for c, p in parts.items()}
    nets = {c: finish(net) if (finish := parts[c].finish) is not None else net for c, net in nets.items()}
    vae, unet = nets["vae"], nets["unet"]
    assert isinstance(vae, VAEEncoder) and isinstance(unet, UNet)
    schedule, name = _schedule(scheduler, path), model_name(kind, unet.cfg, scheduler)
    if kind in SDXL_KINDS:
        text_l, text_g = nets["text_encoder"], nets["text_encoder_2"]
        assert isinstance(text_l, CLIPTextModel) and isinstance(text_g, CLIPTextModelWithProjection)
        tok_2 = _tokenizer(tokenizer, here / "tokenizer_2", path, "!")
        return StableDiffusionXL(tok, tok_2, text_l, text_g, vae, unet, schedule, name, kind,
                                 512 if kind == "sdxl-turbo" else unet.cfg.sample_size * 8)
    text_encoder = nets["text_encoder"]
    assert isinstance(text_encoder, CLIPTextModel)
    return StableDiffusion(tok, text_encoder, vae, unet, schedule, name, kind)


def is_sd3_folder(path: Path) -> bool:
    """Whether `path` is a diffusers folder of a diffusion transformer (transformer/, no unet/): SD3's."""
    return path.is_dir() and (path / "transformer").is_dir() and not (path / "unet").is_dir()


def loader(stream: bool, keep: torch.dtype | None):
    """The function that fills a network built on meta (`load_strict`'s arguments): streamed, kept in half precision
    and up-cast per block, or resident (load_sd's `stream` and `keep`)."""
    return stream_weights if stream else partial(upcast_weights, keep=keep) if keep is not None else load_strict


def _dtype_of(component: str, part: Part, dtype: torch.dtype, reads_upcast: bool) -> torch.dtype:
    """The dtype a network is loaded in: `dtype`, but float32 for the VAE when its config says `force_upcast`
    and `dtype` is float16 (it overflows float16), as diffusers' SDXL and SD3 pipelines compute it; `reads_upcast`
    for those models only: diffusers writes force_upcast true into every VAE config it saves (its default) and its
    SD1.5/SD2.x pipelines ignore it."""
    cfg = getattr(part.module, "cfg", None)
    upcast = reads_upcast and component == "vae" and dtype == torch.float16 and getattr(cfg, "force_upcast", False)
    return torch.float32 if upcast else dtype


def _tokenizer(tokenizer, default: Path, path: Path, default_pad: str) -> CLIPTokenizer:
    """The `tokenizer=` argument (a built tokenizer: as given for SD1.x/SD2.x, with `default_pad` as SDXL's second
    tokenizer; a folder) or else the checkpoint's `default` folder; its padding token is the one the folder names
    (special_tokens_map.json), else `default_pad`."""
    if isinstance(tokenizer, CLIPTokenizer):
        return tokenizer if default.name == "tokenizer" else CLIPTokenizer(tokenizer.vocab, tokenizer.merges, default_pad)
    folder = Path(tokenizer) if tokenizer is not None else default
    if not folder.is_dir():
        raise UserError(f"{path}: no tokenizer folder {folder}: put the model's tokenizer/ (vocab.json, merges.txt) "
                        f"there or pass tokenizer=<folder>; {DOWNLOAD}")
    return CLIPTokenizer.from_dir(folder, default_pad=default_pad)


def unet_config(parts: Parts) -> UNetConfig:
    """The config of the U-Net that `parts` (diffusers_parts, single_file_parts) built."""
    unet = parts["unet"].module
    assert isinstance(unet, UNet)
    return unet.cfg


def model_kind(unet: UNetConfig, single_file: bool = False, scheduler: dict | None = None) -> str:
    """Which Stable Diffusion a checkpoint is (a key of KINDS), from its U-Net's config (never from a file or
    repo name): SDXL's U-Net takes the pooled text and time ids (`text_time`), and an SDXL folder whose scheduler
    spaces its timesteps "trailing" is SDXL-Turbo's (its few-step sampler; SDXL base's: "leading"); SD2.x's
    transformers have linear projections and per-level heads, SD1.x's 1×1 convs; an SD2.x folder is "sd2-base"
    when trained at 512² (sample_size × 8), else "sd2-v"; a single file stores no training size, so it is "sd2"."""
    if unet.addition_embed_type == "text_time":
        return "sdxl-turbo" if (scheduler or {}).get("timestep_spacing") == "trailing" else "sdxl"
    if not unet.use_linear_projection:
        return "sd1"  # SD1.x checkpoints share this architecture
    if single_file:
        return "sd2"
    return "sd2-base" if unet.sample_size * 8 == 512 else "sd2-v"


def model_name(kind: str, unet: UNetConfig, scheduler: dict | None = None) -> str:
    """The display name of a checkpoint of `kind` (`model_kind`): "SD1.5", "SD2.x (single file: …)", or an
    SD2.x folder's training size and its scheduler's prediction type, "SD2.x-base (512², ε-prediction)",
    "SD2.x (768², v-prediction)"."""
    if kind in ("sd1", "sd2"):
        single = " (single file: its training size and prediction type are not stored)" if kind == "sd2" else ""
        return KINDS[kind] + single
    if kind in SDXL_KINDS:
        return "SDXL-Turbo (512²)" if kind == "sdxl-turbo" else f"SDXL ({unet.sample_size * 8}²)"
    predictions: dict[object, str] = {"epsilon": "ε-prediction", "v_prediction": "v-prediction"}
    prediction = predictions.get((scheduler or {}).get("prediction_type"), "prediction type unknown")
    return f"{KINDS[kind]}{'-base' if kind == 'sd2-base' else ''} ({unet.sample_size * 8}², {prediction})"


def scheduler_config(folder: Path) -> dict | None:
    """scheduler/scheduler_config.json of a diffusers folder, if it has one (SD1.5 downloads don't)."""
    path = folder / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e}); download the folder again") from None


def _schedule(scheduler: dict | None, path: Path) -> NoiseSchedule:
    """The noise schedule the folder's scheduler config describes (SD1.5's and SD2.x's are the same: 1000
    steps of scaled-linear betas from 0.00085 to 0.012), or that one when there is no config."""
    if scheduler is None:
        return NoiseSchedule()
    betas = scheduler.get("beta_schedule", "scaled_linear")
    if betas != "scaled_linear" or scheduler.get("trained_betas") is not None:
        raise UserError(f"{path}: scheduler/scheduler_config.json has the {betas!r} noise schedule; minidiffseg "
                        "computes Stable Diffusion's scaled_linear schedule only")
    return NoiseSchedule(int(scheduler.get("num_train_timesteps", 1000)), float(scheduler.get("beta_start", 0.00085)),
                         float(scheduler.get("beta_end", 0.012)))


def _stored(part: Part, suffix: str, dim: int) -> int | None:
    """A dimension of the tensor (as the file stores it) that fills the parameter named `*suffix` in `part`."""
    key = next((k for k, name in part.names.items() if name.endswith(suffix)), None)
    return part.shapes[key][dim] if key is not None and len(part.shapes[key]) > dim else None


def _check_context(where: Path, parts: Parts) -> None:
    """The U-Net's cross-attention reads the text encoders' output (SDXL: both towers' side by side), and SDXL's
    added embedding the second tower's pooled projection: their widths, as the files store them (a file that
    disagrees with its own config is the loader's finding), must agree."""
    unet = parts["unet"]
    towers = [c for c in ("text_encoder", "text_encoder_2") if c in parts]
    reads = _stored(unet, "attn2.to_k.weight", 1)  # [C, ctx]
    widths = [_stored(parts[c], "token_embedding.weight", 1) for c in towers]  # [V, W] each
    if reads is None or None in widths:
        return
    gives = sum(w for w in widths if w is not None)
    if reads != gives:
        given = " + ".join(f"{w} ({c})" for c, w in zip(towers, widths))
        raise UserError(f"{where}: context width mismatch: the U-Net's cross-attention reads {reads}-wide text "
                        f"(SD1.5: 768, SD2.x: 1024, SDXL: 768 + 1280 = 2048) but the text encoder(s) give {given}: "
                        "the checkpoint mixes the networks of two models; use one model's unet/ and text encoders")
    cfg = unet.module.cfg if isinstance(unet.module, UNet) else None
    takes = _stored(unet, "add_embedding.linear_1.weight", 1)  # [temb, 6·time dim + pooled width]
    pooled = _stored(parts["text_encoder_2"], "text_projection.weight", 0) if "text_encoder_2" in parts else None
    if cfg is not None and takes is not None and pooled is not None and cfg.addition_time_embed_dim is not None \
            and takes - 6 * cfg.addition_time_embed_dim != pooled:
        raise UserError(f"{where}: pooled width mismatch: the U-Net's added embedding takes "
                        f"{takes - 6 * cfg.addition_time_embed_dim}-wide pooled text (SDXL: 1280) but text_encoder_2 "
                        f"projects to {pooled}: use one model's unet/ and text_encoder_2/")


def diffusers_parts(folder: Path, variant: str | None = None) -> Parts:
    """Text encoder(s), VAE encoder and U-Net of a diffusers folder, sizes from each config.json. An SDXL U-Net
    (its config's `text_time` added embedding) takes a second text tower, text_encoder_2/."""
    absent = [c for c in ("unet", "vae", "text_encoder") if not (folder / c).is_dir()]
    if absent:
        raise UserError(f"{folder}: unknown checkpoint layout: a diffusers Stable Diffusion folder holds unet/, vae/, "
                        f"text_encoder/ and tokenizer/ (SDXL also text_encoder_2/ and tokenizer_2/), this one lacks "
                        f"{', '.join(absent)}/; {DOWNLOAD}, or give a single .safetensors file")
    unet_cfg = UNetConfig.from_diffusers(_config(folder / "unet"))
    specs: dict[str, tuple[type[nn.Module], Any, Callable[[str, tuple[int, ...]], str]]] = {
        "text_encoder": (CLIPTextModel, CLIPTextConfig.from_transformers, _text_name)}
    if unet_cfg.addition_embed_type == "text_time":  # SDXL
        if not (folder / "text_encoder_2").is_dir():
            raise UserError(f"{folder}: the U-Net is SDXL's (it takes a pooled text embedding) but there is no "
                            "text_encoder_2/ (OpenCLIP bigG): SDXL needs both text towers; download the whole "
                            "folder (`minidiffseg download --what sdxl`)")
        specs["text_encoder_2"] = (CLIPTextModelWithProjection, CLIPTextConfig.from_transformers, _text_name)
    specs.update({"vae": (VAEEncoder, VAEConfig.from_diffusers, _vae_name),
                  "unet": (UNet, lambda cfg: unet_cfg, lambda key, shape: key)})
    configs = {c: read(_config(folder / c)) for c, (_, read, _) in specs.items()}  # all sizes before any file
    parts = {}
    for component, (cls, _, name_of) in specs.items():
        file = _weights(folder / component, variant)
        shapes, _ = read_header(file)
        ours = {k: name_of(k, s) for k, s in shapes.items()}
        ignored = [k for k, name in ours.items() if not_built(component, name)]
        names = {k: name for k, name in ours.items() if k not in ignored}
        parts[component] = Part(WHAT[component], file, build_on_meta(cls, configs[component]), names, shapes, ignored)
    _check_context(folder, parts)
    return parts


def _text_name(key: str, shape: tuple[int, ...]) -> str:
    """Official files name the text tower `text_model.…` (and SDXL's second tower's projection `text_projection.…`);
    files written by transformers >= 5 drop the `text_model.` prefix."""
    return key if key.startswith(("text_model.", "text_projection.")) else f"text_model.{key}"


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
    return weights_file(component, WEIGHTS[component.name], variant)


def weights_file(folder: Path, stem: str, variant: str | None, fix: str = DOWNLOAD) -> Path:
    """A component folder's weights as minidiffseg loads them (sharded sets included: sd/shards.py):
    the file `{stem}[.variant].safetensors`, else the index of a shard set. `variant` None: the fp32 files first
    (`{stem}.safetensors`, then `{stem}.safetensors.index.json`), falling back to the fp16 ones; "fp16" (any other
    variant alike): only those. None found: one line naming the folder and what was looked for (a pickled
    `{stem}*.bin` there is refused as a pickle), ending with `fix`."""
    variants = [None, "fp16"] if variant is None else [variant]
    tried = [name for v in variants
             for name in (f"{stem}{'' if v is None else '.' + v}.safetensors", *index_names(stem, v))]
    for name in tried:
        if (folder / name).is_file():
            return folder / name
    pickles = sorted(p for p in folder.glob(f"{stem}*") if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        check_suffix(pickles[0])  # refuses it, pointing at safetensors
    shown = [name for v in variants for name in (f"{stem}{'' if v is None else '.' + v}.safetensors",
                                                 index_names(stem, v)[0])]
    raise UserError(f"{folder}: no {' or '.join(shown)} found; {fix}")


def single_file_parts(path: Path) -> tuple[Parts, list[str]]:
    """Text encoder(s), VAE encoder and U-Net of an LDM single file (sizes from the tensor shapes), and the
    file keys that are neither translated nor ignored (an error for loading, a finding for inspection)."""
    shapes, metadata = read_header(path)
    sdxl = ldm.is_sdxl(shapes)
    if any(k.startswith(ldm.XL_REFINER) for k in shapes):
        raise UserError(f"{path}: an SDXL refiner (its only text tower is bigG, under {ldm.XL_REFINER}…): the refiner "
                        "is not a model minidiffseg segments with; give SDXL base or SDXL-Turbo")
    text = {"text encoder": (f"{ldm.XL_TEXT}text_model.",), "second text encoder": (openclip.SDXL.prefix,)} if sdxl \
        else {"text encoder": (f"{ldm.TEXT}text_model.", openclip.PREFIX)}
    prefixes = {"U-Net": (ldm.UNET,), "VAE": (ldm.VAE,), **text}
    absent = [f"{what} ({' or '.join(p + '…' for p in prefix)})" for what, prefix in prefixes.items()
              if not any(k.startswith(prefix) for k in shapes)]
    if absent:
        model = "an SDXL" if sdxl else "an SD1.5 or SD2.x"
        raise UserError(f"{path}: unknown checkpoint layout: no {', '.join(absent)} tensors, so not {model} single "
                        "file (a lone component?); give a whole single file or a diffusers folder "
                        f"({DOWNLOAD})")
    try:
        if sdxl:
            unet_cfg, vae_cfg, text_cfg, text_2_cfg = ldm.infer_sdxl_configs(shapes, metadata)
        else:
            unet_cfg, vae_cfg, text_cfg = ldm.infer_configs(shapes, metadata)
    except KeyError as e:
        raise UserError(f"{path}: tensor {e.args[0]} missing, so the architecture sizes cannot be read; the file "
                        f"is incomplete or not {'SDXL' if sdxl else 'SD1.5/SD2.x'}: download it again") from None
    names, unknown = ldm.from_ldm(shapes, unet_cfg, vae_cfg)
    sd2_text = not sdxl and ldm.is_openclip(shapes)  # OpenCLIP's names, filled as they are and split afterwards
    text_cls = openclip.OpenCLIPTextWeights if sd2_text else CLIPTextModel
    parts = {"text_encoder": Part(WHAT["text_encoder"], path, build_on_meta(text_cls, text_cfg), names["text_encoder"],
                                  shapes, finish=openclip.to_clip_text if sd2_text else None)}
    if sdxl:  # bigG under OpenCLIP's names, split into CLIPTextModelWithProjection after loading
        parts["text_encoder_2"] = Part(WHAT["text_encoder_2"], path,
                                       build_on_meta(openclip.OpenCLIPTextWeightsWithProjection, text_2_cfg),
                                       names["text_encoder_2"], shapes, finish=openclip.to_clip_text_with_projection)
    parts.update({"vae": Part(WHAT["vae"], path, build_on_meta(VAEEncoder, vae_cfg), names["vae"], shapes),
                  "unet": Part(WHAT["unet"], path, build_on_meta(UNet, unet_cfg), names["unet"], shapes)})
    if ldm.uses_ema(names):  # a non-"emaonly" file: its EMA U-Net is loaded, the trained copy ignored
        parts["unet"].what = f"{parts['unet'].what} (EMA)"
    placed = {k for p in parts.values() for k in p.names} | set(unknown)  # loaded, or reported as unexpected
    for key in shapes:  # ignored by name, OpenCLIP's unused keys, the U-Net copy not loaded
        if key not in placed:
            part_of(parts, key).ignored.append(key)
    _check_context(path, parts)
    return parts, unknown


def component_of(key: str) -> str:
    """The network a single-file key belongs to, by prefix; the rest (EMA copy, DDPM schedule) goes with the U-Net."""
    if key.startswith((ldm.TEXT, openclip.PREFIX, ldm.XL_TEXT)):  # SD1.5's, SD2.x's, SDXL's first text tower
        return "text_encoder"
    if key.startswith(openclip.SDXL.prefix):
        return "text_encoder_2"
    return "vae" if key.startswith(ldm.VAE) else "unet"


def part_of(parts: Parts, key: str) -> Part:
    """The Part a single-file key belongs to (`component_of`)."""
    return parts[component_of(key)]
