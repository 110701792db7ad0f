"""Candidate classes per image: which classes the segmenter is asked about.

  gt      the classes present in the ground-truth label (the paper's weakly-supervised setting)
  FILE    a label file, read by minidiffseg.filter.labels: the official
          `predict_syn_txt_*.json` (union of `image_similarity` and `text_similarity`), ours, or a
          flat {image: [class, ...]}; keys matched by file stem (COCO 2014 names to 2017 ones)
  filter  the CLIP/BLIP filter (minidiffseg.filter.make_filter), run on each image

All return sorted evaluation indices of prompted classes (never background).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from ..errors import UserError
from ..filter.labels import image_key, read_labels
from .datasets import Dataset, Sample
from .metrics import IGNORE

Candidates = Callable[[Sample, Image.Image], list[int]]


def from_ground_truth(ds: Dataset) -> Candidates:
    def candidates(sample: Sample, image: Image.Image) -> list[int]:
        present = np.unique(ds.label(sample))
        return [int(c) for c in present if c != IGNORE and c >= ds.vocab.first_thing]
    return candidates


def from_label_file(ds: Dataset, path: str | Path) -> Candidates:
    table = read_labels(path, ds.vocab)  # validates every class name now, not mid-run
    missing = [s.name for s in ds.samples if image_key(s.name) not in table]
    if missing:
        raise UserError(f"label file {path} has no entry for {len(missing)} image(s) of the split, "
                        f"e.g. {missing[0]}; every image needs one")
    indices = {key: [ds.vocab.index(n) for n in names] for key, names in table.items()}
    return lambda sample, image: indices[image_key(sample.name)]


def from_filter(ds: Dataset, filt: Callable[[Image.Image], list[str]]) -> Candidates:
    return lambda sample, image: sorted({ds.vocab.index(n) for n in filt(image)})
