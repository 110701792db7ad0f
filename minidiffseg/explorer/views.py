"""What the explorer page shows for each of its inputs, as plain values: pictures (PIL), text (Markdown),
tables, file paths and the options of its dropdowns. One function per event of the page (`on_run`,
`on_tau`, `on_row`, `on_cross`, `on_self`, `on_click`, `preview`, `fill_prompts`), each taking the
session's stored `Exploration` and the page's inputs as Gradio passes them. Nothing here imports Gradio:
`app.py` lays the page out and connects its controls to these functions, and tests call them directly.
The pictures are drawn by viz.py."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Callable, NamedTuple

from PIL import Image

from ..errors import UserError
from ..image import load_image
from ..method.segmenter import SegmentationResult
from ..outputs import safe_name, scores_file, write_result
from ..viz import DISPLAY, display_size, map_picture, marked_pixel, short_layer_name
from .state import MAX_CLASSES, Exploration

MAX_CLASS_TEXT = 1000  # characters in the class box: 16 classes of long names fit easily
MEAN = "mean"  # the self-attention layer and head choice that averages them all (the S of M = S·A)


@dataclasses.dataclass(frozen=True)
class Choices:
    """A dropdown's options, (label, value) pairs, and the value selected."""

    choices: list
    value: object


class ResultView(NamedTuple):
    """The result column: the files `segment` writes, in the session's folder."""

    overlay: str  # STEM_overlay.png
    area: list[list]  # [class, area in %] per class, background first
    gallery: list[tuple[str, str]]  # (STEM_heat_I_CLASS.png, caption) per class
    downloads: list[str]  # STEM_mask.png and STEM_scores.safetensors
    summary: str  # Markdown: classes, τ, prompts


class RowView(NamedTuple):
    """The cross-attention dropdowns for one prompt row."""

    rows: Choices  # every prompt row
    columns: Choices  # that row's class map(s) and 77 tokens
    views: Choices  # fused A, each level's mean, each cross-attention layer


class CrossView(NamedTuple):
    picture: Image.Image  # the map, as a heat map at display size
    caption: str  # Markdown: token, view, grid, range


class SelfView(NamedTuple):
    """The self-attention row of the chosen pixel beside A and M = S·A."""

    clicked: Image.Image  # the image with the pixel marked and its latent cell outlined
    s_row: Image.Image  # where the pixel attends
    a_map: Image.Image  # the token's fused cross-attention A
    m_map: Image.Image  # its refined map M
    caption: str  # Markdown: cell, S's layer and head, M at the cell


class RunView(NamedTuple):
    """Everything Run fills in, in the order of the page's outputs."""

    result: ResultView
    row: RowView  # row 0 chosen, its first map, the fused view
    cross: CrossView  # row 0's first map, fused, over the image
    layers: Choices  # the refinement layers, their mean chosen
    heads: Choices  # the heads, their mean chosen
    pixel: SelfView  # at the image's centre
    x: int
    y: int


# ---- the events -------------------------------------------------------------------------------


def preview(path) -> Image.Image | None:
    """The uploaded image as a thumbnail (a file that is not an image: its UserError)."""
    if not path:
        return None
    im = load_image(path)
    im.thumbnail((DISPLAY, DISPLAY))
    return im


def fill_prompts(template: str, classes: str | None, mode: str) -> str:
    """The template's prompt of each class, one per line (nothing in joint mode: one prompt names them all)."""
    if mode == "joint":
        return ""
    return "\n".join(template.format(c.strip()) for c in (classes or "").split(",") if c.strip())


