"""`load_sd` on tiny random checkpoints written by the reference libraries (tests/tiny_sd.py): the
diffusers folder and the LDM single file give identical models, equal to the references'; the fp16
variant; dtype/device; one clear error per kind of bad checkpoint; and (slow) the peak memory of
loading a full-size checkpoint."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from minidiffseg.sd import ldm
from minidiffseg.errors import UserError
from minidiffseg.sd.loading import RELEASE_BYTES
from minidiffseg.sd import load_sd
from minidiffseg.sd.tokenizer import CLIPTokenizer

import tiny_sd  # noqa: E402  (needs diffusers and transformers: assets.require)
diffusers, transformers = tiny_sd.diffusers, tiny_sd.transformers

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a photograph of a cat", "a photograph of an aeroplane over the sea"]


@pytest.fixture(scope="module")
def single_file(tmp_path_factory):
    """The tiny_sd_dir weights (same seed) as one LDM file, with tokenizer/ beside it."""
    return tiny_sd.write_tiny_single_file(tmp_path_factory.mktemp("single") / "sd15-tiny.safetensors")


def rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy safetensors file `src` to `dst` with its tensors passed through `edit(dict) -> dict`."""
    with safe_open(str(src), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(edit(tensors), dst, metadata=metadata)
    return dst


def outputs(sd) -> dict[str, torch.Tensor]:
    """U-Net ε, VAE latent mean and CLIP hidden states on fixed inputs, in float32."""
    g = torch.Generator().manual_seed(0)
    ids = sd.tokenizer(PROMPTS)  # (2, 77)
    image = torch.rand(2, 3, 32, 48, generator=g) * 2 - 1
    latents = torch.randn(2, 4, 16, 16, generator=g)
    context = torch.randn(2, 77, sd.unet.cfg.cross_attention_dim, generator=g)
    dtype = sd.unet.conv_in.weight.dtype
    with torch.no_grad():
        return {"clip": sd.text_encoder(ids).float(), "vae": sd.vae.encode(image, sample=False).float(),
                "unet": sd.unet(latents.to(dtype), 100, context.to(dtype)).float()}


def errors(got: torch.Tensor, want: torch.Tensor) -> str:
    err = (got - want).abs().max().item()
    return f"max abs {err:.3e}, max rel {err / want.abs().max().item():.3e}"


def params(model) -> dict[str, torch.Tensor]:
    return dict(model.state_dict())


# ---- the two layouts -----------------------------------------------------------------------------

def test_folder_and_single_file_give_identical_outputs(tiny_sd_dir, single_file):
    folder, single = load_sd(tiny_sd_dir), load_sd(single_file)
    assert (folder.unet.cfg, folder.vae.cfg, folder.text_encoder.cfg) == \
           (single.unet.cfg, single.vae.cfg, single.text_encoder.cfg)
    assert (folder.kind, folder.name) == (single.kind, single.name) == ("sd1", "SD1.5")
    a, b = outputs(folder), outputs(single)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k}: {errors(b[k], a[k])}"


def test_loaded_models_match_the_reference_libraries(tiny_sd_dir):
    """Our models as load_sd fills them vs the references loading the same folder themselves."""
    sd = load_sd(tiny_sd_dir)
    ours = outputs(sd)
    unet = diffusers.UNet2DConditionModel.from_pretrained(tiny_sd_dir / "unet").eval()
    vae = diffusers.AutoencoderKL.from_pretrained(tiny_sd_dir / "vae").eval()
    text = transformers.CLIPTextModel.from_pretrained(tiny_sd_dir / "text_encoder", dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)  # the same draws as outputs()
    image, latents = torch.rand(2, 3, 32, 48, generator=g) * 2 - 1, torch.randn(2, 4, 16, 16, generator=g)
    context = torch.randn(2, 77, sd.unet.cfg.cross_attention_dim, generator=g)
    with torch.no_grad():
        want = {"clip": text(sd.tokenizer(PROMPTS)).last_hidden_state,
                "vae": vae.encode(image).latent_dist.mean * vae.config.scaling_factor,
                "unet": unet(latents, 100, context).sample}
    for k in want:
        assert torch.allclose(ours[k], want[k], rtol=0, atol=1e-5 * want[k].abs().max().item()), \
            f"{k}: {errors(ours[k], want[k])}"


