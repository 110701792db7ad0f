"""Peak memory of a whole `minidiffseg segment` run on a full-size SD1.5 (the README's "Memory" table).

    python bench/peak_memory.py [--weights DIR] [--dtypes fp32,bf16] [--classes 4] [--resolution 512]

Each setting runs in a fresh process: `minidiffseg.cli.main(["segment", ...])` on one 512×512 image
with C classes, then the process reads its own peak resident set size, VmHWM in /proc/self/status
(Linux). Not `ru_maxrss` of a child: Linux carries the parent's value over fork + exec. The peak
after the imports is printed too, so what the run itself adds is visible. Each dtype runs with the
defaults and with --low-memory.

Without --weights, full-size random weights are written once (bench/weights.py write_random_diffusers,
needs diffusers + transformers) to bench/.cache/peak-memory-sd15: the diffusers layout with the .fp16
files the hub serves and `minidiffseg download` fetches by default (~2.1 GB). Random weights take the
same memory and time as the real ones.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "bench" / ".cache" / "peak-memory-sd15"
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

CHILD = r"""
import json, re, sys, time
def peak():  # this process's peak RSS in bytes
    return int(re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
import torch, minidiffseg.cli, minidiffseg.method.segmenter, minidiffseg.sd  # imports first, measured apart
imports, start = peak(), time.perf_counter()
rc = minidiffseg.cli.main(sys.argv[1:])
print(json.dumps({"rc": rc, "imports": imports, "peak": peak(), "seconds": time.perf_counter() - start}))
"""


def random_weights() -> Path:
    if not (CACHE / "complete").is_file():
        from bench.weights import write_random_diffusers  # needs diffusers + transformers (pip install -e ".[bench]")

        print(f"writing full-size random SD1.5 (fp16 files, ~2.1 GB) to {CACHE} ...", file=sys.stderr)
        write_random_diffusers(CACHE)
        (CACHE / "complete").write_text("")
    return CACHE


def loaded_parameters(weights: Path) -> int:
    """Elements of the tensors `segment` loads (U-Net, VAE encoder, text encoder), from the file headers."""
    from minidiffseg.cli.inspect_weights import check, detect

    return sum(check(part).params for part in detect(weights)[1])


def measure(weights: Path, dtype: str, classes: int, resolution: int, low_memory: bool, work: Path) -> dict:
    from PIL import Image

    image = work / "photo.png"
    if not image.is_file():  # a smooth colour pattern: the content does not change the cost
        Image.radial_gradient("L").resize((resolution, resolution)).convert("RGB").save(image)
    names = ",".join(["cat", "dog", "sofa", "person", "car", "tree", "sky", "grass"][:classes] +
                     [f"class{i}" for i in range(8, classes)])
    argv = ["segment", str(image), "--classes", names, "--weights", str(weights), "--dtype", dtype, "--device", "cpu",
            "--resolution", str(resolution), "--out", str(work / f"out-{dtype}-{low_memory}")]
    run = subprocess.run([sys.executable, "-c", CHILD, *argv, *(["--low-memory"] if low_memory else [])],
                         capture_output=True, text=True, cwd=REPO)
    if run.returncode != 0 or not run.stdout.strip():
        sys.exit(f"segment failed ({dtype}):\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", type=Path, help="an SD1.5 folder or file (default: full-size random weights)")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated --dtype values to measure")
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--resolution", type=int, default=512)
    args = p.parse_args()
    sys.path.insert(0, str(REPO))  # minidiffseg from this checkout, installed or not
    if not Path("/proc/self/status").is_file():
        sys.exit("reads the peak RSS (VmHWM) from /proc/self/status: Linux only")
    weights = args.weights or random_weights()
    params = loaded_parameters(weights)
    print(f"segment, one {args.resolution}×{args.resolution} image, C = {args.classes}, CPU, torch threads: default; "
          f"weights {weights} ({params / 1e6:.0f} M parameters loaded)")
    print("| --dtype | options | peak RSS | after imports | run adds | weights in that dtype | run time |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as work:
        for dtype in args.dtypes.split(","):
            for low_memory in (False, True):
                m = measure(weights, dtype, args.classes, args.resolution, low_memory, Path(work))
                print(f"| {dtype} | {'--low-memory' if low_memory else 'defaults'} | {m['peak'] / 2**30:.2f} GiB | "
                      f"{m['imports'] / 2**30:.2f} GiB | {(m['peak'] - m['imports']) / 2**30:.2f} GiB | "
                      f"{params * BYTES[dtype] / 2**30:.2f} GiB | {m['seconds']:.0f} s |", flush=True)


if __name__ == "__main__":
    main()
