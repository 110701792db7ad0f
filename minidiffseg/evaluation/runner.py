"""Resumable, distributed evaluation of a segmenter on a dataset split, in two passes.

1. segment: for each image without a result file, ask the segmenter about its candidate classes
   and store the refined maps on the latent grid (`.refined`, before upsampling and min-max) with
   the classes' evaluation indices in OUT/results/<image>.npz, written atomically (tmp + rename).
   A run killed at any point and restarted skips the images that have a file.
2. score: for each image, upsample the stored maps to the label size, decide with τ (any number
   of τ at once: calibration and the oracle sweep are cheap), and add the confusion matrix.
   A missing result fails the run with the image's name, never a partial mIoU.

Under torchrun (RANK/WORLD_SIZE in the environment) each rank takes images rank, rank+N, ...
(no padding duplicates) and the confusion matrices are all-reduced, so the mIoU is identical to
one process. A UserError on any rank stops every rank (it is all-reduced as a flag first).
An image that `recover` forgives (the command forgives running out of memory) is reported on its line and
left without a result; the other images are still segmented, then the run fails naming how many are left:
a rerun with the same OUT (e.g. with less memory per image) segments only those.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from ..errors import UserError
from ..files import write_atomic
from ..crf import IGNORE, CRFParams, pseudo_labels
from ..method.decision import decide, upsample_scores
from ..viz import voc_palette
from .candidates import Candidates
from .datasets import Dataset, Sample
from .metrics import confusion


class Refined(Protocol):
    """What the runner reads of a segmentation (`SegmentationResult`)."""

    @property
    def refined(self) -> torch.Tensor:  # (C, h, w) on the latent grid
        ...


class SegmenterLike(Protocol):
    """What the runner needs: `minidiffseg.method.segmenter.Segmenter` (built with the vocabulary's
    template) or a test stub, called as `model(image, classes, seed=seed)`. `classes` are prompt names."""

    def __call__(self, image: Image.Image, classes: list[str], *, seed: int) -> Refined:
        ...


# ---------------------------------------------------------------------------------------- ranks

# How long a rank waits in a collective for the others. The first collective comes after the whole segmenting
# pass (`run`: a rank that finishes its shard waits there for the slowest one), so the wait can be as long as
# a shard's segmenting time: hours for Pascal Context's 5105 images with the filter, or when a resumed run
# leaves one rank nothing to do and another hundreds of images. The defaults (NCCL 10 min, gloo 30 min) would
# abort such runs. A crashed rank does not make the others wait for it: torchrun stops them all.
COLLECTIVE_TIMEOUT = timedelta(hours=24)


class Ranks:
    """This process's place among torchrun's processes (rank 0 of 1 without torchrun)."""

    def __init__(self, device: str | torch.device = "cpu"):
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        self.device = torch.device(device)
        self.owner = self.world > 1 and not dist.is_initialized()
        if self.owner:
            if self.device.type == "cuda":
                # device_id: the communicator is made now, on this process's GPU (eager init), not at the first
                # collective on whichever GPU is current then
                if self.device.index is None:
                    self.device = torch.device("cuda", torch.cuda.current_device())
                dist.init_process_group("nccl", timeout=COLLECTIVE_TIMEOUT, device_id=self.device)
            else:
                dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)

    def close(self) -> None:
        """Tear the process group down (exiting with it alive aborts the process)."""
        if self.owner and dist.is_initialized():
            dist.destroy_process_group()

    def shard(self, samples: Sequence[Sample]) -> list[Sample]:
        return list(samples[self.rank::self.world])

    def sum(self, x: np.ndarray) -> np.ndarray:
        if self.world == 1:
            return x
        t = torch.from_numpy(np.ascontiguousarray(x)).to(self.device)
        dist.all_reduce(t)
        return t.cpu().numpy()

    def max(self, x: float) -> float:
        if self.world == 1:
            return x
        t = torch.tensor([x], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def agree(self, error: UserError | None) -> None:
        """Raise on every rank if any rank failed: its own error, or a pointer to the other's."""
        failed = int(self.sum(np.array([error is not None], dtype=np.int64))[0])
        if error is not None:
            raise error
        if failed:
            raise UserError(f"{failed} other rank(s) failed; their error is printed above")