def test_fp16_variant(tiny_sd_dir, tmp_path):
    fp32, fp16 = load_sd(tiny_sd_dir), load_sd(tiny_sd_dir, variant="fp16")
    for m in ("unet", "vae", "text_encoder"):
        a, b = params(getattr(fp32, m)), params(getattr(fp16, m))
        assert all(b[k].dtype == torch.float32 and torch.equal(b[k], a[k].half().float()) for k in a), m
        assert not all(torch.equal(a[k], b[k]) for k in a), f"{m}: variant=None must prefer the fp32 files"
    only_fp16 = shutil.copytree(tiny_sd_dir, tmp_path / "fp16-only")
    for f in only_fp16.glob("*/*.safetensors"):
        if ".fp16." not in f.name:
            f.unlink()
    fallback = load_sd(only_fp16)  # variant=None falls back to the .fp16 files
    assert torch.equal(fallback.unet.conv_in.weight, fp16.unet.conv_in.weight)
    with pytest.raises(UserError, match=r"text_encoder: no model\.ema\.safetensors or model\.safetensors\.index\.ema\.json found; "
                       r".*minidiffseg download"):
        load_sd(tiny_sd_dir, variant="ema")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_dtype_eval_no_grad(tiny_sd_dir, dtype):
    sd = load_sd(tiny_sd_dir, dtype=dtype, variant="fp16" if dtype == torch.float16 else None)
    for m in (sd.unet, sd.vae, sd.text_encoder):
        assert not m.training
        for name, p in m.named_parameters():
            assert p.dtype == dtype and p.device.type == "cpu" and not p.requires_grad, name


def file_mappings(path: Path) -> list[tuple[int, int]]:
    """Address ranges where this process has `path` memory-mapped (Linux /proc/self/maps)."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs Linux's /proc/self/maps to see memory mappings")
    ranges = []
    for line in maps.read_text().splitlines():
        if line.endswith(str(path.resolve())):
            lo, hi = line.split()[0].split("-")
            ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


def test_same_dtype_on_cpu_is_memory_mapped_not_copied(tiny_sd_dir, single_file):
    """With the file's dtype on CPU every parameter points into the mapped file; a cast copies."""
    for path, files in ((single_file, [single_file]), (tiny_sd_dir, list(tiny_sd_dir.glob("*/*[!6].safetensors")))):
        sd = load_sd(path)
        ranges = [r for f in files for r in file_mappings(f)]
        for m in (sd.unet, sd.vae, sd.text_encoder):
            copied = [n for n, p in m.named_parameters() if not any(lo <= p.data_ptr() < hi for lo, hi in ranges)]
            assert copied == [], f"{path}: copied instead of mapped: {copied[:3]}"
    cast = load_sd(single_file, dtype=torch.bfloat16)
    ranges = file_mappings(single_file)
    assert not any(lo <= p.data_ptr() < hi for p in cast.unet.parameters() for lo, hi in ranges)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda(tiny_sd_dir, single_file):
    cpu = outputs(load_sd(single_file))
    for path in (tiny_sd_dir, single_file):
        sd = load_sd(path, device="cuda", dtype=torch.float16, variant="fp16")
        assert all(p.is_cuda and p.dtype == torch.float16 for p in sd.unet.parameters())
        ids = sd.tokenizer(PROMPTS).cuda()
        with torch.no_grad():
            got = sd.text_encoder(ids).float().cpu()
        assert torch.allclose(got, cpu["clip"], atol=2e-2 * cpu["clip"].abs().max().item()), errors(got, cpu["clip"])


def test_official_spellings(tiny_sd_dir, tmp_path):
    """The hub's text_encoder/model.safetensors names its tensors `text_model.…` and keeps the int64
    position_ids buffer; legacy VAE files name the mid-attention query/key/value/proj_attn."""
    folder = shutil.copytree(tiny_sd_dir, tmp_path / "official")
    text = folder / "text_encoder" / "model.safetensors"
    rewrite(text, text, lambda t: {**{f"text_model.{k}": v for k, v in t.items()},
                                   "text_model.embeddings.position_ids": torch.arange(77)[None]})
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    vae = folder / "vae" / "diffusion_pytorch_model.safetensors"

    def to_legacy(tensors):
        out = {}
        for k, v in tensors.items():
            for new, old in legacy.items():
                if k.startswith("encoder.mid_block.attentions.0.") and f".{new}." in k:
                    k, v = k.replace(f".{new}.", f".{old}."), v[:, :, None, None] if v.ndim == 2 else v
            out[k] = v
        return out

    rewrite(vae, vae, to_legacy)
    a, b = load_sd(tiny_sd_dir), load_sd(folder)
    for m in ("vae", "text_encoder"):
        pa, pb = params(getattr(a, m)), params(getattr(b, m))
        assert all(torch.equal(pa[k], pb[k]) for k in pa), m


