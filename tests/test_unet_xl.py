"""SDXL's U-Net against diffusers' UNet2DConditionModel on identical random weights: ε and every attention
probability with the "text_time" embedding (pooled text + 6 size numbers), the one-latent broadcast, the errors
for missing inputs and for config values not built; the LDM single-file names against diffusers' own converter;
the full-size inventory on the meta device. Two tiny configs: diffusers' own tiny SDXL test U-Net
(UNetConfig.tiny_xl, 2 levels) and SDXL's 3-level shape with a different depth at each attention level."""

import json

import pytest
import torch

from assets import require
from minidiffseg.errors import UserError
from minidiffseg.sd import ldm
from minidiffseg.sd.attention import AttentionStore
from minidiffseg.sd.config import UNetConfig, VAEConfig
from minidiffseg.sd.stream import blocks
from minidiffseg.sd.unet import UNet

require("diffusers")  # the reference U-Net and single-file converter (test-only)
from diffusers.loaders import single_file_utils as reference  # noqa: E402
from parity import errors  # noqa: E402
from reference_sd import StoreEveryMap  # noqa: E402
from reference_sdxl import reference_unet_xl  # noqa: E402
from tiny_sd import randomise_  # noqa: E402

DOWN = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
UP = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
# SDXL's layout at tiny widths: no attention at level 0, a downsampler after an attention level, depths 2 and 3
# at the two attention levels (and 3 in the mid block), so a reversed or shifted depth list would show
SDXL_SHAPED = UNetConfig(block_out_channels=(8, 16, 32), num_heads=(2, 4, 8), cross_attention_dim=24,
                         use_linear_projection=True, sample_size=16, norm_num_groups=4, down_block_types=DOWN,
                         up_block_types=UP, transformer_layers_per_block=(1, 2, 3), addition_embed_type="text_time",
                         addition_time_embed_dim=4, projection_class_embeddings_input_dim=6 * 4 + 16)
CONFIGS = {"diffusers-tiny-xl": UNetConfig.tiny_xl(), "sdxl-shaped": SDXL_SHAPED}

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (/work/shared/BACKBONES.md A1), its fields that matter
SDXL_CONFIG_JSON = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280], "center_input_sample": False, "class_embed_type": None,
    "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_dim": 2048,
    "cross_attention_norm": None, "down_block_types": list(DOWN), "downsample_padding": 1,
    "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None, "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05,
    "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
    "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "sample_size": 128,
    "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": list(UP), "upcast_attention": None, "use_linear_projection": True}
SDXL_BASE = UNetConfig(block_out_channels=(320, 640, 1280), num_heads=(5, 10, 20), cross_attention_dim=2048,
                       use_linear_projection=True, sample_size=128, down_block_types=DOWN, up_block_types=UP,
                       transformer_layers_per_block=(1, 2, 10), addition_embed_type="text_time",
                       addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)


