"""What both checkpoint layouts (docs/design.md §4) share about names: the networks of a Stable Diffusion
checkpoint, called by their diffusers folder names; the keys of the official files that minidiffseg never
builds, under our (= the diffusers folders') names; and the translation of a name by prefix rules, which the
single-file rules of minidiffseg.sd.ldm and minidiffseg.sd.openclip are made of.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

# the networks of a checkpoint, in the order they are loaded; SDXL adds its second text tower (OpenCLIP bigG)
COMPONENTS = ("text_encoder", "text_encoder_2", "vae", "unet")
WHAT = {"text_encoder": "text encoder", "text_encoder_2": "second text encoder", "vae": "VAE",
        "unet": "U-Net", "text_encoder_3": "T5 encoder", "transformer": "transformer"}  # each one's name in messages
# SD3's (minidiffseg.sd3.checkpoint): the three text encoders, the VAE and the MM-DiT
SD3_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "vae", "transformer")

# keys of the official files that no network we build holds, as fnmatch patterns over our names; the
# single-file layout ignores the same keys under its own prefixes (ldm.IGNORED)
NOT_BUILT = {"text_encoder": ("text_model.embeddings.position_ids",),  # the arange(77) buffer
             "text_encoder_2": ("text_model.embeddings.position_ids",),
             "vae": ("decoder.*", "post_quant_conv.*"),  # the decoder half
             "unet": (), "transformer": (),
             "text_encoder_3": ()}


def not_built(component: str, name: str) -> bool:
    """Whether `name` (one of ours) of the `component` network is a key we never build (NOT_BUILT)."""
    return any(fnmatchcase(name, pattern) for pattern in NOT_BUILT[component])


def rename(name: str, rules: dict[str, str]) -> str | None:
    """Translate `name` by its longest prefix in `rules` (prefixes end with "."); None if none matches."""
    parts = name.split(".")
    for n in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:n]) + "."
        if head in rules:
            return rules[head] + name[len(head):]
    return None
