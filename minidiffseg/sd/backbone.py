"""Stable Diffusion 1.5 / 2.x as the method sees it: the networks of one checkpoint (sd/checkpoint.py loads
them) behind the backbone contract (minidiffseg/backbone.py); `UNetBackbone`, what it shares with SDXL's
(sd/xl.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..backbone import AttentionLayer, TextEncoding
from .attention import AttentionStore
from .clip import CLIPTextModel
from .schedule import NoiseSchedule
from .tokenizer import CLIPTokenizer
from .unet import UNet
from .vae import VAEEncoder


class UNetBackbone:
    """What the backbones built on a U-Net and SD's DDPM schedule share (StableDiffusion here, StableDiffusionXL
    in sd/xl.py): their device and dtype are the U-Net's, their attention layers the U-Net's, their noise DDPM's."""

    unet: UNet
    schedule: NoiseSchedule

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def attention_layers(self) -> list[AttentionLayer]:
        """The U-Net's attention layers in execution order (SD1.5/SD2.x: 16 self, 16 cross; SDXL: 70 of each)."""
        return [AttentionLayer(m.name, m.kind, m.level, m.heads) for m in self.unet.attention_layers()]

    def add_noise(self, z0: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
        """z_t = √ᾱ_t z0 + √(1 − ᾱ_t) ε (DDPM, 1000 steps)."""
        return self.schedule.add_noise(z0, noise, t)


@dataclass
class StableDiffusion(UNetBackbone):
    """The networks of one checkpoint. `name` says which Stable Diffusion it is, as its configs and shapes
    tell (`model_name`): "SD1.5", "SD2.x-base (512², ε-prediction)", "SD2.x (768², v-prediction)", ..."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: VAEEncoder
    unet: UNet
    schedule: NoiseSchedule
    name: str = "SD1.5"
    kind: str = "sd1"  # which model, as `model_kind` reads it: "sd1", "sd2" (a single file), "sd2-base", "sd2-v"

    @property
    def resolution(self) -> int:
        """The image side the U-Net was trained at: its latent sample_size × the VAE's downsampling (8)."""
        return self.unet.cfg.sample_size * 2 ** (len(self.vae.cfg.block_out_channels) - 1)

    def networks(self) -> dict[str, nn.Module]:
        return {"text_encoder": self.text_encoder, "vae": self.vae, "unet": self.unet}

    def encode_text(self, texts: list[str]) -> TextEncoding:
        """Prompts -> the U-Net's context (B, 77, 768 | 1024): CLIP's last (SD2.x: penultimate) hidden states."""
        return TextEncoding(self.text_encoder(self.tokenizer(texts).to(self.device)))

    def encode_image(self, x: torch.Tensor, generator: torch.Generator | None, sample: bool = True) -> torch.Tensor:
        """x (1, 3, H, W) in [-1, 1] -> z0 (1, 4, H/8, W/8), scaled by 0.18215 (a posterior sample or its mean)."""
        return self.vae.encode(x, generator=generator, sample=sample)

    def denoise(self, z_t: torch.Tensor, t: int, text: TextEncoding, store: AttentionStore | None) -> None:
        """One U-Net pass recording into `store`; its ε is not computed (the last norm and conv skipped)."""
        self.unet(z_t, t, text.states, store=store, output=False)
