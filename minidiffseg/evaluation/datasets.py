"""Readers for the standard benchmark layouts (docs/design.md §5). Each yields (name, image, label PNG)
samples in split-file order, with ground-truth labels converted to evaluation indices (255 = ignore).

  voc          VOCdevkit/VOC2012/{JPEGImages, SegmentationClass or SegmentationClassAug,
               ImageSets/Segmentation/<split>.txt}                        val: 1449 images
  context      VOCdevkit/VOC2010/{JPEGImages, SegmentationClassContext,
  context59    ImageSets/SegmentationContext/<split>.txt} (mmsegmentation)  val: 5104 images
  coco-object  coco/{images/<split>2017/*.jpg, annotations/<split>2017/*_instanceTrainIds.png}
               (GroupViT's conversion; the split is every image of the folder)  val: 5000 images

--root may point at the dataset folder itself or at a folder above it (VOCdevkit, its parent).
Every file of the split is checked to exist when the dataset is opened, so a missing image fails
the run before any work, with its name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import UserError
from ..vocabularies import Vocabulary, get_vocabulary
from .metrics import IGNORE


@dataclass(frozen=True)
class Sample:
    name: str  # image id, e.g. 2007_000033 or 000000000139
    image: Path
    label: Path


@dataclass(frozen=True)
class Dataset:
    kind: str
    split: str
    root: Path
    vocab: Vocabulary
    samples: tuple[Sample, ...]

    def image(self, s: Sample) -> Image.Image:
        try:
            with Image.open(s.image) as im:
                return im.convert("RGB")
        except (OSError, ValueError) as e:
            raise UserError(f"image {s.name} ({s.image}) cannot be read: {e}") from None

    def image_size(self, s: Sample) -> tuple[int, int]:
        """(W, H) from the file header, without decoding the pixels."""
        try:
            with Image.open(s.image) as im:
                return im.size
        except (OSError, ValueError) as e:
            raise UserError(f"image {s.name} ({s.image}) cannot be read: {e}") from None

    def label(self, s: Sample) -> np.ndarray:
        """(H, W) uint8 evaluation indices, IGNORE for void; checked against the image size."""
        try:
            with Image.open(s.label) as im:
                if im.mode not in ("P", "L"):
                    raise UserError(f"label {s.label} has mode {im.mode}; expected a palette or "
                                    f"grey PNG holding class indices")
                gt = np.array(im, dtype=np.uint8)
        except OSError as e:
            raise UserError(f"label of {s.name} ({s.label}) cannot be read: {e}") from None
        if gt.shape[::-1] != self.image_size(s):
            raise UserError(f"label {s.label} is {gt.shape[1]}x{gt.shape[0]} but image {s.name} "
                            f"is {self.image_size(s)[0]}x{self.image_size(s)[1]}; they must match")
        shift = 0 if self.vocab.background else 1  # Context 59 reads the 60-class PNGs
        bad = (gt >= len(self.vocab) + shift) & (gt != IGNORE)
        if bad.any():
            raise UserError(f"label {s.label} holds value {int(gt[bad][0])}, outside the "
                            f"{len(self.vocab) + shift} label values of {self.kind} and {IGNORE}; "
                            f"wrong --dataset?")
        if shift:  # mmsegmentation's reduce_zero_label: background -> ignore, v -> v-1
            gt = np.where((gt == 0) | (gt == IGNORE), IGNORE, gt - 1).astype(np.uint8)
        return gt


def _find(root: Path, marker: str, parents: tuple[str, ...]) -> Path | None:
    for sub in ("",) + parents:
        if (root / sub / marker).is_dir():
            return root / sub
    return None


def _read_split(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"split file {path} not found; give an existing --split (e.g. val)")
    names = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if not names:
        raise UserError(f"split file {path} is empty")
    return names


def _check_exist(samples: list[Sample]) -> None:
    for s in samples:
        for kind, p in (("image", s.image), ("label", s.label)):
            if not p.is_file():
                raise UserError(f"{kind} of {s.name} missing: {p}; every image of the split "
                                f"must be present")


def open_dataset(kind: str, root: str | Path, split: str = "val") -> Dataset:
    vocab = get_vocabulary(kind)
    kind, root = vocab.name, Path(root)
    if not root.is_dir():
        raise UserError(f"--root {root} is not a directory")
    if kind == "voc":
        base = _find(root, "JPEGImages", ("VOC2012", "VOCdevkit/VOC2012"))
        if base is None:
            raise UserError(f"--root {root}: no VOC2012 layout (expected VOCdevkit/VOC2012/JPEGImages)")
        names = _read_split(base / "ImageSets" / "Segmentation" / f"{split}.txt")
        label_dirs = [base / "SegmentationClass", base / "SegmentationClassAug"]
        samples = []
        for n in names:  # the original label when there is one, else the augmented set's
            label = next((d / f"{n}.png" for d in label_dirs if (d / f"{n}.png").is_file()),
                         label_dirs[0] / f"{n}.png")
            samples.append(Sample(n, base / "JPEGImages" / f"{n}.jpg", label))
    elif kind in ("context", "context59"):
        base = _find(root, "SegmentationClassContext", ("VOC2010", "VOCdevkit/VOC2010"))
        if base is None:
            raise UserError(f"--root {root}: no Pascal Context layout (expected "
                            f"VOCdevkit/VOC2010/JPEGImages and SegmentationClassContext)")
        names = _read_split(base / "ImageSets" / "SegmentationContext" / f"{split}.txt")
        samples = [Sample(n, base / "JPEGImages" / f"{n}.jpg",
                          base / "SegmentationClassContext" / f"{n}.png") for n in names]
    else:  # coco-object
        base = _find(root, f"images/{split}2017", ("coco",))
        if base is None:
            raise UserError(f"--root {root}: no COCO-Object layout (expected "
                            f"images/{split}2017 and annotations/{split}2017)")
        names = sorted(p.stem for p in (base / "images" / f"{split}2017").glob("*.jpg"))
        if not names:
            raise UserError(f"{base / 'images' / f'{split}2017'} holds no .jpg image")
        samples = [Sample(n, base / "images" / f"{split}2017" / f"{n}.jpg",
                          base / "annotations" / f"{split}2017" / f"{n}_instanceTrainIds.png")
                   for n in names]
    if len(set(s.name for s in samples)) != len(samples):
        raise UserError(f"the {split} split of {root} lists an image twice")
    _check_exist(samples)
    return Dataset(kind, split, base, vocab, tuple(samples))
