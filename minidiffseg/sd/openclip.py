"""The OpenCLIP text tower as the original single files of SD2.x (docs/sd2.md §3) and SDXL store it, and the
rules that turn it into our CLIPTextModel / CLIPTextModelWithProjection (transformers' names, the layout of the
diffusers folders).

An SD2.x single file (v2-1_512-ema-pruned.safetensors, ...) holds the whole OpenCLIP ViT-H/14 text tower
under `cond_stage_model.model.`, in OpenCLIP's names: 24 `transformer.resblocks.N` with a fused
query/key/value projection `attn.in_proj_weight` [3C, C] (+ `in_proj_bias` [3C]), `ln_1`, `ln_2`,
`mlp.c_fc`, `mlp.c_proj`; `token_embedding.weight`, `positional_embedding` [77, C] (a bare tensor),
`ln_final`; and CLIP's contrastive head `text_projection`, `logit_scale`. SD2.x conditions on the
*penultimate* layer followed by `ln_final` (stablediffusion's FrozenOpenCLIPEmbedder, layer
"penultimate"): the last resblock and the contrastive head are never used, and the diffusers folders
store exactly the first 23 layers. So from a file with L resblocks we build L-1 layers and ignore the
last one by name.

A name is not enough to translate the fused projection: its rows [0:C], [C:2C], [2C:3C] are q_proj,
k_proj and v_proj. So the file is first loaded, strictly and under its own names, into
`OpenCLIPTextWeights` (a module with OpenCLIP's names and shapes and no forward), and `to_clip_text`
then hands its tensors to a CLIPTextModel (SDXL: `OpenCLIPTextWeightsWithProjection`,
`to_clip_text_with_projection`, a CLIPTextModelWithProjection): renamed by prefix rules generated per layer,
the fused projections split into three views (no copy).

    ours (text_model.…)                              OpenCLIP (under SD2's or SDXL's prefix)
    embeddings.token_embedding.weight                token_embedding.weight
    embeddings.position_embedding.weight             positional_embedding
    encoder.layers.i.layer_norm1 / layer_norm2       transformer.resblocks.i.ln_1 / ln_2
    encoder.layers.i.self_attn.{q,k,v}_proj          transformer.resblocks.i.attn.in_proj_{weight,bias} rows
    encoder.layers.i.self_attn.out_proj              transformer.resblocks.i.attn.out_proj
    encoder.layers.i.mlp.fc1 / fc2                   transformer.resblocks.i.mlp.c_fc / c_proj
    final_layer_norm                                 ln_final
    text_projection.weight [P, W] (no text_model.)   text_projection [W, P], transposed (SDXL only)

SDXL's single file (sd_xl_base_1.0.safetensors) holds its second text tower, OpenCLIP ViT-bigG/14 (32
resblocks, 1280 wide), in the same names under `conditioner.embedders.1.model.` (sgm's FrozenOpenCLIPEmbedder2;
diffusers' single-file loader converts it with convert_open_clip_checkpoint under that prefix). SDXL reads
the penultimate layer *and* the pooled embedding, which needs the last layer, `ln_final` and the projection:
so every resblock is built, `text_projection` is kept and only `logit_scale` (and an `attn_mask` buffer, if
saved) is ignored. OpenCLIP applies the projection as `x @ text_projection` ([W, P]); a Linear holds its
transpose ([P, W]), which `from_openclip` copies into that layout (one 1280² tensor: the same bits as a folder's). `OpenCLIPTower` says which of the two layouts
(`SD2`, `SDXL`) a function reads; SD2's is the default everywhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError
from .clip import CLIPTextModel, CLIPTextModelWithProjection
from .config import CLIPTextConfig
from .names import rename


@dataclass(frozen=True)
class OpenCLIPTower:
    """Where a single file keeps an OpenCLIP text tower, and what of it the model uses."""

    prefix: str  # of every key of the tower in the file
    penultimate: bool  # built without the last resblock (SD2.x: the folders' 23 of 24 layers), else all of them
    projection: bool  # `text_projection` kept (SDXL's pooled embedding), else ignored
    what: str  # the network, in messages

    def holds(self, keys) -> bool:
        """Whether a file's `keys` have this tower (its token table)."""
        return f"{self.prefix}token_embedding.weight" in keys


# SD2.x (stablediffusion's FrozenOpenCLIPEmbedder, layer "penultimate"); SDXL's second text encoder, the
# conditioner's embedder 1 after CLIP-L's embedder 0 (diffusers' single-file detection keys `open_clip_sdxl`:
# conditioner.embedders.1.model.positional_embedding, `clip_sdxl`: conditioner.embedders.0.transformer.…)
SD2 = OpenCLIPTower("cond_stage_model.model.", penultimate=True, projection=False,
                    what="the text encoder of an SD2.x single file")
