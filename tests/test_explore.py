"""`minidiffseg explore` on the tiny random SD1.5 (docs/explore.md §4): the library's `Exploration`
(values against the Segmenter and the naive S, without gradio), the page's handlers (explorer/views.py)
called directly, without gradio or a browser, then the page through gradio_client against a server on
127.0.0.1 (run, views, bad inputs, two sessions, memory), a real headless Chromium driving the page, and
the command's one-line errors."""

import io
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from assets import missing, require
from minidiffseg.cli import main
from minidiffseg.errors import UserError
from minidiffseg.method.decision import decide
from minidiffseg.explorer.state import MAX_CLASSES, Exploration
from minidiffseg.method.refine import refine_naive, self_attention_matrix
from minidiffseg.method.segmenter import Segmenter

RES = 128  # a 16×16 latent grid: levels 16², 8², 4², 2²; the code path of 512² (levels are relative)
CLASSES = ["cat", "sofa"]  # one BPE token each, so "a photograph of cat" has the class at position 4
EXPLORE_EXTRA = 'pip install "minidiffseg[explore]"'
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def photo(path: Path, size=(150, 100)) -> Path:
    """A small synthetic picture with a few distinct regions (a real photo is not needed: random weights)."""
    im = Image.new("RGB", size, (40, 90, 160))
    draw = ImageDraw.Draw(im)
    draw.ellipse((20, 15, 80, 85), fill=(220, 180, 60))
    draw.rectangle((95, 40, 140, 95), fill=(30, 150, 60))
    im.save(path)
    return path


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    return photo(tmp_path_factory.mktemp("explore") / "shapes.png")


@pytest.fixture(scope="module", params=["batched", "joint"])
def explored(request, seg64, image):
    joint = request.param == "joint"
    return Exploration.run(seg64, image, CLASSES, seed=3, joint=joint), seg64(image, CLASSES, seed=3, joint=joint)


def count_unet_calls(monkeypatch, seg) -> list:
    """Record every U-Net forward of `seg` (an instance attribute shadows the class's forward)."""
    calls, forward = [], seg.sd.unet.forward

    def counted(*a, **kw):
        calls.append(1)
        return forward(*a, **kw)

    monkeypatch.setattr(seg.sd.unet, "forward", counted, raising=False)
    return calls


# ---- the library: Exploration ------------------------------------------------------------------


def test_the_segmentation_is_the_segmenters(explored):
    ex, want = explored
    got = ex.result
    for name in ("scores", "mask", "fused", "refined"):
        assert torch.equal(getattr(got, name), getattr(want, name)), f"{name} differs from Segmenter's"
    assert got.levels.keys() == want.levels.keys() and got.layers.keys() == want.layers.keys()
    assert all(torch.equal(got.layers[n], want.layers[n]) for n in want.layers)
    assert got.prompts == want.prompts and got.tau == want.tau


def test_token_maps_are_the_recorded_probabilities(explored):
    ex, _ = explored
    cat = ex.token_labels[0].index("cat")  # "a photograph of cat" (batched) / "... of cat and sofa" (joint)
    assert cat == 4, ex.token_labels[0][:8]
    row, col = ex.class_column(0)
    for name in ex.layers:
        probs = ex.store.mean(ex.store.prob_maps, name)  # (B, HW, 77) as the store recorded it
        h, w = ex.store.shapes[name]
        for t in (0, cat, 6):
            assert torch.equal(ex.cross(row, ex.k + t, name), probs[row, :, t].reshape(h, w))
        # each layer's token maps are softmax rows over the 77 tokens: they sum to 1 at every pixel
        total = sum(ex.cross(row, ex.k + t, name) for t in range(77))
        err = (total - 1).abs().max().item()
        assert err < 1e-9, f"{name}: Σ_t token maps deviates from 1 by {err:.2e}"
        # the class map ("cat": its last and only token, selected with weight 1) is token 4's map: two
        # recording paths of the store (the projection on the selection, and the whole probabilities); the
        # class maps are the segmentation's, in float32 as Segmenter returns them
        err = (ex.cross(row, col, name) - ex.cross(row, ex.k + cat, name)).abs().max().item()
        assert err < 1e-7 * ex.cross(row, col, name).abs().max(), f"{name}: class map vs token map error {err:.2e}"
    for view in (*ex.levels, "fused"):
        err = (ex.cross(row, col, view) - ex.cross(row, ex.k + cat, view)).abs().max().item()
        assert err < 1e-6, f"{view}: class map vs token map max abs error {err:.2e}"
    assert not torch.equal(ex.cross(row, ex.k + 1, "fused"), ex.cross(row, ex.k + cat, "fused"))


