"""`minidiffseg filter IMAGE... --vocabulary voc --out labels.json`: candidate classes per image.

Runs the CLIP and/or BLIP filter (filters.py) on every image and writes our label file
(labels.py: the official layout plus captions and CLIP scores), which `segment`/`eval` read like
the official files. Resumable: images already in --out are skipped, and the file is saved every
--save-every images and when the run stops, under a temporary name then renamed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from ..class_source import resolve_vocabulary
from ..errors import UserError
from ..filter.filters import CLIP_RATIO, DEFAULT_BLIP_DIR, DEFAULT_CLIP_DIR, make_filter
from ..filter.labels import LabelWriter, image_key
from .options import add_model_args, device_of, filter_dtype_of


def register(subparsers) -> None:
    p = subparsers.add_parser("filter", help="candidate classes per image (CLIP ∪ BLIP caption) into a label file",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--vocabulary", required=True, help="voc, context, context59, coco, or a file with one class per line")
    p.add_argument("--out", required=True, help="label file to write (JSON); rerun with it to resume")
    p.add_argument("--filter", default="union", choices=["union", "clip", "blip"],
                   help="union (default, the paper's), clip (zero-shot scores) or blip (caption nouns)")
    p.add_argument("--clip-ratio", type=float, default=CLIP_RATIO,
                   help=f"keep classes whose CLIP score is at least this fraction of the best (default {CLIP_RATIO})")
    p.add_argument("--clip-weights", default=str(DEFAULT_CLIP_DIR), help="openai/clip-vit-large-patch14 folder (or the hub id: its cached copy)")
    p.add_argument("--blip-weights", default=str(DEFAULT_BLIP_DIR), help="Salesforce/blip-image-captioning-large folder (or the hub id: its cached copy)")
    add_model_args(p, weights=False)
    p.add_argument("--save-every", type=int, default=20, metavar="N", help="save the label file every N images")
    p.set_defaults(func=run)


def run(args) -> int:
    vocabulary = resolve_vocabulary(args.vocabulary)
    images = [Path(p) for p in args.images]
    seen: dict[str, Path] = {}
    for path in images:
        if not path.is_file():
            raise UserError(f"image {path}: no such file")
        if image_key(path) in seen:  # label files are keyed by file name
            raise UserError(f"images {seen[image_key(path)]} and {path} have the same file name; "
                            "label files are keyed by name: filter them into separate --out files")
        seen[image_key(path)] = path
    if args.save_every < 1:
        raise UserError(f"--save-every {args.save_every}: give a positive number of images")
    writer = LabelWriter(args.out, vocabulary, args.filter, args.clip_ratio)
    todo = [p for p in images if not writer.done(p)]
    if not todo:
        print(f"all {len(images)} images are already in {args.out}", file=sys.stderr)
        return 0
    device = device_of(args)
    dtype = filter_dtype_of(args, device)  # fp32 unless --dtype: CLIP's ratio rule and BLIP's greedy captions
    filt = make_filter(args.filter, vocabulary, args.clip_weights, args.blip_weights,
                       clip_ratio=args.clip_ratio, device=device, dtype=dtype)
    try:
        for n, path in enumerate(tqdm(todo, desc="filter", unit="image", file=sys.stderr), 1):
            writer.add(path, filt.details(path))
            if n % args.save_every == 0:
                writer.save()
    finally:  # keep what is done, also when stopped by an error or Ctrl-C
        writer.save()
    print(f"{len(todo)} images filtered ({len(images) - len(todo)} already there) -> {args.out}", file=sys.stderr)
    return 0
