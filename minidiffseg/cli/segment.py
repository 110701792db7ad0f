"""`minidiffseg segment` (masks, overlays, heat maps and scores per image) and `minidiffseg maps`
(a PNG grid of the cross-attention maps per layer and level, and the refined maps: the paper's
Figures 3 and 5, for studying the architecture)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from tqdm import tqdm

from .. import crf
from ..class_source import ClassSource, resolve_vocabulary
from ..errors import UserError
from ..files import remove_stale_temporaries, writable_dir, write_atomic
from ..method.prompts import TEMPLATES, check_classes
from ..method.recipe import DEFAULT_TAU, MAX_TIMESTEPS, check_tau, check_timesteps
from ..method.segmenter import Segmenter
from ..outputs import scores_file, write_result
from .options import (add_model_args, device_of, dtype_of, filter_dtype_of, free_memory, is_out_of_memory,
                      memory_options, out_of_memory)


def register(subparsers) -> None:
    p = subparsers.add_parser("segment", help="segment images into the given classes",
                              description="For each IMAGE writes into --out: STEM_mask.png (VOC palette, "
                              "0 = background, i = i-th class), STEM_overlay.png, STEM_heat_I_CLASS.png and "
                              "STEM_scores.safetensors (scores at the image size, fused and refined maps at "
                              "the latent size; written last, so its presence means the image is done).")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    _method_args(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--skip-existing", action="store_true", help="skip images whose outputs are complete (resume)")
    p.add_argument("--crf", nargs="?", const=crf.DEFAULT_PRESET, metavar="PRESET[,KEY=VALUE...]",
                   help=f"refine the mask with a dense CRF: {', '.join(crf.PRESETS)} (default {crf.DEFAULT_PRESET}), "
                   "optionally with overrides, e.g. clip-es,iterations=5 (docs/crf.md)")
    p.add_argument("--ignore-below", type=float, metavar="P", help="mask pixels whose top probability (after the "
                   "CRF, if on) is below P as 255, the ignore label of training pipelines")
    p.set_defaults(func=run_segment)

    m = subparsers.add_parser("maps", help="PNG grid of attention maps per layer, level, fused and refined")
    m.add_argument("image", metavar="IMAGE")
    _method_args(m)
    m.add_argument("--out", required=True, help="PNG file to write")
    m.set_defaults(func=run_maps)


def _method_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--classes", help="comma-separated class names, e.g. cat,dog,sofa (a name may carry "
                   "weight marks: dog++)")
    p.add_argument("--vocabulary", help="without --classes: voc, context, context59, coco or a file; the "
                   "--filter picks the candidate classes of each image from it")
    p.add_argument("--filter", default="union", choices=["union", "clip", "blip"],
                   help="with --vocabulary: CLIP ∪ BLIP-caption nouns (default, the paper's), clip or blip")
    p.add_argument("--caption", choices=["none", "blip"], default="none",
                   help="blip: each class prompt is BLIP's conditional caption of the template (official recipe)")
    p.add_argument("--clip-weights", help="openai/clip-vit-large-patch14 folder or hub id (for --filter)")
    p.add_argument("--blip-weights", help="Salesforce/blip-image-captioning-large folder or hub id (for --filter/--caption)")
    add_model_args(p)
    p.add_argument("--seed", type=int, default=0, help="seeds the VAE sample and the noise (default 0)")
    p.add_argument("--tau", type=float, help=f"background score τ in [0, 1]: a pixel whose best class score is "
                   f"below it is background (default {DEFAULT_TAU})")
    p.add_argument("--joint", action="store_true", help="one prompt naming all classes, one U-Net row (C× cheaper)")
    p.add_argument("--template", help="prompt template with {} for the class (default: the vocabulary's, "
                   "else 'a photograph of {}')")
    p.add_argument("--resolution", type=int, help="square side the image is stretched to (÷64; default: the size the "
                   "model was trained at, 512, or 768 for SD2.x 768-v)")
    p.add_argument("--posterior", choices=["sample", "mean"], default="sample",
                   help="the VAE posterior's sample (official) or its mean (deterministic)")
    p.add_argument("--class-batch", type=int, help="at most N classes per U-Net call (bounds memory)")
    p.add_argument("--timesteps", default="100", help=f"comma-separated noise levels in 0..999 whose attention is "
                   f"averaged, at most {MAX_TIMESTEPS} (official: 100; the paper's Table 5 also tries 1,50,100,150)")
    p.add_argument("--tokens", choices=["last", "all"], default="last",
                   help="class-name tokens read: the last (official) or all of them")


def _segmenter(args) -> Segmenter:
    if args.tau is not None:
        check_tau(args.tau, what="--tau")
    if args.class_batch is not None and args.class_batch < 1:
        raise UserError(f"--class-batch {args.class_batch}: give a positive number")
    timesteps = check_timesteps(args.timesteps, what="--timesteps")
    template = args.template
    if template is None and args.classes is None and args.vocabulary is not None:
        template = resolve_vocabulary(args.vocabulary).template  # "a photography of {}" for Context/COCO
    device = device_of(args)
    try:
        seg = Segmenter.from_pretrained(args.weights, device=device, dtype=dtype_of(args, device),
                                        resolution=args.resolution, template=template or TEMPLATES["photograph"],
                                        joint=args.joint, timesteps=timesteps, tokens=args.tokens,
                                        **memory_options(args, args.class_batch))
    except (RuntimeError, MemoryError) as e:
        if not is_out_of_memory(e):
            raise
        raise UserError(f"{args.weights}: out of memory on {device} while loading the weights; use --low-memory "
                        "(weights streamed from the files) or --device cpu") from None
    return seg


def _class_source(args, seg: Segmenter) -> ClassSource:
    """The classes of each image from --classes, or from --filter over --vocabulary; --caption's captions."""
    if args.classes is None and args.vocabulary is None:
        raise UserError("give --classes cat,dog,... or --vocabulary voc|context|coco|FILE (with --filter)")
    return ClassSource(seg, args.classes.split(",") if args.classes is not None else None, args.vocabulary,
                       kind=args.filter, caption=args.caption, clip_weights=args.clip_weights,
                       blip_weights=args.blip_weights, dtype=filter_dtype_of(args, seg.device))  # fp32 unless --dtype