def test_a_pixel_self_attention_row_is_a_row_of_the_naive_s(explored):
    ex, _ = explored
    h, w = ex.size
    for row in range(len(ex.rows)):
        qk = ex._qk(row, ex.self_layers)
        s = self_attention_matrix([(q.expand(1, -1, -1, -1), k) for q, k in qk])[0]  # (HW, HW), built in full
        for y, x in ((0, 0), (5, 11), (h - 1, w - 1)):
            got = ex.self_attention(row, y, x)
            assert abs(got.sum().item() - 1) < 1e-9
            err = (got.flatten() - s[y * w + x]).abs().max().item()
            assert err < 1e-12, f"row {row} pixel ({y}, {x}): max abs error {err:.2e} vs the naive S"
    # one layer, one head: that head's softmax(q_p Kᵀ/√d), averaged over the run's timesteps only
    name = ex.self_layers[-1]
    q, k = ex._qk(0, [name])[0]
    want = torch.softmax(q[0, 3] @ k[0, 3].T / q.shape[-1] ** 0.5, dim=-1)[5 * w + 11]
    assert (ex.self_attention(0, 5, 11, name, 3).flatten() - want).abs().max() < 1e-12
    assert abs(ex.self_attention(0, 5, 11, name).sum().item() - 1) < 1e-9


def test_m_is_the_segmenters_refined_map_and_s_times_a(explored):
    ex, want = explored
    h, w = ex.size
    for i in range(len(ex.classes)):
        row, col = ex.class_column(i)
        assert torch.equal(ex.refined_map(row, col), want.refined[i])
    for t in (0, 4, 5):  # tokens' M, computed on demand from the stored Q/K
        a = ex.cross(0, ex.k + t, "fused")
        qk = [(q.expand(1, -1, -1, -1), k) for q, k in ex._qk(0, ex.self_layers)]
        naive = refine_naive(qk, a.flatten()[None, :, None])[0, :, 0].reshape(h, w)
        err = (ex.refined_map(0, ex.k + t) - naive).abs().max().item()
        assert err < 1e-12, f"token {t}: M max abs error {err:.2e} vs the naive S·A"
        m_p = (ex.self_attention(0, 5, 11) * a).sum()  # M at a pixel is that pixel's S row · A
        assert abs(m_p - ex.refined_map(0, ex.k + t)[5, 11]) < 1e-12


def test_views_and_tau_never_run_the_unet(monkeypatch, seg32, image):
    calls = count_unet_calls(monkeypatch, seg32)
    ex = Exploration.run(seg32, image, CLASSES, timesteps="50,100")
    assert len(calls) == 2  # one pass per timestep, all classes in it
    for view in ("fused", 1, 8, next(iter(ex.layers))):
        ex.cross(1, 3, view)
    ex.self_attention(1, 2, 3, ex.self_layers[0], 0)
    ex.refined_map(1, 7)
    r = ex.segmentation(0.7)
    assert len(calls) == 2
    assert torch.equal(r.mask, decide(ex.result.scores, 0.7)) and r.tau == 0.7
    assert torch.equal(r.scores, ex.result.scores)
    assert ex.pixel(0, 0) == (0, 0) and ex.pixel(149.9, 99.9) == (15, 15) and ex.pixel(75, 50) == (8, 8)


def test_progress_is_reported(seg32, image):
    seen = []
    Exploration.run(seg32, image, ["cat"], timesteps=(1, 100), progress=lambda f, what: seen.append((f, what)))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[0] == 0 and fractions[-1] == 1
    assert sum("U-Net pass" in what for _, what in seen) == 2


@pytest.mark.parametrize("call, message", [
    (lambda s, im: Exploration.run(s, im, [f"c{i}" for i in range(MAX_CLASSES + 1)]), "at most 16"),
    (lambda s, im: Exploration.run(s, im, []), "empty"),
    (lambda s, im: Exploration.run(s, im, ["cat"], timesteps="1,x"), "timesteps"),
    (lambda s, im: Exploration.run(s, im, ["cat"], timesteps="1000"), "0..999"),
    (lambda s, im: Exploration.run(s, im, ["cat"], tau=1.5), "[0, 1]"),
    (lambda s, im: Exploration.run(s, Path(im).with_name("absent.png"), ["cat"]), "no such file"),
])
def test_bad_runs_are_user_errors(seg32, image, call, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace(".", r"\.")):
        call(seg32, image)


def test_bad_views_are_user_errors(seg32, image):
    ex = Exploration.run(seg32, image, ["cat"])
    for call, message in ((lambda: ex.cross(1, 0), "rows 0..0"), (lambda: ex.cross(0, 78), "columns 0..77"),
                          (lambda: ex.cross(0, 0, "nope"), "not recorded"), (lambda: ex.cross(0, 0, 3), "level 3"),
                          (lambda: ex.self_attention(0, 16, 0), "outside"),
                          (lambda: ex.self_attention(0, 0, 0, head=8), "heads 0..7"),
                          (lambda: ex.self_attention(0, 0, 0, "mid"), "not a refinement layer"),
                          (lambda: ex.pixel(150, 0), "outside"), (lambda: ex.segmentation(-0.1), "[0, 1]")):
        with pytest.raises(UserError, match=message.replace("[", r"\[").replace(".", r"\.")):
            call()


# ---- the page's handlers, called directly (no gradio, no browser) -------------------------------


