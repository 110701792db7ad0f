"""The SD1.5 / SD2.x / SDXL U-Net (docs/design.md §3, docs/sd2.md §1) with diffusers' parameter names, so the
official `unet/diffusion_pytorch_model.safetensors` loads with `load_state_dict(strict=True)`.

Layout for block_out_channels (320, 640, 1280, 1280), layers_per_block 2:
  down_blocks.0-2  CrossAttnDownBlock2D: 2 × (resnet, transformer), then a stride-2 conv
  down_blocks.3    DownBlock2D: 2 resnets, no downsampling
  mid_block        resnet, transformer, resnet
  up_blocks.0      UpBlock2D: 3 resnets, nearest ×2 + conv
  up_blocks.1-3    CrossAttnUpBlock2D: 3 × (resnet, transformer), then ×2 (not after the last)
Every transformer has attn1 (self) and attn2 (cross): 16 of each; SD1.5: 8 heads everywhere; SD2.x:
heads of 64 channels (5, 10, 20, 20 per level), Linear proj_in/proj_out, context width 1024.

SDXL (block_out_channels (320, 640, 1280), UNetConfig.down_block_types / up_block_types):
  down_blocks.0    DownBlock2D: 2 resnets, then a stride-2 conv (no attention at the 128² grid of a 1024² image)
  down_blocks.1-2  CrossAttnDownBlock2D, transformers 2 and 10 BasicTransformerBlocks deep (transformer_blocks.0..N-1);
                   down_blocks.2 does not downsample
  mid_block        resnet, transformer (10 deep: the deepest level's), resnet
  up_blocks.0-1    CrossAttnUpBlock2D, 10 and 2 deep, then ×2; up_blocks.2 UpBlock2D: 3 resnets
70 transformer blocks, 140 attention layers at levels 2 and 4 (64² and 32² at 1024²), 64-channel heads, context
width 2048; the timestep embedding gets `add_embedding` of the pooled text and 6 size numbers added ("text_time").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention, AttentionStore
from .config import UNetConfig


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool = True, shift: float = 0) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim), diffusers' `get_timestep_embedding` (SD1.5: cos first, shift 0)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - shift))
    args = t.float()[:, None] * freqs[None]
    sin, cos = torch.sin(args), torch.cos(args)
    return torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, cin: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(cin, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb, cout)
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, temb):
        # SiLU and the skip add in place, no name holding a dead map (exact; docs/memory.md §4)
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]  # temb may have more rows than h
        h = F.silu(self.norm2(h), inplace=True)
        h = self.conv2(h)
        return h.add_(x if self.conv_shortcut is None else self.conv_shortcut(x))


class GEGLU(nn.Module):
    """`ff.net.0`: one projection to 2·inner, split into value and GELU gate."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU then a linear, over blocks of at most `ROWS` token rows: its (rows, 2·4·C) intermediate is the
    U-Net's largest activation (4 prompts at 64²: 16384 × 2560 floats, 168 MB fp32, three of them alive at
    once); in blocks it stays that of one 64² image whatever the batch, and the GEMMs keep their size."""

    ROWS = 4096  # one 64×64 latent's tokens

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, mult * dim), nn.Dropout(0.0), nn.Linear(mult * dim, dim)])

    def forward(self, x):  # (B, N, C) -> (B, N, C)
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] <= self.ROWS:
            return self.net[2](self.net[0](x))
        return torch.cat([self.net[2](self.net[0](r)) for r in rows.split(self.ROWS)]).reshape(x.shape)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int, upcast: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)  # eps 1e-5
        self.attn1 = Attention(dim, heads, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, context, store):
        x = x + self.attn1(self.norm1(x), store=store)
        x = x + self.attn2(self.norm2(x), context, store=store)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """GroupNorm (eps 1e-6) → 1×1 conv in → `depth` transformer blocks over the HW tokens → 1×1 conv out,
    + residual (SD1.5/SD2.x: one block; SDXL: 1, 2 or 10 per level). SD2.x and SDXL (`linear`): proj_in/proj_out
    are Linear layers applied to the tokens instead (the same map; the checkpoint stores [C, C] instead of
    [C, C, 1, 1])."""

    def __init__(self, dim: int, heads: int, context_dim: int, groups: int, linear: bool = False,
                 upcast: bool = False, depth: int = 1):
        super().__init__()
        self.linear = linear
        self.norm = nn.GroupNorm(groups, dim, eps=1e-6)
        self.proj_in = nn.Linear(dim, dim) if linear else nn.Conv2d(dim, dim, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(dim, heads, context_dim, upcast)
                                                 for _ in range(depth)])
        self.proj_out = nn.Linear(dim, dim) if linear else nn.Conv2d(dim, dim, 1)

    def forward(self, x, context, store):
        b, c, h, w = x.shape
        if self.linear:  # SD2.x: tokens first, then Linear
            t = self.proj_in(self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c))  # (B, HW, C)
        else:
            t = self.proj_in(self.norm(x)).permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, HW, C)
        for block in self.transformer_blocks:
            t = block(t, context, store)
        if self.linear:
            return x + self.proj_out(t).reshape(-1, h, w, c).permute(0, 3, 1, 2)
        return x + self.proj_out(t.reshape(-1, h, w, c).permute(0, 3, 1, 2))  # B grows at attn2 (UNet.forward)


def transformer(ch: int, cfg: UNetConfig, level: int) -> Transformer2DModel:
    """The Transformer2DModel of block level `level` (0 = the first down block): its head count and depth,
    and SD2.x's linear projections and float32 attention where the config says so."""
    return Transformer2DModel(ch, cfg.heads(level), cfg.cross_attention_dim, cfg.norm_num_groups,
                              linear=cfg.use_linear_projection, upcast=cfg.upcast_attention, depth=cfg.depth(level))


