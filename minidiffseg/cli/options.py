"""Command-line options shared by every command that runs a model: --weights, --device, --dtype."""

from __future__ import annotations

import argparse
import gc
import os
import re

import torch

from ..errors import UserError
from ..sd.precision import Precision, fast_on_cpu, precision

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
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu); cuda is cuda:0, "
                   "or cuda:LOCAL_RANK under torchrun")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16", "float32", "bfloat16", "float16"],
                   help="compute dtype (default: fp16 on CUDA, fp32 on CPU). On a CPU without fast half-precision "
                        "arithmetic (e.g. AVX2 only), bf16/fp16 compute in fp32 from weights kept in half precision "
                        "(half the weights' memory), with a warning; fp16 computes in bf16 where only bf16 is fast")
    if weights:
        p.add_argument("--stream", action="store_true",
                       help="keep no weights in memory: each block of the networks is read from the weights file "
                            "as it runs (the same results; docs/memory.md)")
        p.add_argument("--low-memory", action="store_true",
                       help=f"fit in little memory: --stream, and at most {LOW_MEMORY_CLASSES} classes per U-Net "
                            "call; without --dtype, bf16 on a CPU with fast bf16 (~0.66 GiB at 512²), else fp32 "
                            "(~0.9 GiB)")


def memory_options(args, class_batch: int | None = None) -> dict:
    """`stream` and `class_batch` for Segmenter.from_pretrained from --stream / --low-memory (docs/memory.md §5)."""
    if args.low_memory:
        return dict(stream=True, class_batch=min(class_batch or LOW_MEMORY_CLASSES, LOW_MEMORY_CLASSES))
    return dict(stream=args.stream, class_batch=class_batch)


def device_of(args) -> torch.device:
    """The device of --device, made current (torch.cuda.set_device). Default: cuda when a GPU is visible.
    A bare `cuda` is the GPU of this process: cuda:LOCAL_RANK under torchrun (one GPU per process), else cuda:0
    (the first of CUDA_VISIBLE_DEVICES). `cuda:N` is honoured as given, except under torchrun with several
    processes on this machine, where every process would get the same GPU: that is refused."""
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise UserError(f"--device {name!r}: only cpu and cuda are supported")
    if not torch.cuda.is_available():
        raise UserError(f"--device {name} but no CUDA device is visible: use --device cpu")
    count = torch.cuda.device_count()
    local = int(os.environ["LOCAL_RANK"]) if "LOCAL_RANK" in os.environ else None  # set by torchrun
    on_node = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))  # processes on this machine
    if device.index is None:
        index = local if local is not None else 0
        if index >= count:
            raise UserError(f"torchrun process LOCAL_RANK={index} needs a GPU of its own but {count} CUDA device(s) "
                            f"are visible: start at most {count} process(es) per machine (--nproc_per_node {count})")
    else:
        index = device.index
        if local is not None and on_node > 1:
            raise UserError(f"--device {name} under torchrun with {on_node} processes on this machine would put them "
                            "all on one GPU: give --device cuda (each process takes cuda:LOCAL_RANK) and choose "
                            "the GPUs with CUDA_VISIBLE_DEVICES")
        if index >= count:
            raise UserError(f"--device {name}: {count} CUDA device(s) are visible (cuda:0 to cuda:{count - 1}); "
                            "give one of them, or check CUDA_VISIBLE_DEVICES")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def dtype_of(args, device: torch.device) -> torch.dtype:
    """The dtype asked for (default: fp16 on CUDA, fp32 on CPU). How Stable Diffusion runs it on this device
    is `Segmenter.from_pretrained`'s decision (sd/precision.py: on a CPU without fast half precision, fp32
    arithmetic from half-precision weights, with one warning line); `precision_of` gives it beforehand."""
    if args.dtype is None and getattr(args, "low_memory", False) and device.type == "cpu":
        # --low-memory's default: bf16 (streamed ~0.66 GiB) where the CPU computes it fast, else fp32 (~0.9 GiB)
        return torch.bfloat16 if fast_on_cpu(torch.bfloat16) else torch.float32
    return DTYPES[args.dtype or ("fp16" if device.type == "cuda" else "fp32")]


def filter_dtype_of(args, device: torch.device) -> torch.dtype:
    """The dtype of the class filter's and captioner's models (CLIP, BLIP): fp32 unless --dtype is given. Their
    outputs are decisions — CLIP's classes within 0.97 of the best score, BLIP's greedy caption tokens — that
    fp16 rounding can flip, and the models are small next to Stable Diffusion. A half dtype given on a CPU that
    computes it slowly runs in the dtype `precision` picks (bf16 or fp32; its warning is Stable Diffusion's)."""
    return torch.float32 if args.dtype is None else precision_of(args, device, warn=False).compute


def precision_of(args, device: torch.device, warn: bool = True) -> Precision:
    """How the asked dtype runs on `device` (compute dtype, half-precision weights kept or not)."""
    return precision(dtype_of(args, device), device, warn=warn)


# ----------------------------------------------------------------------------------------- out of memory

# a failed allocation: CUDA's OutOfMemoryError (a RuntimeError), the CPU allocator's RuntimeError
# ("DefaultCPUAllocator: can't allocate memory: you tried to allocate N bytes", "not enough memory" in older
# releases), Python's MemoryError
CPU_OOM = re.compile(r"DefaultCPUAllocator|can't allocate memory|could not allocate|not enough memory", re.I)


def is_out_of_memory(e: BaseException) -> bool:
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or \
        (isinstance(e, RuntimeError) and CPU_OOM.search(str(e)) is not None)


def out_of_memory(e: BaseException, where: str, device: torch.device, args, resumed: str = "") -> str:
    """One line for an allocation failure `e` during `where` (e.g. "image a.jpg") on `device`, with the ways
    out that the command's options still leave; `resumed` says what a rerun keeps."""
    cuda = re.search(r"Tried to allocate ([\d.]+ [KMGT]?i?B)", str(e))  # CUDA's message
    size = cuda.group(1) if cuda else None
    if size is None and (n := re.search(r"allocate (\d+) bytes", str(e))):  # the CPU allocator's
        size = f"{int(n.group(1)) / 2**30:.2f} GiB"
    ways = []
    if getattr(args, "class_batch", None) != 1:
        ways.append("fewer classes per U-Net call with --class-batch N" +
                    (f" (below {args.class_batch})" if getattr(args, "class_batch", None) else ""))
    if not getattr(args, "low_memory", False):
        ways.append("--low-memory (weights streamed, at most %d classes per call)" % LOW_MEMORY_CLASSES)
    ways.append("a smaller --resolution (a multiple of 64)")
    return (f"{where}: out of memory on {device}" + (f" (tried to allocate {size})" if size else "") +
            f"; use {', '.join(ways[:-1])} or {ways[-1]}" + (f"; {resumed}" if resumed else ""))


def free_memory(device: torch.device) -> None:
    """After an allocation failure (once its traceback is gone): hand the freed blocks back, so the next
    image starts from an empty CUDA cache."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
