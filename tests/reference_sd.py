"""The reference networks: diffusers' and transformers' own models at minidiffseg's configurations.

Shared by the tests (parity, checkpoints written by the reference libraries) and by bench/ (the diffusers
recipe, random checkpoints for timing). The tests import nothing from bench/; bench/ imports this file
from here (bench/__init__.py puts tests/ on its path). So nothing here imports pytest or the tests' other
helpers: diffusers and transformers are imported inside the functions that need them.

- `MODELS`: per model (sd15, sd21-base, sd21) its full-size and tiny configs and the scheduler's
  prediction type (SD2.x's values from the hub's config.json files, docs/sd2.md §1);
- `reference_unet`, `reference_vae`, `reference_text_config`: the reference models at a config
  (default initialisation); `text_state`: a transformers CLIPTextModel's parameters under our names;
- `StoreEveryMap`: a diffusers attention processor that keeps every attention probability map;
- `write_random_diffusers(dir, bpe)`: full-size random files in the official diffusers layout, written
  tensor by tensor from the reference models' inventory on the meta device (no model is built).

Import from a test as `from reference_sd import ...` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from minidiffseg.sd.config import CLIPTextConfig, UNetConfig, VAEConfig
from minidiffseg.sd.tokenizer import CLIPTokenizer

# SD2.x at full size: the values of the hub's config.json files (stabilityai/stable-diffusion-2-1-base and -2-1;
# docs/sd2.md §1): 64-channel heads, linear projections, context 1024, the 23-layer GELU OpenCLIP text tower;
# the 768-v model also trains on 96² latents and computes attention in float32
SD2_TEXT = CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                          projection_dim=512, hidden_act="gelu")
SD2_UNET = UNetConfig(num_heads=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True)
# the same options at tiny sizes (tests/tiny_sd2.py's): per-level heads, linear projections, a GELU tower
TINY_SD2_TEXT = CLIPTextConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3,
                               projection_dim=16, hidden_act="gelu")
TINY_SD2_UNET = UNetConfig(block_out_channels=(32, 32, 64, 64), num_heads=(2, 2, 4, 4), cross_attention_dim=48,
                           use_linear_projection=True, norm_num_groups=8, sample_size=16)
MODELS = {  # name -> (full-size configs, tiny configs, the scheduler's prediction type)
    "sd15": ((UNetConfig(), VAEConfig(), CLIPTextConfig()), (UNetConfig.tiny(), VAEConfig.tiny(), CLIPTextConfig.tiny()),
             None),
    "sd21-base": ((SD2_UNET, VAEConfig(), SD2_TEXT), (TINY_SD2_UNET, VAEConfig.tiny(), TINY_SD2_TEXT), "epsilon"),
    "sd21": ((replace(SD2_UNET, sample_size=96, upcast_attention=True), VAEConfig(), SD2_TEXT),
             (replace(TINY_SD2_UNET, upcast_attention=True), VAEConfig.tiny(), TINY_SD2_TEXT), "v_prediction"),
}


def reference_unet(cfg: UNetConfig):
    """diffusers' UNet2DConditionModel at `cfg` (default initialisation)."""
    import diffusers

    n = len(cfg.block_out_channels)  # SD1.5 and SD2.x: cross-attention in every level but the deepest
    return diffusers.UNet2DConditionModel(
        sample_size=cfg.sample_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
        # diffusers' `attention_head_dim` is the head count: one (SD1.5) or one per level (SD2.x)
        attention_head_dim=list(cfg.num_heads) if isinstance(cfg.num_heads, tuple) else cfg.num_heads,
        cross_attention_dim=cfg.cross_attention_dim, use_linear_projection=cfg.use_linear_projection,
        upcast_attention=cfg.upcast_attention, norm_num_groups=cfg.norm_num_groups, norm_eps=cfg.norm_eps,
        flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift)


