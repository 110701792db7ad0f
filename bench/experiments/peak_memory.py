"""Memory and time of a whole segmentation, resident vs streamed weights (README "Memory", docs/memory.md §7).

    python -m bench.experiments.peak_memory [--weights DIR] [--dtypes fp32,bf16] [--classes 4,8] [--images 2] [--out FILE]

Each setting runs in a fresh process that does what `minidiffseg segment` does — load SD1.5
(`Segmenter.from_pretrained` with the command's --stream/--low-memory options), segment a 512×512
image and write the outputs (mask, overlay, heat maps, scores) — for `--images` images in a row, and
reports:
- peak RSS: the process's VmHWM (Linux /proc/self/status), which counts every resident page,
  memory-mapped file pages included (RssFile: the libraries' code, mapped weights);
- peak anon: the largest RssAnon seen by this process reading the child's /proc/PID/status every 2 ms
  (misses spikes shorter than that; VmHWM does not);
- load s: loading the weights, with a cold page cache: the weight files are evicted from the page
  cache before the process starts (posix_fadvise(POSIX_FADV_DONTNEED): no root needed; it drops the
  clean pages no process maps);
- image 1 s: the first image, which for streamed weights reads the files (the cache is cold);
- warm s: the median time of the next images, the page cache warm (streamed weights are read from the
  cache); with --images 2 that is the second image alone;
- over resident: the warm time of the setting over the resident one (same dtype and C; for --low-memory
  without --dtype, over resident fp32).

Settings: resident, --stream, and --low-memory where it differs (more than 4 classes), per dtype and
class count; `--low-memory` without --dtype (the dtype it picks by the CPU), measured against resident
fp32; for fp32 from fp16 files also the fp16 tensors kept mapped and up-cast per block
(`load_sd(keep=torch.float16)`, docs/precision.md: what --dtype bf16 does on a CPU without fast bf16).
The table is printed and written to bench/results/memory.md with the commit measured. Timings need a
quiet machine (other processes' CPU share is printed per row); memory figures do not.

Without --weights, full-size random weights are written once (bench/weights.py random_hub_sd15,
needs diffusers + transformers) to bench/.cache/peak-memory-sd15: the diffusers layout with the .fp16
files the hub serves and `minidiffseg download` fetches by default (~2.1 GB). Random weights take the
same memory and time as the real ones.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import linux

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "bench" / "results" / "memory.md"
GiB = 2**30

CHILD = r"""
import json, sys, time, resource
from bench.linux import status  # bytes
import torch
from argparse import Namespace
from pathlib import Path
from minidiffseg.cli.options import dtype_of, memory_options
from minidiffseg.outputs import write_result
from minidiffseg.method.segmenter import Segmenter
from minidiffseg.sd.stream import weights_of
imports = status("VmHWM")
weights, classes, mode, images, out = sys.argv[1], sys.argv[3].split(","), sys.argv[4], \
    [Path(p) for p in sys.argv[5].split(",")], Path(sys.argv[6])
# the command's dtype: "default" is what `segment` picks without --dtype (for --low-memory: by the CPU)
dtype = dtype_of(Namespace(dtype=None if sys.argv[2] == "default" else sys.argv[2], low_memory=mode == "low-memory"),
                 torch.device("cpu"))
start = time.perf_counter()
if mode == "upcast":  # fp16 tensors kept mapped, each block up-cast to fp32 as it runs (docs/precision.md)
    from minidiffseg.sd import load_sd
    seg = Segmenter(load_sd(weights, dtype=torch.float32, keep=torch.float16))
else:
    options = memory_options(Namespace(stream=mode == "stream", low_memory=mode == "low-memory"))
    seg = Segmenter.from_pretrained(weights, dtype=dtype, **options)  # as the CPU runs it (sd/precision.py)
load = time.perf_counter() - start
kept = {t.dtype for t in getattr(weights_of(seg.sd.unet), "tensors", {}).values()}
computes = str(seg.dtype).replace("torch.", "") + (f" ({', '.join(sorted(str(d).replace('torch.', '') for d in kept))} kept)"
                                                    if kept else "")
times = []
for i, image in enumerate(images):
    t = time.perf_counter()
    r = seg(image, classes, seed=0)
    write_result(out, f"{image.stem}", image, r)
    times.append(time.perf_counter() - t)