@pytest.fixture(scope="module", params=list(CONFIGS), ids=list(CONFIGS))
def pair(request):
    cfg = CONFIGS[request.param]
    ref = randomise_(reference_unet_xl(cfg), seed=0)
    ours = UNet(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return cfg, ref, ours


@pytest.fixture(scope="module")
def full():
    """(diffusers' SDXL base U-Net built from its config.json, ours from UNetConfig.from_diffusers), on meta."""
    import diffusers

    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel.from_config(SDXL_CONFIG_JSON)
        return ref, UNet(UNetConfig.from_diffusers(SDXL_CONFIG_JSON))


def pooled_width(cfg: UNetConfig) -> int:
    return cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim


def inputs(cfg, b=2, hw=16, seed=1):
    """latents (b, 4, hw, hw), context (b, 77, C), pooled text (b, P), time ids (b, 6): original size, crop, target."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([[8 * hw, 8 * hw, 0, 0, 8 * hw, 8 * hw], [600, 800, 16, 48, 8 * hw, 8 * hw]] * b)[:b].float()
    return (torch.randn(b, 4, hw, hw, generator=g), torch.randn(b, 77, cfg.cross_attention_dim, generator=g),
            torch.randn(b, pooled_width(cfg), generator=g), ids)


def check(got, want, what, bound=1e-5):
    abs_err, rel = errors(got, want)
    assert got.shape == want.shape and rel <= bound, \
        f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}, max abs {abs_err:.3e}, max rel {rel:.3e}"


def test_eps_matches_diffusers(pair):
    cfg, ref, ours = pair
    x, ctx, pooled, ids = inputs(cfg, b=3)
    with torch.no_grad():
        want = ref(x, 100, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        got = ours(x, 100, ctx, text_embeds=pooled, time_ids=ids)
        other = ours(x, 100, ctx, text_embeds=pooled, time_ids=ids + 64)
    check(got, want, "SDXL U-Net ε")
    assert errors(other, want)[1] > 1e-3, "the time ids change nothing: the additional embedding is not used"


def transformer_blocks(cfg: UNetConfig) -> int:
    """BasicTransformerBlocks of a U-Net: layers_per_block per down level with attention, layers_per_block + 1 per
    up level with attention, the mid block's, each as deep as its level says."""
    n, last = cfg.layers_per_block, len(cfg.block_out_channels) - 1
    return (sum(n * cfg.depth(i) for i, a in enumerate(cfg.down_attention) if a) + cfg.depth(last)
            + sum((n + 1) * cfg.depth(last - i) for i, a in enumerate(cfg.up_attention) if a))


def test_every_attention_probability_matches_diffusers(pair):
    cfg, ref, ours = pair
    x, ctx, pooled, ids = inputs(cfg, hw=24)  # not a power of two: levels are factors, not pixel sizes
    maps = {}
    ref.set_attn_processor({n: StoreEveryMap(n.removesuffix(".processor"), maps) for n in ref.attn_processors})
    names = {m.name for m in ours.attention_layers()}
    store = AttentionStore(probs=names)
    with torch.no_grad():
        e_ref = ref(x, 100, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        e_ours = ours(x, 100, ctx, store=store, text_embeds=pooled, time_ids=ids)
    assert set(maps) == names and len(names) == 2 * transformer_blocks(cfg)
    for name in sorted(names):
        check(store.prob_maps[name], maps[name].mean(1), name)  # (B, heads, N, T) -> head mean (B, N, T)
    check(e_ours, e_ref, "ε on the explicit (recording) path")
    heads = {n.removesuffix(".processor"): ref.get_submodule(n.removesuffix(".processor")).heads
             for n in ref.attn_processors}
    assert {m.name: m.heads for m in ours.attention_layers()} == heads
    levels = {m.name: m.level for m in ours.attention_layers()}
    assert 1 not in levels.values(), "SDXL has no attention at the latent's own grid"
    for name, (h, w) in store.shapes.items():
        assert (h * levels[name], w * levels[name]) == (24, 24) and store.prob_maps[name].shape[1] == h * w, name


def test_one_latent_for_many_prompts_equals_the_expanded_batch(pair):
    """latents (1, …) and time ids (1, 6) with B prompts and B pooled texts: ε and the cross maps equal diffusers'
    (and our own) pass on the latent and the time ids repeated B times."""
    cfg, ref, ours = pair
    x, ctx, pooled, ids = inputs(cfg, b=3)
    x, ids = x[:1], ids[:1]
    cross = {m.name for m in ours.attention_layers("cross")}
    w = torch.zeros(3, 77, 1)
    w[:, 4, 0] = 1.0
    one, full_batch = (AttentionStore(cross=cross, token_weights=w) for _ in range(2))
    with torch.no_grad():
        want = ref(x.expand(3, -1, -1, -1), 100, ctx,
                   added_cond_kwargs={"text_embeds": pooled, "time_ids": ids.expand(3, -1)}).sample
        got = ours(x, 100, ctx, store=one, text_embeds=pooled, time_ids=ids)
        ours(x.expand(3, -1, -1, -1), 100, ctx, store=full_batch, text_embeds=pooled, time_ids=ids.expand(3, -1))
    check(got, want, "ε from one latent")
    for name in cross:  # maps of ~0.02 at most (77 tokens): the kernels of another batch size round differently,
        check(one.cross_maps[name], full_batch.cross_maps[name], name, bound=1e-4)  # max abs 4e-7 measured


def test_missing_or_unwanted_additional_inputs_are_clear_errors(pair):
    cfg, _, ours = pair
    x, ctx, pooled, ids = inputs(cfg)
    for given, missing in (({"time_ids": ids}, "text_embeds not given"),
                           ({"text_embeds": pooled}, "time_ids not given"), ({}, "text_embeds and time_ids not given")):
        with pytest.raises(ValueError, match=f"addition_embed_type 'text_time'.*{missing}"):
            ours(x, 100, ctx, **given)
    with pytest.raises(ValueError, match=r"expected B or 1 rows each and \d+ features together"):
        ours(x, 100, ctx, text_embeds=pooled[:, 1:], time_ids=ids)  # one pooled feature short
    with pytest.raises(ValueError, match="B or 1 rows"):
        ours(x, 100, ctx, text_embeds=pooled, time_ids=torch.cat([ids, ids[:1]]))  # 2 texts, 3 time-id rows
    sd15 = UNet(UNetConfig.tiny())
    with pytest.raises(ValueError, match="without SDXL's additional embedding"):
        sd15(x, 100, torch.randn(2, 77, 32), text_embeds=pooled, time_ids=ids)


def test_config_json_gives_the_config(pair):
    cfg, ref, _ = pair
    assert UNetConfig.from_diffusers(json.loads(json.dumps(dict(ref.config)))) == cfg
    assert UNetConfig.from_diffusers(SDXL_CONFIG_JSON) == SDXL_BASE  # its "upcast_attention": null is False


@pytest.mark.parametrize("change", [
    {"class_embed_type": "projection"}, {"addition_embed_type": "text"}, {"mid_block_type": None},
    {"reverse_transformer_layers_per_block": [[10, 10, 10], [2, 2, 2], [1, 1, 1]]},
    {"down_block_types": ["DownBlock2D", "SimpleCrossAttnDownBlock2D", "CrossAttnDownBlock2D"]},
    {"up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"]}, {"transformer_layers_per_block": [1, 2]},
    {"layers_per_block": [2, 2, 2]}, {"time_cond_proj_dim": 256}, {"addition_time_embed_dim": None}],
    ids=lambda change: next(iter(change)))
def test_config_values_not_built_are_refused(change):
    with pytest.raises(UserError) as refused:
        UNetConfig.from_diffusers({**SDXL_CONFIG_JSON, **change})
    message = str(refused.value)
    assert "\n" not in message and "minidiffseg" in message and ("U-Net config" in message), message


def test_full_size_inventory_equals_diffusers_on_meta(full):
    """SDXL base: every name and shape equal to diffusers' U-Net built from the hub's config.json; 2,567,463,684
    parameters (both); 140 attention layers at levels 2 and 4 only, heads of 64 channels."""
    ref, ours = full
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got.keys() == want.keys(), \
        f"missing {sorted(want.keys() - got.keys())[:5]}, extra {sorted(got.keys() - want.keys())[:5]}"
    bad = [k for k in want if want[k] != got[k]]
    assert not bad, f"shape mismatch: {[(k, got[k], want[k]) for k in bad[:5]]}"
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in ref.parameters()) == 2_567_463_684, count
    layers = ours.attention_layers()
    assert len(layers) == 140 == 2 * transformer_blocks(ours.cfg)
    assert {m.level for m in layers} == {2, 4}
    assert all(m.heads * 64 == ours.cfg.block_out_channels[m.level.bit_length() - 1] for m in layers)
    assert sum(m.level == 2 for m in layers) == 20  # down_blocks.1 (2 × 2 blocks) and up_blocks.1 (3 × 2), × 2 kinds


