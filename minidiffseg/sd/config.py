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
    """SD1.5 U-Net (diffusers `unet/config.json`)."""

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    # diffusers calls this field `attention_head_dim`, but it is the number of heads: SD1.5 has 8 heads
    # everywhere (head dim 320/8=40 ... 1280/8=160); SD2.x one count per level, [5, 10, 20, 20] (64 each).
    num_heads: int | tuple[int, ...] = 8
    cross_attention_dim: int = 768  # the text encoder's width: 768 (SD1.5), 1024 (SD2.x)
    use_linear_projection: bool = False  # SD2.x: the transformers' proj_in/proj_out are Linear, not 1×1 convs
    upcast_attention: bool = False  # SD2.1 768-v: attention scores and softmax in float32
    sample_size: int = 64  # the latent side it was trained at: 64 (512² images), 96 (SD2.x 768-v)
    norm_num_groups: int = 32
    norm_eps: float = 1e-5  # resnet GroupNorm; the transformer's GroupNorm uses 1e-6
    freq_shift: int = 0
    flip_sin_to_cos: bool = True

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]  # 320 -> 1280

    def heads(self, level: int) -> int:
        """Heads of the transformers at block level `level` (0 = the first down block; the mid block is
        the last level; up block i is level len-1-i)."""
        return self.num_heads[level] if isinstance(self.num_heads, tuple) else self.num_heads

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "UNetConfig":
        heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
        out = _pick(cls, {k: v for k, v in cfg.items() if k not in ("attention_head_dim",)})
        return cls(**{**out.__dict__, "num_heads": tuple(heads) if isinstance(heads, list) else int(heads)})

    @classmethod
    def tiny(cls) -> "UNetConfig":
        return cls(block_out_channels=(32, 32, 64, 64), cross_attention_dim=32, norm_num_groups=8)


@dataclass(frozen=True)
class VAEConfig:
    """SD1.5 VAE encoder half (diffusers `vae/config.json`)."""

    in_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215  # SD1.5 latent scale (vae/config.json "scaling_factor")

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
    projection_dim: int = 768  # only used by the filter's CLIPModel (text_projection)
    hidden_act: str = "quick_gelu"  # OpenAI CLIP's; SD2.x's OpenCLIP ViT-H tower uses "gelu" (exact, erf)

    @classmethod
    def from_transformers(cls, cfg: dict) -> "CLIPTextConfig":
        return _pick(cls, cfg.get("text_config", cfg))

    @classmethod
    def tiny(cls) -> "CLIPTextConfig":
        # the vocabulary stays real-sized so that real tokenizer ids are valid inputs
        return cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   projection_dim=16)
