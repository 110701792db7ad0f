"""The bad-input suite (issue 7): every kind of input a user can get wrong, through the command line
(`minidiffseg.cli.main`), one table per kind — checkpoints, images, class lists, output folders.

A bad input must give exit code 2 and exactly one stderr line `minidiffseg: error: ...` that names
the input and says what to do — no traceback — and leave no half-written file behind. Inputs that
are unusual but valid (CMYK, 16-bit, palette with transparency, 1×1, animated GIF, EXIF-rotated,
non-ASCII or very long class names) must segment normally, without a warning.

The model is tiny (tests/tiny_sd.py) and runs at --resolution 64, so the suite takes seconds.
"""

import json
import os
import pickle
import re
import shutil
import struct
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from minidiffseg.sd import ldm
from minidiffseg.cli import main
from minidiffseg.image import load_image, pixels
from minidiffseg.sd import load_sd
from reference_decode import reference_rgb

import tiny_sd  # noqa: E402  (needs diffusers and transformers: assets.require)

FAST = ["--resolution", "64"]  # the tiny U-Net at an 8×8 latent


# ---- helpers -------------------------------------------------------------------------------------

def run(capsys, *argv) -> tuple[int, str, str]:
    """`minidiffseg ARGV...` in this process: (exit code, stdout, stderr); warnings are errors."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert not caught, f"warnings would be printed to the user: {[str(w.message) for w in caught]}"
    return rc, out, err


def assert_one_line_error(rc: int, err: str, pattern: str) -> str:
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err
    assert rc == 2, f"exit code {rc}, stderr:\n{err}"
    assert len(lines) == 1 and lines[0].startswith("minidiffseg: error: "), f"not one error line:\n{err}"
    assert re.search(pattern, lines[0]), f"{pattern!r} not in: {lines[0]}"
    return lines[0]


def assert_complete(folder: Path) -> list[str]:
    """Every file in `folder` is a complete output (no temporary names); returns the names."""
    names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    for name in names:
        assert not name.startswith(".") and not name.endswith(".tmp"), f"leftover temporary file {name}"
        path = folder / name
        if name.endswith(".png"):
            with Image.open(path) as im:
                im.load()  # raises on a truncated PNG
        else:
            assert name.endswith(".safetensors"), name
            load_file(path)
    return names


def copy_folder(src: Path, dst: Path) -> Path:
    """The tiny diffusers folder without its .fp16 files (so the fp32 ones are the ones loaded)."""
    return Path(shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.fp16.safetensors")))


def edit_tensors(path: Path, edit) -> Path:
    with safe_open(str(path), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    save_file(edit(tensors), path, metadata=metadata)
    return path


def edit_header(path: Path, edit) -> Path:
    """Rewrite the JSON header of a safetensors file (the data is kept byte for byte)."""
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.dumps(edit(json.loads(data[8:8 + n]))).encode()
    header += b" " * (-len(header) % 8)  # safetensors pads the header to 8 bytes
    path.write_bytes(struct.pack("<Q", len(header)) + header + data[8 + n:])
    return path


class Boom:
    """A pickle that creates a file when unpickled: loading it would run code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.fixture(scope="module")
def single_file(tmp_path_factory) -> Path:
    return tiny_sd.write_tiny_single_file(tmp_path_factory.mktemp("single") / "sd15.safetensors")


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "photo.png"
    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(48, 64, 3, generator=g) * 255).to(torch.uint8)
    Image.frombytes("RGB", (64, 48), bytes(pixels.flatten().tolist())).save(path)
    return path


# ---- checkpoints ---------------------------------------------------------------------------------

def _unet(folder: Path) -> Path:
    return folder / "unet" / "diffusion_pytorch_model.safetensors"


def _pickle(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(Boom(path.parent / "PWNED")))
    return path


def _lie(header: dict) -> dict:
    header["conv_in.bias"]["shape"] = [2 * header["conv_in.bias"]["shape"][0]]  # the data is half that
    return header


def _pickle_folder(t: Path, d: Path, s: Path) -> Path:
    folder = copy_folder(d, t / "bins")
    _unet(folder).unlink()
    _pickle(folder / "unet" / "diffusion_pytorch_model.bin")
    return folder


def _without_text_encoder(t: Path, d: Path, s: Path) -> Path:
    path = shutil.copy(s, t / "no-text.safetensors")
    return edit_tensors(Path(path), lambda sd: {k: v for k, v in sd.items() if not k.startswith(ldm.TEXT)})


