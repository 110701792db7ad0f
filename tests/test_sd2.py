"""SD2.x proven as SD1.5 is (docs/sd2.md §4): on identical random weights the U-Net (ε and every
attention-probability map, float32 attention included), the GELU text tower and the "!"-padding tokenizer
equal diffusers/transformers; full-size inventories equal the reference classes on meta; the single-file
rules (U-Net, VAE, OpenCLIP text tower) give exactly what diffusers' own converters give; loading both
layouts, the model's name, the mismatch and layout errors; and the score maps equal the independent
implementation of the official recipe (tests/test_segmenter.py) on the tiny SD2 in float64."""

import copy
import json
import shutil
from dataclasses import replace

import pytest
import torch

from assets import sample_image_paths
from minidiffseg.errors import UserError
from minidiffseg.sd import hub, ldm, load_sd, openclip
from minidiffseg.sd.attention import AttentionStore
from minidiffseg.sd.clip import CLIPTextModel
from minidiffseg.sd.config import CLIPTextConfig, UNetConfig, VAEConfig
from minidiffseg.sd.tokenizer import CLIPTokenizer
from minidiffseg.sd.unet import UNet
from reference_sd import MODELS, StoreEveryMap  # StoreEveryMap: diffusers processor keeping every probability map
from parity import rel_err
from tiny_sd import diffusers, encoder_state, randomise_, reference_vae, text_state, transformers
from tiny_sd2 import (SCHEDULER, TINY2, penultimate, reference_text, reference_unet, sd2_single_file_state,
                      tiny_reference2, write_sd2_tokenizer, write_tiny_sd2_diffusers, write_tiny_sd2_single_file)

from diffusers.loaders import single_file_utils as reference  # noqa: E402  (diffusers' single-file converters)

# stabilityai/stable-diffusion-2-1-base unet/config.json (hub), the fields minidiffseg reads
SD21_BASE_UNET = {"_class_name": "UNet2DConditionModel", "attention_head_dim": [5, 10, 20, 20],
                  "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 1024, "flip_sin_to_cos": True,
                  "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "norm_eps": 1e-05, "norm_num_groups": 32,
                  "num_attention_heads": None, "out_channels": 4, "sample_size": 64, "upcast_attention": False,
                  "use_linear_projection": True}
# ... and text_encoder/config.json (the OpenCLIP ViT-H/14 tower without its last layer)
SD21_TEXT = {"architectures": ["CLIPTextModel"], "bos_token_id": 0, "eos_token_id": 2, "hidden_act": "gelu",
             "hidden_size": 1024, "intermediate_size": 4096, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
             "model_type": "clip_text_model", "num_attention_heads": 16, "num_hidden_layers": 23, "pad_token_id": 1,
             "projection_dim": 512, "vocab_size": 49408}
FULL2 = (UNetConfig.from_diffusers(SD21_BASE_UNET), VAEConfig(), CLIPTextConfig.from_transformers(SD21_TEXT))
RES = 128  # the tiny SD2's sample_size 16 × 8


def reference_maps(unet) -> dict:
    """Set diffusers' `unet` to record its head-averaged probabilities, (B, N, T) per layer, into the dict returned."""
    maps = {}
    unet.set_attn_processor({n: StoreEveryMap(n.removesuffix(".processor"), maps) for n in unet.attn_processors})
    return maps


@pytest.fixture(scope="module")
def sd2_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_sd2")
    write_tiny_sd2_diffusers(folder)
    return write_tiny_sd2_diffusers(folder, variant="fp16")


@pytest.fixture(scope="module")
def sd2_file(tmp_path_factory):
    return write_tiny_sd2_single_file(tmp_path_factory.mktemp("tiny_sd2_file") / "v2-tiny.safetensors")


