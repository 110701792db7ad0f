"""The last step of the method (docs/design.md §5 "output", "decision"): the refined maps M on the latent
grid become per-pixel class scores at the image's size, and the mask is the argmax against a constant
background score τ."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .fusion import minmax


def upsample_scores(refined: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """M (C, h, w) on the latent grid -> scores (C, H, W): bilinear (align_corners=False), then per-class min-max."""
    x = refined.to(torch.promote_types(refined.dtype, torch.float32))[None]
    return minmax(F.interpolate(x, size=size, mode="bilinear", align_corners=False))[0]


def decide(scores: torch.Tensor, tau: float) -> torch.Tensor:
    """argmax over [τ, scores_1..scores_C] -> (H, W) int64, 0 = background."""
    background = torch.full_like(scores[:1], float(tau))
    return torch.cat([background, scores]).argmax(dim=0)
