"""Stable Diffusion as minidiffseg uses it (SD1.5 and SD2.x): the tokenizer, the CLIP text encoder, the VAE encoder,
the U-Net with its explicit attention store, the noise schedule, and strict loading from the official
files. Nothing here knows about segmentation (tests/test_layout.py checks that this package imports
nothing from method/, filter/, evaluation/ or cli/)."""

from .attention import AttentionStore
from .backbone import StableDiffusion
from .checkpoint import load_sd

__all__ = ["AttentionStore", "StableDiffusion", "load_sd"]