@pytest.fixture(scope="module")
def pair():
    ref = randomise_(reference_unet(TINY2[0]), seed=0)
    ours = UNet(TINY2[0]).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def test_configs_read_from_the_hub_files():
    unet, _, text = FULL2
    assert unet.num_heads == (5, 10, 20, 20) and unet.use_linear_projection and not unet.upcast_attention
    assert [unet.heads(i) * 64 for i in range(4)] == list(unet.block_out_channels)  # 64-channel heads
    assert UNetConfig.from_diffusers({**SD21_BASE_UNET, "upcast_attention": True, "sample_size": 96}).upcast_attention
    assert (text.hidden_size, text.num_attention_heads, text.num_hidden_layers, text.hidden_act) == (1024, 16, 23, "gelu")
    assert UNetConfig.heads(UNetConfig(), 3) == 8  # SD1.5: one count for every level
    assert FULL2 == MODELS["sd21-base"][0]  # the benchmark's random SD2.1-base has the hub's configs


# ---- parity on identical random weights --------------------------------------------------------------

def test_unet_eps_and_every_attention_probability_match_diffusers(pair):
    ref, ours = pair
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 24, 24, generator=g), torch.randn(2, 77, 48, generator=g)  # 24: not a power of 2
    maps = reference_maps(ref)
    names = {m.name for m in ours.attention_layers()}
    store = AttentionStore(probs=names)
    with torch.no_grad():
        e_ref = ref(x, 100, ctx).sample
        e_plain = ours(x, 100, ctx)
        e_ours = ours(x, 100, ctx, store=store)
    want = {name: m.mean(1) for name, m in maps.items()}  # (B, heads, N, T) -> (B, N, T)
    assert set(want) == names and len(names) == 32
    for e in (e_plain, e_ours):
        assert rel_err(e, e_ref) <= 1e-5, f"U-Net ε: max abs {(e - e_ref).abs().max():.3e}, rel {rel_err(e, e_ref):.3e}"
    for name in names:
        err = rel_err(store.prob_maps[name], want[name])
        assert err <= 1e-5, f"{name}: max abs {(store.prob_maps[name] - want[name]).abs().max():.3e}, rel {err:.3e}"
    heads = {n.removesuffix(".processor"): m.heads for n, m in ref.named_modules() if n.endswith(("attn1", "attn2"))}
    assert {m.name: m.heads for m in ours.attention_layers()} == heads  # 2, 2, 4, 4 per level, as diffusers


def test_upcast_attention_matches_diffusers_in_bfloat16(pair):
    """SD2.1 768-v computes QKᵀ and the softmax in float32: in bf16 our recorded probabilities equal
    diffusers' upcast path (measured: bit-identical); without our upcast they are 4e-2 away."""
    ref, ours = pair
    ref16, net = copy.deepcopy(ref).to(torch.bfloat16), copy.deepcopy(ours).to(torch.bfloat16)
    g = torch.Generator().manual_seed(2)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g).bfloat16(), torch.randn(1, 77, 48, generator=g).bfloat16()
    maps = reference_maps(ref16)
    with torch.no_grad():
        ref16(x, 100, ctx)
    want = {name: m.mean(1) for name, m in maps.items()}
    errors = {}
    for upcast in (True, False):
        for layer in net.attention_layers():
            layer.upcast = upcast
        store = AttentionStore(probs=set(want))
        with torch.no_grad():
            net(x, 100, ctx, store=store)
        errors[upcast] = max(rel_err(store.prob_maps[n].float(), want[n].float()) for n in want)
    assert errors[True] <= 1e-3, f"upcast: max rel {errors[True]:.3e} vs diffusers' upcast attention"
    assert errors[False] > 1e-2, f"without upcast the maps should differ (max rel {errors[False]:.3e})"


def test_text_tower_matches_transformers():
    _, _, cfg = TINY2
    ref = tiny_reference2(seed=4)[2]
    ours = CLIPTextModel(cfg).eval()
    ours.load_state_dict(text_state(ref), strict=True)
    quick = CLIPTextModel(replace(cfg, hidden_act="quick_gelu")).eval()
    quick.load_state_dict(text_state(ref), strict=True)
    ids = torch.randint(0, 49406, (3, 77), generator=torch.Generator().manual_seed(5))
    ids[:, 0] = 49406
    with torch.no_grad():
        want = ref(input_ids=ids).last_hidden_state
        got, got64, wrong = ours(ids), ours.double()(ids), quick(ids)
    assert rel_err(got, want) <= 1e-5, f"text tower fp32: max rel {rel_err(got, want):.3e}"
    assert rel_err(got64, want.double()) <= 1e-4, f"text tower fp64 vs fp32 reference: {rel_err(got64, want.double()):.3e}"
    assert rel_err(wrong, want) > 1e-3, "QuickGELU should not pass for the GELU tower: the test cannot fail"


