"""Fusion and self-attention refinement on synthetic tensors: exactness against the naive S·A,
bounded memory, and recovering known blobs."""

import subprocess
import sys
import textwrap

import torch

from minidiffseg.method.fusion import fuse, minmax
from minidiffseg.method.refine import refine, refine_chunked, refine_naive, self_attention_matrix
from minidiffseg.method.decision import decide, upsample_scores


def random_qk(layers=5, b=1, heads=8, n=4096, d=40, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, heads, n, d, generator=g, dtype=dtype) * 2,
             torch.randn(b, heads, n, d, generator=g, dtype=dtype) * 2) for _ in range(layers)]


def test_fused_refinement_equals_naive_in_float64_real_shapes():
    qk = random_qk()  # 5 layers × 8 heads, 4096 tokens, head dim 40
    s = self_attention_matrix(qk)  # (1, 4096, 4096), the naive S, built once
    for c in (1, 8):
        a = torch.rand(1, 4096, c, dtype=torch.float64, generator=torch.Generator().manual_seed(c))
        want = s @ a
        for name, fn in (("sdpa", refine), ("chunked", refine_chunked)):
            got = fn(qk, a)
            err = (got - want).abs().max().item()
            assert err <= 5e-15, f"{name}, C={c}: max abs error {err:.3e} vs naive S·A"  # measured ≤ 5.6e-16


def test_refinement_wider_than_head_dim_and_batched():
    qk = random_qk(layers=2, b=2, heads=2, n=256, d=8)
    a = torch.rand(2, 256, 19, dtype=torch.float64)  # 19 maps > head dim 8: sliced
    err = (refine(qk, a) - refine_naive(qk, a)).abs().max().item()
    assert err <= 1e-14, f"max abs error {err:.3e}"  # measured 1.3e-15
    # each batch row is refined with its own Q/K
    row1 = refine([(q[1:], k[1:]) for q, k in qk], a[1:])
    assert torch.allclose(refine(qk, a)[1:], row1, atol=1e-12)


def test_a_layer_shared_by_all_rows_is_applied_once():
    """A Q/K pair of batch 1 (the U-Net's text-independent first self-attention) refines every row's
    maps exactly like the same pair repeated per row, in one attention over B·K columns."""
    qk = random_qk(layers=3, b=3, heads=2, n=256, d=8)
    qk[0] = (qk[0][0][:1], qk[0][1][:1])
    a = torch.rand(3, 256, 5, dtype=torch.float64)  # B·K = 15 > head dim 8: sliced too
    repeated = [(q.expand(3, -1, -1, -1), k.expand(3, -1, -1, -1)) for q, k in qk]
    want = refine_naive(repeated, a)
    for name, got in (("fused", refine(qk, a)), ("chunked", refine_chunked(qk, a)), ("naive", refine_naive(qk, a))):
        err = (got - want).abs().max().item()
        assert err <= 1e-14, f"{name}: max abs error {err:.3e} vs the repeated Q/K"  # measured ≤ 1.4e-15


MEASURE = textwrap.dedent("""
    import sys, torch
    from minidiffseg.method.refine import refine, refine_naive
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    qk = [(torch.randn(1, 8, 4096, 40, generator=g), torch.randn(1, 8, 4096, 40, generator=g)) for _ in range(5)]
    a = torch.rand(1, 4096, 8)
    fn = {"fused": refine, "naive": refine_naive}[sys.argv[1]]
    fn([(q[:, :, :256], k[:, :, :256]) for q, k in qk[:1]], a[:, :256, :1])  # warm up on a small problem
    def peak_kb():  # VmHWM belongs to this process's memory map (ru_maxrss is inherited from the parent)
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
    base = peak_kb()
    fn(qk, a)
    print((peak_kb() - base) / 1024)
""")


def test_joint_refinement_is_the_image_block_of_the_joint_softmax():
    """An MM-DiT's pair (image queries, image + text keys): M = S·A with S the image × image block of the head-mean
    joint softmax, its rows divided by their image mass (renormalise) or not; built explicitly here in float64.
    Renormalised, it is not the softmax over the image keys alone: the head mean weighs each head by its image mass."""
    g = torch.Generator().manual_seed(4)
    b, heads, n, text, d, k = 2, 4, 64, 20, 16, 3
    q = torch.randn(b, heads, n, d, generator=g, dtype=torch.float64)
    keys = torch.randn(b, heads, n + text, d, generator=g, dtype=torch.float64)
    keys[..., n:, :] *= 2  # text keys that take a visible share of each row
    maps = torch.rand(b, n, k, generator=g, dtype=torch.float64)
    p = torch.softmax(q @ keys.transpose(-1, -2) / d ** 0.5, dim=-1).mean(1)[:, :, :n]  # (B, n, n): rows < 1
    mass = p.sum(-1, keepdim=True)
    assert 0.05 < 1 - mass.mean() < 0.95  # the text keys matter
    for renormalise, s in ((True, p / mass), (False, p)):
        got = refine([(q, keys)], maps, renormalise)
        err = (got - s @ maps).abs().max().item()
        assert err <= 1e-13, f"joint refinement (renormalise={renormalise}) vs explicit: max abs {err:.3e}"
    image_only = refine([(q, keys[:, :, :n])], maps)  # per-head softmax over the image keys: another S
    assert not torch.allclose(image_only, refine([(q, keys)], maps), atol=1e-6)


