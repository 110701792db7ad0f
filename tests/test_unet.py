"""U-Net parity with diffusers' UNet2DConditionModel on identical random weights: ε, and the
attention probabilities of every layer; the attention store's explicit path vs SDPA."""

import pytest
import torch

from minidiffseg.sd.attention import AttentionStore
from minidiffseg.sd.config import UNetConfig
from minidiffseg.sd.unet import FeedForward, UNet

from reference_sd import StoreEveryMap  # diffusers attention processor keeping every probability map
from parity import rel_err
from tiny_sd import randomise_, reference_unet  # diffusers: the reference U-Net


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    cfg = UNetConfig.tiny()
    ref = randomise_(reference_unet(cfg), seed=0)
    ours = UNet(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return cfg, ref, ours


def inputs(cfg, b=2, hw=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, hw, hw, generator=g), torch.randn(b, 77, cfg.cross_attention_dim, generator=g)


@pytest.mark.parametrize("ff_rows", [None, 100], ids=["whole", "feed-forward-in-row-blocks"])
def test_eps_matches_diffusers(pair, monkeypatch, ff_rows):
    cfg, ref, ours = pair
    x, ctx = inputs(cfg, b=3)
    if ff_rows:  # 3 × 256 rows at the first level: blocks of 100 rows, a ragged last one
        monkeypatch.setattr(FeedForward, "ROWS", ff_rows)
    with torch.no_grad():
        want = ref(x, 100, ctx).sample
        got = ours(x, 100, ctx)
    err = rel_err(got, want)
    assert err <= 1e-5, f"U-Net ε: max abs {(got - want).abs().max():.3e}, max rel {err:.3e}"


def test_every_attention_probability_matches_diffusers(pair):
    cfg, ref, ours = pair
    x, ctx = inputs(cfg, hw=24)  # non-power-of-two latent: levels are factors, not pixel sizes
    maps = {}
    ref.set_attn_processor({n: StoreEveryMap(n.removesuffix(".processor"), maps) for n in ref.attn_processors})
    names = {m.name for m in ours.attention_layers()}
    store = AttentionStore(probs=names)
    with torch.no_grad():
        e_ref = ref(x, 100, ctx).sample
        e_ours = ours(x, 100, ctx, store=store)
    want = {name: m.mean(1) for name, m in maps.items()}  # (B, heads, N, T) -> head mean (B, N, T)
    assert set(want) == names and len(names) == 32
    for name in names:
        err = rel_err(store.prob_maps[name], want[name])
        assert err <= 1e-5, f"{name}: max abs {(store.prob_maps[name] - want[name]).abs().max():.3e}, rel {err:.3e}"
    assert rel_err(e_ours, e_ref) <= 1e-5  # the explicit path gives the same output
    levels = {m.name: m.level for m in ours.attention_layers()}
    for name, (h, w) in store.shapes.items():
        assert (h * levels[name], w * levels[name]) == (24, 24) and store.prob_maps[name].shape[1] == h * w


def test_store_paths_agree_with_sdpa_and_accumulate(pair):
    cfg, _, ours = pair
    x, ctx = inputs(cfg)
    cross = {m.name for m in ours.attention_layers("cross")}
    selfs = {m.name for m in ours.attention_layers("self", level=1)}
    w = torch.zeros(2, 77, 2)
    w[:, 5, 0] = 1.0
    w[:, 6:8, 1] = 0.5  # map 1 = mean of tokens 6 and 7
    store = AttentionStore(cross=cross, token_weights=w, qk=selfs, probs=cross)
    with torch.no_grad():
        plain = ours(x, 100, ctx)
        recorded = ours(x, 100, ctx, store=store)
        ours(x, 100, ctx, store=store)  # a second pass accumulates
    assert rel_err(recorded, plain) <= 1e-5, "explicit (recording) path differs from SDPA"
    assert len(selfs) == 5 and all(len(store.qk_pairs[n]) == 2 for n in selfs)
    for name in cross:
        assert store.count[name] == 2
        p = store.mean(store.prob_maps, name)  # (B, HW, 77)
        want = torch.stack([p[..., 5], p[..., 6:8].mean(-1)], dim=-1)
        got = store.mean(store.cross_maps, name)
        assert torch.allclose(got, want, atol=1e-6), f"{name}: token projection differs"
    assert store.qk_pairs[next(iter(selfs))][0][0].shape == (2, 8, 16 * 16, 32 // 8)


def test_one_latent_for_many_prompts_equals_the_expanded_batch(pair):
    """latents (1, …) with B prompts: the text-independent prefix runs once, the rest per row; ε and
    every recording equal diffusers' (and our own) pass on the latent repeated B times."""
    cfg, ref, ours = pair
    x, ctx = inputs(cfg, b=3)
    x = x[:1]
    cross = {m.name for m in ours.attention_layers("cross")}
    selfs = [m.name for m in ours.attention_layers("self", level=1)]
    w = torch.zeros(3, 77, 1)
    w[:, 4, 0] = 1.0
    one, full = (AttentionStore(cross=cross, token_weights=w, qk=set(selfs)) for _ in range(2))
    with torch.no_grad():
        want = ref(x.expand(3, -1, -1, -1), 100, ctx).sample
        got = ours(x, 100, ctx, store=one)
        ours(x.expand(3, -1, -1, -1), 100, ctx, store=full)
    assert got.shape == want.shape and rel_err(got, want) <= 1e-5, f"ε: rel {rel_err(got, want):.3e}"
    for name in cross:
        assert rel_err(one.cross_maps[name], full.cross_maps[name]) <= 1e-5, name
    first = one.qk_pairs[selfs[0]][0][0]
    assert first.shape[0] == 1, "the first self-attention (before any text) should run once"
    assert rel_err(first.expand(3, -1, -1, -1), full.qk_pairs[selfs[0]][0][0]) <= 1e-5
    assert all(one.qk_pairs[n][0][0].shape[0] == 3 for n in selfs[1:])


def test_output_can_be_skipped(pair):
    cfg, _, ours = pair
    x, ctx = inputs(cfg)
    store = AttentionStore(probs={ours.attention_layers()[-1].name})
    assert ours(x, 100, ctx, store=store, output=False) is None
    assert store.count[ours.attention_layers()[-1].name] == 1


def test_full_size_inventory_equals_diffusers():
    with torch.device("meta"):
        ref = reference_unet(UNetConfig())
        ours = UNet(UNetConfig())
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got.keys() == want.keys(), f"missing {sorted(want.keys() - got.keys())[:5]}, extra {sorted(got.keys() - want.keys())[:5]}"
    bad = [k for k in want if want[k] != got[k]]
    assert not bad, f"shape mismatch: {[(k, got[k], want[k]) for k in bad[:5]]}"
    assert sum(v.numel() for v in ours.parameters()) == 859_520_964  # SD1.5 U-Net parameter count
    levels = sorted((m.level, m.kind) for m in ours.attention_layers())
    assert levels.count((1, "self")) == 5 and levels.count((8, "cross")) == 1 and len(levels) == 32
