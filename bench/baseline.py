"""The baseline: DiffSegmenter the way the official code runs it, on diffusers + transformers.

Per class, one U-Net pass of batch [unconditional, conditional] (the unconditional half is computed
and discarded), every attention layer computed explicitly by an attention processor that keeps every
probability map (B·heads, N, T) of the pass; then head/layer averaging of the class token's cross maps,
fusion, and the naive refinement S·A with S the 4096×4096 mean of the 64² self-attention maps.
diffusers/transformers are the `bench` extra: imported only here, never by minidiffseg. The attention
processor that keeps every map, StoreEveryMap, is the tests' (tests/reference_sd.py).

`stages` clocks each step; the baseline's "end to end" is the sum of its steps in the same iteration.
"U-Net pass" is the same network work as ours (batch C, conditional rows, diffusers' default fused
attention, nothing stored), not part of the recipe: it compares the two U-Net implementations.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from minidiffseg.image import to_tensor
from minidiffseg.method.recipe import CLASS_WEIGHT, DEFAULT_LEVEL_WEIGHTS, DEFAULT_TAU, TEMPLATES, TIMESTEP
# tests/reference_sd.py (bench/__init__.py puts tests/ on the path)
from reference_sd import StoreEveryMap

RECIPE = ["text encode", "VAE encode", "U-Net + capture", "fusion", "refinement", "post-processing"]


def _variant(component: Path, stem: str) -> str | None:
    """The fp32 files if present, else the .fp16 ones (hub folders are often downloaded fp16-only)."""
    return None if (component / f"{stem}.safetensors").is_file() else "fp16"


class DiffusersRecipe:
    def __init__(self, folder, device: torch.device, dtype: torch.dtype, resolution: int = 512,
                 template: str = TEMPLATES["photograph"]):
        import diffusers
        import transformers

        folder = Path(folder)
        unet_v, vae_v = (_variant(folder / c, "diffusion_pytorch_model") for c in ("unet", "vae"))
        self.unet = diffusers.UNet2DConditionModel.from_pretrained(
            folder / "unet", torch_dtype=dtype, variant=unet_v).to(device).eval()
        self.vae = diffusers.AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=dtype, variant=vae_v).to(device).eval()
        self.text = transformers.CLIPTextModel.from_pretrained(
            folder / "text_encoder", dtype=dtype, variant=_variant(folder / "text_encoder", "model")).to(device).eval()
        self.tok = transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer")
        self.sched = diffusers.DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                             num_train_timesteps=1000)  # SD1.5's schedule (docs/design.md §3)
        self.fused = diffusers.models.attention_processor.AttnProcessor2_0()
        self.maps: dict[str, torch.Tensor] = {}
        self.store = {n: StoreEveryMap(n.removesuffix(".processor"), self.maps) for n in self.unet.attn_processors}
        self.device, self.dtype, self.resolution, self.template = device, dtype, resolution, template

    def encode(self, prompt: str) -> torch.Tensor:
        ids = self.tok(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        return self.text(ids.to(self.device)).last_hidden_state  # (1, 77, 768)

    def class_prompt(self, name: str, empty: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The "++"-weighted encoding of the template with `name`, and the index of its last token."""
        prompt = self.template.format(name)
        n = len(self.tok(prompt).input_ids)  # BOS ... EOS
        n_last = len(self.tok(name.split()[-1]).input_ids) - 2  # tokens of the class's last word
        w = torch.ones(77, device=self.device, dtype=empty.dtype)
        w[n - 1 - n_last:n - 1] = CLASS_WEIGHT
        return empty + w[None, :, None] * (self.encode(prompt) - empty), n - 2

    @torch.inference_mode()
    def stages(self, image, classes: list[str], clock, parity: bool = False, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        with clock("text encode"):
            empty = self.encode("")
            prompts = [self.class_prompt(c, empty) for c in classes]
        with clock("VAE encode"):
            x = F.interpolate(to_tensor(image), size=(self.resolution,) * 2, mode="bilinear", align_corners=False)
            x = (2 * x - 1).to(self.device, self.dtype)
            z0 = self.vae.encode(x).latent_dist.sample(generator=generator) * self.vae.config.scaling_factor
        noise = torch.randn(z0.shape, generator=generator).to(z0)
        z_t = self.sched.add_noise(z0, noise, torch.tensor([TIMESTEP]))
        side = z0.shape[-1]
        if parity:
            self.unet.set_attn_processor(self.fused)
            with clock("U-Net pass"):
                self.unet(z_t.expand(len(classes), -1, -1, -1), TIMESTEP, torch.cat([p for p, _ in prompts]))
        self.unet.set_attn_processor(dict(self.store))  # diffusers empties the dict it is given
        refined = []
        for cond, token in prompts:  # the official loop: one pass, fusion and refinement per class
            with clock("U-Net + capture"):
                self.maps.clear()
                self.unet(torch.cat([z_t, z_t]), TIMESTEP, encoder_hidden_states=torch.cat([empty, cond]))
            with clock("fusion"):
                a = fuse_token(self.maps, token, side, side, DEFAULT_LEVEL_WEIGHTS)
            with clock("refinement"):
                refined.append(refine_naive(self.maps, a, side))
        self.maps.clear()
        with clock("post-processing"):
            mask = decide(refined, image)
        clock.add("end to end", RECIPE)
        return mask


# The recipe's steps after the U-Net pass on the maps StoreEveryMap kept ({layer: (2, heads, N, T)}, row 1 the
# conditional one), shared with the SDXL baseline (baseline_xl.py)

def fuse_token(maps: dict[str, torch.Tensor], token: int, side: int, grid: int, weights: dict[int, float]
               ) -> torch.Tensor:
    """A (1, 1, grid, grid) of one class token: per level (a latent of `side`² has level l at (side/l)²) the mean
    over its layers and heads, bilinear to `grid`², min-max, weighted by `weights`, summed."""
    a: torch.Tensor | int = 0
    for level, weight in weights.items():
        s = side // level
        cross = [p[1, :, :, token] for name, p in maps.items()
                 if name.endswith("attn2") and p.shape[2] == s * s]  # conditional row, (heads, N)
        m = torch.stack(cross).float().mean((0, 1)).reshape(1, 1, s, s)
        m = F.interpolate(m, size=(grid, grid), mode="bilinear", align_corners=False)
        a = a + weight * (m - m.min()) / (m.max() - m.min())
    assert isinstance(a, torch.Tensor), "no fusion weights"
    return a


def refine_naive(maps: dict[str, torch.Tensor], a: torch.Tensor, grid: int) -> torch.Tensor:
    """M (grid, grid) = S·A with S (grid², grid²) the mean of the conditional row's self-attention maps on `grid`²
    over their layers and heads, built in full."""
    s = torch.stack([p[1].mean(0) for name, p in maps.items()
                     if name.endswith("attn1") and p.shape[2] == grid * grid]).mean(0)  # (HW, HW)
    return (s.float() @ a.flatten()).reshape(grid, grid)


def decide(refined: list[torch.Tensor], image) -> torch.Tensor:
    """The classes' M upsampled to the image, min-max per class, argmax against the background score τ."""
    up = F.interpolate(torch.stack(refined)[None], size=(image.height, image.width), mode="bilinear",
                       align_corners=False)[0]  # (C, H, W)
    lo, hi = up.amin((1, 2), keepdim=True), up.amax((1, 2), keepdim=True)
    scores = (up - lo) / (hi - lo)
    return torch.cat([torch.full_like(scores[:1], DEFAULT_TAU), scores]).argmax(0)
