"""Pictures: VOC-palette masks, overlays with a legend, heat maps, attention-map grids (PNG), the explorer's
map pictures, and the short display names of U-Net attention layers. Pure PIL + torch; nothing here
computes the method."""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw, ImageFont

from .image import pixels

DISPLAY = 384  # px: the longer side of the explorer's pictures (cells drawn as blocks, so 16² and 64² grids both show)
LABEL_CHARS = 16  # characters of a grid label per line


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
    y: float = 4  # the next legend line's top
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
    scaled and resized (nearest, so the native resolution stays visible) to cell×cell. A column label
    longer than a line goes on two, broken at a space where there is one."""
    font = _font(11)
    ncols = max(len(cols) for _, cols in rows)
    left, top = 110, 30
    out = Image.new("RGB", (left + ncols * (cell + 4), top + len(rows) * (cell + 4)), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    for r, (label, cols) in enumerate(rows):
        y = top + r * (cell + 4)
        draw.text((4, y + cell // 2 - 6), label[:LABEL_CHARS], fill=(0, 0, 0), font=font)
        for c, (name, m) in enumerate(cols):
            x = left + c * (cell + 4)
            if r == 0:
                first, second = _two_lines(name)
                draw.text((x, 2), first, fill=(0, 0, 0), font=font)
                if second:
                    draw.text((x, 15), second, fill=(0, 0, 0), font=font)
            out.paste(heatmap(m).resize((cell, cell), Image.Resampling.NEAREST), (x, y))
    return out


def _two_lines(label: str, n: int = LABEL_CHARS) -> tuple[str, str]:
    """`label` as at most two lines of n characters: broken at its last space within the first line, else
    after n characters."""
    if len(label) <= n:
        return label, ""
    cut = label.rfind(" ", 0, n + 1)
    if cut <= 0:
        return label[:n], label[n:2 * n]
    return label[:cut], label[cut + 1:cut + 1 + n]


def short_layer_name(name: str) -> str:
    """A U-Net attention layer's state-dict path, short for display: its block, the attention's index in
    it, and its kind. "up_blocks.1.attentions.2.transformer_blocks.0.attn2" -> "up1.2 attn2",
    "down_blocks.0.attentions.1.transformer_blocks.0.attn1" -> "down0.1 attn1", the mid block's
    "mid_block.attentions.0.transformer_blocks.0.attn2" -> "mid.0 attn2". Where an attention holds several
    transformer blocks (SDXL: up to 10), a block past the first adds its index: "…attentions.0.transformer_blocks.3.
    attn2" -> "mid.0.3 attn2"."""
    parts = name.split(".")
    if parts[0] == "transformer_blocks":  # an MM-DiT's: "transformer_blocks.9.attn" -> "block 9 attn"
        return f"block {parts[1]} {parts[2]}"
    block = f".{parts[-2]}" if parts[-2] != "0" else ""  # parts[-2]: the transformer block's index
    if parts[0] == "mid_block":
        return f"mid.{parts[2]}{block} {parts[-1]}"
    return f"{parts[0].split('_')[0]}{parts[1]}.{parts[3]}{block} {parts[-1]}"


def attention_grid(r, level_of: dict[str, int], blocks: bool = False) -> Image.Image:
    """The grid of `minidiffseg maps` for a SegmentationResult `r`: a row per class, with its map of every
    cross-attention layer (finest level first), each level's mean, the fused map A, the refined map M
    and the scores. `level_of`: layer name -> level (1 = the finest grid); `blocks`: it names a diffusion
    transformer's blocks instead (its one grid's maps are fused per block)."""
    names = sorted(r.layers, key=lambda n: (level_of[n], n))
    group = (lambda g: f"block {g}") if blocks else (lambda g: f"level 1/{g}")
    rows = []
    for i, c in enumerate(r.classes):
        cols = [(short_layer_name(n) if blocks else f"{short_layer_name(n)} 1/{level_of[n]}", r.layers[n][i])
                for n in names]
        cols += [(f"{group(g)} mean", r.levels[g][i]) for g in sorted(r.levels)]
        cols += [("fused A", r.fused[i]), ("refined M=S·A", r.refined[i]), ("scores", r.scores[i])]
        rows.append((c, cols))
    return grid(rows)


# ---- the explorer's pictures ------------------------------------------------------------------


def display_size(image: Image.Image, longer: int = DISPLAY) -> tuple[int, int]:
    """(width, height) of `image` scaled to `longer` px on its longer side."""
    scale = longer / max(image.width, image.height)
    return max(1, round(image.width * scale)), max(1, round(image.height * scale))


def map_picture(image: Image.Image, m: torch.Tensor, blend: bool, cell: tuple[int, int] | None = None) -> Image.Image:
    """An (h, w) map as a heat map at the image's aspect, DISPLAY px on its longer side, cells as blocks;
    `blend`: 45 % image under 55 % map; `cell`: the (row, col) cell outlined."""
    size = display_size(image)
    out = heatmap(m.detach().float().cpu()).resize(size, Image.Resampling.NEAREST)
    if blend:
        out = Image.blend(image.convert("RGB").resize(size, Image.Resampling.BILINEAR), out, 0.55)
    if cell is not None:
        h, w = m.shape
        sx, sy = size[0] / w, size[1] / h
        ImageDraw.Draw(out).rectangle((cell[1] * sx, cell[0] * sy, (cell[1] + 1) * sx, (cell[0] + 1) * sy),
                                      outline=(0, 255, 255), width=2)
    return out


def marked_pixel(image: Image.Image, x: float, y: float, grid_hw: tuple[int, int]) -> Image.Image:
    """The image at display size with a cross at image pixel (x, y) and the cell of an (h, w) grid over the
    image that it falls in outlined."""
    size = display_size(image)
    out = image.convert("RGB").resize(size, Image.Resampling.BILINEAR)
    px, py = x * size[0] / image.width, y * size[1] / image.height
    h, w = grid_hw
    cw, ch = size[0] / w, size[1] / h
    gx, gy = min(int(px / cw), w - 1), min(int(py / ch), h - 1)
    draw = ImageDraw.Draw(out)
    draw.rectangle((gx * cw, gy * ch, (gx + 1) * cw, (gy + 1) * ch), outline=(0, 255, 255), width=2)
    for colour, width in (((255, 255, 255), 5), ((255, 0, 0), 2)):  # a red cross, outlined in white
        draw.line((px - 10, py, px + 10, py), fill=colour, width=width)
        draw.line((px, py - 10, px, py + 10), fill=colour, width=width)
    return out
