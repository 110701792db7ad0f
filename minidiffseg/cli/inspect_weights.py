"""`minidiffseg inspect-weights PATH`: what a copy of the weights holds, checked without loading it.

PATH is a diffusers SD1.5/SD2.x folder, an LDM single file (SD1.5's or SD2.x's), or a CLIP / BLIP hub folder
(the filter's).
Printed: the detected layout, then per network its file, dtype, parameter count and the keys that
are missing, unexpected, of the wrong shape or of a non-float dtype — the checks `load_strict` makes,
here all listed instead of stopping at the first. Models are built on `meta` and the files' headers
read, so it takes a second whatever the size. `--sha256` hashes the files and names the official
ones (sd/hub.py KNOWN_SHA256). A network stored as shards (sd/shards.py) is listed under its index, with the
shards' total size; its shards are hashed one by one. Exit code 0 when everything would load, 2 when not.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError
from ..sd import loading
from ..sd.checkpoint import (Part, Parts, diffusers_parts, is_sd3_folder, model_kind, model_name, part_of,
                              scheduler_config, single_file_parts, unet_config)
from ..sd.hub import KNOWN_SHA256, gb
from ..sd.loading import Report, build_on_meta, check_suffix, keys_text, read_header
from ..sd.shards import shard_files

if TYPE_CHECKING:  # the filter models are imported only for a CLIP / BLIP folder
    from ..filter.blip import BlipConfig, BlipForConditionalGeneration
    from ..filter.clip_model import CLIPConfig, CLIPModel


def register(subparsers) -> None:
    p = subparsers.add_parser("inspect-weights", help="check a copy of the weights: layout, dtypes, parameter "
                              "counts, missing/unexpected keys",
                              description="Check a diffusers Stable Diffusion folder (SD1.5 or SD2.x), an LDM single "
                              "file or a CLIP/BLIP hub folder against the models minidiffseg builds, without loading "
                              "the weights.")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--sha256", action="store_true", help="also hash the files (reads them whole) and name the "
                   "official ones")
    p.set_defaults(func=run_inspect)


def run_inspect(args) -> int:
    path = Path(args.path)
    layout, parts = detect(path)
    reports = [(p, check(p)) for p in parts.values()]
    print(f"{path}: {layout}")
    print(f"  {'network':<14} {'file':<46} {'size':>9}  {'dtype':<10} {'parameters':>13}  problems")
    for p, r in reports:
        dtype = " + ".join(f"{d}" if n == sum(r.dtypes.values()) else f"{n}×{d}" for d, n in r.dtypes.most_common())
        problems = len(r.twice) + len(r.missing) + len(r.unexpected) + len(r.bad_shape) + len(r.bad_dtype)
        name = str(p.file.relative_to(path)) if path.is_dir() else p.file.name
        size = sum(f.stat().st_size for f in shard_files(p.file))  # (a shard set: all its shards)
        print(f"  {p.what:<14} {name:<46} {gb(size):>9}  {dtype:<10} {r.params:>13,}  "
              f"{problems or 'none'}")
    for p, r in reports:
        for label, keys in (("stored twice", r.twice), ("missing", r.missing), ("unexpected", r.unexpected),
                            ("wrong shape", [f"{k} {list(got)}≠{list(want)}" for k, got, want, _ in r.bad_shape]),
                            ("not floating point", [f"{k} ({dtype})" for k, dtype, _ in r.bad_dtype])):
            if keys:
                print(f"  {p.what}: {len(keys)} {label}: {keys_text(keys)}")
        if p.ignored:
            print(f"  {p.what}: {len(p.ignored)} tensor(s) ignored by name (never built): {keys_text(p.ignored)}")
    if args.sha256:
        for f in dict.fromkeys(f for p, _ in reports for f in shard_files(p.file)):
            digest = sha256(f)
            name = str(f.relative_to(path)) if path.is_dir() else f.name
            print(f"  sha256 {digest}  {name}: {KNOWN_SHA256.get(digest, 'not an official file minidiffseg knows')}")
    bad = [p for p, r in reports if not r.ok]
    if bad:
        raise UserError(f"{path}: {', '.join(p.what for p in bad)} would not load (listed above): the copy is "
                        "incomplete or not the model it claims to be; download it again (weights/README.md)")
    print(f"  OK: {sum(r.params for _, r in reports):,} parameters would load")
    return 0


def detect(path: Path) -> tuple[str, Parts]:
    """(layout description, networks by component name) of a checkpoint path; UserError when it is none of the
    known layouts."""
    if not path.exists():
        raise UserError(f"{path}: not found; fetch Stable Diffusion (SD1.5, SD2.x, SDXL, SD3) or the filter's CLIP/BLIP "
                        "with `minidiffseg download --what sd15|sd21-base|sd21|sd-turbo|sdxl|sdxl-turbo|sd3-medium|"
                        f"sd35-medium|clip|blip --dir {path}` "
                        "(weights/README.md)")
    if path.is_file():
        check_suffix(path)
        from ..sd3 import single_file as sd3_file  # an SD3 single file (its MM-DiT's joint blocks)

        if sd3_file.is_sd3_file(path):
            parts, unknown = sd3_file.sd3_file_parts(path)
            for key in unknown:  # neither translated nor ignored: reported as unexpected
                parts[sd3_file.component_of(key)].names[key] = key
            return f"SD3 single file (original layout): {sd3_file.parts_name(parts)}", parts
        parts, unknown = single_file_parts(path)
        for key in unknown:  # neither translated nor ignored: reported as unexpected
            part_of(parts, key).names[key] = key
        unet = unet_config(parts)
        return f"LDM single file (original layout): {model_name(model_kind(unet, single_file=True), unet)}", parts
    if all((path / c).is_dir() for c in ("unet", "vae", "text_encoder")):
        parts = diffusers_parts(path)
        unet, scheduler = unet_config(parts), scheduler_config(path)
        return f"diffusers {model_name(model_kind(unet, scheduler=scheduler), unet, scheduler)} folder", parts
    if is_sd3_folder(path):  # SD3 / SD3.5 (minidiffseg.sd3)
        from ..sd3 import checkpoint as sd3

        parts = sd3.diffusers_parts(path)
        transformer = parts["transformer"].module
        assert isinstance(transformer, sd3.MMDiT)
        t5 = "text_encoder_3" in parts
        return f"diffusers {sd3.model_name(sd3.model_kind(transformer.cfg), transformer.cfg, t5)} folder", parts
    config = path / "config.json"
    kind = json.loads(config.read_text(encoding="utf-8")).get("model_type") if config.is_file() else None
    if kind in ("clip", "blip"):
        return f"{kind.upper()} hub folder (the class filter's)", {kind: _hub_folder(path, kind)}
    raise UserError(f"{path}: unknown layout: neither a diffusers SD1.5/SD2.x/SDXL folder (unet/, vae/, text_encoder/) nor an "
                    "SD3 folder (transformer/, vae/, text_encoders) nor "
                    "a CLIP or BLIP folder (config.json + model.safetensors) nor a .safetensors file")


def _hub_folder(folder: Path, kind: str) -> Part:
    Config: type[CLIPConfig] | type[BlipConfig]
    Model: type[CLIPModel] | type[BlipForConditionalGeneration]
    if kind == "clip":
        from ..filter.clip_model import WHAT, CLIPConfig as Config, CLIPModel as Model
    else:
        from ..filter.blip import WHAT, BlipConfig as Config, BlipForConditionalGeneration as Model
    file = folder / "model.safetensors"
    if not file.is_file():
        raise UserError(f"{file}: not found; fetch it with `minidiffseg download --what {kind} --dir {folder}`")
    shapes, _ = read_header(file)
    module = build_on_meta(Model, Config.from_transformers(json.loads((folder / "config.json").read_text())))
    return Part(WHAT, file, module, {k: k for k in shapes if k not in Model.IGNORED}, shapes,
                [k for k in shapes if k in Model.IGNORED])


def check(part: Part) -> Report:
    """The checks of loading (sd/loading.check), all of them, without loading anything."""
    return loading.check(part.module, part.file, part.names)


def sha256(path: Path, chunk: int = 16 * 2**20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
