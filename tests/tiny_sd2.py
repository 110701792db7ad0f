"""Random-weight SD2.x checkpoints in the official layouts, written by the reference libraries themselves
(docs/sd2.md §4), reusing tests/tiny_sd.py's helpers.

- `TINY2` (tests/reference_sd.py's tiny SD2.1): every SD2.x option on: per-level head counts, linear
  proj_in/proj_out, float32 attention (upcast, as SD2.1 768-v), a GELU text tower, a context width (48)
  unlike the tiny SD1.5's (32), so that mixing the two is a context-width mismatch.
- `write_tiny_sd2_diffusers(dir)`: diffusers UNet2DConditionModel / AutoencoderKL and transformers
  CLIPTextModel saved with `save_pretrained`, the tokenizer folder with SD2.x's special_tokens_map.json
  (pad "!") and tokenizer_config.json (pad "<|endoftext|>", as the hub has them), and the scheduler config.
- `write_tiny_sd2_single_file(path)`: the same weights as an original SD2.x single file: the U-Net and
  VAE under the LDM names (minidiffseg.sd.ldm.to_ldm), the text tower in OpenCLIP's layout with one
  more layer than the folder (the file holds the whole tower, SD2.x uses its penultimate layer) and the
  contrastive head, plus the keys a real file carries that are ignored (decoder, EMA counters, schedule).

Import from a test as `from tiny_sd2 import ...` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from assets import write_sd15_tokenizer
from reference_sd import MODELS, reference_text_config, reference_unet  # noqa: F401  (reference_unet re-exported)
from minidiffseg.sd import ldm, openclip
from minidiffseg.sd.config import CLIPTextConfig
from tiny_sd import diffusers, encoder_state, extra_ldm_keys, randomise_, reference_vae, text_state, transformers  # noqa: F401

TINY2 = MODELS["sd21"][1]  # tiny sizes, SD2.1 768-v's options (upcast included); its sample_size 16 is 128²
# SD2.x's 768-v scheduler config as the hub has it (stabilityai/stable-diffusion-2-1 scheduler_config.json)
SCHEDULER = {"_class_name": "DDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
             "prediction_type": "v_prediction", "set_alpha_to_one": False, "steps_offset": 1, "trained_betas": None}
SPECIAL = {"content": "", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def reference_text(cfg: CLIPTextConfig):
    """transformers' CLIPTextModel at `cfg`, its activation included."""
    return transformers.CLIPTextModel(reference_text_config(cfg))


def tiny_reference2(seed: int = 0, text_layers: int = 0):
    """(UNet2DConditionModel, AutoencoderKL, CLIPTextModel) at TINY2, random; the text tower with
    `text_layers` more layers than TINY2's (the single file's whole tower), the first ones shared."""
    unet, vae, text = TINY2
    tower = CLIPTextConfig(**{**text.__dict__, "num_hidden_layers": text.num_hidden_layers + text_layers})
    return (randomise_(reference_unet(unet), seed), randomise_(reference_vae(vae), seed + 1),
            randomise_(reference_text(tower), seed + 2))


def penultimate(text):
    """The diffusers folders' text encoder: the tower without its last layer (transformers' model, in place)."""
    body = getattr(text, "text_model", text)  # transformers >= 5 drops the `text_model` level
    layers = body.encoder.layers
    body.encoder.layers = layers[:-1]
    text.config.num_hidden_layers = len(layers) - 1
    return text


def write_sd2_tokenizer(dir: Path) -> Path:
    """SD2.x's tokenizer/ folder: CLIP's BPE files and the two JSON files naming the special tokens (SD2.x's
    special_tokens_map.json says pad "!", its tokenizer_config.json "<|endoftext|>"; the former wins)."""
    write_sd15_tokenizer(dir)
    named = {t: {**SPECIAL, "content": c} for t, c in
             (("bos_token", "<|startoftext|>"), ("eos_token", "<|endoftext|>"), ("unk_token", "<|endoftext|>"))}
    (dir / "special_tokens_map.json").write_text(json.dumps({**named, "pad_token": "!"}, indent=2))
    (dir / "tokenizer_config.json").write_text(json.dumps(
        {"add_prefix_space": False, "do_lower_case": True, "errors": "replace", "model_max_length": 77,
         "pad_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer",
         **{t: {**v, "__type": "AddedToken"} for t, v in named.items()}}, indent=2))
    return dir


def write_tiny_sd2_diffusers(dir: str | Path, seed: int = 0, variant: str | None = None,
                             scheduler: dict | None = SCHEDULER) -> Path:
    """The diffusers SD2.x folder layout at TINY2; variant "fp16" writes `*.fp16.safetensors` in fp16."""
    dir = Path(dir)
    dtype = torch.float16 if variant == "fp16" else torch.float32
    unet, vae, text = tiny_reference2(seed, text_layers=1)
    unet.to(dtype).save_pretrained(dir / "unet", safe_serialization=True, variant=variant)
    vae.to(dtype).save_pretrained(dir / "vae", safe_serialization=True, variant=variant)
    penultimate(text).to(dtype).save_pretrained(dir / "text_encoder", variant=variant)
    write_sd2_tokenizer(dir / "tokenizer")
    if scheduler is not None:
        (dir / "scheduler").mkdir(exist_ok=True)
        (dir / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    return dir


def sd2_single_file_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """An SD2.x single file's tensors for the weights of write_tiny_sd2_diffusers(seed)."""
    unet, vae, text = tiny_reference2(seed, text_layers=1)
    sd = ldm.to_ldm(unet.state_dict(), encoder_state(vae), {})
    tower = openclip.to_openclip(text_state(text))  # all layers: the file holds the whole tower
    sd.update({openclip.PREFIX + k: v for k, v in tower.items()})
    g = torch.Generator().manual_seed(seed + 3)
    width = TINY2[2].hidden_size
    sd[openclip.PREFIX + "text_projection"] = torch.randn(width, width, generator=g)  # CLIP's head: ignored
    sd[openclip.PREFIX + "logit_scale"] = torch.tensor(4.6052)
    sd.update({k: v for k, v in extra_ldm_keys(vae, TINY2[2]).items() if not k.startswith(ldm.TEXT)})
    return sd


def write_tiny_sd2_single_file(path: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32,
                               tokenizer: bool = True) -> Path:
    """The same weights as write_tiny_sd2_diffusers(seed) as one original SD2.x .safetensors file (+ SD2.x's
    tokenizer/ beside it). The configs' shape-less fields go into the file's metadata (ldm.config_metadata)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = sd2_single_file_state(seed)
    save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}, path,
              metadata={"format": "pt", **ldm.config_metadata(*TINY2)})
    if tokenizer:
        write_sd2_tokenizer(path.parent / "tokenizer")
    return path
