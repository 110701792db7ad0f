"""SD3 / SD3.5's MM-DiT (minidiffseg/sd3/mmdit.py) against diffusers' SD3Transformer2DModel on identical random
weights, loaded by the project's strict loader from files diffusers' `save_pretrained` wrote: the velocity in float64
and float32, the position table's centre crop at non-square latents, every attention map (the head-averaged softmax
over all joint tokens, from diffusers' own q/k), the one-latent broadcast; streamed weights bit-equal to resident
ones; the full-size inventories of SD3-medium, SD3.5-medium and SD3.5-large on the meta device; the single-file
names (sd3/ldm.py) against diffusers' convert_sd3_transformer_checkpoint_to_diffusers. Two tiny configs:
MMDiTConfig.tiny() (SD3: no qk norm) and tiny_35() (qk RMSNorm, block 0 with the dual attention)."""

from __future__ import annotations

import copy
import json
from contextlib import contextmanager
from dataclasses import replace
from unittest import mock

import pytest
import torch
from safetensors.torch import save_file

from assets import require
from minidiffseg.errors import UserError
from minidiffseg.sd.attention import AttentionStore
from minidiffseg.sd.loading import build_on_meta, load_strict, read_header
from minidiffseg.sd.stream import blocks, stream_weights
from minidiffseg.sd3 import ldm
from minidiffseg.sd3.config import MMDiTConfig
from minidiffseg.sd3.mmdit import MMDiT, PatchEmbed

diffusers = require("diffusers")  # the reference MM-DiT and single-file converter (test-only)
from diffusers.loaders import single_file_utils  # noqa: E402
from diffusers.models import attention_processor, normalization  # noqa: E402
from parity import errors  # noqa: E402
from tiny_mmdit import config_dict, reference_mmdit, write_tiny_transformer  # noqa: E402

CONFIGS = {"sd3": MMDiTConfig.tiny(), "sd3.5": MMDiTConfig.tiny_35()}
FULL = {"sd3-medium": MMDiTConfig.sd3_medium(), "sd3.5-medium": MMDiTConfig.sd35_medium(),
        "sd3.5-large": MMDiTConfig.sd35_large()}
CPU = torch.device("cpu")
HW = (12, 20)  # the latent's side: not square, 6×10 tokens cropped from the middle of the 96² table


@pytest.fixture(scope="module", params=list(CONFIGS), ids=list(CONFIGS))
def pair(request, tmp_path_factory):
    """(cfg, diffusers' model in float32, the folder it saved, ours loaded from that file by load_strict)."""
    cfg = CONFIGS[request.param]
    ref = reference_mmdit(cfg, seed=0)
    folder = write_tiny_transformer(tmp_path_factory.mktemp(f"mmdit-{request.param}"), cfg, seed=0)
    ours = load_folder(folder, cfg, torch.float32)
    return cfg, ref, folder, ours


def weights_file(folder):
    return folder / "diffusion_pytorch_model.safetensors"


def load_folder(folder, cfg: MMDiTConfig, dtype: torch.dtype) -> MMDiT:
    shapes, _ = read_header(weights_file(folder))
    return load_strict(build_on_meta(MMDiT, cfg), weights_file(folder), {k: k for k in shapes}, dtype, CPU,
                       "transformer")


