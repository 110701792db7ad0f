"""A random-weight SD3 / SD3.5 checkpoint in the official diffusers layout, written by the reference libraries
themselves (docs/sd3.md §5).

`TRANSFORMER` / `TRANSFORMER_35`: the MM-DiT at tiny sizes (tests/tiny_mmdit.py's, 4 blocks on a 16² latent with
a 12² position table, so the table is cropped): SD3's, and SD3.5's with qk RMSNorm and a dual-attention block.
The text side keeps SD3's shape at small widths: two CLIP towers with projections, 16 wide each (CLIP-L-like quick
GELU, bigG-like exact GELU), whose 32 columns are zero-padded to the transformer's 48-wide text; their projections
(32 + 32) make the 64-wide pooled input; a T5 encoder 48 wide (gated GELU, T5 v1.1's) and tests/tiny_t5.py's
T5-format tokenizer. The VAE has SD3's 16 channels, no quant convs, its shift and scale.

- `write_tiny_sd3_diffusers(dir, ...)`: SD3Transformer2DModel / AutoencoderKL / CLIPTextModelWithProjection ×2 /
  T5EncoderModel saved with `save_pretrained`, tokenizer/ (pads with EOS), tokenizer_2/ (pads with "!"),
  tokenizer_3/, scheduler/ (FlowMatchEulerDiscreteScheduler, shift 3). `t5=False` leaves text_encoder_3/ and
  tokenizer_3/ out, as `download --no-t5` does.

Import from a test as `from tiny_sd3 import ...` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from assets import write_sd15_tokenizer
from minidiffseg.sd.config import VAEConfig
from minidiffseg.sd3.config import MMDiTConfig
from minidiffseg.sd3.t5 import T5Config
from reference_sd import reference_vae
from tiny_mmdit import reference_mmdit
from tiny_sd import randomise_, transformers
from tiny_sd2 import write_sd2_tokenizer
from tiny_t5 import reference_encoder, write_tokenizer_3

RES = 128  # the image side: latent 16² (sample_size), 8² tokens
TRANSFORMER = dataclasses.replace(MMDiTConfig.tiny(), sample_size=16, num_layers=4, joint_attention_dim=48,
                                  pos_embed_max_size=12)
TRANSFORMER_35 = dataclasses.replace(TRANSFORMER, qk_norm="rms_norm", dual_attention_layers=(0,))
TEXT = dict(vocab_size=49408, hidden_size=16, intermediate_size=37, num_attention_heads=4, num_hidden_layers=3,
            max_position_embeddings=77, layer_norm_eps=1e-5, projection_dim=32, bos_token_id=0, eos_token_id=2,
            pad_token_id=1)  # diffusers' SD3 pipeline test's ids (eos_token_id 2: the legacy EOS rule)
TEXT_L = dict(TEXT, hidden_act="quick_gelu")
TEXT_G = dict(TEXT, hidden_act="gelu")
T5 = dataclasses.replace(T5Config.tiny(), d_model=48, num_layers=2, feed_forward_proj="gated-gelu",
                         relative_attention_num_buckets=32)
VAE = VAEConfig(latent_channels=16, block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
                scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, force_upcast=True)
# the hub's scheduler/scheduler_config.json of stabilityai/stable-diffusion-3-medium-diffusers
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}


def tiny_reference_sd3(seed: int = 0, transformer: MMDiTConfig = TRANSFORMER):
    """(SD3Transformer2DModel, AutoencoderKL, CLIPTextModelWithProjection ×2, T5EncoderModel), random, float32."""
    mmdit = reference_mmdit(transformer, seed)
    vae = randomise_(reference_vae(VAE), seed + 1)
    text_l = randomise_(transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**TEXT_L)), seed + 2)
    text_g = randomise_(transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**TEXT_G)), seed + 3)
    t5 = reference_encoder(T5, seed + 4)
    return mmdit.eval(), vae.eval(), text_l.eval(), text_g.eval(), t5.eval()


def write_tiny_sd3_diffusers(dir: str | Path, seed: int = 0, variant: str | None = None, t5: bool = True,
                             transformer: MMDiTConfig = TRANSFORMER) -> Path:
    """The diffusers SD3 folder layout at the tiny sizes; variant "fp16" writes `*.fp16.safetensors` in fp16."""
    dir = Path(dir)
    dtype = torch.float16 if variant == "fp16" else torch.float32
    nets = dict(zip(("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"),
                    tiny_reference_sd3(seed, transformer)))
    if not t5:
        del nets["text_encoder_3"]
    for name, net in nets.items():
        net.to(dtype).save_pretrained(dir / name, safe_serialization=True, variant=variant)
    write_sd15_tokenizer(dir / "tokenizer")  # CLIP-L's: pads with EOS
    write_sd2_tokenizer(dir / "tokenizer_2")  # bigG's: special_tokens_map.json names "!"
    if t5:
        write_tokenizer_3(dir / "tokenizer_3")
    (dir / "scheduler").mkdir(exist_ok=True)
    (dir / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2))
    return dir
