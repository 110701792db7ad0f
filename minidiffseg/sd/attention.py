"""Multi-head attention with diffusers' parameter names, and the attention store.

The store is an explicit argument passed down the U-Net like the timestep embedding (no hooks, no
monkeypatching). Each `Attention` knows its state-dict path (`name`), its `kind` ("self" for attn1,
"cross" for attn2) and its U-Net `level` (1, 2, 4, 8: the downsampling factor from the latent grid,
so level 1 is the 64×64 resolution of a 512² image). Where the store wants nothing, attention is
`scaled_dot_product_attention`; where it wants a layer, it computes what the store asks for:

- `cross`: cross-attention probabilities, reduced over heads on the spot and projected onto a
  few token columns: probs.mean(heads) @ token_weights, (B, HW, 77) @ (B, 77, K) -> (B, HW, K).
  `token_weights[b, t, k]` says how much token t of prompt b counts for map k (e.g. 1/n on the n
  tokens of a class name), so batched (one prompt per class, K=1) and joint (one prompt, K=C)
  modes are the same code.
- `qk`: the queries and keys of chosen self-attention layers, (B, heads, HW, d) each, so that the
  HW×HW probabilities can be applied later without ever being built (see method/refine.py).
- `probs`: the full head-averaged probabilities (B, HWq, HWk) of chosen layers (small layers,
  pictures, tests).

A diffusion transformer's joint attention (SD3's MM-DiT, sd3/mmdit.py: kind "joint") attends over the
image tokens and then the text tokens at once; it passes `image_tokens` = the number of image tokens, and
the store reads its image rows: the cross maps are its image × text block, the refinement's Q/K its image
queries with every key (method/refine.py takes the image × image block). Nothing N×N is built there either:
a map is an attention whose values are the token weights on the text keys and zeros on the image keys,
so it runs fused (`attend_values`).

Calling the U-Net several times with one store accumulates: maps are summed and counted per layer
(`count`), Q/K are appended.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class Attention(nn.Module):
    """Attention as in diffusers' `Attention` for SD1.5/SD2.x: biasless q/k/v, biased `to_out.0`.
    `upcast` (SD2.1 768-v): where probabilities are computed explicitly, QKᵀ and the softmax run in at
    least float32 (SDPA accumulates in float32 anyway)."""

    def __init__(self, query_dim: int, heads: int, context_dim: int | None = None, upcast: bool = False):
        super().__init__()
        self.heads = heads
        self.upcast = upcast
        self.kind = "self" if context_dim is None else "cross"
        self.name = ""  # state-dict path, set by the owning UNet (e.g. "mid_block.attentions.0.transformer_blocks.0.attn2")
        self.level = 0  # 1, 2, 4 or 8: latent size / this layer's spatial size; set by the owning UNet
        context_dim = context_dim or query_dim
        self.to_q = nn.Linear(query_dim, query_dim, bias=False)
        self.to_k = nn.Linear(context_dim, query_dim, bias=False)
        self.to_v = nn.Linear(context_dim, query_dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(query_dim, query_dim)])  # to_out.1 is a parameterless dropout

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                store: AttentionStore | None = None) -> torch.Tensor:
        # x: (B, N, C); context: (B, T, Cc) for cross-attention, None for self-attention
        ctx = x if context is None else context
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads)
                   for t in (self.to_q(x), self.to_k(ctx), self.to_v(ctx)))  # (B, h, N|T, d)
        if q.shape[0] != k.shape[0]:  # one latent row, B prompts (UNet.forward): the batch grows here
            b = max(q.shape[0], k.shape[0])
            q, k, v = (t.expand(b, -1, -1, -1) for t in (q, k, v))
        if store is not None and store.wants(self):
            out = store.attend(self, q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out[0](rearrange(out, "b h n d -> b n (h d)"))


def attention_probs(q: torch.Tensor, k: torch.Tensor, upcast: bool = False) -> torch.Tensor:
    """softmax(q kᵀ / √d): (B, h, N, d), (B, h, T, d) -> (B, h, N, T), the explicit path; with `upcast`
    computed in at least float32 and returned in q's dtype (diffusers' `upcast_attention`).
    The keys are scaled before the product, as the reference scales inside it: in fp16 the unscaled
    q·k of a sharp attention head can pass 65504 (inf, then NaN from the softmax) where q·k/√d cannot.
    k, not q: for cross-attention it is the small operand (T = 77 rows), and q may be a broadcast view."""
    scale = q.shape[-1] ** -0.5
    if upcast:
        wide = torch.promote_types(q.dtype, torch.float32)
        return torch.softmax(torch.matmul(q.to(wide), (k.to(wide) * scale).transpose(-1, -2)), dim=-1).to(q.dtype)
    return torch.softmax(torch.matmul(q, (k * scale).transpose(-1, -2)), dim=-1)


def attend_values(q: torch.Tensor, k: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """softmax(Q Kᵀ/√d) · values averaged over heads, fused (never N×Nk): q (B, h, N, d), k (B, h, Nk, d), values
    (B, Nk, K) the same for every head -> (B, N, K) in at least float32.

    CPU subtlety (measured, docs/design.md §6): when the value width differs from the head dim, torch's CPU SDPA
    falls back to a path that materialises the whole N×Nk matrix; so the values are padded with zero columns to
    the head dim, and wider stacks are split into head-dim-wide slices."""
    b, heads, n, d = q.shape
    dtype = torch.promote_types(values.dtype, torch.float32)
    out = torch.empty((b, n, values.shape[-1]), dtype=dtype, device=values.device)
    for start in range(0, values.shape[-1], d):  # slices of at most d columns
        a = values[..., start:start + d].to(q.dtype)  # (B, Nk, k ≤ d)
        v = F.pad(a, (0, d - a.shape[-1]))[:, None].expand(b, heads, a.shape[1], d)  # zero-pad to the head dim
        o = F.scaled_dot_product_attention(q, k, v)[..., :a.shape[-1]]  # (B, heads, N, k)
        out[..., start:start + d] = o.mean(dim=1).to(dtype)
    return out


@dataclass
class AttentionStore:
    """What to record from one or several U-Net passes; see the module docstring.

    cross:         names of cross-attention layers whose token maps are recorded
    token_weights: (B, T, K) projection of the T=77 token columns onto K maps (needed with `cross`)
    qk:            names of self-attention layers whose Q and K are kept
    probs:         names of layers whose head-averaged probabilities are kept
    """

    cross: set[str] = field(default_factory=set)
    token_weights: torch.Tensor | None = None
    qk: set[str] = field(default_factory=set)
    probs: set[str] = field(default_factory=set)
    # recordings, keyed by layer name
    cross_maps: dict[str, torch.Tensor] = field(default_factory=dict)  # (B, HW, K), summed over passes
    qk_pairs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    prob_maps: dict[str, torch.Tensor] = field(default_factory=dict)  # (B, N, T), summed over passes
    count: dict[str, int] = field(default_factory=dict)  # passes recorded per layer
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)  # (h, w) of each recorded layer
    latent_hw: tuple[int, int] | None = None  # set by the UNet at each pass

    def wants(self, layer) -> bool:  # an Attention (sd/attention.py) or an MM-DiT attention (sd3/mmdit.py)
        return layer.name in self.cross or layer.name in self.qk or layer.name in self.probs

    def attend(self, layer, q, k, v, image_tokens: int | None = None) -> torch.Tensor:
        """Attention output for `layer`, recording what was asked for. q: (B, h, N, d).
        `image_tokens` (a joint attention): q, k, v hold that many image tokens, then the text tokens."""
        name = layer.name
        self.count[name] = self.count.get(name, 0) + 1
        if self.latent_hw is not None:
            self.shapes[name] = (self.latent_hw[0] // layer.level, self.latent_hw[1] // layer.level)
        if image_tokens is not None:
            return self._attend_joint(name, q, k, v, image_tokens)
        if name in self.qk:
            self.qk_pairs.setdefault(name, []).append((q, k))
        if name not in self.cross and name not in self.probs:
            return F.scaled_dot_product_attention(q, k, v)
        p = attention_probs(q, k, layer.upcast)  # (B, h, N, T)
        mean = p.mean(dim=1)  # (B, N, T): heads averaged as soon as recorded
        if name in self.probs:
            self._add(self.prob_maps, name, mean)
        if name in self.cross:
            if self.token_weights is None:
                raise ValueError("AttentionStore.cross needs token_weights (B, T, K)")
            w = self.token_weights.to(mean.dtype)
            self._add(self.cross_maps, name, torch.bmm(mean, w.expand(mean.shape[0], -1, -1)))  # (B, N, K)
        return torch.matmul(p, v)

    def _attend_joint(self, name: str, q, k, v, n: int) -> torch.Tensor:
        """A joint attention's output, recording from its n image rows: the cross maps over the text keys
        (the weights as values, zeros on the image keys), the probabilities of every text token (`probs`),
        the image queries with all keys (`qk`)."""
        q_img = q[:, :, :n]  # (B, h, n, d)
        if name in self.qk:
            self.qk_pairs.setdefault(name, []).append((q_img, k))
        text = k.shape[2] - n
        if name in self.cross:
            if self.token_weights is None:
                raise ValueError("AttentionStore.cross needs token_weights (B, T, K)")
            w = self.token_weights.to(q.dtype).expand(q.shape[0], -1, -1)  # (B, T, K)
            if w.shape[1] != text:
                raise ValueError(f"token_weights has {w.shape[1]} token rows, the joint attention {text} text keys")
            self._add(self.cross_maps, name, attend_values(q_img, k, F.pad(w, (0, 0, n, 0))))  # (B, n, K)
        if name in self.probs:
            eye = torch.eye(text, dtype=q.dtype, device=q.device).expand(q.shape[0], -1, -1)
            self._add(self.prob_maps, name, attend_values(q_img, k, F.pad(eye, (0, 0, n, 0))))  # (B, n, T)
        return F.scaled_dot_product_attention(q, k, v)

    @staticmethod
    def _add(maps: dict, name: str, value: torch.Tensor) -> None:
        maps[name] = value if name not in maps else maps[name] + value

    def mean(self, maps: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        """A recorded map averaged over the passes that recorded it."""
        return maps[name] / self.count[name]
