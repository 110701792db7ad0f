"""SD3-medium on this CPU: a whole segmentation per setting, time per step, FLOP floor, peak memory (docs/sd3.md).

    python -m bench.experiments.sd3 [--weights DIR] [--resolutions 512,1024] [--dtypes fp32,bf16]
                                    [--modes resident,stream] [--t5 on,off] [--classes 4] [--diffusers 512]
                                    [--out FILE]

As bench/experiments/sdxl.py does for SDXL: each setting runs in a fresh process that loads SD3
(`Segmenter.from_pretrained`, resident or `stream=True`) and segments one image twice, the first run cold (the
weight files evicted from the page cache before the process starts; for the first setting of each resolution and
T5 choice, with torch's FLOP counter on) and the second warm, each step of `Segmenter.run` timed (bench/measure.py
Clock). The text cache is emptied before each run, so each image encodes its prompts (T5-XXL's 4.76 B parameters
on 256 tokens per prompt, for the C prompts and the empty one: a step that costs as much as the transformer).
Reported per setting:
- the steps' warm seconds: text = prompts + encode_text (CLIP-L, bigG and T5); VAE = encode_image; transformer =
  record (the MM-DiT pass of the C rows with the attention store); fuse + refine; decide; and the whole warm image;
- the FLOP floor: the text encoders' and the transformer's FLOPs (2 per multiply-add, counted once per resolution
  and T5 choice) over this machine's matrix-multiply rate in that dtype (bench/measure.py gemm_rate), and each
  step's time over its floor;
- peak RSS: the largest VmHWM of the process (loading, and each step); peak anon: the child's RssAnon sampled
  every 2 ms by this process.
`--t5 off` runs the folder as `download --no-t5` leaves it (bench/weights.py no_t5_view: symlinks without
text_encoder_3/ and tokenizer_3/; zeros in T5's 256 places). `--diffusers 512` adds the diffusers recipe
(bench/baseline_sd3.py) at that size, resident, same dtypes and T5 choices.

A setting whose resident weights (their element count in the files × the dtype's size, plus a margin for the
activations) exceed this machine's memory is skipped with the reason printed and written in its row: resident
fp32 with T5 needs 31 GB of weights (T5-XXL alone 19 GB), which does not fit in 24 GiB.

Without --weights, full-size random SD3-medium is written once (~15.5 GB of fp16 files, bench/weights.py
random_hub_sd3) to bench/.cache/sd3. Random weights take the same memory and time as the real ones. Timings need
a quiet machine (other processes' CPU share is printed per row); memory figures do not. The table is written to
`--out` (default bench/results/cpu-sd3.md) and its figures to the same name with .json.
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
from bench.experiments.peak_memory import cpu_capability, run_sampled

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "bench" / "results" / "cpu-sd3.md"
GiB = 2**30
CLASSES = ["cat", "dog", "sofa", "person", "car", "tree", "sky", "grass"]
BYTES = {"fp32": 4, "bf16": 2}
MARGIN = {512: 2 * GiB, 1024: 4 * GiB}  # activations beside the weights (the baseline's kept softmax at 1024²: 3.8 GB)

CHILD = r"""
import json, sys, time
import torch
from PIL import Image
from bench.linux import status
from bench.measure import Clock
weights, dtype, mode, res, classes, image, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), \
    sys.argv[5].split(","), Image.open(sys.argv[6]).convert("RGB"), sys.argv[7] == "1"
dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}[dtype]
start = time.perf_counter()
if mode == "diffusers":
    from bench.baseline_sd3 import DiffusersSD3Recipe
    model = DiffusersSD3Recipe(weights, torch.device("cpu"), dt, res)
else:
    from minidiffseg.method.segmenter import Segmenter
    model = Segmenter.from_pretrained(weights, dtype=dt, stream=mode == "stream", resolution=res)
