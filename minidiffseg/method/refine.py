"""Self-attention refinement (docs/design.md §5, §6): M = S·A with S the mean over the 64×64
self-attention layers and their heads of softmax(Q Kᵀ/√d) (each row sums to 1).

S is HW×HW (4096² = 16.7 M entries per layer and head); it is never built. Because M is linear in S,
M = mean_{l,h} softmax(Q_lh K_lhᵀ/√d) · A is exactly an attention with the class maps A as values, so
it runs as fused `scaled_dot_product_attention`: memory O(HW·C) instead of O(HW²).

The fused attention is sd/attention.py's `attend_values`, which pads the class maps to the head dim
(torch's CPU SDPA otherwise materialises the whole HW×HW matrix: 1.7 s, +1.2 GB for C=4 where padded it
takes 0.16 s, +9 MB; measured, docs/design.md §6).
`refine_chunked` is the portable alternative (row blocks, bounded memory); `refine_naive` builds S
and exists for tests and the benchmark only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..sd.attention import attend_values

QK = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (and timestep): q, k each (B, heads, HW, d)


def refine(qk: QK, maps: torch.Tensor, renormalise: bool = True) -> torch.Tensor:
    """maps A (B, HW, K) -> M (B, HW, K) = mean over layers and heads of softmax(QKᵀ/√d)·A, fused.

    A layer whose Q/K have batch 1 (the U-Net's first self-attention, before any text: the same for
    every prompt row) is applied once to all B·K maps as columns.

    A joint attention's pair (an MM-DiT's, sd/attention.py): its HW image queries with all HW + T keys, the
    image keys first. S is the image × image block of the head-averaged joint softmax; the text keys take part
    of each row's mass, and `renormalise` divides each row of S by what its image keys kept, so that rows sum to
    1 as a U-Net's do (docs/sd3.md §3). Still one fused attention: the values are A with a column of ones on the
    image keys and zeros on the text keys, whose output is the row mass."""
    out = torch.zeros(maps.shape, dtype=torch.promote_types(maps.dtype, torch.float32), device=maps.device)
    b, n, kk = maps.shape
    for q, k in qk:
        if k.shape[2] > q.shape[2]:  # joint: image keys, then text keys
            values = F.pad(torch.cat([maps, torch.ones_like(maps[..., :1])], dim=-1), (0, 0, 0, k.shape[2] - n))
            o = attend_values(q, k, values)  # (B, HW, K + 1): S·A, and each row's mass on the image keys
            out += o[..., :kk] / o[..., kk:] if renormalise else o[..., :kk]
        elif q.shape[0] == 1 and b > 1:  # shared by all rows: (B, HW, K) -> (1, HW, B·K) and back
            cols = maps.transpose(0, 1).reshape(1, n, b * kk)
            out += attend_values(q, k, cols).reshape(n, b, kk).transpose(0, 1)
        else:
            out += attend_values(q, k, maps)
    return (out / len(qk)).to(maps.dtype)


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