def inputs(cfg: MMDiTConfig, b: int = 2, hw: tuple[int, int] = HW, text: int = 7, seed: int = 1,
           dtype: torch.dtype = torch.float32):
    """latent (b, C, h, w), timesteps (b,) as 1000·σ, text states (b, T, joint), pooled (b, P)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, cfg.in_channels, *hw, generator=g).to(dtype),
            torch.tensor([515.3, 61.0, 430.0][:b]).to(dtype),
            torch.randn(b, text, cfg.joint_attention_dim, generator=g).to(dtype),
            torch.randn(b, cfg.pooled_projection_dim, generator=g).to(dtype))


def check(got, want, what, bound):
    abs_err, rel = errors(got, want)
    print(f"{what}: max abs {abs_err:.3e}, max rel {rel:.3e}")
    assert got.shape == want.shape and rel <= bound, \
        f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}, max abs {abs_err:.3e}, max rel {rel:.3e}"


@contextmanager
def wide_rms_norm():
    """diffusers' RMSNorm computes its mean square in float32 even for float64 inputs (an error of ~1e-8 in a float64
    run); ours in at least float32 (the input's dtype when wider). Inside, the reference does as ours, so a float64
    comparison of SD3.5 is exact to float64 rounding."""
    def forward(self, x):
        wide = torch.promote_types(x.dtype, torch.float32)
        y = x.to(wide) * torch.rsqrt(x.to(wide).pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight
    with mock.patch.object(normalization.RMSNorm, "forward", forward):
        yield


def reference_velocity(ref, z, t, states, pooled):
    with torch.no_grad():
        return ref(z, states, pooled, t).sample


def test_velocity_matches_diffusers_float64(pair):
    cfg, ref, folder, _ = pair
    ref64, ours64 = copy.deepcopy(ref).double(), load_folder(folder, cfg, torch.float64)  # the file converted at load
    z, t, states, pooled = inputs(cfg, dtype=torch.float64)
    with torch.no_grad():
        got = ours64(z, t, states, pooled)
        other = ours64(z, t + 100, states, pooled)
    with wide_rms_norm():
        want = reference_velocity(ref64, z, t, states, pooled)
    check(got, want, f"{cfg.qk_norm or 'no qk norm'}: velocity (float64)", 1e-12)
    check(got, reference_velocity(ref64, z, t, states, pooled), "velocity (float64) vs diffusers' own RMSNorm", 1e-7)
    assert got.std() > 0.3 and errors(other, got)[1] > 1e-3, "the output is flat or ignores the timestep"


def test_velocity_matches_diffusers_float32(pair):
    cfg, ref, _, ours = pair
    z, t, states, pooled = inputs(cfg, b=3)
    with torch.no_grad():
        got = ours(z, t, states, pooled)
    check(got, reference_velocity(ref, z, t, states, pooled), "velocity (float32)", 1e-5)


@pytest.mark.parametrize("hw", [(16, 16), (16, 6), (2, 14)], ids=["whole-table", "crop-tall", "crop-wide"])
def test_position_table_centre_crop(pair, hw):
    """A table of 8² tokens: a 16×16 latent takes it whole, smaller and non-square ones its centre (rounded up-left
    as diffusers' cropped_pos_embed: (8 - 3)//2 = 2 columns left of a 3-token-wide grid); a latent over 16 or with
    an odd side is refused."""
    cfg, ref, _, _ = pair
    small = replace(cfg, pos_embed_max_size=8)
    ref_small = reference_mmdit(small, seed=3)
    ours = MMDiT(small).eval()
    ours.load_state_dict(ref_small.state_dict(), strict=True)
    z, t, states, pooled = inputs(small, hw=hw)
    with torch.no_grad():
        check(ours.pos_embed(z), ref_small.pos_embed(z), f"patch + position embedding {hw}", 1e-6)
        want = reference_velocity(ref_small, z, t, states, pooled)
        check(ours(z, t, states, pooled), want, f"velocity at {hw}", 1e-5)
    for bad in ((18, 16), (16, 7)):
        with pytest.raises(ValueError, match="multiples of its patch size 2 and at most 16"):
            ours(torch.zeros(1, small.in_channels, *bad), 0, states, pooled)


class ProbabilityStore:
    """A store that wants every layer and records the head-averaged softmax(q kᵀ/√d) over all its keys, from the
    q, k it is given: (B, N_img + T, N_img + T) for a joint attention, (B, N_img, N_img) for attn2."""

    def __init__(self):
        self.maps, self.image_tokens, self.kinds = {}, {}, {}
        self.latent_hw = None

    def wants(self, layer):
        return True

    def attend(self, layer, q, k, v, image_tokens=None):
        p = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)  # (B, h, Nq, Nk)
        self.maps[layer.name] = p.mean(1)
        self.image_tokens[layer.name], self.kinds[layer.name] = image_tokens, layer.kind
        return p @ v


@contextmanager
def diffusers_maps(ref):
    """Inside, every attention processor of diffusers' `ref` records its head-averaged probabilities, computed from
    the q, k its own JointAttnProcessor2_0 hands to SDPA (which is replaced by the explicit softmax for the call)."""
    maps: dict[str, torch.Tensor] = {}

    class Recording:
        def __init__(self, name, inner):
            self.name, self.inner = name, inner

        def __call__(self, attn, *args, **kwargs):
            def explicit(q, k, v, **options):
                assert not options.get("attn_mask") and not options.get("is_causal") and options.get("scale") is None
                p = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
                maps[self.name] = p.mean(1)
                return p @ v
            with mock.patch.object(attention_processor.F, "scaled_dot_product_attention", explicit):
                return self.inner(attn, *args, **kwargs)

    old = ref.attn_processors
    ref.set_attn_processor({n: Recording(n.removesuffix(".processor"), p) for n, p in old.items()})
    try:
        yield maps
    finally:
        ref.set_attn_processor(old)


def test_every_attention_map_matches_diffusers(pair):
    """Every joint attention's map over all N_img + T tokens (image first), the last block's included (its text
    queries too), and every attn2's over the image tokens: equal to diffusers' from its own q/k (float64)."""
    cfg, ref, folder, _ = pair
    ref64, ours64 = copy.deepcopy(ref).double(), load_folder(folder, cfg, torch.float64)
    z, t, states, pooled = inputs(cfg, dtype=torch.float64)
    store = ProbabilityStore()
    with torch.no_grad(), wide_rms_norm(), diffusers_maps(ref64) as maps:
        want = ref64(z, states, pooled, t).sample
        got = ours64(z, t, states, pooled, store=store)
    n, text = (HW[0] // 2) * (HW[1] // 2), states.shape[1]
    names = [m.name for m in ours64.attention_layers()]
    assert names == list(maps) == list(store.maps)  # the same layers, in execution order
    assert len(names) == cfg.num_layers + len(cfg.dual_attention_layers)
    assert store.latent_hw == HW
    for name in names:
        joint = name.endswith(".attn")
        assert store.kinds[name] == ("joint" if joint else "self")
        assert store.image_tokens[name] == (n if joint else None)
        assert store.maps[name].shape == (2, n + text, n + text) if joint else (2, n, n)
        check(store.maps[name], maps[name], f"{name} probabilities", 1e-12)
    check(got, want, "velocity on the explicit (recording) path", 1e-12)


def test_attention_store_records_the_image_rows(pair):
    """With the project's AttentionStore (sd/attention.py): a joint attention's `probs` are the image rows × text
    columns of diffusers' full map, an attn2's its whole map; the grids are the latent's over the patch size."""
    cfg, ref, folder, _ = pair
    ref64, ours64 = copy.deepcopy(ref).double(), load_folder(folder, cfg, torch.float64)
    z, t, states, pooled = inputs(cfg, dtype=torch.float64)
    store = AttentionStore(probs={m.name for m in ours64.attention_layers()})
    with torch.no_grad(), wide_rms_norm(), diffusers_maps(ref64) as maps:
        ref64(z, states, pooled, t)
        ours64(z, t, states, pooled, store=store)
    n = (HW[0] // 2) * (HW[1] // 2)
    for m in ours64.attention_layers():
        want = maps[m.name][:, :n, n:] if m.kind == "joint" else maps[m.name]
        check(store.prob_maps[m.name], want, f"{m.name} recorded probabilities", 1e-12)
        assert store.shapes[m.name] == (HW[0] // 2, HW[1] // 2) and m.level == 2 and m.heads == 4


def test_one_latent_for_many_prompts(pair):
    """A (1, C, h, w) latent and a number for t with 3 prompts: the velocity of the latent repeated 3 times."""
    cfg, ref, _, ours = pair
    z, _, states, pooled = inputs(cfg, b=3)
    with torch.no_grad():
        got = ours(z[:1], 430.0, states, pooled)
        want = reference_velocity(ref, z[:1].expand(3, -1, -1, -1), torch.full((3,), 430.0), states, pooled)
    check(got, want, "velocity from one latent", 1e-5)


def test_output_false_reads_attention_only(pair):
    cfg, _, _, ours = pair
    z, t, states, pooled = inputs(cfg)
    store = ProbabilityStore()
    with torch.no_grad():
        assert ours(z, t, states, pooled, store=store, output=False) is None
    assert len(store.maps) == len(ours.attention_layers())


def test_streamed_equals_resident(pair):
    """Streamed from the same file (sd/stream.py, each joint block fetched whole, the position table with the patch
    conv): bit-equal to the resident model, in float32 (the file's dtype) and bfloat16 (converted)."""
    cfg, _, folder, _ = pair
    shapes, _ = read_header(weights_file(folder))
    z, t, states, pooled = inputs(cfg)
    for dtype in (torch.float32, torch.bfloat16):
        resident = load_folder(folder, cfg, dtype)
        streamed = stream_weights(build_on_meta(MMDiT, cfg), weights_file(folder), {k: k for k in shapes}, dtype, CPU,
                                  "transformer")
        with torch.no_grad():
            want = resident(z.to(dtype), t, states.to(dtype), pooled.to(dtype))
            got = streamed(z.to(dtype), t, states.to(dtype), pooled.to(dtype))
        assert want.isfinite().all() and torch.equal(got, want), \
            f"{dtype}: streamed vs resident max abs {(got.double() - want.double()).abs().max():.3g}"
    kinds = [type(b).__name__ for b in blocks(streamed)]
    assert kinds.count("JointTransformerBlock") == cfg.num_layers and "PatchEmbed" in kinds


@pytest.mark.parametrize("name", list(FULL))
def test_full_size_inventory_equals_diffusers_on_meta(name):
    """Every name and shape of the state dict (the position table included) equal to diffusers' model built on meta
    from the same config; the parameter counts printed (ours hold the table as a parameter, diffusers as a buffer)."""
    cfg = FULL[name]
    with torch.device("meta"):
        ref = diffusers.SD3Transformer2DModel(**config_dict(cfg))
        ours = MMDiT(cfg)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got.keys() == want.keys(), \
        f"missing {sorted(want.keys() - got.keys())[:5]}, extra {sorted(got.keys() - want.keys())[:5]}"
    assert got == want, [(k, got[k], want[k]) for k in want if got[k] != want[k]][:5]
    table = ours.pos_embed.pos_embed.numel()
    params = sum(p.numel() for p in ours.parameters())
    assert params - table == sum(p.numel() for p in ref.parameters())
    print(f"{name}: {params - table:,} parameters + a {cfg.pos_embed_max_size}² × {cfg.inner_dim} position table "
          f"({table:,}) = {params:,} tensors' elements")
    expected = {"sd3-medium": 2_028_328_000, "sd3.5-medium": 2_243_171_520, "sd3.5-large": 8_056_627_520}
    assert params - table == expected[name]
    assert len(ours.attention_layers("joint")) == cfg.num_layers
    assert len(ours.attention_layers("self")) == len(cfg.dual_attention_layers)
    largest = max(sum(p.numel() for p in b.parameters()) for b in blocks(ours))
    owned = [p for b in blocks(ours) for p in b.parameters()]
    assert len(owned) == len({id(p) for p in owned}) == len(list(ours.parameters()))  # each in one block
    print(f"{name}: largest streamed block {largest:,} elements")


def test_config_from_diffusers(pair):
    cfg, ref, folder, _ = pair
    saved = json.loads((folder / "config.json").read_text())
    assert "_class_name" in saved and MMDiTConfig.from_diffusers(saved) == cfg
    assert MMDiTConfig.from_diffusers(json.loads(json.dumps(dict(ref.config)))) == cfg
    large = {k: v for k, v in config_dict(MMDiTConfig.sd35_large()).items() if k != "dual_attention_layers"}
    assert MMDiTConfig.from_diffusers(large) == MMDiTConfig.sd35_large()  # its config.json has no such key
    for change, what in (({"qk_norm": "layer_norm"}, "qk_norm"), ({"caption_projection_dim": 48}, "caption"),
                         ({"dual_attention_layers": [3]}, "dual_attention_layers"),
                         ({"pos_embed_max_size": None}, "pos_embed_max_size")):
        with pytest.raises(UserError, match=what) as refused:
            MMDiTConfig.from_diffusers({**saved, **change})
        assert "\n" not in str(refused.value) and "SD3 transformer config" in str(refused.value)


# --- single files -------------------------------------------------------------------------------------------------

def original_layout(sd: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """diffusers' names -> the original MM-DiT's (under model.diffusion_model.), written here as the inverse of
    convert_sd3_transformer_checkpoint_to_diffusers, independently of sd3/ldm.py: fused q/k/v, the two
    AdaLayerNormContinuous modulations with shift first."""
    def swap(t):
        a, b = t.chunk(2)
        return torch.cat([b, a])

    out = {"pos_embed": sd["pos_embed.pos_embed"]}
    for leaf in ("weight", "bias"):
        out[f"x_embedder.proj.{leaf}"] = sd[f"pos_embed.proj.{leaf}"]
        for ours, orig in (("timestep_embedder", "t_embedder"), ("text_embedder", "y_embedder")):
            out[f"{orig}.mlp.0.{leaf}"] = sd[f"time_text_embed.{ours}.linear_1.{leaf}"]
            out[f"{orig}.mlp.2.{leaf}"] = sd[f"time_text_embed.{ours}.linear_2.{leaf}"]
        out[f"context_embedder.{leaf}"] = sd[f"context_embedder.{leaf}"]
        out[f"final_layer.linear.{leaf}"] = sd[f"proj_out.{leaf}"]
        out[f"final_layer.adaLN_modulation.1.{leaf}"] = swap(sd[f"norm_out.linear.{leaf}"])
        for i in range(layers):
            d, o = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
            pairs = {"attn.to_out.0": "x_block.attn.proj", "norm1.linear": "x_block.adaLN_modulation.1",
                     "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
                     "attn.to_add_out": "context_block.attn.proj", "ff_context.net.0.proj": "context_block.mlp.fc1",
                     "ff_context.net.2": "context_block.mlp.fc2", "attn2.to_out.0": "x_block.attn2.proj"}
            for ours, orig in pairs.items():
                if f"{d}{ours}.{leaf}" in sd:
                    out[f"{o}{orig}.{leaf}"] = sd[f"{d}{ours}.{leaf}"]
            context = sd[f"{d}norm1_context.linear.{leaf}"]
            out[f"{o}context_block.adaLN_modulation.1.{leaf}"] = swap(context) if i == layers - 1 else context
            for attn, block, q, k, v in (("attn", "x_block.attn", "to_q", "to_k", "to_v"),
                                         ("attn", "context_block.attn", "add_q_proj", "add_k_proj", "add_v_proj"),
                                         ("attn2", "x_block.attn2", "to_q", "to_k", "to_v")):
                if f"{d}{attn}.{q}.{leaf}" in sd:
                    out[f"{o}{block}.qkv.{leaf}"] = torch.cat([sd[f"{d}{attn}.{p}.{leaf}"] for p in (q, k, v)])
    for i in range(layers):
        d, o = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        for ours, orig in (("attn.norm_q", "x_block.attn.ln_q"), ("attn.norm_k", "x_block.attn.ln_k"),
                           ("attn.norm_added_q", "context_block.attn.ln_q"),
                           ("attn.norm_added_k", "context_block.attn.ln_k"),
                           ("attn2.norm_q", "x_block.attn2.ln_q"), ("attn2.norm_k", "x_block.attn2.ln_k")):
            if f"{d}{ours}.weight" in sd:
                out[f"{o}{orig}.weight"] = sd[f"{d}{ours}.weight"]
    assert len(out) == len(sd) - sum(".to_q." in k or ".to_k." in k or ".add_q_proj." in k or ".add_k_proj." in k
                                     for k in sd)  # 3 projections -> 1 fused tensor
    return {ldm.PREFIX + k: v for k, v in out.items()}


def same_tensors(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), \
        f"{what}: missing {sorted(want.keys() - got.keys())[:3]}, extra {sorted(got.keys() - want.keys())[:3]}"
    wrong = [k for k in want if not torch.equal(got[k], want[k])]
    assert not wrong, f"{what}: tensors differ: {wrong[:3]}"


def test_single_file_rules_equal_diffusers_converter(pair):
    """Diffusers' converter takes the original layout back to its state dict exactly (so the layout above is the
    one it reads); our to_original writes that layout; our from_original reads it back; the shapes (and the
    metadata for what they do not tell) give back the config."""
    cfg, ref, _, _ = pair
    sd = ref.state_dict()
    original = original_layout(sd, cfg.num_layers)
    same_tensors(single_file_utils.convert_sd3_transformer_checkpoint_to_diffusers(dict(original)), sd,
                 "diffusers' converter on the original layout")
    same_tensors({ldm.PREFIX + k: v for k, v in ldm.to_original(sd, cfg).items()}, original, "our to_original")
    bare = {k.removeprefix(ldm.PREFIX): v for k, v in original.items()}
    same_tensors(ldm.from_original(bare, cfg), sd, "our from_original")
    shapes = {k: tuple(v.shape) for k, v in original.items()}
    assert ldm.infer_config(shapes, ldm.config_metadata(cfg)) == cfg
    if cfg.qk_norm:  # the head width is ln_q's: only sample_size is not in the shapes
        assert ldm.infer_config(shapes) == replace(cfg, sample_size=128)
    names, unknown = ldm.transformer_names({**shapes, "first_stage_model.encoder.conv_in.weight": (1,),
                                            f"{ldm.PREFIX}joint_blocks.0.x_block.extra": (1,)}, cfg)
    assert unknown == [f"{ldm.PREFIX}joint_blocks.0.x_block.extra"]
    assert names == {k: k[len(ldm.PREFIX):] for k in shapes}


def test_single_file_loads_strictly(pair, tmp_path):
    """An original-layout file (and a VAE tensor beside it, not the transformer's) through load_strict into
    MMDiTFileWeights, then to_mmdit: diffusers' velocity (float64); q/k/v are views of the fused tensors. A missing
    tensor is one UserError line naming the file's own key (without its prefix); such a transformer refuses
    streaming."""
    cfg, ref, _, _ = pair
    original = original_layout(ref.state_dict(), cfg.num_layers)
    path = tmp_path / "sd3-tiny.safetensors"
    save_file({**{k: v.contiguous() for k, v in original.items()}, "first_stage_model.encoder.conv_in.bias":
               torch.zeros(4)}, path, metadata={"format": "pt", **ldm.config_metadata(cfg)})
    shapes, metadata = read_header(path)
    found = ldm.infer_config(shapes, metadata)
    assert found == cfg
    names, unknown = ldm.transformer_names(shapes, found)
    assert unknown == [] and "first_stage_model.encoder.conv_in.bias" not in names
    weights = load_strict(build_on_meta(ldm.MMDiTFileWeights, found), path, names, torch.float64, CPU, "transformer")
    ours = ldm.to_mmdit(weights)
    block = ours.transformer_blocks[0].attn
    fused = weights.get_parameter("joint_blocks.0.x_block.attn.qkv.weight")
    assert block.to_k.weight.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    z, t, states, pooled = inputs(cfg, dtype=torch.float64)
    with torch.no_grad(), wide_rms_norm():
        check(ours(z, t, states, pooled), reference_velocity(copy.deepcopy(ref).double(), z, t, states, pooled),
              "velocity from the single file (float64)", 1e-12)
    key = f"{ldm.PREFIX}joint_blocks.1.context_block.attn.qkv.weight"
    with pytest.raises(UserError, match=f"missing: {key.removeprefix(ldm.PREFIX).replace('.', '[.]')};") as refused:
        load_strict(build_on_meta(ldm.MMDiTFileWeights, found), path, {k: n for k, n in names.items() if k != key},
                    torch.float32, CPU, "transformer")
    assert "\n" not in str(refused.value)
    streamed = stream_weights(build_on_meta(ldm.MMDiTFileWeights, found), path, names, torch.float32, CPU,
                              "transformer")
    with pytest.raises(UserError, match="cannot be streamed"):
        ldm.to_mmdit(streamed)


@pytest.mark.parametrize("name", list(FULL))
def test_full_size_single_file_on_meta(name):
    """The full-size models in the original layout (meta tensors): diffusers' converter gives back every name and
    shape of its model; the shapes alone give back the config (sample_size 128 and 64-channel heads being every
    release's); the rules leave no key unknown."""
    cfg = FULL[name]
    with torch.device("meta"):
        sd = MMDiT(cfg).state_dict()
        original = {ldm.PREFIX + k: v for k, v in ldm.to_original(sd, cfg).items()}
        back = single_file_utils.convert_sd3_transformer_checkpoint_to_diffusers(dict(original))
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in sd.items()}
    shapes = {k: tuple(v.shape) for k, v in original.items()}
    assert ldm.infer_config(shapes) == cfg
    assert ldm.transformer_names(shapes, cfg)[1] == []
    assert shapes[f"{ldm.PREFIX}joint_blocks.0.x_block.attn.qkv.weight"] == (3 * cfg.inner_dim, cfg.inner_dim)


def test_a_file_that_is_not_sd3_is_refused():
    cfg = MMDiTConfig.tiny()
    with torch.device("meta"):
        shapes = {ldm.PREFIX + k: tuple(v.shape) for k, v in ldm.to_original(MMDiT(cfg).state_dict(), cfg).items()}
    last = f"{ldm.PREFIX}joint_blocks.{cfg.num_layers - 1}.context_block."
    complete = {**shapes, f"{last}attn.proj.weight": (32, 32), f"{last}adaLN_modulation.1.weight": (6 * 32, 32)}
    with pytest.raises(UserError, match="pre_only"):
        ldm.infer_config(complete)
    with pytest.raises(UserError, match="not 0..N-1"):
        ldm.infer_config({k: v for k, v in shapes.items() if ".joint_blocks.1." not in k})


def test_patch_embed_holds_the_table_as_a_parameter():
    """The table is loaded (every checkpoint stores it: diffusers' buffer is persistent) and streamed with the patch
    conv: a parameter of pos_embed without gradient, and no buffer anywhere (the streamed source fills parameters
    only, and a buffer no file holds would stay on meta)."""
    embed = PatchEmbed(MMDiTConfig.tiny())
    assert dict(embed.named_parameters()).keys() == {"pos_embed", "proj.weight", "proj.bias"}
    assert not embed.pos_embed.requires_grad
    assert not list(MMDiT(MMDiTConfig.tiny_35()).buffers())