def on_run(seg, path, classes: str | None, prompts: str | None, timesteps, seed, tau, mode: str, folder: Path,
           progress: Callable[[float, str], None] | None = None) -> tuple[Exploration, RunView]:
    """Run: the U-Net on the image and classes (a prompt per line, or the template's), the result's files
    written into `folder`; the new stored run and every view of it the page shows first."""
    if not path:
        raise UserError("no image: upload one (PNG, JPEG, ...) or press the sample photo button")
    if classes is not None and len(classes) > MAX_CLASS_TEXT:
        raise UserError(f"the class list is {len(classes)} characters long: give at most {MAX_CLASSES} "
                        f"classes in {MAX_CLASS_TEXT} characters")
    names = [c.strip() for c in (classes or "").split(",")]
    if not any(names):
        raise UserError("the class list is empty: give at least one class name, e.g. cat, sofa")
    lines = [p.strip() for p in (prompts or "").splitlines() if p.strip()]
    ex = Exploration.run(seg, path, names, prompts=lines or None, seed=int(seed or 0), tau=tau,
                         joint=mode == "joint", timesteps=timesteps, progress=progress)
    x, y = ex.image.width // 2, ex.image.height // 2  # the first pixel shown: the centre
    return ex, RunView(result_view(ex, tau, folder, stem_of(path)), row_view(ex, 0),
                       cross_view(ex, 0, 0, "fused", True, seg.level_weights), layer_choices(ex), head_choices(ex),
                       self_view(ex, 0, 0, x, y, MEAN, MEAN), x, y)


def on_tau(ex: Exploration | None, tau, folder: Path, path) -> ResultView | None:
    """τ moved: the mask decided again and the files rewritten (None before any run: nothing to redo)."""
    if ex is None:
        return None
    return result_view(ex, tau, folder, stem_of(path))


def on_row(ex: Exploration | None, row, view, blend: bool, layer, head, x, y,
           level_weights: dict[int, float]) -> tuple[Choices, CrossView, SelfView]:
    """Another prompt row: its maps to choose from (its first chosen), and the views of that map."""
    ex = need(ex)
    row = int(row)
    column = ex.columns(row)[0][1]
    return (Choices(ex.columns(row), column), cross_view(ex, row, column, view, blend, level_weights),
            self_view(ex, row, column, x, y, layer, head))


def on_cross(ex: Exploration | None, row, column, view, blend: bool, layer, head, x, y,
             level_weights: dict[int, float]) -> tuple[CrossView, SelfView]:
    """Another token, view or blending: the cross-attention map, and A and M of the token at the pixel."""
    ex = need(ex)
    return (cross_view(ex, int(row), int(column), view, blend, level_weights),
            self_view(ex, int(row), int(column), x, y, layer, head))


def on_self(ex: Exploration | None, row, column, layer, head, x, y) -> SelfView:
    """Another self-attention layer, head or typed pixel."""
    return self_view(need(ex), int(row), int(column), x, y, layer, head)


def on_click(ex: Exploration | None, row, column, layer, head, index) -> tuple[SelfView, int, int]:
    """A click at `index` (x, y) in the shown picture's pixels: the self-attention views at that image pixel,
    and the pixel for the x and y boxes."""
    ex = need(ex)
    shown = display_size(ex.image)  # the picture clicked
    x = index[0] * ex.image.width / shown[0]
    y = index[1] * ex.image.height / shown[1]
    return self_view(ex, int(row), int(column), x, y, layer, head), int(x), int(y)


# ---- the views --------------------------------------------------------------------------------


def need(ex: Exploration | None) -> Exploration:
    if ex is None:
        raise UserError("nothing to show yet: upload an image, give classes and press Run")
    return ex


def stem_of(path) -> str:
    """The name the result's files start with: the uploaded file's, made safe."""
    return safe_name(Path(path).stem) if path else "image"


