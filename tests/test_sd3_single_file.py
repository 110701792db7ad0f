"""SD3 / SD3.5 as one .safetensors file (minidiffseg/sd3/single_file.py): a tiny SD3 written both as a diffusers
folder and as an official single file from the same random weights. Proven here: our rules give what diffusers'
own single-file converters give, network by network and tensor by tensor; the file loads the folder's networks bit
for bit (the same text conditioning, the same scores, streamed or not); the bad files are one line each.

The single file is written as Stability AI's are: the MM-DiT under model.diffusion_model. in its original names
(fused q/k/v, the final modulations' halves swapped: sd3/ldm.py `to_original`), the VAE's encoder under
first_stage_model. in LDM's names (sd/ldm.py `to_ldm`; no quant conv) with a decoder that is ignored, CLIP-L and
CLIP-G in transformers' names under text_encoders.clip_l/clip_g.transformer. (CLIP-L without a projection, with a
position_ids buffer), T5 under text_encoders.t5xxl.transformer. (its tied embedding under both of transformers' names). The tiny sizes no shape tells go into the file's metadata.

The tiny towers differ from tests/tiny_sd3.py's where SD3's single file needs it: CLIP-L's projection is the
identity (what diffusers' single-file loader gives it, and what the file implies: sd3/single_file.py), so its
pooled width is its width (16); CLIP-G is 32 wide (diffusers tells the two towers apart by their width); the
transformer's pooled input is 16 + 32 = 48 and its text width 16 + 32 = 48, T5's too.
"""

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from assets import sample_image_paths, write_sd15_tokenizer
from minidiffseg.errors import UserError
from minidiffseg.method.segmenter import Segmenter
from minidiffseg.sd import ldm, load_sd
from minidiffseg.sd3 import ldm as mmdit_ldm
from minidiffseg.sd3.checkpoint import load_sd3
from minidiffseg.sd3.single_file import PREFIXES, CLIPTextModelWithIdentityProjection
from reference_sd import reference_vae
from tiny_mmdit import reference_mmdit
from tiny_sd import diffusers, encoder_state, randomise_, transformers
from tiny_sd2 import write_sd2_tokenizer
from tiny_sd3 import SCHEDULER, T5, TEXT_G, TEXT_L, TRANSFORMER, TRANSFORMER_35, VAE
from tiny_t5 import reference_encoder, write_tokenizer_3

L, G = 16, 32  # the towers' widths
CFG = dataclasses.replace(TRANSFORMER, joint_attention_dim=L + G, pooled_projection_dim=L + G)
CFG_35 = dataclasses.replace(TRANSFORMER_35, joint_attention_dim=L + G, pooled_projection_dim=L + G)
TEXT_CONFIGS = {"text_encoder": dict(TEXT_L, hidden_size=L, projection_dim=L),
                "text_encoder_2": dict(TEXT_G, hidden_size=G, projection_dim=G)}
T5_CFG = dataclasses.replace(T5, d_model=L + G)
CLIP_L, CLIP_G, T5XXL = PREFIXES["text_encoder"], PREFIXES["text_encoder_2"], PREFIXES["text_encoder_3"]


def networks(cfg, seed: int = 0) -> dict:
    """The reference networks by component name, random, float32; CLIP-L's projection the identity."""
    text_l, text_g = (randomise_(transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**c)), seed + i)
                      for i, c in ((2, TEXT_CONFIGS["text_encoder"]), (3, TEXT_CONFIGS["text_encoder_2"])))
    with torch.no_grad():
        text_l.text_projection.weight.copy_(torch.eye(L))
    return {"transformer": reference_mmdit(cfg, seed), "vae": randomise_(reference_vae(VAE), seed + 1),
            "text_encoder": text_l.eval(), "text_encoder_2": text_g.eval(),
            "text_encoder_3": reference_encoder(T5_CFG, seed + 4).eval()}


