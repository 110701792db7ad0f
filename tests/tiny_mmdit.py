"""Random-weight SD3 / SD3.5 MM-DiTs in the official diffusers layout, written by diffusers itself
(SD3Transformer2DModel), for the parity tests of minidiffseg.sd3 (tests/test_mmdit.py).

- `reference_mmdit(cfg, seed)`: diffusers' SD3Transformer2DModel built from an MMDiTConfig (its fields are the
  model's arguments), every parameter randomised with visible magnitudes (`randomise_`: tests/tiny_sd.py's, plus
  the qk RMSNorm weights near 1 and the AdaLN modulations small, so no block is a near-identity), the stored
  position table kept as diffusers computes it.
- `write_tiny_transformer(dir, cfg, seed)`: that model saved with `save_pretrained` (config.json +
  diffusion_pytorch_model.safetensors, the table included as diffusers saves it).
- `reference_state(cfg, seed)`: its state dict.

Import from a test as `from tiny_mmdit import ...` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from assets import require
from minidiffseg.sd3.config import MMDiTConfig
from tiny_sd import randomise_

diffusers = require("diffusers")  # the reference MM-DiT (test-only)


def config_dict(cfg: MMDiTConfig) -> dict:
    """SD3Transformer2DModel's keyword arguments for `cfg` (tuples as diffusers' config.json writes lists)."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def reference_mmdit(cfg: MMDiTConfig, seed: int = 0):
    """diffusers' SD3Transformer2DModel at `cfg`, random (see the module docstring), in eval mode, float32."""
    model = diffusers.SD3Transformer2DModel(**config_dict(cfg))
    randomise_(model, seed)
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".norm_q.weight", ".norm_k.weight", ".norm_added_q.weight", ".norm_added_k.weight")):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))  # RMSNorm weights: 1 ± 0.1
            elif ".linear." in name and ("norm1" in name or "norm_out" in name):
                p.mul_(0.5)  # modulations of ±0.5: the gates and scales matter without blowing up 3 blocks
    return model.eval()


def reference_state(cfg: MMDiTConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """The state dict of reference_mmdit(cfg, seed): diffusers' names, the position table included."""
    return reference_mmdit(cfg, seed).state_dict()


def write_tiny_transformer(dir: str | Path, cfg: MMDiTConfig = MMDiTConfig.tiny(), seed: int = 0,
                           dtype: torch.dtype = torch.float32) -> Path:
    """A diffusers `transformer/` folder: config.json and diffusion_pytorch_model.safetensors, by save_pretrained."""
    dir = Path(dir)
    reference_mmdit(cfg, seed).to(dtype).save_pretrained(dir, safe_serialization=True)
    return dir
