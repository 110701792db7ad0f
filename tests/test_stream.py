"""Streamed weights (minidiffseg/sd/stream.py, docs/memory.md §1): the same results as resident weights,
bit for bit, with no weight resident between blocks; the same load-time errors; one clear line when the
file changes under a run."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from PIL import Image

import minidiffseg.sd.precision as precision
import tiny_sd
from minidiffseg.errors import UserError
from minidiffseg.method.segmenter import Segmenter
from minidiffseg.sd import load_sd
from minidiffseg.sd.clip import CLIPTextModel
from minidiffseg.sd.config import CLIPTextConfig, UNetConfig, VAEConfig
from minidiffseg.sd.loading import build_on_meta
from minidiffseg.sd.stream import ALIGN, ARENA, RESIDENT, StreamedWeights, blocks, weights_of
from minidiffseg.sd.unet import UNet
from minidiffseg.sd.vae import VAEEncoder

RES = 128  # image side for the tiny model: a 16² latent


@pytest.fixture(scope="module")
def single_file(tmp_path_factory):
    return tiny_sd.write_tiny_single_file(tmp_path_factory.mktemp("single") / "sd15-tiny.safetensors")


@pytest.fixture(scope="module")
def image():
    return Image.radial_gradient("L").resize((96, 80)).convert("RGB")  # not square: upsampling back is exercised


def networks(sd):
    return {"unet": sd.unet, "vae": sd.vae, "text_encoder": sd.text_encoder}


def assert_same_result(a, b):
    for field in ("scores", "mask", "fused", "refined"):
        x, y = getattr(a, field), getattr(b, field)
        assert torch.equal(x, y), f"{field}: max abs diff {(x.double() - y.double()).abs().max():.3g}"
    for field in ("levels", "layers"):
        x, y = getattr(a, field), getattr(b, field)
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), f"{field}[{k}]: max abs diff {(x[k] - y[k]).abs().max():.3g}"


@pytest.mark.parametrize("layout", ["folder", "folder fp16 files", "single file"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_equals_resident(tiny_sd_dir, single_file, image, layout, dtype):
    """Score maps, masks and every intermediate map: bit-identical to the resident run in the same dtype
    (fp32 files read as they are; fp32 -> bf16 and fp16 -> fp32/bf16 converted with the same rounding)."""
    path, variant = (single_file, None) if layout == "single file" else (tiny_sd_dir, "fp16" if "fp16" in layout else None)
    results = []
    for stream in (False, True):
        seg = Segmenter(load_sd(path, dtype=dtype, variant=variant, stream=stream), resolution=RES)
        results.append(seg(image, ["cat", "dog", "sofa"], seed=3))
    assert results[0].scores.std() > 0  # a real map, not a constant that would match anything
    assert_same_result(*results)


def streamed_starts(sd) -> dict[tuple[str, str], int]:
    """Filled as `sd`'s streamed networks run: (network, parameter) -> where its tensor started, mod ALIGN."""
    starts = {}
    for net_name, net in networks(sd).items():
        weights, read = net.weights, net.weights.read

        def record(module, weights=weights, read=read, net_name=net_name):
            state = read(module)
            prefix = weights.prefix[module] + "." if weights.prefix[module] else ""
            starts.update({(net_name, prefix + n): t.data_ptr() % ALIGN for n, t in state.items()})
            return state
        weights.read = record
    return starts


