"""Self-attention refinement (docs/design.md §5, §6): M = S·A with S the mean over the 64×64
self-attention layers and their heads of softmax(Q Kᵀ/√d) (each row sums to 1).

S is HW×HW (4096² = 16.7 M entries per layer and head); it is never built. Because M is linear in S,
M = mean_{l,h} softmax(Q_lh K_lhᵀ/√d) · A is exactly an attention with the class maps A as values, so
it runs as fused `scaled_dot_product_attention`: memory O(HW·C) instead of O(HW²).

CPU subtlety (measured, docs/design.md §6): when the value width differs from the head dim, torch's CPU
SDPA silently falls back to a path that materialises the whole HW×HW matrix (1.7 s, +1.2 GB for
C=4 here; 0.16 s, +9 MB with the width padded to the head dim). So the class maps are padded with
zero columns to the head dim, and wider stacks are split into head-dim-wide slices.
`refine_chunked` is the portable alternative (row blocks, bounded memory); `refine_naive` builds S
and exists for tests and the benchmark only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

QK = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (and timestep): q, k each (B, heads, HW, d)


def refine(qk: QK, maps: torch.Tensor) -> torch.Tensor:
    """maps A (B, HW, K) -> M (B, HW, K) = mean over layers and heads of softmax(QKᵀ/√d)·A, fused.

    A layer whose Q/K have batch 1 (the U-Net's first self-attention, before any text: the same for
    every prompt row) is applied once to all B·K maps as columns."""
    out = torch.zeros(maps.shape, dtype=torch.promote_types(maps.dtype, torch.float32), device=maps.device)
    b, n, kk = maps.shape
    for q, k in qk:
        if q.shape[0] == 1 and b > 1:  # shared by all rows: (B, HW, K) -> (1, HW, B·K) and back
            cols = maps.transpose(0, 1).reshape(1, n, b * kk)
            out += _attend(q, k, cols, out.dtype).reshape(n, b, kk).transpose(0, 1)
        else:
            out += _attend(q, k, maps, out.dtype)
    return (out / len(qk)).to(maps.dtype)


def _attend(q: torch.Tensor, k: torch.Tensor, maps: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """softmax(QKᵀ/√d)·A averaged over heads: q, k (B, heads, HW, d), maps (B, HW, K) -> (B, HW, K)."""
    b, heads, n, d = q.shape
    out = torch.empty(maps.shape, dtype=dtype, device=maps.device)
    for start in range(0, maps.shape[-1], d):  # slices of at most d columns
        a = maps[..., start:start + d].to(q.dtype)  # (B, HW, k ≤ d)
        v = F.pad(a, (0, d - a.shape[-1]))[:, None].expand(b, heads, n, d)  # zero-pad to the head dim
        o = F.scaled_dot_product_attention(q, k, v)[..., :a.shape[-1]]  # (B, heads, HW, k)
        out[..., start:start + d] = o.mean(dim=1).to(dtype)
    return out


def refine_chunked(qk: QK, maps: torch.Tensor, rows: int = 1024) -> torch.Tensor:
    """Same as `refine`, in blocks of `rows` query rows: extra memory O(rows·HW) per head."""
    out = torch.zeros_like(maps)
    for q, k in qk:
        scale = q.shape[-1] ** -0.5
        a = maps.to(q.dtype)[:, None]  # (B, 1, HW, K)
        for start in range(0, q.shape[2], rows):
            p = torch.softmax(q[:, :, start:start + rows] @ k.transpose(-1, -2) * scale, dim=-1)  # (B, h, rows, HW)
            out[:, start:start + rows] += (p @ a).mean(dim=1).to(out.dtype)
    return out / len(qk)


def self_attention_matrix(qk: QK) -> torch.Tensor:
    """S (B, HW, HW): the mean over layers and heads of the self-attention probabilities. Tests/bench only."""
    s: torch.Tensor | None = None
    for q, k in qk:
        p = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1).mean(dim=1)
        s = p if s is None else s + p
    if s is None:
        raise ValueError("self_attention_matrix: no self-attention layer (qk is empty)")
    return s / len(qk)


def refine_naive(qk: QK, maps: torch.Tensor) -> torch.Tensor:
    """M = S·A with S built in full (the official code's way): O(HW²) memory."""
    return self_attention_matrix(qk).to(maps.dtype) @ maps
