"""Pictures: VOC-palette masks, overlays with a legend, heat maps and attention-map grids (PNG).
Pure PIL + torch; nothing here computes the method."""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw, ImageFont

from .image import pixels


def voc_palette(n: int = 256) -> list[int]:
    """The PASCAL VOC colour map (bit-interleaved label index), as a flat [r, g, b, ...] list."""
    pal = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def mask_image(mask: torch.Tensor) -> Image.Image:
    """(H, W) int label map -> palettised PNG image (mode P, VOC colours; 0 = background black)."""
    if int(mask.max()) > 255:
        raise ValueError("a palettised mask holds at most 255 classes")
    im = Image.fromarray(mask.cpu().to(torch.uint8).numpy())  # mode L ...
    im.putpalette(voc_palette())  # ... becomes P with the same indices
    return im


def _rgb(x: torch.Tensor) -> Image.Image:
    """(H, W, 3) uint8 tensor -> RGB image."""
    return Image.fromarray(x.contiguous().numpy())


def _font(size: int = 14):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has a single bitmap font
        return ImageFont.load_default()


def overlay(image: Image.Image, mask: torch.Tensor, classes: list[str], alpha: float = 0.5,
            area: dict[str, float] | None = None) -> Image.Image:
    """The image with the mask's colours blended over it and a legend of the classes present."""
    pal = torch.tensor(voc_palette(len(classes) + 1), dtype=torch.float32).reshape(-1, 3)
    img = pixels(image).float()  # (H, W, 3)
    mask = mask.cpu()  # pictures are made on the CPU, whatever device computed the mask
    colour = pal[mask]  # (H, W, 3)
    fg = (mask > 0)[..., None].float() * alpha
    out = _rgb((img * (1 - fg) + colour * fg).round().clamp(0, 255).to(torch.uint8))
    draw, font = ImageDraw.Draw(out), _font()
    y = 4
    for i, name in enumerate(["background", *classes]):
        share = area.get(name) if area else None
        if share is not None and share == 0:
            continue  # only the classes that got pixels
        label = name if share is None else f"{name} {100 * share:.1f}%"
        box = draw.textbbox((22, y), label, font=font)
        draw.rectangle((2, y, box[2] + 4, box[3] + 2), fill=(255, 255, 255))
        draw.rectangle((5, y + 2, 17, box[3]), fill=tuple(int(v) for v in pal[i]), outline=(0, 0, 0))
        draw.text((22, y), label, fill=(0, 0, 0), font=font)
        y = box[3] + 6
    return out


def colormap(x: torch.Tensor) -> torch.Tensor:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8, a black-purple-orange-yellow ramp (inferno-like)."""
    stops = torch.tensor([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=torch.float32)
    t = x.detach().cpu().float().clamp(0, 1) * (len(stops) - 1)  # on the CPU, whatever device x is on
    i = t.floor().long().clamp(max=len(stops) - 2)
    f = (t - i)[..., None]
    return (stops[i] * (1 - f) + stops[i + 1] * f).round().to(torch.uint8)


def heatmap(scores: torch.Tensor) -> Image.Image:
    """(H, W) map -> coloured PNG (min-max scaled)."""
    lo, hi = scores.min(), scores.max()
    return _rgb(colormap((scores - lo) / (hi - lo).clamp_min(1e-12)))


def grid(rows: list[tuple[str, list[tuple[str, torch.Tensor]]]], cell: int = 96) -> Image.Image:
    """A labelled grid: rows of (row label, [(column label, (h, w) map), ...]), each map min-max
    scaled and resized (nearest, so the native resolution stays visible) to cell×cell."""
    font = _font(11)
    ncols = max(len(cols) for _, cols in rows)
    left, top = 110, 30
    out = Image.new("RGB", (left + ncols * (cell + 4), top + len(rows) * (cell + 4)), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    for r, (label, cols) in enumerate(rows):
        y = top + r * (cell + 4)
        draw.text((4, y + cell // 2 - 6), label[:16], fill=(0, 0, 0), font=font)
        for c, (name, m) in enumerate(cols):
            x = left + c * (cell + 4)
            if r == 0:
                draw.text((x, 2), name[:16], fill=(0, 0, 0), font=font)
                if len(name) > 16:
                    draw.text((x, 15), name[16:32], fill=(0, 0, 0), font=font)
            out.paste(heatmap(m).resize((cell, cell), Image.NEAREST), (x, y))
    return out
