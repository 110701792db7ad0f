"""The attention of one segmentation run, kept so that it can be looked at from every side without
running the U-Net again: the state behind the `explore` page (docs/explore.md §2).

    ex = Exploration.run(seg, "photo.jpg", ["cat", "sofa"], seed=0)    # one U-Net pass per timestep
    ex.result                          # SegmentationResult, as seg(...) would return it
    ex.cross(row, column, "fused")     # any token's map: one layer (its name), a level's mean (int), A
    ex.self_attention(row, y, x)       # row (y, x) of the 64×64 self-attention S, from the stored Q/K
    ex.refined_map(row, column)        # M = S·A of that map
    ex.segmentation(tau)               # the mask for another background τ (scores unchanged)

Every token, not only the class word: the run's store records what `Segmenter.record`'s does (each
cross layer's head-averaged probabilities projected on the class selection (B, 77, K), and the Q/K of
the refinement layers) and also keeps those probabilities whole, (B, HW, 77) per layer (the store's
`probs`: 77 columns, ~8 MB per row at 512²), in the same U-Net passes. So the segmentation is exactly
`Segmenter`'s, and token t's map of any layer, level or fused is there to view.

Self-attention at a pixel: S = mean over the refinement layers (and timesteps) and their heads of
softmax(Q Kᵀ/√d). Its row p is softmax(q_p Kᵀ/√d) for the one query q_p: HW values per layer and head,
computed on demand from the stored Q/K; the HW×HW matrix is never built.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from PIL import Image

from ..errors import UserError
from ..method import refine as refinement
from ..method.decision import decide
from ..method.fusion import fuse, level_maps
from ..method.prompts import ClassPrompt, check_classes
from ..method.recipe import check_tau, check_timesteps
from ..method.segmenter import Segmenter, SegmentationResult
from ..sd.attention import AttentionStore

# At most this many classes per run: all classes share one U-Net call here (no class batches), and at 512²
# each batched class row adds ~50 MB of stored Q/K (5 layers × q, k × 8 heads × 4096 × 40 × fp32) to the
# session's memory; 16 keeps a run below ~1 GB beyond the weights. A Pascal VOC image has 1 to 4 classes.
MAX_CLASSES = 16

Progress = Callable[[float, str], None]  # (fraction done in [0, 1], what is running)


@dataclass
class Exploration:
    """Everything one run recorded, for views. Rows are the U-Net batch rows (one prompt each: one per
    class, or a single joint row); a row's *columns* are its K class maps (the method's token selection;
    K = 1 batched, K = C joint), then its 77 token positions (column K + t is token t)."""

    image: Image.Image  # the RGB input image
    classes: list[str]
    rows: list[ClassPrompt]  # the prompt of each U-Net row (B rows)
    store: AttentionStore  # the recording: class maps, every token's probabilities, refinement Q/K
    layers: dict[str, torch.Tensor]  # token maps {layer name: (B, 77, h_l, w_l)}, mean over timesteps
    levels: dict[int, torch.Tensor]  # token maps {level: (B, 77, h_l, w_l)}, mean over the level's layers
    fused: torch.Tensor  # token maps A (B, 77, h, w), fused like the class maps
    result: SegmentationResult  # the segmentation, exactly as Segmenter returns it (class maps (C, ...))
    level_of: dict[str, int]  # layer name -> level
    self_layers: list[str]  # the refinement layers whose Q/K are stored, sorted
    token_labels: list[list[str]]  # per row, a label for each of the 77 positions
    _refined: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # token M's computed so far

    @property
    def k(self) -> int:
        """Class maps per row: 1 in batched mode, C in joint mode."""
        return self.rows[0].select.shape[-1]

    @property
    def size(self) -> tuple[int, int]:
        """(h, w) of the latent grid the fused, refined and self-attention maps live on."""
        return self.fused.shape[-2], self.fused.shape[-1]

    # ---- the run ------------------------------------------------------------------------------

    @classmethod
    @torch.inference_mode()
    def run(cls, seg: Segmenter, image, classes: list[str], *, prompts: list[str] | None = None, seed: int = 0,
            tau: float | None = None, joint: bool = False, timesteps: tuple[int, ...] | None = None,
            posterior: str = "sample", progress: Progress | None = None) -> "Exploration":
        """Segment `image` like `seg(image, classes, prompts=..., seed=..., tau=..., joint=...)`, recording
        every token's cross-attention too. `timesteps` replaces the segmenter's noise levels for this run."""
        report = progress or (lambda fraction, what: None)
        if seg.recipe.transformer:  # its views are U-Net levels' and 77 CLIP tokens'; an MM-DiT has blocks, 333 tokens
            raise UserError(f"the explorer reads U-Nets (SD1.5, SD2.x, SDXL); {seg.sd.name} is a diffusion transformer: "
                            "use `minidiffseg segment` / `minidiffseg maps` on it")
        classes = check_classes(classes)
        if len(classes) > MAX_CLASSES:
            raise UserError(f"{len(classes)} classes: the explorer runs at most {MAX_CLASSES} at once "
                            "(all in one U-Net call); remove some")
        if timesteps is not None:  # this run's noise levels; networks and text cache shared
            seg = seg.with_recipe(timesteps=check_timesteps(timesteps))
        steps = {"encode_image": (0.0, "encoding the image"), "encode_text": (0.1, "encoding the prompts"),
                 "fuse": (0.85, "fusing and refining")}

        @contextlib.contextmanager
        def clock(step):
            if step in steps:
                report(*steps[step])
            yield

        run = seg.run(image, classes, prompts=prompts, seed=seed, tau=tau, joint=joint, posterior=posterior,
                      class_batch=None, probs=True, clock=clock,  # one U-Net call, every token's probabilities too
                      progress=lambda i, n, t: report(0.15 + 0.7 * i / n, f"U-Net pass {i + 1} of {n} (t = {t}, "
                                                                          f"{len(classes) if not joint else 1} row(s))"))
        store, rows, size = run.stores[0], run.rows, seg.map_size(run.z0)
        token_layers = {name: _on_grid(_wide(store.mean(store.prob_maps, name)), store.shapes[name])
                        for name in store.prob_maps}  # {name: (B, 77, h_l, w_l)}
        token_levels = level_maps(token_layers, seg.levels)
        labels = [_token_labels(seg.sd.tokenizer, r.text, seg.sd.tokenizer.max_length) for r in rows]
        report(1.0, "done")
        return cls(run.image, run.classes, rows, store, token_layers, token_levels,
                   fuse(token_levels, size, seg.level_weights), run.result(), dict(seg.levels),
                   sorted(seg.self_layers), labels)

    # ---- what can be viewed -------------------------------------------------------------------

    def columns(self, row: int) -> list[tuple[str, int]]:
        """(label, column) of every map of prompt row `row`: its class map(s), then each token position."""
        self._check_row(row)
        names = self.classes[row:row + 1] if self.k == 1 else self.classes
        return ([(f"{name} (class map)", i) for i, name in enumerate(names)]
                + [(f"{t}: {label}", self.k + t) for t, label in enumerate(self.token_labels[row])])

    def class_column(self, i: int) -> tuple[int, int]:
        """(row, column) of class i's map: row i in batched mode, column i of the one row in joint mode."""
        return (i, 0) if self.k == 1 else (0, i)

    def cross(self, row: int, column: int, view: str | int = "fused") -> torch.Tensor:
        """The cross-attention map (h_l, w_l) of `column` in prompt row `row`: view is a layer name (that
        layer, heads averaged, timesteps averaged), a level (int: the mean of its layers) or "fused" (A)."""
        self._check(row, column)
        r = self.result
        at: tuple[int, ...]  # the map's index in `fused` and in each level's and layer's maps
        if column < self.k:  # a class map: the segmentation's own, (C, ...) with class row·K + column
            at, fused, levels, layers = (row * self.k + column,), r.fused, r.levels, r.layers
        else:  # token column - K
            at, fused, levels, layers = (row, column - self.k), self.fused, self.levels, self.layers
        if view == "fused":
            return fused[at]
        if isinstance(view, int) or (isinstance(view, str) and view.isdigit()):
            if int(view) not in levels:
                raise UserError(f"level {view} was not recorded: choose one of {sorted(levels)}")
            return levels[int(view)][at]
        if view not in layers:
            raise UserError(f"layer {view!r} was not recorded: choose one of the {len(layers)} cross-attention "
                            "layers, a level or 'fused'")
        return layers[view][at]

    def refined_map(self, row: int, column: int) -> torch.Tensor:
        """M = S·A (h, w) for the fused map of `column`: the segmentation's refined map for a class column,
        computed on first request (and kept) for a token column."""
        self._check(row, column)
        if column < self.k:
            return self.result.refined[row * self.k + column]
        if (row, column) not in self._refined:
            with torch.inference_mode():
                a = self.fused[row, column - self.k].flatten()[None, :, None]  # (1, HW, 1)
                m = refinement.refine(self._qk(row, self.self_layers), a)  # in a's dtype (≥ float32)
            self._refined[(row, column)] = m.reshape(self.size)
        return self._refined[(row, column)]

    def self_attention(self, row: int, y: int, x: int, layer: str | None = None,
                       head: int | None = None) -> torch.Tensor:
        """Row (y, x) of the self-attention of prompt row `row` as an (h, w) map summing to 1: the mean over
        the refinement layers, timesteps and heads (the S of M = S·A), or one `layer` and/or one `head`."""
        self._check_row(row)
        h, w = self.size
        if not (0 <= y < h and 0 <= x < w):
            raise UserError(f"pixel ({y}, {x}) is outside the {h}×{w} latent grid")
        names = self.self_layers if layer is None else [layer]
        if layer is not None and layer not in self.self_layers:
            raise UserError(f"layer {layer!r} is not a refinement layer: choose one of {self.self_layers}")
        total: torch.Tensor | None = None
        pairs = self._qk(row, names)
        with torch.inference_mode():
            for q, k in pairs:  # (1, heads, HW, d) each
                if head is not None and not 0 <= head < q.shape[1]:
                    raise UserError(f"head {head}: layer has heads 0..{q.shape[1] - 1}")
                wide = torch.promote_types(q.dtype, torch.float32)
                qp = q[0, :, y * w + x].to(wide)  # (heads, d): the one query
                p = torch.softmax(qp[:, None] @ k[0].to(wide).transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)[:, 0]
                p = p.mean(0) if head is None else p[head]  # (HW,)
                total = p if total is None else total + p
        assert total is not None, "no Q/K stored for the refinement layers"
        return (total / len(pairs)).reshape(h, w)

    def heads(self, layer: str | None = None) -> int:
        """Heads of a refinement layer (of the first, if None)."""
        return self.store.qk_pairs[layer or self.self_layers[0]][0][0].shape[1]

    def segmentation(self, tau: float) -> SegmentationResult:
        """The result with the mask decided against another background τ (no U-Net run: scores are kept)."""
        tau = check_tau(tau)
        r = self.result
        return SegmentationResult(r.classes, r.prompts, r.scores, decide(r.scores, tau), tau, r.fused, r.refined,
                                  r.levels, r.layers)

    def pixel(self, x: float, y: float) -> tuple[int, int]:
        """Image pixel (x, y) -> (row, column) of the latent grid cell it falls in (the image is stretched to
        the square the model reads)."""
        h, w = self.size
        if not (0 <= x < self.image.width and 0 <= y < self.image.height):
            raise UserError(f"pixel ({x}, {y}) is outside the {self.image.width}×{self.image.height} image")
        return int(y * h / self.image.height), int(x * w / self.image.width)

    # ---- helpers ------------------------------------------------------------------------------

    def _qk(self, row: int, names: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Row `row`'s Q/K of the named layers, every timestep: [(q, k) each (1, heads, HW, d)]. A pair of
        batch 1 (the U-Net's first self-attention comes before any text) is every row's."""
        return [(q[row:row + 1] if q.shape[0] > 1 else q, k[row:row + 1] if k.shape[0] > 1 else k)
                for name in names for q, k in self.store.qk_pairs[name]]

    def _check_row(self, row: int) -> None:
        if not 0 <= row < len(self.rows):
            raise UserError(f"prompt row {row}: this run has rows 0..{len(self.rows) - 1}")

    def _check(self, row: int, column: int) -> None:
        self._check_row(row)
        if not 0 <= column < self.k + self.fused.shape[1]:
            raise UserError(f"column {column}: a row has columns 0..{self.k + self.fused.shape[1] - 1} (class maps, "
                            "then tokens)")


def _wide(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (the compute dtype may be bf16/fp16; float64 stays)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _on_grid(maps: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(B, h·w, T) as the store keeps them -> (B, T, h, w)."""
    return maps.transpose(1, 2).reshape(maps.shape[0], maps.shape[2], *hw)


def _token_labels(tok, text: str, n: int) -> list[str]:
    """Labels of the n positions of `text`'s row: BOS, its BPE tokens ("</w>" dropped), EOS, then padding."""
    words = [t.replace("</w>", "") for t in tok.tokens(text)][:n - 2]
    labels = ["<start>", *words, "<end>"]
    return labels + ["<pad>"] * (n - len(labels))
