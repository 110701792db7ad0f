"""The files of one segmented image, as `minidiffseg segment` writes them and the explorer offers them for
download: STEM_mask.png (VOC palette), STEM_overlay.png (with a legend), STEM_heat_I_CLASS.png per class,
and STEM_scores.safetensors (scores, fused and refined maps, mask; written last, so its presence means
the image is done). Each file is written under a temporary name and renamed (files.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save

from .files import write_atomic
from .method.segmenter import SegmentationResult

NAME_CHARS = 64


def safe_name(name: str) -> str:
    """A class name as part of a file name: ASCII letters, digits and ._- only, at most NAME_CHARS long
    (file names are limited to 255 bytes; the heat map's index keeps truncated names apart)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")[:NAME_CHARS] or "class"


def scores_file(out: Path, stem: str) -> Path:
    """The file whose presence marks an image as done (written last)."""
    return out / f"{stem}_scores.safetensors"


def write_result(out: Path, stem: str, image, r: SegmentationResult, mask: torch.Tensor | None = None,
                 crf_used: str | None = None) -> None:
    """`mask` replaces r.mask in STEM_mask.png and the scores file (a CRF's pseudo-label, with 255 where
    unsure); `crf_used` is recorded in the scores file's metadata."""
    from .image import load_image
    from .viz import heatmap, mask_image, overlay

    mask = r.mask if mask is None else mask
    write_atomic(out / f"{stem}_mask.png", lambda p: mask_image(mask).save(p, format="PNG"))
    write_atomic(out / f"{stem}_overlay.png",
                 lambda p: overlay(load_image(image), r.mask, r.classes, area=r.area()).save(p, format="PNG"))
    for i, name in enumerate(r.classes, 1):
        write_atomic(out / f"{stem}_heat_{i}_{safe_name(name)}.png",
                     lambda p: heatmap(r.scores[i - 1]).save(p, format="PNG"))
    meta = {"classes": json.dumps(r.classes), "prompts": json.dumps(r.prompts), "tau": str(r.tau)}
    if crf_used is not None:
        meta["crf"] = crf_used
    tensors = {"scores": r.scores.half().contiguous(), "fused": r.fused.contiguous(), "refined": r.refined.contiguous(),
               "mask": mask.to(torch.uint8).contiguous()}  # safetensors copies device tensors to the CPU
    write_atomic(scores_file(out, stem), save(tensors, metadata=meta))  # bytes: a full disk raises OSError, not a panic