def run_segment(args) -> int:
    images = [Path(p) for p in args.images]
    stems: dict[str, Path] = {}
    for path in images:
        if path.stem in stems:
            raise UserError(f"images {stems[path.stem]} and {path} share the name {path.stem!r}: outputs are named "
                            "after it; segment them into separate --out folders")
        stems[path.stem] = path
    out = writable_dir(args.out)
    remove_stale_temporaries(out)  # half-written files of a killed earlier run
    if args.classes is not None:
        check_classes(args.classes.split(","))  # fail before loading any weights
    crf_params = crf.parse(args.crf) if args.crf is not None else None
    crf.check_ignore_below(args.ignore_below)
    refine = crf_params is not None or args.ignore_below is not None
    crf_used = (crf.describe(crf_params) if crf_params else "off") + \
        (f"; pixels with top probability < {args.ignore_below} are {crf.IGNORE}" if args.ignore_below is not None else "")
    todo = [p for p in images if not (args.skip_existing and scores_file(out, p.stem).is_file())]
    if len(todo) < len(images):
        print(f"minidiffseg: {len(images) - len(todo)} image(s) already done in {out}, skipped", file=sys.stderr)
    if not todo:
        return 0
    seg = _segmenter(args)
    source = _class_source(args, seg)
    failed = []
    for path in tqdm(todo, desc="segment", unit="image", file=sys.stderr, disable=len(todo) < 2):
        error = oom = None
        try:
            classes, captions = source(path)
            r = seg(path, classes, captions=captions, seed=args.seed, tau=args.tau, posterior=args.posterior)
            mask = None
            if refine:  # the CRF's labels become r.mask (overlay, areas); `mask` adds the ignore label
                from ..image import load_image

                labels, mask = crf.pseudo_labels(load_image(path), r.scores, r.tau, crf_params, args.ignore_below,
                                                 seg.device)
                r = dataclasses.replace(r, mask=labels)
            write_result(out, path.stem, path, r, mask, crf_used if refine else None)
        except UserError as e:
            error = e
        except (RuntimeError, MemoryError) as e:
            if not is_out_of_memory(e):
                raise  # a bug: its traceback
            error = oom = UserError(out_of_memory(e, f"image {path}", seg.device, args))  # not chained to e
        if oom is not None:  # out of the except: e's traceback, which holds the image's tensors, is gone
            free_memory(seg.device)
        if error is not None:
            if len(todo) == 1:
                raise error  # one image: its error is the one line
            failed.append(str(error))
            tqdm.write(f"minidiffseg: error: {error}", file=sys.stderr)
            continue
        found = ", ".join(f"{k} {100 * v:.1f}%" for k, v in sorted(r.area().items(), key=lambda kv: -kv[1]) if v > 0)
        tqdm.write(f"{path.name}: {found}")
    print(f"{seg.sd.name} at {seg.resolution}²: {len(todo) - len(failed)} image(s) segmented into {out}")
    if failed:
        print(f"minidiffseg: error: {len(failed)} of {len(todo)} image(s) failed (listed above); the others were "
              f"written to {out}", file=sys.stderr)
        return UserError.exit_code
    return 0


def run_maps(args) -> int:
    from ..viz import attention_grid

    out = Path(args.out)
    writable_dir(out.parent if str(out.parent) else Path("."))
    if args.classes is not None:
        check_classes(args.classes.split(","))
    seg = _segmenter(args)
    try:
        classes, captions = _class_source(args, seg)(args.image)
        r = seg(args.image, classes, captions=captions, seed=args.seed, tau=args.tau, posterior=args.posterior)
    except (RuntimeError, MemoryError) as e:
        if not is_out_of_memory(e):
            raise
        raise UserError(out_of_memory(e, f"image {args.image}", seg.device, args)) from None
    write_atomic(out, lambda p: attention_grid(r, seg.groups, seg.recipe.transformer).save(p, format="PNG"))
    print(f"{out}: {len(r.layers)} cross-attention layers, {len(r.levels)} {'blocks' if seg.recipe.transformer else 'levels'}, fused and refined maps for "
          f"{len(r.classes)} class(es); {seg.sd.name} at {seg.resolution}²")
    return 0