def test_the_run_handler_shows_the_result_and_the_first_views(monkeypatch, seg32, image, tmp_path):
    from minidiffseg.explorer import views
    from minidiffseg.outputs import write_result
    from minidiffseg.viz import map_picture, marked_pixel

    calls = count_unet_calls(monkeypatch, seg32)
    seen = []
    ex, v = views.on_run(seg32, str(image), "cat, sofa", "", "100", 0, 0.4, "batched", tmp_path / "session",
                         progress=lambda f, what: seen.append(f))
    assert len(calls) == 1 and seen[0] == 0 and seen[-1] == 1
    # the result column: the files `segment` writes for the same run, in the session's folder
    want = seg32(image, CLASSES, seed=0)
    write_result(tmp_path / "want", "shapes", image, want)
    assert Path(v.result.overlay) == tmp_path / "session" / "shapes_overlay.png"
    assert pixels(v.result.overlay) == pixels(tmp_path / "want" / "shapes_overlay.png")
    mask, scores = (Path(p) for p in v.result.downloads)
    assert mask.read_bytes() == (tmp_path / "want" / "shapes_mask.png").read_bytes()
    assert same_scores_file(scores, tmp_path / "want" / "shapes_scores.safetensors")
    assert [c for c, _ in v.result.area] == ["background", "cat", "sofa"]
    assert abs(sum(share for _, share in v.result.area) - 100) < 0.05
    assert [(Path(p).name, caption) for p, caption in v.result.gallery] == [
        ("shapes_heat_1_cat.png", "cat: score map"), ("shapes_heat_2_sofa.png", "sofa: score map")]
    assert v.result.summary.startswith("**2 class(es)**, τ = 0.40") and "`a photograph of sofa`" in v.result.summary
    # the dropdowns: row 0 and its class map chosen, the fused view; layers named short, with their level
    assert v.row.rows == views.Choices([("row 0: a photograph of cat", 0), ("row 1: a photograph of sofa", 1)], 0)
    assert v.row.columns == views.Choices(ex.columns(0), 0) and v.row.columns.choices[0] == ("cat (class map)", 0)
    labels = [label for label, _ in v.row.views.choices]
    assert v.row.views.value == "fused" and labels[0] == "fused A (all levels)"
    assert labels[1:1 + len(ex.levels)] == [f"level 1/{lvl} mean" for lvl in sorted(ex.levels)]
    assert len(labels) == 1 + len(ex.levels) + len(ex.layers) and "up1.0 attn2 (1/4)" in labels, labels
    assert v.layers.value == "mean" and [n for _, n in v.layers.choices] == ["mean", *ex.self_layers]
    assert all(label.endswith(" attn1") for label, _ in v.layers.choices[1:]), v.layers.choices
    assert v.heads == views.Choices([("mean", "mean")] + [(str(h), str(h)) for h in range(8)], "mean")
    # the first maps: the class map of row 0, fused, over the image; the self-attention at the centre
    assert same_picture(v.cross.picture, map_picture(ex.image, ex.cross(0, 0, "fused"), True))
    assert v.cross.caption.startswith("`cat (class map)` · fused A (levels weighted 1/")
    assert (v.x, v.y) == (75, 50) and ex.pixel(75, 50) == (8, 8)
    assert same_picture(v.pixel.clicked, marked_pixel(ex.image, 75, 50, ex.size))
    assert same_picture(v.pixel.s_row, map_picture(ex.image, ex.self_attention(0, 8, 8), False, (8, 8)))
    assert same_picture(v.pixel.m_map, map_picture(ex.image, ex.refined_map(0, 0), False))
    assert "latent cell (row 8, col 8) of 16×16" in v.pixel.caption and "sum 1.0000" in v.pixel.caption


def test_the_view_handlers_read_the_stored_run(monkeypatch, seg32, image, tmp_path):
    from minidiffseg.explorer import views
    from minidiffseg.outputs import write_result
    from minidiffseg.viz import map_picture

    ex, _ = views.on_run(seg32, str(image), "cat, sofa", "", "100", 0, 0.4, "batched", tmp_path / "s")
    calls = count_unet_calls(monkeypatch, seg32)
    weights = seg32.level_weights
    layer = sorted(ex.layers)[3]
    for row, column, view in ((0, 5, "fused"), (1, 2, "2"), (1, 6, layer), (0, 0, "8")):  # as Gradio passes them
        cross, pixel = views.on_cross(ex, str(row), str(column), view, False, "mean", "mean", 30, 80, weights)
        assert same_picture(cross.picture, map_picture(ex.image, ex.cross(row, column, view), False))
        gy, gx = ex.pixel(30, 80)
        assert same_picture(pixel.s_row, map_picture(ex.image, ex.self_attention(row, gy, gx), False, (gy, gx)))
        assert same_picture(pixel.a_map, map_picture(ex.image, ex.cross(row, column, "fused"), False))
        assert same_picture(pixel.m_map, map_picture(ex.image, ex.refined_map(row, column), False))
    assert f"layer {layer}" in views.on_cross(ex, 1, 6, layer, True, "mean", "mean", 0, 0, weights)[0].caption
    # one layer and head at a typed pixel; a click on the shown picture (384×256 for 150×100)
    name = ex.self_layers[2]
    pixel = views.on_self(ex, 1, 0, name, "3", 140, 5)
    gy, gx = ex.pixel(140, 5)
    assert same_picture(pixel.s_row, map_picture(ex.image, ex.self_attention(1, gy, gx, name, 3), False, (gy, gx)))
    assert f"S row: {name}, head 3" in pixel.caption
    pixel, x, y = views.on_click(ex, 0, 0, "mean", "mean", (384 * 4.5 / 16, 256 * 12.5 / 16))
    assert (x, y) == (42, 78) and "→ latent cell (row 12, col 4)" in pixel.caption
    # another row: its own maps to choose from, its class map chosen
    columns, cross, _ = views.on_row(ex, "1", "fused", True, "mean", "mean", 30, 80, weights)
    assert columns.value == 0 and ("sofa (class map)", 0) in columns.choices and ("4: sofa", 5) in columns.choices
    assert cross.caption.startswith("`sofa (class map)`")
    # τ: the mask decided again and the files rewritten; before any run, nothing to redo
    result = views.on_tau(ex, 0.9, tmp_path / "s", str(image))
    write_result(tmp_path / "want", "shapes", image, ex.segmentation(0.9))
    assert Path(result.downloads[0]).read_bytes() == (tmp_path / "want" / "shapes_mask.png").read_bytes()
    assert "τ = 0.90" in result.summary
    assert views.on_tau(None, 0.9, tmp_path / "s", str(image)) is None
    assert calls == [], f"{len(calls)} U-Net call(s) for views"


