"""mIoU against confusion matrices computed by hand: ignore pixels, absent classes, classes that
are only predicted, and the Context 60 / 59 variants of the same label."""

import math

import numpy as np
from PIL import Image

from minidiffseg.evaluation.datasets import open_dataset
from minidiffseg.evaluation.metrics import confusion, iou, mean_iou, pixel_accuracy

X = 255  # ignore


def test_hand_computed_confusion_iou_and_accuracy():
    gt = np.array([[0, 0, 1, 1],
                   [0, X, 1, 1],
                   [2, 2, X, 0]])
    pred = np.array([[0, 1, 1, 1],
                     [0, 3, 1, 0],
                     [2, 0, 2, 0]])  # the two predictions on ignore pixels must not count
    conf = confusion(gt, pred, 4)
    expected = np.array([[3, 1, 0, 0],
                         [1, 3, 0, 0],
                         [1, 0, 1, 0],
                         [0, 0, 0, 0]])
    assert (conf == expected).all(), conf
    # IoU0 = 3/(4+5-3), IoU1 = 3/(4+4-3), IoU2 = 1/(2+1-1), class 3 absent and unpredicted: nan
    ious = iou(conf)
    np.testing.assert_allclose(ious[:3], [0.5, 0.6, 0.5])
    assert math.isnan(ious[3])
    assert abs(mean_iou(conf) - (0.5 + 0.6 + 0.5) / 3) < 1e-12
    assert pixel_accuracy(conf) == 7 / 10


def test_a_class_only_predicted_counts_as_zero():
    gt = np.zeros((2, 2), dtype=np.int64)
    pred = np.array([[0, 0], [0, 2]])
    conf = confusion(gt, pred, 3)  # IoU0 = 3/4, IoU1 nan (absent), IoU2 = 0/1
    assert abs(mean_iou(conf) - (0.75 + 0.0) / 2) < 1e-12, iou(conf)


def test_summing_per_image_matrices_is_the_split_matrix():
    rng = np.random.default_rng(0)
    gts = [rng.choice([0, 1, 2, X], size=(5, 7)) for _ in range(4)]
    preds = [rng.integers(0, 3, size=(5, 7)) for _ in range(4)]
    whole = confusion(np.concatenate(gts, 1), np.concatenate(preds, 1), 3)
    assert (whole == sum(confusion(g, p, 3) for g, p in zip(gts, preds))).all()


def test_context_60_and_59_variants(tmp_path):
    """One label, values background 0, class 5 (bench) x2, class 7 (bird), void; the 59-class
    variant ignores background and shifts every class down by one."""
    base = tmp_path / "VOC2010"
    for d in ("JPEGImages", "SegmentationClassContext", "ImageSets/SegmentationContext"):
        (base / d).mkdir(parents=True)
    Image.new("RGB", (3, 2)).save(base / "JPEGImages" / "a.jpg")
    Image.fromarray(np.array([[0, 0, 5], [5, 7, X]], dtype=np.uint8)).save(
        base / "SegmentationClassContext" / "a.png")
    (base / "ImageSets" / "SegmentationContext" / "val.txt").write_text("a\n")

    c60 = open_dataset("context", tmp_path)
    gt = c60.label(c60.samples[0])
    conf = confusion(gt, np.full(gt.shape, 5), 60)  # "bench everywhere"
    # IoU0 = 0/2, IoU5 = 2/(2+5-2), IoU7 = 0/1 -> mIoU = 0.4/3
    assert abs(mean_iou(conf, 60) - 0.4 / 3) < 1e-12, iou(conf)[[0, 5, 7]]

    c59 = open_dataset("context59", tmp_path)
    gt = c59.label(c59.samples[0])
    assert (gt == np.array([[X, X, 4], [4, 6, X]])).all()
    n = 60  # 59 classes + "no class" (what an image without candidates predicts)
    conf = confusion(gt, np.full(gt.shape, 4), n)  # IoU4 = 2/(2+3-2), IoU6 = 0/1
    assert abs(mean_iou(conf, 59) - (2 / 3) / 2) < 1e-12, iou(conf)[[4, 6]]
    conf = confusion(gt, np.full(gt.shape, 59), n)  # "no class" everywhere: misses, not nan
    assert mean_iou(conf, 59) == 0.0
