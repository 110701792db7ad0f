"""Running out of memory on one image, on CPU: the segmenter is made to raise CUDA's OutOfMemoryError or the
CPU allocator's RuntimeError for one image. `segment` and `eval` report that image in one line with the
ways out (--class-batch, --low-memory, a smaller --resolution), go on with the other images and exit 2;
eval keeps the results written, and a rerun with the same --out segments only the image left. The CUDA
cache is emptied after the failure, before the next image."""

from __future__ import annotations

import argparse
import re
import sys

import numpy as np
import pytest
import torch

from assets import sample_image_paths
from test_eval_datasets import write_dataset

from minidiffseg.cli import main, options
from minidiffseg.cli import segment as segment_cli
from minidiffseg.errors import UserError
from minidiffseg.evaluation import runner
from minidiffseg.evaluation.candidates import from_ground_truth
from minidiffseg.evaluation.datasets import open_dataset
from minidiffseg.method.segmenter import Segmenter

CUDA_OOM = ("CUDA out of memory. Tried to allocate 2.25 GiB. GPU 0 has a total capacity of 7.63 GiB of which 1.02 "
            "GiB is free. Including non-PyTorch memory, this process has 6.60 GiB memory in use.\nIf reserved but "
            "unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")
CPU_OOM = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
           "allocate 4831838208 bytes. Error code 12 (Cannot allocate memory)")
ERRORS = {"cuda": lambda: torch.OutOfMemoryError(CUDA_OOM), "cpu": lambda: RuntimeError(CPU_OOM)}
SIZES = {"cuda": "2.25 GiB", "cpu": "4.50 GiB"}


def fail_call(monkeypatch, n: int, error):
    """Segmenter.__call__ raises `error()` on its n-th call (1-based), deep inside, holding a tensor."""
    real, calls = Segmenter.__call__, [0]

    def call(self, *args, **kw):
        calls[0] += 1
        if calls[0] == n:
            held = torch.zeros(1000)  # noqa: F841 (what a traceback keeps alive)
            raise error()
        return real(self, *args, **kw)

    monkeypatch.setattr(Segmenter, "__call__", call)
    return calls


@pytest.fixture
def freed(monkeypatch):
    """The devices memory was freed for (options.free_memory, runner._release)."""
    seen = []
    for module, name in ((segment_cli, "free_memory"), (runner, "_release")):
        real = getattr(module, name, lambda d: None)
        monkeypatch.setattr(module, name, lambda d, real=real: (seen.append(torch.device(d)), real(d)), raising=False)
    return seen


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_cpu_allocators_failure_and_cudas_are_out_of_memory():
    with pytest.raises(RuntimeError) as real:
        torch.empty(1 << 62, dtype=torch.uint8)  # refused at once: nothing is allocated
    assert options.is_out_of_memory(real.value)
    assert all(options.is_out_of_memory(make()) for make in ERRORS.values())
    assert options.is_out_of_memory(MemoryError())
    assert not options.is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not options.is_out_of_memory(ValueError("not enough memory"))


def test_free_memory_empties_the_cuda_cache_on_cuda_only(monkeypatch):
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    options.free_memory(torch.device("cpu"))
    runner._release("cpu")
    assert emptied == []
    options.free_memory(torch.device("cuda", 0))
    runner._release(torch.device("cuda", 1))
    assert emptied == [1, 1]


@pytest.mark.parametrize("kind", ERRORS)
def test_segment_reports_the_image_and_writes_the_others(tiny_sd_dir, tmp_path, capsys, monkeypatch, freed, kind):
    images = sample_image_paths()[:3]  # astronaut, chelsea, coffee
    fail_call(monkeypatch, 2, ERRORS[kind])
    out = tmp_path / "out"
    code, stdout, stderr = cli(capsys, "segment", *images, "--classes", "cat,dog", "--weights", tiny_sd_dir,
                               "--out", out, "--resolution", 128)
    assert code == 2 and "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("minidiffseg: error: ")]
    assert len(lines) == 2, stderr  # the image's line, and the count
    assert lines[0] == (f"minidiffseg: error: image {images[1]}: out of memory on cpu (tried to allocate "
                        f"{SIZES[kind]}); use fewer classes per U-Net call with --class-batch N, --low-memory "
                        f"(weights streamed, at most 4 classes per call) or a smaller --resolution (a multiple of 64)")
    assert "1 of 3 image(s) failed" in lines[1]
    done = sorted(p.name for p in out.glob("*_scores.safetensors"))
    assert done == ["astronaut_scores.safetensors", "coffee_scores.safetensors"]
    assert "2 image(s) segmented" in stdout
    assert freed == [torch.device("cpu")]  # once, after the failure


