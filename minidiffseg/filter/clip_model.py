"""CLIP (openai/clip-vit-large-patch14) for zero-shot class scores: the ViT-L/14 image tower at
224², the text tower shared with SD1.5's text encoder, and the two projections into the joint
space (docs/design.md §3 "CLIP vision tower").

Module names equal transformers' `CLIPModel` (`vision_model.…` — note its `pre_layrnorm`
spelling —, `text_model.…`, `visual_projection`, `text_projection`, `logit_scale`), minus the
`position_ids` buffers, which old files carry and we do not build. Both towers run the same
pre-LayerNorm QuickGELU blocks (`minidiffseg.clip.CLIPEncoder`); only the text tower is causal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..sd.clip import CLIPEncoder, CLIPTextTransformer
from ..sd.config import CLIPTextConfig, _pick
from ..errors import UserError
from ..image import load_image, to_tensor
from ..sd.tokenizer import CLIPTokenizer
from .checkpoint import HubModel, check_folder, load_weights, resolve_folder

WHAT, HUB_ID = "CLIP model", "openai/clip-vit-large-patch14"
# OpenAI CLIP's pixel statistics (its preprocessing; transformers' OPENAI_CLIP_MEAN / _STD)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class CLIPVisionConfig:
    """ViT-L/14 at 224² (clip-vit-large-patch14 `vision_config`)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    layer_norm_eps: float = 1e-5


@dataclass(frozen=True)
class CLIPConfig:
    text: CLIPTextConfig = field(default_factory=CLIPTextConfig)
    vision: CLIPVisionConfig = field(default_factory=CLIPVisionConfig)
    projection_dim: int = 768  # width of the joint image-text space

    @classmethod
    def from_transformers(cls, cfg: dict) -> "CLIPConfig":
        return cls(CLIPTextConfig.from_transformers(cfg), _pick(CLIPVisionConfig, cfg.get("vision_config") or {}),
                   cfg.get("projection_dim", 768))

    @classmethod
    def tiny(cls) -> "CLIPConfig":
        return cls(CLIPTextConfig.tiny(),
                   CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, image_size=56, patch_size=14),
                   projection_dim=16)


def normalize_pixels(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (1, 3, H, W): [0, 1], then CLIP's mean/std per channel."""
    x = to_tensor(image)
    return (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def clip_preprocess(image: Image.Image, size: int = 224) -> torch.Tensor:
    """PIL image -> (1, 3, size, size) as transformers' CLIPImageProcessor: shorter side to `size`
    (bicubic, the longer side truncated to an int), centre crop, [0, 1], CLIP mean/std."""
    w, h = image.size
    w, h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    top, left = (h - size) // 2, (w - size) // 2
    image = image.convert("RGB").resize((w, h), Image.Resampling.BICUBIC).crop((left, top, left + size, top + size))
    return normalize_pixels(image)


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        D = cfg.hidden_size
        self.class_embedding = nn.Parameter(torch.zeros(D))
        self.patch_embedding = nn.Conv2d(3, D, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding((cfg.image_size // cfg.patch_size) ** 2 + 1, D)  # +1: class token

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # (B, N, D)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)  # (B, 1, D)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight  # (B, 1+N, D)


class CLIPVisionTransformer(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic: transformers' name
        self.encoder = CLIPEncoder(cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size,
                                   cfg.num_hidden_layers, cfg.layer_norm_eps)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.encoder(self.pre_layrnorm(self.embeddings(pixels)))  # (B, 1+N, D), not causal
        return self.post_layernorm(x[:, 0])  # (B, D): the class token is the image's summary


class CLIPModel(HubModel):
    IGNORED = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.text_model = CLIPTextTransformer(cfg.text)
        self.vision_model = CLIPVisionTransformer(cfg.vision)
        self.visual_projection = nn.Linear(cfg.vision.hidden_size, cfg.projection_dim, bias=False)
        self.text_projection = nn.Linear(cfg.text.hidden_size, cfg.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.zeros(()))  # log of the softmax temperature's inverse

    def image_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, 224, 224) -> unit-norm image embeddings (B, projection_dim)."""
        return F.normalize(self.visual_projection(self.vision_model(pixels)), dim=-1)

    def text_embeds(self, ids: torch.Tensor, eos_id: int) -> torch.Tensor:
        """(B, 77) token rows -> unit-norm text embeddings (B, projection_dim), read at each row's
        first EOS (rows are padded with EOS, so that is the end of the text)."""
        x = self.text_model(ids)  # (B, 77, C)
        x = x[torch.arange(x.shape[0]), (ids == eos_id).int().argmax(dim=1)]  # (B, C)
        return F.normalize(self.text_projection(x), dim=-1)

    def logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """(B_img, P), (B_txt, P) -> logits per image (B_img, B_txt) = exp(logit_scale) · cosine."""
        return self.logit_scale.exp() * image_embeds @ text_embeds.T

    @classmethod
    def from_pretrained(cls, folder: str | Path, device="cpu", dtype=torch.float32) -> "CLIPModel":
        """Strict load of a hub folder (model.safetensors [+ config.json]) on a meta-built model."""
        return load_weights(cls, CLIPConfig, folder, WHAT, HUB_ID, device, dtype)


class ZeroShotCLIP:
    """Zero-shot class scores: cosine similarity of the image with "a photo of a {c}." for every
    class name. Text embeddings of a vocabulary are computed once and reused for every image."""

    def __init__(self, model: CLIPModel, tokenizer: CLIPTokenizer, template: str = "a photo of a {}."):
        self.model, self.tokenizer, self.template = model, tokenizer, template  # template: CLIP paper's
        self._text: dict[tuple[str, ...], torch.Tensor] = {}

    @classmethod
    def from_pretrained(cls, folder: str | Path, device="cpu", dtype=torch.float32) -> "ZeroShotCLIP":
        folder = resolve_folder(folder, HUB_ID)  # a folder, or the hub id: its copy in the cache
        check_folder(folder, WHAT, HUB_ID)  # all files are checked before the slow part
        missing = [n for n in ("vocab.json", "merges.txt") if not (folder / n).is_file()]
        if missing:
            raise UserError(f"{folder} lacks the tokenizer file(s) {', '.join(missing)}: download them "
                            f"from {HUB_ID} next to model.safetensors")
        tokenizer = CLIPTokenizer.from_dir(folder)
        return cls(CLIPModel.from_pretrained(folder, device, dtype), tokenizer)

    @torch.no_grad()
    def text_embeds(self, names: tuple[str, ...]) -> torch.Tensor:
        if names not in self._text:
            ids = self.tokenizer([self.template.format(n) for n in names])  # (C, 77)
            self._text[names] = self.model.text_embeds(ids.to(self.model.logit_scale.device), self.tokenizer.eos_id)
        return self._text[names]  # (C, P)

    @torch.no_grad()
    def scores(self, image: str | Path | Image.Image, names: list[str] | tuple[str, ...]) -> torch.Tensor:
        """Cosine similarities (C,) of the image with each class prompt, in [-1, 1]."""
        w = self.model.visual_projection.weight
        pixels = clip_preprocess(load_image(image), self.model.cfg.vision.image_size).to(w.device, w.dtype)
        return (self.model.image_embeds(pixels) @ self.text_embeds(tuple(names)).T)[0].float()