def peak_extra_mb(kind: str) -> float:
    out = subprocess.run([sys.executable, "-c", MEASURE, kind], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def test_fused_refinement_memory_is_linear_in_hw():
    fused, naive = peak_extra_mb("fused"), peak_extra_mb("naive")
    # S for 8 heads in fp32 is 8·4096²·4 B = 512 MB; O(HW·C) data is a few MB (Q, K are allocated before)
    assert naive > 400, f"naive S·A should build S (>400 MB), measured +{naive:.0f} MB"
    assert fused < 64, f"fused refinement peak extra memory +{fused:.0f} MB (naive +{naive:.0f} MB)"


def blob_scene(size=32):
    """Two classes whose cross-attention peaks on two different blobs, and self-attention whose
    tokens attend within their own region (left square, right square, background)."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    left = ((yy - 16).abs() < 6) & ((xx - 8).abs() < 6)
    right = ((yy - 16).abs() < 6) & ((xx - 24).abs() < 6)
    region = torch.zeros(size, size, dtype=torch.long)
    region[left], region[right] = 1, 2
    # cross maps: a noisy bump on a part of each blob (attention is peaky, not a clean mask)
    g = torch.Generator().manual_seed(0)
    bump1 = torch.exp(-((yy - 15) ** 2 + (xx - 7) ** 2) / 8.0)
    bump2 = torch.exp(-((yy - 17) ** 2 + (xx - 25) ** 2) / 8.0)
    noise = 0.05 * torch.rand(2, size, size, generator=g)
    cross = torch.stack([bump1, bump2]) + noise  # (2, h, w)
    # self-attention: q = k = large one-hot of the region -> softmax is uniform within the region
    onehot = torch.nn.functional.one_hot(region.flatten(), 3).float() * 12.0  # (HW, 3)
    q = onehot[None, None].repeat(1, 2, 1, 1)  # (1, heads, HW, 3)
    return region, cross, [(q, q.clone())]


def test_fusion_and_refinement_recover_known_blobs():
    region, cross, qk = blob_scene()
    size = region.shape
    # levels: the same maps at 1/1, 1/2, 1/4, 1/8 resolution as a U-Net would record them
    maps = {lvl: torch.nn.functional.avg_pool2d(cross[:, None], lvl)[:, 0][None].transpose(0, 1)
            for lvl in (1, 2, 4, 8)}  # {level: (B=2, K=1, h_l, w_l)}
    a = fuse(maps, size)  # (2, 1, h, w)
    assert a.min() >= 0 and a.max() <= 1 + 1e-6
    # fusion is the weighted sum of the per-level min-max maps: linear in the weights, level 1 as is
    assert torch.allclose(fuse(maps, size, {1: 1.0}), minmax(maps[1]))
    halves = fuse(maps, size, {8: 0.3, 4: 0.5}) + fuse(maps, size, {2: 0.1, 1: 0.1})
    assert torch.allclose(a, halves, atol=1e-6)
    m = refine(qk * 1, a.flatten(1).T[None]).reshape(*size, 2).permute(2, 0, 1)  # one S for both classes
    scores = upsample_scores(m, (64, 64))
    mask = decide(scores, tau=0.5)
    want = torch.nn.functional.interpolate(region[None, None].float(), size=(64, 64), mode="nearest")[0, 0].long()
    agree = (mask == want).float().mean().item()
    assert agree > 0.97, f"blob mask agrees with the truth on {agree:.1%} of pixels"
    # without the refinement the raw bumps cover only part of each blob
    raw = decide(upsample_scores(a[:, 0], (64, 64)), tau=0.5)
    assert (raw == want).float().mean().item() < agree


def test_minmax_and_decide():
    x = torch.tensor([[[1.0, 3.0], [2.0, 5.0]], [[4.0, 4.0], [4.0, 4.0]]])
    y = minmax(x)
    assert torch.equal(y[0], torch.tensor([[0.0, 0.5], [0.25, 1.0]])) and torch.equal(y[1], torch.zeros(2, 2))
    # a constant map stays constant through the bilinear upsampling's rounding
    assert torch.equal(upsample_scores(torch.full((1, 7, 9), 0.7), (300, 451)), torch.zeros(1, 300, 451))
    mask = decide(torch.tensor([[[0.2, 0.9]], [[0.6, 0.1]]]), tau=0.5)
    assert mask.tolist() == [[2, 1]]
