"""minidiffseg, stage by stage, through the library's own functions (the steps of `Segmenter.seg`).

`stages` runs what `Segmenter.seg` runs for one image, with a clock around each step, plus one step
seg() does not have: the same U-Net pass without the attention store ("U-Net pass"), so that the
cost of capturing attention is measured, not guessed. "end to end" is `Segmenter.seg` itself.
"""

from __future__ import annotations

import torch

from minidiffseg.sd.attention import AttentionStore
from minidiffseg.image import to_tensor
from minidiffseg.method.fusion import fuse, level_maps
from minidiffseg.method.refine import refine
from minidiffseg.method.decision import decide, upsample_scores
from minidiffseg.method.segmenter import Segmenter

STAGES = ["weight loading", "text encode", "VAE encode", "U-Net pass", "U-Net + capture", "fusion", "refinement",
          "post-processing", "end to end"]


def load(weights, device, dtype, resolution: int, joint: bool) -> Segmenter:
    return Segmenter.from_pretrained(weights, device=device, dtype=dtype, resolution=resolution, joint=joint)


def forget_text(seg: Segmenter) -> None:
    """Segmenter keeps the text embeddings of class lists it has seen (many images, same classes); the
    cost of one image includes encoding them, so every measured run starts without them."""
    seg._text_cache.clear()


@torch.inference_mode()
def stages(seg: Segmenter, image, classes: list[str], joint: bool, clock, seed: int = 0):
    """One image through the method, each step clocked; returns the mask (H, W)."""
    generator = torch.Generator().manual_seed(seed)
    forget_text(seg)
    with clock("text encode"):
        rows = seg.prompts(classes, joint=joint)
        context = seg.encode_text(rows)  # (B, 77, 768): B = C rows, or 1 in joint mode
    with clock("VAE encode"):
        z0 = seg.encode_image(to_tensor(image, torch.promote_types(seg.dtype, torch.float32)), generator, "sample")
    t = seg.timesteps[0]
    z_t = seg.sd.schedule.add_noise(z0, torch.randn(z0.shape, generator=generator).to(z0), t)
    with clock("U-Net pass"):  # the network alone: every attention is fused SDPA, nothing recorded
        seg.sd.unet(z_t, t, context, output=False)
    with clock("U-Net + capture"):
        select = torch.stack([r.select for r in rows]).to(seg.device, seg.dtype)  # (B, 77, K)
        store = AttentionStore(cross=seg.cross_layers, token_weights=select, qk=seg.self_layers)
        seg.sd.unet(z_t, t, context, store=store, output=False)
    with clock("fusion"):
        maps = level_maps(store.cross_maps, store.count, seg.levels, store.shapes)
        a = fuse(maps, tuple(z0.shape[-2:]), seg.level_weights)  # (B, K, h, w)
    with clock("refinement"):
        qk = [pair for name in sorted(seg.self_layers) for pair in store.qk_pairs[name]]
        m = refine(qk, a.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(a.shape)  # (B, K, h, w)
    with clock("post-processing"):
        scores = upsample_scores(m.flatten(0, 1), (image.height, image.width))
        return decide(scores, seg.default_background)


def end_to_end(seg: Segmenter, image, classes: list[str], joint: bool, clock):
    forget_text(seg)
    with clock("end to end"):
        return seg.seg(image, classes, joint=joint, seed=0).mask
