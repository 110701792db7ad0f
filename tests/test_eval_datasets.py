"""Dataset readers on synthetic datasets written in each standard layout, and their bad inputs.

The writers here are imported by the other test_eval_* files (pytest puts tests/ on sys.path).
Every synthetic label is 40x30: row 0 void (255), rectangle A (10x12 = 120 px) of class a,
rectangle B (10x16 = 160 px) of class b, background elsewhere (1200 - 40 - 120 - 160 = 880 px).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minidiffseg.errors import UserError
from minidiffseg.evaluation.datasets import open_dataset

W, H = 40, 30
VOID_PX, A_PX, B_PX, BG_PX = 40, 120, 160, 880
# (a, b) per image, in each dataset's own label values (context: the 60-class PNG values)
PAIRS = {"voc": [(15, 7), (12, 15), (3, 20)],
         "context": [(5, 9), (9, 59), (1, 33)],
         "coco-object": [(1, 80), (63, 1), (42, 17)]}


def label_array(a: int, b: int) -> np.ndarray:
    gt = np.zeros((H, W), dtype=np.uint8)
    gt[0] = 255
    gt[5:15, 4:16] = a
    gt[16:26, 20:36] = b
    return gt


def _image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8))


def _save_label(path: Path, gt: np.ndarray, palette: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(gt, mode="L")
    if palette:  # like VOC's SegmentationClass PNGs
        im = im.convert("P")
        im.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    im.save(path)


def write_dataset(root: Path, kind: str, pairs=None) -> list[str]:
    """Write a synthetic split in `kind`'s standard layout under root; returns the image names."""
    pairs = pairs or PAIRS["context" if kind == "context59" else kind]
    if kind == "voc":
        base, names = root / "VOCdevkit" / "VOC2012", [f"2007_{i:06d}" for i in range(len(pairs))]
        img_dir, lab_dir, split = base / "JPEGImages", base / "SegmentationClass", base / "ImageSets" / "Segmentation"
        lab = lambda n: lab_dir / f"{n}.png"
    elif kind in ("context", "context59"):
        base, names = root / "VOCdevkit" / "VOC2010", [f"2008_{i:06d}" for i in range(len(pairs))]
        img_dir, split = base / "JPEGImages", base / "ImageSets" / "SegmentationContext"
        lab = lambda n: base / "SegmentationClassContext" / f"{n}.png"
    else:
        base, names = root / "coco", [f"{139 + i:012d}" for i in range(len(pairs))]
        img_dir, split = base / "images" / "val2017", None
        lab = lambda n: base / "annotations" / "val2017" / f"{n}_instanceTrainIds.png"
    img_dir.mkdir(parents=True, exist_ok=True)
    for i, (n, (a, b)) in enumerate(zip(names, pairs)):
        _image(i).save(img_dir / f"{n}.jpg", quality=95)
        _save_label(lab(n), label_array(a, b), palette=kind == "voc")
    if split is not None:
        split.mkdir(parents=True, exist_ok=True)
        (split / "val.txt").write_text("\n".join(names) + "\n")
    return names


@pytest.mark.parametrize("kind, size", [("voc", 21), ("context", 60), ("context59", 59), ("coco-object", 81)])
def test_reads_each_layout(tmp_path, kind, size):
    names = write_dataset(tmp_path, kind)
    for root in (tmp_path, next(tmp_path.iterdir())):  # the folder above, or the folder itself
        ds = open_dataset(kind, root)
        assert [s.name for s in ds.samples] == names and len(ds.vocab) == size
    gt = ds.label(ds.samples[0])
    a, b = PAIRS["context" if kind == "context59" else ds.kind][0]
    if kind == "context59":  # reduce_zero_label: background -> 255, v -> v-1
        assert (gt == 255).sum() == VOID_PX + BG_PX and gt[6, 6] == a - 1 and gt[20, 30] == b - 1
    else:
        assert (gt == 255).sum() == VOID_PX and (gt == 0).sum() == BG_PX and gt[6, 6] == a
    assert ds.image(ds.samples[0]).size == (W, H)


def test_voc_falls_back_to_the_augmented_labels(tmp_path):
    names = write_dataset(tmp_path, "voc")
    base = tmp_path / "VOCdevkit" / "VOC2012"
    (base / "SegmentationClass").rename(base / "SegmentationClassAug")
    ds = open_dataset("voc", tmp_path)
    assert ds.samples[0].label == base / "SegmentationClassAug" / f"{names[0]}.png"


def test_bad_inputs_are_one_line_user_errors(tmp_path):
    with pytest.raises(UserError, match="is not a directory"):
        open_dataset("voc", tmp_path / "nowhere")
    with pytest.raises(UserError, match="no VOC2012 layout"):
        open_dataset("voc", tmp_path)
    names = write_dataset(tmp_path, "voc")
    with pytest.raises(UserError, match="split file .*train.txt not found"):
        open_dataset("voc", tmp_path, split="train")
    base = tmp_path / "VOCdevkit" / "VOC2012"
    _save_label(base / "SegmentationClass" / f"{names[1]}.png", label_array(1, 2)[:20], palette=True)
    ds = open_dataset("voc", tmp_path)
    with pytest.raises(UserError, match=f"is 40x20 but image {names[1]} is 40x30"):
        ds.label(ds.samples[1])
    _save_label(base / "SegmentationClass" / f"{names[1]}.png", label_array(1, 33), palette=True)
    with pytest.raises(UserError, match="holds value 33, outside the 21 label values of voc"):
        ds.label(ds.samples[1])
    (base / "JPEGImages" / f"{names[2]}.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match=f"image {names[2]} .* cannot be read"):
        ds.image(ds.samples[2])
    (base / "JPEGImages" / f"{names[2]}.jpg").unlink()
    with pytest.raises(UserError, match=f"image of {names[2]} missing"):
        open_dataset("voc", tmp_path)
    with pytest.raises(UserError, match="unknown vocabulary 'ade'"):
        open_dataset("ade", tmp_path)
