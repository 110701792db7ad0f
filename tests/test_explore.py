"""`minidiffseg explore` on the tiny random SD1.5 (docs/explore.md §3): the library's `Exploration`
(values against the Segmenter and the naive S, without gradio), then the page through gradio_client
against a server on 127.0.0.1 (run, views, bad inputs, two sessions, memory), a real headless
Chromium driving the page, and the command's one-line errors."""

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
from minidiffseg.method.explore import MAX_CLASSES, Exploration
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


@pytest.fixture(scope="module")
def seg64(tiny_sd_dir):
    return Segmenter.from_pretrained(tiny_sd_dir, dtype=torch.float64, resolution=RES)


@pytest.fixture(scope="module")
def seg32(tiny_sd_dir):
    return Segmenter.from_pretrained(tiny_sd_dir, resolution=RES)


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
        assert (total - 1).abs().max() < 1e-9, f"{name}: Σ_t token maps deviates from 1 by {(total - 1).abs().max():.2e}"
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
