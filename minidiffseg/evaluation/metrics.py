"""mIoU the mmsegmentation way: one confusion matrix over the whole split, IoU per class from it.

conf[g, p] counts pixels of ground-truth class g predicted as p; pixels labelled 255 are left out.
IoU_k = conf[k,k] / (row_k + col_k - conf[k,k]); a class with an empty union (absent from the
ground truth and never predicted) has IoU nan and is left out of the mean, a class that is only
predicted has IoU 0 and counts. Pixel accuracy = trace / labelled pixels.
"""

from __future__ import annotations

import numpy as np

IGNORE = 255  # void / boundary label in VOC, Context and COCO-Object PNGs


def confusion(gt: np.ndarray, pred: np.ndarray, n: int) -> np.ndarray:
    """gt, pred: integer (H, W); gt in [0, n) or IGNORE, pred in [0, n). Returns (n, n) int64."""
    assert gt.shape == pred.shape, (gt.shape, pred.shape)
    keep = gt != IGNORE
    g, p = gt[keep].astype(np.int64), pred[keep].astype(np.int64)
    assert g.size == 0 or (g.max() < n and p.min() >= 0 and p.max() < n), "label out of range"
    return np.bincount(g * n + p, minlength=n * n).reshape(n, n)


def iou(conf: np.ndarray) -> np.ndarray:
    """(n,) IoU per class, nan where the union is empty."""
    tp = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return tp / union


def class_accuracy(conf: np.ndarray) -> np.ndarray:
    """(n,) recall per class, nan for classes absent from the ground truth."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.diag(conf) / conf.sum(1)


def mean_iou(conf: np.ndarray, num_classes: int | None = None) -> float:
    """nan-mean of the IoU of the first `num_classes` classes (all by default)."""
    ious = iou(conf)[:num_classes]
    return float(np.nanmean(ious)) if np.isfinite(ious).any() else float("nan")


def pixel_accuracy(conf: np.ndarray) -> float:
    total = conf.sum()
    return float(np.trace(conf) / total) if total else float("nan")
