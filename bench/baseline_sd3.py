"""The baseline on SD3: the method's SD3 recipe (docs/sd3.md §3) on diffusers + transformers, as baseline_xl.py
runs the SDXL one: diffusers' own prompt encoding (`StableDiffusion3Pipeline.encode_prompt`: CLIP-L ‖ bigG, then
T5-XXL's 256 tokens, or zeros in their place for a folder without T5), the VAE's posterior sample shifted and
scaled, (z − shift)·scale, noised along the flow's line, x_σ = (1 − σ)·x0 + σ·ε with σ = 0.256, and per class one
SD3Transformer2DModel pass with an attention processor on the anchor block (9 of SD3-medium's 24,
`recipe.sd3_anchor`) that keeps that block's whole joint softmax, averaged over heads (JointProbs, the tests'
tests/reference_sd3.py); the other blocks keep diffusers' fused processor. From it: the class token's cross map
(image rows × its column), min-max; S, the image × image block with each row divided by its image mass; the
naive M = S·A with S built in full; upsampling, min-max and the argmax against τ.

The batch of each pass is the conditional prompt only, [cond], not the pipeline's classifier-free-guidance batch
[uncond, cond]: the recipe reads nothing from an unconditional row and has no guidance to apply, so that row
would double the transformer's work for nothing and the comparison would measure the batch, not the
implementation (`cfg=True` runs the pipeline's batch anyway, reading its conditional half). Ours runs all
classes as one batch of C rows: the same transformer FLOPs as the baseline's C passes of one row.

Memory: diffusers loads the whole VAE (the decoder too, as the hub folder has it) and transformers' T5-XXL
resident (9.5 GB in bf16, 19 GB in fp32); the kept map is (N + 333)² per row, 4429² at 1024² (78 MB in fp32),
computed from the 24 heads' full softmax (1.9 GB at 1024² in fp32, for that one block).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from minidiffseg.image import to_tensor
from minidiffseg.method.recipe import CLASS_WEIGHT, DEFAULT_TAU, SD3_TIMESTEP, TEMPLATES, sd3_anchor
# tests/reference_sd3.py (bench/__init__.py puts tests/ on the path)
from reference_sd3 import JointProbs

RECIPE = ["text encode", "VAE encode", "transformer + capture", "fusion", "refinement", "post-processing"]
T5_TOKENS = 256  # StableDiffusion3Pipeline's max_sequence_length default


def _variant(component: Path, stem: str) -> str | None:
    """The fp32 files if present (one file or a shard index), else the .fp16 ones."""
    fp32 = (component / f"{stem}.safetensors").is_file() or (component / f"{stem}.safetensors.index.json").is_file()
    return None if fp32 else "fp16"


class DiffusersSD3Recipe:
    def __init__(self, folder, device: torch.device, dtype: torch.dtype, resolution: int = 1024,
                 template: str = TEMPLATES["photograph"], cfg: bool = False):
        import diffusers
        import transformers

        folder = Path(folder)

        def load(cls, name: str, stem: str, **kw):  # .to(dtype) again: diffusers' SD3 transformer loads float64 as float32
            net = cls.from_pretrained(folder / name, variant=_variant(folder / name, stem), **kw)
            return net.to(device=device, dtype=dtype).eval()

        self.transformer = load(diffusers.SD3Transformer2DModel, "transformer", "diffusion_pytorch_model",
                                torch_dtype=dtype)
        self.vae = load(diffusers.AutoencoderKL, "vae", "diffusion_pytorch_model", torch_dtype=dtype)
        clip = transformers.CLIPTextModelWithProjection
        t5 = (folder / "text_encoder_3").is_dir()
        self.pipe = diffusers.StableDiffusion3Pipeline(
            transformer=self.transformer, vae=self.vae,
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler"),
            text_encoder=load(clip, "text_encoder", "model", dtype=dtype),
            text_encoder_2=load(clip, "text_encoder_2", "model", dtype=dtype),
            text_encoder_3=load(transformers.T5EncoderModel, "text_encoder_3", "model", dtype=dtype) if t5 else None,
            tokenizer=transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer", model_max_length=77),
            tokenizer_2=transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer_2", model_max_length=77),
            tokenizer_3=transformers.T5TokenizerFast.from_pretrained(folder / "tokenizer_3") if t5 else None)
        self.anchor = f"transformer_blocks.{sd3_anchor(self.transformer.config.num_layers)}.attn"
        self.maps: dict[str, torch.Tensor] = {}
        processors = dict(self.transformer.attn_processors)
        processors[f"{self.anchor}.processor"] = JointProbs(self.anchor, self.maps)
        self.transformer.set_attn_processor(processors)
        self.device, self.dtype, self.resolution, self.template, self.cfg = device, dtype, resolution, template, cfg
        self.t5 = t5
        self.scores: torch.Tensor | None = None  # the last image's (C, H, W) scores

    def encode(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        states, _, pooled, _ = self.pipe.encode_prompt(prompt, None, None, device=self.device,
                                                       do_classifier_free_guidance=False,
                                                       max_sequence_length=T5_TOKENS)
        return states, pooled  # (1, 77 + 256, 4096), (1, 2048)

    @torch.inference_mode()
    def stages(self, image, classes: list[str], clock, seed: int = 0) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        tok = self.pipe.tokenizer
        work = torch.promote_types(self.dtype, torch.float32)  # maps, timestep, scores: float32 (float64 in tests)
        with clock("text encode"):
            empty, empty_pooled = self.encode("")
            rows = []
            for name in classes:
                prompt = self.template.format(name)
                n = len(tok(prompt).input_ids)  # BOS ... EOS
                n_last = len(tok(name.split()[-1]).input_ids) - 2  # the class's last word's tokens: "++"
                w = torch.ones(empty.shape[1], device=self.device, dtype=empty.dtype)  # T5's tokens keep weight 1
                w[n - 1 - n_last:n - 1] = CLASS_WEIGHT
                states, pooled = self.encode(prompt)
                rows.append((empty + w[None, :, None] * (states - empty), pooled, n - 2))  # the class's last token
        with clock("VAE encode"):
            x = F.interpolate(to_tensor(image, work), size=(self.resolution,) * 2, mode="bilinear",
                              align_corners=False)
            x = (2 * x - 1).to(self.device, self.dtype)
            cfg = self.vae.config
            z = self.vae.encode(x).latent_dist.sample(generator=generator)
            z0 = (z - cfg.shift_factor) * cfg.scaling_factor
        sigma = SD3_TIMESTEP / 1000
        noise = torch.randn(z0.shape, generator=generator).to(z0)
        z_t = (1 - sigma) * z0 + sigma * noise
        grid = z0.shape[-1] // self.transformer.config.patch_size
        n = grid * grid
        batch = 2 if self.cfg else 1
        timestep = torch.full((batch,), float(SD3_TIMESTEP), device=self.device, dtype=work)
        refined = []
        for cond, pooled, token in rows:  # one pass, fusion and refinement per class
            with clock("transformer + capture"):
                self.maps.clear()
                states = torch.cat([empty, cond]) if self.cfg else cond
                pooled = torch.cat([empty_pooled, pooled]) if self.cfg else pooled
                self.transformer(hidden_states=z_t.expand(batch, -1, -1, -1), encoder_hidden_states=states,
                                 pooled_projections=pooled, timestep=timestep, return_dict=False)
            with clock("fusion"):
                p = self.maps[self.anchor][-1].to(work)  # the conditional row's (N + T, N + T)
                cross = p[:n, n + token].reshape(grid, grid)
                a = (cross - cross.min()) / (cross.max() - cross.min())
            with clock("refinement"):
                s = p[:n, :n]
                s = s / s.sum(-1, keepdim=True)  # each row over its image mass: row-stochastic
                refined.append((s @ a.flatten()).reshape(grid, grid))
        self.maps.clear()
        with clock("post-processing"):
            up = F.interpolate(torch.stack(refined)[None], size=(image.height, image.width), mode="bilinear",
                               align_corners=False)[0]  # (C, H, W)
            lo, hi = up.amin((1, 2), keepdim=True), up.amax((1, 2), keepdim=True)
            self.scores = (up - lo) / (hi - lo)
            mask = torch.cat([torch.full_like(self.scores[:1], DEFAULT_TAU), self.scores]).argmax(0)
        clock.add("end to end", RECIPE)
        return mask