PROMPTS = ["", "a photograph of a cat", "A  Photograph of   Potted-Plants??", "ünïcödé café ☕ 🐈",
           " ".join(["dog"] * 80), "<|endoftext|> inside", "a photography of fire hydrant and tv monitor"]


def test_tokenizer_pads_with_the_folders_token_like_transformers(tmp_path):
    folder = write_sd2_tokenizer(tmp_path / "tokenizer")
    ours = CLIPTokenizer.from_dir(folder)
    ref = transformers.CLIPTokenizer.from_pretrained(folder)
    want = ref(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert ours.pad_id == ref.pad_token_id == 0 and torch.equal(ours(PROMPTS), want)
    assert ours(["a cat"])[0, :6].tolist() == [49406, 320, 2368, 49407, 0, 0]  # BOS a cat EOS then "!"
    # a "!" in the text: transformers matches it as the (special) padding token, OpenCLIP's tokenizer, which
    # SD2.x was trained with, runs BPE over it as over any text; so do we (docs/sd2.md §2)
    bang = ["potted plants!!"]
    words = ours.encode("potted plants")
    assert ours.encode("!!") == [748] and ours(bang)[0, :len(words) + 3].tolist() == [49406, *words, 748, 49407]
    assert ref(bang[0]).input_ids == [49406, *words, 0, 0, 49407]
    (folder / "special_tokens_map.json").unlink()  # tokenizer_config.json alone says <|endoftext|>
    assert CLIPTokenizer.from_dir(folder).pad_id == 49407
    (folder / "tokenizer_config.json").unlink()  # nothing named: the caller's default (the text tower's)
    assert CLIPTokenizer.from_dir(folder).pad_id == 49407 and CLIPTokenizer.from_dir(folder, "!").pad_id == 0


def test_full_size_inventories_equal_the_references_on_meta():
    unet_cfg, _, text_cfg = FULL2
    with torch.device("meta"):
        ref_unet, ours_unet = reference_unet(unet_cfg), UNet(unet_cfg)
        ref_text, ours_text = reference_text(text_cfg), CLIPTextModel(text_cfg)
        holder = openclip.OpenCLIPTextWeights(text_cfg)
    for what, ref, ours in (("U-Net", ref_unet.state_dict(), ours_unet.state_dict()),
                            ("text encoder", text_state(ref_text), ours_text.state_dict())):
        want, got = {k: tuple(v.shape) for k, v in ref.items()}, {k: tuple(v.shape) for k, v in ours.items()}
        assert got == want, f"{what}: missing {sorted(want.keys() - got.keys())[:3]}, extra {sorted(got.keys() - want.keys())[:3]}"
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ours_unet) == count(ref_unet) == 865_910_724  # SD2.x U-Net
    assert count(ours_text) == count(ref_text) == 340_387_840  # 23 layers of the ViT-H/14 text tower
    assert count(holder) == count(ours_text)  # the OpenCLIP names hold the same tensors, q/k/v fused
    levels = sorted((m.level, m.kind, m.heads) for m in ours_unet.attention_layers())
    assert levels.count((1, "self", 5)) == 5 and levels.count((8, "cross", 20)) == 1 and len(levels) == 32


# ---- the single-file rules vs diffusers' converters -------------------------------------------------

def _ours_from_file(ldm_sd: dict, unet_cfg: UNetConfig, vae_cfg: VAEConfig) -> tuple[dict, dict, dict]:
    """Our rules applied to an SD2.x single file: (U-Net, VAE encoder, text encoder) under our names."""
    names, unknown = ldm.from_ldm(ldm_sd, unet_cfg, vae_cfg)
    assert unknown == []
    unet, vae = ({n: ldm_sd[k] for k, n in names[c].items()} for c in ("unet", "vae"))
    holder = {n: ldm_sd[k] for k, n in names["text_encoder"].items()}  # OpenCLIP's names
    return unet, vae, openclip.from_openclip(holder, openclip.layers_used(ldm_sd))