def test_full_size_streaming_grain(full):
    """Streamed, an SDXL transformer is fetched one BasicTransformerBlock at a time (a whole 10-deep one holds
    ~350 M parameters): the blocks cover each parameter once and none is larger than SD1.5's largest (34.8 M)."""
    _, ours = full
    owner: dict[int, torch.nn.Module] = {}
    for b in blocks(ours):
        for p in b.parameters():
            assert id(p) not in owner, f"a parameter in two blocks: {type(owner[id(p)]).__name__}, {type(b).__name__}"
            owner[id(p)] = b
    assert len(owner) == len(list(ours.parameters()))
    largest = max(sum(p.numel() for p in b.parameters()) for b in blocks(ours))
    assert largest <= 34_760_960, f"the largest SDXL U-Net block holds {largest:,} parameters"
    assert UNet.stream_blocks == UNet(UNetConfig.tiny()).stream_blocks  # SD1.5/SD2.x: whole transformers, as before


def unet_metadata(cfg: UNetConfig) -> dict[str, str]:
    """The safetensors metadata with the fields no shape tells (what ldm.config_metadata writes for the U-Net)."""
    return {f"minidiffseg.unet.{f}": json.dumps(getattr(cfg, f)) for f in ldm.NOT_IN_SHAPES["unet"]}