def test_the_handlers_bad_inputs_are_user_errors(seg32, image, tmp_path):
    from minidiffseg.explorer import views

    def run(path=str(image), classes="cat", prompts="", timesteps="100", tau=0.4):
        return views.on_run(seg32, path, classes, prompts, timesteps, 0, tau, "batched", tmp_path / "s")

    bad = tmp_path / "notimage.png"
    bad.write_bytes(b"not an image at all")
    for call, message in ((lambda: run(path=None), "no image"), (lambda: run(classes=" , "), "the class list is empty"),
                          (lambda: run(classes="cat," * 300), "characters long"),
                          (lambda: run(classes="cat, Cat"), "listed twice"),
                          (lambda: run(timesteps="1,x"), "timesteps '1,x'"), (lambda: run(tau=1.5), "[0, 1]"),
                          (lambda: run(path=str(bad)), "not a readable image"),
                          (lambda: views.preview(str(bad)), "not a readable image"),
                          (lambda: views.on_cross(None, 0, 0, "fused", True, "mean", "mean", 1, 1, {}),
                           "nothing to show yet"),
                          (lambda: views.on_self(run()[0], 0, 0, "mean", "mean", None, 3), "give the pixel"),
                          (lambda: views.on_self(run()[0], 0, 0, "mean", "mean", 150, 3), "outside")):
        with pytest.raises(UserError, match=message.replace("[", r"\[").replace(".", r"\.")):
            call()
    assert views.preview(None) is None and views.preview(str(image)).size == (150, 100)  # no larger than shown


def test_fill_prompts_and_short_layer_names():
    from minidiffseg.explorer.views import fill_prompts
    from minidiffseg.viz import short_layer_name

    assert fill_prompts("a photograph of {}", " cat, sofa ,", "batched") == "a photograph of cat\na photograph of sofa"
    assert fill_prompts("a photograph of {}", "cat, sofa", "joint") == ""
    assert short_layer_name("up_blocks.1.attentions.2.transformer_blocks.0.attn2") == "up1.2 attn2"
    assert short_layer_name("down_blocks.0.attentions.1.transformer_blocks.0.attn1") == "down0.1 attn1"
    assert short_layer_name("mid_block.attentions.0.transformer_blocks.0.attn2") == "mid.0 attn2"
    # SDXL's deeper transformers: every block of the 140 layers gets its own name
    assert short_layer_name("mid_block.attentions.0.transformer_blocks.3.attn2") == "mid.0.3 attn2"
    assert short_layer_name("down_blocks.2.attentions.1.transformer_blocks.9.attn1") == "down2.1.9 attn1"
    import torch

    from minidiffseg.sd.config import UNetConfig
    from minidiffseg.sd.unet import UNet
    from tiny_sdxl import FULL_UNET

    with torch.device("meta"):
        names = [m.name for m in UNet(UNetConfig.from_diffusers(
            {k: list(v) if isinstance(v, tuple) else v for k, v in FULL_UNET.items()})).attention_layers()]
    assert len(names) == 140 and len({short_layer_name(n) for n in names}) == 140


# ---- the page, through gradio_client against a server on 127.0.0.1 -----------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(seg32, tmp_path_factory):
    """The explorer over the tiny model, served from this process on a free port of 127.0.0.1; its own
    Segmenter on the same networks (so the tests can count U-Net calls)."""
    require("gradio", EXPLORE_EXTRA)
    require("gradio_client", EXPLORE_EXTRA)
    from minidiffseg.explorer.app import build_app, launch

    cache = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(tmp_path_factory.mktemp("gradio"))  # Gradio's file cache
    app = build_app(Segmenter(seg32.sd, resolution=RES), title="tiny random model (random weights)")
    url = launch(app, "127.0.0.1", free_port())
    assert url.startswith("http://127.0.0.1:")
    yield url
    app.close()
    if cache is None:
        os.environ.pop("GRADIO_TEMP_DIR", None)
    else:
        os.environ["GRADIO_TEMP_DIR"] = cache


