"""The single-file layout of SD3 / SD3.5 (`sd3_medium.safetensors`, `sd3.5_medium.safetensors`, ...): the
transformer under `model.diffusion_model.` in the original MM-DiT's names (Stability AI's reference code; diffusers
reads them with loaders/single_file_utils.py `convert_sd3_transformer_checkpoint_to_diffusers`); the rules to our
(diffusers') names, and the architecture sizes read back from the tensor shapes.

    ours (MMDiT, diffusers)                                  original (under model.diffusion_model.)
    pos_embed.proj / pos_embed.pos_embed                     x_embedder.proj / pos_embed
    time_text_embed.timestep_embedder.linear_1 / linear_2    t_embedder.mlp.0 / mlp.2
    time_text_embed.text_embedder.linear_1 / linear_2        y_embedder.mlp.0 / mlp.2
    context_embedder                                         context_embedder
    transformer_blocks.i.                                    joint_blocks.i.
      attn.to_q | to_k | to_v                                  x_block.attn.qkv        rows [0:D] | [D:2D] | [2D:3D]
      attn.add_q_proj | add_k_proj | add_v_proj                context_block.attn.qkv  rows, the same way
      attn.norm_q / norm_k                                     x_block.attn.ln_q / ln_k
      attn.norm_added_q / norm_added_k                         context_block.attn.ln_q / ln_k
      attn.to_out.0 / attn.to_add_out                          x_block.attn.proj / context_block.attn.proj
      attn2.to_q | to_k | to_v, norm_q / norm_k, to_out.0      x_block.attn2.qkv (rows), ln_q / ln_k, proj
      norm1.linear                                             x_block.adaLN_modulation.1
      norm1_context.linear                                     context_block.adaLN_modulation.1
      ff.net.0.proj / ff.net.2                                 x_block.mlp.fc1 / fc2
      ff_context.net.0.proj / ff_context.net.2                 context_block.mlp.fc1 / fc2
    norm_out.linear / proj_out                               final_layer.adaLN_modulation.1 / final_layer.linear

Two kinds of tensor are not a rename. The fused q/k/v projections ([3D, D] and [3D]) hold our three projections
as row blocks. And the two AdaLayerNormContinuous modulations (`norm_out.linear`, the last block's
`norm1_context.linear`, [2D, D] and [2D]) are stored shift first where ours (diffusers') put scale first: the
halves are swapped.

How such a file loads (the project's way for fused tensors, as minidiffseg.sd.openclip does for OpenCLIP's
in_proj): `load_strict` fills an `MMDiTFileWeights` under the file's own names, shapes and layout, every key
checked (missing, unexpected, mis-shaped: named as the file names them, the missing ones without the prefix);
`to_mmdit` then hands the tensors to an MMDiT. The q/k/v become views (row blocks of the fused tensor, no copy);
the two swapped modulations are copied (two [2D, D] weights and their biases: the only copy). Such a transformer cannot be streamed (the streamed source
reads whole file tensors per parameter); the diffusers folder can.

What the shapes do not tell: the head width where no qk norm shows it (SD3-medium: 64, the original MM-DiT's
fixed head size, `HEAD_WIDTH`) and `sample_size` (128 in every release). A file may carry them in its safetensors
metadata as "minidiffseg.transformer.<field>": JSON (the tests' tiny files do).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace

import torch
from torch import nn

from ..errors import UserError
from .config import MMDiTConfig
from .mmdit import MMDiT

PREFIX = "model.diffusion_model."
HEAD_WIDTH = 64  # the original MM-DiT's heads (Stability-AI/sd3.5 mmditx.py: hidden_size = 64 · depth, heads = depth)
NOT_IN_SHAPES = ("attention_head_dim", "sample_size")  # read from "minidiffseg.transformer.<field>" metadata if there

# renames outside the blocks: ours -> original (leaf names kept)
TOP = {"pos_embed.proj.": "x_embedder.proj.", "time_text_embed.timestep_embedder.linear_1.": "t_embedder.mlp.0.",
       "time_text_embed.timestep_embedder.linear_2.": "t_embedder.mlp.2.",
       "time_text_embed.text_embedder.linear_1.": "y_embedder.mlp.0.",
       "time_text_embed.text_embedder.linear_2.": "y_embedder.mlp.2.", "context_embedder.": "context_embedder.",
       "norm_out.linear.": "final_layer.adaLN_modulation.1.", "proj_out.": "final_layer.linear."}
TABLE = ("pos_embed.pos_embed", "pos_embed")  # the position table: ours, original (a bare tensor)
# inside block i: ours (after transformer_blocks.i.) -> original (after joint_blocks.i.)
BLOCK = {"attn.norm_q.": "x_block.attn.ln_q.", "attn.norm_k.": "x_block.attn.ln_k.",
         "attn.norm_added_q.": "context_block.attn.ln_q.", "attn.norm_added_k.": "context_block.attn.ln_k.",
         "attn.to_out.0.": "x_block.attn.proj.", "attn.to_add_out.": "context_block.attn.proj.",
         "attn2.norm_q.": "x_block.attn2.ln_q.", "attn2.norm_k.": "x_block.attn2.ln_k.",
         "attn2.to_out.0.": "x_block.attn2.proj.", "norm1.linear.": "x_block.adaLN_modulation.1.",
         "norm1_context.linear.": "context_block.adaLN_modulation.1.", "ff.net.0.proj.": "x_block.mlp.fc1.",
         "ff.net.2.": "x_block.mlp.fc2.", "ff_context.net.0.proj.": "context_block.mlp.fc1.",
         "ff_context.net.2.": "context_block.mlp.fc2."}
# the fused projections: original (after joint_blocks.i.) -> our three (after transformer_blocks.i.), in row order
FUSED = {"x_block.attn.qkv.": ("attn.to_q.", "attn.to_k.", "attn.to_v."),
         "context_block.attn.qkv.": ("attn.add_q_proj.", "attn.add_k_proj.", "attn.add_v_proj."),
         "x_block.attn2.qkv.": ("attn2.to_q.", "attn2.to_k.", "attn2.to_v.")}
_BLOCK_KEY = re.compile(r"(transformer_blocks|joint_blocks)\.(\d+)\.(.*)")


def swapped(cfg: MMDiTConfig) -> tuple[str, ...]:
    """Our names of the modulations whose halves the file stores the other way round (shift first)."""
    last = f"transformer_blocks.{cfg.num_layers - 1}.norm1_context.linear."
    return tuple(f"{m}{leaf}" for m in ("norm_out.linear.", last) for leaf in ("weight", "bias"))


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """[a; b] -> [b; a] along dim 0 (shift | scale <-> scale | shift), a new contiguous tensor."""
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first])


def _fused_part(name: str) -> tuple[str, int, str] | None:
    """For one of our q/k/v names: (the original fused key without PREFIX, its row block 0/1/2, the leaf); else None."""
    m = _BLOCK_KEY.fullmatch(name)
    if m is None:
        return None
    block, rest = m.group(2), m.group(3)
    for orig, ours in FUSED.items():
        for i, part in enumerate(ours):
            if rest.startswith(part):
                leaf = rest[len(part):]
                return f"joint_blocks.{block}.{orig}{leaf}", i, leaf
    return None


def _original_name(name: str) -> str:
    """One of our names that is not a q/k/v projection -> its original name (without PREFIX)."""
    if name == TABLE[0]:
        return TABLE[1]
    m = _BLOCK_KEY.fullmatch(name)
    rules, head, rest = (BLOCK, f"joint_blocks.{m.group(2)}.", m.group(3)) if m else (TOP, "", name)
    for ours, orig in rules.items():
        if rest.startswith(ours):
            return head + orig + rest[len(ours):]
    raise KeyError(f"no original MM-DiT name for {name!r}")


def to_original(state: dict[str, torch.Tensor], cfg: MMDiTConfig) -> dict[str, torch.Tensor]:
    """Our (diffusers') MM-DiT tensors -> the single file's (without PREFIX): q/k/v fused by rows, the
    AdaLayerNormContinuous halves swapped. The inverse of `from_original`; for writing test files, and for the
    shapes `MMDiTFileWeights` expects (on meta tensors)."""
    turned = swapped(cfg)
    out: dict[str, torch.Tensor] = {}
    rows: dict[str, list[torch.Tensor | None]] = {}  # fused key -> its three row blocks, in order
    for name, t in state.items():
        fused = _fused_part(name)
        if fused is not None:
            rows.setdefault(fused[0], [None, None, None])[fused[1]] = t
            out.setdefault(fused[0], t)  # a placeholder: keeps the state's order
        else:
            out[_original_name(name)] = swap_halves(t) if name in turned else t
    for key, parts in rows.items():
        if any(part is None for part in parts):
            raise KeyError(f"{key}: not all of its q, k, v projections are in the state")
        out[key] = torch.cat([part for part in parts if part is not None])
    return out


def from_original(state: dict[str, torch.Tensor], cfg: MMDiTConfig) -> dict[str, torch.Tensor]:
    """The single file's MM-DiT tensors (names without PREFIX) -> ours: each fused q/k/v split into three row
    blocks (views, no copy), the swapped modulations put back (copies), everything else renamed. Raises KeyError
    naming a tensor no rule covers."""
    with torch.device("meta"):
        names = list(MMDiT(cfg).state_dict())
    split: dict[str, list[str]] = {}  # fused key -> our three names, in row order
    renamed: dict[str, str] = {}  # original key -> ours
    for name in names:
        fused = _fused_part(name)
        if fused is not None:
            split.setdefault(fused[0], ["", "", ""])[fused[1]] = name
        else:
            renamed[_original_name(name)] = name
    turned = set(swapped(cfg))
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        if key in split:
            out.update(zip(split[key], t.chunk(3, dim=0)))  # [3D, ...] -> 3 × [D, ...]
        elif key in renamed:
            name = renamed[key]
            out[name] = swap_halves(t) if name in turned else t
        else:
            raise KeyError(f"no rule for the MM-DiT tensor {key!r}")
    return out


class MMDiTFileWeights(nn.Module):
    """The MM-DiT's tensors under a single file's names (without PREFIX), shapes and layout (fused q/k/v, halves
    swapped), derived from MMDiT(cfg) by `to_original`: what `load_strict` fills from the file, each key checked
    under the user's own names. It has no forward: `to_mmdit` turns it into the MMDiT that runs."""

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.cfg = cfg
        with torch.device("meta"):
            shapes = {k: t.shape for k, t in to_original(MMDiT(cfg).state_dict(), cfg).items()}
        for key, shape in shapes.items():
            *path, leaf = key.split(".")
            holder: nn.Module = self
            for part in path:
                if part not in holder._modules:
                    holder.add_module(part, nn.Module())
                holder = holder._modules[part]  # type: ignore[assignment]
            holder.register_parameter(leaf, nn.Parameter(torch.empty(shape), requires_grad=False))


def to_mmdit(weights: MMDiTFileWeights) -> MMDiT:
    """The loaded single-file tensors as an MMDiT (the same tensors, renamed; q/k/v views of the fused
    projections, the two swapped modulations copied), in eval mode without gradients."""
    if getattr(weights, "weights", None) is not None:  # a streaming loader attached a weight source
        raise UserError("an SD3 single file's transformer cannot be streamed (its fused q/k/v projections are split "
                        "when loaded): load it without streaming, or use the diffusers folder")
    state = from_original(dict(weights.state_dict()), weights.cfg)
    with torch.device("meta"):
        model = MMDiT(weights.cfg)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def _blocks(shapes, prefix: str, pattern: str) -> list[int]:
    rx = re.compile(rf"{re.escape(prefix)}joint_blocks\.(\d+)\.{pattern}")
    return sorted({int(m.group(1)) for k in shapes if (m := rx.match(k))})


def infer_config(shapes: dict[str, tuple], metadata: dict[str, str] | None = None,
                 prefix: str = PREFIX) -> MMDiTConfig:
    """The MM-DiT's sizes from a single file's tensor shapes (key -> shape, keys under `prefix`): blocks counted,
    the width, patch and channels from x_embedder, the text and pooled widths from context_embedder and
    y_embedder, the table's side from pos_embed, qk RMSNorm from ln_q (whose width is the head's), the dual
    attention blocks from x_block.attn2. The head width without qk norm and sample_size come from the metadata
    (`NOT_IN_SHAPES`) or are the releases' (64, 128). Raises KeyError naming the first key it needs that the file
    lacks, UserError for a layout that is not SD3's (the last block not `context_pre_only`)."""
    p = prefix
    layers = _blocks(shapes, p, "")
    if not layers or layers != list(range(len(layers))):
        raise UserError(f"SD3 single file: joint blocks {layers[:3]}... under {p}joint_blocks. are not 0..N-1: "
                        "not an SD3 / SD3.5 transformer")
    dim, channels, patch, _ = shapes[f"{p}x_embedder.proj.weight"]
    ln_q = f"{p}joint_blocks.0.x_block.attn.ln_q.weight"
    head = shapes[ln_q][0] if ln_q in shapes else HEAD_WIDTH
    meta = {f: json.loads(metadata[f"minidiffseg.transformer.{f}"])
            for f in NOT_IN_SHAPES if metadata and f"minidiffseg.transformer.{f}" in metadata}
    head = meta.pop("attention_head_dim", head)
    last = f"{p}joint_blocks.{len(layers) - 1}.context_block."
    caption, joint = shapes[f"{p}context_embedder.weight"]
    if f"{last}attn.proj.weight" in shapes or f"{last}mlp.fc1.weight" in shapes \
            or shapes[f"{last}adaLN_modulation.1.weight"][0] != 2 * caption:
        raise UserError("SD3 single file: its last joint block's context_block is complete, not `pre_only` (as "
                        "every SD3 / SD3.5 has it): not a transformer minidiffseg builds")
    cfg = MMDiTConfig(
        patch_size=patch, in_channels=channels, num_layers=len(layers), attention_head_dim=head,
        num_attention_heads=dim // head, joint_attention_dim=joint, caption_projection_dim=caption,
        pooled_projection_dim=shapes[f"{p}y_embedder.mlp.0.weight"][1],
        out_channels=shapes[f"{p}final_layer.linear.weight"][0] // patch ** 2,
        pos_embed_max_size=math.isqrt(shapes[f"{p}pos_embed"][1]),
        qk_norm="rms_norm" if ln_q in shapes else None,
        dual_attention_layers=tuple(_blocks(shapes, p, r"x_block\.attn2\.")))
    return replace(cfg, **meta)


def transformer_names(shapes: dict[str, tuple], cfg: MMDiTConfig,
                      prefix: str = PREFIX) -> tuple[dict[str, str], list[str]]:
    """Sort a single file's keys under `prefix`: ({file key: name in MMDiTFileWeights(cfg)}, keys under `prefix`
    that it does not hold); `cfg` is the file's (`infer_config`). Keys outside `prefix` (VAE, text encoders) are
    left to the caller. The names are the file's without the prefix: the file is loaded as it is and `to_mmdit`
    does the rest; a key MMDiTFileWeights expects and the file lacks is `load_strict`'s to report."""
    with torch.device("meta"):
        expected = set(to_original(MMDiT(cfg).state_dict(), cfg))
    names, unknown = {}, []
    for key in shapes:
        if key.startswith(prefix):
            if key[len(prefix):] in expected:
                names[key] = key[len(prefix):]
            else:
                unknown.append(key)
    return names, unknown


def config_metadata(cfg: MMDiTConfig) -> dict[str, str]:
    """The safetensors metadata that makes `infer_config` exact for sizes no shape tells (tiny test models)."""
    return {f"minidiffseg.transformer.{f}": json.dumps(getattr(cfg, f)) for f in NOT_IN_SHAPES}
