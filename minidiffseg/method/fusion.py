"""Cross-attention fusion (docs/design.md §5 "cross maps"): A is computed here and only
here (`fused_map`). Per layer, the recorded token maps averaged over the passes (heads were averaged as
they were recorded, sd/attention.py); per level, the mean over its layers → bilinear to the latent grid
→ min-max → weighted sum over levels with the recipe's `level_weights` (method/recipe.py).

Levels, not pixel sizes: level 8 is the 8×8 map of a 512² image (64×64 latent), level 1 the 64×64
one, so any input size (multiple of 64) and the tiny test config fuse the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..sd.attention import AttentionStore
from .recipe import DEFAULT_LEVEL_WEIGHTS


def fused_map(store: AttentionStore, levels: dict[str, int], weights: dict[int, float], size: tuple[int, int]
              ) -> tuple[torch.Tensor, dict[int, torch.Tensor], dict[str, torch.Tensor]]:
    """A (B, K, h, w) on the latent grid `size` from the store's recorded cross maps, with the
    per-level {level: (B, K, h_l, w_l)} and per-layer {name: (B, K, h_l, w_l)} maps it was fused from."""
    layers = {name: layer_map(store, name) for name in store.cross_maps}
    by_level = level_maps(layers, levels)
    return fuse(by_level, size, weights), by_level, layers


def layer_map(store: AttentionStore, name: str) -> torch.Tensor:
    """Layer `name`'s token maps averaged over the passes, on its own grid: (B, K, h_l, w_l)."""
    m = store.mean(store.cross_maps, name)  # (B, h_l·w_l, K)
    return m.transpose(1, 2).reshape(m.shape[0], m.shape[2], *store.shapes[name])


def minmax(x: torch.Tensor, dims=(-2, -1)) -> torch.Tensor:
    """Rescale each map to [0, 1] over `dims`. A map that is constant up to rounding (its range
    within 16 ulps of its magnitude, e.g. a constant map after bilinear resizing) becomes 0, rather
    than rounding noise stretched to [0, 1]."""
    lo = x.amin(dim=dims, keepdim=True)
    hi = x.amax(dim=dims, keepdim=True)
    span = hi - lo
    flat = span <= 16 * torch.finfo(x.dtype).eps * torch.maximum(hi.abs(), lo.abs())
    return torch.where(flat, torch.zeros_like(x), (x - lo) / span.clamp_min(torch.finfo(x.dtype).tiny))


def level_maps(layers: dict[str, torch.Tensor], levels: dict[str, int]) -> dict[int, torch.Tensor]:
    """Mean over the layers of each level: {layer name: (B, K, h_l, w_l)} -> {level: (B, K, h_l, w_l)}."""
    by_level: dict[int, list[torch.Tensor]] = {}
    for name, m in layers.items():
        by_level.setdefault(levels[name], []).append(m)
    out = {}
    for level, maps in by_level.items():
        # averaged in the store's (B, h_l·w_l, K) layout: CPU reductions round by memory layout, and this one
        # keeps every bit of the results the project has always produced
        mean = torch.stack([m.flatten(2).transpose(1, 2) for m in maps]).mean(0)  # (B, HW, K)
        out[level] = mean.transpose(1, 2).reshape(maps[0].shape)
    return out


def fuse(maps: dict[int, torch.Tensor], size: tuple[int, int],
         weights: dict[int, float] = DEFAULT_LEVEL_WEIGHTS) -> torch.Tensor:
    """{level: (B, K, h_l, w_l)} -> A (B, K, h, w) on the latent grid `size`, Σ_l weight_l · minmax(up(map_l))."""
    missing = [lvl for lvl in weights if lvl not in maps]
    if missing:
        raise ValueError(f"fusion weights name levels {missing} that were not recorded (have {sorted(maps)})")
    ups = torch.stack([minmax(F.interpolate(maps[lvl].to(torch.promote_types(maps[lvl].dtype, torch.float32)),
                                            size=size, mode="bilinear", align_corners=False))
                       for lvl in weights])  # (levels, B, K, h, w), at least fp32
    w = torch.tensor(list(weights.values()), dtype=ups.dtype, device=ups.device)
    return torch.einsum("l,lbkhw->bkhw", w, ups)
