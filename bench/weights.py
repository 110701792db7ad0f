"""Random-weight checkpoints in the official diffusers folder layout, for timing without downloads.

A full-size network with random weights costs exactly the compute of the real one (same shapes, same
kernels); only the outputs are meaningless. Each folder is written once into a cache folder and reused:
a `complete` marker is written last, so an interrupted write is redone.
- `random_sd(cache, model, tiny)`: SD1.5 or SD2.x (MODELS) written by the reference libraries' own
  `save_pretrained` (default initialisation, fp32 files): the headline run (run.py);
- `random_hub_sd15()`: full-size SD1.5 as the .fp16 files the hub serves and `minidiffseg download`
  fetches, tensor by tensor without building the models: the experiments (bench/experiments/);
- `random_hub_sdxl()`: the same for SDXL base (bench/experiments/sdxl.py);
- `random_hub_sd3()`: the same for SD3-medium, T5-XXL's encoder sharded as the hub has it, each file written
  tensor by tensor (`write_streamed`: at most one tensor in memory); `no_t5_view()`: that folder without T5, as
  `download --no-t5` leaves it, made of symlinks (bench/experiments/sd3.py).
The reference builders and the model configs are the tests' (tests/reference_sd.py); the tests import
nothing from bench/.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import torch

from minidiffseg.errors import UserError
from minidiffseg.sd.config import CLIPTextConfig, UNetConfig, VAEConfig
from minidiffseg.sd.tokenizer import CLIPTokenizer
# tests/reference_sd.py (bench/__init__.py puts tests/ on the path)
from reference_sd import MODELS, reference_text_config, reference_unet, reference_vae, write_random_diffusers

MARKER = "complete"
# CLIP's BPE merges ship with open-clip-torch (installed with --no-deps, never imported: it needs torchvision)
BPE_FILE = ("open_clip", "bpe_simple_vocab_16e6.txt.gz")
HUB_SD15 = Path(__file__).resolve().parent / ".cache" / "peak-memory-sd15"  # random_hub_sd15's folder (git-ignored)
HUB_SDXL = Path(__file__).resolve().parent / ".cache" / "sdxl"  # random_hub_sdxl's folder (git-ignored)
HUB_SD3 = Path(__file__).resolve().parent / ".cache" / "sd3"  # random_hub_sd3's folder (git-ignored)


def configs(tiny: bool, model: str = "sd15") -> tuple[UNetConfig, VAEConfig, CLIPTextConfig]:
    return MODELS[model][1 if tiny else 0]


def bpe_path() -> Path:
    package, name = BPE_FILE
    spec = importlib.util.find_spec(package)
    path = Path(list(spec.submodule_search_locations)[0]) / name if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise UserError(f"CLIP's BPE file {name} is needed for the tokenizer of the random checkpoint: "
                        "pip install --no-deps open-clip-torch (or pass --weights with a real SD1.5 folder)")
    return path


def random_sd15(cache: Path, tiny: bool = False, seed: int = 0) -> Path:
    """The diffusers SD1.5 folder with random weights under `cache` (written on first use)."""
    return random_sd(cache, "sd15", tiny, seed)


def random_sd(cache: Path, model: str = "sd15", tiny: bool = False, seed: int = 0) -> Path:
    """The diffusers folder of `model` (MODELS) with random weights under `cache` (written on first use);
    SD2.x's also holds the two files that say what its config.json files don't: the tokenizer's padding
    token "!" (special_tokens_map.json) and the scheduler's prediction type."""
    folder = Path(cache) / (f"{model}-random-tiny" if tiny else f"{model}-random")
    if (folder / MARKER).is_file():
        return folder
    try:
        import diffusers  # noqa: F401  (the reference builders import it)
        import transformers
    except ImportError:
        raise UserError(f"writing the random {model} checkpoint needs diffusers and transformers: "
                        "pip install -e '.[bench]' transformers") from None
    shutil.rmtree(folder, ignore_errors=True)
    unet_cfg, vae_cfg, text_cfg = configs(tiny, model)
    torch.manual_seed(seed)
    reference_unet(unet_cfg).save_pretrained(folder / "unet")
    reference_vae(vae_cfg).save_pretrained(folder / "vae")
    transformers.CLIPTextModel(reference_text_config(text_cfg)).save_pretrained(folder / "text_encoder")
    CLIPTokenizer.from_bpe_gz(bpe_path()).save(folder / "tokenizer")
    if (prediction := MODELS[model][2]) is not None:
        (folder / "tokenizer" / "special_tokens_map.json").write_text(json.dumps({"pad_token": "!"}))
        (folder / "scheduler").mkdir()
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
            {"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "num_train_timesteps": 1000, "prediction_type": prediction}))
    (folder / MARKER).write_text("written by bench/weights.py: random weights, for timing only\n")
    return folder


def random_hub_sdxl(folder: Path = HUB_SDXL) -> Path:
    """Full-size random SDXL base as the hub's .fp16 files (~6.9 GB), written into `folder` on first use, tensor by
    tensor from the reference classes' inventory on the meta device (tests/tiny_sdxl.py's FULL_* configs), with both
    tokenizers and SDXL base's scheduler config."""
    if (folder / MARKER).is_file():
        return folder
    import diffusers
    import transformers
    from safetensors.torch import save_file

    from tiny_sdxl import FULL_TEXT_G, FULL_TEXT_L, FULL_UNET, FULL_VAE, SCHEDULER

    print(f"writing full-size random SDXL (fp16 files, ~6.9 GB) to {folder} ...", file=sys.stderr)
    shutil.rmtree(folder, ignore_errors=True)
    g = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        nets = {"unet": diffusers.UNet2DConditionModel(**FULL_UNET), "vae": diffusers.AutoencoderKL(**FULL_VAE),
                "text_encoder": transformers.CLIPTextModel(transformers.CLIPTextConfig(**FULL_TEXT_L)),
                "text_encoder_2": transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**FULL_TEXT_G))}
    for name, net in nets.items():
        if name.startswith("text_encoder"):
            net.config.save_pretrained(folder / name)
            file = "model"  # the official files name the tower `text_model.…` (transformers >= 5 drops it in memory)
            state = {k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v
                     for k, v in net.state_dict().items() if not k.endswith("position_ids")}
        else:
            net.save_config(folder / name)
            file, state = "diffusion_pytorch_model", net.state_dict()
        tensors = {k: torch.randn(v.shape, generator=g, dtype=torch.float16) * 0.02 for k, v in state.items()}
        save_file(tensors, folder / name / f"{file}.fp16.safetensors", metadata={"format": "pt"})
        del tensors
    tok = CLIPTokenizer.from_bpe_gz(bpe_path())
    tok.save(folder / "tokenizer")
    tok.save(folder / "tokenizer_2")
    (folder / "tokenizer_2" / "special_tokens_map.json").write_text(json.dumps({"pad_token": "!"}))
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    (folder / MARKER).write_text("written by bench/weights.py: random weights, for timing only\n")
    return folder


