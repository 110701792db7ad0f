"""fp16 numerics, computed for real on the CPU (true float16 arithmetic: the model loaded in float16 with
`load_sd`, not the bf16 the CLI and `from_pretrained` substitute on a CPU): the explicit attention path
scales before the product, as the reference does, so a sharp head does not overflow; a result that is
not finite anyway is one UserError line naming the stage, never a mask argmax'ed from NaN."""

from __future__ import annotations

import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import TINY_RES
from minidiffseg.cli import main
from minidiffseg.errors import UserError
from minidiffseg.method.segmenter import Segmenter
from minidiffseg.sd import load_sd
from minidiffseg.sd.attention import attention_probs


@pytest.fixture(scope="module")
def image():
    return Image.radial_gradient("L").resize((96, 80)).convert("RGB")


def test_explicit_attention_does_not_overflow_in_fp16():
    """q·k = 1.6e5 (past fp16's 65504) but q·k/√d = 2e4: the reference's probabilities are finite, so must
    ours be. Scaling after the product (as before) gives inf scores and NaN probabilities."""
    g = torch.Generator().manual_seed(0)
    d = 64
    q = torch.randn(1, 2, 16, d, generator=g) * 50  # (B, h, N, d)
    k = torch.randn(1, 2, 8, d, generator=g) * 50  # (B, h, T, d)
    k[..., 3, :] = q[..., 0, :] * 1.0  # one key aligned with the first query: q·k ≈ 64 · 2500 = 1.6e5
    assert (q.half().float() @ k.half().float().transpose(-1, -2)).abs().max() > 65504  # the case is real
    want = torch.softmax((q.double() @ k.double().transpose(-1, -2)) * d ** -0.5, dim=-1)
    got = attention_probs(q.half(), k.half())
    assert torch.isfinite(got).all(), "fp16 attention probabilities overflowed"
    err = (got.double() - want).abs().max().item()
    assert err < 2e-2, f"fp16 probabilities vs float64: max abs error {err:.3e}"  # measured 1.5e-3 (fp16 scores)


def test_tiny_model_in_true_fp16_matches_fp32(tiny_sd_dir, image):
    """The whole method in float16 arithmetic on the CPU against float32 from the same fp16 files, within
    bounds a small factor above the measured errors, and ~7× closer than bf16 (3 more mantissa bits):
    so it really computed in fp16, not in a substitute."""
    runs = {dt: Segmenter(load_sd(tiny_sd_dir, dtype=dt, variant="fp16"), resolution=TINY_RES)(
                image, ["cat", "dog", "sofa"], seed=3) for dt in (torch.float16, torch.bfloat16, torch.float32)}
    bounds = {"fused": 5e-3, "refined": 2e-3, "scores": 0.15}  # measured 1.7e-3, 6.1e-4, 4.9e-2 (bf16: 1.0e-2,
    # 4.5e-3, 0.26); the scores are min-max stretched per class, which magnifies the maps' differences
    for field, bound in bounds.items():
        a, b, c = (getattr(runs[dt], field) for dt in (torch.float16, torch.float32, torch.bfloat16))
        assert a.device.type == "cpu" and a.dtype == torch.float32, field  # results on the CPU in float32
        err, err_bf16 = (a - b).abs().max().item(), (c - b).abs().max().item()
        assert torch.isfinite(a).all() and err < bound, f"{field}: fp16 vs fp32 max abs error {err:.3e}"
        assert err < err_bf16 / 3, f"{field}: fp16 error {err:.3e} not below bf16's {err_bf16:.3e} / 3"
    assert runs[torch.float32].scores.std() > 0.05  # a real map, not a constant


def _poisoned(src, dst, component: str, key: str, value: float, whole: bool = False):
    """A copy of the tiny diffusers folder (fp32 files) whose `component` tensor named `…key` holds `value` in
    its first element (`whole`: in every element)."""
    shutil.copytree(src, dst)
    file = dst / component / ("model.safetensors" if component == "text_encoder" else "diffusion_pytorch_model.safetensors")
    tensors = load_file(file)
    name = next(k for k in tensors if k.endswith(key))
    tensors[name] = tensors[name].clone()
    (tensors[name] if whole else tensors[name].view(-1)[:1]).fill_(value)
    save_file(tensors, file)
    return dst


@pytest.mark.parametrize("component, key, stage", [
    ("vae", "encoder.conv_in.weight", "image latents"),
    ("text_encoder", "final_layer_norm.weight", "text embeddings"),
    ("unet", "conv_in.bias", "cross-attention maps"),
])
def test_non_finite_stage_is_one_line(tiny_sd_dir, tmp_path, image, component, key, stage):
    """A NaN weight (as an fp16 overflow would leave) stops the image at the first stage it reaches, naming it."""
    folder = _poisoned(tiny_sd_dir, tmp_path / "w", component, key, float("nan"))
    seg = Segmenter(load_sd(folder), resolution=TINY_RES)
    with pytest.raises(UserError, match=f"{stage}.*not finite.*float32.*inspect-weights"):
        seg(image, ["cat", "dog"], seed=0)


def test_fp16_overflow_names_the_way_out(tiny_sd_dir, tmp_path, image):
    """In fp16 the message says which dtypes to use instead."""
    folder = _poisoned(tiny_sd_dir, tmp_path / "w", "vae", "encoder.conv_in.weight", 6e4, whole=True)
    assert Segmenter(load_sd(folder), resolution=TINY_RES)(image, ["cat"], seed=0).scores.isfinite().all()  # fp32 copes
    seg = Segmenter(load_sd(folder, dtype=torch.float16), resolution=TINY_RES)  # fp16: 27 taps × 6e4 > 65504
    with pytest.raises(UserError, match="not finite.*float16: fp16 overflowed: run with --dtype bf16 or fp32"):
        seg(image, ["cat"], seed=0)


def test_cli_non_finite_is_one_line(tiny_sd_dir, tmp_path, image, capsys):
    folder = _poisoned(tiny_sd_dir, tmp_path / "w", "unet", "conv_in.bias", float("inf"))
    image.save(tmp_path / "a.png")
    code = main(["segment", str(tmp_path / "a.png"), "--classes", "cat,dog", "--weights", str(folder),
                 "--resolution", str(TINY_RES), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("minidiffseg: error: the cross-attention maps"), err
    assert not (tmp_path / "out" / "a_mask.png").exists()  # no mask from NaN scores
