"""DiffSegmenter end to end (docs/design.md §2, §5): image + class names -> per-pixel class mask and scores.

    image ─stretch to 512²─► VAE ─► z0 ─noise at t=100─► z_t ──┐
    classes ─prompts ("a photograph of {c}", "++")─► CLIP ─────┴► U-Net (one pass, C rows) + store
    store ─► fused cross-attention A (C, 64, 64) ─► refined M = S·A ─► upsample, min-max ─► argmax vs τ

One U-Net call serves all classes of an image (batch C, conditional prompts only: the official
unconditional half is discarded there anyway), or a single row in *joint* mode (one prompt naming
every class). Nothing HW×HW is built: the store keeps Q and K of the 64² self-attention layers and
the refinement runs as fused attention (method/refine.py).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..sd.attention import AttentionStore
from ..errors import UserError
from ..image import load_image, to_tensor
from .decision import DEFAULT_BACKGROUND, decide, upsample_scores
from .fusion import DEFAULT_LEVEL_WEIGHTS, fuse, level_maps
from .prompts import CLASS_WEIGHT, TEMPLATES, ClassPrompt, check_classes, joint_prompt, reweight, \
    template_prompt, user_prompt
from .refine import refine

TIMESTEP = 100  # the official single noise level


@dataclass
class SegmentationResult:
    classes: list[str]
    prompts: list[str]  # the text each row of the U-Net batch saw (one in joint mode)
    scores: torch.Tensor  # (C, H, W) float in [0, 1] at the input image's size
    mask: torch.Tensor  # (H, W) int64: 0 = background, i = classes[i-1]
    background: float  # τ used for `mask`
    cross: torch.Tensor  # (C, h, w) fused cross-attention maps A on the latent grid (64² at 512²)
    refined: torch.Tensor  # (C, h, w) M = S·A on the latent grid, before upsampling and min-max
    levels: dict[int, torch.Tensor] = field(default_factory=dict)  # {level: (C, h_l, w_l)} per-level means
    layers: dict[str, torch.Tensor] = field(default_factory=dict)  # {layer name: (C, h_l, w_l)} per layer

    def area(self) -> dict[str, float]:
        """Fraction of the image given to each class (background under key "background")."""
        counts = torch.bincount(self.mask.flatten(), minlength=len(self.classes) + 1).double() / self.mask.numel()
        return dict(zip(["background", *self.classes], counts.tolist()))


def cpu_dtype(dtype: torch.dtype, device: str | torch.device) -> torch.dtype:
    """fp16 matmuls on CPU are ~400× slower than fp32 (docs/design.md §6): compute in bf16 there instead."""
    if torch.device(device).type == "cpu" and dtype == torch.float16:
        print("minidiffseg: float16 is extremely slow on CPU; computing in bfloat16 instead "
              "(use --dtype fp32 for full precision)", file=sys.stderr)
        return torch.bfloat16
    return dtype


class Segmenter:
    """Holds the SD1.5 models and the method's settings; `seg(image, classes)` segments one image.

    resolution:    side of the square the image is stretched to (multiple of 64; official 512)
    timesteps:     noise levels whose attention is averaged (official: (100,); paper Table 5 also
                   tries (1, 50, 100, 150))
    template:      prompt template with '{}' (TEMPLATES: "a photograph of {}" VOC, "a photography of {}")
    level_weights: fusion weight per U-Net level (1 = 64² ... 8 = 8² at 512²)
    self_levels:   levels whose self-attention forms S (official: the 64² layers only)
    tokens:        "last" (official) or "all" tokens of the class name
    class_weight:  weight on the class's last word ("++" = 1.21; 1.0 disables)
    joint:         one prompt naming all classes and a U-Net batch of 1, instead of one row per class
    class_batch:   at most this many classes per U-Net call (bounds memory; None = all at once)
    """

    default_background = DEFAULT_BACKGROUND

    def __init__(self, sd, *, resolution: int = 512, timesteps: tuple[int, ...] = (TIMESTEP,),
                 template: str = TEMPLATES["photograph"], level_weights: dict[int, float] = DEFAULT_LEVEL_WEIGHTS,
                 self_levels: tuple[int, ...] = (1,), tokens: str = "last", class_weight: float = CLASS_WEIGHT,
                 ing: bool = True, joint: bool = False, class_batch: int | None = None):
        if resolution % 64 or resolution <= 0:
            raise UserError(f"resolution {resolution} must be a positive multiple of 64 (SD1.5's VAE ×8 and U-Net ×8)")
        self.sd = sd
        self.resolution = resolution
        self.timesteps = tuple(timesteps)
        self.template = template
        self.level_weights = dict(level_weights)
        self.self_levels = tuple(self_levels)
        self.prompt_options = dict(tokens=tokens, class_weight=class_weight, ing=ing)
        self.joint = joint
        self.class_batch = class_batch
        unet = sd.unet
        self.cross_layers = {m.name for m in unet.attention_layers("cross") if m.level in self.level_weights}
        self.self_layers = {m.name for m in unet.attention_layers("self") if m.level in self.self_levels}
        self.levels = {m.name: m.level for m in unet.attention_layers()}
        self._text_cache: dict[tuple, torch.Tensor] = {}  # prompt rows -> re-weighted embeddings

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str = "cpu", dtype: torch.dtype = torch.float32,
                        **options) -> "Segmenter":
        from ..sd import load_sd15

        return cls(load_sd15(path, device=device, dtype=cpu_dtype(dtype, device)), **options)

    @property
    def device(self) -> torch.device:
        return next(self.sd.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.sd.unet.parameters()).dtype

    # ---- stages -------------------------------------------------------------------------------

    def prompts(self, classes: list[str], prompts: list[str] | None = None,
                captions: list[str] | None = None, joint: bool = False) -> list[ClassPrompt]:
        tok, opts = self.sd.tokenizer, self.prompt_options
        for what, given in (("prompts", prompts), ("captions", captions)):
            if given is not None and len(given) != len(classes):
                raise UserError(f"{len(given)} {what} for {len(classes)} classes: give one per class")
        if joint:
            if prompts is not None or captions is not None:
                raise UserError("joint mode builds one prompt for all classes: per-class prompts/captions don't apply")
            return [joint_prompt(tok, classes, self.template, **opts)]
        if prompts is not None:
            return [user_prompt(tok, c, p, **opts) for c, p in zip(classes, prompts)]
        caps = captions or [None] * len(classes)
        return [template_prompt(tok, c, self.template, caption, **opts) for c, caption in zip(classes, caps)]

    def encode_text(self, rows: list[ClassPrompt]) -> torch.Tensor:
        """(B, 77, D) re-weighted text embeddings; the same classes on many images are encoded once."""
        key = tuple((r.text, tuple(r.weights.tolist())) for r in rows)
        if key not in self._text_cache:
            sd = self.sd
            if len(self._text_cache) > 64:  # bounded: prompts with per-image captions never repeat
                self._text_cache.clear()
            z_empty = sd.text_encoder(sd.tokenizer([""]).to(self.device))  # z∅ (1, 77, D)
            z = sd.text_encoder(sd.tokenizer([r.text for r in rows]).to(self.device))
            w = torch.stack([r.weights for r in rows]).to(self.device)
            self._text_cache[key] = reweight(z, z_empty, w)
        return self._text_cache[key]

    def encode_image(self, x: torch.Tensor, generator: torch.Generator, latent: str) -> torch.Tensor:
        """x (1, 3, H, W) in [0, 1] -> z0 (1, 4, h, w): stretch to resolution², 2x−1, VAE, ×0.18215."""
        if latent not in ("sample", "mean"):
            raise UserError(f"latent {latent!r} is unknown: use 'sample' (official) or 'mean'")
        r = self.resolution
        x = F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False)  # §5: no antialias
        x = (2 * x - 1).to(self.device, self.dtype)
        return self.sd.vae.encode(x, generator=generator, sample=latent == "sample")

    def attend(self, z0: torch.Tensor, noises: list[torch.Tensor], context: torch.Tensor,
               select: torch.Tensor):
        """One U-Net pass per timestep for B prompt rows; returns the fused maps A (B, K, h, w), the
        refined maps M (B, K, h, w), and the per-level and per-layer maps."""
        b = context.shape[0]
        store = AttentionStore(cross=self.cross_layers, token_weights=select.to(self.device, self.dtype),
                               qk=self.self_layers)
        for t, noise in zip(self.timesteps, noises):
            z_t = self.sd.schedule.add_noise(z0, noise.to(z0), t)
            self.sd.unet(z_t, t, context, store=store, output=False)  # z_t (1, …): batch broadcasts
        size = tuple(z0.shape[-2:])
        maps = level_maps(store.cross_maps, store.count, self.levels, store.shapes)
        a = fuse(maps, size, self.level_weights)  # (B, K, h, w)
        qk = [pair for name in sorted(self.self_layers) for pair in store.qk_pairs[name]]
        m = refine(qk, a.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(a.shape)  # (B, K, h, w)
        layers = {n: (store.cross_maps[n] / store.count[n]).transpose(1, 2).reshape(b, -1, *store.shapes[n])
                  for n in store.cross_maps}
        return a, m, maps, layers

    # ---- the whole method ---------------------------------------------------------------------

    @torch.inference_mode()
    def seg(self, image, classes: list[str], *, prompts: list[str] | None = None,
            captions: list[str] | None = None, seed: int = 0, background: float | None = None,
            latent: str = "sample", noise: torch.Tensor | None = None,
            joint: bool | None = None) -> SegmentationResult:
        """Segment `image` (PIL image or path) into `classes` (+ background).

        prompts:  per-class prompt strings replacing the template (the class word is still located
                  and re-weighted); captions: per-class caption continuations of the template.
        seed:     seeds the VAE posterior sample and the noise draw (deterministic for a seed).
        latent:   "sample" (official) or "mean" of the VAE posterior.
        noise:    (1, 4, h, w) used instead of the seeded draw (one per timestep: (T, 4, h, w)).
        """
        classes = check_classes(classes)
        joint = self.joint if joint is None else joint
        background = self.default_background if background is None else float(background)
        img = load_image(image)
        rows = self.prompts(classes, prompts, captions, joint)
        generator = torch.Generator().manual_seed(int(seed))
        z0 = self.encode_image(to_tensor(img, torch.promote_types(self.dtype, torch.float32)), generator, latent)
        noises = self._noises(z0, generator, noise)
        outs = []
        step = len(rows) if self.class_batch is None else self.class_batch
        for i in range(0, len(rows), step):  # one U-Net call per group of rows
            group = rows[i:i + step]
            select = torch.stack([r.select for r in group])  # (B, 77, K)
            outs.append(self.attend(z0, noises, self.encode_text(group), select))
        # rows × maps -> classes: batched mode has B=C, K=1; joint mode B=1, K=C
        a, m = (torch.cat([o[j] for o in outs]).flatten(0, 1) for j in (0, 1))  # (C, h, w)
        maps = {lvl: torch.cat([o[2][lvl] for o in outs]).flatten(0, 1) for lvl in outs[0][2]}
        layers = {n: torch.cat([o[3][n] for o in outs]).flatten(0, 1) for n in outs[0][3]}
        scores = upsample_scores(m, (img.height, img.width))
        return SegmentationResult(classes, [r.text for r in rows], scores, decide(scores, background), background,
                                  a.float(), m.float(), {k: v.float() for k, v in maps.items()},
                                  {k: v.float() for k, v in layers.items()})

    def _noises(self, z0: torch.Tensor, generator: torch.Generator, noise: torch.Tensor | None) -> list[torch.Tensor]:
        """One noise draw per timestep, shared by all classes of the image (CPU generator: the same
        numbers on every device)."""
        shape = (len(self.timesteps), *z0.shape[1:])
        if noise is None:
            return list(torch.randn(shape, generator=generator, dtype=torch.float32)[:, None])
        noise = torch.as_tensor(noise)
        if noise.dim() == 3:
            noise = noise[None]
        if tuple(noise.shape) != shape and not (noise.shape[0] == 1 and tuple(noise.shape[1:]) == shape[1:]):
            raise UserError(f"noise has shape {tuple(noise.shape)}, expected {shape} (one per timestep) "
                            f"for a {self.resolution}² image")
        return list(noise.expand(shape)[:, None])
