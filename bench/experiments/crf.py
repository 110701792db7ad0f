"""Dense CRF speed and memory at a VOC image size, ours vs the C++ reference (pydensecrf), side by side.

    python -m bench.experiments.crf [--size 500x375] [--labels 3,21] [--presets clip-es,densecrf] [--repeats 3]
                                    [--threads 1,0] [--device cpu] [--out bench/results/crf.md]

For each photo (scikit-image's astronaut and chelsea, resized), label count K and preset, each
implementation runs in a fresh process on the same synthetic unary (smooth random logits, softmax):
the median wall time of `--repeats` runs of the whole CRF (building the kernels + the preset's
mean-field iterations), and the peak resident memory the CRF adds: VmHWM at the end minus VmRSS once
the inputs are made, after a warm-up run on a 50×40 crop (so that code pages touched on first use are
not counted) and a reset of VmHWM (/proc/self/clear_refs; Linux). Ours runs at each `--threads` count
(0: torch's default); the reference is single-threaded. The marginals Q of both are compared: max |ΔQ|
and the share of equal labels. Prints a table and writes it with the commit measured to --out. Needs
the test extra (pydensecrf2, scikit-image).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench import linux

REPO = Path(__file__).resolve().parents[2]
PHOTOS = ["astronaut", "chelsea"]

CHILD = r"""
import json, sys, time
import numpy as np
from bench.linux import reset_peak_rss, status  # bytes
impl, img_path, probs_path, q_path, preset, repeats, threads, device = sys.argv[1:9]
from minidiffseg.crf import PRESETS
p = PRESETS[preset]
if impl == "ours":
    import torch
    from minidiffseg.crf import DenseCRF
    if int(threads):
        torch.set_num_threads(int(threads))
    def make(img, probs):
        x = torch.from_numpy(probs)
        def run():
            q = DenseCRF(img, p, device=device)(x.to(device))
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            return q.cpu().numpy()
        return run
else:
    import pydensecrf.densecrf as dcrf
    def make(img, probs):
        k, h, w = probs.shape
        u = np.ascontiguousarray(-np.log(np.clip(probs, 1e-5, 1.0)).reshape(k, -1).astype(np.float32))
        def run():
            d = dcrf.DenseCRF2D(w, h, k)
            d.setUnaryEnergy(u)
            d.addPairwiseGaussian(sxy=p.smooth_xy, compat=p.smooth_w)
            d.addPairwiseBilateral(sxy=p.appear_xy, srgb=p.appear_rgb, rgbim=img, compat=p.appear_w)
            return np.array(d.inference(p.iterations)).reshape(k, h, w)
        return run
img, probs = np.load(img_path), np.load(probs_path)
make(np.ascontiguousarray(img[:40, :50]), np.ascontiguousarray(probs[:, :40, :50]))()  # warm-up: code pages
run = make(img, probs)
if not reset_peak_rss():  # VmHWM := VmRSS now (Linux >= 4.0)
    sys.exit("cannot reset VmHWM through /proc/self/clear_refs")
base, times = status("VmRSS"), []
for _ in range(int(repeats)):
    t = time.perf_counter()
    q = run()
    times.append(time.perf_counter() - t)
np.save(q_path, q)
print(json.dumps({"times": times, "peak_added": status("VmHWM") - base}))
"""

def photo(name: str, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image
    from skimage import data

    return np.ascontiguousarray(np.array(Image.fromarray(getattr(data, name)()).resize(size, Image.BILINEAR)))


def synthetic_probs(k: int, h: int, w: int, seed: int) -> np.ndarray:
    """(K, H, W) float32: random logits on a 10×-coarser grid, bilinear, softmax (as tests/test_crf.py)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(1, k, max(h // 10, 2), max(w // 10, 2), generator=g)
    return torch.softmax(torch.nn.functional.interpolate(logits, size=(h, w), mode="bilinear")[0], 0).numpy()


def child(impl: str, tmp: Path, preset: str, repeats: int, threads: int, device: str) -> tuple[dict, np.ndarray]:
    q_path = tmp / f"q-{impl}.npy"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", CHILD, impl, str(tmp / "img.npy"), str(tmp / "probs.npy"), str(q_path),
                           preset, str(repeats), str(threads), device], capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"bench.experiments.crf: the {impl} run failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1]), np.load(q_path)


def load_average() -> str:
    la = linux.load_average(digits=1)
    return " / ".join(f"{x:.1f}" for x in la) if la else "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="500x375", help="W x H (default 500x375, a VOC image)")
    ap.add_argument("--labels", default="3,21", help="label counts K (default 3,21: a few candidates, all of VOC)")
    ap.add_argument("--presets", default="clip-es,densecrf")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", default="1,0", help="torch threads for ours; 0 = torch's default (default 1,0)")
    ap.add_argument("--device", default="cpu", help="ours on cpu or cuda (the reference is CPU only)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "crf.md"))
    args = ap.parse_args(argv)
    from bench.measure import source_revision

    w, h = (int(x) for x in args.size.lower().split("x"))
    threads = [int(t) for t in args.threads.split(",")]
    head = ["photo", "K", "preset", "reference s"] + [f"ours s ({t or 'default'} thr.)" for t in threads] + \
           ["reference MiB", "ours MiB", "max abs dQ", "labels agree"]
    rows = []
    load_before = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in PHOTOS:
            np.save(tmp / "img.npy", photo(name, (w, h)))
            for k in (int(x) for x in args.labels.split(",")):
                np.save(tmp / "probs.npy", synthetic_probs(k, h, w, seed=k))
                for preset in args.presets.split(","):
                    ref, q_ref = child("reference", tmp, preset, args.repeats, 1, "cpu")
                    ours = [child("ours", tmp, preset, args.repeats, t, args.device) for t in threads]
                    q = ours[0][1]
                    row = [name, k, preset, f"{statistics.median(ref['times']):.2f}"]
                    row += [f"{statistics.median(o['times']):.2f}" for o, _ in ours]
                    mib = max(o["peak_added"] for o, _ in ours) / 2 ** 20
                    row += [f"{ref['peak_added'] / 2 ** 20:.0f}", f"{mib:.0f}",
                            f"{np.abs(q - q_ref).max():.1e}", f"{100 * (q.argmax(0) == q_ref.argmax(0)).mean():.3f}%"]
                    rows.append(row)
                    print(" | ".join(map(str, row)), flush=True)
    table = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + \
            ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    import torch

    note = [f"# Dense CRF: ours vs pydensecrf at {w}×{h}", "",
            f"- code: commit {source_revision()}; command: `python -m bench.experiments.crf {' '.join(argv or sys.argv[1:])}`",
            f"- machine: {linux.cpu_model()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, device "
            f"{args.device}; load average (1/5/15 min) {load_before} before, {load_average()} after",
            f"- time: median of {args.repeats} runs of the whole CRF (kernels + mean field), each implementation "
            "in a fresh process; memory: peak RSS the CRF adds to the process",
            "- synthetic unary (smooth random logits, softmax); dQ and labels: ours (first thread count) vs the "
            "reference", ""]
    text = "\n".join(note + table) + "\n"
    print("\n" + text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