def single_file_state(nets: dict, cfg, t5: bool = True) -> dict[str, torch.Tensor]:
    """The networks as an official SD3 single file's tensors (the module docstring)."""
    sd = {mmdit_ldm.PREFIX + k: v for k, v in mmdit_ldm.to_original(nets["transformer"].state_dict(), cfg).items()}
    vae = nets["vae"].state_dict()
    sd.update(ldm.to_ldm({}, encoder_state(nets["vae"]), {}))
    sd.update({ldm.VAE + k: v for k, v in vae.items() if k.startswith("decoder.")})  # ignored: only the prefix matters
    for component, prefix in (("text_encoder", CLIP_L), ("text_encoder_2", CLIP_G)):
        sd.update({prefix + k: v for k, v in nets[component].state_dict().items()
                   if not k.endswith("position_ids") and not (component == "text_encoder" and k.startswith("text_projection"))})
    sd[f"{CLIP_L}text_model.embeddings.position_ids"] = torch.arange(77)[None]  # ignored by name
    if t5:
        sd.update({T5XXL + k: v for k, v in nets["text_encoder_3"].state_dict().items()})  # both names of the tied
        # embedding, as the SD3 release seems to (diffusers detects T5 by shared.weight; its loader without
        # accelerate, strict, needs encoder.embed_tokens.weight)
    return {k: v.clone().contiguous() for k, v in sd.items()}


def metadata(cfg) -> dict[str, str]:
    """What the tiny file's shapes do not tell: the transformer's head width and sample size, the VAE's groups,
    the towers' heads."""
    meta = {"format": "pt", **mmdit_ldm.config_metadata(cfg),
            "minidiffseg.vae.norm_num_groups": json.dumps(VAE.norm_num_groups)}
    meta.update({f"minidiffseg.{c}.num_attention_heads": json.dumps(TEXT_CONFIGS[c]["num_attention_heads"])
                 for c in TEXT_CONFIGS})
    return meta


def write_pair(folder, cfg=CFG, t5: bool = True, seed: int = 0):
    """The diffusers folder at `folder` and the same weights as `folder`/sd3_tiny.safetensors, beside the folder's
    tokenizer/, tokenizer_2/, tokenizer_3/ (the file finds them there). `t5=False`: the file without T5 (the
    `_incl_clips` layout); the folder keeps its T5."""
    nets = networks(cfg, seed)
    for name, net in nets.items():
        net.save_pretrained(folder / name, safe_serialization=True)
    write_sd15_tokenizer(folder / "tokenizer")
    write_sd2_tokenizer(folder / "tokenizer_2")
    write_tokenizer_3(folder / "tokenizer_3")
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    file = folder / ("sd3_tiny.safetensors" if t5 else "sd3_tiny_incl_clips.safetensors")
    save_file(single_file_state(nets, cfg, t5), file, metadata=metadata(cfg))
    return folder, file


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder, file = write_pair(tmp_path_factory.mktemp("sd3_file"))
    no_t5 = folder / "sd3_tiny_incl_clips.safetensors"
    tensors = load_file(file)
    save_file({k: v for k, v in tensors.items() if not k.startswith(T5XXL)}, no_t5, metadata=metadata(CFG))
    return folder, file, no_t5


@pytest.fixture(scope="module")
def pair_35(tmp_path_factory):
    return write_pair(tmp_path_factory.mktemp("sd35_file"), CFG_35)


def _state(net) -> dict[str, torch.Tensor]:
    return dict(net.state_dict())


def realigned(sd):
    """`sd` with every network's tensors copied to fresh (64-byte aligned) allocations."""
    for net in sd.networks().values():
        net.load_state_dict({k: v.clone() for k, v in net.state_dict().items()}, strict=True, assign=True)
    return sd


def _same(what: str, ours: dict, theirs: dict) -> None:
    assert set(ours) == set(theirs), f"{what}: {sorted(set(ours) ^ set(theirs))[:5]}"
    bad = [k for k in ours if ours[k].shape != theirs[k].shape or not torch.equal(ours[k], theirs[k])]
    assert not bad, f"{what}: {len(bad)} tensor(s) differ, e.g. {bad[:3]}"


