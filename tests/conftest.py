"""Session-wide fixtures shared by the test files."""

import sys
from pathlib import Path

import pytest

REPO = str(Path(__file__).resolve().parents[1])
if REPO not in sys.path:  # the tests share bench/'s diffusers reference builders (bench/weights.py, bench/baseline.py)
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
