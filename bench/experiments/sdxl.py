"""SDXL on this CPU: a whole segmentation per setting, time per step, FLOP floor, peak memory (docs/sdxl.md §5).

    python -m bench.experiments.sdxl [--weights DIR] [--resolutions 512,1024] [--dtypes fp32,bf16]
                                     [--modes resident,stream] [--classes 4] [--diffusers 512] [--out FILE]

Each setting runs in a fresh process that loads SDXL (`Segmenter.from_pretrained`, resident or `stream=True`)
and segments one image twice: the first run cold (the weight files evicted from the page cache before the
process starts) and, for the first setting of each resolution, with torch's FLOP counter on; the second run
warm, each step of `Segmenter.run` timed (bench/measure.py Clock). Reported per setting:
- the steps' warm seconds (text = prompts + encode_text; VAE; U-Net = record, the denoiser passes with the
  attention store; fuse + refine; decide) and the whole warm image;
- the FLOP floor: the U-Net passes' FLOPs (2 per multiply-add, counted once per resolution) over this
  machine's matrix-multiply rate in that dtype (measured here, bench/measure.py gemm_rate), and the U-Net
  time over that floor;
- peak RSS: the largest VmHWM of the process (loading, and each step: the Clock resets it per step); peak
  anon: the child's RssAnon sampled every 2 ms by this process.
`--diffusers 512` adds the diffusers recipe (bench/baseline_xl.py) at that size, resident, same dtypes: at
1024² its kept attention maps alone exceed this machine's memory (the baseline's docstring says why).

Without --weights, full-size random SDXL base is written once (~6.9 GB of fp16 files, bench/weights.py
random_hub_sdxl) to bench/.cache/sdxl. Random weights take the same memory and time as the real ones.
Timings need a quiet machine (other processes' CPU share is printed per row); memory figures do not.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from bench import linux
from bench.experiments.peak_memory import cpu_capability, run_sampled, weight_files

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "bench" / "results" / "cpu-sdxl.md"
GiB = 2**30
CLASSES = ["cat", "dog", "sofa", "person", "car", "tree", "sky", "grass"]

CHILD = r"""
import json, sys, time
import torch
from PIL import Image
from bench.linux import status
from bench.measure import Clock
weights, dtype, mode, res, classes, image, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), \
    sys.argv[5].split(","), Image.open(sys.argv[6]).convert("RGB"), sys.argv[7] == "1"
dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
start = time.perf_counter()
if mode == "diffusers":
    from bench.baseline_xl import DiffusersXLRecipe
    model = DiffusersXLRecipe(weights, torch.device("cpu"), dt, res)
else:
    from minidiffseg.method.segmenter import Segmenter
    model = Segmenter.from_pretrained(weights, dtype=dt, stream=mode == "stream", resolution=res)
load, peak = time.perf_counter() - start, status("VmHWM")
out = {"load": load}
for run, flops in (("cold", count), ("warm", False)):
    clock = Clock(torch.device("cpu"))
    clock.next_iteration(timed=True, count_flops=flops)
    t = time.perf_counter()
    if mode == "diffusers":
        model.stages(image, classes, clock)
    else:
        model.run(image, classes, clock=clock)
    out[run] = time.perf_counter() - t
    summary = clock.summary()
    peak = max([peak] + [s["peak_bytes"] for s in summary.values()])
    if run == "warm":
        out["steps"] = {k: v["seconds"] for k, v in summary.items()}
    if flops:
        out["flops"] = {k: v["flops"] for k, v in summary.items()}
