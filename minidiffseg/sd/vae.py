"""The encoder half of SD1.5's VAE (diffusers `AutoencoderKL`: `encoder.…` + `quant_conv`).

Image x in [-1, 1] (B, 3, H, W) -> moments (B, 8, H/8, W/8) = (mean, logvar) of a diagonal Gaussian
-> latent = scaling_factor · (mean + std · ε), or scaling_factor · mean. The decoder and
`post_quant_conv` are never built: segmentation needs only the latent of the input image.

Every GroupNorm of the VAE uses eps 1e-6 (diffusers `Encoder` passes resnet_eps=1e-6 to its blocks,
and the mid-block attention reuses the resnet eps), unlike the U-Net's 1e-5.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from .config import VAEConfig

EPS = 1e-6  # GroupNorm eps everywhere in the VAE (see module docstring)

# legacy diffusers names of the mid-block attention projections -> current names


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice plus a skip (1×1 conv when the width changes); no time embedding."""

    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=EPS)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, c_out, eps=EPS)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # at most three maps alive at once — x (kept for the skip), a conv's input and its output, 64 MiB
        # each in bf16 in the first 512² block: SiLU and the skip add in place (exact), no name holds a dead map
        h = F.silu(self.norm2(self.conv1(F.silu(self.norm1(x), inplace=True))), inplace=True)
        h = self.conv2(h)
        return h.add_(x if self.conv_shortcut is None else self.conv_shortcut(x))


class Downsample(nn.Module):
    """Stride-2 3×3 conv after padding one zero row/column at the bottom/right only: the VAE's
    convs have padding 0 and an explicit asymmetric F.pad (0, 1, 0, 1) (diffusers `Downsample2D`
    with padding=0), unlike the U-Net's symmetric padding 1."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H, W) -> (B, C, H/2, W/2)


class DownEncoderBlock(nn.Module):
    """Resnets, then a downsampler: a container whose blocks Encoder.forward runs in its own loop."""

    def __init__(self, c_in: int, c_out: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(c_in if i == 0 else c_out, c_out, groups) for i in range(layers))
        self.downsamplers = nn.ModuleList([Downsample(c_out)] if downsample else [])


class SpatialSelfAttention(nn.Module):
    """One head over all channels (512 at full size) and all positions, plus the residual
    (diffusers `Attention` with heads=1, a GroupNorm in front, residual_connection=True)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # to_out.1 is a parameterless dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = (p(h).unsqueeze(1) for p in (self.to_q, self.to_k, self.to_v))  # (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # (B, HW, C), scale C**-0.5
        h = self.to_out[0](h).transpose(1, 2).reshape(B, C, H, W)
        return x + h


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups), ResnetBlock(channels, channels, groups)])
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in (self.resnets[0], self.attentions[0], self.resnets[1]):
            x = block(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        c_in = (widths[0], *widths[:-1])  # each block takes the previous block's width
        self.down_blocks = nn.ModuleList(  # the last block does not downsample: 3 halvings, 512 -> 64
            DownEncoderBlock(c_in[i], w, cfg.layers_per_block, groups, downsample=i < len(widths) - 1)
            for i, w in enumerate(widths))
        self.mid_block = MidBlock(widths[-1], groups)
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=EPS)
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.latent_channels, 3, padding=1)  # mean and logvar

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)  # (B, 128, H, W)
        # cast: a ModuleList's items are typed nn.Module; these are the DownEncoderBlocks built above
        for down in cast("Iterable[DownEncoderBlock]", self.down_blocks):  # 3 downsamples: (B, 512, H/8, W/8)
            for block in (*down.resnets, *down.downsamplers):  # one loop, so no caller holds a dead input
                x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, 8, H/8, W/8)


class VAEEncoder(nn.Module):
    """`encoder` + `quant_conv` of diffusers' AutoencoderKL (SD3's: no quant_conv); state-dict keys equal theirs."""

    # the streaming grain (sd/stream.py `blocks`): these, and the convs / the final norm on their own
    stream_blocks = (ResnetBlock, Downsample, SpatialSelfAttention)

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1) if cfg.use_quant_conv else None

    def moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x in [-1, 1] (B, 3, H, W) -> mean, logvar, each (B, latent_channels, H/8, W/8)."""
        # channels-last activations: oneDNN's CPU convolutions at 512² run ~11 % (fp32) / ~15 % (bf16) faster
        # so (measured, bench/README.md); the weights stay as loaded (memory-mapped), the result contiguous
        x = x.to(self.encoder.conv_in.weight.dtype).contiguous(memory_format=torch.channels_last)
        h = self.encoder(x)  # (B, 2·latent_channels, H/8, W/8)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = h.contiguous().chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # the clamp of diffusers' DiagonalGaussianDistribution

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True) -> torch.Tensor:
        """x in [-1, 1] (B, 3, H, W) -> scaled latent (B, latent_channels, H/8, W/8).

        sample=True draws the posterior sample as diffusers' `DiagonalGaussianDistribution.sample`
        does: one `torch.randn` of the whole (B, 4, h, w) shape on the generator's device, in the
        moments' dtype, so the same seeded generator gives the same latent as diffusers.
        """
        mean, logvar = self.moments(x)
        if sample:
            device = generator.device if generator is not None else mean.device
            noise = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype).to(mean.device)
            mean = mean + torch.exp(0.5 * logvar) * noise
        if self.cfg.shift_factor is not None:  # SD3: (z − shift) · scale
            mean = mean - self.cfg.shift_factor
        return self.cfg.scaling_factor * mean
