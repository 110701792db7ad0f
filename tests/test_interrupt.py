"""Interrupting a multi-image `segment` run (issue 7): Ctrl-C (SIGINT) or a kill (SIGKILL) in the middle
leaves only complete output files — each is written under a temporary name and renamed — and a rerun
with --skip-existing does the remaining images and leaves the finished ones alone.

Deterministic on a busy machine: the child is `minidiffseg segment` with one test hook (CHILD below) that
writes the second image's third output under its temporary name, writes a marker file and waits; the
test interrupts it once the marker is there. So exactly one image is finished, the second is half
written with a temporary file on disk, and the third never started.
"""

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

REPO = Path(__file__).resolve().parents[1]
IMAGES = 3
CLASSES = ["cat", "dog"]
OUTPUTS = ["mask.png", "overlay.png", "heat_1_cat.png", "heat_2_dog.png", "scores.safetensors"]  # per image
STOP_AT = len(OUTPUTS) + 3  # the 8th file written: image 2's third output (heat_1_cat.png)

CHILD = r"""
import sys, time
from pathlib import Path

import minidiffseg.outputs as outputs
from minidiffseg.cli import main

marker, stop_at = Path(sys.argv[1]), int(sys.argv[2])
real, calls = outputs.write_atomic, []


def write_atomic(path, data):
    # the stop_at-th output is written under its temporary name, the marker names it, then the run waits
    calls.append(path)
    if len(calls) != stop_at:
        return real(path, data)

    def write_then_wait(tmp):
        data(tmp) if callable(data) else Path(tmp).write_bytes(data)
        marker.write_text(str(tmp))
        while True:
            time.sleep(1)  # until the test's signal

    return real(path, write_then_wait)


outputs.write_atomic = write_atomic  # the writer of every output file
sys.exit(main(sys.argv[3:]))
"""


def segment(images: list[Path], out: Path, weights: Path, *extra, marker: Path | None = None,
            log: Path) -> subprocess.Popen:
    """`minidiffseg segment` in a child process (with the waiting hook when `marker` is given); its stdout and
    stderr go to `log`, kept for the failure messages."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    argv = ["segment", *map(str, images), "--classes", ",".join(CLASSES), "--weights", str(weights),
            "--out", str(out), "--resolution", "64", *extra]
    command = [sys.executable, "-c", CHILD, str(marker), str(STOP_AT)] if marker else [sys.executable, "-m",
                                                                                     "minidiffseg"]
    with open(log, "w") as f:
        return subprocess.Popen(command + argv, stdout=f, stderr=subprocess.STDOUT, text=True, env=env,
                                preexec_fn=default_sigint)


def default_sigint() -> None:
    """In the child before exec: SIGINT back to its default, so Python turns it into KeyboardInterrupt as in
    a terminal. Commands started in the background by a non-interactive shell (`cmd &`, CI runners)
    inherit SIGINT *ignored*, and Python then leaves it ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def done(out: Path) -> set[str]:
    return {p.name.removesuffix("_scores.safetensors") for p in out.glob("*_scores.safetensors")}


def check_complete(out: Path) -> list[str]:
    """Every visible file decodes completely; a finished image (scores file present) has all its outputs;
    returns the hidden temporary files (`.NAME.PID.tmp`)."""
    hidden = []
    for path in out.iterdir():
        if path.name.startswith("."):
            hidden.append(path.name)
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
    return sorted(hidden)


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
    out, marker, log = tmp_path / "out", tmp_path / "waiting", tmp_path / "run.log"
    proc = segment(images, out, tiny_sd_dir, marker=marker, log=log)
    deadline = time.monotonic() + 600  # only a hung child gets here; the marker normally comes in seconds
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists() and proc.poll() is None, \
        f"the run did not reach its 8th output (exit code {proc.poll()}):\n{log.read_text()}"
    tmp = Path(marker.read_text())
    assert tmp.parent == out and tmp.name.startswith(".img01_heat_1_cat.png.") and tmp.is_file(), tmp
    proc.send_signal(sig)
    proc.wait(timeout=120)
    err = log.read_text()
    if sig == signal.SIGINT:
        assert proc.returncode == 130, err
        assert "Traceback" not in err and err.strip().splitlines()[-1] == \
            "minidiffseg: interrupted; completed outputs are kept, rerun to resume", err
    else:
        assert proc.returncode == -signal.SIGKILL, err
    hidden = check_complete(out)
    # Ctrl-C removes the half-written file; a kill leaves it (the next run removes it)
    assert hidden == ([] if sig == signal.SIGINT else [tmp.name]), hidden
    assert done(out) == {"img00"}, f"finished: {sorted(done(out))}\n{err}"
    assert sorted(p.name for p in out.glob("img01_*")) == ["img01_mask.png", "img01_overlay.png"]
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("img00_*")}

    rerun = segment(images, out, tiny_sd_dir, "--skip-existing", log=tmp_path / "rerun.log")
    rerun.wait(timeout=600)
    err = (tmp_path / "rerun.log").read_text()
    assert rerun.returncode == 0, err
    assert f"minidiffseg: 1 image(s) already done in {out}, skipped" in err, err
    assert check_complete(out) == [], "the rerun removes the killed run's temporary file"
    assert done(out) == {p.stem for p in images}
    after = {name: (out / name).stat().st_mtime_ns for name in before}
    assert after == before, "the finished image was written again"