# ------------------------------------------------------------------------------------ file I/O

def result_path(out: Path, sample: Sample) -> Path:
    return out / "results" / f"{sample.name}.npz"


def save_result(path: Path, classes: list[int], refined: np.ndarray) -> None:
    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
            np.savez(f, classes=np.asarray(classes, dtype=np.int64), refined=refined)

    write_atomic(path, save)  # a killed run leaves a whole file or none


def load_result(path: Path, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise UserError(f"image {sample.name} has no result ({path}); run `minidiffseg eval` "
                        f"with the same --out to finish the split")
    try:
        with np.load(path) as r:
            return r["classes"], r["refined"]
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"result file {path} is unreadable ({e}); delete it and rerun") from None


def check_settings(out: Path, settings: dict, ranks: Ranks) -> None:
    """Results in OUT must all come from the same model, labels and seed: refuse to mix."""
    path = out / "settings.json"
    if path.is_file():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            raise UserError(f"{out} holds results made with other settings ({', '.join(diff)}: "
                            f"{old.get(diff[0])!r} there, {settings.get(diff[0])!r} now); "
                            f"use a new --out or the same settings")
    elif ranks.rank == 0:
        write_atomic(path, json.dumps(settings, indent=2))


# -------------------------------------------------------------------------------------- passes

Recover = Callable[[Sample, Exception], "str | None"]  # an image's failure -> the line reporting it, or None: raise


def segment(model: SegmenterLike, ds: Dataset, samples: list[Sample], out: Path,
            candidates: Candidates, seed: int, progress: bool = True, recover: Recover | None = None,
            device: str | torch.device = "cpu") -> tuple[int, float, list[str]]:
    """Pass 1 over `samples`; returns (images segmented now, seconds spent, the lines of the images that
    `recover` forgave, which have no result: the CUDA cache on `device` is emptied after each)."""
    todo = [s for s in samples if not result_path(out, s).is_file()]
    vocab, t0, skipped = ds.vocab, time.perf_counter(), []
    for s in tqdm(todo, desc=f"segment {ds.kind}", unit="img", file=sys.stderr, disable=not progress):
        reason = None
        try:
            image = ds.image(s)
            classes = candidates(s, image)  # evaluation indices
            if classes:
                r = model(image, [vocab.prompt_names[i] for i in classes], seed=seed)
                refined = r.refined.detach().float().cpu().numpy()  # (C, h, w)
                assert refined.shape[0] == len(classes), (refined.shape, len(classes))
            else:  # nothing to ask about: background everywhere (or "no class" without background)
                refined = np.zeros((0, 1, 1), dtype=np.float32)
        except Exception as e:
            if recover is None or (reason := recover(s, e)) is None:
                raise
        if reason is not None:  # out of the except: the traceback, which holds the image's tensors, is gone
            skipped.append(reason)
            tqdm.write(f"minidiffseg: error: {reason}", file=sys.stderr)
            _release(device)
            continue
        save_result(result_path(out, s), classes, refined)
    return len(todo) - len(skipped), time.perf_counter() - t0, skipped


