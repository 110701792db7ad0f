"""Reading images the way users hand them over: any path or PIL image, any common mode, EXIF
orientation honoured, and clear one-line errors for everything else. No numpy needed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import cast

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError

# Images above this many pixels are refused rather than decoded into tens of GB: 100 MP is ~0.3 GB
# as RGB bytes, ~1.2 GB as the float tensor the resize reads. JPEGs are first decoded at a reduced
# scale (libjpeg's draft mode), so large JPEG photos still work.
MAX_PIXELS = 100_000_000
# A CC0 photo of a cat shipped with the package (minidiffseg/data/README.md), for first runs and demos.
SAMPLE_PHOTO = Path(__file__).parent / "data" / "chelsea.jpg"


def load_image(image: str | os.PathLike | Image.Image) -> Image.Image:
    """An RGB PIL image, EXIF-rotated. Palette/alpha images lose their alpha channel (as PIL's
    convert("RGB")); 16-bit and float greyscale are scaled to 8 bits; animated files give frame 0."""
    if isinstance(image, Image.Image):
        return _to_rgb(ImageOps.exif_transpose(image), "<PIL image>")
    path = Path(image)
    if not path.is_file():
        raise UserError(f"image {path}: no such file")
    if path.stat().st_size == 0:
        raise UserError(f"image {path}: the file is empty (0 bytes)")
    try:
        with Image.open(path) as im:
            if im.format == "JPEG" and im.width * im.height > MAX_PIXELS:
                scale = (im.width * im.height / MAX_PIXELS) ** 0.5
                im.draft("RGB", (int(im.width / scale), int(im.height / scale)))
            if im.width * im.height > MAX_PIXELS:
                raise UserError(f"image {path}: {im.width}×{im.height} pixels is more than {MAX_PIXELS:,}: "
                                "downscale it first (the model reads 512×512 anyway)")
            im.seek(0)
            im.load()
            return _to_rgb(ImageOps.exif_transpose(im), str(path))
    except UserError:
        raise
    except Image.DecompressionBombError as e:  # PIL refuses to even open it: "Image size (N pixels) exceeds limit ..."
        raise UserError(f"image {path}: too large to decode safely ({str(e).split(', could')[0]}): downscale it "
                        "first (the model reads 512×512 anyway)") from None
    except UnidentifiedImageError as e:
        raise UserError(f"image {path}: not a readable image ({type(e).__name__}): give a PNG, JPEG, ... file") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise UserError(f"image {path}: cannot be decoded ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                        "the file may be truncated or corrupt") from None


def _to_rgb(im: Image.Image, what: str) -> Image.Image:
    if im.width < 1 or im.height < 1:
        raise UserError(f"image {what}: has no pixels ({im.width}×{im.height})")
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit / 32-bit greyscale: stretch the value range to 8 bits instead of clipping at 255
        im = im.convert("F")
        # cast: PIL types getextrema() for any mode; a one-band "F" image gives (min, max) floats
        lo, hi = cast("tuple[float, float]", im.getextrema())
        im = im.point(lambda v: (v - lo) * (255.0 / (hi - lo) if hi > lo else 0.0)).convert("L")
    return im.convert("RGB")


def pixels(im: Image.Image) -> torch.Tensor:
    """PIL image -> its RGB bytes as an (H, W, 3) uint8 tensor."""
    rgb = im if im.mode == "RGB" else im.convert("RGB")
    return torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).reshape(rgb.height, rgb.width, 3)


def to_tensor(im: Image.Image, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """RGB PIL image -> (1, 3, H, W) in [0, 1]."""
    return pixels(im).permute(2, 0, 1)[None].to(dtype) / 255.0