# ---- (a) our rules are diffusers' converters ---------------------------------------------------------------


@pytest.mark.parametrize("which", ["sd3", "sd35"])
def test_the_loaded_networks_equal_diffusers_single_file_conversion(pair, pair_35, which):
    """Each network loaded from the file (our names = diffusers') equals what diffusers' single-file utilities
    make of the same file: convert_sd3_transformer_checkpoint_to_diffusers, convert_ldm_vae_checkpoint,
    create_diffusers_clip_model_from_ldm (CLIP-L's identity projection included), create_diffusers_t5_model_from_
    checkpoint; the configs the last two need are the folder's, read locally. Every tensor, bit for bit."""
    from diffusers.loaders import single_file_utils as reference

    folder, file = pair[:2] if which == "sd3" else pair_35
    sd = load_sd(file)
    state = load_file(file)
    _same("transformer", _state(sd.transformer), reference.convert_sd3_transformer_checkpoint_to_diffusers(dict(state)))
    vae_config = dict(diffusers.AutoencoderKL.load_config(folder / "vae"))
    theirs_vae = reference.convert_ldm_vae_checkpoint(dict(state), vae_config)
    _same("VAE", _state(sd.vae), {k: v for k, v in theirs_vae.items() if k.startswith("encoder.")})
    assert not any(k.startswith("quant_conv.") for k in theirs_vae) and sd.vae.quant_conv is None
    for component, net in (("text_encoder", sd.text_encoder), ("text_encoder_2", sd.text_encoder_2)):
        theirs = reference.create_diffusers_clip_model_from_ldm(
            transformers.CLIPTextModelWithProjection, dict(state), config=str(folder), subfolder=component)
        theirs_state = {k: v for k, v in theirs.state_dict().items() if not k.endswith("position_ids")}
        if component == "text_encoder":  # diffusers' identity projection; ours an nn.Identity (no tensor)
            assert torch.equal(theirs_state.pop("text_projection.weight"), torch.eye(L))
            assert isinstance(net, CLIPTextModelWithIdentityProjection) and net.cfg.projection_dim == L
        _same(component, _state(net), theirs_state)
    t5 = reference.create_diffusers_t5_model_from_checkpoint(transformers.T5EncoderModel, dict(state),
                                                             config=str(folder), subfolder="text_encoder_3")
    theirs_t5 = dict(t5.state_dict())
    assert torch.equal(theirs_t5.pop("encoder.embed_tokens.weight"), theirs_t5["shared.weight"])  # tied
    assert sd.text_encoder_3 is not None
    _same("T5", _state(sd.text_encoder_3), theirs_t5)


# ---- (b) the file loads the folder's networks ----------------------------------------------------------------


