"""The compute dtype that suits the processor (minidiffseg/sd/precision.py, docs/precision.md): half
precision where the CPU computes it fast, else float32 arithmetic from weights kept in half precision,
up-cast block by block — the same bits as a float32 run from those half-precision weights."""

from __future__ import annotations

import time

import pytest
import torch
from PIL import Image

import minidiffseg.sd.precision as precision_module
from conftest import TINY_RES
from minidiffseg.cli import main
from minidiffseg.method.segmenter import Segmenter
from minidiffseg.sd import load_sd
from minidiffseg.sd.precision import Precision, decide, fast_on_cpu, precision, probe
from minidiffseg.sd.stream import RESIDENT, UpcastWeights, weights_of

NO = {"avx512_bf16": False, "amx_tile": False, "amx_fp16": False}


def no_probe(dtype):
    raise AssertionError("the probe must not run where torch's queries answer")


@pytest.mark.parametrize("queries, bf16, fp16", [
    (NO, False, False),  # AVX2 (the AMD EPYC measured), AVX-512 without BF16
    ({**NO, "avx512_bf16": True}, True, False),  # Zen 4, Cooper Lake
    ({**NO, "amx_tile": True}, True, False),  # Sapphire Rapids
    ({**NO, "amx_tile": True, "amx_fp16": True}, True, True),  # Granite Rapids
])
def test_x86_decides_from_torch_queries(queries, bf16, fp16):
    assert decide(torch.bfloat16, "x86_64", queries, no_probe) is bf16
    assert decide(torch.float16, "AMD64", queries, no_probe) is fp16
    assert decide(torch.float32, "x86_64", queries, no_probe) is True


@pytest.mark.parametrize("measured", [True, False])
def test_other_machines_decide_by_the_probe(measured):
    asked = []
    assert decide(torch.bfloat16, "aarch64", NO, lambda dt: asked.append(dt) or measured) is measured
    assert asked == [torch.bfloat16]


def test_the_decision_is_made_once_per_process(monkeypatch):
    calls = []
    monkeypatch.setattr(precision_module, "_queries", lambda: calls.append(1) or NO)
    monkeypatch.setattr(precision_module.platform, "machine", lambda: "x86_64")
    fast_on_cpu.cache_clear()
    try:
        assert [fast_on_cpu(torch.bfloat16) for _ in range(3)] == [False] * 3 and len(calls) == 1
    finally:
        fast_on_cpu.cache_clear()


def test_the_probe_is_quick_and_answers():
    start = time.perf_counter()
    assert probe(torch.float32) in (True, False)  # float32 against itself: ties either way
    assert probe(torch.bfloat16, side=64) in (True, False)
    assert time.perf_counter() - start < 5  # milliseconds where bf16 is fast, well under a second where not


def test_precision_rules():
    fast_bf16 = {torch.bfloat16: True, torch.float16: False}.get
    slow = {torch.bfloat16: False, torch.float16: False}.get
    assert precision(torch.bfloat16, "cpu", fast_bf16, warn=False) == Precision(torch.bfloat16)
    assert precision(torch.float16, "cpu", fast_bf16, warn=False).compute == torch.bfloat16
    for dt in (torch.bfloat16, torch.float16):
        p = precision(dt, "cpu", slow, warn=False)
        assert (p.compute, p.keep) == (torch.float32, dt) and "float32" in p.note
        assert precision(dt, "cuda", slow, warn=False) == Precision(dt)  # a GPU computes what it is asked
    assert precision(torch.float32, "cpu", slow, warn=False) == Precision(torch.float32)
    with pytest.warns(UserWarning, match="no fast bfloat16 arithmetic"):
        precision(torch.bfloat16, "cpu", slow)


@pytest.fixture(scope="module")
def image():
    return Image.radial_gradient("L").resize((96, 80)).convert("RGB")


def run(sd, image):
    return Segmenter(sd, resolution=TINY_RES)(image, ["cat", "dog", "sofa"], seed=3)


def same(a, b):
    for field in ("scores", "mask", "fused", "refined"):
        x, y = getattr(a, field), getattr(b, field)
        assert torch.equal(x, y), f"{field}: max abs diff {(x.double() - y.double()).abs().max():.3g}"


def test_fp16_files_kept_as_stored_give_the_fp32_bits(tiny_sd_dir, image):
    """fp16 files, bf16 asked on a slow CPU: the fp16 tensors stay as stored (views of the mapped file: no
    copy), each block up-cast to fp32 (exact): bit for bit the fp32 run from the fp16 files."""
    kept = load_sd(tiny_sd_dir, dtype=torch.float32, variant="fp16", keep=torch.bfloat16)
    for net in (kept.unet, kept.vae, kept.text_encoder):
        assert isinstance(net.weights, UpcastWeights)
        assert {t.dtype for t in net.weights.tensors.values()} == {torch.float16}  # the file's own dtype
        assert all(p.untyped_storage().nbytes() == 4 for p in net.parameters())  # placeholders only
    same(run(kept, image), run(load_sd(tiny_sd_dir, dtype=torch.float32, variant="fp16"), image))


def test_fp32_files_kept_in_bf16_give_the_fp32_bits_of_bf16_weights(tiny_sd_dir, image):
    kept = load_sd(tiny_sd_dir, dtype=torch.float32, keep=torch.bfloat16)  # fp32 files -> bf16 kept
    assert {t.dtype for t in kept.unet.weights.tensors.values()} == {torch.bfloat16}
    want = load_sd(tiny_sd_dir, dtype=torch.bfloat16)
    for net in (want.unet, want.vae, want.text_encoder):
        net.float()  # bf16-rounded weights in fp32, converted at load
    same(run(kept, image), run(want, image))


def test_from_pretrained_and_to_follow_the_cpu(tiny_sd_dir, image, monkeypatch):
    monkeypatch.setattr(precision_module, "fast_on_cpu", lambda dt: False)
    with pytest.warns(UserWarning, match="computing in float32"):
        seg = Segmenter.from_pretrained(tiny_sd_dir, dtype=torch.bfloat16, resolution=TINY_RES)
    assert seg.dtype == torch.float32 and isinstance(seg.sd.unet.weights, UpcastWeights)
    with pytest.warns(UserWarning):
        moved = Segmenter.from_pretrained(tiny_sd_dir, resolution=TINY_RES).to(dtype=torch.bfloat16)
    assert moved.dtype == torch.float32 and isinstance(moved.sd.unet.weights, UpcastWeights)
    same(seg(image, ["cat", "dog"], seed=1), moved(image, ["cat", "dog"], seed=1))
    monkeypatch.setattr(precision_module, "fast_on_cpu", lambda dt: True)  # a CPU with bf16: true bf16
    fast = Segmenter.from_pretrained(tiny_sd_dir, dtype=torch.bfloat16, resolution=TINY_RES)
    assert fast.dtype == torch.bfloat16 and weights_of(fast.sd.unet) is RESIDENT


def test_cli_warns_once_and_computes_fp32(tiny_sd_dir, image, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(precision_module, "fast_on_cpu", lambda dt: False)
    image.save(tmp_path / "a.png")
    code = main(["segment", str(tmp_path / "a.png"), "--classes", "cat,dog", "--weights", str(tiny_sd_dir),
                 "--dtype", "bf16", "--resolution", str(TINY_RES), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 0 and (tmp_path / "out" / "a_mask.png").is_file()
    warned = [line for line in err if line.startswith("minidiffseg: warning:")]
    assert len(warned) == 1 and "no fast bfloat16 arithmetic" in warned[0], err
