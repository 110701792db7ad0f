"""Our VAE encoder vs diffusers' `AutoencoderKL.encode` on identical random weights (docs/design.md §7.2),
the legacy-name translation, and the full-size parameter inventory (docs/design.md §7.3)."""

import pytest
import torch
from safetensors.torch import save_file

from minidiffseg.sd.config import VAEConfig
from minidiffseg.sd.checkpoint import _vae_name
from minidiffseg.sd.loading import build_on_meta, load_strict
from minidiffseg.sd.vae import VAEEncoder
from parity import errors
from tiny_sd import encoder_state, reference_vae  # diffusers: the reference VAE


def reference_and_ours(cfg: VAEConfig = VAEConfig.tiny(), logvar_bias: float = 0.0):
    """A random reference with non-identity GroupNorms, and ours with its encoder weights.
    `logvar_bias` is added to the logvar half of quant_conv's bias (to drive the clamp)."""
    torch.manual_seed(0)
    ref = reference_vae(cfg).eval()
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, torch.nn.GroupNorm):  # default init is weight 1, bias 0: make them count
                m.weight.add_(0.2 * torch.randn_like(m.weight))
                m.bias.add_(0.2 * torch.randn_like(m.bias))
        if ref.quant_conv is not None:
            ref.quant_conv.bias[cfg.latent_channels:] += logvar_bias
    ours = VAEEncoder(cfg).eval()
    ours.load_state_dict(encoder_state(ref), strict=True)
    return ref, ours


def image(batch: int = 2, height: int = 32, width: int = 48) -> torch.Tensor:
    """Pixels in [-1, 1], non-square so that the asymmetric padding is exercised on both axes."""
    g = torch.Generator().manual_seed(1)
    return torch.rand(batch, 3, height, width, generator=g) * 2 - 1


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str, bound: float = 1e-5):  # fp32: measured ≤ 1.4e-6
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    abs_err, rel_err = errors(ours, ref)
    assert rel_err <= bound, f"{what}: max abs err {abs_err:.3g}, max rel err {rel_err:.3g} > {bound:g}"


def test_moments_match_diffusers():
    ref, ours = reference_and_ours()
    x = image()
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        mean, logvar = ours.moments(x)
    assert mean.shape == (2, 4, 4, 6)
    assert_close(mean, dist.mean, "mean")
    assert_close(logvar, dist.logvar, "logvar")


@pytest.mark.parametrize("logvar_bias", [-100.0, 100.0])
def test_logvar_clamp_matches_diffusers(logvar_bias):
    ref, ours = reference_and_ours(logvar_bias=logvar_bias)
    x = image(1)
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        _, logvar = ours.moments(x)
    assert logvar.abs().max().item() in (20.0, 30.0), "the bias did not push logvar into the clamp"
    assert_close(logvar, dist.logvar, "clamped logvar")


def test_sample_matches_diffusers_with_same_generator():
    cfg = VAEConfig.tiny()
    ref, ours = reference_and_ours(cfg)
    x = image()
    with torch.no_grad():
        expected = cfg.scaling_factor * ref.encode(x).latent_dist.sample(torch.Generator().manual_seed(42))
        got = ours.encode(x, generator=torch.Generator().manual_seed(42))
        other_seed = ours.encode(x, generator=torch.Generator().manual_seed(43))
        mode = ours.encode(x, sample=False)
        expected_mode = cfg.scaling_factor * ref.encode(x).latent_dist.mean
    assert_close(got, expected, "sampled latent")
    assert_close(mode, expected_mode, "posterior-mean latent")
    assert not torch.allclose(got, other_seed), "the seed does not change the sample"
    assert not torch.allclose(got, mode), "the sample equals the mean: no noise was added"


def test_float64_and_bfloat16():
    ref, ours = reference_and_ours()
    x = image(1)
    with torch.no_grad():
        expected = ref.encode(x).latent_dist.mean
        expected64 = ref.double().encode(x.double()).latent_dist.mean
        mean64, _ = ours.double().moments(x)  # input is cast to the weights' dtype
        mean16, _ = ours.to(torch.bfloat16).moments(x)  # (after float64: these weights are rounded to bf16)
    assert mean64.dtype == torch.float64 and mean16.dtype == torch.bfloat16
    assert_close(mean64, expected64, "float64 mean vs float64 reference", bound=3e-14)  # measured 2.8e-15
    assert_close(mean16, expected, "bfloat16 mean vs float32 reference", bound=5e-2)  # bf16 (8-bit mantissa): 9e-3