def test_the_single_file_loads_the_folders_networks(pair, pair_35):
    folder, file, _ = pair
    ours, want = load_sd(file), load_sd(folder)
    assert (ours.kind, ours.name, ours.resolution, ours.max_sequence_length) == \
        (want.kind, want.name, want.resolution, want.max_sequence_length)
    assert ours.t5 and "with T5" in ours.name and ours.vae.cfg == want.vae.cfg and ours.transformer.cfg == want.transformer.cfg
    for name, net in ours.networks().items():
        theirs = _state(want.networks()[name])
        if name == "text_encoder":  # the folder stores the identity that the file's CLIP-L implies
            assert torch.equal(theirs.pop("text_projection.weight"), torch.eye(L))
        _same(name, _state(net), theirs)
    prompts = ["a photograph of cat", "a photograph of a fire hydrant next to a potted plant", ""]
    with torch.no_grad():
        a, b = ours.encode_text(prompts), want.encode_text(prompts)
    assert torch.equal(a.states, b.states) and torch.equal(a.pooled, b.pooled)
    # streamed: the transformer is resident (said once), the VAE and the three text encoders stream, each streamed
    # tensor placed where its resident twin is: the bits of the resident file
    image = sample_image_paths()[1]
    scores = Segmenter(ours)(image, ["cat"], seed=1).scores
    with pytest.warns(UserWarning, match=r"transformer of an SD3 single file is loaded resident"):
        streamed = Segmenter.from_pretrained(file, stream=True)
    assert all(getattr(streamed.sd.networks()[c], "weights", None) is not None
               for c in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae"))
    assert torch.equal(streamed(image, ["cat"], seed=1).scores, scores)
    # against the folder: as loaded, each tensor is a view of its memory-mapped file at that file's offset, on which
    # the last bits of a CPU GEMM can depend (docs/memory.md §8: measured 1.2e-6 here, from the transformer); at
    # fresh allocations on both sides, the same networks give the same bits
    assert torch.equal(*(Segmenter(realigned(sd))(image, ["cat"], seed=1).scores for sd in (ours, want)))
    sd35, want35 = load_sd(pair_35[1]), load_sd(pair_35[0])
    assert sd35.kind == "sd35" and sd35.name == want35.name
    _same("SD3.5 transformer", _state(sd35.transformer), _state(want35.transformer))


def test_a_file_without_t5_runs_with_zeros(pair):
    """The `_incl_clips` layout: CLIP-L and CLIP-G, no T5: the folder loaded without T5 (zeros in its place)."""
    folder, _, no_t5 = pair
    ours, want = load_sd(no_t5), load_sd3(folder, t5=False)
    assert not ours.t5 and ours.tokenizer_3 is None and "without T5" in ours.name and ours.name == want.name
    image = sample_image_paths()[1]
    assert torch.equal(*(Segmenter(realigned(sd))(image, ["cat"], seed=2).scores for sd in (ours, want)))


def test_half_precision_from_the_file(pair):
    sd = load_sd(pair[1], dtype=torch.float16)
    assert sd.dtype == torch.float16 and sd.vae.encoder.conv_in.weight.dtype == torch.float32  # force_upcast


def test_the_releases_sizes_from_their_shapes():
    """The sizes no shape of a real file tells are the releases' (sd3/single_file.py): the shapes of SD3-medium's
    networks, built on meta and named as the file names them, give back their diffusers configs (heads, GELUs,
    projections, the VAE's shift and scale, T5-XXL's head width, buckets and gating)."""
    from minidiffseg.sd.clip import CLIPTextModelWithProjection
    from minidiffseg.sd.config import CLIPTextConfig, VAEConfig
    from minidiffseg.sd.vae import VAEEncoder
    from minidiffseg.sd3 import single_file
    from minidiffseg.sd3.config import MMDiTConfig
    from minidiffseg.sd3.mmdit import MMDiT
    from minidiffseg.sd3.t5 import T5Config, T5Encoder

    # SD3-medium's text_encoder/, text_encoder_2/ and vae/ config.json (/work/shared/BACKBONES.md B3, B4, B7)
    clip_l = CLIPTextConfig(projection_dim=768)  # CLIP ViT-L/14: 768 wide, 12 heads, 12 layers, quick GELU
    clip_g = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                            projection_dim=1280, hidden_act="gelu")
    vae = VAEConfig(latent_channels=16, use_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5305,
                    force_upcast=True)
    mmdit = MMDiTConfig.sd3_medium()
    with torch.device("meta"):
        shapes = {mmdit_ldm.PREFIX + k: tuple(t.shape) for k, t in mmdit_ldm.to_original(MMDiT(mmdit).state_dict(),
                                                                                           mmdit).items()}
        shapes.update({k: tuple(t.shape) for k, t in ldm.to_ldm({}, VAEEncoder(vae).state_dict(), {}).items()})
        for prefix, cfg in ((CLIP_L, clip_l), (CLIP_G, clip_g)):
            state = CLIPTextModelWithProjection(cfg).state_dict()
            shapes.update({prefix + k: tuple(t.shape) for k, t in state.items()
                           if not (prefix == CLIP_L and k.startswith("text_projection"))})
        shapes.update({T5XXL + k: tuple(t.shape) for k, t in T5Encoder(T5Config.xxl()).state_dict().items()})
    assert mmdit_ldm.infer_config(shapes) == mmdit
    assert single_file.infer_vae_config(shapes) == vae
    assert single_file.infer_clip_config(shapes, "text_encoder") == clip_l
    assert single_file.infer_clip_config(shapes, "text_encoder_2") == clip_g
    assert single_file.infer_t5_config(shapes) == T5Config.xxl()


