"""The LDM single-file name rules (minidiffseg.sd.ldm) checked against an independent implementation:
random weights under our names -> our rules -> diffusers' own LDM->diffusers converter (the one its
single-file loading uses) must give back exactly the same tensors under the same names. Tiny configs
compare tensors; full size (on meta) compares the key/shape inventories."""

import pytest
import torch

from assets import require
from minidiffseg.sd import ldm
from minidiffseg.sd.config import CLIPTextConfig, UNetConfig, VAEConfig

require("diffusers")  # its single-file converter is the reference (test-only)
from diffusers.loaders import single_file_utils as reference  # noqa: E402
from tiny_sd import (TINY, encoder_state, reference_text_config, reference_unet, reference_vae,  # noqa: E402
                     text_state, tiny_reference, transformers)

FULL = (UNetConfig(), VAEConfig(), CLIPTextConfig())


@pytest.fixture(scope="module")
def tiny():
    """(reference models, their state dicts under our names, the LDM state dict of our rules)."""
    unet, vae, text = tiny_reference(seed=3)
    ours = unet.state_dict(), encoder_state(vae), text_state(text)
    return (unet, vae, text), ours, ldm.to_ldm(*ours)


@pytest.fixture(scope="module")
def full():
    with torch.device("meta"):
        unet, vae = reference_unet(FULL[0]), reference_vae(FULL[1])
        text = transformers.CLIPTextModel(reference_text_config(FULL[2]))
    ours = unet.state_dict(), encoder_state(vae), text_state(text)
    return (unet, vae, text), ours, ldm.to_ldm(*ours)


def back_from_ldm(models, ldm_sd):
    """diffusers' converter applied to our LDM file: (U-Net, VAE, CLIP) state dicts in diffusers names."""
    unet, vae, _ = models
    return (reference.convert_ldm_unet_checkpoint(ldm_sd, unet.config),
            reference.convert_ldm_vae_checkpoint(ldm_sd, vae.config),
            reference.convert_ldm_clip_checkpoint(ldm_sd))


def assert_same_keys(got: dict, want: dict, what: str):
    missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
    assert not missing and not extra, \
        f"{what}: {len(missing)} missing e.g. {missing[:3]}, {len(extra)} extra e.g. {extra[:3]}"


@pytest.mark.parametrize("i, what", [(0, "U-Net"), (1, "VAE encoder"), (2, "text encoder")])
def test_tiny_round_trip_through_diffusers_converter_is_exact(tiny, i, what):
    models, ours, ldm_sd = tiny
    got, want = back_from_ldm(models, ldm_sd)[i], ours[i]
    assert_same_keys(got, want, what)
    for k in want:
        err = (got[k].float() - want[k].float()).abs().max().item()
        rel = err / max(want[k].abs().max().item(), 1e-30)
        assert got[k].shape == want[k].shape and torch.equal(got[k], want[k]), \
            f"{what} {k}: shape {tuple(got[k].shape)} vs {tuple(want[k].shape)}, max abs {err:.3e}, max rel {rel:.3e}"


@pytest.mark.parametrize("i, what", [(0, "U-Net"), (1, "VAE encoder"), (2, "text encoder")])
def test_full_size_inventory_through_diffusers_converter(full, i, what):
    models, ours, ldm_sd = full
    got, want = back_from_ldm(models, ldm_sd)[i], ours[i]
    assert_same_keys(got, want, what)
    wrong = [k for k in want if got[k].shape != want[k].shape]
    assert not wrong, f"{what}: shapes differ for {wrong[:3]}: {[tuple(got[k].shape) for k in wrong[:3]]}"


def test_full_size_ldm_inventory(full):
    """SD1.5's single file: 686 U-Net tensors; the VAE encoder half holds 108 with mid-attention q/k/v/proj_out
    as [512, 512, 1, 1]; 196 text tensors (its position_ids buffer is not a parameter)."""
    _, _, ldm_sd = full
    count = {p: sum(k.startswith(p) for k in ldm_sd) for p in (ldm.UNET, ldm.VAE, ldm.TEXT)}
    assert count == {ldm.UNET: 686, ldm.VAE: 108, ldm.TEXT: 196} and len(ldm_sd) == 990, count
    for p in ("q", "k", "v", "proj_out"):
        assert ldm_sd[f"{ldm.VAE}encoder.mid.attn_1.{p}.weight"].shape == (512, 512, 1, 1)
    assert ldm_sd[f"{ldm.UNET}input_blocks.1.1.proj_in.weight"].shape == (320, 320, 1, 1)  # SD1.5: 1×1 conv
    assert ldm_sd[f"{ldm.UNET}output_blocks.2.1.conv.weight"].shape == (1280, 1280, 3, 3)  # up_blocks.0 upsampler
    assert ldm_sd[f"{ldm.UNET}output_blocks.5.2.conv.weight"].shape == (1280, 1280, 3, 3)  # up_blocks.1 upsampler


@pytest.mark.parametrize("cfgs", [FULL, TINY], ids=["full", "tiny"])
def test_rules_are_one_to_one(cfgs):
    unet, vae, _ = cfgs
    for rules in (ldm.unet_rules(len(unet.block_out_channels), unet.layers_per_block),
                  ldm.vae_rules(len(vae.block_out_channels), vae.layers_per_block)):
        assert len(set(rules.values())) == len(rules)
        prefixes = sorted(rules.values())  # no LDM prefix may contain another: one rule per key
        assert not any(b.startswith(a) for a, b in zip(prefixes, prefixes[1:]))


