"""Session-wide fixtures shared by the test files."""

import sys
from pathlib import Path

import pytest
import torch

REPO = str(Path(__file__).resolve().parents[1])
if REPO not in sys.path:  # test_bench.py and test_gpu_check.py import the bench/ they test
    sys.path.append(REPO)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """A tiny random SD1.5 in the diffusers folder layout (fp32 files and the .fp16 variant), written once
    per session by the reference libraries (tests/tiny_sd.py; without diffusers/transformers a skip, or a
    failure in strict mode: tests/assets.py)."""
    from tiny_sd import write_tiny_diffusers

    folder = tmp_path_factory.mktemp("tiny_sd")
    write_tiny_diffusers(folder)
    return write_tiny_diffusers(folder, variant="fp16")


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    """A tiny random SD3 in the diffusers folder layout, T5 included (fp32 files and the .fp16 variant), written once
    per session by the reference libraries (tests/tiny_sd3.py)."""
    from tiny_sd3 import write_tiny_sd3_diffusers

    folder = tmp_path_factory.mktemp("tiny_sd3")
    write_tiny_sd3_diffusers(folder)
    return write_tiny_sd3_diffusers(folder, variant="fp16")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    """A tiny random SDXL in the diffusers folder layout (fp32 files and the .fp16 variant), written once per
    session by the reference libraries (tests/tiny_sdxl.py)."""
    from tiny_sdxl import write_tiny_sdxl_diffusers

    folder = tmp_path_factory.mktemp("tiny_sdxl")
    write_tiny_sdxl_diffusers(folder)
    return write_tiny_sdxl_diffusers(folder, variant="fp16")


TINY_RES = 128  # the tiny model's segmenters stretch images to 128² (a 16×16 latent): levels are relative,
# so the code path is the official 512²'s, only faster


@pytest.fixture(scope="session")
def seg64(tiny_sd_dir):
    """The tiny model's Segmenter in float64 (for comparisons with independent references)."""
    from minidiffseg.method.segmenter import Segmenter

    return Segmenter.from_pretrained(tiny_sd_dir, dtype=torch.float64, resolution=TINY_RES)


@pytest.fixture(scope="session")
def seg32(tiny_sd_dir):
    """The tiny model's Segmenter in float32."""
    from minidiffseg.method.segmenter import Segmenter

    return Segmenter.from_pretrained(tiny_sd_dir, resolution=TINY_RES)
