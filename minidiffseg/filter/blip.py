"""BLIP captioner (Salesforce/blip-image-captioning-large): ViT-L/16 image encoder at 384², a
BERT-base text decoder with causal self-attention and cross-attention to the image tokens, and
greedy decoding with a KV cache (docs/design.md §3, §5 "BLIP" row).

Module names equal transformers' `BlipForConditionalGeneration` (`vision_model.…`,
`text_decoder.bert.…`, `text_decoder.cls.…`), so strict `load_state_dict` is the loader.

Captioning as the official DiffSegmenter code runs it through transformers: the prefix is
tokenised, [DEC] replaces [CLS] and the trailing [SEP] is dropped, so the decoder starts from
`[DEC] prefix…`; greedy decoding stops at [SEP] or when the sequence (prefix included) reaches
`max_length` 20 (transformers' default); the caption is the decoded sequence, prefix included.
An empty prefix is unconditional captioning. Several prefixes for one image share one image
encoding: they run as one left-padded batch (pad keys masked, positions counted from each row's
first real token), so each row computes what it would alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image
from torch import nn

from ..sd.config import _pick
from ..image import load_image
from .checkpoint import HubModel, check_folder, load_weights, resolve_folder
from .clip_model import normalize_pixels
from .wordpiece import WordPieceTokenizer

WHAT, HUB_ID = "BLIP captioner", "Salesforce/blip-image-captioning-large"


@dataclass(frozen=True)
class BlipVisionConfig:
    """ViT-L/16 at 384² (blip-image-captioning-large `vision_config`)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 384
    patch_size: int = 16
    layer_norm_eps: float = 1e-5


@dataclass(frozen=True)
class BlipTextConfig:
    """BERT-base decoder (blip-image-captioning-large `text_config`)."""

    vocab_size: int = 30524  # bert-base-uncased's 30522 + [DEC] + [ENC]
    hidden_size: int = 768
    encoder_hidden_size: int = 1024  # width of the image tokens = vision hidden_size
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12  # BERT's
    bos_token_id: int = 30522  # [DEC]
    sep_token_id: int = 102  # [SEP] ends a caption
    pad_token_id: int = 0  # [PAD]


@dataclass(frozen=True)
class BlipConfig:
    vision: BlipVisionConfig = field(default_factory=BlipVisionConfig)
    text: BlipTextConfig = field(default_factory=BlipTextConfig)

    @classmethod
    def from_transformers(cls, cfg: dict) -> "BlipConfig":
        vision = _pick(BlipVisionConfig, cfg.get("vision_config") or {})
        text = cfg.get("text_config") or {}
        # transformers overwrites encoder_hidden_size with the vision width; so do we
        text = _pick(BlipTextConfig, {**text, "encoder_hidden_size": vision.hidden_size})
        return cls(vision, text)

    @classmethod
    def tiny(cls) -> "BlipConfig":
        # the vocabulary stays real-sized so that real tokenizer ids are valid inputs
        return cls(BlipVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, image_size=64, patch_size=16),
                   BlipTextConfig(hidden_size=32, encoder_hidden_size=48, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64))


def blip_preprocess(image: Image.Image, size: int = 384) -> torch.Tensor:
    """PIL image -> (1, 3, size, size): stretch to a square (bicubic, aspect ratio ignored),
    scale to [0, 1], normalise with CLIP's mean/std, as transformers' BlipImageProcessor."""
    return normalize_pixels(image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC))


# ---------------------------------------------------------------- image encoder (pre-norm ViT)

class BlipVisionEmbeddings(nn.Module):
    def __init__(self, cfg: BlipVisionConfig):
        super().__init__()
        D = cfg.hidden_size
        num_positions = (cfg.image_size // cfg.patch_size) ** 2 + 1  # patches + class token
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, D))
        self.patch_embedding = nn.Conv2d(3, D, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, num_positions, D))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # (B, N, D)
        cls = self.class_embedding.expand(x.shape[0], -1, -1)  # (B, 1, D)
        return torch.cat([cls, x], dim=1) + self.position_embedding  # (B, 1+N, D)


class BlipAttention(nn.Module):
    """ViT self-attention with a fused q/k/v projection."""

    def __init__(self, cfg: BlipVisionConfig):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.projection = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, d)
        return self.projection(rearrange(out, "b h n d -> b n (h d)"))


class BlipMLP(nn.Module):
    def __init__(self, cfg: BlipVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU: config hidden_act "gelu"


class BlipEncoderLayer(nn.Module):
    def __init__(self, cfg: BlipVisionConfig):
        super().__init__()
        self.self_attn = BlipAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = BlipMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class BlipVisionModel(nn.Module):
    def __init__(self, cfg: BlipVisionConfig):
        super().__init__()
        self.embeddings = BlipVisionEmbeddings(cfg)
        self.encoder = nn.ModuleDict(dict(layers=nn.ModuleList(
            BlipEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))))
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixels)  # (B, 1+N, D)
        # cast: torch types a ModuleDict's entries as Module; this one is the ModuleList of encoder layers
        for layer in cast("Iterable[BlipEncoderLayer]", self.encoder.layers):
            x = layer(x)
        return self.post_layernorm(x)  # (B, 1+N, D): every token is a key for cross-attention


