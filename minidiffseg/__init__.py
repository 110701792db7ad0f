"""minidiffseg: a minimal, from-scratch DiffSegmenter (training-free open-vocabulary segmentation
from Stable Diffusion 1.5 attention) in plain PyTorch."""

from .attention import AttentionStore
from .errors import UserError
from .sd15 import SD15, load_sd15
from .segmenter import SegmentationResult, Segmenter

__all__ = ["AttentionStore", "SD15", "SegmentationResult", "Segmenter", "UserError", "load_sd15"]
__version__ = "0.1.0"
