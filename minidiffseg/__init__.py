"""minidiffseg: a minimal, from-scratch DiffSegmenter (training-free open-vocabulary segmentation
from Stable Diffusion 1.5 attention) in plain PyTorch."""

from .sd15 import SD15, load_sd15

__version__ = "0.1.0"
