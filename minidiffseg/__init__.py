"""minidiffseg: a minimal, from-scratch DiffSegmenter (training-free open-vocabulary segmentation
from Stable Diffusion 1.5 (or 2.x) attention) in plain PyTorch."""

from .errors import UserError
from .method.segmenter import SegmentationResult, Segmenter
from .sd import AttentionStore, StableDiffusion, load_sd

__all__ = ["AttentionStore", "SegmentationResult", "Segmenter", "StableDiffusion", "UserError", "load_sd"]
__version__ = "0.1.0"
