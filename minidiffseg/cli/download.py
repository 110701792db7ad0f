"""`minidiffseg download`: fetch the weight files minidiffseg loads (minidiffseg.sd.hub)."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..sd.hub import REPOS, STABLE_DIFFUSION, VARIANTS, download

ALL = ("sd15", "clip", "blip")  # --what all: what segment, maps, eval and the class filter use by default


def register(subparsers) -> None:
    p = subparsers.add_parser("download", help="fetch the weights from the Hugging Face hub (only the files used)",
                              description="Fetch the files minidiffseg loads (sizes are printed first). Without "
                              "--dir they go into the Hugging Face cache (HF_HOME); HF_HUB_OFFLINE=1 uses cached "
                              "files only. See weights/README.md for layouts, sizes, licences and checksums.")
    p.add_argument("--what", choices=[*REPOS, "all"], default="sd15",
                   help="sd15 (default; segment/maps/eval), sd21-base, sd21 (768², v-prediction) or sd-turbo "
                        "(Stable Diffusion 2.x, docs/sd2.md), sdxl or sdxl-turbo (docs/sdxl.md), sd3-medium or "
                        "sd35-medium (Stable Diffusion 3 / 3.5 Medium: gated repos, accept the licence on the model "
                        "page and set HF_TOKEN), clip and blip (the class filter), or all (sd15, clip and blip)")
    p.add_argument("--variant", choices=list(VARIANTS), default="fp16",
                   help="Stable Diffusion files in fp16 (default; SD1.5 2.1 GB, SD2.x 2.6 GB, SDXL 6.9 GB; computed in "
                        "--dtype) or fp32 (4.3 GB, 5.2 GB, 13.9 GB); CLIP and BLIP exist in fp32 only, SD3 and SD3.5 "
                        "in fp16 only (≈ 15.5 GB and 16.3 GB, 6.0 GB and 6.8 GB with --no-t5)")
    p.add_argument("--no-t5", action="store_true",
                   help="SD3/SD3.5 only: leave out the T5-XXL text encoder (text_encoder_3/, 9.5 GB) and its tokenizer; "
                        "the model then runs with zeros in T5's place, as diffusers does without it")
    p.add_argument("--revision", metavar="REV",
                   help="a commit hash (or branch, tag) of the model's repo: the files as they were at that commit, "
                        "e.g. the one whose SHA-256s weights/README.md lists; default: the repo's main branch")
    p.add_argument("--dir", help="folder to put the files in (with --what all: one sub-folder per model, "
                   f"{', '.join(REPOS[w].folder for w in ALL)}); default: the Hugging Face cache")
    p.set_defaults(func=run_download)


def run_download(args) -> int:
    whats = list(ALL) if args.what == "all" else [args.what]
    revision, t5 = getattr(args, "revision", None), not getattr(args, "no_t5", False)
    if revision is not None and len(whats) > 1:
        raise UserError(f"--revision names a commit of one repo, and --what all fetches {len(whats)}: pass --what "
                        f"{' or --what '.join(whats)} with it")
    if not t5 and not all(REPOS[w].t5 for w in whats):
        with_t5 = " or ".join(w for w, r in REPOS.items() if r.t5)
        raise UserError(f"--no-t5 leaves out SD3's T5 text encoder, and --what {args.what} has none: use it with "
                        f"--what {with_t5}, or drop it")
    for what in whats:
        dir = None if args.dir is None else Path(args.dir) / REPOS[what].folder if len(whats) > 1 else Path(args.dir)
        path = download(what, args.variant, dir, revision, t5)
        print(f"{REPOS[what].name} is in {path}: pass it as --weights" if what in STABLE_DIFFUSION else
              f"{REPOS[what].name} is in {path}: pass it as --{what}-weights")
    return 0
