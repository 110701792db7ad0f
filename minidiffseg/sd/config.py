"""Architecture sizes of the three Stable Diffusion networks: SD1.5 defaults, a `tiny()` preset, and
readers for the official `config.json` files (diffusers for U-Net/VAE, transformers for CLIP); SD2.x
differs only in fields read from those files (docs/sd2.md §1).

The tiny presets keep the architecture (4 levels, 16 attention layers, 8 heads, GEGLU, the VAE's
asymmetric padding, CLIP's causal mask) and shrink only widths and depths, so every code path of
the full model runs in milliseconds in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


def _pick(cls, cfg: dict, renames: dict[str, str] | None = None):
    """Build dataclass `cls` from the keys of an official config.json that it knows about."""
    renames = renames or {}
    known = {f.name for f in fields(cls)}
    kw = {}
    for key, value in cfg.items():
        name = renames.get(key, key)
        if name in known:
            kw[name] = tuple(value) if isinstance(value, list) else value
    return cls(**kw)


@dataclass(frozen=True)
class UNetConfig:
    """SD1.5 U-Net (diffusers `unet/config.json`); SD2.x and SDXL differ in fields read from that file."""

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    # diffusers calls this field `attention_head_dim`, but it is the number of heads: SD1.5 has 8 heads
    # everywhere (head dim 320/8=40 ... 1280/8=160); SD2.x one count per level, [5, 10, 20, 20] (64 each).
    num_heads: int | tuple[int, ...] = 8
    cross_attention_dim: int = 768  # the text encoder's width: 768 (SD1.5), 1024 (SD2.x), 2048 (SDXL)
    use_linear_projection: bool = False  # SD2.x: the transformers' proj_in/proj_out are Linear, not 1×1 convs
    upcast_attention: bool = False  # SD2.1 768-v: attention scores and softmax in float32
    sample_size: int = 64  # the latent side it was trained at: 64 (512² images), 96 (SD2.x 768-v), 128 (SDXL)
    norm_num_groups: int = 32
    norm_eps: float = 1e-5  # resnet GroupNorm; the transformer's GroupNorm uses 1e-6
    freq_shift: int = 0
    flip_sin_to_cos: bool = True
    # which levels hold transformers, as diffusers' block class names: SD1.5/SD2.x every level but the deepest
    # (down) / the first (up); SDXL ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D") and the reverse
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    # BasicTransformerBlocks in each transformer: one count, or one per level (SDXL (1, 2, 10)); the mid block
    # takes the deepest level's, up block i that of level len-1-i (diffusers reverses the list)
    transformer_layers_per_block: int | tuple[int, ...] = 1
    # SDXL's extra conditioning ("text_time"): an embedding of the pooled text and of 6 numbers (original size,
    # crop corner, target size), added to the timestep embedding; None for SD1.5/SD2.x
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None  # SDXL: 256, the sinusoidal width of each of the 6 numbers
    projection_class_embeddings_input_dim: int | None = None  # SDXL: 2816 = 6·256 + 1280 (the pooled text)

    # diffusers' down / up block classes -> whether they hold transformers: the only ones built here
    DOWN_BLOCKS = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
    UP_BLOCKS = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
    # config.json fields of diffusers' UNet2DConditionModel that would change the network, with the values
    # built here (those of SD1.5, SD2.x and SDXL): any other value is refused rather than built differently
    BUILT_ONLY = {
        "mid_block_type": ("UNetMidBlock2DCrossAttn",), "class_embed_type": (None,), "num_class_embeds": (None,),
        "reverse_transformer_layers_per_block": (None,), "encoder_hid_dim": (None,), "encoder_hid_dim_type": (None,),
        "time_embedding_type": ("positional",), "time_embedding_dim": (None,), "time_embedding_act_fn": (None,),
        "timestep_post_act": (None,), "time_cond_proj_dim": (None,), "resnet_time_scale_shift": ("default",),
        "resnet_skip_time_act": (False,), "resnet_out_scale_factor": (1,), "only_cross_attention": (False,),
        "mid_block_only_cross_attention": (None, False), "dual_cross_attention": (False,),
        "attention_type": ("default",), "class_embeddings_concat": (False,), "cross_attention_norm": (None,),
        "conv_in_kernel": (3,), "conv_out_kernel": (3,), "act_fn": ("silu",), "center_input_sample": (False,),
        "downsample_padding": (1,), "mid_block_scale_factor": (1,), "addition_embed_type": (None, "text_time")}

    def __post_init__(self):
        from ..errors import UserError

        levels = len(self.block_out_channels)
        problems = []
        if len(self.down_block_types) != levels or len(self.up_block_types) != levels:
            problems.append(f"{len(self.down_block_types)} down_block_types and {len(self.up_block_types)} "
                            f"up_block_types for {levels} block_out_channels")
        problems += [f"block type {t!r} (built: {', '.join(known)})"
                     for types, known in ((self.down_block_types, self.DOWN_BLOCKS),
                                          (self.up_block_types, self.UP_BLOCKS))
                     for t in dict.fromkeys(types) if t not in known]
        depth = self.transformer_layers_per_block
        if isinstance(depth, tuple) and (len(depth) != levels or not all(isinstance(n, int) for n in depth)):
            problems.append(f"transformer_layers_per_block {depth!r}: one count per level ({levels}) expected")
        if self.addition_embed_type not in (None, "text_time"):
            problems.append(f"addition_embed_type {self.addition_embed_type!r} (built: None, 'text_time')")
        elif self.addition_embed_type and not (self.addition_time_embed_dim
                                               and self.projection_class_embeddings_input_dim):
            problems.append("addition_embed_type 'text_time' without addition_time_embed_dim and "
                            "projection_class_embeddings_input_dim")
        if problems:
            raise UserError(f"U-Net config: {'; '.join(problems)}: not a U-Net minidiffseg builds "
                            "(SD1.5, SD2.x, SDXL)")

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]  # 320 -> 1280

    @property
    def down_attention(self) -> tuple[bool, ...]:
        """Per down block (level 0 first): whether it holds transformers."""
        return tuple(self.DOWN_BLOCKS[t] for t in self.down_block_types)

    @property
    def up_attention(self) -> tuple[bool, ...]:
        """Per up block (the deepest level first): whether it holds transformers."""
        return tuple(self.UP_BLOCKS[t] for t in self.up_block_types)

    def heads(self, level: int) -> int:
        """Heads of the transformers at block level `level` (0 = the first down block; the mid block is
        the last level; up block i is level len-1-i)."""
        return self.num_heads[level] if isinstance(self.num_heads, tuple) else self.num_heads

    def depth(self, level: int) -> int:
        """BasicTransformerBlocks per transformer at block level `level` (numbered as in `heads`)."""
        depth = self.transformer_layers_per_block
        return depth[level] if isinstance(depth, tuple) else depth

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "UNetConfig":
        import json
        from dataclasses import replace

        from ..errors import UserError

        for key, built in cls.BUILT_ONLY.items():
            if key in cfg and cfg[key] not in built:
                raise UserError(f"U-Net config.json: {key} = {json.dumps(cfg[key])} is not implemented (minidiffseg "
                                f"builds the SD1.5, SD2.x and SDXL U-Nets: {' or '.join(map(json.dumps, built))})")
        for key in ("layers_per_block", "cross_attention_dim"):  # one value for all levels in every model built
            if isinstance(cfg.get(key), list):
                raise UserError(f"U-Net config.json: {key} = {cfg[key]} (one per level) is not implemented "
                                "(minidiffseg builds one value for every level, as SD1.5, SD2.x and SDXL have)")
        heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
        out = _pick(cls, {k: v for k, v in cfg.items() if k not in ("attention_head_dim",)})
        return replace(out, num_heads=tuple(heads) if isinstance(heads, (list, tuple)) else int(heads),
                       upcast_attention=bool(out.upcast_attention))  # SDXL's config.json says null

    @classmethod
    def tiny(cls) -> "UNetConfig":
        return cls(block_out_channels=(32, 32, 64, 64), cross_attention_dim=32, norm_num_groups=8)

    @classmethod
    def tiny_xl(cls) -> "UNetConfig":
        """diffusers' own tiny SDXL U-Net (its tests/pipelines/stable_diffusion_xl/test_stable_diffusion_xl.py;
        /work/shared/BACKBONES.md A6): SDXL's structure at widths (2, 4) and one GroupNorm group: attention in the
        second level only, transformers 2 blocks deep there and in the mid block (the first level's 1 is unused,
        as SDXL's), heads (2, 4), linear projections, a 64-wide context, the "text_time" embedding with 8-wide
        time ids and a 32-wide pooled text (80 = 6·8 + 32 inputs)."""
        return cls(block_out_channels=(2, 4), num_heads=(2, 4), cross_attention_dim=64, use_linear_projection=True,
                   sample_size=32, norm_num_groups=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
                   addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80)


@dataclass(frozen=True)
class VAEConfig:
    """SD1.5 VAE encoder half (diffusers `vae/config.json`)."""

    in_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215  # SD1.5 latent scale (vae/config.json "scaling_factor"); SDXL: 0.13025
    # SDXL's VAE: its activations overflow float16 (NaN; diffusers issue #7188, the encoder too), so it is
    # computed in float32 when the rest computes in float16 (what diffusers' SDXL pipelines do when the config says
    # so); read for SDXL only: diffusers writes true into every VAE config it saves (sd/checkpoint.py `_dtype_of`)
    force_upcast: bool = False
    # SD3's VAE (16 latent channels): no 1×1 quant conv after the encoder (`use_quant_conv` false in its config),
    # and its latents are shifted before scaling, (z − 0.0609) · 1.5305 (vae/config.json "shift_factor"); None: no shift
    use_quant_conv: bool = True
    shift_factor: float | None = None

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "VAEConfig":
        return _pick(cls, cfg)

    @classmethod
    def tiny(cls) -> "VAEConfig":
        return cls(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8)


@dataclass(frozen=True)
class CLIPTextConfig:
    """CLIP ViT-L/14 text tower (transformers `text_encoder/config.json`)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    # text_projection's width: the filter's CLIPModel and SDXL's bigG tower (CLIPTextModelWithProjection, 1280)
    projection_dim: int = 768
    hidden_act: str = "quick_gelu"  # OpenAI CLIP's; SD2.x's OpenCLIP ViT-H tower uses "gelu" (exact, erf)
    # where the pooled (EOS) state is read, CLIPTextModelWithProjection only (clip.eos_positions): 2 is the legacy
    # value the SD1.5/SD2.x/SDXL text_encoder config.json files carry, meaning "at argmax(input_ids)" (EOS, 49407,
    # is CLIP's largest id); any other value is the EOS id itself, pooled at its first position (transformers'
    # rule since its PR #24773, whose CLIPTextConfig defaults to 49407 where a config.json names none)
    eos_token_id: int = 2

    @classmethod
    def from_transformers(cls, cfg: dict) -> "CLIPTextConfig":
        return _pick(cls, cfg.get("text_config", cfg))

    @classmethod
    def tiny(cls) -> "CLIPTextConfig":
        # the vocabulary stays real-sized so that real tokenizer ids are valid inputs
        return cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   projection_dim=16)
