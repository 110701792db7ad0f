"""The baseline on SDXL: the method's SDXL recipe (docs/sdxl.md §3) the way bench/baseline.py runs SD1.5's
official recipe, on diffusers + transformers: per class one U-Net pass of batch [unconditional,
conditional] with an attention processor that keeps every probability map (StoreEveryMap, the tests'),
the class token's cross maps of levels 4 and 2 fused, and the naive refinement S·A with S the mean of the
level-2 self-attention maps built in full. The prompt encoding is diffusers' own
(`StableDiffusionXLPipeline.encode_prompt`); the time ids those of a whole image at the run's size.

At 1024² the kept maps alone are tens of GiB: each of the 10 level-2 self-attention layers keeps 10 heads ×
4096² probabilities for both rows of the batch (1.3 GB a layer in float32, 13 GB for the ten) and the 60 level-4
layers 10 GB more, beyond this 24 GiB machine beside the weights: bench/experiments/sdxl.py runs it at 512² only.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from minidiffseg.image import to_tensor
from minidiffseg.method.recipe import CLASS_WEIGHT, SDXL_LEVEL_WEIGHTS, TEMPLATES, TIMESTEP
# tests/reference_sd.py (bench/__init__.py puts tests/ on the path)
from reference_sd import StoreEveryMap

from bench.baseline import _variant, decide, fuse_token, refine_naive

RECIPE = ["text encode", "VAE encode", "U-Net + capture", "fusion", "refinement", "post-processing"]


class DiffusersXLRecipe:
    def __init__(self, folder, device: torch.device, dtype: torch.dtype, resolution: int = 1024,
                 template: str = TEMPLATES["photograph"]):
        import diffusers
        import transformers

        folder = Path(folder)

        def load(cls, name: str, stem: str, **kw):
            return cls.from_pretrained(folder / name, variant=_variant(folder / name, stem), **kw).to(device).eval()

        self.unet = load(diffusers.UNet2DConditionModel, "unet", "diffusion_pytorch_model", torch_dtype=dtype)
        self.vae = load(diffusers.AutoencoderKL, "vae", "diffusion_pytorch_model", torch_dtype=dtype)
        self.pipe = diffusers.StableDiffusionXLPipeline(
            vae=self.vae, unet=self.unet, scheduler=diffusers.EulerDiscreteScheduler(),
            text_encoder=load(transformers.CLIPTextModel, "text_encoder", "model", dtype=dtype),
            text_encoder_2=load(transformers.CLIPTextModelWithProjection, "text_encoder_2", "model", dtype=dtype),
            tokenizer=transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer", model_max_length=77),
            tokenizer_2=transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer_2", model_max_length=77))
        self.sched = diffusers.DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                             num_train_timesteps=1000)  # SDXL's schedule is SD's
        self.maps: dict[str, torch.Tensor] = {}
        self.store = {n: StoreEveryMap(n.removesuffix(".processor"), self.maps) for n in self.unet.attn_processors}
        self.device, self.dtype, self.resolution, self.template = device, dtype, resolution, template

    def encode(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        states, _, pooled, _ = self.pipe.encode_prompt(prompt, device=self.device, do_classifier_free_guidance=False)
        return states, pooled  # (1, 77, 2048), (1, 1280)

    @torch.inference_mode()
    def stages(self, image, classes: list[str], clock, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        tok = self.pipe.tokenizer
        with clock("text encode"):
            empty, empty_pooled = self.encode("")
            rows = []
            for name in classes:
                prompt = self.template.format(name)
                n = len(tok(prompt).input_ids)  # BOS ... EOS
                n_last = len(tok(name.split()[-1]).input_ids) - 2
                w = torch.ones(77, device=self.device, dtype=empty.dtype)
                w[n - 1 - n_last:n - 1] = CLASS_WEIGHT
                states, pooled = self.encode(prompt)
                rows.append((empty + w[None, :, None] * (states - empty), pooled, n - 2))
        with clock("VAE encode"):
            x = F.interpolate(to_tensor(image), size=(self.resolution,) * 2, mode="bilinear", align_corners=False)
            x = (2 * x - 1).to(self.device, self.dtype)
            z0 = self.vae.encode(x).latent_dist.sample(generator=generator) * self.vae.config.scaling_factor
        noise = torch.randn(z0.shape, generator=generator).to(z0)
        z_t = self.sched.add_noise(z0, noise, torch.tensor([TIMESTEP]))
        side, r = z0.shape[-1], self.resolution
        grid = side // 2  # the refinement's grid: level 2
        time_ids = torch.tensor([[r, r, 0, 0, r, r]] * 2, device=self.device, dtype=self.dtype)
        self.unet.set_attn_processor(dict(self.store))  # diffusers empties the dict it is given
        refined = []
        for cond, pooled, token in rows:  # one pass, fusion and refinement per class
            with clock("U-Net + capture"):
                self.maps.clear()
                self.unet(torch.cat([z_t, z_t]), TIMESTEP, encoder_hidden_states=torch.cat([empty, cond]),
                          added_cond_kwargs={"text_embeds": torch.cat([empty_pooled, pooled]), "time_ids": time_ids})
            with clock("fusion"):
                a = fuse_token(self.maps, token, side, grid, SDXL_LEVEL_WEIGHTS)
            with clock("refinement"):
                refined.append(refine_naive(self.maps, a, grid))
        self.maps.clear()
        with clock("post-processing"):
            mask = decide(refined, image)
        clock.add("end to end", RECIPE)
        return mask