def connect(url):
    from gradio_client import Client

    return Client(url, verbose=False, download_files=False)  # same machine: outputs are read from their paths


def upload(path):
    from gradio_client import handle_file

    return handle_file(str(path))


def run_page(client, image, classes="cat, sofa", prompts="", timesteps="100", seed=0, tau=0.4, mode="batched"):
    """The Run button: (overlay, area, gallery, downloads, summary, row, token, view, cross, cross_info,
    layer, head, click image, S row, A, M, self_info, x, y)."""
    return client.predict(upload(image), classes, prompts, timesteps, seed, tau, mode, api_name="/run")


def pixels(file) -> bytes:
    """An image output of the page (FileData dict or path) or of a handler (a PIL image) as RGB bytes."""
    if isinstance(file, Image.Image):
        return file.convert("RGB").tobytes()
    with Image.open(file["path"] if isinstance(file, dict) else file) as im:
        return im.convert("RGB").tobytes()


def same_picture(file, want: Image.Image) -> bool:
    return pixels(file) == want.convert("RGB").tobytes()


def same_scores_file(a: Path, b: Path) -> bool:
    from safetensors import safe_open

    with safe_open(a, "pt") as fa, safe_open(b, "pt") as fb:
        return (fa.metadata() == fb.metadata() and set(fa.keys()) == set(fb.keys())
                and all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys()))


def test_the_page_runs_and_every_view_shows_the_stored_run(server, seg32, image, tmp_path, monkeypatch):
    from minidiffseg.outputs import write_result
    from minidiffseg.viz import map_picture as picture

    calls = count_unet_calls(monkeypatch, seg32)
    client = connect(server)
    out = run_page(client, image)
    assert len(calls) == 1
    overlay, area, gallery, downloads = out[:4]
    assert "cat" in out[4] and "sofa" in out[4], out[4]
    assert abs(sum(share for _, share in area["data"]) - 100) < 0.05 and [c for c, _ in area["data"]] == [
        "background", "cat", "sofa"]
    assert [g["caption"] for g in gallery] == ["cat: score map", "sofa: score map"]
    # the downloads are the files `segment` writes (the PNG byte for byte; the scores file's tensors and
    # metadata: safetensors writes its metadata keys in no fixed order)
    want = seg32(image, CLASSES, seed=0)
    write_result(tmp_path, "shapes", image, want)
    names = sorted(Path(d["path"]).name for d in downloads)
    assert names == ["shapes_mask.png", "shapes_scores.safetensors"]
    mask, scores = sorted((Path(d["path"]) for d in downloads), key=lambda p: p.name)  # (cache folders: random)
    assert mask.read_bytes() == (tmp_path / mask.name).read_bytes(), "mask file"
    assert same_scores_file(scores, tmp_path / scores.name), "scores file"
    assert pixels(overlay) == pixels(tmp_path / "shapes_overlay.png"), "overlay"
    # the views the page shows are the Exploration's maps (the same run, recomputed here)
    ex = Exploration.run(seg32, image, CLASSES, seed=0)
    calls.clear()
    cross, self_maps = out[8], out[12:16]
    assert same_picture(cross, picture(ex.image, ex.cross(0, 0, "fused"), True)), "Run's cross-attention picture"
    assert tuple(out[17:]) == (75, 50)  # the first pixel shown: the image's centre
    gy, gx = ex.pixel(75, 50)
    assert same_picture(self_maps[1], picture(ex.image, ex.self_attention(0, gy, gx), False, (gy, gx))), "Run's S row"
    layer = sorted(ex.layers)[3]
    for row, column, view in ((0, 5, "fused"), (1, 2, "2"), (1, 6, layer), (0, 0, "8")):
        got = client.predict(row, column, view, False, "mean", "mean", 30, 80, api_name="/cross")
        assert same_picture(got[0], picture(ex.image, ex.cross(row, column, view), False)), (row, column, view)
        gy, gx = ex.pixel(30, 80)
        assert same_picture(got[3], picture(ex.image, ex.self_attention(row, gy, gx), False, (gy, gx))), "S row"
        assert same_picture(got[4], picture(ex.image, ex.cross(row, column, "fused"), False)), "A"
        assert same_picture(got[5], picture(ex.image, ex.refined_map(row, column), False)), "M"
    # one self-attention layer and head at another pixel
    name = ex.self_layers[2]
    got = client.predict(1, 0, name, "3", 140, 5, api_name="/self_attention")
    gy, gx = ex.pixel(140, 5)
    assert same_picture(got[1], picture(ex.image, ex.self_attention(1, gy, gx, name, 3), False, (gy, gx))), "S head 3"
    assert f"row {gy}, col {gx}" in got[4] and "sum 1.0000" in got[4], got[4]
    # another prompt row lists its own tokens
    got = client.predict(1, "fused", True, "mean", "mean", 30, 80, api_name="/row")
    assert ["sofa (class map)", 0] in got[0]["choices"] and ["4: sofa", 5] in got[0]["choices"], got[0]
    # τ changes the mask and the files, not the run
    got = client.predict(0.9, upload(image), api_name="/tau")
    write_result(tmp_path, "shapes", image, ex.segmentation(0.9))
    mask = next(d for d in got[3] if d["path"].endswith("_mask.png"))
    assert Path(mask["path"]).read_bytes() == (tmp_path / "shapes_mask.png").read_bytes(), "mask at τ 0.9"
    assert "τ = 0.90" in got[4], got[4]
    assert calls == [], f"{len(calls)} U-Net call(s) for views"


