"""SD3's third text encoder: the encoder half of T5 v1.1 XXL, with transformers' `T5EncoderModel` names.

Stable Diffusion 3 conditions on CLIP-L, CLIP-G and T5: diffusers' StableDiffusion3Pipeline tokenises the prompt
for T5 padded to `max_sequence_length` (256) with truncation, calls `text_encoder_3(ids)[0]` WITHOUT an attention
mask (the padding is attended to), and concatenates the (B, 256, 4096) last hidden state after the CLIP tokens.

    ids (B, L) ─shared─► (B, L, 4096) ─► 24 × T5Block ─► final_layer_norm ─► (B, L, 4096)
    T5Block:  x += SelfAttention(layer_norm(x), position_bias)     (layer.0)
              x += DenseReluDense(layer_norm(x))                   (layer.1)

What makes T5 unlike CLIP:
- No absolute positions. Each attention adds a learned bias per head and *relative position bucket* to its scores
  (`relative_position_bucket`). Only block 0 holds the table (`encoder.block.0.layer.0.SelfAttention.
  relative_attention_bias.weight`, [buckets, heads]); every block uses that same bias, so block 0 computes it
  in its forward and returns it, and the stack passes it down as a tensor (what transformers' T5Stack does).
  Under streaming (sd/stream.py) the table is fetched with block 0 and the bias outlives it as an ordinary tensor.
- No scaling of the attention scores by d_kv**-0.5: T5 folds it into the initialisation of q (Mesh TensorFlow's
  T5; transformers' T5Attention `scaling = 1.0`).
- RMS LayerNorm without bias or mean (T5LayerNorm): the mean square is taken in float32, the result cast back to
  the weight's dtype when that is half precision.
- v1.1's feed-forward is gated: wo(gelu_tanh(wi_0 x) · wi_1 x) ("gated-gelu", transformers' `gelu_new`); the
  original T5 (and the tiny test model) has wo(relu(wi x)) ("relu").
- float16: T5 v1.1 XXL's activations overflow it. transformers keeps `wo` in float32 when a model is loaded in
  float16 (`_keep_in_fp32_modules = ["wo"]`, huggingface/transformers#20287), which turns the residual stream
  float32 from block 0's feed-forward on, and clamps float16 hidden states to ±(65504 - 1000) after any sublayer
  that produced an inf (T5Block's "clamp inf values to enable fp16 training"). Both are reproduced (`T5Config.
  keep_wo_float32`, `clamp_float16`).

Checkpoint names. transformers' T5EncoderModel has two names for one embedding: `shared.weight` and
`encoder.embed_tokens.weight`, tied (`_tied_weights_keys`). Its safetensors files store only one of them:
transformers 5's save_pretrained writes `shared.weight` (asserted in tests/test_t5.py), and so did transformers 4
for the diffusers folders (FLUX.1-dev's text_encoder_2/, the same T5 encoder, lists only `shared.weight`:
modelscope/DiffSynth-Studio#636; SD3's text_encoder_3/ comes from the same save). Our module holds the
embedding once, as `shared`, and `checkpoint_names` maps a file's keys onto it: a file that holds only
`encoder.embed_tokens.weight` loads it into `shared.weight`; one that holds both (a conversion from a torch .bin,
which stores both) loads `encoder.embed_tokens.weight`, the one transformers' encoder reads when the two differ
(it unties them then), and ignores `shared.weight`. A whole T5ForConditionalGeneration file also holds
`decoder.*` (and `lm_head.weight`): ignored by name, as T5EncoderModel does (`_keys_to_ignore_on_load_unexpected`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..sd.config import _pick

FEED_FORWARDS = ("relu", "gated-gelu")  # transformers' T5Config.feed_forward_proj values built here
FLOAT16_MAX = torch.finfo(torch.float16).max  # 65504
# transformers' T5Block clamps float16 hidden states to this when a sublayer's output holds an inf
CLAMP_BELOW_MAX = 1000


@dataclass(frozen=True)
class T5Config:
    """T5 encoder sizes (transformers `T5Config`, `text_encoder_3/config.json`); defaults: T5 v1.1 XXL (`xxl()`)."""

    vocab_size: int = 32128  # 32000 SentencePiece pieces + 100 sentinels <extra_id_N>, rounded up to a multiple of 128
    d_model: int = 4096
    d_kv: int = 64  # width of one head: heads × d_kv = 4096 = d_model in XXL (not required in general)
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"  # T5 v1.1; the original T5 (and hf-internal-testing's tiny one): "relu"
    # float16 only: run each wo in float32 as transformers' from_pretrained(torch_dtype=float16) keeps it (see the
    # module docstring); not a config.json field
    keep_wo_float32: bool = True

    def __post_init__(self):
        if self.feed_forward_proj not in FEED_FORWARDS:
            raise UserError(f"T5 config.json: feed_forward_proj {self.feed_forward_proj!r} is not implemented "
                            f"(minidiffseg builds {' and '.join(map(repr, FEED_FORWARDS))}: T5 v1.1 and the original T5)")

    @property
    def gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @classmethod
    def from_transformers(cls, cfg: dict) -> "T5Config":
        """From a T5 config.json. `dense_act_fn` and `is_gated_act`, which transformers also writes, are derived
        from feed_forward_proj there (T5Config.__post_init__), and are ignored here too."""
        return _pick(cls, cfg)

    @classmethod
    def xxl(cls) -> "T5Config":
        """T5 v1.1 XXL's encoder: google/t5-v1_1-xxl's config.json, which SD3's text_encoder_3/config.json copies."""
        return cls()

    @classmethod
    def tiny(cls) -> "T5Config":
        """hf-internal-testing/tiny-random-t5's sizes (the original T5's ReLU feed-forward, 8 buckets)."""
        return cls(vocab_size=1103, d_model=32, d_kv=8, d_ff=37, num_layers=5, num_heads=4,
                   relative_attention_num_buckets=8, feed_forward_proj="relu")


