"""Fully connected CRF refinement of the score maps into pseudo-labels (Krähenbühl & Koltun, "Efficient
Inference in Fully Connected CRFs with Gaussian Edge Potentials", NeurIPS 2011; docs/crf.md).

Energy over labels x of the N pixels, with Potts compatibility [x_i != x_j]:

    E(x) = Σ_i U_i(x_i) + Σ_{i,j} [x_i != x_j] (w_a k_a(i, j) + w_s k_s(i, j))
    k_a = exp(-|p_i - p_j|² / 2θ_a² - |I_i - I_j|² / 2θ_rgb²)   appearance: position p and colour I
    k_s = exp(-|p_i - p_j|² / 2θ_s²)                              smoothness: position only

Mean-field inference (docs/crf.md §1): Q = softmax(-U), then each iteration
Q = softmax(-U + Σ_k w_k K̃_k Q), where K̃ = D^-1/2 K D^-1/2 is the kernel normalised by its row sums
D (the reference code's default, NORMALIZE_SYMMETRIC) and K Q is filtered on the permutohedral lattice.
The unary comes from our scores and τ (docs/crf.md §2): `probabilities` below.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import UserError
from .permutohedral import Exact, Lattice

# Probabilities are clipped at this before the log, as pydensecrf's unary_from_softmax (its default clip).
MIN_PROB = 1e-5
# More iterations than this are refused: mean field settles in 5-10 (the presets' counts); 100 is 10× that.
MAX_ITERATIONS = 100
# The ignore index of VOC labels, mmsegmentation and DeepLab data loaders.
IGNORE = 255


@dataclass(frozen=True)
class CRFParams:
    """One CRF configuration. Widths are in pixels (θ_a, θ_s) and colour levels 0..255 (θ_rgb)."""

    iterations: int  # mean-field iterations
    smooth_xy: float  # θ_s, smoothness kernel width (pydensecrf addPairwiseGaussian sxy)
    smooth_w: float  # w_s, its Potts weight (compat)
    appear_xy: float  # θ_a, appearance kernel's position width (addPairwiseBilateral sxy)
    appear_rgb: float  # θ_rgb, its colour width (srgb)
    appear_w: float  # w_a, its Potts weight (compat)
    unary: str = "scores"  # "scores": -log of `probabilities`; "labels": hard argmax labels (CLIMS)
    label_prob: float = 0.7  # with unary "labels": probability of the argmax label (pydensecrf gt_prob)

    def __post_init__(self):
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) \
                or not 1 <= self.iterations <= MAX_ITERATIONS:
            raise UserError(f"CRF iterations {self.iterations!r}: give a whole number in 1..{MAX_ITERATIONS}")
        for name in ("smooth_xy", "appear_xy", "appear_rgb"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise UserError(f"CRF kernel width {name}={v!r}: give a positive number")
        for name in ("smooth_w", "appear_w"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise UserError(f"CRF weight {name}={v!r}: give a number >= 0")
        if self.unary not in ("scores", "labels"):
            raise UserError(f"CRF unary {self.unary!r}: give scores or labels")
        if not 0 < self.label_prob < 1:
            raise UserError(f"CRF label_prob {self.label_prob!r}: give a probability strictly between 0 and 1")


PRESETS = {
    # The authors' densecrf example (dense_inference.cpp: addPairwiseGaussian(3, 3, Potts(3)),
    # addPairwiseBilateral(80, 80, 13, 13, 13, Potts(10)), map(5)), repeated as pydensecrf's README defaults.
    "densecrf": CRFParams(iterations=5, smooth_xy=3, smooth_w=3, appear_xy=80, appear_rgb=13, appear_w=10),
    # CLIP-ES (Lin et al., CVPR 2023) eval_cam_with_crf.py: DeepLab's VOC post-processing values.
    "clip-es": CRFParams(iterations=10, smooth_xy=1, smooth_w=3, appear_xy=67, appear_rgb=3, appear_w=4),
    # CLIMS (Xie et al., CVPR 2022) misc/imutils.crf_inference_label (IRN's): a CRF over hard labels.
    "clims": CRFParams(iterations=10, smooth_xy=3, smooth_w=3, appear_xy=50, appear_rgb=5, appear_w=10,
                       unary="labels", label_prob=0.7),
}
DEFAULT_PRESET = "clip-es"  # the protocol the paper's WSSS table follows


def parse(spec: str) -> CRFParams:
    """"PRESET" or "PRESET,key=value,..." (keys: CRFParams' fields), e.g. "clip-es,iterations=5"."""
    name, *overrides = [p.strip() for p in str(spec).split(",")]
    if name not in PRESETS:
        raise UserError(f"CRF preset {name!r} is unknown: use one of {', '.join(PRESETS)} "
                        f"(optionally followed by ,key=value overrides)")
    fields = {f.name: f.type for f in dataclasses.fields(CRFParams)}
    changes: dict[str, Any] = {}  # field name -> its new value
    for item in overrides:
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in fields:
            raise UserError(f"CRF setting {item!r}: write key=value with key one of {', '.join(fields)}")
        try:
            changes[key] = value.strip() if key == "unary" else int(value) if key == "iterations" else float(value)
        except ValueError:
            raise UserError(f"CRF setting {item!r}: {value.strip()!r} is not a number") from None
    return dataclasses.replace(PRESETS[name], **changes)


def describe(params: CRFParams) -> str:
    """One line for reports: the preset's name if it is one, and every value."""
    name = next((k for k, v in PRESETS.items() if v == params), "custom")
    values = ", ".join(f"{f.name}={getattr(params, f.name)}" for f in dataclasses.fields(CRFParams)
                       if params.unary == "labels" or f.name != "label_prob")
    return f"{name} ({values})"


def probabilities(scores: torch.Tensor, tau: float | None) -> torch.Tensor:
    """Per-pixel label distribution from our decision: (C, H, W) scores in [0, 1] and background τ ->
    (K, H, W), K = C + 1 with label 0 the background (K = C when τ is None: no background class).

    p_k = max(x_k, 1e-5) / Σ_j max(x_j, 1e-5) over x = [τ, s_1, ..., s_C]: the scores read as unnormalised
    likelihoods, exactly what pydensecrf makes of CLIP-ES's [bg, cams] (clip, -log, softmax). Its argmax
    is our mask's (decision.decide)."""
    x = scores.float()
    if tau is not None:
        x = torch.cat([torch.full_like(x[:1], float(tau)), x])
    x = x.clamp(min=MIN_PROB)
    return x / x.sum(0, keepdim=True)


def rgb_array(image) -> torch.Tensor:
    """PIL image or (H, W, 3) uint8 tensor/array -> (H, W, 3) uint8 tensor."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    x = image if isinstance(image, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(image))
    if x.ndim != 3 or x.shape[2] != 3 or x.dtype != torch.uint8:
        raise ValueError(f"image: expected (H, W, 3) uint8, got {tuple(x.shape)} {x.dtype}")
    return x


class DenseCRF:
    """The CRF of one image: both kernels' lattices and normalisations are built once, then `__call__`
    runs mean field from any unary of that image's size. `gaussian=Exact` filters by brute force
    instead of the lattice (small images only: it measures what the lattice's approximation changes)."""

    def __init__(self, image, params: CRFParams, device: str | torch.device | None = None,
                 gaussian: type[Lattice] | type[Exact] = Lattice):
        img = rgb_array(image)
        self.params, self.height, self.width = params, img.shape[0], img.shape[1]
        device = torch.device(device) if device is not None else img.device
        # Features as the reference builds them (DenseCRF2D): column x / θ, row y / θ, colour / θ_rgb, float32.
        ys, xs = torch.meshgrid(torch.arange(self.height, dtype=torch.float32, device=device),
                                torch.arange(self.width, dtype=torch.float32, device=device), indexing="ij")
        xy = torch.stack([xs.flatten(), ys.flatten()], 1)  # (N, 2)
        rgb = img.to(device).reshape(-1, 3).float()  # (N, 3)
        def width(v: float) -> torch.Tensor:  # a C float, as the reference receives it
            return torch.tensor(v, dtype=torch.float32, device=device)

        self.kernels = []  # (weight, lattice, norm (N, 1)); smoothness first, as the reference's users add it
        appearance = torch.cat([xy / width(params.appear_xy), rgb / width(params.appear_rgb)], 1)  # (N, 5)
        for w, feats in ((params.smooth_w, xy / width(params.smooth_xy)), (params.appear_w, appearance)):
            if w == 0:
                continue
            try:
                lattice = gaussian(feats)
            except ValueError as e:  # keys beyond 64 bits: widths tiny for the image
                raise UserError(f"CRF {describe(params)}: {e}") from None
            norm = 1.0 / torch.sqrt(lattice.filter(torch.ones(len(feats), 1, device=device)) + 1e-20)
            self.kernels.append((float(w), lattice, norm))
        self.device = device

    def unary(self, probs: torch.Tensor) -> torch.Tensor:
        """(K, H, W) probabilities -> (N, K) energies -log p, per the preset's unary."""
        p = probs.to(self.device, torch.float32).flatten(1).T  # (N, K)
        if self.params.unary == "labels" and p.shape[1] > 1:
            g, k = self.params.label_prob, p.shape[1]
            hard = torch.full_like(p, (1 - g) / (k - 1))
            p = hard.scatter_(1, p.argmax(1, keepdim=True), g)
        return -torch.log(p.clamp(MIN_PROB, 1.0))

    def message(self, q: torch.Tensor) -> torch.Tensor:
        """Σ_k w_k D^-1/2 K_k D^-1/2 Q: (N, K) -> (N, K)."""
        out = torch.zeros_like(q)
        for w, lattice, norm in self.kernels:
            out += w * norm * lattice.filter(norm * q)
        return out

    @torch.no_grad()
    def __call__(self, probs: torch.Tensor) -> torch.Tensor:
        """(K, H, W) label probabilities -> (K, H, W) mean-field marginals Q after the iterations."""
        if tuple(probs.shape[1:]) != (self.height, self.width):
            raise ValueError(f"probabilities {tuple(probs.shape)} do not match the image {self.height}x{self.width}")
        u = self.unary(probs)
        q = torch.softmax(-u, 1)
        for _ in range(self.params.iterations):
            q = torch.softmax(-u + self.message(q), 1)
        return q.T.reshape(-1, self.height, self.width)


def check_ignore_below(p: float | None) -> None:
    """The --ignore-below threshold: a probability in (0, 1], or None (no ignore label)."""
    if p is not None and not 0 < p <= 1:
        raise UserError(f"--ignore-below {p}: give a probability in (0, 1] (pixels whose top probability is below "
                        f"it become {IGNORE})")


def pseudo_labels(image, scores: torch.Tensor, tau: float | None, crf: CRFParams | None = None,
                  ignore_below: float | None = None,
                  device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (C, H, W) + τ -> (labels, mask), both (H, W) int64 on the CPU: labels in 0..K-1 (0 = background
    when τ is given), the argmax of the CRF's marginals (of `probabilities` without a CRF); mask the same
    with IGNORE where the top probability is below `ignore_below`."""
    check_ignore_below(ignore_below)
    probs = probabilities(scores, tau)
    if crf is not None:
        probs = DenseCRF(image, crf, device=device or scores.device)(probs)
    top, labels = probs.max(0)
    mask = labels if ignore_below is None else torch.where(top < ignore_below, IGNORE, labels)
    return labels.cpu(), mask.cpu()
