"""A random-weight SDXL checkpoint in the official diffusers layout, written by the reference libraries
themselves (docs/sdxl.md §4).

`TINY_XL`: SDXL's architecture at tiny sizes, after diffusers' own SDXL pipeline test
(tests/pipelines/stable_diffusion_xl/test_stable_diffusion_xl.py there): three U-Net levels, the first
without attention, 1 then 2 transformer blocks per attention, linear projections, the `text_time` added
embedding (6 time ids at width 8 + a 32-wide pooled text = 80 in); two text towers, CLIP-L-like (quick
GELU) and bigG-like (exact GELU, with its projection), 32 wide each, so the U-Net reads 64-wide text; a
VAE with SDXL's scaling factor and `force_upcast`. The towers keep CLIP's real vocabulary, so the real
tokenizer's ids are valid inputs.

`FULL_*`: the full-size configs (the hub's config.json files of stabilityai/stable-diffusion-xl-base-1.0, the
fields the reference classes take), for the inventories on the meta device and the benchmark's random weights.

- `write_tiny_sdxl_diffusers(dir)`: UNet2DConditionModel / AutoencoderKL / CLIPTextModel /
  CLIPTextModelWithProjection saved with `save_pretrained`, tokenizer/ (pads with EOS, as SDXL's) and
  tokenizer_2/ (special_tokens_map.json: pad "!"), the scheduler config of SDXL base (or SDXL-Turbo's).
- `write_tiny_sdxl_single_file(path)`: the same weights as an original SDXL single file: the U-Net (with
  `label_emb`) and VAE under the LDM names (minidiffseg.sd.ldm.to_ldm), CLIP-L in transformers' names under
  `conditioner.embedders.0.transformer.`, bigG in OpenCLIP's layout under `conditioner.embedders.1.model.`
  (fused q/k/v, transposed text_projection, logit_scale), the VAE decoder that is ignored, and both
  tokenizer folders beside it. The tiny sizes no shape tells go into the file's metadata.

Import from a test as `from tiny_sdxl import ...` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from safetensors.torch import save_file

from assets import write_sd15_tokenizer
from minidiffseg.sd import ldm, openclip
from minidiffseg.sd.config import CLIPTextConfig, UNetConfig, VAEConfig
from tiny_sd import encoder_state, randomise_, text_state
from tiny_sd2 import write_sd2_tokenizer

UNET = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 2, 4), use_linear_projection=True,
            cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=80, norm_num_groups=8)  # 80 = 6·8 + 32
TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=3,
            max_position_embeddings=77, layer_norm_eps=1e-5, projection_dim=32, bos_token_id=0, eos_token_id=2,
            pad_token_id=1)  # the token ids diffusers' test config carries (eos_token_id 2: the legacy EOS rule)
TEXT_L = dict(TEXT, hidden_act="quick_gelu")
TEXT_G = dict(TEXT, hidden_act="gelu")
VAE = dict(block_out_channels=(16, 16, 32, 32), in_channels=3, out_channels=3, latent_channels=4,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
           layers_per_block=1, norm_num_groups=8, sample_size=128, scaling_factor=0.13025, force_upcast=True)
FULL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
                 down_block_types=UNET["down_block_types"], up_block_types=UNET["up_block_types"],
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
                 cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, norm_num_groups=32)  # 2816 = 6·256 + 1280
FULL_TEXT_L = dict(TEXT_L, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                   projection_dim=768)  # CLIP ViT-L/14's text tower (text_encoder/config.json)
FULL_TEXT_G = dict(TEXT_G, hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                   projection_dim=1280)  # OpenCLIP ViT-bigG/14's (text_encoder_2/config.json)
FULL_VAE = dict(VAE, block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=1024)
# the hub's scheduler configs: SDXL base (EulerDiscreteScheduler, "leading") and SDXL-Turbo's
# (EulerAncestralDiscreteScheduler, "trailing"), both on SD's scaled-linear betas
SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "beta_start": 0.00085, "interpolation_type": "linear", "num_train_timesteps": 1000,
             "prediction_type": "epsilon", "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None}
TURBO_SCHEDULER = {**SCHEDULER, "_class_name": "EulerAncestralDiscreteScheduler", "timestep_spacing": "trailing"}


def tiny_reference_xl(seed: int = 0):
    """(UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTextModelWithProjection) at the tiny SDXL sizes,
    random (each network its own seed)."""
    import diffusers
    import transformers

    unet = randomise_(diffusers.UNet2DConditionModel(**UNET), seed)
    vae = randomise_(diffusers.AutoencoderKL(**VAE), seed + 1)
    text_l = randomise_(transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT_L)), seed + 2)
    text_g = randomise_(transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**TEXT_G)), seed + 3)
    return unet.eval(), vae.eval(), text_l.eval(), text_g.eval()


def write_tiny_sdxl_diffusers(dir: str | Path, seed: int = 0, variant: str | None = None,
                              scheduler: dict | None = SCHEDULER) -> Path:
    """The diffusers SDXL folder layout at the tiny sizes; variant "fp16" writes `*.fp16.safetensors` in fp16."""
    dir = Path(dir)
    dtype = torch.float16 if variant == "fp16" else torch.float32
    nets = dict(zip(("unet", "vae", "text_encoder", "text_encoder_2"), tiny_reference_xl(seed)))
    for name, net in nets.items():
        net.to(dtype).save_pretrained(dir / name, safe_serialization=True, variant=variant)
    write_sd15_tokenizer(dir / "tokenizer")  # CLIP-L's: pads with EOS (its special_tokens_map.json says so)
    write_sd2_tokenizer(dir / "tokenizer_2")  # bigG's: special_tokens_map.json names "!"
    if scheduler is not None:
        (dir / "scheduler").mkdir(exist_ok=True)
        (dir / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    return dir


def single_file_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """An SDXL single file's tensors for the weights of write_tiny_sdxl_diffusers(seed)."""
    unet, vae, text_l, text_g = tiny_reference_xl(seed)
    sd = ldm.to_ldm(unet.state_dict(), encoder_state(vae), {})
    sd.update({f"{ldm.XL_TEXT}{k}": v for k, v in text_state(text_l).items()})
    sd[f"{ldm.XL_TEXT}text_model.embeddings.position_ids"] = torch.arange(77)[None]  # ignored by name
    state_g = {k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v
               for k, v in text_g.state_dict().items() if not k.endswith("position_ids")}
    sd.update({openclip.SDXL.prefix + k: v for k, v in openclip.to_openclip(state_g).items()})
    sd[openclip.SDXL.prefix + "logit_scale"] = torch.tensor(4.6052)  # CLIP's contrastive temperature: ignored
    sd.update({f"{ldm.VAE}{k}": v for k, v in vae.state_dict().items() if k.startswith(("decoder.", "post_quant_conv."))})
    return sd


def write_tiny_sdxl_single_file(path: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """The weights of write_tiny_sdxl_diffusers(seed) as one original SDXL .safetensors file (+ both tokenizer
    folders beside it); the tiny sizes no shape tells in its metadata (ldm.config_metadata)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = single_file_state(seed)
    configs = (UNetConfig.from_diffusers(json.loads(json.dumps(UNET))), VAEConfig.from_diffusers(VAE),
               CLIPTextConfig.from_transformers(TEXT_L), CLIPTextConfig.from_transformers(TEXT_G))
    save_file({k: v.to(dtype).contiguous() if v.is_floating_point() else v.contiguous() for k, v in sd.items()}, path,
              metadata={"format": "pt", **ldm.config_metadata(*configs)})
    write_sd15_tokenizer(path.parent / "tokenizer")
    write_sd2_tokenizer(path.parent / "tokenizer_2")
    return path