def test_tokenizer_argument(single_file, tmp_path):
    alone = shutil.copy(single_file, tmp_path / "alone.safetensors")
    with pytest.raises(UserError, match=r"alone\.safetensors: no tokenizer folder .*tokenizer=.*minidiffseg download"):
        load_sd(alone)
    tok = CLIPTokenizer.from_dir(single_file.parent / "tokenizer")
    assert load_sd(alone, tokenizer=tok).tokenizer is tok
    assert load_sd(alone, tokenizer=single_file.parent / "tokenizer").tokenizer(PROMPTS).shape == (2, 77)


# ---- bad checkpoints: one clear error naming the file and the key --------------------------------

def test_missing_path():
    with pytest.raises(UserError, match=r"nowhere: not found; fetch Stable Diffusion with `minidiffseg download`"):
        load_sd("/nowhere")


@pytest.mark.parametrize("name", ["v1-5-pruned-emaonly.ckpt", "model.bin", "model.pt"])
def test_pickles_refused(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x80\x02}q\x00.")  # a pickle: never opened
    with pytest.raises(UserError, match=rf"{name}: .* pickles, which minidiffseg never loads.*\.safetensors"):
        load_sd(path)


def test_pickle_only_folder_refused(tiny_sd_dir, tmp_path):
    folder = shutil.copytree(tiny_sd_dir, tmp_path / "bin")
    for f in (folder / "unet").glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(UserError, match=r"unet/diffusion_pytorch_model(\.fp16)?\.bin: \.bin files are pickles"):
        load_sd(folder)


def test_not_a_safetensors_file(single_file, tmp_path):
    junk = shutil.copytree(single_file.parent, tmp_path / "junk")
    for name, content in (("text.safetensors", b"hello, this is not a checkpoint\n" * 10),
                          ("empty.safetensors", b""),
                          ("zip.safetensors", b"PK\x03\x04" + b"\x00" * 100)):
        (junk / name).write_bytes(content)
        with pytest.raises(UserError, match=rf"{name}: not a safetensors file"):
            load_sd(junk / name)
    bad_json = junk / "json.safetensors"
    bad_json.write_bytes((20).to_bytes(8, "little") + b"{not json at all...}" + bytes(100))
    with pytest.raises(UserError, match=r"json\.safetensors: not a safetensors file \(its header"):
        load_sd(bad_json)


@pytest.mark.parametrize("keep", [0.5, 0.001])
def test_truncated_file(single_file, tmp_path, keep):
    data = single_file.read_bytes()
    cut = shutil.copytree(single_file.parent, tmp_path / "cut") / single_file.name
    cut.write_bytes(data[: int(len(data) * keep)])
    size = cut.stat().st_size
    with pytest.raises(UserError, match=rf"{cut.name}: truncated: .* but the file has {size}.*download it again"):
        load_sd(cut)


def test_missing_key(single_file, tiny_sd_dir, tmp_path):
    key = f"{ldm.UNET}input_blocks.4.1.transformer_blocks.0.attn2.to_v.weight"
    bad = rewrite(single_file, tmp_path / "s" / "missing.safetensors",
                  lambda t: {k: v for k, v in t.items() if k != key})
    shutil.copytree(single_file.parent / "tokenizer", bad.parent / "tokenizer")
    with pytest.raises(UserError, match=r"missing\.safetensors: 1 U-Net tensor\(s\) missing: "
                                        r"down_blocks\.1\.attentions\.0\.transformer_blocks\.0\.attn2\.to_v\.weight;"):
        load_sd(bad)
    folder = shutil.copytree(tiny_sd_dir, tmp_path / "f")
    text = folder / "text_encoder" / "model.safetensors"
    rewrite(text, text, lambda t: {k: v for k, v in t.items() if "layers.1." not in k})
    with pytest.raises(UserError, match=r"text_encoder/model\.safetensors: 16 text encoder tensor\(s\) missing: "
                                        r"text_model\.encoder\.layers\.1\.layer_norm1\.bias, .* \(\+11 more\)"):
        load_sd(folder)


