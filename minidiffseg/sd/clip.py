"""CLIP text encoders of Stable Diffusion, with transformers' names: SD1.5's (openai/clip-vit-large-patch14's
text tower), SD2.x's (OpenCLIP ViT-H/14's) and SDXL's two (CLIP ViT-L/14 and OpenCLIP ViT-bigG/14).

`CLIPTextModel` owns `text_model`, so its state-dict keys are those of the official
`text_encoder/model.safetensors` (`text_model.embeddings.token_embedding.weight`, ...), minus the
`text_model.embeddings.position_ids` buffer, which is not built: positions are `arange(T)`.
`CLIPTextModelWithProjection` adds `text_projection.weight`, as SDXL's `text_encoder_2/model.safetensors` has it.

SDXL reads each tower's *penultimate* hidden states (the output of all layers but the last, before the final
LayerNorm: diffusers' StableDiffusionXLPipeline.encode_prompt takes `hidden_states[-2]`), and from bigG also
the pooled embedding: the last layer's output at the EOS token, final LayerNorm, `text_projection`.

The transformer body (`CLIPEncoder`: pre-LayerNorm blocks of attention + QuickGELU MLP) is shared
with the CLIP vision tower, which calls it without the causal mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import CLIPTextConfig


class CLIPAttention(nn.Module):
    """Multi-head self-attention, biased q/k/v/out projections (transformers `CLIPAttention`)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        B, T, C = x.shape
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (p(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # scale hs**-0.5, as CLIP
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class CLIPMLP(nn.Module):
    """fc1 -> QuickGELU -> fc2. QuickGELU x·σ(1.702x) is what OpenAI trained CLIP with
    (config.json `hidden_act: "quick_gelu"`); 1.702 makes σ(1.702x) approximate the normal CDF.
    SD2.x's OpenCLIP ViT-H text tower was trained with the exact GELU instead (`hidden_act: "gelu"`)."""

    def __init__(self, width: int, mlp_width: int, act: str = "quick_gelu"):
        super().__init__()
        if act not in ("quick_gelu", "gelu"):
            raise ValueError(f"hidden_act {act!r}: CLIP text towers use quick_gelu (OpenAI) or gelu (OpenCLIP)")
        self.act = act
        self.fc1 = nn.Linear(width, mlp_width)
        self.fc2 = nn.Linear(mlp_width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h) if self.act == "quick_gelu" else F.gelu(h))


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, width: int, heads: int, mlp_width: int, eps: float, act: str = "quick_gelu"):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(width, eps=eps)
        self.self_attn = CLIPAttention(width, heads)
        self.layer_norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = CLIPMLP(width, mlp_width, act)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), causal=causal)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    """The stack of `layers` blocks; `causal=True` for the text tower, False for the vision tower."""

    def __init__(self, width: int, heads: int, mlp_width: int, layers: int, eps: float, act: str = "quick_gelu"):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(width, heads, mlp_width, eps, act) for _ in range(layers))

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, causal=causal)
        return x  # (B, T, width)


class CLIPTextEmbeddings(nn.Module):
    """Token embedding + learned absolute position embedding (77 positions)."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        # left uninitialised (`_weight`): the checkpoint fills them, and nn.Embedding's random init run on the
        # meta device imports torch's symbolic machinery, +68 MB resident for nothing (docs/memory.md §4)
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                            _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size,
                                               _weight=torch.empty(cfg.max_position_embeddings, cfg.hidden_size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (T,)
        return self.token_embedding(input_ids) + self.position_embedding(positions)  # (B, T, C)


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size,
                                   cfg.num_hidden_layers, cfg.layer_norm_eps, cfg.hidden_act)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(input_ids)  # (B, T, C)
        x = self.encoder(x, causal=True)  # CLIP's text tower attends only to earlier tokens
        return self.final_layer_norm(x)

    def penultimate(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, C): the output of every layer but the last, before final_layer_norm (transformers'
        `hidden_states[-2]`); the last layer and the norm are not run (nor, when streamed, fetched)."""
        x = self.embeddings(input_ids)  # (B, T, C)
        for layer in self.encoder.layers[:-1]:  # each through its module call: streaming's hooks fill it
            x = layer(x, causal=True)
        return x


def eos_positions(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """(B, T) ids -> (B,) the position of each row's pooled (EOS) token, by transformers' CLIPTextModel rule:
    `eos_token_id` 2 is the legacy value of the SD configs (CLIPTextConfig.eos_token_id) and means the position
    of the largest id (EOS, 49407, is CLIP's largest; the first one where the row pads with EOS); any other value
    is the EOS id, found at its first position (a row without it gives 0)."""
    if eos_token_id == 2:
        return input_ids.argmax(dim=-1)  # ties: torch.argmax returns the first maximal position
    return (input_ids == eos_token_id).int().argmax(dim=-1)


class CLIPTextModel(nn.Module):
    """SD1.5's / SD2.x's text encoder: token ids (B, 77) -> last hidden state (B, 77, hidden_size).
    (SD2.x's folders store the OpenCLIP tower without its last layer: its output is the original's
    penultimate layer followed by the final LayerNorm, docs/sd2.md §1.) SDXL's first text encoder (CLIP
    ViT-L/14, all 12 layers) is read through `penultimate` instead.

    No padding mask: SD1.5 pads with EOS (SD2.x with "!") and attends to the padding (the causal mask
    alone), and the U-Net's cross-attention reads all 77 positions. No pooling and no projection either: those belong
    to CLIPModel, used only by the class filter, and to CLIPTextModelWithProjection (SDXL's bigG).
    """

    stream_blocks = (CLIPTextEmbeddings, CLIPEncoderLayer)  # the streaming grain (sd/stream.py `blocks`), + the final norm

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.cfg = cfg
        self.text_model = CLIPTextTransformer(cfg)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_model(input_ids)

    def penultimate(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, 77) ids -> (B, 77, hidden_size): the hidden states after all layers but the last, before the final
        LayerNorm, which SDXL conditions on (CLIPTextTransformer.penultimate)."""
        return self.text_model.penultimate(input_ids)


class CLIPTextModelWithProjection(nn.Module):
    """SDXL's second text encoder, OpenCLIP ViT-bigG/14 (transformers `CLIPTextModelWithProjection`: its
    `text_encoder_2/config.json` says 32 layers, 1280 wide, 20 heads, MLP 5120, `hidden_act: "gelu"`,
    `projection_dim: 1280`): token ids (B, 77) -> (penultimate hidden states (B, 77, hidden_size), pooled
    embedding (B, projection_dim)), in one pass through the layers.

    The pooled embedding is the last layer's output at the EOS token (`eos_positions`), final LayerNorm, then
    `text_projection` (a Linear without bias). The norm is per token, so it is applied to the B pooled rows only:
    the same values as transformers' norm of all 77 positions followed by the pick.
    """

    stream_blocks = CLIPTextModel.stream_blocks  # + the final norm and text_projection, blocks of their own

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.cfg = cfg
        self.text_model = CLIPTextTransformer(cfg)
        self.text_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        states = self.text_model.penultimate(input_ids)  # (B, T, C)
        last = self.text_model.encoder.layers[-1](states, causal=True)  # (B, T, C)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        eos = last[rows, eos_positions(input_ids, self.cfg.eos_token_id)]  # (B, C)
        return states, self.text_projection(self.text_model.final_layer_norm(eos))  # (B, T, C), (B, P)
