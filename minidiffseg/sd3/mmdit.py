"""SD3 / SD3.5's MM-DiT with diffusers' parameter names (SD3Transformer2DModel), so the official
`transformer/diffusion_pytorch_model.safetensors` loads with `load_state_dict(strict=True)`.

The layout follows diffusers' models/transformers/transformer_sd3.py and the pieces it is built of:
models/embeddings.py (PatchEmbed with the stored, centre-cropped position table; CombinedTimestepTextProjEmbeddings),
models/attention.py (JointTransformerBlock), models/attention_processor.py (JointAttnProcessor2_0) and
models/normalization.py (AdaLayerNormZero, SD35AdaLayerNormZeroX, AdaLayerNormContinuous, RMSNorm).

    z (B, 16, h, w) ──pos_embed: 2×2 patches, + the table's centre crop──► x (B, N = h/2 · w/2, D)
    states (B, T, 4096) ──context_embedder──► c (B, T, D)
    t, pooled (B, 2048) ──time_text_embed──► temb (B, D)
    transformer_blocks.0 .. L-1 (x, c, temb):
        norm1 / norm1_context: LayerNorm modulated by temb (6 chunks; 9 with the dual attention; the last block's
          text side 2: it is `context_pre_only`)
        attn: ONE attention over [image tokens | text tokens], per-stream q/k/v (to_* | add_*_proj), SD3.5's
          per-head RMSNorm on q and k, separate outputs (to_out.0 | to_add_out)
        attn2 (SD3.5-medium blocks 0-12): image-only self-attention
        ff / ff_context: GELU(tanh) MLPs, 4·D wide
      the last block updates only x (its text tokens still act as queries and keys)
    norm_out, proj_out, un-patchify ──► velocity (B, 16, h, w)

SD3-medium: D = 1536 (24 heads of 64), 24 blocks; SD3.5-medium adds qk RMSNorm and attn2 in blocks 0-12.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..errors import UserError
from ..sd.attention import AttentionStore
from ..sd.unet import TimestepEmbedding, timestep_embedding
from .config import MMDiTConfig

TIME_CHANNELS = 256  # CombinedTimestepTextProjEmbeddings: Timesteps(256, flip_sin_to_cos=True, shift 0)
EPS = 1e-6  # every LayerNorm of the MM-DiT (JointTransformerBlock, AdaLayerNorm*) and the qk RMSNorm


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine parameters, eps 1e-6 (the blocks' norm2 / norm2_context, the AdaLN norms)."""
    return F.layer_norm(x, x.shape[-1:], eps=EPS)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim (the head dim here) with a weight, eps 1e-6, as diffusers' RMSNorm: the mean square
    in float32 for half-precision inputs, the result back in the input's dtype before the weight. (diffusers computes
    it in float32 for float64 inputs too; here in float64 then, so float64 runs are exact, tests/test_mmdit.py.)"""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = torch.promote_types(x.dtype, torch.float32)
        y = x.to(wide) * torch.rsqrt(x.to(wide).pow(2).mean(-1, keepdim=True) + EPS)
        return y.to(x.dtype) * self.weight


class PatchEmbed(nn.Module):
    """`pos_embed`: a patch_size-strided conv to D channels, flattened to tokens (row-major over the token grid),
    plus the centre crop of the stored (1, M², D) sin-cos table, M = pos_embed_max_size.

    The table is a persistent buffer in diffusers and every checkpoint stores it (the folders as
    `pos_embed.pos_embed`, the single files as `pos_embed`), so it is loaded, not computed. It is held as a
    parameter without gradient here: the streamed weights (sd/stream.py) fetch parameters only, and as a
    parameter of this module the table is streamed with the conv (the whole of `pos_embed` is one block)."""

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.patch, self.max_size = cfg.patch_size, cfg.pos_embed_max_size
        self.proj = nn.Conv2d(cfg.in_channels, cfg.inner_dim, cfg.patch_size, stride=cfg.patch_size)
        self.pos_embed = nn.Parameter(torch.empty(1, cfg.pos_embed_max_size ** 2, cfg.inner_dim), requires_grad=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, C, h, w) -> (B, h/p · w/p, D)
        gh, gw = z.shape[-2] // self.patch, z.shape[-1] // self.patch
        top, left = (self.max_size - gh) // 2, (self.max_size - gw) // 2  # PatchEmbed.cropped_pos_embed
        table = self.pos_embed.reshape(self.max_size, self.max_size, -1)[top:top + gh, left:left + gw]
        x = self.proj(z).flatten(2).transpose(1, 2)  # (B, N, D)
        return (x + table.reshape(1, gh * gw, -1)).to(x.dtype)


class TimeTextEmbedding(nn.Module):
    """`time_text_embed` (CombinedTimestepTextProjEmbeddings): the MLP of the timestep's 256-wide sinusoid (cos
    first) plus the MLP of the pooled text (PixArtAlphaTextProjection with SiLU: the same linear-SiLU-linear)."""

    def __init__(self, dim: int, pooled_dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(TIME_CHANNELS, dim)
        self.text_embedder = TimestepEmbedding(pooled_dim, dim)

    def forward(self, t: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:  # (1 or B,), (1 or B, P) -> (B, D)
        sinusoid = timestep_embedding(t, TIME_CHANNELS, flip_sin_to_cos=True, shift=0)  # float32
        return self.timestep_embedder(sinusoid.to(pooled.dtype)) + self.text_embedder(pooled)


class AdaNormZero(nn.Module):
    """`norm1` / `norm1_context` (AdaLayerNormZero: 6 chunks; SD35AdaLayerNormZeroX: 9): SiLU(temb) -> Linear to
    chunks·D, in diffusers' order shift, scale, gate (attention), shift, scale, gate (MLP)[, shift, scale, gate
    (attn2)]. Returns the modulated norm of x, then the other chunks as diffusers' forward does (see JointBlock)."""

    def __init__(self, dim: int, chunks: int):
        super().__init__()
        self.chunks = chunks
        self.linear = nn.Linear(dim, chunks * dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        mods = [m[:, None] for m in self.linear(F.silu(temb)).chunk(self.chunks, dim=1)]  # each (B, 1, D)
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        normed = layer_norm(x)
        out: tuple[torch.Tensor, ...] = (normed * (1 + scale) + shift, gate, shift_mlp, scale_mlp, gate_mlp)
        if self.chunks == 9:  # the dual attention's input: the same norm, its own shift and scale
            shift2, scale2, gate2 = mods[6:]
            out += (normed * (1 + scale2) + shift2, gate2)
        return out


class AdaNormContinuous(nn.Module):
    """`norm_out` and the last block's `norm1_context` (AdaLayerNormContinuous, no affine, eps 1e-6):
    SiLU(temb) -> Linear to 2·D, **scale first, then shift** (the single files store shift first:
    sd3/ldm.py swaps the halves)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:  # (B, N, D), (B, D)
        scale, shift = self.linear(F.silu(temb).to(x.dtype)).chunk(2, dim=1)
        return layer_norm(x) * (1 + scale[:, None]) + shift[:, None]


class GELUProj(nn.Module):
    """`ff.net.0` (diffusers' GELU, approximate "tanh"): a projection to 4·D, then GELU."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """`ff` / `ff_context`: GELU(tanh) MLP D -> 4·D -> D, over blocks of at most `ROWS` token rows (the 4·D
    intermediate is the largest activation: 4 prompts at 1024², 4 × 4096 image tokens × 6144 floats = 403 MB fp32;
    in blocks it stays that of one image's tokens, and rows are independent: the same result)."""

    ROWS = 4096  # one 1024² image's tokens (a 128² latent in 2×2 patches)

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GELUProj(dim, mult * dim), nn.Dropout(0.0), nn.Linear(mult * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, N, D)
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] <= self.ROWS:
            return self.net[2](self.net[0](x))
        return torch.cat([self.net[2](self.net[0](r)) for r in rows.split(self.ROWS)]).reshape(x.shape)


def heads_of(x: torch.Tensor, heads: int) -> torch.Tensor:
    return rearrange(x, "b n (h d) -> b h n d", h=heads)  # (B, N, h·d) -> (B, h, N, d)


class MMDiTAttention(nn.Module):
    """What both attentions of a block share: biased image-stream q/k/v (`to_q`, `to_k`, `to_v`) and output
    (`to_out.0`), SD3.5's per-head RMSNorm on q and k (`norm_q`, `norm_k`), and the attributes the attention store
    reads (sd/attention.py): `name` (the state-dict path), `kind`, `level` (latent side / token-grid side: the patch
    size), `heads`, `upcast` (False: where the store computes probabilities explicitly, in the compute dtype)."""

    kind = ""

    def __init__(self, dim: int, heads: int, qk_norm: str | None):
        super().__init__()
        self.heads = heads
        self.upcast = False
        self.name = ""  # set by the owning MMDiT (e.g. "transformer_blocks.9.attn", "transformer_blocks.0.attn2")
        self.level = 0  # set by the owning MMDiT: its patch size
        head_dim = dim // heads
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.norm_q = RMSNorm(head_dim) if qk_norm else None
        self.norm_k = RMSNorm(head_dim) if qk_norm else None
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # to_out.1 is a parameterless dropout

    def qkv(self, x: torch.Tensor, projections: tuple[nn.Module, nn.Module, nn.Module],
            norms: tuple[nn.Module | None, nn.Module | None]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One stream's (B, N, D) tokens -> its (B, h, N, d) queries, keys and values, q and k normed per head
        where the model does."""
        q, k, v = (heads_of(proj(x), self.heads) for proj in projections)
        norm_q, norm_k = norms
        return (q if norm_q is None else norm_q(q)), (k if norm_k is None else norm_k(k)), v


class SelfAttention(MMDiTAttention):
    """`attn2` (SD3.5's dual attention, kind "self"): self-attention of the image tokens, scale 1/√d, no mask.
    A store that wants it gets `store.attend(self, q, k, v)`, q, k, v (B, heads, N_img, d)."""

    kind = "self"

    def forward(self, x: torch.Tensor, store: AttentionStore | None = None) -> torch.Tensor:  # (B, N, D)
        q, k, v = self.qkv(x, (self.to_q, self.to_k, self.to_v), (self.norm_q, self.norm_k))
        if store is not None and store.wants(self):
            out = store.attend(self, q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out[0](rearrange(out, "b h n d -> b n (h d)"))


class JointAttention(MMDiTAttention):
    """`attn` (kind "joint"; diffusers' JointAttnProcessor2_0): image q/k/v and text q/k/v (`add_q_proj`,
    `add_k_proj`, `add_v_proj`), each stream's q, k RMS-normed per head in SD3.5 (`norm_q`/`norm_k`,
    `norm_added_q`/`norm_added_k`), then ONE attention over the concatenation [image | text] (scale 1/√d, no mask),
    split back: image rows -> `to_out.0`, text rows -> `to_add_out` (absent in the `context_pre_only` last block,
    whose text rows are not used). A store that wants it gets `store.attend(self, q, k, v, image_tokens=N_img)`,
    q, k, v (B, heads, N_img + T, d), image tokens first, after the qk norms."""

    kind = "joint"

    def __init__(self, dim: int, heads: int, qk_norm: str | None, context_pre_only: bool):
        super().__init__(dim, heads, qk_norm)
        self.add_q_proj, self.add_k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.add_v_proj = nn.Linear(dim, dim)
        self.norm_added_q = RMSNorm(dim // heads) if qk_norm else None
        self.norm_added_k = RMSNorm(dim // heads) if qk_norm else None
        self.to_add_out = None if context_pre_only else nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor,
                store: AttentionStore | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        # x: (B, N, D) image tokens, c: (B, T, D) text tokens -> (B, N, D), (B, T, D) or None (context_pre_only)
        n = x.shape[1]
        image = self.qkv(x, (self.to_q, self.to_k, self.to_v), (self.norm_q, self.norm_k))
        text = self.qkv(c, (self.add_q_proj, self.add_k_proj, self.add_v_proj), (self.norm_added_q, self.norm_added_k))
        q, k, v = (torch.cat(pair, dim=2) for pair in zip(image, text))  # (B, h, N + T, d)
        if store is not None and store.wants(self):
            out = store.attend(self, q, k, v, image_tokens=n)
        elif self.to_add_out is None:  # the text rows' output would be discarded: image queries only
            out = F.scaled_dot_product_attention(q[:, :, :n], k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        out = rearrange(out, "b h n d -> b n (h d)")  # (B, N [+ T], D)
        text_out = None if self.to_add_out is None else self.to_add_out(out[:, n:])
        return self.to_out[0](out[:, :n]), text_out


class JointTransformerBlock(nn.Module):
    """One MM-DiT block (diffusers' JointTransformerBlock): adaLN-zero modulated joint attention and MLPs for
    both streams, SD3.5's dual attention (attn2, SD35AdaLayerNormZeroX's 9 chunks) in some; the last block is
    `context_pre_only` (norm1_context an AdaLayerNormContinuous, no to_add_out, no norm2_context/ff_context)."""

    def __init__(self, cfg: MMDiTConfig, index: int):
        super().__init__()
        dim, heads = cfg.inner_dim, cfg.num_attention_heads
        self.context_pre_only = index == cfg.num_layers - 1
        self.dual = index in cfg.dual_attention_layers
        self.norm1 = AdaNormZero(dim, 9 if self.dual else 6)
        self.norm1_context: AdaNormContinuous | AdaNormZero = \
            AdaNormContinuous(dim) if self.context_pre_only else AdaNormZero(dim, 6)
        self.attn = JointAttention(dim, heads, cfg.qk_norm, self.context_pre_only)
        self.attn2 = SelfAttention(dim, heads, cfg.qk_norm) if self.dual else None
        self.ff = FeedForward(dim)
        self.ff_context = None if self.context_pre_only else FeedForward(dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor, temb: torch.Tensor,
                store: AttentionStore | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        # x (B, N, D) image tokens, c (B, T, D) text tokens, temb (B, D) -> x, c (None after the last block)
        nx, gate, shift_mlp, scale_mlp, gate_mlp, *dual = self.norm1(x, temb)
        if isinstance(self.norm1_context, AdaNormContinuous):
            nc, c_mods = self.norm1_context(c, temb), None
        else:
            nc, *c_mods = self.norm1_context(c, temb)
        a, ac = self.attn(nx, nc, store)
        x = x + gate * a
        if self.attn2 is not None:
            nx2, gate2 = dual
            x = x + gate2 * self.attn2(nx2, store)
        x = x + gate_mlp * self.ff(layer_norm(x) * (1 + scale_mlp) + shift_mlp)  # norm2
        if c_mods is None or self.ff_context is None or ac is None:
            return x, None
        c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = c_mods
        c = c + c_gate * ac
        return x, c + c_gate_mlp * self.ff_context(layer_norm(c) * (1 + c_scale_mlp) + c_shift_mlp)  # norm2_context


class MMDiT(nn.Module):
    """SD3Transformer2DModel (see the module docstring). `forward(z, t, states, pooled)` -> the velocity
    prediction; an `AttentionStore` records what it wants of the joint attentions ("joint") and attn2 ("self")."""

    # the streaming grain (sd/stream.py `blocks`): each joint block whole (SD3-medium: 85.0 M parameters, SD3.5-
    # medium's dual ones 101.5 M), the time embeddings' MLPs; every other module holding parameters on its own:
    # context_embedder, norm_out, proj_out, and pos_embed with its table (SD3-medium 56.7 M elements, SD3.5-medium's
    # 384² table 226.6 M: the largest block there, fetched whole though a 1024² image reads 64² of its 384² rows)
    stream_blocks: tuple[type[nn.Module], ...] = (JointTransformerBlock, TimestepEmbedding)

    def __init__(self, cfg: MMDiTConfig = MMDiTConfig.sd3_medium()):
        super().__init__()
        self.cfg = cfg
        dim = cfg.inner_dim
        self.pos_embed = PatchEmbed(cfg)
        self.time_text_embed = TimeTextEmbedding(dim, cfg.pooled_projection_dim)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, cfg.caption_projection_dim)
        self.transformer_blocks = nn.ModuleList([JointTransformerBlock(cfg, i) for i in range(cfg.num_layers)])
        self.norm_out = AdaNormContinuous(dim)
        self.proj_out = nn.Linear(dim, cfg.patch_size ** 2 * cfg.out_channels)
        for name, m in self.named_modules():
            if isinstance(m, MMDiTAttention):
                m.name, m.level = name, cfg.patch_size

    def attention_layers(self, kind: str | None = None, level: int | None = None) -> list[MMDiTAttention]:
        """The attention layers in execution order (per block: attn, then attn2 where there is one; SD3-medium 24,
        SD3.5-medium 37), optionally filtered by kind ("joint"/"self") and level (all are at the patch size)."""
        return [m for m in self.modules() if isinstance(m, MMDiTAttention)
                and (kind is None or m.kind == kind) and (level is None or m.level == level)]

    def forward(self, z: torch.Tensor, t, states: torch.Tensor, pooled: torch.Tensor,
                store: AttentionStore | None = None, output: bool = True) -> torch.Tensor | None:
        """z (1 or B, in_channels, h, w) latent; t the model timestep 1000·σ (a number, or (1 or B,)); states
        (B, T, joint_attention_dim) text; pooled (B, pooled_projection_dim) -> velocity (B, out_channels, h, w).

        One latent for B prompts is patch-embedded once and broadcast to B. `store` records attention (see
        sd/attention.py; it is told the latent's (h, w)); `output=False` skips norm_out/proj_out and returns None,
        for when only the attention is wanted."""
        cfg, p = self.cfg, self.cfg.patch_size
        h, w = z.shape[-2:]
        if h % p or w % p or h > p * cfg.pos_embed_max_size or w > p * cfg.pos_embed_max_size:
            raise UserError(f"latent {h}×{w}: the MM-DiT takes sides that are multiples of its patch size {p} and at "
                            f"most {p * cfg.pos_embed_max_size} (its position table is {cfg.pos_embed_max_size}² tokens):"
                            f" give --resolution at most {8 * p * cfg.pos_embed_max_size}")
        if store is not None:
            store.latent_hw = (h, w)
        b = max(z.shape[0], states.shape[0], pooled.shape[0])
        x = self.pos_embed(z)  # (1 or B, N, D)
        t = torch.as_tensor(t, device=z.device).reshape(-1)  # (1 or B,)
        temb = self.time_text_embed(t, pooled)  # (1 or B, D)
        c = self.context_embedder(states)  # (1 or B, T, D)
        x, temb, c = x.expand(b, -1, -1), temb.expand(b, -1), c.expand(b, -1, -1)
        for block in self.transformer_blocks:
            x, text = block(x, c, temb, store)
            c = c if text is None else text  # None after the last block (context_pre_only)
        if not output:
            return None
        x = self.proj_out(self.norm_out(x, temb))  # (B, N, p²·C)
        return rearrange(x, "b (gh gw) (p q c) -> b c (gh p) (gw q)", gh=h // p, p=p, q=p)