out["peak"] = peak
print(json.dumps(out))
"""


def measure(weights: Path, dtype: str, mode: str, res: int, classes: int, image: Path, count: bool,
            work: Path) -> dict:
    linux.evict(weight_files(weights))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    argv = [sys.executable, "-c", CHILD, str(weights), dtype, mode, str(res), ",".join(CLASSES[:classes]), str(image),
            "1" if count else "0"]
    with linux.OthersCPU() as others:
        code, stdout, stderr, anon = run_sampled(argv, env, work)
    if code != 0 or not stdout.strip():
        return {"error": (stderr.strip().splitlines() or ["(no output)"])[-1][:300]}
    return dict(json.loads(stdout.strip().splitlines()[-1]), anon=anon, others=others.share)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", type=Path, help="an SDXL folder (default: full-size random weights)")
    p.add_argument("--resolutions", default="512,1024")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--modes", default="resident,stream")
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--diffusers", default="512", help="resolutions at which to run the diffusers recipe too ('' for none)")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    import torch

    from bench.measure import gemm_rate, source_revision
    from bench.weights import random_hub_sdxl

    weights = args.weights or random_hub_sdxl()
    dtypes, modes = args.dtypes.split(","), args.modes.split(",")
    resolutions = [int(r) for r in args.resolutions.split(",")]
    baseline = {int(r) for r in args.diffusers.split(",") if r}
    rates = {d: gemm_rate({"fp32": torch.float32, "bf16": torch.bfloat16}[d], torch.device("cpu"), (1024, 2048))
             for d in dtypes}
    head = [f"Generated by `python -m bench.experiments.sdxl {' '.join(sys.argv[1:])}` at commit {source_revision()}; "
            "not edited by hand.", "",
            f"- machine: {linux.cpu_model()} ({cpu_capability()}), {os.cpu_count()} logical CPUs; "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; GEMM rate "
            + ", ".join(f"{d} {r / 1e9:.0f} GFLOP/s" for d, r in rates.items()),
            f"- weights: {'full-size random SDXL base, the hub fp16 files' if args.weights is None else weights}; "
            f"C = {args.classes} classes, one square image; each row a fresh process, the weight files evicted from the "
            "page cache first; load s and image 1 s cold, the steps and image 2 s warm",
            "- U-Net: the denoiser pass with the attention store (`record`; the diffusers recipe: its per-class passes "
            "keeping every map); floor: the U-Net's FLOPs over the GEMM rate; peak RSS: the largest VmHWM (loading, "
            "each step); peak anon: RssAnon sampled every 2 ms; others: other processes' CPU share during the row",
            "",
            "| size | dtype | weights | load s | image 1 s | image 2 s | text s | VAE s | U-Net s | fuse+refine s | "
            "U-Net TFLOP | U-Net / floor | peak RSS | peak anon | others |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(head), flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        from PIL import Image

        for res in resolutions:
            image = work / f"photo{res}.png"
            Image.radial_gradient("L").resize((res, res)).convert("RGB").save(image)
            flops = None
            settings = [(d, m) for d in dtypes for m in modes] + [(d, "diffusers") for d in dtypes if res in baseline]
            for dtype, mode in settings:
                m = measure(weights, dtype, mode, res, args.classes, image, flops is None and mode != "diffusers", work)
                if "error" in m:
                    row = f"| {res}² | {dtype} | {mode} | failed: {m['error']} |"
                else:
                    if "flops" in m:
                        flops = m["flops"].get("record")
                    steps = m["steps"]
                    unet = steps.get("record", steps.get("U-Net + capture"))

                    def step(names):
                        found = [steps[n] for n in names if n in steps]
                        return f"{sum(found):.1f}" if found else "—"

                    text = step(("prompts", "encode_text", "text encode"))
                    vae = step(("encode_image", "VAE encode"))
                    fr = step(("fuse", "refine", "fusion", "refinement"))
                    floor = flops / rates[dtype] if flops and mode != "diffusers" else None  # the floor of our work
                    tflop, over = (f"{flops / 1e12:.1f}", f"{unet / floor:.2f}×") if floor else ("—", "—")
                    row = (f"| {res}² | {dtype} | {mode} | {m['load']:.1f} | {m['cold']:.1f} | {m['warm']:.1f} | {text} | "
                           f"{vae} | {unet:.1f} | {fr} | {tflop} | {over} | {m['peak'] / GiB:.2f} GiB | "
                           f"{m['anon'] / GiB:.2f} GiB | {100 * m['others']:.0f} % |")
                rows.append(row)
                print(row, flush=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text("# SDXL on the CPU: time per step, FLOP floor, peak memory\n\n" +
                                    "\n".join(head + rows) + "\n")  # rewritten after every row: nothing is lost
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
