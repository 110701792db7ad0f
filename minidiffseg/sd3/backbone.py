"""SD3 and SD3.5 as the method sees it: the third implementation of the backbone contract
(minidiffseg/backbone.py), a diffusion transformer beside the U-Nets (sd/backbone.py, sd/xl.py).
docs/sd3.md says what differs and which choices the method makes on it.

What SD3 conditions its MM-DiT on, for one prompt (diffusers' StableDiffusion3Pipeline.encode_prompt):
- the text tokens: CLIP ViT-L's (`text_encoder`) and OpenCLIP bigG's (`text_encoder_2`) hidden states after
  all but their last layer, side by side (768 + 1280 = 2048), zero-padded to T5's width (4096): 77 tokens;
  then T5-XXL's encoder states (`text_encoder_3`) for its own tokenization of the prompt, `max_sequence_length`
  tokens (256). Without T5's files, zeros in their place, as diffusers does when it has no third encoder;
- the pooled embedding: both towers' projected EOS states side by side (768 + 1280 = 2048).
No attention mask anywhere: the padding tokens are read like the others.

The two CLIP tokenizers share CLIP's BPE and differ only in padding, so a class word's positions among the
first 77 text tokens are those `tokenizer` (CLIP-L's) finds; T5's tokens follow them.

The image is VAE-encoded to 16 channels, shifted and scaled, (z − 0.0609)·1.5305, and noised along the
flow's line, x_σ = (1 − σ)·x0 + σ·ε, with the model's timestep 1000·σ (sd/schedule.py FlowMatchSchedule).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import AttentionLayer, TextEncoding
from ..sd.attention import AttentionStore
from ..sd.clip import CLIPTextModelWithProjection
from ..sd.schedule import FlowMatchSchedule
from ..sd.tokenizer import CLIPTokenizer
from ..sd.vae import VAEEncoder
from .mmdit import MMDiT
from .t5 import T5Encoder
from .t5_tokenizer import T5Tokenizer

MAX_SEQUENCE_LENGTH = 256  # T5 tokens per prompt: StableDiffusion3Pipeline's `max_sequence_length` default


@dataclass
class StableDiffusion3:
    """The networks of one SD3 / SD3.5 checkpoint (sd3/checkpoint.py loads them). `text_encoder_3` and
    `tokenizer_3` are both present (T5) or both None (zeros in T5's place)."""

    tokenizer: CLIPTokenizer  # CLIP-L's: pads with EOS
    tokenizer_2: CLIPTokenizer  # bigG's: pads with "!"
    tokenizer_3: T5Tokenizer | None
    text_encoder: CLIPTextModelWithProjection  # CLIP ViT-L/14 with its projection
    text_encoder_2: CLIPTextModelWithProjection  # OpenCLIP ViT-bigG/14 with its projection
    text_encoder_3: T5Encoder | None  # T5 v1.1 XXL's encoder
    vae: VAEEncoder
    transformer: MMDiT
    schedule: FlowMatchSchedule
    name: str = "SD3 (1024²)"
    kind: str = "sd3"  # "sd3", or "sd35" (qk RMSNorm: SD3.5's; sd3/checkpoint.py `model_kind`)
    resolution: int = 1024  # the image side it was trained at

    @property
    def max_sequence_length(self) -> int:
        """T5's tokens per prompt (its tokenizer's row length), also without T5: the zeros in their place."""
        return self.tokenizer_3.max_length if self.tokenizer_3 is not None else MAX_SEQUENCE_LENGTH

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @property
    def upcast_vae(self) -> bool:
        """Whether the VAE computes in float32 when the rest computes in float16 (its config's `force_upcast`)."""
        return self.vae.cfg.force_upcast

    @property
    def t5(self) -> bool:
        """Whether T5's states condition the transformer (else zeros stand in for them)."""
        return self.text_encoder_3 is not None

    def networks(self) -> dict[str, nn.Module]:
        nets: dict[str, nn.Module] = {"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}
        if self.text_encoder_3 is not None:
            nets["text_encoder_3"] = self.text_encoder_3
        return {**nets, "vae": self.vae, "transformer": self.transformer}

    def attention_layers(self) -> list[AttentionLayer]:
        """The transformer's attention layers in execution order: one joint attention per block (SD3-medium: 24),
        and SD3.5-medium's image-only `attn2` in its dual-attention blocks (kind "self")."""
        return [AttentionLayer(m.name, m.kind, m.level, m.heads, int(m.name.split(".")[1]))
                for m in self.transformer.attention_layers()]

    def encode_text(self, texts: list[str]) -> TextEncoding:
        """Prompts -> states (B, 77 + L, 4096): CLIP-L ‖ bigG penultimate states zero-padded to 4096, then T5's L
        tokens (zeros without T5); pooled (B, 768 + 1280)."""
        states_l, pooled_l = self.text_encoder(self.tokenizer(texts).to(self.device))  # (B, 77, 768), (B, 768)
        states_g, pooled_g = self.text_encoder_2(self.tokenizer_2(texts).to(self.device))  # (B, 77, 1280), (B, 1280)
        width = self.transformer.cfg.joint_attention_dim  # 4096
        clip = F.pad(torch.cat([states_l, states_g], dim=-1), (0, width - states_l.shape[-1] - states_g.shape[-1]))
        if self.text_encoder_3 is not None and self.tokenizer_3 is not None:
            t5 = self.text_encoder_3(self.tokenizer_3(texts).to(self.device)).to(clip.dtype)  # (B, L, 4096)
        else:
            t5 = clip.new_zeros((len(texts), self.max_sequence_length, width))
        return TextEncoding(torch.cat([clip, t5], dim=1), torch.cat([pooled_l, pooled_g], dim=-1))

    def encode_image(self, x: torch.Tensor, generator: torch.Generator | None, sample: bool = True) -> torch.Tensor:
        """x (1, 3, H, W) in [-1, 1] -> z0 (1, 16, H/8, W/8), (z − shift)·scale, in the transformer's dtype."""
        return self.vae.encode(x, generator=generator, sample=sample).to(self.dtype)

    def add_noise(self, z0: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
        """x_σ = (1 − σ)·z0 + σ·ε with σ = t / 1000."""
        return self.schedule.add_noise(z0, noise, t)

    def denoise(self, z_t: torch.Tensor, t: int, text: TextEncoding, store: AttentionStore | None) -> None:
        """One transformer pass recording into `store`; its velocity is not computed (the last norm and
        projection skipped)."""
        self.transformer(z_t, t, text.states, text.pooled, store=store, output=False)
