"""`minidiffseg eval` and `minidiffseg calibrate`: thin commands over `runner.run`.

  eval       mIoU of a split; τ = --tau, or --tau-file (written by calibrate on *other* images;
             refused if the two image sets overlap), or the recipe's default τ (method/recipe.py DEFAULT_TAU).
             --sweep adds mIoU over a τ grid on the evaluated split, labelled as an oracle.
  calibrate  picks τ as the best mIoU over a grid on a split that is not reported (e.g.
             `--split train --limit 300` of VOC) and writes OUT/tau.json.

Both resume: rerun the same command with the same --out. Both run under
`torchrun --nproc_per_node N` (gloo on CPU, NCCL on CUDA); only rank 0 writes reports.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..files import write_atomic
from .options import (add_model_args, device_of, dtype_of, filter_dtype_of, is_out_of_memory, memory_options,
                      out_of_memory)
from ..evaluation import candidates as cands
from ..evaluation.datasets import Dataset, open_dataset
from ..evaluation.metrics import mean_iou
from ..evaluation.report import summarize, write_report
from ..evaluation.runner import Ranks, run
from .. import crf
from ..method.recipe import DEFAULT_TAU

OFFICIAL_TAUS = "0.30:0.74:0.01"  # the official code's τ range (docs/design.md §5, known defects)


def register(subparsers) -> None:
    e = subparsers.add_parser("eval", help="mIoU on VOC, Pascal Context or COCO-Object",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(e, split="val")
    tau = e.add_mutually_exclusive_group()
    tau.add_argument("--tau", type=float, help="background score τ (default: the segmenter's)")
    tau.add_argument("--tau-file", help="tau.json written by `minidiffseg calibrate`")
    e.add_argument("--sweep", nargs="?", const=OFFICIAL_TAUS, metavar="A:B:STEP",
                   help=f"also print the oracle mIoU over τ in A..B (inclusive; default {OFFICIAL_TAUS})")
    e.add_argument("--save-masks", action="store_true",
                   help="write the predicted masks (evaluation indices, VOC palette) to OUT/masks/*.png, "
                        "e.g. pseudo-labels of a training split with --labels gt")
    e.add_argument("--crf", nargs="?", const=crf.DEFAULT_PRESET, metavar="PRESET[,KEY=VALUE...]",
                   help=f"refine the predictions with a dense CRF before scoring and saving: "
                        f"{', '.join(crf.PRESETS)} (default {crf.DEFAULT_PRESET}), optionally with overrides, "
                        "e.g. clip-es,iterations=5 (docs/crf.md)")
    e.add_argument("--ignore-below", type=float, metavar="P",
                   help="with --save-masks: pixels whose top probability (after the CRF, if on) is below P "
                        "are 255 in the masks, the ignore label of training pipelines")
    e.set_defaults(func=run_eval)

    c = subparsers.add_parser("calibrate", help="choose τ on a split that is not reported",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(c, split="train")
    c.add_argument("--taus", default=OFFICIAL_TAUS, metavar="A:B:STEP",
                   help=f"τ grid, B inclusive (default {OFFICIAL_TAUS})")
    c.set_defaults(func=run_calibrate)


def _common(p: argparse.ArgumentParser, split: str) -> None:
    p.add_argument("--dataset", required=True, help="voc, context, context59 or coco-object (coco)")
    p.add_argument("--root", required=True, help="dataset folder (or a folder above it)")
    p.add_argument("--split", default=split, help=f"split name (default {split})")
    add_model_args(p)
    p.add_argument("--out", required=True, help="output folder; rerun with it to resume")
    p.add_argument("--labels", default="gt",
                   help="candidate classes: gt (from the ground truth), a label-file path, or filter")
    p.add_argument("--filter", default="union", choices=["union", "clip", "blip"],
                   help="with --labels filter: which filter (default union = CLIP ∪ BLIP, the paper's)")
    p.add_argument("--clip-weights", help="with --labels filter: openai/clip-vit-large-patch14 folder")
    p.add_argument("--blip-weights", help="with --labels filter: Salesforce/blip-image-captioning-large folder")
    p.add_argument("--resolution", type=int, default=512,
                   help="side of the square images are stretched to (official 512)")
    p.add_argument("--limit", type=int, help="only the first N images of the split")
    p.add_argument("--seed", type=int, default=0, help="noise seed, the same for every image")
    p.add_argument("--class-batch", type=int, help="at most N classes per U-Net call (bounds memory; a rerun "
                   "with another N resumes the same --out)")


# ------------------------------------------------------------------------------------- helpers

def _dataset(args) -> Dataset:
    ds = open_dataset(args.dataset, args.root, args.split)
    if args.limit is not None:
        if args.limit < 1:
            raise UserError(f"--limit {args.limit}: give a positive number of images")
        ds = dataclasses.replace(ds, samples=ds.samples[:args.limit])
    return ds


def _candidates(args, ds: Dataset, device, dtype) -> tuple[cands.Candidates, str]:
    """The candidate classes per image; a filter runs in fp32 unless --dtype is given (`dtype` is SD's)."""
    if args.labels == "gt":
        return cands.from_ground_truth(ds), "gt (classes present in the ground truth)"
    if args.labels == "filter":
        from ..filter import make_filter
        filt = make_filter(args.filter, ds.vocab, clip_dir=args.clip_weights, blip_dir=args.blip_weights,
                           device=device, dtype=filter_dtype_of(args, device))  # fp32 unless --dtype
        return cands.from_filter(ds, filt), f"filter {args.filter}"
    path = Path(args.labels)
    if not path.is_file():
        raise UserError(f"--labels {args.labels}: not gt, filter or an existing label file")
    return cands.from_label_file(ds, path), f"file {path.resolve()}"


def _grid(spec: str) -> list[float]:
    try:
        a, b, step = (float(x) for x in spec.split(":"))
    except ValueError:
        raise UserError(f"τ grid {spec!r}: write A:B:STEP, e.g. {OFFICIAL_TAUS}") from None
    if step <= 0 or b < a:
        raise UserError(f"τ grid {spec!r}: need A <= B and STEP > 0")
    return [round(float(t), 6) for t in np.arange(a, b + step / 2, step)]


def _loader(args, ds: Dataset, device, dtype):
    if args.class_batch is not None and args.class_batch < 1:
        raise UserError(f"--class-batch {args.class_batch}: give a positive number")

    def load():
        from ..method.segmenter import Segmenter
        try:
            seg = Segmenter.from_pretrained(args.weights, device=device, dtype=dtype, template=ds.vocab.template,
                                            resolution=args.resolution, **memory_options(args, args.class_batch))
        except (RuntimeError, MemoryError) as e:
            if not is_out_of_memory(e):
                raise
            raise UserError(f"{args.weights}: out of memory on {device} while loading the weights; use "
                            "--low-memory (weights streamed from the files) or --device cpu") from None
        print(f"{seg.sd.name} from {args.weights}, at {seg.resolution}²")  # stdout: stderr is for errors
        return seg
    return load


def _recover(args, device):
    """Forgive an image that ran out of memory: its line, with the ways out (`runner.run` goes on with the
    others and fails at the end; a rerun with the same --out segments only the images left)."""
    def recover(sample, e: Exception) -> str | None:
        if not is_out_of_memory(e):
            return None
        return out_of_memory(e, f"image {sample.name}", device, args, resumed="the results written are kept: "
                             "rerun with the same --out (a new --resolution needs a new --out)")
    return recover


def _settings(args, ds: Dataset, labels: str, dtype) -> dict:
    return {"dataset": ds.kind, "split": ds.split, "labels": labels,
            "weights": str(Path(args.weights).resolve()), "seed": args.seed,
            "dtype": str(dtype).removeprefix("torch."), "template": ds.vocab.template,
            "resolution": args.resolution}


def _tau(args, ds: Dataset) -> tuple[float | None, str]:
    if not ds.vocab.background:
        if args.tau is not None or args.tau_file or args.sweep:
            raise UserError(f"{ds.kind} has no background class, so τ is not used; drop --tau/--sweep")
        return None, "not used: no background class, argmax over the candidate classes"
    if args.tau is not None:
        return args.tau, "given with --tau"
    if args.tau_file:
        try:
            cal = json.loads(Path(args.tau_file).read_text())
            tau, names = float(cal["tau"]), set(cal["images"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"--tau-file {args.tau_file}: not a tau.json from `minidiffseg calibrate` ({e})") from None
        shared = [s.name for s in ds.samples if s.name in names]
        if shared:
            raise UserError(f"--tau-file {args.tau_file} was calibrated on {len(shared)} image(s) "
                            f"evaluated here (e.g. {shared[0]}); calibrate on another split")
        return tau, (f"calibrated on {cal.get('dataset')} {cal.get('split')} ({len(names)} images, "
                     f"mIoU {cal.get('miou')} there), disjoint from this split")
    return DEFAULT_TAU, "default (the recipe's τ, method/recipe.py), not tuned"


# ------------------------------------------------------------------------------------ commands

def run_eval(args) -> int:
    device = device_of(args)
    dtype = dtype_of(args, device)
    ds = _dataset(args)
    tau, tau_source = _tau(args, ds)
    sweep = _grid(args.sweep) if args.sweep else []
    crf_params = crf.parse(args.crf) if args.crf is not None else None
    crf.check_ignore_below(args.ignore_below)
    if args.ignore_below is not None and not args.save_masks:
        raise UserError("--ignore-below marks pixels in the saved masks: add --save-masks")
    crf_used = (crf.describe(crf_params) if crf_params else "off") + \
        (f"; saved masks: {crf.IGNORE} where the top probability < {args.ignore_below}"
         if args.ignore_below is not None else "")
    find, labels = _candidates(args, ds, device, dtype)
    settings = _settings(args, ds, labels, dtype)
    ranks = Ranks(device)
    try:
        res = run(_loader(args, ds, device, dtype), ds, args.out, find, taus=[tau, *sweep],
                  seed=args.seed, settings=settings, masks=args.save_masks, ranks=ranks, crf=crf_params,
                  ignore_below=args.ignore_below, recover=_recover(args, device))
    finally:
        ranks.close()
    if ranks.rank == 0:
        summary = summarize(ds, res["conf"][0], tau=tau, tau_source=tau_source, settings=settings,
                            segmented=res["segmented"], seconds=res["seconds"], world=ranks.world,
                            sweep=(sweep, res["conf"][1:]) if sweep else None, crf=crf_used)
        write_report(args.out, summary)
        miou = "nan" if summary["miou"] is None else f"{100 * summary['miou']:.2f}"
        print(f"{ds.kind} {ds.split}: mIoU {miou} over {len(ds.samples)} images (τ {tau}, CRF {args.crf or 'off'}); "
              f"report: {Path(args.out) / 'report.md'}")
        if sweep:
            o = summary["oracle_sweep"]
            print(f"oracle (τ tuned on this split, not a result): best τ {o['best_tau']} "
                  f"mIoU {100 * o['best_miou']:.2f}")
    return 0


def run_calibrate(args) -> int:
    device = device_of(args)
    dtype = dtype_of(args, device)
    ds = _dataset(args)
    if not ds.vocab.background:
        raise UserError(f"{ds.kind} has no background class, so there is no τ to calibrate")
    taus = _grid(args.taus)
    find, labels = _candidates(args, ds, device, dtype)
    settings = _settings(args, ds, labels, dtype)
    ranks = Ranks(device)
    try:
        res = run(_loader(args, ds, device, dtype), ds, args.out, find, taus=taus, seed=args.seed,
                  settings=settings, ranks=ranks, recover=_recover(args, device))
    finally:
        ranks.close()
    if ranks.rank == 0:
        mious = [mean_iou(c, len(ds.vocab)) for c in res["conf"]]
        if all(np.isnan(mious)):
            raise UserError(f"the {ds.split} split has no labelled pixel: nothing to calibrate on")
        best = int(np.nanargmax(mious))  # ties: the smallest τ
        cal = {"tau": taus[best], "miou": round(mious[best], 6), "dataset": ds.kind,
               "split": ds.split, "root": str(ds.root), "settings": settings,
               "grid": dict(zip(map(str, taus), (round(m, 6) for m in mious))),
               "images": [s.name for s in ds.samples]}
        write_atomic(Path(args.out) / "tau.json", json.dumps(cal, indent=1) + "\n")
        print(f"τ = {taus[best]} (mIoU {100 * mious[best]:.2f} on {ds.kind} {ds.split}, "
              f"{len(ds.samples)} images); written to {Path(args.out) / 'tau.json'}")
    return 0
