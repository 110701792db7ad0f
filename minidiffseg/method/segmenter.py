"""DiffSegmenter end to end (docs/design.md §2, §5): image + class names -> per-pixel class mask and scores.

    image ─stretch to 512²─► VAE ─► z0 ─noise at t=100─► z_t ──┐
    classes ─prompts ("a photograph of {c}", "++")─► CLIP ─────┴► U-Net (one pass, C rows) + store
    store ─► fused cross-attention A (C, 64, 64) ─► refined M = S·A ─► upsample, min-max ─► argmax vs τ

    seg = Segmenter.from_pretrained("weights/sd15", dtype=torch.bfloat16)
    result = seg(image, ["cat", "dog"])           # SegmentationResult: .mask, .scores, .fused, .refined, ...
    run = seg.run(image, ["cat", "dog"])          # the same, with every intermediate (Run: rows, z0, stores, ...)

`Segmenter` talks to its diffusion model only through the backbone contract (minidiffseg/backbone.py:
encode the image and the prompts, noise a latent, one denoiser pass with an attention store, the
inventory of attention layers) and reads the method's settings from a frozen `Recipe` (method/recipe.py).

`run` is the one orchestration of the steps, which have the method's names and can be called one by
one: `prompts` → `encode_image` → `noises` → per group of rows `encode_text` → `record` (the denoiser
passes with the attention store) → `fuse` (A) → `refine` (M = S·A) → `decision.upsample_scores`
/ `decision.decide`. `__call__`, the explorer and the benchmarks all go through `run` (a `clock` callback
times each step).

One U-Net call serves all classes of an image (batch C, conditional prompts only: the official
unconditional half is discarded there anyway), or a single row in *joint* mode (one prompt naming
every class). Nothing HW×HW is built: the store keeps Q and K of the 64² self-attention layers and
the refinement runs as fused attention (method/refine.py).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence, Set
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.nn.functional as F
from PIL import Image

from ..backbone import TextEncoding
from ..errors import UserError
from ..image import load_image, to_tensor
from ..sd.attention import AttentionStore
from ..sd.precision import Precision, precision
from ..sd.stream import Resident, UpcastWeights, weights_of
from . import refine as refinement
from .decision import decide, upsample_scores
from .fusion import fused_map
from .prompts import ClassPrompt, check_classes, joint_prompt, reweight, t5_columns, template_prompt, user_prompt
from .recipe import Recipe, check_tau, recipe_for


@dataclass
class SegmentationResult:
    """One image's segmentation; every tensor on the CPU, whatever device computed it (maps float32, scores at
    least float32, the mask int64)."""

    classes: list[str]
    prompts: list[str]  # the text each row of the U-Net batch saw (one in joint mode)
    scores: torch.Tensor  # (C, H, W) float in [0, 1] at the input image's size
    mask: torch.Tensor  # (H, W) int64: 0 = background, i = classes[i-1]
    tau: float  # the background score τ that `mask` was decided against
    fused: torch.Tensor  # (C, h, w) fused cross-attention maps A on the refinement's grid (SD: the latent's, 64² at 512²)
    refined: torch.Tensor  # (C, h, w) M = S·A on that grid, before upsampling and min-max
    levels: dict[int, torch.Tensor] = field(default_factory=dict)  # {level: (C, h_l, w_l)} per-level means
    layers: dict[str, torch.Tensor] = field(default_factory=dict)  # {layer name: (C, h_l, w_l)} per layer

    def area(self) -> dict[str, float]:
        """Fraction of the image given to each class (background under key "background")."""
        counts = torch.bincount(self.mask.flatten(), minlength=len(self.classes) + 1).double() / self.mask.numel()
        return dict(zip(["background", *self.classes], counts.tolist()))


@dataclass
class AttentionMaps:
    """The maps read from the U-Net passes of B prompt rows, each row giving K maps (batched mode: one
    row per class, K = 1; joint mode: one row, K = C)."""

    fused: torch.Tensor  # A (B, K, h, w): Σ_level weight · minmax(upsampled level mean)
    refined: torch.Tensor  # M = S·A (B, K, h, w)
    levels: dict[int, torch.Tensor]  # {level: (B, K, h_l, w_l)} mean over the level's layers
    layers: dict[str, torch.Tensor]  # {layer name: (B, K, h_l, w_l)} each recorded cross-attention layer

    @staticmethod
    def per_class(groups: list["AttentionMaps"]) -> "AttentionMaps":
        """Groups of rows (U-Net calls) -> one map per class: rows × maps flattened to (C, h, w)."""
        def cat(ts):
            return torch.cat(list(ts)).flatten(0, 1)

        return AttentionMaps(cat(g.fused for g in groups), cat(g.refined for g in groups),
                             {k: cat(g.levels[k] for g in groups) for k in groups[0].levels},
                             {k: cat(g.layers[k] for g in groups) for k in groups[0].layers})


def check_levels(recipe: Recipe, layers, model: str) -> None:
    """One UserError line when the recipe names grid levels at which the backbone has no attention layer of the
    kind it reads (e.g. SD1.5's level 1 on SDXL, whose finest attention is at level 2), or blocks a diffusion
    transformer lacks, or when a U-Net's recipe meets a transformer (or the reverse)."""
    blocks = sorted({m.block for m in layers if m.kind == "joint"})
    if recipe.transformer or blocks:
        if not blocks:
            raise UserError(f"the recipe reads a diffusion transformer's blocks (block_weights) but {model} is a U-Net: "
                            "give level_weights and self_levels instead")
        if not recipe.transformer:
            raise UserError(f"{model} is a diffusion transformer (one token grid, joint attention in blocks "
                            f"{blocks[0]}..{blocks[-1]}): its recipe names block_weights and self_blocks, not levels")
        for field_, wanted in (("block_weights", recipe.block_weights), ("self_blocks", recipe.self_blocks)):
            missing = sorted(set(wanted) - set(blocks))
            if missing:
                raise UserError(f"recipe {field_} names block(s) {missing}, but {model} has joint attention in blocks "
                                f"{blocks[0]}..{blocks[-1]} only: choose among those")
        return
    have = {kind: sorted({m.level for m in layers if m.kind == kind}) for kind in ("cross", "self")}
    for kind, field_, wanted in (("cross", "level_weights", recipe.level_weights), ("self", "self_levels",
                                                                                  recipe.self_levels)):
        missing = sorted(set(wanted) - set(have[kind]))
        if missing:
            raise UserError(f"recipe {field_} names level(s) {missing}, but {model} has {kind}-attention at levels "
                            f"{have[kind]} only (level = latent side / the layer's grid side): choose among those")


def check_finite(t: torch.Tensor, what: str) -> torch.Tensor:
    """`t`, or one UserError line when it holds NaN or inf: an overflow (fp16's largest value is 65504) would
    otherwise become a confident wrong mask, since argmax takes NaN for the maximum."""
    if not bool(torch.isfinite(t).all()):
        way = ("fp16 overflowed: run with --dtype bf16 or fp32 (API: dtype=torch.bfloat16 or torch.float32)"
               if t.dtype == torch.float16 else "the weights or the image hold NaN/inf values: check the weights "
               "with `minidiffseg inspect-weights` and the image")
        raise UserError(f"{what} are not finite (NaN or inf) in {str(t.dtype).replace('torch.', '')}: {way}")
    return t


class Segmenter:
    """Holds a backbone (SD1.5 or SD2.x) and the method's recipe; `seg(image, classes)` segments one image.

    recipe:        the method's settings (method/recipe.py); default: the backbone's (`recipe_for`);
                   `**changes` replace fields of it (timesteps=..., level_weights=..., template=..., tau=...)
    resolution:    side of the square the image is stretched to (multiple of 64; official 512); None:
                   the size the model was trained at, `sd.resolution` (512; 768 for SD2.x 768-v)
    joint:         one prompt naming all classes and a U-Net batch of 1, instead of one row per class
    class_batch:   at most this many classes per U-Net call (bounds memory; None = all at once)
    """

    def __init__(self, sd, recipe: Recipe | None = None, *, resolution: int | None = None, joint: bool = False,
                 class_batch: int | None = None, **changes):
        if resolution is None:
            resolution = getattr(sd, "resolution", 512)  # the model's training size (512 for stand-in models)
        if resolution % 64 or resolution <= 0:
            raise UserError(f"resolution {resolution} must be a positive multiple of 64 (the VAE's ×8 and the "
                            "U-Net's ×8 downsampling)")
        self.sd = sd
        self.recipe = replace(recipe or recipe_for(sd), **changes)
        self.resolution = resolution
        self.joint = joint
        self.class_batch = class_batch
        layers = sd.attention_layers()
        check_levels(self.recipe, layers, getattr(sd, "name", "this model"))
        if self.recipe.text_tokens != "clip" and getattr(sd, "tokenizer_3", None) is None:
            model = getattr(sd, "name", "this model")
            raise UserError(f"text_tokens {self.recipe.text_tokens!r} reads T5's tokens, but {model} has no T5 "
                            "encoder: use text_tokens 'clip', or a checkpoint with text_encoder_3/ and tokenizer_3/")
        r = self.recipe
        if r.transformer:  # a diffusion transformer's joint attention, read by block (one token grid)
            self.cross_layers = {m.name for m in layers if m.kind == "joint" and m.block in r.block_weights}
            self.self_layers = {m.name for m in layers if m.kind == "joint" and m.block in r.self_blocks}
        else:
            self.cross_layers = {m.name for m in layers if m.kind == "cross" and m.level in r.level_weights}
            self.self_layers = {m.name for m in layers if m.kind == "self" and m.level in r.self_levels}
        self.levels = {m.name: m.level for m in layers}
        # the key each layer's cross maps are fused under, with `fusion_weights`: its block, or its level
        self.groups = {m.name: m.block if r.transformer else m.level for m in layers}
        # prompt rows -> re-weighted text embeddings: the same classes over many images are encoded once
        self.text_cache: dict[tuple, TextEncoding] = {}

    def with_recipe(self, **changes) -> "Segmenter":
        """A segmenter with these recipe fields replaced, sharing this one's networks and text cache."""
        other = Segmenter(self.sd, replace(self.recipe, **changes), resolution=self.resolution, joint=self.joint,
                          class_batch=self.class_batch)
        other.text_cache = self.text_cache
        return other

    # the recipe's fields, read-only (a variant: `with_recipe(...)` or `Segmenter(sd, replace(recipe, ...))`)
    timesteps = property(lambda self: self.recipe.timesteps)
    template = property(lambda self: self.recipe.template)
    level_weights = property(lambda self: self.recipe.level_weights)
    fusion_weights = property(lambda self: self.recipe.fusion_weights)
    self_levels = property(lambda self: self.recipe.self_levels)
    prompt_options = property(lambda self: self.recipe.prompt_options)
    default_tau = property(lambda self: self.recipe.tau)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, stream: bool = False, revision: str | None = None,
                        **options) -> "Segmenter":
        """Load SD1.5 or SD2.x from `path` (minidiffseg.sd.load_sd) and keep `options` (see the class docstring).
        `dtype`: bf16/fp16 on a CPU without fast half-precision arithmetic computes in float32 from weights
        kept in half precision, saying so in a warning (minidiffseg.sd.precision; docs/precision.md).
        `stream`: keep no weights resident, read each block from the file as it runs (docs/memory.md §1).
        `revision`: for a hub id `path`, the copy of that commit (hash, branch or tag) in the Hugging Face cache."""
        from ..sd import load_sd

        p = precision(dtype, device)
        return cls(load_sd(path, device=device, dtype=p.compute, stream=stream, keep=None if stream else p.keep,
                           revision=revision), **options)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "Segmenter":
        """Move the networks to `device` and/or `dtype` (chosen for the device as `from_pretrained` does);
        returns self."""
        device = torch.device(device) if device is not None else self.device
        chosen = precision(dtype, device) if dtype is not None else Precision(self.dtype)
        for net in self.sd.networks().values():
            weights, p = weights_of(net), chosen
            if net is getattr(self.sd, "vae", None) and getattr(self.sd, "upcast_vae", False) \
                    and p.compute == torch.float16:
                p = Precision(torch.float32)  # SDXL's VAE overflows float16: computed in float32 (sd/xl.py)
            if isinstance(weights, Resident) and p.keep is not None:  # kept in half precision, up-cast per block
                state = {k: t.to(p.keep) for k, t in net.state_dict().items()}
                UpcastWeights(net, {k: k for k in state}, state, p.compute, device)
            elif isinstance(weights, Resident):  # RESIDENT: the weights live in the modules
                net.to(device=device, dtype=p.compute)
            else:  # weights fetched per block (sd/stream.py): their source moves; nothing is materialised
                weights.to(device, p.compute)
        self.text_cache.clear()
        return self

    @property
    def device(self) -> torch.device:
        return self.sd.device

    @property
    def dtype(self) -> torch.dtype:
        return self.sd.dtype

    # ---- the steps ----------------------------------------------------------------------------

    def prompts(self, classes: list[str], prompts: list[str] | None = None,
                captions: list[str] | None = None, joint: bool = False) -> list[ClassPrompt]:
        """The U-Net's prompt rows: one per class (template, user prompt or caption), or one joint row."""
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
        caps: Sequence[str | None] = captions or [None] * len(classes)
        return [template_prompt(tok, c, self.template, caption, **opts) for c, caption in zip(classes, caps)]

    def encode_text(self, rows: list[ClassPrompt]) -> TextEncoding:
        """The rows' text conditioning, its states (B, 77, D) re-weighted z' = z∅ + w·(z − z∅) ("++"; the pooled
        embedding of backbones that take one, SDXL's, is the prompt's own), cached per list of rows."""
        key = (self.recipe.text_tokens, *((r.text, tuple(r.weights.tolist())) for r in rows))
        if key not in self.text_cache:
            if len(self.text_cache) > 64:  # bounded: prompts with per-image captions never repeat
                self.text_cache.clear()
            z_empty = self.sd.encode_text([""]).states  # z∅ (1, 77, D)
            z = self.sd.encode_text([r.text for r in rows])
            w = self.columns(rows, z.states.shape[1])[0].to(self.device)  # (B, T)
            states = check_finite(reweight(z.states, z_empty, w), "the text embeddings (text encoder)")
            self.text_cache[key] = TextEncoding(states, z.pooled)
        return self.text_cache[key]

    def columns(self, rows: list[ClassPrompt], width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows' "++" weights (B, T) and class-map columns (B, T, K) over the T = `width` text tokens the denoiser
        reads: CLIP's 77 (SD1.5, SDXL: all of them); SD3's 77 CLIP tokens and then T5's, whose class tokens count
        as the recipe's `text_tokens` says (docs/sd3.md §3): not at all ("clip": weight 1, no column), alone ("t5"),
        or averaged with CLIP's ("both")."""
        w = torch.stack([r.weights for r in rows])  # (B, 77)
        select = torch.stack([r.select for r in rows])  # (B, 77, K)
        extra, choice = width - w.shape[1], self.recipe.text_tokens
        if extra == 0 or choice == "clip":
            return F.pad(w, (0, extra), value=1.0), F.pad(select, (0, 0, 0, extra))
        opts = self.prompt_options
        t5 = [t5_columns(self.sd.tokenizer_3, r, tokens=opts["tokens"], class_weight=opts["class_weight"])
              for r in rows]
        w5, select5 = torch.stack([t[0] for t in t5]), torch.stack([t[1] for t in t5])  # (B, L), (B, L, K)
        if choice == "t5":
            return torch.cat([torch.ones_like(w), w5], 1), torch.cat([torch.zeros_like(select), select5], 1)
        return torch.cat([w, w5], 1), torch.cat([select, select5], 1) / 2

    def encode_image(self, x: torch.Tensor, generator: torch.Generator, posterior: str = "sample") -> torch.Tensor:
        """x (1, 3, H, W) in [0, 1] -> z0 (1, 4, h, w): stretch to resolution², 2x−1, the backbone's encoder.
        posterior: "sample" draws from the VAE's posterior (official), "mean" takes its mean."""
        if posterior not in ("sample", "mean"):
            raise UserError(f"posterior {posterior!r} is unknown: use 'sample' (official) or 'mean'")
        r = self.resolution
        x = F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False)  # §5: no antialias
        x = (2 * x - 1).to(self.device, self.dtype)
        return check_finite(self.sd.encode_image(x, generator, sample=posterior == "sample"),
                            "the image latents (VAE encoder)")

    def noises(self, z0: torch.Tensor, generator: torch.Generator, noise: torch.Tensor | None = None
               ) -> list[torch.Tensor]:
        """One noise draw (1, 4, h, w) per timestep, shared by all classes of the image (CPU generator: the
        same numbers on every device); `noise` given instead: (1|T, 4, h, w) or (4, h, w)."""
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

    def record(self, z0: torch.Tensor, noises: list[torch.Tensor], context: TextEncoding,
               select: torch.Tensor, *, probs: Set[str] = frozenset(), progress=None) -> AttentionStore:
        """The denoiser passes, one per timestep, for B prompt rows `context` (states (B, 77, D)), with an attention store
        that keeps the cross maps projected on `select` (B, 77, K) and the Q/K of the refinement layers;
        also the head-averaged probabilities of the layers named in `probs` (the explorer's every-token maps).
        `progress(i, n, t)` is called before pass i of n."""
        select = F.pad(select, (0, 0, 0, context.states.shape[1] - select.shape[1]))  # (B, 77, K) given: CLIP's only
        store = AttentionStore(cross=self.cross_layers, token_weights=select.to(self.device, self.dtype),
                               qk=self.self_layers, probs=set(probs))
        for i, (t, noise) in enumerate(zip(self.timesteps, noises)):
            if progress is not None:
                progress(i, len(noises), t)
            z_t = self.sd.add_noise(z0, noise.to(z0), t)
            self.sd.denoise(z_t, t, context, store)  # z_t (1, …): batch broadcasts
        return store

    def map_size(self, z0: torch.Tensor) -> tuple[int, int]:
        """The grid A and M live on: that of the refinement's self-attention, the latent's (64² at 512²) for
        SD1.5/SD2.x; SDXL's finest attention is at half the latent's side (64² at 1024²)."""
        level = self.levels[min(self.self_layers)]  # all at one level (Recipe: one self level; an MM-DiT: one grid)
        return z0.shape[-2] // level, z0.shape[-1] // level

    def fuse(self, store: AttentionStore, size: tuple[int, int]) -> tuple[torch.Tensor, dict, dict]:
        """A (B, K, h, w) on the grid `size` (`map_size`), with the per-level and per-layer maps it was fused from."""
        fused, levels, layers = fused_map(store, self.groups, self.fusion_weights, size)
        return check_finite(fused, "the cross-attention maps (U-Net)"), levels, layers

    def refine(self, store: AttentionStore, fused: torch.Tensor) -> torch.Tensor:
        """M = S·A (B, K, h, w) with S the mean self-attention of the refinement layers, never built."""
        qk = [pair for name in sorted(self.self_layers) for pair in store.qk_pairs[name]]
        values = fused.flatten(2).transpose(1, 2)  # (B, hw, K)
        return check_finite(refinement.refine(qk, values, self.recipe.renormalise).transpose(1, 2).reshape(fused.shape),
                            "the refined maps (U-Net self-attention)")

    # ---- the whole method ---------------------------------------------------------------------

    @torch.inference_mode()
    def run(self, image, classes: list[str], *, prompts: list[str] | None = None,
            captions: list[str] | None = None, seed: int = 0, tau: float | None = None,
            posterior: str = "sample", noise: torch.Tensor | None = None, joint: bool | None = None,
            class_batch: int | None | Literal["default"] = "default", probs: bool = False, clock=None,
            progress=None) -> "Run":
        """Segment `image` into `classes`, keeping every intermediate (see `__call__` for the arguments).

        class_batch: classes per U-Net call for this run (default: the segmenter's; None = all in one).
        probs:       also keep every token's head-averaged probabilities of the fused layers (the explorer).
        clock:       `clock(step)` -> a context manager around each step ("prompts", "encode_image", "noises",
                     "encode_text", "record", "fuse", "refine", "decide"), e.g. a timer.
        progress:    `progress(i, n, t)` before U-Net pass i of n (at noise level t)."""
        clock = clock or (lambda step: contextlib.nullcontext())
        classes = check_classes(classes)
        joint = self.joint if joint is None else joint
        tau = self.default_tau if tau is None else check_tau(tau)
        img = load_image(image)
        with clock("prompts"):
            rows = self.prompts(classes, prompts, captions, joint)
        generator = torch.Generator().manual_seed(int(seed))
        with clock("encode_image"):
            z0 = self.encode_image(to_tensor(img, torch.promote_types(self.dtype, torch.float32)), generator, posterior)
        with clock("noises"):
            noises = self.noises(z0, generator, noise)
        step = self.class_batch if class_batch == "default" else class_batch
        step = step or len(rows)
        groups, stores = [], []
        for i in range(0, len(rows), step):  # one U-Net call per group of rows
            g = rows[i:i + step]
            with clock("encode_text"):
                context = self.encode_text(g)  # states (B, 77, D)
            with clock("record"):
                store = self.record(z0, noises, context, self.columns(g, context.states.shape[1])[1],  # (B, T, K)
                                    probs=self.cross_layers if probs else frozenset(), progress=progress)
            with clock("fuse"):
                fused, levels, layers = self.fuse(store, self.map_size(z0))
            with clock("refine"):
                groups.append(AttentionMaps(fused, self.refine(store, fused), levels, layers))
            stores.append(store)
        maps = AttentionMaps.per_class(groups)
        with clock("decide"):
            scores = upsample_scores(maps.refined, (img.height, img.width))
            mask = decide(scores, tau)
        return Run(img, classes, rows, z0, noises, stores, maps, scores, mask, tau)

    def __call__(self, image, classes: list[str], *, prompts: list[str] | None = None,
                 captions: list[str] | None = None, seed: int = 0, tau: float | None = None,
                 posterior: str = "sample", noise: torch.Tensor | None = None,
                 joint: bool | None = None) -> SegmentationResult:
        """Segment `image` (PIL image or path) into `classes` (+ background).

        prompts:   per-class prompt strings replacing the template (the class word is still located
                   and re-weighted); captions: per-class caption continuations of the template.
        seed:      seeds the VAE posterior sample and the noise draw (deterministic for a seed).
        tau:       background score τ (default: the recipe's): a pixel whose best class score is below it
                   is background.
        posterior: "sample" (official) or "mean" of the VAE posterior.
        noise:     (1, 4, h, w) used instead of the seeded draw (one per timestep: (T, 4, h, w)).
        """
        return self.run(image, classes, prompts=prompts, captions=captions, seed=seed, tau=tau, posterior=posterior,
                        noise=noise, joint=joint).result()


@dataclass
class Run:
    """Everything one `Segmenter.run` computed, in the order it was computed."""

    image: Image.Image  # the RGB input
    classes: list[str]
    rows: list[ClassPrompt]  # the prompt of each U-Net row (one per class, or one joint row)
    z0: torch.Tensor  # (1, 4, h, w) the image latent
    noises: list[torch.Tensor]  # one (1, 4, h, w) draw per timestep
    stores: list[AttentionStore]  # one per U-Net call (group of rows)
    maps: AttentionMaps  # per class: A, M, per-level and per-layer maps
    scores: torch.Tensor  # (C, H, W) on the compute device
    mask: torch.Tensor  # (H, W)
    tau: float

    def result(self) -> SegmentationResult:
        """The segmentation on the CPU: maps float32, scores in their dtype, the mask int64."""
        def host(t: torch.Tensor) -> torch.Tensor:  # maps in float32 on the CPU, whatever computed them
            return t.float().cpu()

        m = self.maps
        return SegmentationResult(self.classes, [r.text for r in self.rows], self.scores.cpu(), self.mask.cpu(),
                                  self.tau, host(m.fused), host(m.refined), {k: host(v) for k, v in m.levels.items()},
                                  {k: host(v) for k, v in m.layers.items()})