def _theirs_from_file(ldm_sd: dict, unet, vae, text_cfg: CLIPTextConfig) -> tuple[dict, dict, dict]:
    with torch.device("meta"):
        text = penultimate(reference_text(replace(text_cfg, num_hidden_layers=text_cfg.num_hidden_layers + 1)))
    return (reference.convert_ldm_unet_checkpoint(ldm_sd, unet.config),
            reference.convert_ldm_vae_checkpoint(ldm_sd, vae.config),
            reference.convert_open_clip_checkpoint(text, ldm_sd))


def _compare(ours: dict, theirs: dict, what: str, values: bool):
    missing, extra = sorted(theirs.keys() - ours.keys()), sorted(ours.keys() - theirs.keys())
    assert not missing and not extra, f"{what}: {len(missing)} missing e.g. {missing[:3]}, {len(extra)} extra e.g. {extra[:3]}"
    for k, t in theirs.items():
        assert ours[k].shape in (t.shape, (*t.shape, 1, 1)), f"{what} {k}: {tuple(ours[k].shape)} vs {tuple(t.shape)}"
        if values:
            got = ours[k].reshape(t.shape)
            assert torch.equal(got, t), f"{what} {k}: max abs {(got - t).abs().max():.3e}"


def _last_layer(theirs: dict, layers: int) -> dict:
    """diffusers' SD2 text converter drops only `resblocks.23` by name: at tiny size it keeps the file's last
    layer, which SD2.x never uses (the folder layout has none). Take it out, checking that it is that layer."""
    extra = {k for k in theirs if k.startswith(f"text_model.encoder.layers.{layers}.")}
    assert len(extra) == 16 or not extra, sorted(extra)
    return {k: v for k, v in theirs.items() if k not in extra}


@pytest.mark.parametrize("i, what", [(0, "U-Net"), (1, "VAE encoder"), (2, "text encoder")])
def test_tiny_single_file_rules_equal_diffusers_converters(i, what):
    unet, vae, _ = tiny_reference2(seed=0, text_layers=1)
    ldm_sd = sd2_single_file_state(seed=0)
    ours = _ours_from_file(ldm_sd, TINY2[0], TINY2[1])[i]
    theirs = _theirs_from_file(ldm_sd, unet, vae, TINY2[2])[i]
    if i == 1:
        theirs = {k: v for k, v in theirs.items() if k.startswith(("encoder.", "quant_conv."))}  # no decoder built
    if i == 2:
        theirs = _last_layer(theirs, TINY2[2].num_hidden_layers)
        assert set(ours) == set(text_state(penultimate(tiny_reference2(0, text_layers=1)[2])))
    _compare(ours, theirs, what, values=True)


@pytest.mark.parametrize("i, what", [(0, "U-Net"), (1, "VAE encoder"), (2, "text encoder")])
def test_full_size_single_file_rules_equal_diffusers_converters(i, what):
    """Full size on meta: SD2.x's single file (24 text resblocks, `text_projection`, `logit_scale`) through
    our rules and through diffusers' converters: the same names and shapes."""
    unet_cfg, vae_cfg, text_cfg = FULL2
    with torch.device("meta"):
        unet, vae = reference_unet(unet_cfg), reference_vae(vae_cfg)
        tower = reference_text(replace(text_cfg, num_hidden_layers=24))
    ldm_sd = ldm.to_ldm(unet.state_dict(), encoder_state(vae), {})
    ldm_sd.update({openclip.PREFIX + k: v for k, v in openclip.to_openclip(text_state(tower)).items()})
    ldm_sd[openclip.PREFIX + "text_projection"] = torch.empty(1024, 1024, device="meta")
    ldm_sd[openclip.PREFIX + "logit_scale"] = torch.empty((), device="meta")
    unet_inferred, vae_inferred, text_inferred = ldm.infer_configs({k: tuple(v.shape) for k, v in ldm_sd.items()})
    assert text_inferred == replace(text_cfg, projection_dim=CLIPTextConfig().projection_dim)  # unused by SD
    assert unet_inferred == replace(unet_cfg, upcast_attention=True)  # the original SD2 code's float32 attention
    ours = _ours_from_file(ldm_sd, unet_inferred, vae_inferred)[i]
    theirs = _theirs_from_file(ldm_sd, unet, vae, text_cfg)[i]
    if i == 1:
        theirs = {k: v for k, v in theirs.items() if k.startswith(("encoder.", "quant_conv."))}
    _compare(ours, theirs, what, values=False)
    assert len([k for k in ldm_sd if k.startswith(openclip.PREFIX)]) == 2 + 2 + 24 * 12 + 2  # 294 text tensors