def reference_vae(cfg: VAEConfig):
    """diffusers' AutoencoderKL at `cfg`, decoder included as the hub folder has it (we build only the encoder)."""
    import diffusers

    n = len(cfg.block_out_channels)
    return diffusers.AutoencoderKL(
        sample_size=512, in_channels=cfg.in_channels, out_channels=cfg.in_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups,
        scaling_factor=cfg.scaling_factor, force_upcast=cfg.force_upcast,  # diffusers' default is True; SD1.5's
        # hub config has no such field (our False): written explicitly, the folder says what the hub's means
        use_quant_conv=cfg.use_quant_conv, use_post_quant_conv=cfg.use_quant_conv, shift_factor=cfg.shift_factor)


def reference_text_config(cfg: CLIPTextConfig):
    """transformers' CLIPTextConfig at `cfg` (SD1.5's QuickGELU tower, SD2.x's GELU one)."""
    import transformers

    return transformers.CLIPTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        max_position_embeddings=cfg.max_position_embeddings, layer_norm_eps=cfg.layer_norm_eps,
        projection_dim=cfg.projection_dim, hidden_act=cfg.hidden_act,
        eos_token_id=cfg.eos_token_id)  # SD's hub configs say 2 (transformers' legacy EOS rule); its default is 49407


def text_state(text) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModel's parameters under our (and the official files') names: `text_model.…`
    (transformers >= 5 drops that prefix in its own state dict)."""
    return {(k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in text.state_dict().items()
            if not k.endswith("position_ids")}


class StoreEveryMap:
    """A diffusers attention processor: explicit softmax(QKᵀ/√d)·V, the probabilities kept in `maps[name]`."""

    def __init__(self, name: str, maps: dict):
        self.name, self.maps = name, maps

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))  # (B·heads, N, d)
        k = attn.head_to_batch_dim(attn.to_k(context))  # (B·heads, T, d)
        v = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(q, k, None)  # (B·heads, N, T)
        self.maps[self.name] = probs.unflatten(0, (-1, attn.heads))  # (B, heads, N, T)
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        return attn.to_out[1](attn.to_out[0](out))


def write_random_diffusers(dir: str | Path, bpe: Path, seed: int = 0, dtype: torch.dtype = torch.float16,
                           variant: str | None = "fp16",
                           configs: tuple = (UNetConfig(), VAEConfig(), CLIPTextConfig())) -> Path:
    """Random weights in the official diffusers layout, full size by default, as the hub files have
    them: the U-Net, the whole VAE (decoder included), the text tower under `text_model.` with its
    int64 position_ids buffer, and the tokenizer from CLIP's BPE file `bpe`. Tensors are drawn from the
    reference models' key/shape inventory (built on meta), one at a time, so no model is ever materialised."""
    import transformers

    dir = Path(dir)
    g = torch.Generator().manual_seed(seed)
    suffix = f".{variant}" if variant else ""
    unet_cfg, vae_cfg, text_cfg = configs
    with torch.device("meta"):
        unet, vae = reference_unet(unet_cfg), reference_vae(vae_cfg)
        text = transformers.CLIPTextModel(reference_text_config(text_cfg))
    for name, model, file in (("unet", unet, "diffusion_pytorch_model"), ("vae", vae, "diffusion_pytorch_model"),
                              ("text_encoder", text, "model")):
        if name == "text_encoder":
            model.config.save_pretrained(dir / name)
            state = text_state(model)
        else:
            model.save_config(dir / name)
            state = model.state_dict()
        tensors = {k: torch.randn(v.shape, generator=g, dtype=dtype) * 0.02 for k, v in state.items()}
        if name == "text_encoder":
            tensors["text_model.embeddings.position_ids"] = torch.arange(text_cfg.max_position_embeddings)[None]
        save_file(tensors, dir / name / f"{file}{suffix}.safetensors", metadata={"format": "pt"})
    CLIPTokenizer.from_bpe_gz(bpe).save(dir / "tokenizer")
    return dir
