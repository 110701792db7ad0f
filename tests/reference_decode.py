"""What an image file should decode to, worked out here from the file's stored values (test-only).

PIL reads the stored values (JPEG/PNG/GIF decoding itself is not re-implemented), and every step after
that is written here with numpy, independently of minidiffseg/image.py and of PIL's `convert`/`exif_transpose`:
mode conversion (palette lookup, CMYK, 16-bit stretch, grey and alpha) and the EXIF orientation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# EXIF Orientation tag (0x0112): how the stored rows/columns must be moved to show the image upright.
# A is the stored (H, W, 3) array, B what is shown; checked by hand from the tag's definition
# (value: where stored row 0 / column 0 go).
ORIENTATION = {
    1: lambda a: a,  # row 0 top, column 0 left: as stored
    2: lambda a: a[:, ::-1],  # row 0 top, column 0 right: mirrored left-right
    3: lambda a: a[::-1, ::-1],  # row 0 bottom, column 0 right: turned 180°
    4: lambda a: a[::-1],  # row 0 bottom, column 0 left: mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),  # row 0 left, column 0 top: B[i, j] = A[j, i]
    6: lambda a: np.rot90(a, -1),  # row 0 right, column 0 top: turned 90° clockwise, B[i, j] = A[H-1-j, i]
    7: lambda a: np.rot90(a, -1)[::-1],  # row 0 right, column 0 bottom: B[i, j] = A[H-1-j, W-1-i]
    8: lambda a: np.rot90(a, 1),  # row 0 left, column 0 bottom: turned 90° counter-clockwise, B[i, j] = A[j, W-1-i]
}
EXIF_ORIENTATION = 0x0112


def reference_rgb(path: str | Path) -> tuple[np.ndarray, int]:
    """((H, W, 3) uint8 as shown upright, tolerance in levels): the first frame's stored values converted
    to RGB — palette looked up; alpha dropped; grey repeated; CMYK as R = (255 − C)(255 − K)/255 (±1 for
    rounding); 16-bit grey stretched from its own [min, max] to [0, 255] (±1 for rounding) — then the EXIF
    orientation applied."""
    with Image.open(path) as im:
        im.seek(0)
        mode, palette, orientation = im.mode, im.getpalette(), im.getexif().get(EXIF_ORIENTATION, 1)
        raw = np.asarray(im)  # the stored values: palette indices, CMYK, uint16, ...
    tolerance = 0
    if mode == "RGB":
        rgb = raw
    elif mode == "RGBA":
        rgb = raw[..., :3]
    elif mode in ("L", "1"):
        rgb = np.repeat(raw.astype(np.uint8)[..., None] * (255 if mode == "1" else 1), 3, axis=-1)
    elif mode == "LA":
        rgb = np.repeat(raw[..., :1], 3, axis=-1)
    elif mode == "P":
        rgb = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)[raw]
    elif mode == "CMYK":
        c, m, y, k = (raw[..., i].astype(np.float64) for i in range(4))
        rgb = np.stack([(255 - v) * (255 - k) / 255 for v in (c, m, y)], axis=-1).round().astype(np.uint8)
        tolerance = 1
    elif mode.startswith("I;16"):
        v = raw.astype(np.float64)
        grey = ((v - v.min()) * 255 / (v.max() - v.min())).round().astype(np.uint8)
        rgb = np.repeat(grey[..., None], 3, axis=-1)
        tolerance = 1
    else:
        raise NotImplementedError(f"{path}: mode {mode}")
    return np.array(ORIENTATION[orientation](rgb)), tolerance  # a writable copy