def test_openclip_rules_round_trip():
    text = text_state(tiny_reference2(seed=6, text_layers=1)[2])
    fused = openclip.to_openclip(text)
    assert fused["transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 48, 48)
    back = openclip.from_openclip(fused, layers=3)
    assert back.keys() == text.keys() and all(torch.equal(back[k], text[k]) for k in text)
    with pytest.raises(KeyError, match="no rule for the OpenCLIP tensor 'visual.proj'"):
        openclip.from_openclip({**fused, "visual.proj": torch.zeros(1)}, layers=3)


# ---- loading both layouts ------------------------------------------------------------------------------

def test_load_sd_folder_fp16_variant_and_single_file(sd2_dir, sd2_file):
    unet, _, text = tiny_reference2(seed=0, text_layers=1)
    penultimate(text)
    ids = torch.tensor([[49406, 320, 2368, 49407] + [0] * 73])
    g = torch.Generator().manual_seed(7)
    x, ctx = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 48, generator=g)
    with torch.no_grad():
        want_text, want_eps = text(ids).last_hidden_state, unet(x, 100, ctx).sample
    for sd, bound in ((load_sd(sd2_dir), 1e-5), (load_sd(sd2_file), 1e-5), (load_sd(sd2_dir, variant="fp16"), 5e-3)):
        with torch.no_grad():
            got_text, got_eps = sd.text_encoder(ids), sd.unet(x, 100, ctx)
        assert rel_err(got_text, want_text) <= bound and rel_err(got_eps, want_eps) <= bound, \
            f"{sd.name}: text rel {rel_err(got_text, want_text):.3e}, ε rel {rel_err(got_eps, want_eps):.3e}"
        assert sd.tokenizer.pad_id == 0 and sd.resolution == RES
    folder, single = load_sd(sd2_dir), load_sd(sd2_file)
    assert folder.name == "SD2.x (128², v-prediction)" and folder.kind == "sd2-v"
    assert single.name.startswith("SD2.x (single file") and single.kind == "sd2"


def test_names_and_schedule_from_the_folder(sd2_dir, tmp_path):
    folder = shutil.copytree(sd2_dir, tmp_path / "base")
    config = folder / "unet" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "sample_size": 64}))
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({**SCHEDULER, "prediction_type": "epsilon"}))
    sd = load_sd(folder)
    assert sd.name == "SD2.x-base (512², ε-prediction)" and sd.kind == "sd2-base" and sd.resolution == 512
    betas = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")
    want = diffusers.DDPMScheduler(**{k: SCHEDULER[k] for k in betas}).alphas_cumprod
    assert torch.equal(sd.schedule.alphas_cumprod, want)  # SD2.x's schedule = SD1.5's, read from the config
    shutil.rmtree(folder / "scheduler")
    assert load_sd(folder).name == "SD2.x-base (512², prediction type unknown)"
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({**SCHEDULER, "beta_schedule": "linear"}))
    with pytest.raises(UserError, match=r"scheduler_config\.json has the 'linear' noise schedule"):
        load_sd(folder)