# ---------------------------------------------------------------- text decoder (post-norm BERT)

class BlipTextEmbeddings(nn.Module):
    def __init__(self, cfg: BlipTextConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.word_embeddings(ids) + self.position_embeddings(positions))


class BlipTextSelfAttention(nn.Module):
    """Attention with separate q/k/v; keys and values come from `kv_dim`-wide inputs (the text
    itself, or the image tokens for cross-attention)."""

    def __init__(self, cfg: BlipTextConfig, kv_dim: int):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_dim, cfg.hidden_size)
        self.value = nn.Linear(kv_dim, cfg.hidden_size)

    def kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        split = lambda t: rearrange(t, "b n (h d) -> b h n d", h=self.heads)
        return split(self.key(context)), split(self.value(context))  # (B, h, N, d) each

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        q = rearrange(self.query(x), "b t (h d) -> b h t d", h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, T, d)
        return rearrange(out, "b h t d -> b t (h d)")


class BlipTextOutput(nn.Module):
    """dense -> residual add -> LayerNorm (BERT's post-norm sublayer output)."""

    def __init__(self, in_dim: int, cfg: BlipTextConfig):
        super().__init__()
        self.dense = nn.Linear(in_dim, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class BlipTextAttention(nn.Module):
    def __init__(self, cfg: BlipTextConfig, kv_dim: int):
        super().__init__()
        self.self = BlipTextSelfAttention(cfg, kv_dim)
        self.output = BlipTextOutput(cfg.hidden_size, cfg)


class BlipTextIntermediate(nn.Module):
    def __init__(self, cfg: BlipTextConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # exact GELU: config hidden_act "gelu"


class BlipTextLayer(nn.Module):
    def __init__(self, cfg: BlipTextConfig):
        super().__init__()
        self.attention = BlipTextAttention(cfg, cfg.hidden_size)
        self.crossattention = BlipTextAttention(cfg, cfg.encoder_hidden_size)
        self.intermediate = BlipTextIntermediate(cfg)
        self.output = BlipTextOutput(cfg.intermediate_size, cfg)

    def forward(self, x, mask, past, image_kv):
        # x: (B, T, C) new tokens; past: this layer's cached (k, v) of earlier tokens or None;
        # image_kv: this layer's cross-attention (k, v) of the image tokens, computed once
        k, v = self.attention.self.kv(x)  # (B, h, T, d)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        x = self.attention.output(self.attention.self(x, k, v, mask), x)
        x = self.crossattention.output(self.crossattention.self(x, *image_kv), x)
        x = self.output(self.intermediate(x), x)
        return x, (k, v)


class BlipTextLMPredictionHead(nn.Module):
    def __init__(self, cfg: BlipTextConfig):
        super().__init__()
        self.transform = nn.ModuleDict(dict(dense=nn.Linear(cfg.hidden_size, cfg.hidden_size),
                                            LayerNorm=nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)))
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, x: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        x = self.transform["LayerNorm"](F.gelu(self.transform["dense"](x)))
        return F.linear(x, word_embeddings, self.bias)  # (B, T, vocab): output layer tied to the input one


class BlipTextDecoder(nn.Module):
    """transformers' `BlipTextLMHeadModel`: `bert` (embeddings + layers) and `cls` (LM head)."""

    def __init__(self, cfg: BlipTextConfig):
        super().__init__()
        self.bert = nn.ModuleDict(dict(
            embeddings=BlipTextEmbeddings(cfg),
            encoder=nn.ModuleDict(dict(layer=nn.ModuleList(BlipTextLayer(cfg) for _ in range(cfg.num_hidden_layers))))))
        self.cls = nn.ModuleDict(dict(predictions=BlipTextLMPredictionHead(cfg)))

    def image_kv(self, image: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Cross-attention keys/values of the image tokens (B, 1+N, Dv), once per layer."""
        layers = cast("Iterable[BlipTextLayer]", self.bert["encoder"].layer)  # cast: torch types submodules as Module
        return [layer.crossattention.self.kv(image) for layer in layers]

    def forward(self, ids, positions, valid, image_kv, past=None):
        # ids, positions: (B, T) new tokens; valid: (B, P+T) False on left padding, P = cached length
        T, P = ids.shape[1], valid.shape[1] - ids.shape[1]
        i = torch.arange(P, P + T, device=ids.device)[:, None]  # query positions in the padded row
        j = torch.arange(P + T, device=ids.device)[None, :]  # key positions
        # causal, padding keys hidden; a padding query sees itself so that no row is empty
        mask = (j <= i) & (valid[:, None, :] | (j == i))  # (B, T, P+T)
        x = self.bert.embeddings(ids, positions)  # (B, T, C)
        present = []
        for n, layer in enumerate(self.bert.encoder.layer):
            x, kv = layer(x, mask[:, None], None if past is None else past[n], image_kv[n])
            present.append(kv)
        return self.cls.predictions(x, self.bert.embeddings.word_embeddings.weight), present


class BlipForConditionalGeneration(HubModel):
    # keys of the reference class that we do not build: the LM head's `decoder` is tied to the word
    # embeddings and `decoder.bias` to `cls.predictions.bias` (files written by transformers omit
    # them; where a file has them, transformers' tying overrides them, so we ignore them the same
    # way), and a position_ids buffer that old files carry
    IGNORED = ("text_decoder.cls.predictions.decoder.weight", "text_decoder.cls.predictions.decoder.bias",
               "text_decoder.bert.embeddings.position_ids")

    def __init__(self, cfg: BlipConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_model = BlipVisionModel(cfg.vision)
        self.text_decoder = BlipTextDecoder(cfg.text)

    def logits(self, pixels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Teacher-forced next-token logits (B, T, vocab) of token ids (B, T) given images."""
        image_kv = self.text_decoder.image_kv(self.vision_model(pixels))
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        valid = torch.ones_like(ids, dtype=torch.bool)
        return self.text_decoder(ids, positions, valid, image_kv)[0]

    @torch.no_grad()
    def generate(self, pixels: torch.Tensor, prompts: list[list[int]], max_length: int = 20) -> list[list[int]]:
        """Greedy continuation of each prompt (ids starting with [DEC]) for one image (1, 3, H, W).
        Returns each prompt followed by its generated ids, [SEP] included, at most `max_length`."""
        t = self.cfg.text
        image_kv = self.text_decoder.image_kv(self.vision_model(pixels))  # per layer (1, h, N, d)
        B, L = len(prompts), max(len(p) for p in prompts)
        image_kv = [(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)) for k, v in image_kv]
        ids = torch.full((B, L), t.pad_token_id, dtype=torch.long, device=pixels.device)
        valid = torch.zeros(B, L, dtype=torch.bool, device=pixels.device)
        for b, p in enumerate(prompts):  # left padding: every row's last token is its newest
            ids[b, L - len(p):] = torch.tensor(p)
            valid[b, L - len(p):] = True
        positions = (valid.cumsum(1) - 1).clamp(min=0)  # each row counts from its first real token
        out = [list(p) for p in prompts]
        done = [len(p) >= max_length for p in prompts]
        past = None
        while not all(done):
            logits, past = self.text_decoder(ids, positions, valid, image_kv, past)
            nxt = logits[:, -1].argmax(-1)  # (B,) greedy
            for b, token in enumerate(nxt.tolist()):
                if not done[b]:
                    out[b].append(token)
                    done[b] = token == t.sep_token_id or len(out[b]) >= max_length
            # finished rows keep decoding (rows are independent); their tokens are not kept
            positions = valid.sum(1, keepdim=True)  # (B, 1): the next position of each row
            ids, valid = nxt[:, None], torch.cat([valid, valid.new_ones(B, 1)], dim=1)
        return out

    @classmethod
    def from_pretrained(cls, folder: str | Path, device="cpu", dtype=torch.float32) -> "BlipForConditionalGeneration":
        """Strict load of a hub folder (model.safetensors [+ config.json]) on a meta-built model."""
        return load_weights(cls, BlipConfig, folder, WHAT, HUB_ID, device, dtype)


class Captioner:
    """BLIP captions of an image, unconditional or continuing text prefixes."""

    def __init__(self, model: BlipForConditionalGeneration, tokenizer: WordPieceTokenizer, max_length: int = 20):
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length

    @classmethod
    def from_pretrained(cls, folder: str | Path, device="cpu", dtype=torch.float32) -> "Captioner":
        folder = resolve_folder(folder, HUB_ID)  # a folder, or the hub id: its copy in the cache
        check_folder(folder, WHAT, HUB_ID)  # all files are checked before the slow part
        tokenizer = WordPieceTokenizer.from_dir(folder)
        return cls(BlipForConditionalGeneration.from_pretrained(folder, device, dtype), tokenizer)

    def caption(self, image: str | Path | Image.Image, prefixes: list[str] | None = None) -> list[str]:
        """One caption per prefix (default: one unconditional caption), e.g. the prefix
        "a photograph of cat" gives "a photograph of cat sitting on a couch"."""
        prefixes = [""] if prefixes is None else prefixes
        p = next(self.model.parameters())
        pixels = blip_preprocess(load_image(image), self.model.cfg.vision.image_size).to(p.device, p.dtype)
        prompts = [[self.tokenizer.bos_id] + self.tokenizer.encode(s) for s in prefixes]
        return [self.tokenizer.decode(ids) for ids in self.model.generate(pixels, prompts, self.max_length)]