# ---- (c) bad files: one line each ---------------------------------------------------------------------------


def _one_line(match: str, *args, **kwargs):
    with pytest.raises(UserError, match=match) as e:
        load_sd(*args, **kwargs)
    assert "\n" not in str(e.value)


def test_bad_single_files_are_one_line(pair, tmp_path):
    _, file, _ = pair
    tensors = load_file(file)
    with safe_open(str(file), "pt") as f:
        meta = f.metadata()

    def write(name, state, where=file.parent):
        path = where / name
        save_file(state, path, metadata=meta)
        return path

    bare = write("sd3_bare.safetensors", {k: v for k, v in tensors.items() if not k.startswith("text_encoders.")})
    _one_line(r"sd3_bare\.safetensors: an SD3 single file without its text encoders: no CLIP-L .* and no CLIP-G .*"
              r"\(the transformer and VAE alone.*sd3_medium_incl_clips\.safetensors.*--what sd3-medium", bare)
    one_tower = write("sd3_l.safetensors", {k: v for k, v in tensors.items() if not k.startswith(CLIP_G)})
    _one_line(r"without its text encoders: no CLIP-G \(text_encoders\.clip_g\.transformer\.…\); give", one_tower)
    # T5 in the file, no tokenizer_3/ beside it
    lone = tmp_path / "lone"
    lone.mkdir()
    for tok in ("tokenizer", "tokenizer_2"):
        shutil.copytree(file.parent / tok, lone / tok)
    shutil.copy(file, lone / file.name)
    _one_line(r"holds T5 \(text_encoders\.t5xxl\.transformer\.…\) but there is no tokenizer_3/ beside it",
              lone / file.name)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(file.read_bytes()[:-1000])
    _one_line(r"cut\.safetensors: truncated", cut)
    extra = write("sd3_extra.safetensors", {**tensors, "model.diffusion_model.joint_blocks.0.spare": torch.ones(2)})
    _one_line(r"1 unexpected tensor\(s\): model\.diffusion_model\.joint_blocks\.0\.spare", extra)
    key = f"{mmdit_ldm.PREFIX}joint_blocks.1.x_block.mlp.fc2.weight"
    missing = write("sd3_missing.safetensors", {k: v for k, v in tensors.items() if k != key})
    _one_line(r"1 transformer tensor\(s\) missing: joint_blocks\.1\.x_block\.mlp\.fc2\.weight", missing)
    other_vae = {k: v for k, v in tensors.items() if not k.startswith(ldm.VAE)}
    sd15_vae = randomise_(reference_vae(dataclasses.replace(VAE, latent_channels=4, use_quant_conv=True)), 0)
    other_vae.update(ldm.to_ldm({}, encoder_state(sd15_vae), {}))
    mixed = write("sd3_mixed.safetensors", {k: v.contiguous() for k, v in other_vae.items()})
    _one_line(r"its VAE makes 4-channel latents, the transformer patches 16 .*mixes the networks of two models", mixed)


# ---- the commands --------------------------------------------------------------------------------------------


def test_inspect_weights_reads_the_single_file(pair, capsys):
    from minidiffseg.cli import main

    assert main(["inspect-weights", str(pair[1])]) == 0
    out = capsys.readouterr().out
    assert "SD3 single file (original layout): SD3 (128², 4 blocks) with T5" in out and "T5 encoder" in out, out
    assert "text encoder: 1 tensor(s) ignored by name" in out and "OK:" in out, out
    assert main(["inspect-weights", str(pair[2])]) == 0
    assert "SD3 (128², 4 blocks) without T5" in capsys.readouterr().out
