"""Random-weight checkpoints in the official diffusers folder layout, for timing without downloads.

A full-size network with random weights costs exactly the compute of the real one (same shapes, same
kernels); only the outputs are meaningless. Each folder is written once into a cache folder and reused:
a `complete` marker is written last, so an interrupted write is redone.
- `random_sd(cache, model, tiny)`: SD1.5 or SD2.x (MODELS) written by the reference libraries' own
  `save_pretrained` (default initialisation, fp32 files): the headline run (run.py);
- `random_hub_sd15()`: full-size SD1.5 as the .fp16 files the hub serves and `minidiffseg download`
  fetches, tensor by tensor without building the models: the experiments (bench/experiments/);
- `random_hub_sdxl()`: the same for SDXL base (bench/experiments/sdxl.py).
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