def test_unexpected_key(single_file, tiny_sd_dir, tmp_path):
    for extra in (f"{ldm.UNET}input_blocks.1.0.extra.weight", "cond_stage_model.model.text_projection"):
        bad = rewrite(single_file, tmp_path / "s" / "extra.safetensors", lambda t: {**t, extra: torch.zeros(3)})
        with pytest.raises(UserError, match=rf"extra\.safetensors: 1 unexpected .*tensor\(s\): {extra}"):
            load_sd(bad, tokenizer=single_file.parent / "tokenizer")
    folder = shutil.copytree(tiny_sd_dir, tmp_path / "f")
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    rewrite(unet, unet, lambda t: {**t, "add_embedding.linear_1.weight": torch.zeros(3, 3)})
    with pytest.raises(UserError, match=r"unet/diffusion_pytorch_model\.safetensors: 1 unexpected U-Net tensor\(s\): "
                                        r"add_embedding\.linear_1\.weight"):
        load_sd(folder)


def test_wrong_shape(single_file, tiny_sd_dir, tmp_path):
    key = f"{ldm.UNET}out.2.bias"
    bad = rewrite(single_file, tmp_path / "s" / "shape.safetensors", lambda t: {**t, key: torch.zeros(5)})
    with pytest.raises(UserError, match=rf"shape\.safetensors: tensor {key} has shape \[5\] but the U-Net "
                                        r"expects \[4\]"):
        load_sd(bad, tokenizer=single_file.parent / "tokenizer")
    folder = shutil.copytree(tiny_sd_dir, tmp_path / "f")
    config = folder / "unet" / "config.json"  # the config disagrees with the file
    config.write_text(json.dumps({**json.loads(config.read_text()), "cross_attention_dim": 48}))
    with pytest.raises(UserError, match=r"unet/diffusion_pytorch_model\.safetensors: tensor down_blocks\.0\."
                                        r"attentions\.0\.transformer_blocks\.0\.attn2\.to_k\.weight has shape "
                                        r"\[32, 32\] but the U-Net expects \[32, 48\]"):
        load_sd(folder)


def test_unknown_layout(single_file, tiny_sd_dir, tmp_path):
    other = tmp_path / "other.safetensors"
    save_file({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.ones(3)}, other)
    with pytest.raises(UserError, match=r"other\.safetensors: unknown checkpoint layout: no U-Net "
                                        r"\(model\.diffusion_model\.…\), VAE .* tensors"):
        load_sd(other, tokenizer=single_file.parent / "tokenizer")
    component = shutil.copy(tiny_sd_dir / "unet" / "diffusion_pytorch_model.safetensors", tmp_path / "unet.safetensors")
    with pytest.raises(UserError, match=r"unet\.safetensors: unknown checkpoint layout"):
        load_sd(component, tokenizer=single_file.parent / "tokenizer")
    folder = tmp_path / "folder"
    shutil.copytree(tiny_sd_dir / "tokenizer", folder / "tokenizer")
    with pytest.raises(UserError, match=r"folder: unknown checkpoint layout: .* lacks unet, vae, text_encoder/"):
        load_sd(folder)


def test_missing_config(tiny_sd_dir, tmp_path):
    folder = shutil.copytree(tiny_sd_dir, tmp_path / "f")
    (folder / "vae" / "config.json").unlink()
    with pytest.raises(UserError, match=r"vae/config\.json: not found.*minidiffseg download"):
        load_sd(folder)


# ---- memory (slow) ---------------------------------------------------------------------------------

MEASURE = """
import json, re, sys, time, torch
from minidiffseg.sd import load_sd
# this process's peak RSS; not ru_maxrss, which Linux carries over from the parent across fork + exec
peak = lambda: int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
base, start = peak(), time.perf_counter()
sd = load_sd(sys.argv[1], dtype=getattr(torch, sys.argv[2]), variant="fp16")
seconds = time.perf_counter() - start
weights = [p for m in (sd.unet, sd.vae, sd.text_encoder) for p in m.parameters()]
sum(float(p.sum(dtype=torch.float32)) for p in weights)  # read every weight once: mapped pages count now
print(json.dumps({"base": base, "peak": peak(), "weights": sum(p.nbytes for p in weights), "seconds": seconds}))
"""


