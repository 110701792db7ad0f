"""minidiffseg, stage by stage, through the library's own named steps (those `Segmenter.__call__` runs).

`stages` runs, for one image, what `Segmenter.__call__` runs (`Segmenter.run`, with a clock around each
step), plus one step the segmenter does not have: the same U-Net pass without the attention store ("U-Net
pass"), so that the cost of capturing attention is measured, not guessed. "end to end" is the segmenter itself.
"""

from __future__ import annotations

import contextlib

import torch

from minidiffseg.method.segmenter import Segmenter

STAGES = ["weight loading", "text encode", "VAE encode", "U-Net pass", "U-Net + capture", "fusion", "refinement",
          "post-processing", "end to end"]


def load(weights, device, dtype, resolution: int, joint: bool, stream: bool = False) -> Segmenter:
    return Segmenter.from_pretrained(weights, device=device, dtype=dtype, resolution=resolution, joint=joint,
                                     stream=stream)


# the pipeline's steps (Segmenter.run) -> the table's stages; a stage clocked twice in one image adds up
STAGE_OF = {"prompts": "text encode", "encode_text": "text encode", "encode_image": "VAE encode",
            "record": "U-Net + capture", "fuse": "fusion", "refine": "refinement", "decide": "post-processing"}


@torch.inference_mode()
def stages(seg: Segmenter, image, classes: list[str], joint: bool, clock, seed: int = 0):
    """One image through the method (`Segmenter.run`, each step clocked), then the bare U-Net pass on the same
    inputs; returns the mask (H, W). The text cache is emptied first: the cost of one image includes encoding
    its prompts."""
    seg.text_cache.clear()
    run = seg.run(image, classes, joint=joint, seed=seed, class_batch=None,
                  clock=lambda step: clock(STAGE_OF[step]) if step in STAGE_OF else contextlib.nullcontext())
    context = seg.encode_text(run.rows)  # cached by the run: states (B, 77, D), B = C rows, or 1 in joint mode
    with clock("U-Net pass"):  # the network alone: every attention is fused SDPA, nothing recorded
        t = seg.timesteps[0]
        seg.sd.denoise(seg.sd.add_noise(run.z0, run.noises[0].to(run.z0), t), t, context, None)
    return run.mask


def end_to_end(seg: Segmenter, image, classes: list[str], joint: bool, clock):
    seg.text_cache.clear()
    with clock("end to end"):
        return seg(image, classes, joint=joint, seed=0).mask
