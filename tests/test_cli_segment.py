"""`minidiffseg segment` and `minidiffseg maps` through the CLI on the tiny model."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from assets import sample_image_paths
from minidiffseg.cli import main
from minidiffseg.method.segmenter import Segmenter
from minidiffseg.viz import heatmap


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_segment_writes_everything_and_reports_a_bad_image(tiny_sd_dir, tmp_path, capsys):
    good = sample_image_paths()[1]  # chelsea.png, 451×300
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "out"
    code, stdout, stderr = run(capsys, "segment", good, bad, "--classes", "cat,dog", "--weights", tiny_sd_dir,
                               "--out", out, "--resolution", 128)
    assert code == 2 and "broken.png" in stderr and "Traceback" not in stderr
    assert stdout.startswith("chelsea.png: ") and "%" in stdout
    names = sorted(p.name for p in out.iterdir())
    assert names == ["chelsea_heat_1_cat.png", "chelsea_heat_2_dog.png", "chelsea_mask.png",
                     "chelsea_overlay.png", "chelsea_scores.safetensors"]
    with safe_open(str(out / "chelsea_scores.safetensors"), "pt") as f:
        scores, mask, meta = f.get_tensor("scores"), f.get_tensor("mask"), f.metadata()
    assert scores.shape == (2, 300, 451) and meta["classes"] == '["cat", "dog"]'
    png = Image.open(out / "chelsea_mask.png")
    assert png.mode == "P" and png.size == (451, 300)
    assert torch.equal(torch.frombuffer(bytearray(png.tobytes()), dtype=torch.uint8).reshape(300, 451), mask)
    # the same as the Python API with the same settings
    want = Segmenter.from_pretrained(tiny_sd_dir, resolution=128)(good, ["cat", "dog"], seed=0)
    assert torch.equal(want.mask.to(torch.uint8), mask)
    assert Image.open(out / "chelsea_overlay.png").size == (451, 300)

    # resume: the finished image is skipped, nothing is rewritten
    before = (out / "chelsea_mask.png").stat().st_mtime_ns
    code, _, stderr = run(capsys, "segment", good, "--classes", "cat,dog", "--weights", tiny_sd_dir,
                          "--out", out, "--resolution", 128, "--skip-existing")
    assert code == 0 and "already done" in stderr and (out / "chelsea_mask.png").stat().st_mtime_ns == before


def test_segment_options_change_the_result(tiny_sd_dir, tmp_path, capsys):
    img = sample_image_paths()[0]
    common = ["--classes", "cat,person", "--weights", tiny_sd_dir, "--resolution", 128]
    runs = {}
    for name, extra in {"default": [], "steps": ["--timesteps", "50,100"], "joint": ["--joint"],
                        "all": ["--tokens", "all", "--classes", "potted plant,person"]}.items():
        code, _, err = run(capsys, "segment", img, *common, *extra, "--out", tmp_path / name)
        assert code == 0, err
        with safe_open(str(tmp_path / name / "astronaut_scores.safetensors"), "pt") as f:
            runs[name] = f.get_tensor("refined")
    for name in ("steps", "joint", "all"):
        assert not torch.allclose(runs[name], runs["default"]), name


def test_maps_grid(tiny_sd_dir, tmp_path, capsys):
    out = tmp_path / "grid.png"
    code, stdout, _ = run(capsys, "maps", sample_image_paths()[0], "--classes", "cat,dog,person",
                          "--weights", tiny_sd_dir, "--out", out, "--resolution", 128)
    assert code == 0 and "16 cross-attention layers" in stdout
    im = Image.open(out)
    # 3 rows (classes) × (16 layers + 4 level means + fused + refined + scores) columns of 96+4 px
    assert im.size == (110 + 23 * 100, 30 + 3 * 100)
    # the content: column 20 ("fused A") of each class's row shows that class's fused map A, as the API computes
    # it with the same settings, min-max scaled, colour-mapped and enlarged ×6 (16² latent -> 96² cell)
    r = Segmenter.from_pretrained(tiny_sd_dir, resolution=128)(sample_image_paths()[0], ["cat", "dog", "person"],
                                                               seed=0)
    assert r.fused.shape == (3, 16, 16) and not torch.equal(r.fused[0], r.fused[1])
    pixels = np.asarray(im.convert("RGB"))
    for row, m in enumerate(r.fused):
        x, y = 110 + 20 * 100, 30 + row * 100
        cell = pixels[y:y + 96, x:x + 96]
        assert np.array_equal(cell, np.asarray(heatmap(m).resize((96, 96), Image.NEAREST))), f"row {row}"
        # independently of viz: latent pixel (i, j) fills the 6×6 block at (6i, 6j); the map's maximum has the
        # colour ramp's top colour, its minimum the bottom one
        for at, colour in ((m.argmax(), [252, 255, 164]), (m.argmin(), [0, 0, 4])):
            i, j = divmod(int(at), 16)
            assert cell[6 * i:6 * i + 6, 6 * j:6 * j + 6].reshape(-1, 3).tolist() == [colour] * 36, (row, i, j)


def test_bad_options_are_one_line(tiny_sd_dir, tmp_path, capsys):
    img = sample_image_paths()[0]
    for extra, message in ((["--classes", "cat,cat"], "twice"), (["--classes", ","], "empty"),
                           (["--classes", "cat", "--timesteps", "1000"], "--timesteps"),
                           (["--classes", "cat", "--tau", "2"], "--tau"),
                           (["--classes", "cat", "--resolution", "100"], "multiple of 64")):
        code, _, err = run(capsys, "segment", img, "--weights", tiny_sd_dir, "--out", tmp_path, *extra)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_segment_with_filter_and_blip_captions(tiny_sd_dir, tmp_path_factory, capsys):
    from test_filter_blip import save_tiny_blip
    from test_filter_clip import save_tiny_clip

    clip, blip, out = (tmp_path_factory.mktemp(n) for n in ("clip", "blip", "out"))
    save_tiny_clip(clip)
    save_tiny_blip(blip)
    code, stdout, err = run(capsys, "segment", sample_image_paths()[0], "--vocabulary", "voc", "--filter", "union",
                            "--caption", "blip", "--clip-weights", clip, "--blip-weights", blip,
                            "--weights", tiny_sd_dir, "--out", out, "--resolution", 128)
    assert code == 0, err
    with safe_open(str(out / "astronaut_scores.safetensors"), "pt") as f:
        meta = f.metadata()
    import json

    classes, prompts = json.loads(meta["classes"]), json.loads(meta["prompts"])
    from minidiffseg.vocabularies import get_vocabulary

    voc = get_vocabulary("voc")
    assert classes and all(c in voc.prompt_names for c in classes)  # prompt names ("monitor"), not "tvmonitor"
    for c, p in zip(classes, prompts):  # each prompt is BLIP's continuation of the template
        assert p.startswith(f"a photograph of {c}") and len(p) > len(f"a photograph of {c}"), p


@pytest.mark.parametrize("fast_bf16, computed", [(True, "in bfloat16"), (False, "in float32")])
def test_fp16_on_cpu_is_computed_as_the_cpu_can_and_says_so(tiny_sd_dir, tmp_path, capsys, monkeypatch,
                                                            fast_bf16, computed):
    """fp16 arithmetic is slow on CPUs without AMX-FP16: bf16 where that is fast, else fp32 (sd/precision.py)."""
    import minidiffseg.sd.precision as precision

    monkeypatch.setattr(precision, "fast_on_cpu", lambda dtype: fast_bf16 and dtype == torch.bfloat16)
    code, _, err = run(capsys, "segment", sample_image_paths()[0], "--classes", "cat", "--weights", tiny_sd_dir,
                       "--out", tmp_path, "--resolution", 128, "--dtype", "fp16", "--device", "cpu")
    warned = [line for line in err.splitlines() if line.startswith("minidiffseg: warning:")]
    assert code == 0 and len(warned) == 1 and computed in warned[0], err