def result_view(ex: Exploration, tau, folder: Path, stem: str) -> ResultView:
    """The mask at `tau`: `segment`'s files for it written afresh into `folder` (by its own writer), and what
    the result column shows of them."""
    r = on_cpu(ex.segmentation(tau))  # pictures and files are made on the CPU, whatever --device
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    write_result(folder, stem, ex.image, r)
    area = [[name, round(100 * share, 2)] for name, share in r.area().items()]
    heat = sorted(folder.glob(f"{stem}_heat_*.png"), key=lambda p: int(p.name[len(stem) + 6:].split("_")[0]))
    gallery = [(str(p), f"{c}: score map") for p, c in zip(heat, r.classes)]
    prompts = "; ".join(f"`{p}`" for p in r.prompts)
    return ResultView(str(folder / f"{stem}_overlay.png"), area, gallery,
                      [str(folder / f"{stem}_mask.png"), str(scores_file(folder, stem))],
                      f"**{len(r.classes)} class(es)**, τ = {r.tau:.2f}; prompts: {prompts}")


def row_view(ex: Exploration, row: int) -> RowView:
    rows = [(f"row {i}: {r.text}", i) for i, r in enumerate(ex.rows)]
    layers = sorted(ex.layers, key=lambda n: (ex.level_of[n], n))
    views = ([("fused A (all levels)", "fused")] + [(f"level 1/{lvl} mean", str(lvl)) for lvl in sorted(ex.levels)]
             + [(f"{short_layer_name(n)} (1/{ex.level_of[n]})", n) for n in layers])
    return RowView(Choices(rows, row), Choices(ex.columns(row), ex.columns(row)[0][1]), Choices(views, "fused"))


def layer_choices(ex: Exploration) -> Choices:
    return Choices([("mean of the refinement layers (S)", MEAN)] + [(short_layer_name(n), n) for n in ex.self_layers],
                   MEAN)


def head_choices(ex: Exploration) -> Choices:
    return Choices([(MEAN, MEAN)] + [(str(h), str(h)) for h in range(ex.heads())], MEAN)


def cross_view(ex: Exploration, row: int, column, view, blend: bool, level_weights: dict[int, float]) -> CrossView:
    m = ex.cross(row, int(column), view)
    label = next(name for name, c in ex.columns(row) if c == int(column))
    h, w = m.shape
    weights = ", ".join(f"1/{lvl}: {wt}" for lvl, wt in level_weights.items())
    what = (f"fused A (levels weighted {weights})" if view == "fused"
            else f"level 1/{view}: mean of its layers" if str(view).isdigit() else f"layer {view}")
    return CrossView(map_picture(ex.image, m, blend), f"`{label}` · {what} · {h}×{w}, heads averaged · min "
                     f"{m.min().item():.3g}, max {m.max().item():.3g} (colours: min → max of this map)")


def self_view(ex: Exploration, row: int, column, x, y, layer, head) -> SelfView:
    if x is None or y is None:
        raise UserError("give the pixel: click the image or type x and y")
    gy, gx = ex.pixel(float(x), float(y))
    s = ex.self_attention(int(row), gy, gx, None if layer == MEAN else layer,
                          None if head in (None, MEAN) else int(head))
    a = ex.cross(int(row), int(column), "fused")
    m = ex.refined_map(int(row), int(column))
    h, w = ex.size
    text = (f"pixel (x {int(x)}, y {int(y)}) → latent cell (row {gy}, col {gx}) of {h}×{w}; S row: "
            f"{'mean of the refinement layers' if layer == MEAN else layer}, head {head}; "
            f"sum {s.sum().item():.4f}, max {s.max().item():.3g}; "
            f"M at the cell = (S·A)(p) = {m[gy, gx].item():.4g}")
    return SelfView(marked_pixel(ex.image, float(x), float(y), ex.size), map_picture(ex.image, s, False, (gy, gx)),
                    map_picture(ex.image, a, False), map_picture(ex.image, m, False), text)


def on_cpu(r: SegmentationResult) -> SegmentationResult:
    """The result's tensors on the CPU (PIL pictures and files are made from CPU tensors)."""
    return dataclasses.replace(r, scores=r.scores.cpu(), mask=r.mask.cpu(), fused=r.fused.cpu(),
                               refined=r.refined.cpu(), levels={k: v.cpu() for k, v in r.levels.items()},
                               layers={k: v.cpu() for k, v in r.layers.items()})
