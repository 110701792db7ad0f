"""The contract between the method and a diffusion model: what DiffSegmenter needs from a backbone, and
nothing more (docs/design.md §2). `Segmenter` (method/segmenter.py) talks to its model only through it;
Stable Diffusion 1.5 / 2.x (minidiffseg/sd/backbone.py) is the first implementation, SDXL
(minidiffseg/sd/xl.py) the second.

A backbone
- encodes an image in [-1, 1] to a latent, and prompt rows to the denoiser's text conditioning
  (`TextEncoding`: the per-token states the cross-attention reads, which the method's "++" re-weights,
  and a pooled embedding where the denoiser takes one, SDXL's); its `tokenizer` says where each class
  word's tokens are (method/prompts.py locates them);
- noises a latent at a timestep, and runs one denoiser pass with an attention store (sd/attention.py)
  that records what the method asks for;
- lists its attention layers (`AttentionLayer`: name, kind, grid level, heads), from which the method's
  recipe (method/recipe.py) picks the layers it reads;
- names its networks (for moving them between devices and dtypes) and its kind, from which the
  default recipe is chosen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn


@dataclass(frozen=True)
class TextEncoding:
    """What a backbone's denoiser is conditioned on for B prompt rows."""

    states: torch.Tensor  # (B, T, D) per-token states, the keys and values of the cross-attention
    pooled: torch.Tensor | None = None  # (B, P) one vector per row (SDXL: bigG's projected EOS state); else None


@dataclass(frozen=True)
class AttentionLayer:
    """One attention layer of the denoiser, as the method sees it."""

    name: str  # its state-dict path, e.g. "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    kind: str  # "cross" (queries from the image, keys from the text), "self", or "joint" (an MM-DiT's: image and
    # text tokens attend to each other at once; the method reads its image rows as both, sd/attention.py)
    level: int  # the latent grid's side over this layer's (1 = the finest, 64² for a 512² image; an MM-DiT's: 2)
    heads: int
    block: int | None = None  # a diffusion transformer's block index (transformer_blocks.N); U-Nets: None


class Backbone(Protocol):
    name: str  # for people: "SD1.5", "SD2.x-base (512², ε-prediction)", "SDXL (1024²)", ...
    kind: str  # for code: "sd1", "sd2-base", "sd2-v", "sd2", "sdxl", "sdxl-turbo"
    tokenizer: object  # `__call__(texts) -> (B, 77) ids`, `encode`, `max_length`: sd/tokenizer.py's interface

    @property
    def resolution(self) -> int: ...  # the image side the model was trained at

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def networks(self) -> dict[str, nn.Module]: ...

    def attention_layers(self) -> list[AttentionLayer]: ...

    def encode_text(self, texts: list[str]) -> TextEncoding: ...  # the denoiser's conditioning, B rows

    def encode_image(self, x: torch.Tensor, generator: torch.Generator | None, sample: bool = True
                     ) -> torch.Tensor: ...  # x (1, 3, H, W) in [-1, 1] -> z0 (1, c, h, w)

    def add_noise(self, z0: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor: ...

    def denoise(self, z_t: torch.Tensor, t: int, text: TextEncoding, store) -> None: ...