def test_streamed_sd2_equals_resident(sd2_dir, sd2_file):
    """stream=True: the folder's networks read block by block; a single file's text tower (split from OpenCLIP's
    fused projections when loaded) stays resident while its U-Net and VAE stream. Same outputs either way."""
    ids = torch.tensor([[49406, 320, 2368, 49407] + [0] * 73])
    g = torch.Generator().manual_seed(8)
    x, ctx = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 48, generator=g)
    for path in (sd2_dir, sd2_file):
        resident, streamed = load_sd(path), load_sd(path, stream=True)
        with torch.no_grad():
            assert torch.equal(resident.text_encoder(ids), streamed.text_encoder(ids)), path
            assert torch.equal(resident.unet(x, 100, ctx), streamed.unet(x, 100, ctx)), path
    weights = openclip.OpenCLIPTextWeights(TINY2[2])
    weights.weights = object()  # what a streaming loader would attach: the split needs the tensors themselves
    with pytest.raises(UserError, match="text encoder of an SD2.x single file cannot be streamed"):
        openclip.to_clip_text(weights)


def test_sd15_is_still_named_and_padded_as_before(tiny_sd_dir):
    sd = load_sd(tiny_sd_dir)
    assert sd.name == "SD1.5" and sd.kind == "sd1" and sd.tokenizer.pad_id == 49407 and sd.resolution == 512


def test_a_folder_mixing_sd2_and_sd15_networks_is_refused(sd2_dir, tiny_sd_dir, tmp_path):
    mixed = shutil.copytree(sd2_dir, tmp_path / "mixed")
    shutil.rmtree(mixed / "text_encoder")
    shutil.copytree(tiny_sd_dir / "text_encoder", mixed / "text_encoder")
    with pytest.raises(UserError, match=r"mixed: context width mismatch: the U-Net's cross-attention reads 48-wide "
                                        r"text \(SD1\.5: 768, SD2\.x: 1024, SDXL: 768 \+ 1280 = 2048\) but the text "
                                        r"encoder\(s\) give 32 \(text_encoder\)"):
        load_sd(mixed)
    other = shutil.copytree(tiny_sd_dir, tmp_path / "other")
    shutil.rmtree(other / "text_encoder")
    shutil.copytree(sd2_dir / "text_encoder", other / "text_encoder")
    with pytest.raises(UserError, match=r"reads 32-wide text .* give 48 \(text_encoder\): the checkpoint mixes the "
                                        r"networks of two"):
        load_sd(other)


def test_bad_sd2_single_files(sd2_file, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    tensors = load_file(sd2_file)
    with safe_open(str(sd2_file), "pt") as f:
        metadata = f.metadata()  # the tiny sizes no shape tells
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.ones(3),
               **{k: v for k, v in tensors.items() if not k.startswith("cond_stage_model.")}}, sdxl)
    with pytest.raises(UserError, match=r"sdxl\.safetensors: unknown checkpoint layout: no text encoder "
                                        r"\(conditioner\.embedders\.0\.transformer\.text_model\.…\) tensors, so not an "
                                        r"SDXL single file"):  # an SD2 U-Net beside one SDXL key: SDXL's towers missing
        load_sd(sdxl, tokenizer=sd2_file.parent / "tokenizer")
    key = openclip.PREFIX + "transformer.resblocks.1.attn.in_proj_bias"
    save_file({k: v for k, v in tensors.items() if k != key}, tmp_path / "cut.safetensors", metadata)
    with pytest.raises(UserError, match=r"cut\.safetensors: 1 text encoder tensor\(s\) missing: "
                                        r"transformer\.resblocks\.1\.attn\.in_proj_bias"):
        load_sd(tmp_path / "cut.safetensors", tokenizer=sd2_file.parent / "tokenizer")
    bad = {**tensors, key: torch.zeros(5)}
    save_file(bad, tmp_path / "shape.safetensors", metadata)
    with pytest.raises(UserError, match=rf"tensor {key} has shape \[5\] but the text encoder expects \[144\]"):
        load_sd(tmp_path / "shape.safetensors", tokenizer=sd2_file.parent / "tokenizer")