load, peak = time.perf_counter() - start, status("VmHWM")
out = {"load": load, "t5": model.t5 if mode == "diffusers" else model.sd.t5}
for run, flops in (("cold", count), ("warm", False)):
    clock = Clock(torch.device("cpu"))
    clock.next_iteration(timed=True, count_flops=flops)
    t = time.perf_counter()
    if mode == "diffusers":
        mask = model.stages(image, classes, clock)
    else:
        model.text_cache.clear()  # each image encodes its prompts (T5 included), as the baseline does
        mask = model.run(image, classes, clock=clock).mask
    out[run] = time.perf_counter() - t
    summary = clock.summary()
    peak = max([peak] + [s["peak_bytes"] for s in summary.values()])
    if run == "warm":
        out["steps"] = {k: v["seconds"] for k, v in summary.items()}
        out["mask"] = torch.bincount(mask.flatten(), minlength=len(classes) + 1).tolist()  # pixels per class
    if flops:
        out["flops"] = {k: v["flops"] for k, v in summary.items()}
out["peak"] = peak
print(json.dumps(out))
"""

# the steps of ours (Segmenter.run) and of the baseline (bench/baseline_sd3.py RECIPE), per column
STEPS = {"text": ("prompts", "encode_text", "text encode"), "VAE": ("encode_image", "VAE encode"),
         "transformer": ("record", "transformer + capture"), "fuse+refine": ("fuse", "refine", "fusion", "refinement"),
         "decide": ("decide", "post-processing")}


def component_files(folder: Path) -> list[Path]:
    """The weight files under an SD3 folder (symlinked components followed), shards included."""
    return sorted(p for c in Path(folder).iterdir() if c.is_dir() for p in c.glob("*.safetensors"))


def resident_bytes(folder: Path, dtype: str, mode: str) -> int:
    """The weights' bytes resident in `dtype`: the elements each network loads from the folder's files (ours: the
    VAE's encoder only; diffusers: every tensor, the decoder too), from the files' headers, × the dtype's size."""
    from minidiffseg.sd3.checkpoint import diffusers_parts

    parts = diffusers_parts(Path(folder))
    numel = 0
    for part in parts.values():
        keys = part.shapes if mode == "diffusers" else part.names
        numel += sum(_numel(part.shapes[k]) for k in keys)
    return numel * BYTES[dtype]


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def memory_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise OSError("no MemTotal in /proc/meminfo")


def fits(folder: Path, dtype: str, mode: str, res: int, total: int) -> str | None:
    """None when the setting fits in `total` bytes of memory, else the reason it is skipped."""
    if mode == "stream":  # one block resident at a time
        return None
    need = resident_bytes(folder, dtype, mode)
    margin = MARGIN.get(res, 4 * GiB)
    if need + margin <= total:
        return None
    return (f"skipped: {need / 1e9:.1f} GB of {dtype} weights resident + {margin / GiB:.0f} GiB for activations "
            f"does not fit in {total / GiB:.0f} GiB")


def measure(weights: Path, dtype: str, mode: str, res: int, classes: int, image: Path, count: bool,
            work: Path) -> dict:
    linux.evict(component_files(weights))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    argv = [sys.executable, "-c", CHILD, str(weights), dtype, mode, str(res), ",".join(CLASSES[:classes]), str(image),
            "1" if count else "0"]
    with linux.OthersCPU() as others:
        code, stdout, stderr, anon = run_sampled(argv, env, work)
    if code != 0 or not stdout.strip():
        return {"error": (stderr.strip().splitlines() or ["(no output)"])[-1][:300]}
    return dict(json.loads(stdout.strip().splitlines()[-1]), anon=anon, others=others.share)


def step_seconds(steps: dict, column: str) -> float | None:
    found = [steps[n] for n in STEPS[column] if n in steps]
    return sum(found) if found else None


def step_flops(flops: dict | None, column: str) -> float | None:
    found = [flops[n] for n in STEPS[column] if flops and flops.get(n)]
    return sum(found) if found else None


HEADER = ["size", "dtype", "T5", "weights", "load s", "image 1 s", "image 2 s", "text s", "VAE s", "transformer s",
          "fuse+refine s", "decide s", "text TFLOP", "text / floor", "transformer TFLOP", "transformer / floor",
          "peak RSS", "peak anon", "others"]


def row_cells(s: dict, flops: dict | None, rate: float) -> list[str]:
    """The table's cells of one measured setting `s` (its `flops`: the counted ones of its resolution and T5)."""
    def f1(x):
        return "—" if x is None else f"{x:.1f}"

    steps = s["steps"]
    cells = [f"{s['res']}²", s["dtype"], "on" if s["t5"] else "off", s["mode"], f1(s["load"]), f1(s["cold"]),
             f1(s["warm"])] + [f1(step_seconds(steps, c)) for c in ("text", "VAE", "transformer", "fuse+refine",
                                                                     "decide")]
    for column in ("text", "transformer"):
        n = step_flops(flops, column) if s["mode"] != "diffusers" else None  # the FLOPs counted are ours
        t = step_seconds(steps, column)
        cells += [f"{n / 1e12:.1f}" if n else "—", f"{t / (n / rate):.2f}×" if n and t else "—"]
    cells += [f"{s['peak'] / GiB:.2f} GiB", f"{s['anon'] / GiB:.2f} GiB", f"{100 * s['others']:.0f} %"]
    return cells


def table_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.experiments.sd3", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", type=Path, help="an SD3 folder with T5 (default: full-size random SD3-medium)")
    p.add_argument("--resolutions", default="512,1024")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--modes", default="resident,stream", help="resident, stream or both ('' for the diffusers rows only)")
    p.add_argument("--t5", default="on,off", help="on, off or both: with T5, and as `download --no-t5` leaves it")
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--diffusers", default="512", help="resolutions at which to run the diffusers recipe too ('' for none)")
    p.add_argument("--memory", type=float, help="GiB of memory to plan for (default: this machine's MemTotal)")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    if not Path("/proc/self/status").is_file():
        sys.exit("reads VmHWM / RssAnon from /proc/self/status: Linux only")
    import torch

    from bench.measure import gemm_rate, source_revision
    from bench.weights import no_t5_view, random_hub_sd3

    weights = (args.weights or random_hub_sd3()).resolve()
    folders = {"on": weights, "off": no_t5_view(weights)}
    t5s = [t for t in args.t5.split(",") if t]
    if not t5s or not set(t5s) <= set(folders):
        sys.exit(f"--t5 {args.t5}: give on, off or on,off")
    if "on" in t5s and not (weights / "text_encoder_3").is_dir():
        sys.exit(f"--t5 on: {weights} has no text_encoder_3/ (give --t5 off, or a folder with T5)")
    dtypes, modes = args.dtypes.split(","), [m for m in args.modes.split(",") if m]  # '': the diffusers rows only
    if not set(dtypes) <= set(BYTES) or not set(modes) <= {"resident", "stream"}:
        sys.exit(f"--dtypes {args.dtypes} --modes {args.modes}: dtypes among fp32,bf16; modes among resident,stream")
    resolutions = [int(r) for r in args.resolutions.split(",")]
    baseline = {int(r) for r in args.diffusers.split(",") if r}
    total = int(args.memory * GiB) if args.memory else memory_total()
    rates = {d: gemm_rate({"fp32": torch.float32, "bf16": torch.bfloat16}[d], torch.device("cpu"), (1024, 2048))
             for d in dtypes}
    load_average = linux.load_average()
    meta = {"command": f"python -m bench.experiments.sd3 {' '.join(sys.argv[1:] if argv is None else argv)}".strip(),
            "commit": source_revision(), "cpu": linux.cpu_model(), "cpu_capability": cpu_capability(),
            "logical_cpus": os.cpu_count(), "memory_gib": round(total / GiB, 1),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_average_start": load_average,
            "gemm_flops": rates, "classes": args.classes,
            "weights": "full-size random SD3-medium, the hub fp16 files" if args.weights is None else str(weights)}
    head = [f"Generated by `{meta['command']}` at commit {meta['commit']}; not edited by hand.", "",
            f"- machine: {meta['cpu']} ({meta['cpu_capability']}), {meta['logical_cpus']} logical CPUs, "
            f"{meta['memory_gib']} GiB; {meta['date']}; load average at the start "
            f"{', '.join(f'{x:.2f}' for x in load_average) if load_average else '?'}; GEMM rate "
            + ", ".join(f"{d} {r / 1e9:.0f} GFLOP/s" for d, r in rates.items()),
            f"- weights: {meta['weights']}; T5 off: the same folder without text_encoder_3/ and tokenizer_3/ (zeros in "
            f"T5's 256 places); C = {args.classes} classes, one square image; each row a fresh process, the weight files "
            "evicted from the page cache first; load s and image 1 s cold (image 1 with the FLOP counter on in the "
            "first row of each size and T5 choice), the steps and image 2 s warm; the text cache emptied before each "
            "image",
            "- text: prompts + encode_text (CLIP-L, bigG, T5-XXL; the diffusers recipe: encode_prompt per prompt); "
            "transformer: the MM-DiT pass with the attention store (`record`; the diffusers recipe: one pass per class "
            "keeping the anchor block's joint softmax); floor: the FLOPs over the GEMM rate; peak RSS: the largest "
            "VmHWM (loading, each step); peak anon: RssAnon sampled every 2 ms; others: other processes' CPU share "
            "during the row",
            "- skipped: settings whose resident weights (element counts from the files' headers × the dtype's size) "
            "plus a margin for the activations exceed the machine's memory",
            "", table_row(HEADER), "|" + "---|" * len(HEADER)]
    print("\n".join(head), flush=True)
    rows, results = [], []
    json_out = args.out.with_suffix(".json")
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        from PIL import Image

        for res in resolutions:
            image = work / f"photo{res}.png"
            Image.radial_gradient("L").resize((res, res)).convert("RGB").save(image)
            for t5 in t5s:
                folder, flops = folders[t5], None
                settings = [(d, m) for d in dtypes for m in modes] + [(d, "diffusers") for d in dtypes
                                                                       if res in baseline]
                for dtype, mode in settings:
                    what = dict(res=res, dtype=dtype, t5=t5 == "on", mode=mode)
                    reason = fits(folder, dtype, mode, res, total)
                    if reason:
                        cells = [f"{res}²", dtype, t5, mode, reason]
                        results.append(dict(what, skipped=reason))
                        print(f"{res}² {dtype} T5 {t5} {mode}: {reason}", file=sys.stderr)
                    else:
                        m = measure(folder, dtype, mode, res, args.classes, image, flops is None and mode != "diffusers",
                                    work)
                        m = dict(what, **m)
                        if "error" in m:
                            cells = [f"{res}²", dtype, t5, mode, f"failed: {m['error']}"]
                        else:
                            if "flops" in m:
                                flops = m["flops"]
                            cells = row_cells(m, flops, rates[dtype])
                        results.append(m)
                    rows.append(table_row(cells))
                    print(rows[-1], flush=True)
                    args.out.parent.mkdir(parents=True, exist_ok=True)  # rewritten after every row: nothing is lost
                    args.out.write_text("# SD3-medium on the CPU: time per step, FLOP floor, peak memory\n\n" +
                                        "\n".join(head + rows) + "\n")
                    json_out.write_text(json.dumps({"meta": meta, "settings": results}, indent=1))
    print(f"wrote {args.out} and {json_out.name}")


if __name__ == "__main__":
    main()
