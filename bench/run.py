"""Latency and memory of minidiffseg per stage, side by side with the diffusers way (docs/design.md §6).

    python -m bench.run            # full run (CPU: ~40 min on 2 cores), writes bench/results/cpu.{md,json}
    python -m bench.run --quick    # a few minutes: 256² input, fp32, one repeat -> cpu-quick.{md,json}
    minidiffseg bench --quick      # the same, from the command line of the package

Without --weights, full-size SD1.5 networks with random weights are written once into --cache: they
cost exactly the compute of the real weights (the output says so). Each configuration runs in a fresh
process (bench/worker.py); the Markdown table is rewritten after every configuration, so an
interrupted run leaves what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/run.py` as well as `python -m bench.run`
    sys.path.insert(0, str(ROOT))

from minidiffseg.errors import UserError  # noqa: E402
CLASS_COUNTS = (1, 2, 4, 8)
QUIET = 0.1  # share of the CPUs busy with other work that still counts as an idle machine (--quiet-wait)
HEADLINE_CLASSES = 4


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a few minutes: 256² input, fp32 only, 1 warm-up + 1 repeat, "
                   "no scaling runs")
    p.add_argument("--tiny", action="store_true", help="tiny random models (for CI: checks the benchmark runs; the "
                   "figures mean nothing)")
    p.add_argument("--weights", help="a diffusers SD1.5 folder with real weights (default: random full-size weights "
                   "written into --cache)")
    p.add_argument("--model", choices=["sd15", "sd21-base", "sd21"], default="sd15",
                   help="which random checkpoint: sd15 (default), sd21-base (SD2.1-base, 512²) or sd21 (SD2.1 768-v, "
                   "measured at its 768²; ours only there, the official recipe's stored maps would need ~17 GiB); "
                   "results go to NAME-MODEL.md (docs/sd2.md §6)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--warmup", type=int, help="unmeasured runs before measuring (default 1)")
    p.add_argument("--repeats", type=int, help="measured runs, the median is reported (default 3, --quick 1)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's default, all cores)")
    p.add_argument("--stream", action="store_true", help="ours with streamed weights (docs/memory.md): each block "
                   "read from the files as it runs")
    p.add_argument("--quiet-wait", type=float, default=0, metavar="SECONDS",
                   help=f"before each configuration, wait up to SECONDS until other processes use less than {QUIET * 100:.0f}%% "
                   "of the CPUs (other work on a small machine skews timings; default 0: don't wait)")
    p.add_argument("--sections", default="gemm,refine,headline,scaling",
                   help="comma-separated subset of gemm,refine,headline,scaling")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for NAME.md and NAME.json")
    p.add_argument("--name", help="file stem of the results (default: cpu / cpu-quick / cuda / ... / tiny)")
    p.add_argument("--cache", default=str(ROOT / "bench" / ".cache"), help="where random weights are written")
    p.set_defaults(func=main_args)


def fast_bf16() -> bool:
    """Whether this CPU computes bf16 fast (sd/precision.py). Where it does not, bf16 runs ~100× slower than
    fp32 (emulated) and `--dtype bf16` computes in fp32 anyway: the bf16 rows are skipped (the report says so)."""
    import torch

    from minidiffseg.sd.precision import fast_on_cpu

    return fast_on_cpu(torch.bfloat16)


def plan(args, weights: str, device: str) -> list[dict]:
    """The configurations, in the order they run."""
    from bench.weights import configs

    quick = args.quick or args.tiny
    gpu = device == "cuda"
    unet = configs(args.tiny, args.model)[0]
    res = 128 if args.tiny else 256 if args.quick else unet.sample_size * 8  # the model's size: 512, 768 for 768-v
    baseline = res <= 512  # at 768² the official recipe keeps 5 × 2 × 5 × 9216² fp32 probabilities (17 GiB)
    heads = unet.heads(0)  # the refinement's 64² (level-1) self-attention: SD1.5 8 heads of 40, SD2.x 5 of 64
    dtypes = ["fp32"] if quick else (["fp16", "bf16"] if gpu else ["fp32", "bf16"] if fast_bf16() else ["fp32"])
    warmup = 1 if args.warmup is None else args.warmup
    repeats = args.repeats or (1 if quick else 3)
    common = dict(device=device, weights=weights, warmup=warmup, repeats=repeats, threads=args.threads,
                  resolution=res, classes=HEADLINE_CLASSES, mode="batched", stream=args.stream)
    sections = set(args.sections.split(","))
    jobs = []
    if "gemm" in sections:
        sizes = [256] if args.tiny else [8192] if gpu else [2048, 4096]
        jobs.append(dict(common, kind="gemm", section="gemm", dtypes=["fp32", *[d for d in dtypes if d != "fp32"]],
                         sizes=sizes))
    if "refine" in sections:
        for r in ((128,) if args.tiny else (256, 512) if quick else (256, 512, 768)):
            for method in ("fused", "chunked", "naive"):
                jobs.append(dict(common, kind="refine", section="refine", method=method, resolution=r, batch=1,
                                 maps=1, dtype=dtypes[0], heads=heads, head_dim=unet.block_out_channels[0] // heads))
    if "headline" in sections:
        for i, dtype in enumerate(dtypes):
            jobs.append(dict(common, kind="ours", section="headline", dtype=dtype, stages=True,
                             profile=i == 0 and not gpu, compile=gpu))
            if baseline:
                jobs.append(dict(common, kind="baseline", section="headline", dtype=dtype, parity=True))
    if "scaling" in sections and not quick:
        scaled = dict(common, kind="ours", section="scaling", dtype=dtypes[0], stages=False,
                      repeats=max(1, repeats - 1))
        for c in CLASS_COUNTS:
            if c != HEADLINE_CLASSES:
                jobs.append(dict(scaled, classes=c))
            if c > 1:
                jobs.append(dict(scaled, classes=c, mode="joint"))
        for r in (256, 768):
            jobs.append(dict(scaled, resolution=r))
        if not gpu:
            jobs.append(dict(scaled, classes=1, threads=1))
    return jobs


def describe(job: dict) -> str:
    if job["kind"] == "gemm":
        return f"GEMM rate {'/'.join(job['dtypes'])}"
    if job["kind"] == "refine":
        return f"refinement {job['method']} {job['resolution']}² {job['dtype']}"
    threads = f" {job['threads']} thread(s)" if job.get("threads") else ""
    streamed = " streamed" if job.get("stream") and job["kind"] == "ours" else ""
    return f"{job['kind']}{streamed} {job['dtype']} C={job['classes']} {job['mode']} {job['resolution']}²{threads}"


def run_job(job: dict) -> dict:
    """`python -m bench.worker` in a fresh process; its result, or the error it died with."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    if job.get("threads"):
        env.update(OMP_NUM_THREADS=str(job["threads"]), MKL_NUM_THREADS=str(job["threads"]))
    from bench.linux import OthersCPU

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        t0 = time.perf_counter()
        with OthersCPU() as others:  # the CPU share the rest of the machine used meanwhile: all busy but the worker
            proc = subprocess.run([sys.executable, "-m", "bench.worker", json.dumps(job), str(out)], cwd=ROOT, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode == 0 and out.is_file():
            return dict(job=job, result=json.loads(out.read_text()), wall_s=wall, others_cpu=others.share)
    killed = " (killed: out of memory?)" if proc.returncode in (-9, 137) else ""
    tail = "\n".join(proc.stdout.strip().splitlines()[-5:])
    return dict(job=job, error=f"exit code {proc.returncode}{killed}: {tail}", wall_s=wall, others_cpu=others.share)


def wait_for_quiet(seconds: float) -> float:
    """Wait until other processes use less than QUIET of the CPUs, at most `seconds`; the time waited."""
    from bench.linux import busy_share

    t0 = time.monotonic()
    while seconds > 0 and time.monotonic() - t0 < seconds and busy_share() >= QUIET:
        pass
    return time.monotonic() - t0


def main_args(args) -> int:
    import torch

    from bench import linux, measure, report

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
        raise UserError(f"--device {device}: use cpu, or cuda on a machine with a visible CUDA device")
    if args.weights:
        weights, source = args.weights, f"given: {args.weights}"
        if not Path(weights).is_dir():
            raise UserError(f"--weights {weights}: give a diffusers SD1.5 folder (the baseline loads it with diffusers)")
    else:
        from bench.weights import random_sd

        weights = str(random_sd(Path(args.cache), args.model, tiny=args.tiny))
        model = {"sd15": "SD1.5", "sd21-base": "SD2.1-base", "sd21": "SD2.1 768-v"}[args.model]
        source = (f"random tiny {model} (figures mean nothing: checks that the benchmark runs)" if args.tiny else
                  f"random full-size {model} (bench/weights.py): same shapes, kernels and FLOPs as the real weights; "
                  "outputs meaningless")
    name = args.name or ("tiny" if args.tiny else device + ("-quick" if args.quick else "")) + \
        ("" if args.model == "sd15" else f"-{args.model}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python -m bench.run" if sys.argv[0].endswith("run.py") else "minidiffseg", *sys.argv[1:]])
    try:
        import accelerate  # noqa: F401
        has_accelerate = True
    except ImportError:
        has_accelerate = False
    results = dict(meta=dict(machine=measure.machine(torch.device(device)), command=command, weights=source,
                             source=measure.source_revision(),
                             load_average_start=linux.load_average(), accelerate=has_accelerate,
                             quick=args.quick, tiny=args.tiny), jobs=[])
    jobs = plan(args, weights, device)
    for i, job in enumerate(jobs, 1):
        waited = wait_for_quiet(args.quiet_wait)
        print(f"[{i}/{len(jobs)}] {describe(job)} ...", flush=True)
        done = dict(run_job(job), load_average=linux.load_average(), waited_s=waited)
        results["jobs"].append(done)
        results["meta"]["load_average_end"] = linux.load_average()
        print(f"        {report.one_line(done)}", flush=True)
        (out / f"{name}.json").write_text(json.dumps(results, indent=1))
        (out / f"{name}.md").write_text(report.render(results))
    print(f"wrote {out / name}.md and .json")
    return 1 if any("error" in j for j in results["jobs"]) else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return main_args(args)
    except UserError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