def random_hub_sd15(folder: Path = HUB_SD15) -> Path:
    """Full-size random SD1.5 as the hub's .fp16 files (~2.1 GB), written into `folder` on first use (needs
    diffusers + transformers for the reference models' key inventory)."""
    if not (folder / MARKER).is_file():
        print(f"writing full-size random SD1.5 (fp16 files, ~2.1 GB) to {folder} ...", file=sys.stderr)
        write_random_diffusers(folder, bpe_path())
        (folder / MARKER).write_text("")
    return folder


# ---- SD3-medium -------------------------------------------------------------------------------------------

# the hub's vae/config.json of stabilityai/stable-diffusion-3-medium-diffusers (AutoencoderKL's arguments)
SD3_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
               layers_per_block=2, norm_num_groups=32, act_fn="silu", sample_size=1024, scaling_factor=1.5305,
               shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False, force_upcast=True)
SHARD_BYTES = 5_000_000_000  # transformers' max_shard_size "5GB" when the hub's T5 was saved: 4.99 GB + 4.53 GB
T5_COMPONENTS = ("text_encoder_3", "tokenizer_3")
DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}


def random_tensor(key: str, shape: tuple[int, ...], g: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """N(0, 0.02²) entries; a 1-D `.weight` (a norm's scale: LayerNorm, GroupNorm, RMSNorm) 1 + N(0, 0.02²), as
    trained norms are near 1, so no layer's output is all but zero."""
    t = torch.randn(shape, generator=g, dtype=dtype) * 0.02
    return t + 1 if len(shape) == 1 and key.endswith(".weight") else t


def write_streamed(path: Path, shapes: dict[str, tuple[int, ...]], g: torch.Generator, dtype: torch.dtype,
                   bar=None, source=None) -> int:
    """A .safetensors file of random tensors with these names and shapes, written one tensor at a time (the
    format: an 8-byte little-endian header length, the JSON header of dtypes, shapes and byte offsets, padded to
    8 bytes, then the tensors' bytes back to back in the header's order); returns the bytes of tensor data.
    `source(key)`: the tensor to write under `key` instead of a random one (tests/test_bench_sd3.py)."""
    import json
    import struct

    item = torch.empty((), dtype=dtype).element_size()
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, shape in shapes.items():
        n = item * int(torch.Size(shape).numel())
        header[key] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for key, shape in shapes.items():
            t = random_tensor(key, shape, g, dtype) if source is None else source(key).to(dtype).contiguous()
            f.write(t.view(torch.uint8).numpy().tobytes() if dtype == torch.bfloat16 else t.numpy().tobytes())
            if bar is not None:
                bar.update(t.numel() * item)
    return offset


def write_sharded(folder: Path, stem: str, variant: str, shapes: dict[str, tuple[int, ...]], g: torch.Generator,
                  dtype: torch.dtype, bar=None, max_bytes: int = SHARD_BYTES, source=None) -> Path:
    """Shards as transformers' save_pretrained(variant=...) names them, `{stem}.{variant}-0000i-of-0000n.safetensors`
    (filled greedily in the state dict's order up to `max_bytes`), and their index
    `{stem}.safetensors.index.{variant}.json` (minidiffseg/sd/shards.py); returns the index's path. `source`: as
    write_streamed's."""
    import json

    item = torch.empty((), dtype=dtype).element_size()
    groups: list[dict[str, tuple[int, ...]]] = [{}]
    size = 0
    for key, shape in shapes.items():
        n = item * int(torch.Size(shape).numel())
        if groups[-1] and size + n > max_bytes:
            groups.append({})
            size = 0
        groups[-1][key] = shape
        size += n
    weight_map, total = {}, 0
    for i, group in enumerate(groups, 1):
        name = f"{stem}.{variant}-{i:05d}-of-{len(groups):05d}.safetensors"
        total += write_streamed(folder / name, group, g, dtype, bar, source)
        weight_map.update(dict.fromkeys(group, name))
    index = folder / f"{stem}.safetensors.index.{variant}.json"
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return index


def random_hub_sd3(folder: Path = HUB_SD3, t5: bool = True) -> Path:
    """Full-size random SD3-medium as the hub's fp16 files of stabilityai/stable-diffusion-3-medium-diffusers
    (~15.3 GB with T5, ~5.8 GB without), written into `folder` on first use, tensor by tensor from the reference
    classes' inventory on the meta device: transformer/ (SD3Transformer2DModel at MMDiTConfig.sd3_medium(), the 192²
    position table included), vae/ (the 16-channel AutoencoderKL, decoder included), text_encoder/ and
    text_encoder_2/ (CLIP-L and bigG with their projections), text_encoder_3/ (T5 v1.1 XXL's encoder in two shards
    and their index), the CLIP tokenizers from CLIP's BPE, tokenizer_3/ (tests/tiny_t5.py's small T5-format
    vocabulary: its ids are valid for T5's 32128 embeddings, and a prompt is padded to 256 tokens whatever the
    vocabulary), the scheduler config. `t5=False`: the folder `download --no-t5` makes (no text_encoder_3/,
    tokenizer_3/); for both layouts write the T5 one and take `no_t5_view` of it."""
    if (folder / MARKER).is_file():
        return folder
    import diffusers
    import transformers
    from tqdm import tqdm

    from minidiffseg.sd3.config import MMDiTConfig
    from minidiffseg.sd3.t5 import T5Config
    from tiny_mmdit import config_dict
    from tiny_sd3 import SCHEDULER
    from tiny_sdxl import FULL_TEXT_G, FULL_TEXT_L
    from tiny_t5 import reference_config, write_tokenizer_3

    print(f"writing full-size random SD3-medium (fp16 files, ~{15.3 if t5 else 5.8} GB) to {folder} ...",
          file=sys.stderr)
    shutil.rmtree(folder, ignore_errors=True)
    g = torch.Generator().manual_seed(0)
    clip = transformers.CLIPTextModelWithProjection
    with torch.device("meta"):
        nets = {"transformer": diffusers.SD3Transformer2DModel(**config_dict(MMDiTConfig.sd3_medium())),
                "vae": diffusers.AutoencoderKL(**SD3_VAE),
                "text_encoder": clip(transformers.CLIPTextConfig(**FULL_TEXT_L)),
                "text_encoder_2": clip(transformers.CLIPTextConfig(**FULL_TEXT_G))}
        if t5:
            nets["text_encoder_3"] = transformers.T5EncoderModel(reference_config(T5Config.xxl()))
    states = {}
    for name, net in nets.items():
        if name == "text_encoder_3":  # the tied embedding once, as `shared.weight` (sd3/t5.py "Checkpoint names")
            net.config.save_pretrained(folder / name)
            state = {k: v for k, v in net.state_dict().items() if k != "encoder.embed_tokens.weight"}
        elif name.startswith("text_encoder"):
            net.config.save_pretrained(folder / name)
            # the official files name the tower `text_model.…` (transformers >= 5 drops it in memory)
            state = {k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v
                     for k, v in net.state_dict().items() if not k.endswith("position_ids")}
        else:
            net.save_config(folder / name)
            state = net.state_dict()
        states[name] = {k: tuple(v.shape) for k, v in state.items()}
    del nets
    total = sum(2 * torch.Size(s).numel() for shapes in states.values() for s in shapes.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc="random SD3 weights", file=sys.stderr) as bar:
        for name, shapes in states.items():
            if name == "text_encoder_3":
                write_sharded(folder / name, "model", "fp16", shapes, g, torch.float16, bar)
            else:
                stem = "model" if name.startswith("text_encoder") else "diffusion_pytorch_model"
                write_streamed(folder / name / f"{stem}.fp16.safetensors", shapes, g, torch.float16, bar)
    tok = CLIPTokenizer.from_bpe_gz(bpe_path())
    tok.save(folder / "tokenizer")
    tok.save(folder / "tokenizer_2")
    (folder / "tokenizer_2" / "special_tokens_map.json").write_text(json.dumps({"pad_token": "!"}))
    if t5:
        write_tokenizer_3(folder / "tokenizer_3")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    (folder / MARKER).write_text("written by bench/weights.py: random weights, for timing only\n")
    return folder


def no_t5_view(folder: Path) -> Path:
    """`folder` (an SD3 diffusers folder with T5) as `download --no-t5` leaves it: a sibling folder `NAME-no-t5` of
    symlinks to every entry but text_encoder_3/ and tokenizer_3/, so the 9.5 GB of T5 are not written twice."""
    folder = Path(folder).resolve()
    view = folder.parent / f"{folder.name}-no-t5"
    entries = sorted(p for p in folder.iterdir() if p.name not in T5_COMPONENTS)
    if view.is_dir() and sorted(p.name for p in view.iterdir()) == [p.name for p in entries] and \
            all((view / p.name).resolve() == p for p in entries):
        return view
    shutil.rmtree(view, ignore_errors=True)
    view.mkdir(parents=True)
    for p in entries:
        (view / p.name).symlink_to(p, target_is_directory=p.is_dir())
    return view