def _release(device: str | torch.device) -> None:
    """Memory of a failed image back to the allocator, and CUDA's cached blocks back to the device."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def predict(ds: Dataset, classes: np.ndarray, scores: torch.Tensor | None, size: tuple[int, int],
            tau: float | None) -> np.ndarray:
    """(H, W) evaluation indices. With a background class: argmax over [τ, scores]; without one
    (Context 59): argmax over the scores, and index len(vocab) ("no class") when there is none."""
    if ds.vocab.background:
        if len(classes) == 0:
            return np.zeros(size, dtype=np.int64)
        assert scores is not None and tau is not None  # a background vocabulary's τ; scores with any class
        lut = np.concatenate([[0], classes])
        return lut[decide(scores, tau).cpu().numpy()]
    if len(classes) == 0:
        return np.full(size, len(ds.vocab), dtype=np.int64)
    assert scores is not None  # given with any class
    return classes[scores.argmax(0).cpu().numpy()]


def num_outcomes(ds: Dataset) -> int:
    """Side of the confusion matrix: the classes, plus "no class" where there is no background."""
    return len(ds.vocab) + (0 if ds.vocab.background else 1)


def score(ds: Dataset, samples: list[Sample], out: Path, taus: Sequence[float | None],
          masks: bool = False, progress: bool = True, crf: CRFParams | None = None,
          ignore_below: float | None = None, device: str | torch.device = "cpu") -> np.ndarray:
    """Pass 2 over `samples`: (T, n, n) int64 confusion matrices, one per τ in `taus`. With
    `masks` the predictions for taus[0] are written to OUT/masks/<image>.png (pseudo-labels, VOC
    palette). `crf` refines the predictions for taus[0] with the dense CRF (on `device`) and
    `ignore_below` marks their unsure pixels IGNORE in the masks (docs/crf.md §7)."""
    n = num_outcomes(ds)
    conf = np.zeros((len(taus), n, n), dtype=np.int64)
    for s in tqdm(samples, desc=f"score {ds.kind}", unit="img", file=sys.stderr, disable=not progress):
        classes, refined = load_result(result_path(out, s), s)
        gt = ds.label(s)  # (H, W)
        scores = upsample_scores(torch.from_numpy(refined), gt.shape) if len(classes) else None
        for t, tau in enumerate(taus):
            pred = mask = predict(ds, classes, scores, gt.shape, tau)
            if t == 0 and (crf is not None or ignore_below is not None) and scores is not None:  # any class
                labels, unsure = pseudo_labels(ds.image(s), scores, tau if ds.vocab.background else None, crf,
                                               ignore_below, device)
                lut = np.concatenate([[0], classes]) if ds.vocab.background else classes
                pred = lut[labels.numpy()]
                mask = np.where(unsure.numpy() == IGNORE, IGNORE, pred)
            conf[t] += confusion(gt, pred, n)
            if masks and t == 0:
                write_mask(out / "masks" / f"{s.name}.png", mask)
    return conf


def write_mask(path: Path, pred: np.ndarray) -> None:
    """Evaluation indices (and IGNORE) as a palettised PNG with the VOC colours: training labels as-is."""
    def save(tmp: Path) -> None:
        im = Image.fromarray(pred.astype(np.uint8), mode="L")
        im.putpalette(voc_palette())  # mode P, the same indices
        im.save(tmp, format="PNG")

    write_atomic(path, save)


def run(load_model: Callable[[], SegmenterLike], ds: Dataset, out: str | Path,
        candidates: Candidates, *, taus: Sequence[float | None], seed: int = 0,
        settings: dict | None = None, masks: bool = False, ranks: Ranks | None = None,
        progress: bool = True, crf: CRFParams | None = None, ignore_below: float | None = None,
        recover: Recover | None = None) -> dict:
    """Both passes on this rank's shard, summed over ranks. Returns {"conf": (T, n, n) int64,
    "segmented": images segmented now (all ranks), "seconds": slowest rank's segmenting time}.
    `load_model` is called only when this rank has images left to segment. `recover(sample, error)` gives
    the line reporting an image's failure it forgives (None: raise); such images are skipped and, once
    the others are segmented, the run fails with a UserError (results written are kept)."""
    out, ranks = Path(out), ranks or Ranks()
    shard = ranks.shard(ds.samples)
    show = progress and ranks.rank == 0
    error, done, seconds, conf = None, 0, 0.0, None
    try:
        check_settings(out, settings or {}, ranks)
        if any(not result_path(out, s).is_file() for s in shard):
            done, seconds, skipped = segment(load_model(), ds, shard, out, candidates, seed, show, recover,
                                             ranks.device)
            if skipped:
                raise UserError(f"{len(skipped)} of {len(shard)} image(s){' of this rank' if ranks.world > 1 else ''} "
                                f"have no result (listed above); the results of the others are kept in "
                                f"{out / 'results'}: rerun with the same --out to segment only those")
        conf = score(ds, shard, out, taus, masks, show, crf, ignore_below, ranks.device)
    except UserError as e:
        error = e
    ranks.agree(error)
    assert conf is not None  # scored, as no rank failed
    return {"conf": ranks.sum(conf), "segmented": int(ranks.sum(np.array([done]))[0]),
            "seconds": ranks.max(seconds)}