class Downsample2D(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    """CrossAttnDownBlock2D (with `attentions`) or DownBlock2D (without)."""

    def __init__(self, cin: int, cout: int, cfg: UNetConfig, attention: bool, downsample: bool, level: int):
        super().__init__()
        n, temb, g = cfg.layers_per_block, cfg.time_embed_dim, cfg.norm_num_groups
        self.resnets = nn.ModuleList([ResnetBlock2D(cin if i == 0 else cout, cout, temb, g, cfg.norm_eps) for i in range(n)])
        self.attentions = nn.ModuleList([transformer(cout, cfg, level) for _ in range(n)] if attention else [])
        self.downsamplers = nn.ModuleList([Downsample2D(cout)] if downsample else [])

    def forward(self, x, temb, context, store, skips: list):
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions:
                x = self.attentions[i](x, context, store)
            skips.append(x)
        for down in self.downsamplers:
            x = down(x)
            skips.append(x)
        return x


class UpBlock(nn.Module):
    """CrossAttnUpBlock2D or UpBlock2D: layers_per_block+1 resnets, each eating one skip tensor."""

    def __init__(self, cin: int, cout: int, prev: int, cfg: UNetConfig, attention: bool, upsample: bool, level: int):
        super().__init__()
        n, temb, g = cfg.layers_per_block + 1, cfg.time_embed_dim, cfg.norm_num_groups
        # resnet i sees (previous output | skip); the last skip comes from the level above (cin channels)
        self.resnets = nn.ModuleList([
            ResnetBlock2D((prev if i == 0 else cout) + (cin if i == n - 1 else cout), cout, temb, g, cfg.norm_eps)
            for i in range(n)])
        self.attentions = nn.ModuleList([transformer(cout, cfg, level) for _ in range(n)] if attention else [])
        self.upsamplers = nn.ModuleList([Upsample2D(cout)] if upsample else [])

    def forward(self, x, temb, context, store, skips: list):
        for i, resnet in enumerate(self.resnets):
            skip = skips.pop()  # conv_in's skip has batch 1 when the latents do (see UNet.forward)
            x = resnet(torch.cat([x, skip.expand(x.shape[0], -1, -1, -1)], dim=1), temb)
            if self.attentions:
                x = self.attentions[i](x, context, store)
        for up in self.upsamplers:
            x = up(x)
        return x


class MidBlock(nn.Module):
    """UNetMidBlock2DCrossAttn: resnet, transformer, resnet."""

    def __init__(self, ch: int, cfg: UNetConfig):
        super().__init__()
        g = cfg.norm_num_groups
        self.resnets = nn.ModuleList([ResnetBlock2D(ch, ch, cfg.time_embed_dim, g, cfg.norm_eps) for _ in range(2)])
        self.attentions = nn.ModuleList([transformer(ch, cfg, len(cfg.block_out_channels) - 1)])  # the deepest level's
        # heads and depth (SDXL: 20 heads, 10 blocks)

    def forward(self, x, temb, context, store):
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context, store)
        return self.resnets[1](x, temb)


