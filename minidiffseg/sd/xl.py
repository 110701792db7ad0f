"""SDXL (and SDXL-Turbo) as the method sees it: the second implementation of the backbone contract
(minidiffseg/backbone.py), beside Stable Diffusion 1.5 / 2.x (sd/backbone.py). docs/sdxl.md says what
differs and which choices the method makes on it.

What SDXL conditions its U-Net on, for one prompt:
- the per-token states: CLIP ViT-L's (`text_encoder`) and OpenCLIP bigG's (`text_encoder_2`) hidden
  states after all but their last layer, before the final LayerNorm, side by side: 768 + 1280 = 2048 wide;
- a pooled embedding: bigG's last layer, final LayerNorm, at the EOS token, through its projection (1280);
- six "time ids": the original image size (h, w), the crop's top-left corner, the target size (h, w),
  which the U-Net embeds and adds, with the pooled embedding, to its timestep embedding.

The two tokenizers share CLIP's BPE and differ only in padding (CLIP-L's with EOS, bigG's with "!", id 0),
so a class word's token positions are the same in both rows: `tokenizer` (CLIP-L's) locates them.

The image the method segments is stretched to the model's square (1024², SDXL-Turbo 512²) and seen
whole, so its time ids are those of an uncropped image generated at that size: (r, r, 0, 0, r, r).
The noise is DDPM's at t = 100, SDXL's training schedule being SD's (scaled-linear betas 0.00085-0.012).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..backbone import TextEncoding
from .attention import AttentionStore
from .backbone import UNetBackbone
from .clip import CLIPTextModel, CLIPTextModelWithProjection
from .schedule import NoiseSchedule
from .tokenizer import CLIPTokenizer
from .unet import UNet
from .vae import VAEEncoder


@dataclass
class StableDiffusionXL(UNetBackbone):
    """The networks of one SDXL checkpoint (sd/checkpoint.py loads them)."""

    tokenizer: CLIPTokenizer  # CLIP-L's: pads with EOS
    tokenizer_2: CLIPTokenizer  # bigG's: pads with "!"
    text_encoder: CLIPTextModel  # CLIP ViT-L/14
    text_encoder_2: CLIPTextModelWithProjection  # OpenCLIP ViT-bigG/14 with its projection
    vae: VAEEncoder
    unet: UNet
    schedule: NoiseSchedule
    name: str = "SDXL (1024²)"
    kind: str = "sdxl"  # "sdxl", or "sdxl-turbo" (sd/checkpoint.py `model_kind`)
    resolution: int = 1024  # the image side it was trained at (SDXL-Turbo: 512)

    @property
    def upcast_vae(self) -> bool:
        """Whether the VAE computes in float32 when the rest computes in float16 (its config's `force_upcast`)."""
        return self.vae.cfg.force_upcast

    def networks(self) -> dict[str, nn.Module]:
        return {"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2, "vae": self.vae,
                "unet": self.unet}

    def encode_text(self, texts: list[str]) -> TextEncoding:
        """Prompts -> states (B, 77, 768 + 1280), CLIP-L's then bigG's penultimate hidden states, and the pooled
        embedding (B, 1280)."""
        states_l = self.text_encoder.penultimate(self.tokenizer(texts).to(self.device))  # (B, 77, 768)
        states_g, pooled = self.text_encoder_2(self.tokenizer_2(texts).to(self.device))  # (B, 77, 1280), (B, 1280)
        return TextEncoding(torch.cat([states_l, states_g], dim=-1), pooled)

    def encode_image(self, x: torch.Tensor, generator: torch.Generator | None, sample: bool = True) -> torch.Tensor:
        """x (1, 3, H, W) in [-1, 1] -> z0 (1, 4, H/8, W/8) scaled by 0.13025, in the U-Net's dtype; the VAE computes
        in its own dtype (float32 where its config says `force_upcast` and the rest is float16: sd/checkpoint.py)."""
        return self.vae.encode(x, generator=generator, sample=sample).to(self.dtype)

    def time_ids(self, z: torch.Tensor) -> torch.Tensor:
        """(1, 6): original size, crop top-left, target size of a whole image of the latent's size × 8."""
        h, w = 8 * z.shape[-2], 8 * z.shape[-1]
        return torch.tensor([[h, w, 0, 0, h, w]], device=z.device, dtype=z.dtype)

    def denoise(self, z_t: torch.Tensor, t: int, text: TextEncoding, store: AttentionStore | None) -> None:
        """One U-Net pass recording into `store`; its ε is not computed (the last norm and conv skipped)."""
        self.unet(z_t, t, text.states, store=store, output=False, text_embeds=text.pooled, time_ids=self.time_ids(z_t))
