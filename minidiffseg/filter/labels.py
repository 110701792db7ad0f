"""Candidate-class label files: reading ours and the official ones, writing ours.

The official DiffSegmenter files (`predict_syn_txt_0.8_img_0.97.json`) hold three dicts,
`synonym_matching`, `image_similarity` and `text_similarity`, each {image: [class, ...]}; the
official recipe uses the union of the last two. Our file is a superset of that layout, so any
reader of the official files reads ours:

    {"format": "minidiffseg-labels/1", "vocabulary": "voc", "filter": "union", "clip_ratio": 0.97,
     "image_similarity": {"2007_000033.jpg": ["aeroplane"], ...},   # CLIP's classes
     "text_similarity":  {"2007_000033.jpg": ["aeroplane"], ...},   # classes named in the caption
     "captions":         {"2007_000033.jpg": "an airplane ..."},
     "clip_scores":      {"2007_000033.jpg": {"aeroplane": 0.2931, ...}}}

A flat {image: [class, ...]} file is read too. Image keys are matched by file stem, so the
official VOC keys (absolute paths of another machine) match local files, and COCO 2014 names
(COCO_val2014_000000000139.jpg, as the official COCO-Object file spells val2017's images) match
000000000139.jpg. Class names may be evaluation names, prompt names or aliases of the vocabulary;
they are returned as evaluation names.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path, PureWindowsPath
from typing import Any

from ..errors import UserError
from ..files import write_atomic
from ..vocabularies import Vocabulary

FORMAT = "minidiffseg-labels/1"
OFFICIAL_UNION = ("image_similarity", "text_similarity")  # the official recipe (docs/design.md §5 "filter")


def image_key(name: str | os.PathLike) -> str:
    """File stem without a `COCO_val2014_`-style prefix; Windows or POSIX paths alike."""
    return re.sub(r"^COCO_[a-z]+\d{4}_", "", PureWindowsPath(str(name)).stem)


def _load_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read label file {path}: {e}; give a JSON label file") from None
    if not isinstance(data, dict):
        raise UserError(f"label file {path} is not a JSON object: expected the official "
                        "predict_syn_txt_*.json layout, ours, or {image: [classes]}")
    return data


def read_labels(path: str | Path, vocabulary: Vocabulary) -> dict[str, list[str]]:
    """{image key: evaluation names in vocabulary order} from any of the three layouts."""
    path = Path(path)
    data = _load_json(path)
    tables = [data[k] for k in OFFICIAL_UNION] if all(k in data for k in OFFICIAL_UNION) else [data]
    out: dict[str, set[str]] = {}
    for table in tables:
        if not isinstance(table, dict):
            raise UserError(f"label file {path}: expected {{image: [classes]}} tables, found {type(table).__name__}")
        for key, names in table.items():
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise UserError(f"label file {path}: entry {key!r} is not a list of class names")
            merged = out.setdefault(image_key(key), set())
            for n in names:
                i = vocabulary.index(n)  # UserError naming the class if it is not in the vocabulary
                if i < vocabulary.first_thing:
                    raise UserError(f"label file {path}: image {key} lists {n!r}, which is never prompted")
                merged.add(vocabulary.classes[i])
    if not out:
        raise UserError(f"label file {path} has no image entries")
    return {k: [c for c in vocabulary.classes if c in v] for k, v in out.items()}


class LabelWriter:
    """Our label file, filled image by image and saved atomically (temporary name, then rename);
    reopening an existing file resumes it: `done(image)` tells which images it already has."""

    def __init__(self, path: str | Path, vocabulary: Vocabulary, filter_kind: str, clip_ratio: float):
        self.path = Path(path)
        settings = {"format": FORMAT, "vocabulary": vocabulary.name, "filter": filter_kind, "clip_ratio": clip_ratio}
        self.data: dict[str, Any] = {**settings, "image_similarity": {}, "text_similarity": {}, "captions": {},
                                     "clip_scores": {}}
        if self.path.exists():
            old = _load_json(self.path)
            if old.get("format") != FORMAT:
                raise UserError(f"{self.path} exists and is not a minidiffseg label file: choose another --out")
            differ = [f"{k} {old.get(k)!r} (now {v!r})" for k, v in settings.items() if old.get(k) != v]
            if differ:
                raise UserError(f"{self.path} was written with other settings: {', '.join(differ)}; "
                                "resume with the same settings or choose another --out")
            self.data.update(old)
        self.keys = {image_key(k) for k in self.data["image_similarity"]}

    def done(self, image: str | os.PathLike) -> bool:
        return image_key(image) in self.keys

    def add(self, image: str | os.PathLike, details: dict) -> None:
        """details: a filter's `details()` (classes, and clip/blip/caption/clip_scores when known)."""
        name = PureWindowsPath(str(image)).name
        clip, blip = details.get("clip"), details.get("blip")
        if clip is None and blip is None:  # a filter that does not say why: all under image_similarity
            clip = details["classes"]
        self.data["image_similarity"][name] = clip or []
        self.data["text_similarity"][name] = blip or []
        if "caption" in details:
            self.data["captions"][name] = details["caption"]
        if "clip_scores" in details:
            self.data["clip_scores"][name] = details["clip_scores"]
        self.keys.add(image_key(image))

    def save(self) -> None:
        write_atomic(self.path, json.dumps(self.data, indent=1, ensure_ascii=False))
