"""Which classes to segment in each image, and with which prompt captions: a fixed list, or the candidates
the class filter picks from a vocabulary per image (docs/design.md §5 "filter"); with BLIP, each class
prompt continued by BLIP's conditional caption (the official recipe). Filter models load only when used."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import UserError
from .method.prompts import check_classes
from .vocabularies import Vocabulary, get_vocabulary, load_vocabulary

if TYPE_CHECKING:  # the filter package is imported only when used
    from .filter.blip import Captioner
    from .filter.filters import Filter

CAPTIONS = ("none", "blip")


def resolve_vocabulary(arg: str) -> Vocabulary:
    """A benchmark name, or a vocabulary file when `arg` is an existing file."""
    return load_vocabulary(arg) if Path(arg).is_file() else get_vocabulary(arg)


class ClassSource:
    """`source(image)` -> (classes, captions or None) for a segmenter `seg` (its template and device).

    classes:      the class names for every image, or None to filter `vocabulary` (a benchmark name or a
                  file, see `resolve_vocabulary`) with the filter `kind` ("union", "clip" or "blip")
    caption:      "blip": a BLIP caption continuing each class's template prompt; "none": no captions
    clip_weights, blip_weights: the filter models' folders or hub ids (None: their defaults)
    dtype:        the filter models' dtype (None: float32)
    """

    def __init__(self, seg, classes: list[str] | None = None, vocabulary: str | None = None, kind: str = "union",
                 caption: str = "none", clip_weights: str | None = None, blip_weights: str | None = None,
                 dtype: torch.dtype | None = None):
        if classes is None and vocabulary is None:
            raise UserError("give the classes, or a vocabulary to pick them from with the filter")
        if caption not in CAPTIONS:
            raise UserError(f"caption {caption!r}: use one of {', '.join(CAPTIONS)}")
        self.seg = seg
        self.classes = check_classes(classes) if classes is not None else None
        self.filter: Filter | None = None
        self.captioner: Captioner | None = None
        self.vocabulary: Vocabulary | None = None
        device, dtype = seg.device, dtype or torch.float32
        if self.classes is None:
            from .filter import make_filter

            assert vocabulary is not None  # checked above
            self.vocabulary = resolve_vocabulary(vocabulary)
            self.filter = make_filter(kind, self.vocabulary, clip_dir=clip_weights, blip_dir=blip_weights,
                                      device=device, dtype=dtype)
        if caption == "blip":
            blip = getattr(self.filter, "blip", self.filter)  # the union/blip filter's captioner, if loaded
            self.captioner = getattr(blip, "captioner", None)
            if self.captioner is None:
                from .filter.blip import Captioner
                from .filter.filters import DEFAULT_BLIP_DIR

                self.captioner = Captioner.from_pretrained(blip_weights or DEFAULT_BLIP_DIR, device, dtype)

    def __call__(self, image) -> tuple[list[str], list[str] | None]:
        from .image import load_image

        classes = self.classes
        if classes is None:
            assert self.filter is not None and self.vocabulary is not None  # set by __init__ without classes
            found = self.filter(load_image(image))  # evaluation names, e.g. "tvmonitor"
            if not found:
                raise UserError(f"image {image}: the filter found no candidate class of the vocabulary")
            classes = [self.vocabulary.prompt_names[self.vocabulary.index(c)] for c in found]  # e.g. "monitor"
        captions = None
        if self.captioner is not None:
            prefixes = [self.seg.template.format(c) for c in classes]
            captions = self.captioner.caption(load_image(image), prefixes)
        return classes, captions
