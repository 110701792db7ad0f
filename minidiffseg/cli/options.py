"""Command-line options shared by every command that runs a model: --weights, --device, --dtype."""

from __future__ import annotations

import argparse
import os

import torch

from ..errors import UserError

# classes per U-Net call under --low-memory: with more, the U-Net's activations (stored Q/K: 22 MB per class
# in bf16 at 512²) rise above the VAE encoder's peak (docs/memory.md §5)
LOW_MEMORY_CLASSES = 4
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16, "fp64": torch.float64, "float64": torch.float64}


def add_model_args(p: argparse.ArgumentParser, weights: bool = True) -> None:
    """--device and --dtype; with `weights`, also the required --weights of Stable Diffusion 1.5."""
    if weights:
        p.add_argument("--weights", required=True,
                       help="Stable Diffusion 1.5: a diffusers folder or a single .safetensors file")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16", "float32", "bfloat16", "float16"],
                   help="compute dtype (default: fp16 on CUDA, fp32 on CPU; fp16 on CPU computes in bf16, "
                        "since fp16 matmuls on CPU are ~400× slower)")
    if weights:
        p.add_argument("--stream", action="store_true",
                       help="keep no weights in memory: each block of the networks is read from the weights file "
                            "as it runs (the same results; docs/memory.md)")
        p.add_argument("--low-memory", action="store_true",
                       help=f"fit in little memory (~0.7 GiB in bf16, ~0.95 GiB in fp32 at 512²): --stream, and at "
                            f"most {LOW_MEMORY_CLASSES} classes per U-Net call")


def memory_options(args, class_batch: int | None = None) -> dict:
    """`stream` and `class_batch` for Segmenter.from_pretrained from --stream / --low-memory (docs/memory.md §5)."""
    if args.low_memory:
        return dict(stream=True, class_batch=min(class_batch or LOW_MEMORY_CLASSES, LOW_MEMORY_CLASSES))
    return dict(stream=args.stream, class_batch=class_batch)


def device_of(args) -> torch.device:
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per process
        name = f"cuda:{os.environ['LOCAL_RANK']}"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda but no CUDA device is visible: use --device cpu")
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise UserError(f"--device {name!r}: only cpu and cuda are supported")
    return device


def dtype_of(args, device: torch.device) -> torch.dtype:
    """The dtype to compute in: fp16 is steered to bf16 on CPU, saying so on stderr."""
    from ..method.segmenter import cpu_dtype

    name = args.dtype or ("fp16" if device.type == "cuda" else "fp32")
    return cpu_dtype(DTYPES[name], device)