@pytest.fixture(scope="module")
def full_size(tmp_path_factory):
    """Full-size random SD1.5 in fp16 (≈2.2 GB per layout), as the official files hold it: the diffusers
    folder's .fp16 variant and the single file v1-5-pruned-emaonly-fp16.safetensors built from it."""
    folder = tiny_sd.write_random_diffusers(tmp_path_factory.mktemp("sd15-full"))
    files = {c: folder / c / f"{stem}.fp16.safetensors" for c, stem in
             (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("text_encoder", "model"))}
    with safe_open(str(files["unet"]), "pt") as u, safe_open(str(files["vae"]), "pt") as v, \
            safe_open(str(files["text_encoder"]), "pt") as t:
        vae = {k: v.get_tensor(k) for k in v.keys()}
        text = {k: t.get_tensor(k) for k in t.keys()}
        single = ldm.to_ldm({k: u.get_tensor(k) for k in u.keys()},
                            {k: x for k, x in vae.items() if k.startswith(("encoder.", "quant_conv."))},
                            {k: x for k, x in text.items() if not k.endswith("position_ids")})
        single.update({f"{ldm.VAE}{k}": x for k, x in vae.items() if k.startswith(("decoder.", "post_quant_conv."))})
        single[f"{ldm.TEXT}text_model.embeddings.position_ids"] = text["text_model.embeddings.position_ids"]
        path = folder.parent / "v1-5-pruned-emaonly-fp16.safetensors"
        save_file(single, path, metadata={"format": "pt"})
    shutil.copytree(folder / "tokenizer", folder.parent / "tokenizer")
    return {"diffusers": folder, "single file": path}


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["diffusers", "single file"])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_full_size_peak_memory_is_one_copy(full_size, layout, dtype):
    """Peak RSS of a fresh process after loading and reading every weight, minus its peak after the
    imports: about one copy of the weights in the target dtype (the fp16 files are mapped, not copied;
    converting to fp32 keeps at most RELEASE_BYTES of the file mapped at a time)."""
    if not Path("/proc/self/status").exists():
        pytest.skip("reads the peak RSS (VmHWM) from Linux's /proc/self/status")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", MEASURE, str(full_size[layout]), dtype],
                         capture_output=True, text=True, env=env, check=True)
    m = json.loads(run.stdout.strip().splitlines()[-1])
    extra, weights = m["peak"] - m["base"], m["weights"]
    report = (f"{layout}, fp16 files -> {dtype}: peak RSS +{extra / 2**30:.2f} GiB for {weights / 2**30:.2f} GiB of "
              f"weights ({extra / weights:.2f} copies), load {m['seconds']:.1f} s")
    print(report)
    assert extra <= 1.1 * weights + RELEASE_BYTES + 2**28, report


# ---- a non-"emaonly" single file: the U-Net twice, trained and EMA -----------------------------------

def test_the_ema_unet_of_a_file_holding_both_is_loaded(single_file, tmp_path):
    """v1-5-pruned.safetensors holds the trained U-Net and its EMA copy (LitEma's names: the dots removed);
    the EMA weights are loaded, as the -emaonly file and the diffusers folder hold them."""
    from minidiffseg.sd.checkpoint import single_file_parts

    def ema_values(t):  # the EMA copy differs from the trained weights
        return {k: v * 0.5 + 0.01 if k.startswith(ldm.UNET) else v for k, v in t.items()}

    def both_copies(t):
        twins = {"model_ema." + k.removeprefix("model.").replace(".", ""): v
                 for k, v in ema_values(t).items() if k.startswith(ldm.UNET)}
        return {**t, **twins}

    tok = single_file.parent / "tokenizer"
    emaonly = rewrite(single_file, tmp_path / "emaonly.safetensors", ema_values)
    both = rewrite(single_file, tmp_path / "pruned.safetensors", both_copies)
    want, trained = params(load_sd(emaonly, tokenizer=tok).unet), params(load_sd(single_file).unet)
    for stream in (False, True):
        got = load_sd(both, tokenizer=tok, stream=stream)
        if stream:  # streamed weights are read as the blocks run: compare what the networks compute
            a, b = outputs(got), outputs(load_sd(emaonly, tokenizer=tok))
            assert all(torch.equal(a[k], b[k]) for k in a)
        else:
            got = params(got.unet)
            assert all(torch.equal(got[n], want[n]) for n in want) and sorted(got) == sorted(want)
            assert not any(torch.equal(got[n], trained[n]) for n in trained)  # not one trained tensor
    parts, unknown = single_file_parts(both)
    unet = parts["unet"]
    assert unknown == [] and unet.what == "U-Net (EMA)"  # inspect-weights and load errors say which
    assert all(k.startswith("model_ema.") for k in unet.names)
    trained_keys = {k for k in unet.shapes if k.startswith(ldm.UNET)}
    assert trained_keys <= set(unet.ignored) and not set(unet.names) & set(unet.ignored)
    # an emaonly file (no twins) loads its U-Net keys as before
    assert load_sd(emaonly, tokenizer=tok) and single_file_parts(emaonly)[0]["unet"].what == "U-Net"