@pytest.mark.parametrize("make, classes, message", [
    (lambda p: p.write_bytes(b"not an image at all"), "cat", "notimage.png: not a readable image"),
    (lambda p: Image.new("1", (20_000, 20_000)).save(p), "cat", "too large to decode safely"),  # 400 MP in ~50 kB
    (None, " , ", "the class list is empty"),
    (None, ",".join(f"class{i}" for i in range(MAX_CLASSES + 1)), f"at most {MAX_CLASSES}"),
    (None, "cat," * 300, "characters long"),
    (None, "cat, Cat", "listed twice"),
], ids=["not-an-image", "decompression-bomb", "no-classes", "too-many-classes", "over-long", "duplicate"])
def test_bad_input_is_a_message_in_the_page_and_the_server_keeps_serving(server, image, tmp_path, make, classes,
                                                                         message):
    from gradio_client.exceptions import AppError

    client = connect(server)
    path = image
    if make is not None:
        path = tmp_path / "notimage.png"
        make(path)
    with pytest.raises(AppError) as e:
        run_page(client, path, classes)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    if make is not None:  # the preview on upload says the same
        with pytest.raises(AppError, match="notimage.png"):
            client.predict(upload(path), api_name="/preview")
    assert "cat" in run_page(client, image, "cat")[4]  # and the next run works


def test_two_sessions_are_queued_on_the_one_model_and_keep_their_own_results(server, image, monkeypatch):
    from gradio_client.utils import Status

    a, b = connect(server), connect(server)
    assert "sofa" in run_page(a, image, "cat, sofa")[4]
    gate, started = threading.Event(), threading.Event()
    original = Exploration.run.__func__

    def held(cls, *args, **kw):  # B's run waits until the test has seen what happens meanwhile
        started.set()
        gate.wait(30)
        return original(cls, *args, **kw)

    monkeypatch.setattr(Exploration, "run", classmethod(held))
    job_b = b.submit(upload(image), "dog", "", "100", 1, 0.4, "joint", api_name="/run")
    try:
        assert started.wait(30), "B's run never started"
        # while B's run holds the model, A's views still answer, from A's own run
        view = a.submit(1, 0, "fused", True, "mean", "mean", 10, 10, api_name="/cross").result(timeout=15)
        assert "sofa (class map)" in view[1]
        # and A's next run waits in the queue, and is told so
        job_a = a.submit(upload(image), "cat", "", "100", 0, 0.4, "batched", api_name="/run")
        seen, deadline = set(), time.time() + 30
        while Status.IN_QUEUE not in seen and time.time() < deadline:
            seen.add(job_a.status().code)
            time.sleep(0.05)
        assert Status.IN_QUEUE in seen, f"the queued session was never told it is queued: {seen}"
    finally:
        gate.set()
    out_a, out_b = job_a.result(timeout=60), job_b.result(timeout=60)
    assert "`a photograph of cat`" in out_a[4] and "sofa" not in out_a[4] and "dog" not in out_a[4]
    assert "dog" in out_b[4] and "cat" not in out_b[4]
    # each session's views read its own stored run
    assert "cat (class map)" in a.predict(0, 0, "fused", True, "mean", "mean", 10, 10, api_name="/cross")[1]
    assert "dog (class map)" in b.predict(0, 0, "fused", True, "mean", "mean", 10, 10, api_name="/cross")[1]


def test_a_session_keeps_only_its_last_run(server, image, monkeypatch):
    """A new run replaces the session's stored run: the earlier recordings are freed (what keeps memory
    from growing run after run; the slow test below measures it)."""
    import gc
    import weakref

    made, original = [], Exploration.run.__func__

    def tracked(cls, *a, **kw):
        ex = original(cls, *a, **kw)
        made.append(weakref.ref(ex))
        return ex

    monkeypatch.setattr(Exploration, "run", classmethod(tracked))
    client = connect(server)
    for i in range(3):
        run_page(client, image, "cat" if i % 2 else "cat, sofa", seed=i, mode="joint" if i else "batched")
        client.predict(0, 2, "fused", True, "mean", "mean", 20, 30, api_name="/cross")
    gc.collect()
    alive = [i for i, ref in enumerate(made) if ref() is not None]
    assert alive == [2], f"runs {alive} of {len(made)} are still in memory"


def rss_anon_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("RssAnon:")).split()[1]) / 1024


