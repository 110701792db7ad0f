"""The category filter: image, vocabulary -> candidate classes (docs/design.md §5 "filter" row).

Every filter is called as `filt(image) -> [evaluation names]` (vocabulary order, never
background); `filt.details(image)` also says why (CLIP scores, the caption, each part's classes).

  clip    zero-shot CLIP: cosine similarity of the image with "a photo of a <class>." per class;
          a class is kept when its score is within a RELATIVE margin of the image's best class,
          s_c >= best - (1 - ratio)·|best| (= ratio·best for the usual positive scores), with
          ratio 0.97 by default. A relative rule always keeps the best class, which is why the
          official files (made with "img_0.97") never have an empty `image_similarity`.
  blip    the classes that BLIP's unconditional caption names (matching.CaptionMatcher)
  union   clip ∪ blip: the paper's default
  labels  a precomputed label file (ours or the official one, see labels.py), by image file name

Models are loaded only by the filter kinds that use them, after checking that every needed
weight file exists.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image

from ..errors import UserError
from ..image import load_image
from ..vocabularies import Vocabulary
from . import blip, clip_model
from .checkpoint import check_folder, resolve_folder
from .labels import image_key, read_labels
from .matching import CaptionMatcher, readable

KINDS = ("union", "clip", "blip", "labels")
ALIASES = {"clip+blip": "union"}
CLIP_RATIO = 0.97  # the official files' "img_0.97" (predict_syn_txt_0.8_img_0.97.json)
DEFAULT_CLIP_DIR = Path("weights/clip-vit-large-patch14")  # hub openai/clip-vit-large-patch14
DEFAULT_BLIP_DIR = Path("weights/blip-image-captioning-large")  # hub Salesforce/blip-image-captioning-large

ImageInput = str | os.PathLike | Image.Image


class Filter:
    vocabulary: Vocabulary

    def details(self, image: ImageInput) -> dict:
        raise NotImplementedError

    def __call__(self, image: ImageInput) -> list[str]:
        return self.details(image)["classes"]

    def things(self) -> list[str]:
        """The vocabulary's prompted classes (all but background)."""
        return list(self.vocabulary.classes[self.vocabulary.first_thing:])


def keep_near_best(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Boolean mask (C,) of the scores within a relative margin (1 - ratio) of the best one."""
    best = scores.max()
    return scores >= best - (1 - ratio) * best.abs()


class ClipFilter(Filter):
    def __init__(self, vocabulary: Vocabulary, clip, ratio: float = CLIP_RATIO):
        self.vocabulary, self.clip, self.ratio = vocabulary, clip, ratio  # clip: clip_model.ZeroShotCLIP
        self.names = tuple(readable(c) for c in self.things())  # "pottedplant" -> "potted plant"

    def details(self, image: ImageInput) -> dict:
        scores = self.clip.scores(image, self.names)  # (C,)
        kept = [c for c, k in zip(self.things(), keep_near_best(scores, self.ratio).tolist()) if k]
        return {"classes": kept, "clip": kept,
                "clip_scores": {c: round(s, 5) for c, s in zip(self.things(), scores.tolist())}}


class BlipFilter(Filter):
    def __init__(self, vocabulary: Vocabulary, captioner):
        self.vocabulary, self.captioner = vocabulary, captioner  # captioner: blip.Captioner
        self.match = CaptionMatcher(vocabulary)

    def details(self, image: ImageInput) -> dict:
        caption = self.captioner.caption(image)[0]  # unconditional
        named = self.match(caption)
        return {"classes": named, "blip": named, "caption": caption}


class UnionFilter(Filter):
    def __init__(self, clip_filter: ClipFilter, blip_filter: BlipFilter):
        self.vocabulary, self.clip, self.blip = clip_filter.vocabulary, clip_filter, blip_filter

    def details(self, image: ImageInput) -> dict:
        image = load_image(image)  # decoded once for both
        out = {**self.clip.details(image), **self.blip.details(image)}
        out["classes"] = [c for c in self.vocabulary.classes if c in out["clip"] or c in out["blip"]]
        return out


class LabelFileFilter(Filter):
    def __init__(self, vocabulary: Vocabulary, path: str | Path):
        self.vocabulary, self.path = vocabulary, Path(path)
        self.table = read_labels(path, vocabulary)

    def details(self, image: ImageInput) -> dict:
        name = getattr(image, "filename", "") if isinstance(image, Image.Image) else image
        if not name:
            raise UserError(f"the label file {self.path} is keyed by image file name, but the image was "
                            "given without one: pass its path")
        if image_key(name) not in self.table:
            raise UserError(f"image {name} has no entry in the label file {self.path} ({len(self.table)} images); "
                            "run `minidiffseg filter` on it or pass --classes")
        return {"classes": self.table[image_key(name)]}


def make_filter(kind: str, vocabulary: Vocabulary, clip_dir: str | Path | None = None,
                blip_dir: str | Path | None = None, labels: str | Path | None = None,
                clip_ratio: float = CLIP_RATIO, device="cpu", dtype: torch.dtype = torch.float32) -> Filter:
    """A filter of `kind` (KINDS) for `vocabulary`; weights from the hub folders `clip_dir` /
    `blip_dir` (default weights/clip-vit-large-patch14, weights/blip-image-captioning-large)."""
    kind = ALIASES.get(kind, kind)
    if kind not in KINDS:
        raise UserError(f"unknown filter {kind!r}; choose one of {', '.join(KINDS)}")
    if not 0 < clip_ratio <= 1:
        raise UserError(f"CLIP ratio {clip_ratio} is outside (0, 1]: 1 keeps only the best class, 0.97 is the default")
    if kind == "labels":
        if labels is None:
            raise UserError("the `labels` filter needs a label file (ours or the official predict_syn_txt_*.json)")
        return LabelFileFilter(vocabulary, labels)

    # a folder, or the model's hub id: its copy in the Hugging Face cache
    clip_dir = resolve_folder(clip_dir or DEFAULT_CLIP_DIR, clip_model.HUB_ID) if kind in ("clip", "union") else None
    blip_dir = resolve_folder(blip_dir or DEFAULT_BLIP_DIR, blip.HUB_ID) if kind in ("blip", "union") else None
    # every needed file is checked before the first model is loaded (each takes seconds)
    if clip_dir is not None:
        check_folder(clip_dir, clip_model.WHAT, clip_model.HUB_ID)
    if blip_dir is not None:
        check_folder(blip_dir, blip.WHAT, blip.HUB_ID)
    clip = caption = None
    if clip_dir is not None:
        clip = ClipFilter(vocabulary, clip_model.ZeroShotCLIP.from_pretrained(clip_dir, device, dtype), clip_ratio)
    if blip_dir is not None:
        caption = BlipFilter(vocabulary, blip.Captioner.from_pretrained(blip_dir, device, dtype))
    if clip is not None and caption is not None:  # union
        return UnionFilter(clip, caption)
    found = clip or caption  # the one of "clip" and "blip"
    assert found is not None
    return found