def relative_position_bucket(relative: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Key position minus query position (int64) -> bucket in [0, num_buckets), the encoder's bidirectional rule
    (Mesh TensorFlow's `_relative_position_bucket`, as transformers' T5Attention has it): half the buckets for
    keys after the query, half for keys at or before it; in each half, the first half of the buckets are exact
    distances 0, 1, ..., and the rest are logarithmically wider, up to `max_distance`, beyond which all
    distances share the last bucket. The logarithm is taken in float32, as there, so the bin edges fall alike."""
    half = num_buckets // 2
    side = (relative > 0).long() * half  # keys after the query use the upper half
    distance = relative.abs()
    exact = half // 2
    # distance < exact never reaches the log (clamped from below to keep log(0) out; those entries are unused)
    log_ratio = torch.log(distance.clamp(min=exact).float() / exact) / math.log(max_distance / exact)
    wide = (exact + (log_ratio * (half - exact)).long()).clamp(max=half - 1)
    return side + torch.where(distance < exact, distance, wide)


def clamp_float16(x: torch.Tensor) -> torch.Tensor:
    """transformers' T5Block rule for float16 hidden states: clamp to ±65504 (a no-op but for inf), or to
    ±(65504 - 1000) if any element is inf, so that the next norm and residual see finite values. Other dtypes
    pass unchanged. The decision stays on the device (no host sync)."""
    if x.dtype != torch.float16:
        return x
    limit = torch.where(torch.isinf(x).any(), FLOAT16_MAX - CLAMP_BELOW_MAX, FLOAT16_MAX)
    return torch.clamp(x, min=-limit, max=limit)


class T5LayerNorm(nn.Module):
    """RMS norm, scale only: weight · x / sqrt(mean(x²) + eps), the mean square in float32."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)  # (B, L, 1), float32
        x = x * torch.rsqrt(variance + self.eps)  # promoted to float32
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


class T5Attention(nn.Module):
    """Self-attention without biases, without score scaling, with an additive relative-position bias."""

    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.heads, self.d_kv = cfg.num_heads, cfg.d_kv
        inner = cfg.num_heads * cfg.d_kv
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        self.num_buckets, self.max_distance = cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
        if has_relative_attention_bias:  # block 0 only; left uninitialised: the checkpoint fills it (clip.py)
            self.relative_attention_bias = nn.Embedding(
                cfg.relative_attention_num_buckets, cfg.num_heads,
                _weight=torch.empty(cfg.relative_attention_num_buckets, cfg.num_heads))

    def position_bias(self, length: int, device: torch.device) -> torch.Tensor:
        """(1, heads, L, L): the bias every block adds to its scores, from block 0's table."""
        positions = torch.arange(length, dtype=torch.long, device=device)
        relative = positions[None, :] - positions[:, None]  # (L query, L key): key - query
        buckets = relative_position_bucket(relative, self.num_buckets, self.max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0).contiguous()

    def forward(self, x: torch.Tensor, position_bias: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        # (B, L, d_model) -> (B, nh, L, d_kv)
        q, k, v = (p(x).view(B, L, self.heads, self.d_kv).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=position_bias, scale=1.0)  # T5: no 1/sqrt(d_kv)
        return self.o(y.transpose(1, 2).reshape(B, L, self.heads * self.d_kv))


class T5LayerSelfAttention(nn.Module):
    """layer.0 of a block: pre-norm self-attention and its residual."""

    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(cfg, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x: torch.Tensor, position_bias: torch.Tensor) -> torch.Tensor:
        return x + self.SelfAttention(self.layer_norm(x), position_bias)


class T5DenseActDense(nn.Module):
    """The original T5's feed-forward: wo(relu(wi x))."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.keep_wo_float32 = cfg.keep_wo_float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return output_projection(self.wo, F.relu(self.wi(x)), self.keep_wo_float32)


class T5DenseGatedActDense(nn.Module):
    """T5 v1.1's gated feed-forward: wo(gelu_tanh(wi_0 x) · wi_1 x). transformers' `gelu_new` is GELU's tanh
    approximation 0.5·x·(1 + tanh(sqrt(2/π)·(x + 0.044715·x³))), torch's `approximate="tanh"`."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.keep_wo_float32 = cfg.keep_wo_float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)  # (B, L, d_ff)
        return output_projection(self.wo, h, self.keep_wo_float32)


def output_projection(wo: nn.Linear, h: torch.Tensor, keep_float32: bool) -> torch.Tensor:
    """wo(h); for float16 `h` with `keep_float32`, in float32 from the float16 weight (exact up-cast): what
    transformers computes with the float32 `wo` it keeps under torch_dtype=float16 (see the module docstring).
    The float32 result then makes the residual stream float32."""
    if keep_float32 and h.dtype == torch.float16:
        return F.linear(h.float(), wo.weight.float())
    return wo(h)


class T5LayerFF(nn.Module):
    """layer.1 of a block: pre-norm feed-forward and its residual."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(cfg) if cfg.gated else T5DenseActDense(cfg)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    """Self-attention then feed-forward, each followed by transformers' float16 clamp. Block 0 owns the
    relative-attention table: called with `position_bias=None` it computes the bias; every block returns the
    bias it used, for the next."""

    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool = False):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(cfg, has_relative_attention_bias), T5LayerFF(cfg)])

    def forward(self, x: torch.Tensor, position_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        attention, feed_forward = self.layer
        if position_bias is None:  # block 0, whose weights are present while it runs (also when streamed)
            assert isinstance(attention, T5LayerSelfAttention)
            position_bias = attention.SelfAttention.position_bias(x.shape[1], x.device)  # (1, nh, L, L)
        x = clamp_float16(attention(x, position_bias))
        x = clamp_float16(feed_forward(x))
        return x, position_bias


class T5Stack(nn.Module):
    """transformers' `encoder`: the blocks and the final norm (its `embed_tokens` is `shared`: module docstring)."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.block = nn.ModuleList(T5Block(cfg, has_relative_attention_bias=i == 0) for i in range(cfg.num_layers))
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        position_bias = None  # computed by block 0, shared by all
        for block in self.block:
            x, position_bias = block(x, position_bias)
        return self.final_layer_norm(x)


class T5Encoder(nn.Module):
    """T5's encoder as SD3 runs it: token ids (B, L) -> last hidden state (B, L, d_model), after the final norm,
    without an attention mask (the padding is attended to, as in diffusers' StableDiffusion3Pipeline)."""

    stream_blocks = (T5Block,)  # the streaming grain (sd/stream.py `blocks`), + `shared` and the final norm

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.cfg = cfg
        # uninitialised: the checkpoint fills it (clip.py explains why random init is avoided on meta)
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model, _weight=torch.empty(cfg.vocab_size, cfg.d_model))
        self.encoder = T5Stack(cfg)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.shared(input_ids))  # (B, L, d_model)


EMBEDDING = "shared.weight"
TIED = "encoder.embed_tokens.weight"  # transformers' second name for the same embedding
IGNORED_PREFIXES = ("decoder.", "lm_head.")  # T5ForConditionalGeneration's decoder half


def checkpoint_names(keys) -> dict[str, str]:
    """File key -> our parameter name for a T5 encoder checkpoint's `keys` (see the module docstring): every
    key to itself, the tied embedding onto `shared.weight` (from `encoder.embed_tokens.weight` where the file
    holds it, else from `shared.weight`), `decoder.*` and `lm_head.*` left out. Any other key is kept, so
    that load_strict names it if the encoder does not hold it."""
    keys = set(keys)
    names = {k: k for k in keys if not k.startswith(IGNORED_PREFIXES) and k not in (EMBEDDING, TIED)}
    for key in (TIED, EMBEDDING):
        if key in keys:
            names[key] = EMBEDDING
            break
    return names