def start_command(weights, port: int, tmp_path: Path, *options: str, env=None) -> tuple[subprocess.Popen, str]:
    """`python -m minidiffseg explore ...` in a subprocess, returned once it says where it serves (that line)."""
    env = {**os.environ, "GRADIO_TEMP_DIR": str(tmp_path / "gradio"), **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "minidiffseg", "explore", "--weights", str(weights),
                             "--port", str(port), *options], stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("minidiffseg explore: "):
            return proc, line
    proc.wait()
    raise AssertionError("the command ended without serving:\n" + "".join(lines))


def stop(proc: subprocess.Popen) -> int:
    import signal

    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            return proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


@pytest.mark.slow
def test_memory_does_not_grow_over_20_runs(tiny_sd_dir, image, tmp_path):
    """The server's resident anonymous memory (the command in its own process) after 10 warm-up runs and
    after 20 more, alternating classes, modes and views."""
    require("gradio_client", EXPLORE_EXTRA)
    if not Path("/proc/self/status").is_file():
        pytest.skip("reads RssAnon from /proc (Linux)")
    port = free_port()
    proc, _ = start_command(tiny_sd_dir, port, tmp_path, "--resolution", str(RES))
    try:
        client = connect(f"http://127.0.0.1:{port}/")

        def one(i):
            run_page(client, image, "cat, sofa, dog" if i % 2 else "cat, sofa", seed=i,
                     mode="joint" if i % 3 else "batched")
            client.predict(0, 3, "fused", True, "mean", "mean", 20, 30, api_name="/cross")

        for i in range(10):
            one(i)
        before = rss_anon_mb(proc.pid)
        for i in range(20):
            one(i)
        after = rss_anon_mb(proc.pid)
    finally:
        stop(proc)
    print(f"server RssAnon after 10 warm-up runs {before:.1f} MB, after 20 more {after:.1f} MB "
          f"({after - before:+.1f} MB)")
    # measured +3.5 to +24 MB, flattening (+12 MB from run 10 to run 70): the C allocator's arenas of
    # Gradio's worker threads settling; Python objects grow by 1.4 MB (tracemalloc), and no earlier run's
    # recording stays alive (test_a_session_keeps_only_its_last_run)
    assert after - before < 64, f"RssAnon grew by {after - before:.1f} MB over 20 runs"


# ---- a real browser: headless Chromium drives the page -------------------------------------------


def rendered(page, element_id: str) -> Image.Image:
    """The picture the browser shows in the Gradio image `element_id`: loaded (naturalWidth > 0) and fetched."""
    img = page.locator(f"#{element_id} img").first
    img.wait_for(state="visible", timeout=30_000)
    page.wait_for_function("el => el.complete && el.naturalWidth > 0", arg=img.element_handle(), timeout=30_000)
    return Image.open(io.BytesIO(page.request.get(img.get_attribute("src")).body())).convert("RGB")


def not_blank(im: Image.Image) -> bool:
    from PIL import ImageStat

    return max(ImageStat.Stat(im).stddev) > 10  # a flat picture has 0; these maps span dark to bright


