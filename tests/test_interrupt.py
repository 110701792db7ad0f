"""Interrupting a multi-image `segment` run (issue 7): Ctrl-C (SIGINT) or a kill (SIGKILL) in the middle
leaves only complete output files — each is written under a temporary name and renamed — and a rerun
with --skip-existing does the remaining images and leaves the finished ones alone."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import tiny_sd  # noqa: E402  (needs diffusers and transformers: assets.require)

REPO = Path(__file__).resolve().parents[1]
IMAGES = 8
CLASSES = ["cat", "dog"]
OUTPUTS = ["mask.png", "overlay.png", "heat_1_cat.png", "heat_2_dog.png", "scores.safetensors"]  # per image


def segment(images: list[Path], out: Path, weights: Path, *extra) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "minidiffseg", "segment", *map(str, images), "--classes",
                             ",".join(CLASSES), "--weights", str(weights), "--out", str(out), "--resolution", "64",
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=default_sigint)


def default_sigint() -> None:
    """In the child before exec: SIGINT back to its default, so Python turns it into KeyboardInterrupt as in
    a terminal. Commands started in the background by a non-interactive shell (`cmd &`, CI runners)
    inherit SIGINT *ignored*, and Python then leaves it ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def done(out: Path) -> set[str]:
    return {p.name.removesuffix("_scores.safetensors") for p in out.glob("*_scores.safetensors")}


def check_complete(out: Path, leftovers_allowed: bool) -> None:
    """Every visible file decodes completely; a finished image (scores file present) has all its outputs;
    temporary files are hidden `.NAME.PID.tmp` names, and only a SIGKILL may leave them."""
    for path in out.iterdir():
        if path.name.startswith("."):
            assert leftovers_allowed and path.name.endswith(".tmp"), f"unexpected hidden file {path.name}"
            continue
        assert not path.name.endswith(".tmp"), path.name
        if path.suffix == ".png":
            with Image.open(path) as im:
                im.load()
        else:
            assert tuple(load_file(path)["scores"].shape[:1]) == (len(CLASSES),), path.name
    for stem in done(out):
        for name in OUTPUTS:
            assert (out / f"{stem}_{name}").is_file(), f"{stem} is marked done but {name} is missing"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(0)
    paths = []
    for i in range(IMAGES):
        pixels = (torch.rand(96, 128, 3, generator=g) * 255).to(torch.uint8)
        paths.append(folder / f"img{i:02d}.png")
        Image.frombytes("RGB", (128, 96), pixels.numpy().tobytes()).save(paths[-1])
    return paths


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_interrupted_run_keeps_complete_files_and_resumes(sig, images, tiny_sd_dir, tmp_path):
    out = tmp_path / "out"
    proc = segment(images, out, tiny_sd_dir)
    deadline = time.monotonic() + 240
    while not (out.is_dir() and done(out)) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, f"the run ended before it could be interrupted:\n{proc.communicate()[1]}"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if sig == signal.SIGINT:
        assert proc.returncode == 130, err
        assert "Traceback" not in err and err.strip().splitlines()[-1] == \
            "minidiffseg: interrupted; completed outputs are kept, rerun to resume", err
    else:
        assert proc.returncode == -signal.SIGKILL
    check_complete(out, leftovers_allowed=sig == signal.SIGKILL)
    finished = done(out)
    assert 0 < len(finished) < IMAGES, f"{len(finished)} images finished: interrupt earlier or add images"
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name.split("_")[0] in finished}

    rerun = segment(images, out, tiny_sd_dir, "--skip-existing")
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert f"minidiffseg: {len(finished)} image(s) already done in {out}, skipped" in err, err
    check_complete(out, leftovers_allowed=False)  # the rerun removed the killed run's temporaries
    assert done(out) == {p.stem for p in images}
    after = {name: (out / name).stat().st_mtime_ns for name in before}
    assert after == before, "finished images were written again"
