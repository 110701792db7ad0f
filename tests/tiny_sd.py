"""Random-weight SD1.5 checkpoints in the official layouts, written by the reference libraries
themselves, so the loader is tested on files it did not write (docs/design.md §7.1).

- `write_tiny_diffusers(dir)`: diffusers UNet2DConditionModel / AutoencoderKL and transformers
  CLIPTextModel at the tiny configs of minidiffseg.sd.config, every parameter randomised, saved with
  `save_pretrained` (config.json + safetensors, optionally the `.fp16` variant) + tokenizer/.
- `write_tiny_single_file(path)`: the same weights (same seed) in the original LDM single-file
  layout via `minidiffseg.sd.ldm.to_ldm`, with the extra keys a real file carries (decoder, EMA
  counters, schedule buffers, position_ids) so that ignoring them by name is exercised.
- `write_random_diffusers(dir, ...)` (tests/reference_sd.py's, with CLIP's real BPE file): full-size
  random files in the official diffusers layout, written tensor by tensor without building the models.

The reference models themselves come from tests/reference_sd.py (re-exported here).

Import from a test as `from tiny_sd import ...` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import save_file

import reference_sd
from assets import clip_bpe_path, require, write_sd15_tokenizer
from reference_sd import reference_text_config, reference_unet, reference_vae, text_state  # noqa: F401  (re-exported)
from minidiffseg.sd import ldm
from minidiffseg.sd.config import CLIPTextConfig, UNetConfig, VAEConfig
from minidiffseg.sd.schedule import NoiseSchedule

diffusers = require("diffusers")  # writes the reference checkpoints (test-only)
transformers = require("transformers")  # writes the reference CLIP (test-only)

TINY = (UNetConfig.tiny(), VAEConfig.tiny(), CLIPTextConfig.tiny())


def randomise_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Overwrite every parameter: norm affines near (1, 0), other biases small, weights with variance
    1/fan_in (unit-variance outputs for unit-variance inputs), so activations stay sane."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            norm = isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm))
            for name, p in module.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=g)
                if norm:
                    p.copy_((1.0 if name == "weight" else 0.0) + 0.1 * noise)
                elif p.ndim == 1:
                    p.copy_(0.05 * noise)
                else:
                    p.copy_(noise / math.sqrt(p[0].numel()))
    return model.eval()


def tiny_reference(seed: int = 0):
    """(UNet2DConditionModel, AutoencoderKL, transformers CLIPTextModel) at the tiny configs, random."""
    unet, vae, text = TINY
    return (randomise_(reference_unet(unet), seed), randomise_(reference_vae(vae), seed + 1),
            randomise_(transformers.CLIPTextModel(reference_text_config(text)), seed + 2))


def encoder_state(vae) -> dict[str, torch.Tensor]:
    """What VAEEncoder holds of an AutoencoderKL: `encoder.*` and `quant_conv.*`."""
    return {k: v for k, v in vae.state_dict().items() if k.startswith(("encoder.", "quant_conv."))}


def write_random_diffusers(dir: str | Path, **options) -> Path:
    """Full-size random weights in the official diffusers layout (reference_sd.write_random_diffusers), the
    tokenizer from CLIP's real BPE file (a skip without it: tests/assets.py)."""
    return reference_sd.write_random_diffusers(dir, clip_bpe_path(), **options)


def write_tiny_diffusers(dir: str | Path, seed: int = 0, variant: str | None = None) -> Path:
    """The diffusers SD1.5 folder layout at tiny sizes; variant "fp16" writes `*.fp16.safetensors` in fp16."""
    dir = Path(dir)
    dtype = torch.float16 if variant == "fp16" else torch.float32
    unet, vae, text = tiny_reference(seed)
    unet.to(dtype).save_pretrained(dir / "unet", safe_serialization=True, variant=variant)
    vae.to(dtype).save_pretrained(dir / "vae", safe_serialization=True, variant=variant)
    text.to(dtype).save_pretrained(dir / "text_encoder", variant=variant)  # transformers 5: always safetensors
    write_sd15_tokenizer(dir / "tokenizer")
    return dir


def write_tiny_single_file(path: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32,
                           tokenizer: bool = True) -> Path:
    """The same weights as write_tiny_diffusers(seed) as one LDM .safetensors file (+ tokenizer/ beside it).
    The configs' shape-less fields go into the file's metadata (ldm.config_metadata)."""
    path = Path(path)
    unet, vae, text = tiny_reference(seed)
    sd = ldm.to_ldm(unet.state_dict(), encoder_state(vae), text_state(text))
    sd.update(extra_ldm_keys(vae, TINY[2]))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}, path,
              metadata={"format": "pt", **ldm.config_metadata(*TINY)})
    if tokenizer:
        write_sd15_tokenizer(path.parent / "tokenizer")
    return path


def extra_ldm_keys(vae, text_cfg: CLIPTextConfig) -> dict[str, torch.Tensor]:
    """Keys a real LDM file holds that minidiffseg ignores: the VAE decoder (diffusers names under the LDM
    prefix: only the prefix matters), post_quant_conv, the EMA counters, the DDPM schedule buffers, and
    CLIP's position_ids."""
    extra = {f"{ldm.VAE}{k}": v for k, v in vae.state_dict().items() if k.startswith(("decoder.", "post_quant_conv."))}
    alphas_cumprod = NoiseSchedule().alphas_cumprod.float()
    extra.update({name: alphas_cumprod.clone() for name in ldm.DDPM_BUFFERS})  # values don't matter: ignored
    extra["model_ema.decay"] = torch.tensor(0.9999)
    extra["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    extra[f"{ldm.TEXT}text_model.embeddings.position_ids"] = torch.arange(text_cfg.max_position_embeddings)[None]
    return extra