def test_in_a_real_browser(server, image, tmp_path):
    """Chromium loads the page, uploads an image, runs, picks a token, clicks a pixel; the pictures the page
    then shows are present and not blank; τ typed in redoes the overlay; a bad upload shows its message.
    Screenshots: tmp_path."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        missing("the browser test needs Chromium: apt-get install chromium (Debian's package)")
    sync_api = require("playwright.sync_api", "pip install playwright (it drives the system chromium; no "
                       "browser download needed)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=BROWSER_ARGS)  # a fresh profile each launch
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(server)
            page.locator("#image-file input[type=file]").set_input_files(str(image))
            page.locator("#classes textarea, #classes input").first.fill("cat, sofa")
            page.click("#run")
            overlay = rendered(page, "overlay")
            assert overlay.size == (150, 100) and not_blank(overlay)
            before = rendered(page, "cross")
            page.click("#token input")  # a token other than the class word (whose map is the class map)
            page.get_by_role("option", name="2: photograph", exact=True).click()
            page.get_by_text("2: photograph · fused A").wait_for(timeout=30_000)
            after = rendered(page, "cross")
            assert not_blank(after) and after.tobytes() != before.tobytes()
            target = page.locator("#click img")
            box = target.bounding_box()  # click the centre of latent cell (row 12, col 4) of the 16×16 grid
            target.click(position={"x": box["width"] * 4.5 / 16, "y": box["height"] * 12.5 / 16})
            page.get_by_text("→ latent cell (row 12, col 4)").wait_for(timeout=30_000)
            for name in ("click", "s-row", "a-map", "m-map"):
                assert not_blank(rendered(page, name)), f"{name} is blank"
            page.screenshot(path=str(tmp_path / "explore.png"), full_page=True)
            tau = page.locator("#tau input[type=number]")  # τ: the mask is decided again, no run
            tau.fill("0.9")
            tau.press("Enter")
            page.get_by_text("τ = 0.90").wait_for(timeout=30_000)
            assert rendered(page, "overlay").tobytes() != overlay.tobytes()
            bad = tmp_path / "notimage.png"
            bad.write_bytes(b"not an image at all")
            page.click("#image-file button[aria-label='Clear']")
            page.locator("#image-file input[type=file]").set_input_files(str(bad))
            message = page.locator("[data-testid=toast-text]", has_text="notimage.png: not a readable image")
            message.wait_for(timeout=30_000)
            page.wait_for_timeout(500)  # the message slides in
            page.screenshot(path=str(tmp_path / "explore-error.png"), full_page=False)
        finally:
            browser.close()
    print(f"screenshots: {tmp_path / 'explore.png'}, {tmp_path / 'explore-error.png'}")


# ---- the command's one-line errors and what it says ----------------------------------------------


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("minidiffseg: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_explore_without_the_extra_says_how_to_install_it(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` raises ImportError
    assert main(["explore", "--weights", str(tmp_path)]) == 2
    assert EXPLORE_EXTRA in one_error_line(capsys)


def test_explore_with_bad_weights_or_a_used_port_is_one_line(capsys, tmp_path, tiny_sd_dir):
    require("gradio", EXPLORE_EXTRA)
    assert main(["explore", "--weights", str(tmp_path / "absent")]) == 2
    assert "absent" in one_error_line(capsys)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["explore", "--weights", str(tiny_sd_dir), "--port", str(port)]) == 2
        assert f"--port {port} on 127.0.0.1 cannot be used" in one_error_line(capsys)
    assert main(["explore", "--weights", str(tiny_sd_dir), "--port", "70000"]) == 2
    assert "1..65535" in one_error_line(capsys)
    assert main(["explore", "--weights", str(tiny_sd_dir), "--host", "nowhere.invalid"]) == 2
    assert "--host nowhere.invalid is not an address of this machine" in one_error_line(capsys)


def test_explore_says_when_it_listens_beyond_this_machine(monkeypatch, capsys, tiny_sd_dir):
    require("gradio", EXPLORE_EXTRA)
    import minidiffseg.cli.explore as command

    served = []
    monkeypatch.setattr(command, "launch", lambda app, host, port: served.append(host) or f"http://{host}:{port}/")
    port = str(free_port())
    assert main(["explore", "--weights", str(tiny_sd_dir), "--resolution", "64", "--port", port]) == 0
    err = capsys.readouterr().err
    assert served == ["127.0.0.1"] and "warning" not in err and f"http://127.0.0.1:{port}/" in err
    assert main(["explore", "--weights", str(tiny_sd_dir), "--resolution", "64", "--host", "0.0.0.0"]) == 0
    err = capsys.readouterr().err
    assert served[-1] == "0.0.0.0" and "minidiffseg: warning: listening on 0.0.0.0, not only 127.0.0.1" in err


def outside_addresses() -> list[str]:
    """This machine's IPv4 address on its default route, if it has one (no packet is sent)."""
    found = set()
    for target in ("192.0.2.1", "10.255.255.255"):  # TEST-NET-1 (RFC 5737), a private address: never contacted
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.connect((target, 9))  # a UDP "connect" only picks the outgoing interface
            except OSError:
                continue
            found.add(s.getsockname()[0])
    return sorted(a for a in found if not a.startswith("127.") and a != "0.0.0.0")


def burners(n: int, seconds: float = 30) -> list[subprocess.Popen]:
    """`n` busy processes (each ends itself after `seconds`): the load under which the command once took
    over 30 s to exit after Ctrl-C (docs/explore.md §3)."""
    loop = f"import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end: pass"
    return [subprocess.Popen([sys.executable, "-c", loop]) for _ in range(n)]


def test_the_command_serves_the_page_on_127_0_0_1_only(tiny_sd_dir, tmp_path):
    """`python -m minidiffseg explore` for real: its URL, the page served there, not on another address of
    this machine, and Ctrl-C after the page was served ends it with exit code 0 within a few seconds with
    every core kept busy by other processes, its temporary folder removed."""
    require("gradio", EXPLORE_EXTRA)
    import signal
    import urllib.request

    port = free_port()
    tmp = tmp_path / "tmp"  # the command's TMPDIR: its per-session download folders
    tmp.mkdir()
    proc, said = start_command(tiny_sd_dir, port, tmp_path, "--resolution", "64", env={"TMPDIR": str(tmp)})
    busy = []
    try:
        assert said.startswith(f"minidiffseg explore: http://127.0.0.1:{port}/"), said
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as page:
            assert page.status == 200 and b"minidiffseg explore" in page.read()
        for address in outside_addresses():  # another address of this machine: nothing listens there
            with socket.socket() as s, pytest.raises(OSError):
                s.settimeout(5)
                s.connect((address, port))
        assert [f.name[:20] for f in tmp.iterdir()] == ["minidiffseg-explore-"]
        busy = burners(4 * (os.cpu_count() or 2))  # the load of the failure: the exit took 3-16 s here, once over 30
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)  # Ctrl-C, after the page was served
        start = time.monotonic()
        code = proc.wait(timeout=60)
        took = time.monotonic() - start
    finally:
        for b in busy:
            b.kill()
        stop(proc)
    print(f"Ctrl-C to exit: {took:.2f} s with {len(busy)} busy processes")
    assert code == 0, f"exit code {code} after Ctrl-C"
    assert took < 5, f"{took:.1f} s from Ctrl-C to the exit under load (0.3-1 s measured)"
    assert list(tmp.iterdir()) == [], "the temporary folder is left behind"