# case: (make(tmp, tiny folder, single file) -> --weights, what the error line must say); `tmp` holds a
# tokenizer/ folder, which a single file needs beside it
CHECKPOINTS = {
    "missing file": (lambda t, d, s: t / "nowhere", r"nowhere: not found; fetch .* with `minidiffseg download"),
    "0 bytes": (lambda t, d, s: (t / "empty.safetensors", (t / "empty.safetensors").write_bytes(b""))[0],
                r"empty\.safetensors: not a safetensors file \(0 bytes.*download the file again"),
    "truncated": (lambda t, d, s: (t / "cut.safetensors", (t / "cut.safetensors").write_bytes(
                  s.read_bytes()[:s.stat().st_size // 2]))[0], r"cut\.safetensors: truncated: .*download it again"),
    "not safetensors": (lambda t, d, s: (t / "text.safetensors", (t / "text.safetensors").write_text("hello"))[0],
                        r"text\.safetensors: not a safetensors file .*download the file again"),
    "header lies about sizes": (lambda t, d, s: edit_header(_unet(copy_folder(d, t / "f")), _lie) and t / "f",
                                r"diffusion_pytorch_model\.safetensors: corrupt header: tensor conv_in\.bias .*again"),
    "wrong dtype": (lambda t, d, s: edit_tensors(_unet(copy_folder(d, t / "f")), lambda sd: {
                    **sd, "conv_in.weight": sd["conv_in.weight"].to(torch.int32)}) and t / "f",
                    r"tensor conv_in\.weight is stored as torch\.int32 .*download it again"),
    "wrong shape": (lambda t, d, s: edit_tensors(_unet(copy_folder(d, t / "f")), lambda sd: {
                    **sd, "conv_in.bias": torch.zeros(7)}) and t / "f",
                    r"tensor conv_in\.bias has shape \[7\] but the U-Net expects"),
    "missing key": (lambda t, d, s: edit_tensors(_unet(copy_folder(d, t / "f")), lambda sd: {
                    k: v for k, v in sd.items() if k != "conv_out.weight"}) and t / "f",
                    r"1 U-Net tensor\(s\) missing: conv_out\.weight; .*download it again"),
    "extra key": (lambda t, d, s: edit_tensors(_unet(copy_folder(d, t / "f")), lambda sd: {
                  **sd, "conv_in.extra": torch.zeros(3)}) and t / "f",
                  r"1 unexpected U-Net tensor\(s\): conv_in\.extra"),
    "LDM file missing the text encoder": (_without_text_encoder,  # inspect-weights names the first missing tensor
                                          r"no-text\.safetensors: .*(no text encoder|cond_stage_model\.transformer)"),
    "pickle .ckpt": (lambda t, d, s: _pickle(t / "v1-5-pruned-emaonly.ckpt"),
                     r"\.ckpt files are pickles, which minidiffseg never loads.*\.safetensors"),
    "pickle .bin in a diffusers folder": (_pickle_folder,
                                          r"diffusion_pytorch_model\.bin: \.bin files are pickles.*\.safetensors"),
    "pickle renamed .safetensors": (lambda t, d, s: _pickle(t / "model.safetensors"),
                                    r"model\.safetensors: not a safetensors file but a PyTorch pickle.*safetensors"),
}

KEY_LEVEL = {"wrong dtype": "conv_in.weight", "wrong shape": "conv_in.bias", "missing key": "conv_out.weight",
             "extra key": "conv_in.extra"}  # the key inspect-weights lists


@pytest.mark.parametrize("case", CHECKPOINTS)
def test_bad_checkpoint_segment(case, tiny_sd_dir, single_file, image, tmp_path, capsys):
    make, pattern = CHECKPOINTS[case]
    shutil.copytree(tiny_sd_dir / "tokenizer", tmp_path / "tokenizer")
    weights = make(tmp_path, tiny_sd_dir, single_file)
    out = tmp_path / "out"
    rc, _, err = run(capsys, "segment", image, "--classes", "cat,dog", "--weights", weights, "--out", out, *FAST)
    assert_one_line_error(rc, err, pattern)
    assert assert_complete(out) == [], "nothing may be written when the weights are bad"
    assert not list(tmp_path.rglob("PWNED")), "a pickle was unpickled"


@pytest.mark.parametrize("case", CHECKPOINTS)
def test_bad_checkpoint_inspect(case, tiny_sd_dir, single_file, tmp_path, capsys):
    """inspect-weights reports the same problems: all key-level ones listed on stdout, one error line."""
    make, pattern = CHECKPOINTS[case]
    shutil.copytree(tiny_sd_dir / "tokenizer", tmp_path / "tokenizer")
    weights = make(tmp_path, tiny_sd_dir, single_file)
    rc, out, err = run(capsys, "inspect-weights", weights)
    line = assert_one_line_error(rc, err, r".")
    if case in KEY_LEVEL:  # all such problems are listed on stdout, the error line points there
        assert re.search(r"would not load \(listed above\).*download it again", line), line
        assert KEY_LEVEL[case] in out, out
    else:
        assert re.search(pattern, line), f"{pattern!r} not in: {line}"
    assert not list(tmp_path.rglob("PWNED")), "a pickle was unpickled"


def test_inspect_good_copies(tiny_sd_dir, single_file, capsys):
    """Both layouts of the same weights: exit code 0, the layout named, per network the parameter count of
    the model load_sd builds from it, no problem; the single file's ignored keys (decoder, EMA, ...) listed."""
    sd = load_sd(tiny_sd_dir)
    want = {what: sum(t.numel() for t in m.state_dict().values())
            for what, m in (("text encoder", sd.text_encoder), ("VAE", sd.vae), ("U-Net", sd.unet))}
    for path, layout in ((tiny_sd_dir, "diffusers SD1.5 folder"), (single_file, "LDM single file")):
        rc, out, err = run(capsys, "inspect-weights", path)
        assert rc == 0 and not err, err
        assert out.startswith(f"{path}: {layout}"), out
        rows = re.findall(r"^  (text encoder|VAE|U-Net) +\S+ +[\d.]+ [kMG]B +F32 +([\d,]+) +none$", out, re.M)
        assert {what: int(n.replace(",", "")) for what, n in rows} == want, out
        assert f"OK: {sum(want.values()):,} parameters would load" in out
    assert re.search(r"VAE: \d+ tensor\(s\) ignored by name .*first_stage_model\.decoder\.", out), out
    assert re.search(r"U-Net: \d+ tensor\(s\) ignored by name .*alphas_cumprod", out), out


# ---- images --------------------------------------------------------------------------------------

def _photo(size=(64, 48)) -> Image.Image:
    w, h = size
    x = torch.arange(w * h * 3, dtype=torch.int64).reshape(h, w, 3) * 37 % 251
    return Image.frombytes("RGB", size, bytes(x.to(torch.uint8).flatten().tolist()))


def _save(im: Image.Image, path: Path, **kw) -> Path:
    im.save(path, **kw)
    return path


def _palette(path: Path) -> Path:
    im = _photo().convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return _save(im, path, transparency=0)


def _exif_rotated(path: Path) -> Path:
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF Orientation "rotate 90° clockwise to display"
    return _save(_photo(), path, exif=exif)


def _animated(path: Path) -> Path:
    frames = [Image.new("RGB", (64, 48), c) for c in ("red", "green", "blue")]
    return _save(frames[0], path, save_all=True, append_images=frames[1:], duration=100, loop=0)


def _truncated_jpeg(path: Path) -> Path:
    _photo((640, 480)).save(path, format="JPEG")
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path


def _sixteen_bit(path: Path) -> Path:
    # 1000..30999: neither clipping at 255, nor dropping the low byte, nor forgetting the offset passes the check
    x = (1000 + torch.arange(48 * 64, dtype=torch.int32) * 13 % 30000).reshape(48, 64)
    return _save(Image.frombytes("I;16", (64, 48), x.to(torch.int16).numpy().tobytes()), path)


IMAGES = {  # case: (make(path) -> image path, expected (W, H) of the mask, or the error line's pattern)
    "0 bytes": (lambda p: (p.with_suffix(".png").write_bytes(b""), p.with_suffix(".png"))[1],
                r"image .*x\.png: the file is empty \(0 bytes\)"),
    "not an image": (lambda p: (p.with_suffix(".jpg").write_text("hello"), p.with_suffix(".jpg"))[1],
                     r"image .*x\.jpg: not a readable image .*give a PNG, JPEG"),
    "missing": (lambda p: p.with_suffix(".png"), r"image .*x\.png: no such file"),
    "truncated JPEG": (lambda p: _truncated_jpeg(p.with_suffix(".jpg")), r"image .*x\.jpg: cannot be decoded .*truncated"),
    "20000x20000": (lambda p: _save(Image.new("1", (20000, 20000)), p.with_suffix(".png")),
                    r"image .*x\.png: too large to decode safely .*downscale it first"),
    "CMYK": (lambda p: _save(_photo().convert("CMYK"), p.with_suffix(".jpg")), (64, 48)),
    "16-bit PNG": (lambda p: _sixteen_bit(p.with_suffix(".png")), (64, 48)),
    "palette with transparency": (lambda p: _palette(p.with_suffix(".png")), (64, 48)),
    "1x1": (lambda p: _save(Image.new("RGB", (1, 1), (200, 30, 30)), p.with_suffix(".png")), (1, 1)),
    "animated GIF": (lambda p: _animated(p.with_suffix(".gif")), (64, 48)),
    "EXIF-rotated": (lambda p: _exif_rotated(p.with_suffix(".jpg")), (48, 64)),  # shown upright: portrait
    "greyscale with alpha": (lambda p: _save(_photo().convert("LA"), p.with_suffix(".png")), (64, 48)),
}


@pytest.mark.parametrize("case", IMAGES)
def test_images(case, tiny_sd_dir, tmp_path, capsys):
    make, expected = IMAGES[case]
    path = make(tmp_path / "x")
    out = tmp_path / "out"
    rc, stdout, err = run(capsys, "segment", path, "--classes", "cat,dog", "--weights", tiny_sd_dir, "--out", out,
                          *FAST)
    if isinstance(expected, str):
        assert_one_line_error(rc, err, expected)
        assert assert_complete(out) == []
        return
    assert rc == 0 and not err, f"exit code {rc}: {err}"
    names = assert_complete(out)
    assert names == ["x_heat_1_cat.png", "x_heat_2_dog.png", "x_mask.png", "x_overlay.png", "x_scores.safetensors"]
    with Image.open(out / "x_mask.png") as mask:
        assert mask.size == expected, f"mask {mask.size}, image shown as {expected}"
    assert load_file(out / "x_scores.safetensors")["scores"].shape == (2, expected[1], expected[0])


DECODED = ["CMYK", "16-bit PNG", "palette with transparency", "1x1", "animated GIF", "EXIF-rotated",
           "greyscale with alpha"]


@pytest.mark.parametrize("case", DECODED)
def test_decoded_pixels(case, tmp_path):
    """The pixels the segmenter sees (load_image) equal a conversion of the file's stored values worked out
    independently (tests/reference_decode.py)."""
    path = IMAGES[case][0](tmp_path / "x")
    want, tolerance = reference_rgb(path)
    got = pixels(load_image(path)).numpy()
    assert got.shape == want.shape, f"decoded {got.shape}, expected {want.shape}"
    err = np.abs(got.astype(int) - want.astype(int)).max()
    assert err <= tolerance, f"{case}: max difference {err} levels (allowed {tolerance})"
    assert want.std() > 10, "the test image must not be flat"


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_turns_the_right_way(orientation, tmp_path):
    """Every EXIF orientation tag on an image whose corners differ: the image shown is the stored one
    turned/mirrored as the tag says (a turn the wrong way round gives other pixels)."""
    x = torch.zeros(48, 64, 3, dtype=torch.uint8)
    x[:8, :16] = torch.tensor([255, 0, 0], dtype=torch.uint8)  # stored top-left: red
    x[:8, -16:] = torch.tensor([0, 255, 0], dtype=torch.uint8)  # top-right: green
    x[-8:, :16] = torch.tensor([0, 0, 255], dtype=torch.uint8)  # bottom-left: blue
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _save(Image.fromarray(x.numpy()), tmp_path / "o.png", exif=exif)
    want, _ = reference_rgb(path)
    got = pixels(load_image(path)).numpy()
    assert np.array_equal(got, want), f"orientation {orientation}: shown {got.shape}, corners " \
        f"{[got[i, j].tolist() for i, j in ((0, 0), (0, -1), (-1, 0), (-1, -1))]}"
    # 6 = "turn 90° clockwise to show": the stored top-left (red) is shown top-right, bottom-left (blue) top-left
    if orientation == 6:
        assert got.shape == (64, 48, 3) and got[0, -1].tolist() == [255, 0, 0] and got[0, 0].tolist() == [0, 0, 255]


# ---- class lists ---------------------------------------------------------------------------------

CLASSES = {  # case: (--classes, the heat map names written, or the error line's pattern)
    "empty": ("", r"class name '' is empty or whitespace: give each class a name"),
    "trailing comma": ("cat,", r"class name '' is empty"),
    "whitespace only": (" , ", r"class name ' ' is empty or whitespace"),
    "duplicates": ("cat,dog,cat", r"class 'cat' is listed twice: give each class once"),
    "duplicates by case": ("cat,Cat", r"class 'Cat' is listed twice"),
    "no letters": ("cat,!!", r"class name '!!' has no letters or digits"),
    "200 characters, many words": (" ".join("abcdefghij" * 10), r"is \d+ CLIP tokens long.*shorten it"),
    "200 characters, one word": ("a" * 200, ["x_heat_1_" + "a" * 64 + ".png"]),
    "non-ASCII": ("café,猫,Straße", ["x_heat_1_caf.png", "x_heat_2_class.png", "x_heat_3_Stra-e.png"]),
}


@pytest.mark.parametrize("case", CLASSES)
def test_class_lists(case, tiny_sd_dir, image, tmp_path, capsys):
    classes, expected = CLASSES[case]
    path = Path(shutil.copy(image, tmp_path / "x.png"))
    out = tmp_path / "out"
    rc, _, err = run(capsys, "segment", path, "--classes", classes, "--weights", tiny_sd_dir, "--out", out, *FAST)
    if isinstance(expected, str):
        assert_one_line_error(rc, err, expected)
        assert assert_complete(out) == []
        return
    assert rc == 0 and not err, f"exit code {rc}: {err}"
    assert [n for n in assert_complete(out) if "_heat_" in n] == expected


# ---- output folders ------------------------------------------------------------------------------

def _mount_tmpfs(folder: Path, options: str) -> None:
    if shutil.which("mount") is None:
        pytest.skip("no `mount` command to make a small tmpfs")
    folder.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")


@pytest.fixture
def mounts():
    mounted = []
    yield lambda folder, options: (_mount_tmpfs(folder, options), mounted.append(folder))
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=True)


def test_output_folder_under_a_file(tiny_sd_dir, image, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    rc, _, err = run(capsys, "segment", image, "--classes", "cat", "--weights", tiny_sd_dir,
                     "--out", tmp_path / "file" / "out", *FAST)
    assert_one_line_error(rc, err, r"output folder .*file/out is not writable \(.*\): choose another --out")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_output_folder_without_write_permission(tiny_sd_dir, image, tmp_path, capsys):
    out = tmp_path / "locked"
    out.mkdir(mode=0o555)
    rc, _, err = run(capsys, "segment", image, "--classes", "cat", "--weights", tiny_sd_dir, "--out", out, *FAST)
    assert_one_line_error(rc, err, r"output folder .*locked is not writable \(Permission denied\): choose another")


def test_output_folder_on_a_read_only_file_system(tiny_sd_dir, image, tmp_path, capsys, mounts):
    out = tmp_path / "ro"
    mounts(out, "ro,size=64k")
    rc, _, err = run(capsys, "segment", image, "--classes", "cat", "--weights", tiny_sd_dir, "--out", out, *FAST)
    assert_one_line_error(rc, err, r"output folder .*ro is not writable \(Read-only file system\): choose another")


def test_disk_full(tiny_sd_dir, tmp_path, capsys, mounts):
    """A 16 kB tmpfs fills up while the outputs of a 256×192 image are written: one line naming the file
    that did not fit, the files written before it complete, no temporary file, no scores file (so a
    rerun with --skip-existing does the image again)."""
    out = tmp_path / "full"
    mounts(out, "size=16k")
    path = _save(_photo((256, 192)), tmp_path / "big.png")
    rc, _, err = run(capsys, "segment", path, "--classes", "cat,dog", "--weights", tiny_sd_dir, "--out", out, *FAST)
    assert_one_line_error(rc, err, r"cannot write .*full/big_\w+\.(png|safetensors): No space left on device "
                                   r"\(check free space")
    assert "big_scores.safetensors" not in assert_complete(out)