SDXL = OpenCLIPTower("conditioner.embedders.1.model.", penultimate=False, projection=True,
                     what="the second text encoder of an SDXL single file")
PREFIX = SD2.prefix
HEAD_WIDTH = 64  # OpenCLIP's text towers use 64-channel heads: ViT-H/14's is 1024 wide with 16, bigG/14's 1280 with 20
LAYER = {"layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.", "self_attn.out_proj.": "attn.out_proj.",
         "mlp.fc1.": "mlp.c_fc.", "mlp.fc2.": "mlp.c_proj."}  # inside layer i: ours -> OpenCLIP
FUSED = ("q_proj", "k_proj", "v_proj")  # the row blocks of attn.in_proj_weight / in_proj_bias, in order
POSITIONS = ("text_model.embeddings.position_embedding.weight", "positional_embedding")
PROJECTION = ("text_projection.weight", "text_projection")  # [P, W] ours = the transpose of OpenCLIP's [W, P]
# keys of the file's text tower that SD2.x never uses (besides the last resblock, see `ignored`); SDXL keeps the first
UNUSED = ("text_projection", "logit_scale", "attn_mask")  # CLIP's contrastive head; a causal-mask buffer if saved


def rules(layers: int) -> dict[str, str]:
    """Prefix pairs ours -> OpenCLIP (without PREFIX) for `layers` layers; the fused q/k/v and the
    position table (a bare tensor, no prefix to match) are handled by name in `from_openclip`."""
    out = {"text_model.embeddings.token_embedding.": "token_embedding.", "text_model.final_layer_norm.": "ln_final."}
    for i in range(layers):
        out.update({f"text_model.encoder.layers.{i}.{a}": f"transformer.resblocks.{i}.{b}" for a, b in LAYER.items()})
    return out


