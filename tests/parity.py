"""Error measures of the parity tests, printed by every failing comparison (test-only)."""

from __future__ import annotations

import torch


def errors(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """max abs error, and max abs error relative to the reference's largest magnitude (in float64)"""
    ours, ref = ours.double(), ref.double()
    abs_err = (ours - ref).abs().max().item()
    return abs_err, abs_err / ref.abs().max().item()


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return errors(ours, ref)[1]