print(json.dumps({"imports": imports, "peak": status("VmHWM"), "load": load, "times": times, "computes": computes,
                  "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt}))
"""


def weight_files(weights: Path) -> list[Path]:
    return [weights] if weights.is_file() else sorted(weights.glob("*/*.safetensors"))


def measure(weights: Path, dtype: str, classes: int, mode: str, images: list[Path], work: Path) -> dict:
    names = ",".join(["cat", "dog", "sofa", "person", "car", "tree", "sky", "grass"][:classes] +
                     [f"class{i}" for i in range(8, classes)])
    linux.evict(weight_files(weights))
    out = work / f"out-{dtype}-{classes}-{mode}"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    argv = [sys.executable, "-c", CHILD, str(weights), dtype, names, mode, ",".join(map(str, images)), str(out)]
    with linux.OthersCPU() as others:  # the CPU share of other processes (this one's polling included)
        code, stdout, stderr, anon = run_sampled(argv, env, work)
    if code != 0 or not stdout.strip():
        sys.exit(f"segment failed ({dtype}, C={classes}, {mode}):\n{stderr[-3000:]}")
    return dict(json.loads(stdout.strip().splitlines()[-1]), anon=anon, others=others.share)


def run_sampled(argv: list[str], env: dict, work: Path) -> tuple[int, str, str, int]:
    """Run the child; meanwhile read its RssAnon from /proc/PID/status every 2 ms, from this process, so that
    the timed process runs nothing but the segmentation. Returns (exit code, stdout, stderr, peak)."""
    peak = 0
    with open(work / "stdout", "w+") as out, open(work / "stderr", "w+") as err:
        child = subprocess.Popen(argv, stdout=out, stderr=err, text=True, cwd=REPO, env=env)
        while child.poll() is None:
            try:
                peak = max(peak, linux.status("RssAnon", child.pid))
            except (OSError, KeyError):  # the child is exiting
                pass
            time.sleep(0.002)
        out.seek(0), err.seek(0)
        return child.returncode, out.read(), err.read(), peak


def settings(dtypes: list[str], class_counts: list[int], upcast: bool) -> list[tuple[str, int, str]]:
    rows = []
    for dtype in dtypes:
        for c in class_counts:
            rows += [(dtype, c, "resident"), (dtype, c, "stream")]
            if c > 4:
                rows.append((dtype, c, "low-memory"))
            if dtype == "fp32" and upcast:
                rows.append((dtype, c, "upcast"))
    if "fp32" in dtypes:  # `segment --low-memory` as a user types it: the dtype the CPU computes fast (sd/precision.py)
        rows += [("default", c, "low-memory") for c in class_counts]
    return rows


LABEL = {"resident": "resident", "stream": "`--stream`", "low-memory": "`--low-memory`",
         "upcast": "fp16 kept mapped, up-cast per block (`load_sd(keep=)`)"}


def cpu_capability() -> str:
    """torch's kernel set and whether bf16 is fast here (which decides what --dtype bf16 computes in)."""
    import torch

    from minidiffseg.sd.precision import fast_on_cpu

    return f"torch {torch.backends.cpu.get_cpu_capability()}, fast bf16: {'yes' if fast_on_cpu(torch.bfloat16) else 'no'}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", type=Path, help="an SD1.5 folder or file (default: full-size random weights)")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated --dtype values to measure")
    p.add_argument("--classes", default="4,8", help="comma-separated class counts")
    p.add_argument("--images", type=int, default=2, help="images per process (the first has the cold cache)")
    p.add_argument("--resolution", type=int, default=512, help="side of the (square) test image")
    p.add_argument("--out", type=Path, default=OUT, help=f"markdown file for the table (default {OUT.relative_to(REPO)})")
    args = p.parse_args()
    if not Path("/proc/self/status").is_file():
        sys.exit("reads VmHWM / RssAnon from /proc/self/status: Linux only")
    from bench.measure import source_revision
    from bench.weights import random_hub_sd15

    weights = args.weights or random_hub_sd15()
    dtypes, counts = args.dtypes.split(","), [int(c) for c in args.classes.split(",")]
    commit = source_revision()
    head = [f"Generated by `python -m bench.experiments.peak_memory {' '.join(sys.argv[1:])}` at commit {commit}; not edited by hand.",
            "",
            f"- machine: {linux.cpu_model()} ({cpu_capability()}), {os.cpu_count()} logical CPUs; "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            f"- weights: {'full-size random SD1.5, the hub fp16 files' if args.weights is None else weights}; one "
            f"{args.resolution}×{args.resolution} image, CPU, default torch threads; each row a fresh process doing "
            f"what `minidiffseg segment` does for {args.images} images",
            "- peak RSS: VmHWM (all resident pages, mapped files included); peak anon: the child's RssAnon sampled every 2 ms "
            "from the parent process (its polling counts in others)",
            "- cold cache: the weight files evicted from the page cache (posix_fadvise DONTNEED) before each process; "
            "load s and image 1 s are cold-cache times; warm s: the median of images 2 to " + str(args.images),
            "- others: the CPU share other processes took during the row (timings are only comparable near 0 %)",
            "",
            "- computes: the dtype the arithmetic ran in on this CPU (sd/precision.py; \"kept\": the weights held in that "
            "half precision between blocks), which for bf16 on a CPU without fast bf16 is float32",
            "- --dtype (none): `segment --low-memory` without --dtype, the dtype it picks by the CPU; over resident: "
            "against resident fp32",
            "",
            "| --dtype | C | weights | computes | peak RSS | peak anon | after imports | load s (cold) | image 1 s (cold) | "
            "warm s | over resident, warm | others |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(head), flush=True)
    rows, resident = [], {}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        from PIL import Image

        images = []
        for i in range(args.images):  # a smooth pattern: the content does not change the cost
            images.append(work / f"photo{i}.png")
            Image.radial_gradient("L").rotate(90 * i).resize((args.resolution,) * 2).convert("RGB").save(images[-1])
        for dtype, c, mode in settings(dtypes, counts, upcast=weights.is_dir()):
            m = measure(weights, dtype, c, mode, images, work)
            warm = statistics.median(m["times"][1:] or m["times"])
            if mode == "resident":
                resident[dtype, c] = warm
            base = resident.get(("fp32" if dtype == "default" else dtype, c))  # the default against resident fp32
            ratio = f"{warm / base:.2f}×" if mode != "resident" and base else "—"
            row = (f"| {'(none)' if dtype == 'default' else dtype} | {c} | {LABEL[mode]} | {m['computes']} | {m['peak'] / GiB:.2f} GiB | {m['anon'] / GiB:.2f} GiB | "
                   f"{m['imports'] / GiB:.2f} GiB | {m['load']:.1f} | {m['times'][0]:.1f} | {warm:.1f} | {ratio} | "
                   f"{100 * m['others']:.0f} % |")
            rows.append(row)
            print(row, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("# Memory and time of a whole segmentation: resident vs streamed weights\n\n" +
                        "\n".join(head + rows) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
