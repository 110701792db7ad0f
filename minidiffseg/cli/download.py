"""`minidiffseg download`: fetch the weight files minidiffseg loads (minidiffseg.sd.hub)."""

from __future__ import annotations

from pathlib import Path

from ..sd.hub import REPOS, VARIANTS, download


def register(subparsers) -> None:
    p = subparsers.add_parser("download", help="fetch the weights from the Hugging Face hub (only the files used)",
                              description="Fetch the files minidiffseg loads (sizes are printed first). Without "
                              "--dir they go into the Hugging Face cache (HF_HOME); HF_HUB_OFFLINE=1 uses cached "
                              "files only. See weights/README.md for layouts, sizes, licences and checksums.")
    p.add_argument("--what", choices=[*REPOS, "all"], default="sd15",
                   help="sd15 (default; segment/maps/eval), clip and blip (the class filter), or all")
    p.add_argument("--variant", choices=list(VARIANTS), default="fp16",
                   help="SD1.5 files in fp16 (default, 2.1 GB; computed in --dtype) or fp32 (4.3 GB); "
                        "CLIP and BLIP exist in fp32 only")
    p.add_argument("--dir", help="folder to put the files in (with --what all: one sub-folder per model, "
                   f"{', '.join(r.folder for r in REPOS.values())}); default: the Hugging Face cache")
    p.set_defaults(func=run_download)


def run_download(args) -> int:
    whats = list(REPOS) if args.what == "all" else [args.what]
    for what in whats:
        dir = None if args.dir is None else Path(args.dir) / REPOS[what].folder if len(whats) > 1 else Path(args.dir)
        path = download(what, args.variant, dir)
        print(f"{REPOS[what].name} is in {path}: pass it as --weights" if what == "sd15" else
              f"{REPOS[what].name} is in {path}: pass it as --{what}-weights")
    return 0
