"""Our CLIP text encoder vs transformers' `CLIPTextModel` on identical random weights (docs/design.md §7.2),
and the full-size parameter inventory (docs/design.md §7.3)."""

import pytest
import torch

from minidiffseg.sd.clip import CLIPTextModel
from minidiffseg.sd.config import CLIPTextConfig
from parity import errors
from tiny_sd import reference_text_config, text_state, transformers  # transformers: the reference CLIP

BOS, EOS = 49406, 49407  # CLIP's special tokens (docs/design.md §3)


def reference_and_ours(cfg: CLIPTextConfig):
    """A randomly initialised reference (LayerNorms perturbed too) and ours with its weights."""
    torch.manual_seed(0)
    ref = transformers.CLIPTextModel(reference_text_config(cfg)).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "layer_norm" in name:  # default init is weight 1, bias 0: make them count
                p.add_(0.1 * torch.randn_like(p))
    ours = CLIPTextModel(cfg).eval()
    ours.load_state_dict(text_state(ref), strict=True)
    return ref, ours


def prompts(batch: int = 3) -> torch.Tensor:
    """SD1.5-style ids (B, 77): BOS, a few random tokens of varying length, EOS padding to 77."""
    g = torch.Generator().manual_seed(1)
    ids = torch.full((batch, 77), EOS)
    ids[:, 0] = BOS
    for b in range(batch):
        n = 3 + 7 * b
        ids[b, 1:1 + n] = torch.randint(0, BOS, (n,), generator=g)
    return ids


def test_matches_transformers_fp32():
    ref, ours = reference_and_ours(CLIPTextConfig.tiny())
    ids = prompts()
    with torch.no_grad():
        expected = ref(input_ids=ids).last_hidden_state
        got = ours(ids)
    assert got.shape == expected.shape == (3, 77, CLIPTextConfig.tiny().hidden_size)
    abs_err, rel_err = errors(got, expected)
    # measured 0 (the same float32 operations in the same order); 1e-6 allows another BLAS a few ulps
    assert rel_err <= 1e-6, f"max abs err {abs_err:.3g}, max rel err {rel_err:.3g}"


def test_causal_mask_matters():
    # changing a late token must leave every earlier position untouched, and change its own
    _, ours = reference_and_ours(CLIPTextConfig.tiny())
    ids = prompts(1)
    edited = ids.clone()
    edited[0, 5] = 1234
    with torch.no_grad():
        a, b = ours(ids), ours(edited)
    assert torch.equal(a[:, :5], b[:, :5]), "positions before the edit changed: the mask is not causal"
    assert not torch.allclose(a[:, 5:], b[:, 5:]), "the edit changed nothing"


def test_float64_matches_the_reference_in_float64():
    ref, ours = reference_and_ours(CLIPTextConfig.tiny())
    ids = prompts()
    with torch.no_grad():
        expected = ref.double()(input_ids=ids).last_hidden_state
        got = ours.double()(ids)
    assert got.dtype == expected.dtype == torch.float64
    abs_err, rel_err = errors(got, expected)
    assert rel_err <= 5e-15, f"max abs err {abs_err:.3g}, max rel err {rel_err:.3g}"  # measured 5.6e-16


def test_bfloat16_runs_close_to_fp32():
    ref, ours = reference_and_ours(CLIPTextConfig.tiny())
    ids = prompts()
    with torch.no_grad():
        expected = ref(input_ids=ids).last_hidden_state
        got = ours.to(torch.bfloat16)(ids)
    assert got.dtype == torch.bfloat16
    abs_err, rel_err = errors(got, expected)
    # bf16 (8-bit mantissa) against fp32: measured 1.0e-2
    assert rel_err <= 5e-2, f"max abs err {abs_err:.3g}, max rel err {rel_err:.3g}"


def test_full_size_inventory():
    cfg = CLIPTextConfig()  # SD1.5 / ViT-L/14 text tower
    with torch.device("meta"):
        ref = transformers.CLIPTextModel(reference_text_config(cfg))
        ours = CLIPTextModel(cfg)
    expected = {k: tuple(v.shape) for k, v in text_state(ref).items()}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got == expected, f"missing {sorted(expected.keys() - got.keys())}, extra {sorted(got.keys() - expected.keys())}"
    assert got["text_model.embeddings.token_embedding.weight"] == (49408, 768)
    assert len(got) == 196  # 2 embeddings + 12 layers × 16 + final LayerNorm × 2
