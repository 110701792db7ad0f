"""The SDXL reference U-Net: diffusers' UNet2DConditionModel at a minidiffseg UNetConfig with SDXL's options
(block types, transformer depth per level, the "text_time" additional embedding), beside reference_sd.py's
`reference_unet` for SD1.5/SD2.x. Like reference_sd.py it imports diffusers inside the function only, and
nothing of pytest, so bench/ can use it too.
"""

from __future__ import annotations

from minidiffseg.sd.config import UNetConfig


def reference_unet_xl(cfg: UNetConfig):
    """diffusers' UNet2DConditionModel at `cfg` (default initialisation), every field of the config passed on."""
    import diffusers

    def listed(value):  # diffusers takes per-level values as lists
        return list(value) if isinstance(value, tuple) else value

    return diffusers.UNet2DConditionModel(
        sample_size=cfg.sample_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        down_block_types=cfg.down_block_types, up_block_types=cfg.up_block_types,
        block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
        # diffusers' `attention_head_dim` is the head count: one, or one per level
        attention_head_dim=listed(cfg.num_heads), transformer_layers_per_block=listed(cfg.transformer_layers_per_block),
        cross_attention_dim=cfg.cross_attention_dim, use_linear_projection=cfg.use_linear_projection,
        upcast_attention=cfg.upcast_attention, norm_num_groups=cfg.norm_num_groups, norm_eps=cfg.norm_eps,
        flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift,
        addition_embed_type=cfg.addition_embed_type, addition_time_embed_dim=cfg.addition_time_embed_dim,
        projection_class_embeddings_input_dim=cfg.projection_class_embeddings_input_dim)
