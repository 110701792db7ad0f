"""Dense CRF post-processing of score maps into pseudo-labels (docs/crf.md): not part of DiffSegmenter
itself, but the refinement step of the weakly-supervised protocol the paper's training results follow.
`dense.py` is the fully connected CRF and its mean-field inference, `permutohedral.py` the Gaussian
filter it runs on. Plain PyTorch on any device, with nothing compiled (docs/crf.md §8). This package
depends on nothing else of minidiffseg but `errors.py` (tests/test_layout.py checks it)."""

from .dense import (DEFAULT_PRESET, IGNORE, MAX_ITERATIONS, PRESETS, CRFParams, DenseCRF, check_ignore_below,
                    describe, parse, probabilities, pseudo_labels)

__all__ = ["CRFParams", "DEFAULT_PRESET", "DenseCRF", "IGNORE", "MAX_ITERATIONS", "PRESETS", "check_ignore_below",
           "describe", "parse", "probabilities", "pseudo_labels"]