def test_single_file_names_equal_diffusers_converter(pair):
    """Our state dict -> our LDM rules -> diffusers' convert_ldm_unet_checkpoint gives back every diffusers name
    with the same tensor; the shapes give back the config; from_ldm inverts to_ldm."""
    cfg, ref, _ = pair
    sd = ref.state_dict()
    ldm_sd = ldm.to_ldm(sd, {}, {})
    assert all(k.startswith(ldm.UNET) for k in ldm_sd) and len(ldm_sd) == len(sd)
    assert ldm_sd[f"{ldm.UNET}label_emb.0.0.weight"] is sd["add_embedding.linear_1.weight"]
    back = reference.convert_ldm_unet_checkpoint(ldm_sd, ref.config)
    assert back.keys() == sd.keys(), \
        f"missing {sorted(sd.keys() - back.keys())[:3]}, extra {sorted(back.keys() - sd.keys())[:3]}"
    wrong = [k for k in sd if not torch.equal(back[k], sd[k])]
    assert not wrong, f"tensors differ: {wrong[:3]}"
    shapes = {k: tuple(v.shape) for k, v in ldm_sd.items()}
    assert ldm.infer_unet_config(shapes, unet_metadata(cfg)) == cfg
    names, unknown = ldm.from_ldm(ldm_sd, cfg, VAEConfig())
    assert unknown == [] and sorted(names["unet"].values()) == sorted(sd)
    assert all(ldm_sd[k] is sd[n] for k, n in names["unet"].items())


def test_full_size_single_file_on_meta(full):
    """SDXL base in the LDM layout: diffusers' converter maps our names back; with no metadata at all the shapes
    give SDXL base's config (heads of 64 channels, no float32 attention, 128² latents, 256-wide time ids)."""
    ref, ours = full
    ldm_sd = ldm.to_ldm(ours.state_dict(), {}, {})
    back = reference.convert_ldm_unet_checkpoint(ldm_sd, ref.config)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in back.items()} == want
    shapes = {k: tuple(v.shape) for k, v in ldm_sd.items()}
    assert ldm.infer_unet_config(shapes) == SDXL_BASE
    u = ldm.UNET
    assert shapes[f"{u}label_emb.0.0.weight"] == (1280, 2816) and shapes[f"{u}label_emb.0.2.weight"] == (1280, 1280)
    assert not any(k.startswith((f"{u}input_blocks.1.1.", f"{u}input_blocks.2.1.")) for k in shapes)  # level 0
    assert f"{u}input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight" in shapes  # 10 deep at level 2
    assert f"{u}output_blocks.2.2.conv.weight" in shapes and f"{u}output_blocks.5.2.conv.weight" in shapes  # upsamplers
    assert not any(k.startswith(f"{u}output_blocks.8.1.") for k in shapes)  # up_blocks.2: no attention, no upsampler


@pytest.mark.parametrize("cfg", [SDXL_BASE, *CONFIGS.values()], ids=["sdxl-base", *CONFIGS])
def test_rules_are_one_to_one(cfg):
    rules = ldm.unet_rules(len(cfg.block_out_channels), cfg.layers_per_block, cfg.down_attention, cfg.up_attention,
                           text_time=True)
    assert len(set(rules.values())) == len(rules)
    prefixes = sorted(rules.values())  # no LDM prefix may contain another: one rule per key
    assert not any(b.startswith(a) for a, b in zip(prefixes, prefixes[1:]))


def test_sd15_single_file_rules_unchanged():
    """The default placement (no block types given) is SD1.5's: the same rules as from SD1.5's config, no label_emb."""
    cfg = UNetConfig()
    rules = ldm.unet_rules(4, 2)
    assert rules == ldm.unet_rules(4, 2, cfg.down_attention, cfg.up_attention, False)
    assert not any("label_emb" in v for v in rules.values())
    assert cfg.down_attention == (True, True, True, False) and cfg.up_attention == (False, True, True, True)