def from_openclip(state: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """OpenCLIP text-tower tensors (names without the tower's prefix) -> our CLIPTextModel's (with
    `text_projection`: CLIPTextModelWithProjection's) names; the fused projections split into q/k/v (views) and
    text_projection transposed (a contiguous copy). Raises KeyError naming a tensor no rule covers."""
    inverse = {b: a for a, b in rules(layers).items()}
    out = {}
    for key, t in state.items():
        fused = re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", key)
        if key == POSITIONS[1]:
            out[POSITIONS[0]] = t
        elif key == PROJECTION[1]:
            # [W, P] -> [P, W], copied into a Linear weight's layout (1280² floats): a transposed view would send the
            # product down another GEMM path, and the pooled embedding would differ from the folder's in the last bits
            out[PROJECTION[0]] = t.t().contiguous()
        elif fused:
            i, leaf = fused.groups()
            for proj, rows in zip(FUSED, t.chunk(3)):  # [3C, ...] -> 3 × [C, ...]
                out[f"text_model.encoder.layers.{i}.self_attn.{proj}.{leaf}"] = rows
        elif (name := rename(key, inverse)) is not None:
            out[name] = t
        else:
            raise KeyError(f"no rule for the OpenCLIP tensor {key!r}")
    return out


def to_openclip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our CLIPTextModel's (or CLIPTextModelWithProjection's) tensors -> OpenCLIP's names (without a prefix),
    q/k/v fused and text_projection transposed ([W, P], contiguous, as a file stores it): the inverse of
    `from_openclip`, for writing test files."""
    layers = len({m.group(1) for k in state if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))})
    table = rules(layers)
    out = {}
    for key, t in state.items():
        proj = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv]_proj)\.(weight|bias)", key)
        if key == POSITIONS[0]:
            out[POSITIONS[1]] = t
        elif key == PROJECTION[0]:
            out[PROJECTION[1]] = t.t().contiguous()
        elif proj:
            i, _, leaf = proj.groups()
            if proj.group(2) == "q_proj":
                parts = [state[f"text_model.encoder.layers.{i}.self_attn.{p}.{leaf}"] for p in FUSED]
                out[f"transformer.resblocks.{i}.attn.in_proj_{leaf}"] = torch.cat(parts)
        elif (name := rename(key, table)) is not None:
            out[name] = t
        else:
            raise KeyError(f"no OpenCLIP name for {key!r}: not a CLIP text-tower parameter")
    return out


class ResidualAttentionBlock(nn.Module):
    """One OpenCLIP text layer's parameters, under OpenCLIP's names (nn.MultiheadAttention is what holds
    `in_proj_weight`, `in_proj_bias` and `out_proj` there). Never run: see OpenCLIPTextWeights."""

    def __init__(self, width: int, heads: int, mlp_width: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.ModuleDict({"c_fc": nn.Linear(width, mlp_width), "c_proj": nn.Linear(mlp_width, width)})


class Transformer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size)
            for _ in range(cfg.num_hidden_layers))


class OpenCLIPTextWeights(nn.Module):
    """The parameters SD2.x uses of an OpenCLIP text tower, with the file's names and shapes: what
    `load_strict` fills from a single file (every check under the names the user's file has). It has
    no forward: `to_clip_text` turns it into the CLIPTextModel that runs. `cfg.num_hidden_layers`
    resblocks (`infer_text_config` says how many a file's model uses)."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.max_position_embeddings, cfg.hidden_size))
        self.transformer = Transformer(cfg)
        self.ln_final = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class OpenCLIPTextWeightsWithProjection(OpenCLIPTextWeights):
    """SDXL's bigG tower under the file's names: OpenCLIPTextWeights and `text_projection` [W, P], as OpenCLIP
    stores it; `to_clip_text_with_projection` turns it into the CLIPTextModelWithProjection that runs."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__(cfg)
        self.text_projection = nn.Parameter(torch.empty(cfg.hidden_size, cfg.projection_dim))


def _as(cls, weights: OpenCLIPTextWeights, tower: OpenCLIPTower):
    """The loaded OpenCLIP tensors in a `cls` (same tensors, renamed; views), in eval mode without gradients."""
    if getattr(weights, "weights", None) is not None:  # a streaming loader attached a weight source
        raise UserError(f"{tower.what} cannot be streamed (its fused q/k/v projections are split when loaded): "
                        "load it without streaming, or use the diffusers folder")
    state = from_openclip(weights.state_dict(), weights.cfg.num_hidden_layers)
    with torch.device("meta"):
        model = cls(weights.cfg)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def to_clip_text(weights: OpenCLIPTextWeights) -> CLIPTextModel:
    """SD2.x's loaded OpenCLIP tensors as our CLIPTextModel (same tensors, renamed; q/k/v are views of the
    fused projection), in eval mode without gradients."""
    return _as(CLIPTextModel, weights, SD2)


def to_clip_text_with_projection(weights: OpenCLIPTextWeightsWithProjection) -> CLIPTextModelWithProjection:
    """SDXL's loaded bigG tensors as our CLIPTextModelWithProjection (same tensors, renamed; q/k/v are views:
    row blocks of the fused projection; text_projection.weight the transpose of [W, P], copied contiguous)."""
    return _as(CLIPTextModelWithProjection, weights, SDXL)


def _resblock(tower: OpenCLIPTower) -> re.Pattern:
    return re.compile(rf"{re.escape(tower.prefix)}transformer\.resblocks\.(\d+)\.")


def ignored(keys, layers: int, tower: OpenCLIPTower = SD2) -> list[str]:
    """The file's text-tower keys the model never uses: the resblocks from `layers` on (SD2.x: the last one
    of 24, the text encoder being its penultimate layer; SDXL: none) and the contrastive head (SDXL keeps
    `text_projection`)."""
    last = _resblock(tower)
    unused = {tower.prefix + u for u in UNUSED if not (tower.projection and u == PROJECTION[1])}
    return [k for k in keys if k in unused or ((m := last.match(k)) is not None and int(m.group(1)) >= layers)]


def layers_used(keys, tower: OpenCLIPTower = SD2) -> int:
    """How many layers the model uses of the text tower in a file's `keys`: all resblocks but the last for
    SD2.x, all of them for SDXL."""
    rx = _resblock(tower)
    return len({m.group(1) for k in keys if (m := rx.match(k))}) - (1 if tower.penultimate else 0)


def infer_text_config(shapes: dict[str, tuple], tower: OpenCLIPTower = SD2) -> CLIPTextConfig:
    """The text tower's sizes from a single file's tensor shapes. What shapes don't tell is that of OpenCLIP's
    ViT-H/14 (SD2.x) and ViT-bigG/14 (SDXL) alike: 64-channel heads, GELU, LayerNorm eps 1e-5 (ldm.infer_configs
    lets a file's metadata say otherwise). SD2.x: one layer fewer than the file holds (the penultimate layer,
    see the module docstring); SDXL: every layer, and `projection_dim` from text_projection [W, P].
    Raises KeyError naming the first key it needs that the file lacks."""
    p = tower.prefix
    vocab, width = shapes[f"{p}token_embedding.weight"]
    projection = {"projection_dim": shapes[f"{p}{PROJECTION[1]}"][1]} if tower.projection else {}
    return CLIPTextConfig(
        vocab_size=vocab, hidden_size=width, intermediate_size=shapes[f"{p}transformer.resblocks.0.mlp.c_fc.weight"][0],
        num_hidden_layers=layers_used(shapes, tower), num_attention_heads=max(width // HEAD_WIDTH, 1),
        max_position_embeddings=shapes[f"{p}positional_embedding"][0], hidden_act="gelu", **projection)
