"""Candidate classes per image: which classes the segmenter is asked about.

  gt      the classes present in the ground-truth label (the paper's weakly-supervised setting)
  FILE    a label file: the official `predict_syn_txt_*.json` (three dicts; the official recipe
          uses the union of `image_similarity` and `text_similarity`) or a flat JSON
          {image: [class, ...]}; keys are matched by file stem, with COCO 2014 names
          (COCO_val2014_000000000139) matched to the 2017 ones (000000000139)
  filter  the CLIP/BLIP filter (minidiffseg.filter), run on each image

All return sorted evaluation indices of prompted classes (never background).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from ..errors import UserError
from .datasets import Dataset, Sample
from .metrics import IGNORE

Candidates = Callable[[Sample, Image.Image], list[int]]
OFFICIAL_UNION = ("image_similarity", "text_similarity")  # official recipe (DESIGN.md §5 "filter")


def from_ground_truth(ds: Dataset) -> Candidates:
    def candidates(sample: Sample, image: Image.Image) -> list[int]:
        present = np.unique(ds.label(sample))
        return [int(c) for c in present if c != IGNORE and c >= ds.vocab.first_thing]
    return candidates


def image_key(name: str) -> str:
    """File stem, with a COCO `COCO_val2014_` style prefix removed."""
    return re.sub(r"^COCO_[a-z]+\d{4}_", "", Path(name).stem)


def read_label_file(path: str | Path) -> dict[str, list[str]]:
    """{image key: [class name, ...]} from an official or flat JSON label file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read label file {path}: {e}; give a JSON label file") from None
    if not isinstance(data, dict):
        raise UserError(f"label file {path} is not a JSON object {{image: [classes]}}")
    tables = [data[k] for k in OFFICIAL_UNION] if all(k in data for k in OFFICIAL_UNION) else [data]
    out: dict[str, list[str]] = {}
    for table in tables:
        for key, names in table.items():
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise UserError(f"label file {path}: entry {key!r} is not a list of class names")
            merged = out.setdefault(image_key(key), [])
            merged += [n for n in names if n not in merged]
    return out


def from_label_file(ds: Dataset, path: str | Path) -> Candidates:
    table = read_label_file(path)
    missing = [s.name for s in ds.samples if image_key(s.name) not in table]
    if missing:
        raise UserError(f"label file {path} has no entry for {len(missing)} image(s) of the split, "
                        f"e.g. {missing[0]}; every image needs one")
    indices = {}
    for key, names in table.items():  # validate every name now, not in the middle of the run
        idx = [ds.vocab.index(n) for n in names]
        if any(i < ds.vocab.first_thing for i in idx):
            raise UserError(f"label file {path}: image {key} lists 'background', which is not prompted")
        indices[key] = sorted(set(idx))
    return lambda sample, image: indices[image_key(sample.name)]


def from_filter(ds: Dataset, filt: Callable[[Image.Image], list[str]]) -> Candidates:
    return lambda sample, image: sorted({ds.vocab.index(n) for n in filt(image)})