def to_legacy(state: dict[str, torch.Tensor], conv_shaped: bool) -> dict[str, torch.Tensor]:
    """The mid-attention the way older files store it: query/key/value/proj_attn, optionally as 1×1 convs."""
    new_to_old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    out = {}
    for name, tensor in state.items():
        for new, old in new_to_old.items():
            prefix = f"encoder.mid_block.attentions.0.{new}."
            if name.startswith(prefix):
                name = f"encoder.mid_block.attentions.0.{old}.{name[len(prefix):]}"
                if conv_shaped and tensor.ndim == 2:
                    tensor = tensor[:, :, None, None]  # (C, C) -> (C, C, 1, 1)
        out[name] = tensor
    return out


@pytest.mark.parametrize("conv_shaped", [False, True])
def test_legacy_names_load(conv_shaped, tmp_path):
    """A VAE file with the legacy mid-attention names (and LDM's 1×1-conv shapes) loads through the
    checkpoint's name rule and gives the reference's latent mean."""
    ref, ours = reference_and_ours()
    state = encoder_state(ref)
    legacy = to_legacy(state, conv_shaped)
    assert "encoder.mid_block.attentions.0.query.weight" in legacy and "encoder.mid_block.attentions.0.to_q.weight" not in legacy
    if conv_shaped:
        assert legacy["encoder.mid_block.attentions.0.proj_attn.weight"].ndim == 4
    file = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in legacy.items()}, file)
    names = {k: _vae_name(k, tuple(v.shape)) for k, v in legacy.items()}
    assert sorted(names.values()) == sorted(state)
    fresh = load_strict(build_on_meta(VAEEncoder, VAEConfig.tiny()), file, names, torch.float32,
                        torch.device("cpu"), "VAE")
    x = image(1)
    with torch.no_grad():
        assert_close(fresh.moments(x)[0], ref.encode(x).latent_dist.mean, "mean after the legacy name rule")


def test_legacy_rule_leaves_current_names_alone():
    _, ours = reference_and_ours()
    for key, t in ours.state_dict().items():
        assert _vae_name(key, tuple(t.shape)) == key


def test_full_size_inventory():
    cfg = VAEConfig()  # SD1.5
    with torch.device("meta"):
        ref = reference_vae(cfg)
        ours = VAEEncoder(cfg)
    expected = {k: tuple(v.shape) for k, v in encoder_state(ref).items()}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got == expected, f"missing {sorted(expected.keys() - got.keys())}, extra {sorted(got.keys() - expected.keys())}"
    assert got["encoder.mid_block.attentions.0.to_q.weight"] == (512, 512)
    assert got["encoder.conv_out.weight"] == (8, 512, 3, 3) and got["quant_conv.weight"] == (8, 8, 1, 1)


# SD3's VAE (vae/config.json of stabilityai/stable-diffusion-3-medium-diffusers): 16 latent channels, no quant convs,
# latents (z − 0.0609)·1.5305; and diffusers' own SD3 test VAE, 4 channels without quant convs, scale 1.5035
SD3_VAE = VAEConfig(latent_channels=16, block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
                    scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, force_upcast=True)
SD3_TEST_VAE = VAEConfig(latent_channels=4, block_out_channels=(4,), layers_per_block=1, norm_num_groups=1,
                         scaling_factor=1.5035, shift_factor=0.0609, use_quant_conv=False)


@pytest.mark.parametrize("cfg", [SD3_VAE, SD3_TEST_VAE], ids=["16-channel", "4-channel"])
@pytest.mark.parametrize("sample", [True, False], ids=["sample", "mean"])
def test_sd3_latents_match_diffusers(cfg, sample):
    """The encoder without quant_conv, and the shifted scaling SD3's pipelines apply, (z − shift)·scale, for a
    posterior sample (same seeded generator) and for its mean; strict loading of the saved folder's encoder half."""
    ref, _ = reference_and_ours(cfg)
    assert ref.quant_conv is None and "quant_conv.weight" not in encoder_state(ref)
    ours = VAEEncoder(cfg).eval()
    ours.load_state_dict(encoder_state(ref), strict=True)
    x = image(1)
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        z = dist.sample(generator=torch.Generator().manual_seed(5)) if sample else dist.mean
        want = (z - ref.config.shift_factor) * ref.config.scaling_factor
        got = ours.encode(x, generator=torch.Generator().manual_seed(5), sample=sample)
    assert got.shape[1] == cfg.latent_channels
    assert_close(got, want, f"SD3 latent ({'sample' if sample else 'mean'})")