@pytest.mark.parametrize("size", ["tiny", "full"])
def test_from_ldm_inverts_to_ldm(size, tiny, full):
    _, ours, ldm_sd = tiny if size == "tiny" else full
    shapes = {k: tuple(v.shape) for k, v in ldm_sd.items()}
    unet_cfg, vae_cfg, _ = ldm.infer_configs(shapes)
    names, unknown = ldm.from_ldm(ldm_sd, unet_cfg, vae_cfg)
    assert unknown == []
    for c, sd in zip(("unet", "vae", "text_encoder"), ours):
        assert sorted(names[c].values()) == sorted(sd), c
        for key, name in names[c].items():
            back = ldm_sd[key].reshape(sd[name].shape)  # only the VAE's 1×1 convs change shape
            assert back.is_meta or torch.equal(back, sd[name]), f"{key} -> {name}"


def test_infer_configs(tiny, full):
    shapes = {k: tuple(v.shape) for k, v in full[2].items()}
    assert ldm.infer_configs(shapes) == FULL  # real files carry no metadata: SD1.5's shape-less fields
    shapes = {k: tuple(v.shape) for k, v in tiny[2].items()}
    assert ldm.infer_configs(shapes, ldm.config_metadata(*TINY)) == TINY
    unet, vae, text = ldm.infer_configs(shapes)  # no metadata: the sizes still come from the shapes
    assert (unet.block_out_channels, unet.layers_per_block, unet.cross_attention_dim) == ((32, 32, 64, 64), 2, 32)
    assert (vae.block_out_channels, vae.layers_per_block) == ((16, 16, 32, 32), 1)
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers) == (32, 64, 2)


def test_ignored_keys_by_name():
    ignored = ["first_stage_model.decoder.up.0.block.0.conv1.weight", "first_stage_model.post_quant_conv.bias",
               "model_ema.decay", "model_ema.diffusion_modelinput_blocks00weight", "alphas_cumprod", "betas",
               "cond_stage_model.transformer.text_model.embeddings.position_ids"]
    kept = ["first_stage_model.encoder.conv_in.weight", "model.diffusion_model.out.2.bias", "my_betas",
            "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"]
    assert [k for k in ignored if not ldm.is_ignored(k)] == []
    assert [k for k in kept if ldm.is_ignored(k)] == []
    names, unknown = ldm.from_ldm(ignored + kept, *FULL[:2])
    assert unknown == ["my_betas"]


def test_both_layouts_ignore_the_keys_of_one_list():
    """The keys no network of ours holds are listed once, under our names (names.NOT_BUILT): the diffusers
    folders skip them as named, the single file under its prefixes (ldm.IGNORED)."""
    from minidiffseg.sd.names import NOT_BUILT, not_built

    ours = {"vae": ["decoder.up.0.block.0.conv1.weight", "post_quant_conv.bias"],
            "text_encoder": ["text_model.embeddings.position_ids"]}
    prefix = {"vae": ldm.VAE, "text_encoder": ldm.TEXT}
    for component, keys in ours.items():
        assert all(not_built(component, k) and ldm.is_ignored(prefix[component] + k) for k in keys), component
        assert {f"{prefix[component]}{p}" for p in NOT_BUILT[component]} <= set(ldm.IGNORED)
    assert not NOT_BUILT["unet"] and not not_built("vae", "encoder.conv_in.weight")


def with_ema(ldm_sd: dict[str, torch.Tensor], drop: int = 0) -> dict[str, torch.Tensor]:
    """`ldm_sd` as a non-"emaonly" file: every U-Net tensor also as its EMA twin (other values), named the way
    LDM's LitEma names its buffers (the dots removed), and its counters; `drop` twins left out."""
    twins = {"model_ema." + k.removeprefix("model.").replace(".", ""): v + 1 for k, v in ldm_sd.items()
             if k.startswith(ldm.UNET)}
    for k in list(twins)[:drop]:
        del twins[k]
    return {**ldm_sd, **twins, "model_ema.decay": torch.tensor(0.9999),
            "model_ema.num_updates": torch.tensor(7, dtype=torch.int32)}


def test_the_ema_copy_is_read_as_diffusers_extracts_it(tiny):
    """diffusers' converter with extract_ema=True (its spelling of the EMA names) is the reference."""
    models, ours, ldm_sd = tiny
    both = with_ema(ldm_sd)
    shapes = {k: tuple(v.shape) for k, v in both.items()}
    names, unknown = ldm.from_ldm(both, *ldm.infer_configs(shapes)[:2])
    assert unknown == [] and ldm.uses_ema(names)
    want = reference.convert_ldm_unet_checkpoint(both, models[0].config, extract_ema=True)
    assert sorted(names["unet"].values()) == sorted(want) == sorted(ours[0])
    for key, name in names["unet"].items():
        assert key.startswith("model_ema.") and torch.equal(both[key], want[name]), f"{key} -> {name}"
    assert not torch.equal(want["conv_in.weight"], ours[0]["conv_in.weight"])  # the twins differ


def test_an_incomplete_ema_copy_is_not_used(tiny):
    _, ours, ldm_sd = tiny
    partial = with_ema(ldm_sd, drop=1)
    with pytest.warns(UserWarning, match=r"EMA copy of the U-Net is incomplete \((\d+) of \d+ tensors.*trained"):
        names, unknown = ldm.from_ldm(partial, *ldm.infer_configs({k: tuple(v.shape) for k, v in ldm_sd.items()})[:2])
    assert unknown == [] and not ldm.uses_ema(names)
    assert all(k.startswith(ldm.UNET) for k in names["unet"])
