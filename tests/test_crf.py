"""The dense CRF (minidiffseg/crf/: dense.py, permutohedral.py; docs/crf.md).

- the lattice filter against the exact Gaussian filter (brute force) on real photos: error bounds
- parity with the reference C++ implementation (pydensecrf, the `crf-reference` extra) on real photos
  with synthetic unaries: the marginals Q after each preset's iterations and the labels
- a noisy unary on a two-colour image is cleaned to the colour boundary
- the unary: probabilities from scores and τ keep the mask's argmax; ignore regions
- bad settings are one-line UserErrors
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from assets import require
from minidiffseg.errors import UserError
from minidiffseg.crf.dense import IGNORE, MAX_ITERATIONS, PRESETS, CRFParams, DenseCRF, parse, probabilities, \
    pseudo_labels
from minidiffseg.crf.permutohedral import Exact, Lattice
from minidiffseg.method.decision import decide

PHOTOS = ["astronaut", "chelsea"]


def photo(name: str, size: tuple[int, int]) -> np.ndarray:
    """A scikit-image sample photo resized to (W, H): (H, W, 3) uint8, writable and contiguous."""
    data = require("skimage.data")
    return np.array(Image.fromarray(getattr(data, name)()).resize(size, Image.BILINEAR))


def synthetic_probs(k: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """(K, H, W) label probabilities: smooth random logits (a 10×-coarser grid, bilinear) -> softmax."""
    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(1, k, max(h // 10, 2), max(w // 10, 2), generator=g)
    return torch.softmax(torch.nn.functional.interpolate(logits, size=(h, w), mode="bilinear")[0], 0)


def grid_features(h: int, w: int, img: np.ndarray | None, xy: float, rgb: float | None = None) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    f = torch.stack([xs.flatten(), ys.flatten()], 1) / xy
    if rgb is not None:
        f = torch.cat([f, torch.from_numpy(img).reshape(-1, 3).float() / rgb], 1)
    return f


# ------------------------------------------------------------------------- lattice vs exact filtering

@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("kind, xy, rgb, max_bound, mean_bound", [
    # measured at 64×48: position θ=3: max 0.019, mean 0.0025; bilateral: mean 0.008-0.014 (max up to 0.75
    # at isolated pixels, docs/crf.md §4)
    ("position", 3.0, None, 0.04, 0.005),
    ("bilateral", 10.0, 13.0, None, 0.03),
    ("bilateral", 5.0, 20.0, None, 0.03),
])
def test_lattice_vs_exact_filter(name, kind, xy, rgb, max_bound, mean_bound):
    """The normalised message D^-1/2 K D^-1/2 Q (what mean field uses) from the lattice vs by brute force."""
    img = photo(name, (64, 48))
    f = grid_features(48, 64, img, xy, rgb)
    q = torch.softmax(3 * torch.randn(len(f), 4, generator=torch.Generator().manual_seed(0)), 1)
    out = {}
    for filt in (Lattice, Exact):
        k = filt(f)
        norm = 1 / k.filter(torch.ones(len(f), 1)).double().sqrt()
        out[filt] = norm * k.filter((norm * q.double()).float()).double()
    err = (out[Lattice] - out[Exact]).abs()
    print(f"{name} {kind} θ={xy}/{rgb}: max {err.max():.4f} mean {err.mean():.5f}")
    assert err.mean() < mean_bound, f"mean error {err.mean():.5f}"
    if max_bound is not None:
        assert err.max() < max_bound, f"max error {err.max():.4f}"


def test_lattice_keys_overflow_is_a_user_error():
    img = photo("chelsea", (500, 375))
    with pytest.raises(UserError, match="wider kernels"):
        DenseCRF(img, CRFParams(iterations=1, smooth_xy=3, smooth_w=3, appear_xy=0.01, appear_rgb=0.01, appear_w=1))


# ---------------------------------------------------------------------- parity with the C++ reference

def reference_q(img: np.ndarray, probs: torch.Tensor, p: CRFParams) -> np.ndarray:
    dcrf = require("pydensecrf.densecrf")  # pydensecrf2, the test extra
    from pydensecrf.utils import unary_from_labels

    k, h, w = probs.shape
    if p.unary == "labels":
        u = unary_from_labels(probs.argmax(0).numpy(), k, gt_prob=p.label_prob, zero_unsure=False)
    else:
        u = -np.log(np.clip(probs.numpy(), 1e-5, 1.0)).reshape(k, -1).astype(np.float32)
    d = dcrf.DenseCRF2D(w, h, k)
    d.setUnaryEnergy(np.ascontiguousarray(u))
    d.addPairwiseGaussian(sxy=p.smooth_xy, compat=p.smooth_w)
    d.addPairwiseBilateral(sxy=p.appear_xy, srgb=p.appear_rgb, rgbim=np.ascontiguousarray(img), compat=p.appear_w)
    return np.array(d.inference(p.iterations)).reshape(k, h, w)


@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("preset", list(PRESETS))
def test_parity_with_pydensecrf(name, preset):
    """Same lattice, same mean field: Q equal up to float rounding, same labels. Measured max |ΔQ|: ~1e-6,
    5e-5 for clip-es, at one pixel where 10 iterations amplify rounding differences (1e-6 after 5)."""
    img = photo(name, (160, 120))
    probs = synthetic_probs(5, 120, 160, seed=1)
    p = PRESETS[preset]
    ref = reference_q(img, probs, p)
    ours = DenseCRF(img, p)(probs).numpy()
    err = np.abs(ours - ref).max()
    agree = (ours.argmax(0) == ref.argmax(0)).mean()
    changed = (ref.argmax(0) != probs.argmax(0).numpy()).mean()
    print(f"{name} {preset}: max |ΔQ| {err:.2e}, labels agree {100 * agree:.3f}% "
          f"(the CRF changed {100 * changed:.1f}%)")
    assert err < 2.5e-4, f"max |ΔQ| {err:.2e}"
    assert agree >= 0.9999, f"labels agree on {100 * agree:.3f}%"


# ------------------------------------------------------------------------- known answers

def two_colour(h: int = 40, w: int = 60, edge: int = 23) -> tuple[np.ndarray, torch.Tensor]:
    """Red left of column `edge`, blue from it; the truth: label 0 left, 1 right."""
    img = np.zeros((h, w, 3), np.uint8)
    img[:, :edge] = (200, 40, 30)
    img[:, edge:] = (30, 60, 190)
    truth = torch.zeros(h, w, dtype=torch.long)
    truth[:, edge:] = 1
    return img, truth


@pytest.mark.parametrize("preset", list(PRESETS))
def test_noisy_unary_cleaned_to_the_colour_boundary(preset):
    img, truth = two_colour()
    g = torch.Generator().manual_seed(0)
    wrong = torch.rand(truth.shape, generator=g) < 0.3  # 30% of the pixels prefer the wrong label
    p_true = torch.where(wrong, 0.35, 0.65) + 0.05 * torch.rand(truth.shape, generator=g)
    probs = torch.stack([torch.where(truth == 0, p_true, 1 - p_true), torch.where(truth == 1, p_true, 1 - p_true)])
    assert (probs.argmax(0) != truth).float().mean() > 0.25
    q = DenseCRF(img, PRESETS[preset])(probs)
    assert torch.equal(q.argmax(0), truth), f"{int((q.argmax(0) != truth).sum())} pixels off the colour boundary"


def test_exact_filter_crf_gives_the_same_labels_on_the_two_colour_image():
    img, truth = two_colour(24, 32, 13)
    probs = torch.stack([torch.where(truth == 0, 0.6, 0.4), torch.where(truth == 1, 0.6, 0.4)]).float()
    probs[:, 5:9, 5:9] = probs[:, 5:9, 5:9].flip(0)  # a wrong patch inside the red half
    for gaussian in (Lattice, Exact):
        assert torch.equal(DenseCRF(img, PRESETS["densecrf"], gaussian=gaussian)(probs).argmax(0), truth)


def test_uniform_image_and_flat_unary_stay_flat():
    """No evidence anywhere: Q stays uniform (mean field's fixed point), whatever the weights."""
    img = np.full((20, 30, 3), 128, np.uint8)
    q = DenseCRF(img, PRESETS["clip-es"])(torch.full((3, 20, 30), 1 / 3))
    assert torch.allclose(q, torch.full_like(q, 1 / 3), atol=1e-6)


# ------------------------------------------------------------------------------ the unary

def test_probabilities_keep_the_decision():
    scores = torch.rand(4, 30, 40, generator=torch.Generator().manual_seed(0))
    scores[1, :5] = 0  # exact zeros are clipped, not log(0)
    for tau in (0.0, 0.3, 0.8):
        p = probabilities(scores, tau)
        assert p.shape == (5, 30, 40)
        assert torch.allclose(p.sum(0), torch.ones(30, 40))
        assert torch.equal(p.argmax(0), decide(scores, tau))
    p = probabilities(scores, None)  # no background class
    assert p.shape == (4, 30, 40) and torch.equal(p.argmax(0), scores.argmax(0))
    # p_k = x_k / Σ x: [τ=0.5, 1.0, 0.5] -> [0.25, 0.5, 0.25]
    p = probabilities(torch.tensor([1.0, 0.5]).reshape(2, 1, 1), 0.5)
    assert torch.allclose(p.flatten(), torch.tensor([0.25, 0.5, 0.25]))


def test_pseudo_labels_ignore_below():
    img, truth = two_colour(20, 30, 10)
    scores = torch.zeros(1, 20, 30)
    scores[0, :, 10:] = 1.0
    scores[0, :, 8:12] = 0.42  # near τ: unsure
    labels, mask = pseudo_labels(img, scores, 0.4, ignore_below=0.6)
    assert torch.equal(labels, decide(scores, 0.4))
    assert (mask[:, 8:12] == IGNORE).all() and torch.equal(mask[:, :8], labels[:, :8])
    assert torch.equal(mask[:, 12:], labels[:, 12:])
    labels, mask = pseudo_labels(img, scores, 0.4, crf=PRESETS["densecrf"], ignore_below=0.6)
    assert torch.equal(labels, truth)  # the CRF moves the unsure band to the colour edge
    assert (mask != IGNORE).float().mean() > 0.9


# ------------------------------------------------------------------------------ bad settings

@pytest.mark.parametrize("spec, match", [
    ("nonsense", "preset 'nonsense' is unknown"),
    ("clip-es,appear_xy=0", "kernel width appear_xy"),
    ("clip-es,smooth_xy=-3", "kernel width smooth_xy"),
    ("clip-es,appear_rgb=nan", "kernel width appear_rgb"),
    ("clip-es,iterations=0", "iterations 0"),
    (f"clip-es,iterations={MAX_ITERATIONS + 1}", f"iterations {MAX_ITERATIONS + 1}"),
    ("clip-es,iterations=2.5", "not a number"),
    ("clip-es,appear_w=-1", "weight appear_w"),
    ("clip-es,colour=3", "key=value"),
    ("clip-es,unary=soft", "unary 'soft'"),
    ("clims,label_prob=1", "label_prob"),
])
def test_bad_settings_are_one_line_user_errors(spec, match):
    with pytest.raises(UserError, match=match) as e:
        parse(spec)
    assert "\n" not in str(e.value)


def test_parse_presets_and_overrides():
    assert parse("clip-es") == PRESETS["clip-es"]
    p = parse("densecrf, iterations=3, appear_rgb=20")
    assert (p.iterations, p.appear_rgb, p.appear_xy) == (3, 20.0, 80)


# ------------------------------------------------------------------------ the commands (tiny model)

def test_segment_crf_writes_the_pseudo_label(tiny_sd_dir, tmp_path, capsys):
    from assets import sample_image_paths
    from safetensors import safe_open

    from minidiffseg.cli import main
    from minidiffseg.image import load_image
    from minidiffseg.method.segmenter import Segmenter

    img = sample_image_paths()[1]  # chelsea.png, 451×300
    out = tmp_path / "out"
    code = main(["segment", str(img), "--classes", "cat,dog", "--weights", str(tiny_sd_dir), "--out", str(out),
                 "--resolution", "128", "--crf", "densecrf", "--ignore-below", "0.9"])
    _, err = capsys.readouterr()
    assert code == 0, err
    png = Image.open(out / "chelsea_mask.png")
    assert png.mode == "P" and png.size == (451, 300)
    with safe_open(str(out / "chelsea_scores.safetensors"), "pt") as f:
        mask, meta = f.get_tensor("mask"), f.metadata()
    assert meta["crf"].startswith("densecrf (iterations=5") and "< 0.9 are 255" in meta["crf"]
    assert torch.equal(torch.from_numpy(np.array(png)), mask)
    # the same as the library path: the segmenter's scores and τ through pseudo_labels
    r = Segmenter.from_pretrained(tiny_sd_dir, resolution=128)(img, ["cat", "dog"], seed=0)
    _, want = pseudo_labels(load_image(img), r.scores, r.tau, PRESETS["densecrf"], 0.9)
    assert torch.equal(want.to(torch.uint8), mask)
    assert not torch.equal(mask, r.mask.to(torch.uint8))  # the CRF (or the ignore label) changed something


def test_eval_save_masks_with_crf_and_ignore(tiny_sd_dir, tmp_path, capsys):
    import json

    from test_eval_cli import cli
    from test_eval_datasets import write_dataset

    from minidiffseg.evaluation.datasets import open_dataset
    from minidiffseg.evaluation.runner import result_path
    from minidiffseg.method.decision import upsample_scores

    names = write_dataset(tmp_path / "data", "voc", [(15, 7), (12, 15)])
    common = ("eval", "--dataset", "voc", "--root", tmp_path / "data", "--weights", tiny_sd_dir, "--device", "cpu",
              "--resolution", "128", "--out", tmp_path / "ev", "--tau", "0.4", "--save-masks")
    rc, err = cli(capsys, *common, "--crf", "--ignore-below", "0.95")
    assert rc == 0, err
    s = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert s["crf"].startswith("clip-es (iterations=10") and "255 where the top probability < 0.95" in s["crf"]
    assert "- dense CRF: clip-es" in (tmp_path / "ev" / "report.md").read_text()
    ds = open_dataset("voc", tmp_path / "data")
    for sample, name in zip(ds.samples, names):
        png = Image.open(tmp_path / "ev" / "masks" / f"{name}.png")  # the image's name, .png
        assert png.mode == "P" and png.getpalette()[3:6] == [128, 0, 0]  # VOC colours
        with np.load(result_path(tmp_path / "ev", sample)) as r:
            classes, refined = r["classes"], r["refined"]
        gt = ds.label(sample)
        labels, mask = pseudo_labels(ds.image(sample), upsample_scores(torch.from_numpy(refined), gt.shape), 0.4,
                                     PRESETS["clip-es"], 0.95)
        want = np.where(mask.numpy() == IGNORE, IGNORE, np.concatenate([[0], classes])[labels.numpy()])
        assert (np.array(png) == want).all()
    # again without the CRF, same --out: nothing is segmented again, the report says the CRF was off
    rc, err = cli(capsys, *common)
    assert rc == 0, err
    s2 = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert s2["crf"] == "off" and s2["run"]["segmented_now"] == 0
    assert "- dense CRF: off" in (tmp_path / "ev" / "report.md").read_text()


@pytest.mark.parametrize("extra, message", [
    (["--crf", "nonsense"], "preset 'nonsense' is unknown"),
    (["--crf", "clip-es,appear_xy=0"], "kernel width appear_xy"),
    (["--crf", "clip-es,smooth_xy=-1"], "kernel width smooth_xy"),
    (["--crf", "clip-es,iterations=0"], "iterations 0"),
    (["--crf", "clip-es,iterations=1000"], "iterations 1000"),
    (["--ignore-below", "0"], "--ignore-below 0"),
    (["--ignore-below", "1.5"], "--ignore-below 1.5"),
])
def test_bad_crf_options_are_one_line(tiny_sd_dir, tmp_path, capsys, extra, message):
    from assets import sample_image_paths
    from test_eval_cli import cli, eval_args
    from test_eval_datasets import write_dataset

    from minidiffseg.cli import main

    code = main(["segment", str(sample_image_paths()[0]), "--classes", "cat", "--weights", str(tiny_sd_dir),
                 "--out", str(tmp_path / "seg"), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    write_dataset(tmp_path / "data", "voc")
    code, err = cli(capsys, *eval_args(tmp_path, "--save-masks", *extra))
    assert code == 2 and message in err and len(err.splitlines()) == 1, err


def test_eval_ignore_below_needs_save_masks(tmp_path, capsys):
    from test_eval_cli import cli, eval_args
    from test_eval_datasets import write_dataset

    write_dataset(tmp_path / "data", "voc")
    code, err = cli(capsys, *eval_args(tmp_path, "--ignore-below", "0.9"))
    assert code == 2 and "add --save-masks" in err and len(err.splitlines()) == 1, err