@pytest.mark.parametrize("layout", ["folder", "folder fp16 files", "single file"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_tensors_start_where_resident_ones_do(tiny_sd_dir, single_file, image, layout, dtype):
    """Bits equal by construction on every CPU: some CPUs' BLAS results depend on where a weight starts (an
    AVX2 AMD EPYC: an M = 1 product differs between a weight at 8 and at 0 mod 16), so every streamed tensor
    starts at its resident twin's address mod ALIGN (a view of the mapped file, or a fresh allocation).
    Checked on the addresses, so it fails on a CPU whose BLAS happens not to care as well."""
    path, variant = (single_file, None) if layout == "single file" else (tiny_sd_dir, "fp16" if "fp16" in layout else None)
    resident = load_sd(path, dtype=dtype, variant=variant)
    want = {(n, p): t.data_ptr() % ALIGN for n, net in networks(resident).items() for p, t in net.named_parameters()}
    streamed = load_sd(path, dtype=dtype, variant=variant, stream=True)
    got = streamed_starts(streamed)
    Segmenter(streamed, resolution=RES)(image, ["cat", "dog"], seed=0)
    assert got and got.keys() <= want.keys()  # what the method runs (it skips the U-Net's last blocks)
    off = {k: (want[k], got[k]) for k in got if want[k] != got[k]}
    assert not off, f"{len(off)} tensors start elsewhere mod {ALIGN} than resident (resident, streamed): " \
                    f"{dict(list(off.items())[:5])}"
    if dtype == torch.float32 and "fp16" not in layout:  # mapped views: the file offsets' residues, not all 0
        assert len(set(want.values())) > 1, set(want.values())


@pytest.mark.parametrize("layout", ["folder", "folder fp16 files"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_device_path_equals_resident(tiny_sd_dir, image, layout, dtype, monkeypatch):
    """The GPU's way of streaming (a block's bytes staged in one host buffer, one copy to the device, the
    conversion on the device), run on the CPU: the resident bits, and every parameter fetched once."""
    variant = "fp16" if "fp16" in layout else None
    monkeypatch.setattr(StreamedWeights, "staged", True)
    read = []
    monkeypatch.setattr(StreamedWeights, "host_buffer", lambda self, n: read.append(n) or ARENA.take(n))
    results = [Segmenter(load_sd(tiny_sd_dir, dtype=dtype, variant=variant, stream=stream), resolution=RES)(
        image, ["cat", "dog", "sofa"], seed=3) for stream in (False, True)]
    assert read, "the device path did not run"
    assert_same_result(*results)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_cuda_streamed_equals_resident(tiny_sd_dir, image, dtype):
    """On a GPU (python -m bench.gpu_check runs it): streamed through pinned memory as resident, within fp16's
    rounding at most (the maps' difference printed)."""
    results = [Segmenter(load_sd(tiny_sd_dir, dtype=dtype, variant="fp16", stream=stream, device="cuda"),
                         resolution=RES)(image, ["cat", "dog"], seed=3) for stream in (False, True)]
    err = (results[0].refined - results[1].refined).abs().max().item()
    assert err <= (1e-3 if dtype == torch.float16 else 1e-6), f"streamed vs resident on CUDA: max abs {err:.3e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_networks_equal_resident(tiny_sd_dir, dtype):
    """Each network's full output (the U-Net's ε through conv_out too, which the method skips), and every
    parameter fetched exactly once per pass: the bytes fetched equal the network's parameter bytes."""
    resident, streamed = load_sd(tiny_sd_dir, dtype=dtype), load_sd(tiny_sd_dir, dtype=dtype, stream=True)
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(1, 3, RES, RES, generator=g) * 2 - 1).to(dtype)
    ids = resident.tokenizer(["a photograph of a cat", "a dog"])
    z = torch.randn(2, 4, RES // 8, RES // 8, generator=g).to(dtype)
    with torch.inference_mode():
        ctx = resident.text_encoder(ids)
        runs = {"vae": lambda sd: sd.vae.moments(x)[0], "text_encoder": lambda sd: sd.text_encoder(ids),
                "unet": lambda sd: sd.unet(z, 100, ctx)}
        for name, run in runs.items():
            weights, fetched = networks(streamed)[name].weights, []
            read = weights.read
            weights.read = lambda module: fetched.append(state := read(module)) or state
            want, got = run(resident), run(streamed)
            assert torch.equal(want, got), f"{name}: max abs diff {(want - got).abs().max():.3g}"
            params = sum(p.numel() * p.element_size() for p in networks(resident)[name].parameters())
            nbytes = sum(t.numel() * t.element_size() for state in fetched for t in state.values())
            assert nbytes == params, f"{name}: fetched {nbytes} of {params} bytes"


def test_no_weight_resident(tiny_sd_dir):
    """Streamed networks hold only placeholders (one NaN scalar expanded: no memory) outside a block, with
    the compute dtype and device; resident networks have RESIDENT as their (no-op) weight source."""
    sd = load_sd(tiny_sd_dir, dtype=torch.bfloat16, stream=True)
    for name, net in networks(sd).items():
        assert isinstance(net.weights, StreamedWeights), name
        for pname, p in net.named_parameters():
            assert p.dtype == torch.bfloat16 and p.device.type == "cpu", pname
            assert all(s == 0 for s in p.stride()) and p.untyped_storage().nbytes() == 2, pname
            assert torch.isnan(p.flatten()[0]), pname
    assert all(weights_of(net) is RESIDENT for net in networks(load_sd(tiny_sd_dir)).values())


@pytest.mark.parametrize("cls, cfg", [(UNet, UNetConfig()), (VAEEncoder, VAEConfig()), (CLIPTextModel, CLIPTextConfig()),
                                      (UNet, UNetConfig.tiny()), (CLIPTextModel, CLIPTextConfig.tiny())])
def test_blocks_hold_every_parameter_once(cls, cfg):
    """The streaming grain a network declares (`stream_blocks`) covers each parameter exactly once, so a
    streamed pass fetches all weights and none twice; no full-size U-Net block holds more than the 34.8 M
    parameters of a 1280-wide transformer (docs/memory.md §2: a whole up resnet, 49 M, set the peak)."""
    net = build_on_meta(cls, cfg)
    owner = {}
    for b in blocks(net):
        for p in b.parameters():
            assert id(p) not in owner, f"a parameter in two blocks: {type(owner[id(p)]).__name__}, {type(b).__name__}"
            owner[id(p)] = b
    missing = [n for n, p in net.named_parameters() if id(p) not in owner]
    assert not missing, f"parameters in no block: {missing[:5]}"
    assert len(blocks(net)) > 3
    if cls is UNet and cfg == UNetConfig():
        largest = max(sum(p.numel() for p in b.parameters()) for b in blocks(net))
        assert largest <= 34_760_960, f"the largest U-Net block holds {largest:,} parameters"


def test_networks_know_nothing_of_weight_storage():
    """The U-Net, VAE and text encoder modules import nothing of sd/stream.py: streaming is applied from outside."""
    import re
    from pathlib import Path

    import minidiffseg.sd as sd
    for name in ("unet.py", "vae.py", "clip.py", "attention.py"):
        text = (Path(sd.__file__).parent / name).read_text()
        assert not re.search(r"^\s*(from|import)\s+\S*(stream|arena|weightfile)", text, re.M), f"{name} imports streaming"
        assert not re.search(r"weights\.block|RESIDENT|weights=", text), f"{name} asks for its weights"


def test_an_interrupted_block_is_released(tiny_sd_dir, image):
    """A KeyboardInterrupt inside a streamed block (it skips torch's hooks) leaves no block held: the next
    run streams and gives the resident result."""
    seg = Segmenter(load_sd(tiny_sd_dir, stream=True), resolution=RES)
    target = seg.sd.unet.mid_block.attentions[0]
    hit = target.register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        seg(image, ["cat", "dog"], seed=0)
    hit.remove()
    assert_same_result(Segmenter(load_sd(tiny_sd_dir), resolution=RES)(image, ["cat", "dog"], seed=0),
                       seg(image, ["cat", "dog"], seed=0))


def test_block_holds_the_weights_only_inside(tiny_sd_dir):
    resident, streamed = load_sd(tiny_sd_dir), load_sd(tiny_sd_dir, stream=True)
    resnet, want = streamed.unet.down_blocks[0].resnets[0], resident.unet.down_blocks[0].resnets[0]
    with streamed.unet.weights.block(resnet):
        for (name, p), q in zip(resnet.named_parameters(), want.parameters()):
            assert torch.equal(p, q), name
        with pytest.raises(RuntimeError, match="inside another one"):  # one block at a time
            with streamed.unet.weights.block(streamed.unet.conv_in):
                pass
    assert torch.isnan(resnet.conv1.weight.flatten()[0])


@pytest.mark.parametrize("stream", [False, True])
def test_to_moves_the_weight_source(tiny_sd_dir, image, stream, monkeypatch):
    """`Segmenter.to(dtype=bf16)` gives the results of loading in bf16: a resident network is converted, a
    streamed one keeps streaming, now in bf16, its placeholders moved without building any weight. (On a
    CPU without fast bf16, `.to` would choose fp32 arithmetic: tests/test_precision.py; here bf16 is taken.)"""
    monkeypatch.setattr(precision, "fast_on_cpu", lambda dtype: True)
    seg = Segmenter(load_sd(tiny_sd_dir, dtype=torch.float32, variant="fp16", stream=stream), resolution=RES)
    seg.to(dtype=torch.bfloat16)
    assert seg.dtype == torch.bfloat16
    for name, net in networks(seg.sd).items():
        assert isinstance(weights_of(net), StreamedWeights) if stream else weights_of(net) is RESIDENT, name
        if stream:  # placeholders: one bf16 NaN each
            assert all(p.untyped_storage().nbytes() == 2 for p in net.parameters()), name
    want = Segmenter(load_sd(tiny_sd_dir, dtype=torch.bfloat16, variant="fp16"), resolution=RES)
    assert_same_result(want(image, ["cat", "dog"], seed=1), seg(image, ["cat", "dog"], seed=1))


def corrupt_copy(src, dst):
    """A copy of the tiny folder whose U-Net file ends 100 bytes early (a cut-short download)."""
    shutil.copytree(src, dst)
    unet = dst / "unet" / "diffusion_pytorch_model.safetensors"
    with open(unet, "r+b") as f:
        f.truncate(unet.stat().st_size - 100)
    return dst


def test_bad_file_fails_at_load_with_the_resident_error(tiny_sd_dir, tmp_path):
    broken = corrupt_copy(tiny_sd_dir, tmp_path / "broken")
    errors = []
    for stream in (False, True):
        with pytest.raises(UserError) as e:
            load_sd(broken, stream=stream)
        errors.append(str(e.value))
    assert errors[0] == errors[1] and "truncated" in errors[0], errors


@pytest.mark.parametrize("change", ["cut short", "rewritten", "grown"])
def test_file_changed_during_a_run(tiny_sd_dir, tmp_path, image, change):
    """The file is modified after loading, before a pass: one UserError line naming the file, no result;
    the model works again once nothing changes (a fresh load)."""
    folder = shutil.copytree(tiny_sd_dir, tmp_path / "sd")
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    seg = Segmenter(load_sd(folder, stream=True), resolution=RES)
    seg(image, ["cat"])
    data = unet.read_bytes()
    if change == "cut short":
        unet.write_bytes(data[:-4096])
    elif change == "rewritten":  # same size, different bytes, a later modification time
        unet.write_bytes(data[:-8] + bytes(8))
        st = os.stat(unet)
        os.utime(unet, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    else:
        unet.write_bytes(data + bytes(64))
    with pytest.raises(UserError, match=r"diffusion_pytorch_model\.safetensors: the file changed or was cut short") as e:
        seg(image, ["cat"])
    assert "\n" not in str(e.value)


def test_file_replaced_during_a_run_is_harmless(tiny_sd_dir, tmp_path, image):
    """A new file moved over the old one (how downloads finish): the open file is still the one read."""
    folder = shutil.copytree(tiny_sd_dir, tmp_path / "sd")
    want = Segmenter(load_sd(folder), resolution=RES)(image, ["cat", "dog"])
    seg = Segmenter(load_sd(folder, stream=True), resolution=RES)
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    other = tiny_sd.write_tiny_diffusers(tmp_path / "other", seed=1) / "unet" / "diffusion_pytorch_model.safetensors"
    os.replace(other, unet)
    assert_same_result(want, seg(image, ["cat", "dog"]))


def test_cli_stream_and_low_memory(tiny_sd_dir, tmp_path, image):
    """`segment --stream` writes the resident run's scores; `--low-memory` (streamed, at most 4 classes per U-Net
    call) those of the resident run with --class-batch 4 (other batch sizes round differently), both in fp32:
    without --dtype, --low-memory computes in bf16 where the CPU has fast bf16 (cli/options.py dtype_of)."""
    from safetensors.torch import load_file

    from minidiffseg.cli import main

    photo = tmp_path / "photo.png"
    image.save(photo)
    classes = "cat,dog,sofa,person,car"
    outs = {}
    for flags in ([], ["--stream"], ["--class-batch", "4"], ["--low-memory", "--dtype", "fp32"]):
        out = tmp_path / ("out" + "".join(flags))
        assert main(["segment", str(photo), "--classes", classes, "--weights", str(tiny_sd_dir), "--device", "cpu",
                     "--resolution", str(RES), "--out", str(out), *flags]) == 0
        outs[tuple(flags)] = load_file(out / "photo_scores.safetensors")
    for flags, same in ((("--stream",), ()), (("--low-memory", "--dtype", "fp32"), ("--class-batch", "4"))):
        for k, v in outs[same].items():
            assert torch.equal(outs[flags][k], v), f"{flags} {k}: max abs diff {(outs[flags][k] - v).abs().max()}"


def test_low_memory_options():
    from argparse import Namespace

    from minidiffseg.cli.options import LOW_MEMORY_CLASSES, memory_options

    assert memory_options(Namespace(stream=False, low_memory=False), 7) == dict(stream=False, class_batch=7)
    assert memory_options(Namespace(stream=True, low_memory=False)) == dict(stream=True, class_batch=None)
    assert memory_options(Namespace(stream=False, low_memory=True)) == dict(stream=True, class_batch=LOW_MEMORY_CLASSES)
    assert memory_options(Namespace(stream=False, low_memory=True), 2) == dict(stream=True, class_batch=2)


@pytest.fixture(scope="module")
def full_size(tmp_path_factory):
    """Full-size random SD1.5 with the hub's fp16 files (~2.1 GB)."""
    return tiny_sd.write_random_diffusers(tmp_path_factory.mktemp("sd15-full"))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_size_streamed_equals_resident(full_size, dtype):
    """Once on the full-size random SD1.5, at 512² with 2 classes (8192 token rows: the feed-forward runs in
    blocks): streamed == resident, bit for bit. Its weights (N(0, 0.02²)) make nearly uniform attention: the
    maps vary in fp32, while bf16 rounds them flat (still compared: equal, no NaN). bf16 as
    `from_pretrained` runs it on this CPU: true bf16 where it is fast, else fp32 arithmetic from the fp16
    weights kept resident (sd/precision.py), so it never takes the ~30× longer emulated bf16 path."""
    image = Image.radial_gradient("L").resize((640, 480)).convert("RGB")
    results = []
    for stream in (False, True):
        seg = Segmenter.from_pretrained(full_size, dtype=dtype, stream=stream)
        results.append(seg(image, ["cat", "dog"], seed=0))
        del seg
    ARENA.release()
    if dtype == torch.float32:
        assert results[0].fused.std() > 0 and results[0].refined.std() > 0
    assert not results[1].refined.isnan().any()
    assert_same_result(*results)
