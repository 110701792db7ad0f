"""minidiffseg, stage by stage, through the library's own named steps (those `Segmenter.__call__` runs).

`stages` runs, for one image, what `Segmenter.__call__` runs, with a clock around each step, plus one step
the segmenter does not have: the same U-Net pass without the attention store ("U-Net pass"), so that the
cost of capturing attention is measured, not guessed. "end to end" is the segmenter itself.
"""

from __future__ import annotations

import torch

from minidiffseg.image import to_tensor
from minidiffseg.method.decision import decide, upsample_scores
from minidiffseg.method.segmenter import Segmenter

STAGES = ["weight loading", "text encode", "VAE encode", "U-Net pass", "U-Net + capture", "fusion", "refinement",
          "post-processing", "end to end"]


def load(weights, device, dtype, resolution: int, joint: bool, stream: bool = False) -> Segmenter:
    return Segmenter.from_pretrained(weights, device=device, dtype=dtype, resolution=resolution, joint=joint,
                                     stream=stream)


@torch.inference_mode()
def stages(seg: Segmenter, image, classes: list[str], joint: bool, clock, seed: int = 0):
    """One image through the method, each step clocked; returns the mask (H, W). The text cache is emptied
    first: the cost of one image includes encoding its prompts."""
    generator = torch.Generator().manual_seed(seed)
    seg.text_cache.clear()
    with clock("text encode"):
        rows = seg.prompts(classes, joint=joint)
        context = seg.encode_text(rows)  # (B, 77, 768): B = C rows, or 1 in joint mode
    with clock("VAE encode"):
        z0 = seg.encode_image(to_tensor(image, torch.promote_types(seg.dtype, torch.float32)), generator)
    noises = seg.noises(z0, generator)
    with clock("U-Net pass"):  # the network alone: every attention is fused SDPA, nothing recorded
        t = seg.timesteps[0]
        seg.sd.unet(seg.sd.schedule.add_noise(z0, noises[0].to(z0), t), t, context, output=False)
    with clock("U-Net + capture"):
        store = seg.record(z0, noises, context, torch.stack([r.select for r in rows]))  # select (B, 77, K)
    with clock("fusion"):
        fused, _, _ = seg.fuse(store, tuple(z0.shape[-2:]))  # A (B, K, h, w)
    with clock("refinement"):
        refined = seg.refine(store, fused)  # M (B, K, h, w)
    with clock("post-processing"):
        scores = upsample_scores(refined.flatten(0, 1), (image.height, image.width))
        return decide(scores, seg.default_tau)


def end_to_end(seg: Segmenter, image, classes: list[str], joint: bool, clock):
    seg.text_cache.clear()
    with clock("end to end"):
        return seg(image, classes, joint=joint, seed=0).mask