class UNet(nn.Module):
    # the streaming grain (sd/stream.py `blocks`, docs/memory.md §2): these whole; every other module holding
    # parameters on its own, so each layer of a resnet (a 2560→1280 up resnet holds 49 M parameters, its conv1 30 M)
    stream_blocks: tuple[type[nn.Module], ...] = (Transformer2DModel, Downsample2D, Upsample2D, TimestepEmbedding)
    add_embedding: TimestepEmbedding  # SDXL only ("text_time")

    def __init__(self, cfg: UNetConfig = UNetConfig()):
        super().__init__()
        self.cfg = cfg
        ch = cfg.block_out_channels
        levels = len(ch)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], cfg.time_embed_dim)
        if cfg.addition_embed_type == "text_time" and cfg.projection_class_embeddings_input_dim:
            # SDXL: (pooled text | 6 embedded size numbers) 2816 -> 1280
            self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, cfg.time_embed_dim)
        # where the transformers are: SD1.5/SD2.x every level but the deepest (down) / the first (up); SDXL
        # not the first level (down) / the last (up)
        self.down_blocks = nn.ModuleList([
            DownBlock(ch[max(i - 1, 0)], ch[i], cfg, attention=cfg.down_attention[i], downsample=i < levels - 1,
                      level=i)
            for i in range(levels)])
        self.mid_block = MidBlock(ch[-1], cfg)
        rev = ch[::-1]
        self.up_blocks = nn.ModuleList([
            UpBlock(rev[min(i + 1, levels - 1)], rev[i], rev[max(i - 1, 0)], cfg, attention=cfg.up_attention[i],
                    upsample=i < levels - 1, level=levels - 1 - i)
            for i in range(levels)])
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)
        if max(cfg.depth(i) for i in range(levels)) > 1:
            # SDXL: a 10-deep 1280-wide transformer holds 350.8 M parameters (10 blocks of 34.8 M), too much to
            # fetch at once; its blocks are fetched one by one instead (its norm, proj_in, proj_out each on its own)
            self.stream_blocks = (BasicTransformerBlock, Downsample2D, Upsample2D, TimestepEmbedding)
        self._name_attention_layers()

    def _name_attention_layers(self):
        """Give every Attention its state-dict path and its level (latent size / its spatial size)."""
        levels = len(self.cfg.block_out_channels)
        for name, m in self.named_modules():
            if isinstance(m, Attention):
                m.name = name
                part, idx = name.split(".")[:2]
                depth = {"down_blocks": lambda i: i, "up_blocks": lambda i: levels - 1 - i,
                         "mid_block": lambda i: levels - 1}[part](int(idx) if idx.isdigit() else 0)
                m.level = 2 ** depth

    def attention_layers(self, kind: str | None = None, level: int | None = None) -> list[Attention]:
        """The attention layers in execution order (SD1.5/SD2.x: 32 at levels 1-8; SDXL: 140 at levels 2 and 4),
        optionally filtered by kind ("self"/"cross") and level."""
        return [m for m in self.modules() if isinstance(m, Attention)
                and (kind is None or m.kind == kind) and (level is None or m.level == level)]

    def text_time(self, text_embeds: torch.Tensor | None, time_ids: torch.Tensor | None,
                  dtype: torch.dtype) -> torch.Tensor:
        """SDXL's `add_embedding` input: the pooled text (B, P) beside the sinusoidal embedding of each time id
        (B or 1, 6: original height, width, crop top, left, target height, width) at addition_time_embed_dim
        wide, cos first as the timestep's (diffusers' parameterless `add_time_proj`): (B, P + 6·d), SDXL's
        d = 256 and P = 1280 giving projection_class_embeddings_input_dim 2816."""
        missing = [n for n, v in (("text_embeds", text_embeds), ("time_ids", time_ids)) if v is None]
        if missing or text_embeds is None or time_ids is None:
            raise ValueError(f"this U-Net (addition_embed_type 'text_time': SDXL) needs text_embeds (B, pooled width) "
                             f"and time_ids (B or 1, 6); {' and '.join(missing)} not given")
        ids = torch.as_tensor(time_ids, device=text_embeds.device)
        ids = ids.reshape(ids.shape[0] if ids.ndim > 1 else 1, -1)  # (B or 1, 6)
        d = self.cfg.addition_time_embed_dim
        assert d is not None  # UNetConfig requires it with "text_time"
        times = timestep_embedding(ids.reshape(-1), d, self.cfg.flip_sin_to_cos, self.cfg.freq_shift)
        times = times.reshape(ids.shape[0], -1)  # (B or 1, 6·d), float32
        rows = max(len(times), len(text_embeds))
        width = text_embeds.shape[-1] + times.shape[-1]
        if {len(times), len(text_embeds)} - {1, rows} or width != self.cfg.projection_class_embeddings_input_dim:
            raise ValueError(f"text_embeds {tuple(text_embeds.shape)} and time_ids {tuple(ids.shape)}: expected B or 1 "
                             f"rows each and {self.cfg.projection_class_embeddings_input_dim} features together "
                             f"(pooled width + {ids.shape[-1]}·{d}), got {width}")
        return torch.cat([text_embeds.to(dtype).expand(rows, -1), times.to(dtype).expand(rows, -1)], dim=-1)

    def forward(self, latents: torch.Tensor, t, context: torch.Tensor, store: AttentionStore | None = None,
                output: bool = True, text_embeds: torch.Tensor | None = None,
                time_ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """latents (B or 1, 4, h, w), t: int or (B,), context (B, 77, 768 | 1024 | 2048) -> ε (B, 4, h, w).

        The batch broadcasts: with one latent for B prompts (one image, one prompt per class), all
        that comes before the first cross-attention (conv_in, the first resnet, the first
        self-attention: ~5 % of a pass) runs once, and the batch grows to B where the text enters.
        `store` records attention (see attention.py); `output=False` skips conv_norm_out/conv_out
        and returns None, for when only the attention is wanted.
        SDXL (addition_embed_type "text_time") also needs `text_embeds` (B or 1, pooled width: 1280) and
        `time_ids` (B or 1, 6); with B rows of text_embeds the batch grows at the first resnet instead, whose
        time embedding then has B rows.
        """
        t = torch.as_tensor(t, device=latents.device).reshape(-1)
        t = t.expand(latents.shape[0]) if t.numel() == 1 else t  # (1 or B,): broadcasts like the latents
        temb = self.time_embedding(timestep_embedding(t, self.cfg.block_out_channels[0], self.cfg.flip_sin_to_cos,
                                                      self.cfg.freq_shift).to(latents.dtype))  # (1 or B, 1280)
        if self.cfg.addition_embed_type == "text_time":
            temb = temb + self.add_embedding(self.text_time(text_embeds, time_ids, temb.dtype))  # (B, 1280)
        elif text_embeds is not None or time_ids is not None:
            raise ValueError("text_embeds/time_ids given to a U-Net without SDXL's additional embedding "
                             "(addition_embed_type None): they would be ignored")
        x = self.conv_in(latents)
        if store is not None:
            store.latent_hw = (latents.shape[-2], latents.shape[-1])
        skips = [x]  # the skip stack: every resnet/transformer/downsample output of the down path
        for block in self.down_blocks:
            x = block(x, temb, context, store, skips)
        x = self.mid_block(x, temb, context, store)
        for block in self.up_blocks:
            x = block(x, temb, context, store, skips)
        if not output:
            return None
        return self.conv_out(F.silu(self.conv_norm_out(x)))
