"""One benchmark configuration in one fresh process: `python -m bench.worker JOB_JSON OUT_JSON`.

A fresh process per configuration keeps the peaks of one from leaking into the next (run.py starts
them). Every measured block runs `warmup` times unmeasured (the first of them also counts FLOPs),
then `repeats` times measured; the report takes the median time and the largest peak.

Job kinds:
  ours / baseline  the method on one image, stage by stage (+ end to end), from `weights`
  refine           the refinement alone on random Q, K: fused / chunked / naive (builds S)
  gemm             the machine's matrix-multiply rate per dtype
"""

from __future__ import annotations

import gc
import json
import sys

import torch

from minidiffseg.cli.options import DTYPES

from . import measure

SELF_LAYERS, HEADS, HEAD_DIM = 5, 8, 40  # SD1.5's 64² self-attention: 5 layers, 8 heads of 320/8 (docs/design.md §3)
CLASSES = ["cat", "dog", "sofa", "person", "car", "bird", "chair", "bottle"]  # VOC names, one BPE token each
IMAGE_SIZE = (640, 480)  # a photo-like, non-square input: post-processing resizes back to it


def test_image():
    """A fixed random RGB image (content does not change the cost of any stage)."""
    from PIL import Image

    w, h = IMAGE_SIZE
    pixels = torch.randint(0, 256, (h, w, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    return Image.frombytes("RGB", (w, h), pixels.numpy().tobytes())


def iterations(clock, warmup: int, repeats: int, flops: bool = True):
    """Yield once per iteration: `warmup` unmeasured (the first counts FLOPs), then `repeats` measured."""
    for i in range(warmup + repeats):
        clock.next_iteration(timed=i >= warmup, count_flops=flops and i == 0)
        yield i


def run_pipeline(job: dict, clock: measure.Clock, device: torch.device) -> dict:
    from . import baseline, ours

    dtype, classes, joint = DTYPES[job["dtype"]], CLASSES[:job["classes"]], job["mode"] == "joint"
    image = test_image()
    model = None
    for _ in iterations(clock, max(job["warmup"], 1), job["repeats"], flops=False):  # the first load reads the files
        model = None
        gc.collect()
        with clock("weight loading"):
            if job["kind"] == "ours":
                model = ours.load(job["weights"], device, dtype, job["resolution"], joint, job.get("stream", False))
            else:
                model = baseline.DiffusersRecipe(job["weights"], device, dtype, job["resolution"])
    for _ in iterations(clock, job["warmup"], job["repeats"]):
        if job["kind"] == "baseline":
            model.stages(image, classes, clock, parity=job.get("parity", False))
            continue
        if job.get("stages", True):
            ours.stages(model, image, classes, joint, clock)
        ours.end_to_end(model, image, classes, joint, clock)
    modules = [model.sd.unet, model.sd.vae, model.sd.text_encoder] if job["kind"] == "ours" else \
        [model.unet, model.vae, model.text]
    out = dict(weight_bytes=sum(t.numel() * t.element_size() for m in modules for t in m.state_dict().values()))
    if job.get("compile") and device.type == "cuda":
        out["compiled"] = compiled_unet(model, classes, joint, clock, job)
    if job.get("profile") and device.type == "cpu":
        out["profile"] = profile(lambda: ours.end_to_end(model, image, classes, joint, measure.Clock(device)))
    return out


def compiled_unet(seg, classes, joint, clock, job) -> list[str]:
    """GPU: our bare U-Net pass under torch.compile, and with CUDA graphs (mode "reduce-overhead")."""
    with torch.inference_mode():
        context = seg.encode_text(seg.prompts(classes, joint=joint)).states  # (B, 77, 768): an SD1.5 U-Net
        side = seg.resolution // 8
        z = torch.randn(context.shape[0], 4, side, side, device=seg.device, dtype=seg.dtype)
        stages = []
        for label, mode in (("torch.compile", "default"), ("CUDA graphs", "reduce-overhead")):
            unet = torch.compile(seg.sd.unet, mode=mode)
            for _ in iterations(clock, 3, job["repeats"], flops=False):  # compilation, graph capture
                with clock(f"U-Net pass ({label})"):
                    unet(z, seg.timesteps[0], context, output=False)
            stages.append(f"U-Net pass ({label})")
    return stages


def profile(fn) -> dict:
    """torch.profiler over one call: the total op time, and per op its own time, its time with children
    and its calls (the 40 ops with the most own time)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    rows = [dict(op=e.key, self_s=e.self_cpu_time_total / 1e6, total_s=e.cpu_time_total / 1e6, calls=e.count)
            for e in prof.key_averages()]
    return dict(total_s=sum(r["self_s"] for r in rows), ops=sorted(rows, key=lambda r: -r["self_s"])[:40])


def run_refine(job: dict, clock: measure.Clock, device: torch.device) -> dict:
    from minidiffseg.method.refine import refine, refine_chunked, refine_naive

    fn = {"fused": refine, "chunked": refine_chunked, "naive": refine_naive}[job["method"]]
    dtype, hw = DTYPES[job["dtype"]], (job["resolution"] // 8) ** 2
    g = torch.Generator().manual_seed(0)
    heads, dim = job.get("heads", HEADS), job.get("head_dim", HEAD_DIM)  # SD2.x: 5 heads of 64 (docs/sd2.md §1)
    qk = [tuple(torch.randn(job["batch"], heads, hw, dim, generator=g).to(device, dtype) for _ in "qk")
          for _ in range(SELF_LAYERS)]  # (B, heads, HW, d) per layer
    maps = torch.rand(job["batch"], hw, job["maps"], generator=g).to(device, dtype)  # (B, HW, K)
    with torch.inference_mode():
        for _ in iterations(clock, job["warmup"], job["repeats"]):
            with clock("refinement"):
                fn(qk, maps)
    return {}


def run_gemm(job: dict, clock: measure.Clock, device: torch.device) -> dict:
    return {"gemm_flops": {name: measure.gemm_rate(DTYPES[name], device, tuple(job["sizes"]))
                           for name in job["dtypes"]}}


def main(job: dict) -> dict:
    device = torch.device(job.get("device", "cpu"))
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    clock = measure.Clock(device)
    run = {"ours": run_pipeline, "baseline": run_pipeline, "refine": run_refine, "gemm": run_gemm}[job["kind"]]
    out = run(job, clock, device)
    return dict(out, stages=clock.summary(), flops_by_op=clock.flops, per_stage_peaks=clock.per_stage_peaks,
                threads=torch.get_num_threads())


if __name__ == "__main__":
    job_json, out_path = sys.argv[1:3]
    result = main(json.loads(job_json))
    with open(out_path, "w") as f:
        json.dump(result, f)