def test_segment_of_one_image_is_one_line_and_names_only_the_ways_left(tiny_sd_dir, tmp_path, capsys, monkeypatch):
    fail_call(monkeypatch, 1, ERRORS["cuda"])
    code, _, stderr = cli(capsys, "segment", sample_image_paths()[0], "--classes", "cat,dog", "--weights",
                          tiny_sd_dir, "--out", tmp_path / "out", "--resolution", 128, "--low-memory",
                          "--class-batch", "2")
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert stderr.startswith("minidiffseg: error: image ")
    assert "out of memory on cpu (tried to allocate 2.25 GiB)" in stderr
    assert "--class-batch N (below 2)" in stderr and "--low-memory" not in stderr and "--resolution" in stderr


def test_maps_is_one_line(tiny_sd_dir, tmp_path, capsys, monkeypatch):
    fail_call(monkeypatch, 1, ERRORS["cpu"])
    code, _, stderr = cli(capsys, "maps", sample_image_paths()[0], "--classes", "cat", "--weights", tiny_sd_dir,
                          "--out", tmp_path / "g.png", "--resolution", 128)
    assert code == 2 and stderr.count("\n") == 1 and "out of memory on cpu" in stderr, stderr


def test_another_runtime_error_is_still_a_bug(tiny_sd_dir, tmp_path, monkeypatch):
    images = sample_image_paths()[:2]
    fail_call(monkeypatch, 1, lambda: RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    with pytest.raises(RuntimeError, match="shapes"):
        main([str(a) for a in ("segment", *images, "--classes", "cat", "--weights", tiny_sd_dir,
                               "--out", tmp_path / "out", "--resolution", 128)])


@pytest.mark.parametrize("kind", ERRORS)
def test_eval_reports_the_image_keeps_the_others_and_resumes(tiny_sd_dir, tmp_path, capsys, monkeypatch, freed,
                                                             kind):
    names = write_dataset(tmp_path / "data", "voc")  # 3 images
    argv = ("eval", "--dataset", "voc", "--root", tmp_path / "data", "--weights", tiny_sd_dir, "--device", "cpu",
            "--resolution", 64, "--out", tmp_path / "ev")
    calls = fail_call(monkeypatch, 2, ERRORS[kind])
    code, _, stderr = cli(capsys, *argv)
    assert code == 2 and "Traceback" not in stderr and calls[0] == 3, stderr  # the third image still segmented
    lines = [line for line in stderr.splitlines() if line.startswith("minidiffseg: error: ")]
    assert lines == [
        f"minidiffseg: error: image {names[1]}: out of memory on cpu (tried to allocate {SIZES[kind]}); use fewer "
        "classes per U-Net call with --class-batch N, --low-memory (weights streamed, at most 4 classes per call) "
        "or a smaller --resolution (a multiple of 64); the results written are kept: rerun with the same --out "
        "(a new --resolution needs a new --out)",
        f"minidiffseg: error: 1 of 3 image(s) have no result (listed above); the results of the others are kept in "
        f"{tmp_path / 'ev' / 'results'}: rerun with the same --out to segment only those"], stderr
    assert sorted(p.stem for p in (tmp_path / "ev" / "results").glob("*.npz")) == [names[0], names[2]]
    assert not (tmp_path / "ev" / "summary.json").exists()  # no partial mIoU
    assert freed == [torch.device("cpu")]

    calls = fail_call(monkeypatch, 0, ERRORS[kind])  # enough memory now (--class-batch is a resumable change)
    code, stdout, stderr = cli(capsys, *argv, "--class-batch", 1)
    assert code == 0 and calls[0] == 1, stderr  # only the image left
    assert re.search(r"mIoU [\d.]+ over 3 images", stdout), stdout


def test_runner_on_cuda_empties_the_cache_after_a_forgiven_image(tmp_path, monkeypatch):
    """The runner itself, with a stub segmenter and a rank on "cuda:0" (the stub computes on the CPU)."""
    write_dataset(tmp_path / "data", "voc")
    ds = open_dataset("voc", tmp_path / "data")
    emptied, calls = [], []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(len(calls)))

    def model(image, classes, *, seed):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError(CUDA_OOM)
        return argparse.Namespace(refined=torch.zeros(len(classes), 4, 4))

    def recover(sample, e):
        return f"image {sample.name}: out of memory" if options.is_out_of_memory(e) else None

    with pytest.raises(UserError, match=r"1 of 3 image\(s\) have no result"):
        runner.run(lambda: model, ds, tmp_path / "out", from_ground_truth(ds), taus=[0.5], progress=False,
                   ranks=runner.Ranks("cuda:0"), recover=recover)
    assert len(calls) == 3 and emptied == [1]  # emptied after the failed image, before the next
    assert len(list((tmp_path / "out" / "results").glob("*.npz"))) == 2
    # without `recover` the error is the caller's, as before (the first image is still to do)
    calls.clear()
    with pytest.raises(torch.OutOfMemoryError):
        runner.run(lambda: model, ds, tmp_path / "out", from_ground_truth(ds), taus=[0.5], progress=False)
