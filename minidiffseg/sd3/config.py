"""The sizes of SD3 / SD3.5's MM-DiT (diffusers `transformer/config.json`, SD3Transformer2DModel's arguments), the
full-size presets of the released models and tiny presets for the tests (/work/shared/BACKBONES.md B1, B6).

The tiny presets keep the architecture (patches of 2, 16 latent channels, joint attention of image then text
tokens, the last block `context_pre_only`; `tiny_35` adds SD3.5's per-head RMSNorm on q/k and a dual-attention
block) and shrink widths and depths, so every code path of the full model runs in milliseconds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

QK_NORMS = (None, "rms_norm")  # what SD3 (none) and SD3.5 (per-head RMSNorm) use; diffusers knows others


@dataclass(frozen=True)
class MMDiTConfig:
    """SD3Transformer2DModel's arguments. The defaults are diffusers' own (its __init__), so a config.json that
    leaves a field out means what it means to diffusers (SD3.5-large's has no `dual_attention_layers`: none);
    `sd3_medium()`, `sd35_medium()`, `sd35_large()` are the released models."""

    sample_size: int = 128  # latent side it was trained at (1024² images); only diffusers' table computation reads it
    patch_size: int = 2  # latent pixels per token side
    in_channels: int = 16  # the SD3 VAE's latent channels
    num_layers: int = 18  # JointTransformerBlocks; the last one is `context_pre_only`
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096  # the text states' width (T5-XXL's; CLIP's 2048 zero-padded to it)
    caption_projection_dim: int = 1152  # context_embedder's output: the text stream's width, = heads · head_dim
    pooled_projection_dim: int = 2048  # the pooled text: CLIP-L 768 | CLIP-G 1280
    out_channels: int = 16
    pos_embed_max_size: int = 96  # side of the stored position table, in tokens; a latent takes its centre crop
    qk_norm: str | None = None  # None (SD3) or "rms_norm" (SD3.5: per head, on q and k of image and text)
    dual_attention_layers: tuple[int, ...] = ()  # blocks with the extra image-only self-attention attn2 (SD3.5-medium)

    def __post_init__(self):
        from ..errors import UserError

        problems = []
        if self.qk_norm not in QK_NORMS:
            problems.append(f"qk_norm {json.dumps(self.qk_norm)} (built: null, \"rms_norm\")")
        if self.caption_projection_dim != self.inner_dim:
            problems.append(f"caption_projection_dim {self.caption_projection_dim} is not num_attention_heads × "
                            f"attention_head_dim = {self.inner_dim} (the joint attention needs both streams as wide)")
        if not isinstance(self.pos_embed_max_size, int):
            problems.append(f"pos_embed_max_size {json.dumps(self.pos_embed_max_size)} (built: a stored table, an int)")
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers]
        if bad:
            problems.append(f"dual_attention_layers {list(bad)} outside the {self.num_layers} blocks")
        if problems:
            raise UserError(f"SD3 transformer config: {'; '.join(problems)}: not an MM-DiT minidiffseg builds "
                            "(SD3, SD3.5)")

    @property
    def inner_dim(self) -> int:
        """The width of both token streams: heads × head dim (SD3-medium 24 × 64 = 1536)."""
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "MMDiTConfig":
        """From a `transformer/config.json` dict; keys it does not know (`_class_name`, `_diffusers_version`, ...)
        are ignored, values not built (a qk_norm other than null / "rms_norm") refused with one UserError line."""
        known = {f.name for f in fields(cls)}
        kw: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items() if k in known}
        if kw.get("out_channels", 0) is None:  # diffusers: out_channels None means in_channels
            kw["out_channels"] = kw.get("in_channels", cls.in_channels)
        if kw.get("dual_attention_layers", ()) is None:
            kw["dual_attention_layers"] = ()
        return cls(**kw)

    @classmethod
    def sd3_medium(cls) -> "MMDiTConfig":
        """stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json (BACKBONES.md B1): ≈2.03 B
        parameters plus the 192² position table."""
        return cls(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=192)

    @classmethod
    def sd35_medium(cls) -> "MMDiTConfig":
        """stabilityai/stable-diffusion-3.5-medium transformer/config.json: SD3-medium's sizes, a 384² position
        table, per-head RMSNorm on q/k, and the dual attention (attn2) in blocks 0-12."""
        return cls(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=384,
                   qk_norm="rms_norm", dual_attention_layers=tuple(range(13)))

    @classmethod
    def sd35_large(cls) -> "MMDiTConfig":
        """stabilityai/stable-diffusion-3.5-large transformer/config.json: 38 blocks of 38 heads, RMSNorm on q/k,
        no dual attention (its config.json has no such key)."""
        return cls(num_layers=38, num_attention_heads=38, caption_projection_dim=2432, pos_embed_max_size=192,
                   qk_norm="rms_norm")

    @classmethod
    def tiny(cls) -> "MMDiTConfig":
        """SD3's architecture at the widths of diffusers' own model test (tests/models/transformers/
        test_models_transformer_sd3.py: 4 heads of 8, text and pooled widths 32 and 64, a 96² table), with the real
        16 channels and patches of 2, 3 blocks (the last context_pre_only)."""
        return cls(sample_size=32, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=8,
                   num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=64,
                   out_channels=16, pos_embed_max_size=96)

    @classmethod
    def tiny_35(cls) -> "MMDiTConfig":
        """`tiny()` with SD3.5's additions, as diffusers' SD3.5 model test: qk RMSNorm, block 0 dual attention."""
        from dataclasses import replace

        return replace(cls.tiny(), qk_norm="rms_norm", dual_attention_layers=(0,))