def test_inspect_weights_knows_both_sd2_layouts(sd2_dir, sd2_file, capsys):
    from minidiffseg.cli import main

    assert main(["inspect-weights", str(sd2_dir)]) == 0
    out = capsys.readouterr().out
    assert "diffusers SD2.x (128², v-prediction) folder" in out and "OK:" in out, out
    assert main(["inspect-weights", str(sd2_file)]) == 0
    out = capsys.readouterr().out
    assert "LDM single file (original layout): SD2.x (single file" in out, out
    assert "text encoder: 14 tensor(s) ignored by name" in out and "logit_scale" in out, out  # layer 2 + head


def test_segment_and_maps_say_which_model_ran(sd2_dir, tmp_path, capsys):
    from minidiffseg.cli import main

    image = sample_image_paths()[1]
    assert main(["segment", str(image), "--classes", "cat,sofa", "--weights", str(sd2_dir), "--out",
                 str(tmp_path / "out"), "--device", "cpu", "--dtype", "fp32"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[-1] == f"SD2.x (128², v-prediction) at 128²: 1 image(s) segmented into {tmp_path / 'out'}"
    assert not err and (tmp_path / "out" / f"{image.stem}_scores.safetensors").is_file()
    assert main(["maps", str(image), "--classes", "cat", "--weights", str(sd2_dir), "--out", str(tmp_path / "m.png"),
                 "--device", "cpu", "--resolution", "192"]) == 0
    assert "; SD2.x (128², v-prediction) at 192²" in capsys.readouterr().out and (tmp_path / "m.png").is_file()


def test_hub_knows_the_sd2_repos():
    assert hub.what_for("stabilityai/stable-diffusion-2-1-base") == "sd21-base" and hub.what_for("x/y") is None
    for what in ("sd21-base", "sd21", "sd-turbo"):
        files = hub.files(what)
        assert "tokenizer/special_tokens_map.json" in files and "scheduler/scheduler_config.json" in files
        assert "unet/diffusion_pytorch_model.fp16.safetensors" in files
    assert hub.REPOS["sd-turbo"].repo_id == "stabilityai/sd-turbo"
    from minidiffseg.cli.download import ALL

    assert ALL == ("sd15", "clip", "blip")  # `--what all` fetches what the default commands use, not every SD2


# ---- the method on SD2 -----------------------------------------------------------------------------------

def test_scores_equal_the_official_recipe_on_sd2_in_float64(sd2_dir):
    """The official recipe of tests/test_segmenter.py (OfficialRecipe), run by diffusers/transformers on the
    tiny SD2 (its "!" padding, GELU tower, linear projections, per-level heads). diffusers' upcast computes
    attention in float32 even in a float64 run (ours in float64): measured 2.3e-6, bound 2e-5."""
    from minidiffseg.method.segmenter import Segmenter
    from test_segmenter import OfficialRecipe

    image = sample_image_paths()[1]
    classes = ["cat", "fire hydrant"]
    noise = torch.randn(1, 4, RES // 8, RES // 8, generator=torch.Generator().manual_seed(3))
    seg = Segmenter.from_pretrained(sd2_dir, dtype=torch.float64)  # at the model's own size, 128²
    ours = seg(image, classes, posterior="mean", noise=noise).scores
    want = OfficialRecipe(sd2_dir)(image, classes, noise, res=RES)
    err = (ours - want).abs().max().item()
    assert seg.resolution == RES and ours.shape == want.shape and err <= 2e-5, \
        f"SD2 scores vs official recipe: max abs error {err:.3e}"


def test_explore_runs_on_sd2(sd2_dir):
    """The exploration library (minidiffseg explore) runs on SD2: its segmentation is the Segmenter's."""
    from minidiffseg.explorer.state import Exploration
    from minidiffseg.method.segmenter import Segmenter

    seg = Segmenter.from_pretrained(sd2_dir)
    image = sample_image_paths()[1]
    explored = Exploration.run(seg, image, ["cat", "sofa"], seed=3)
    assert torch.equal(explored.result.scores, seg(image, ["cat", "sofa"], seed=3).scores)
    assert explored.token_labels[0][:7] == ["<start>", "a", "photograph", "of", "cat", "<end>", "<pad>"]
