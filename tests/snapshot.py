"""Everything the method computes on the tiny random models, saved to a file, to show that a refactoring
changed no bit (issue 23: "store a reference before the first move").

    python tests/snapshot.py write before.pt     # on the commit before the change
    python tests/snapshot.py compare before.pt   # after it: every tensor bit-identical, or the differences

The tiny SD1.5 and SD2 checkpoints are written by the reference libraries with fixed seeds (tests/tiny_sd.py,
tests/tiny_sd2.py), so both runs see the same weights. Settings: fp32 and fp64; batched (one row per
class), class batches of 2, and joint (one prompt); resident, --stream and fp16 kept / up-cast per block
(the .fp16 files). Per setting: scores, mask, A (fused), M (refined), the per-level and per-layer maps,
and the U-Net's ε for a fixed input. Both runs must be on the same machine: BLAS results differ
across CPUs in the last bits.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

CLASSES = ["cat", "dog", "sofa"]


def settings():
    for model in ("sd15", "sd2"):
        for dtype in (torch.float32, torch.float64):
            for mode in ("batched", "class-batch", "joint"):
                yield model, dtype, mode, "resident"
            if dtype == torch.float32:
                yield model, dtype, "batched", "stream"
                yield model, dtype, "batched", "keep"


def run(work: Path) -> dict[str, torch.Tensor]:
    from PIL import Image

    from minidiffseg.method.segmenter import Segmenter
    from tiny_sd import write_tiny_diffusers
    from tiny_sd2 import write_tiny_sd2_diffusers

    folders = {"sd15": work / "sd15", "sd2": work / "sd2"}
    write_tiny_diffusers(folders["sd15"])
    write_tiny_diffusers(folders["sd15"], variant="fp16")
    write_tiny_sd2_diffusers(folders["sd2"])
    write_tiny_sd2_diffusers(folders["sd2"], variant="fp16")
    image = Image.radial_gradient("L").resize((96, 80)).convert("RGB")
    out = {}
    for model, dtype, mode, weights in settings():
        name = f"{model}/{str(dtype).replace('torch.', '')}/{mode}/{weights}"
        variant = "fp16" if weights == "keep" else None
        from minidiffseg.sd import load_sd

        sd = load_sd(folders[model], dtype=dtype, variant=variant, stream=weights == "stream",
                     keep=torch.float16 if weights == "keep" else None)
        seg = Segmenter(sd, resolution=128, joint=mode == "joint", class_batch=2 if mode == "class-batch" else None)
        r = seg(image, CLASSES, seed=3)
        out |= {f"{name}/scores": r.scores, f"{name}/mask": r.mask, f"{name}/fused": r.fused,
                f"{name}/refined": r.refined}
        out |= {f"{name}/level{k}": v for k, v in r.levels.items()}
        out |= {f"{name}/layer/{k}": v for k, v in r.layers.items()}
        g = torch.Generator().manual_seed(1)
        with torch.inference_mode():
            z = torch.randn(2, 4, 16, 16, generator=g).to(dtype)
            context = torch.randn(2, 77, sd.unet.cfg.cross_attention_dim, generator=g).to(dtype)
            out[f"{name}/eps"] = sd.unet(z, 100, context).float()
        print(name, file=sys.stderr)
    return out


def main() -> None:
    if len(sys.argv) != 3 or sys.argv[1] not in ("write", "compare"):
        sys.exit(__doc__.split("\n\n")[1])
    with tempfile.TemporaryDirectory() as work:
        now = run(Path(work))
    if sys.argv[1] == "write":
        torch.save(now, sys.argv[2])
        print(f"wrote {len(now)} tensors to {sys.argv[2]}")
        return
    before = torch.load(sys.argv[2])
    missing, extra = sorted(before.keys() - now.keys()), sorted(now.keys() - before.keys())
    differ = [k for k in sorted(before.keys() & now.keys())
              if before[k].dtype != now[k].dtype or before[k].shape != now[k].shape or not torch.equal(before[k], now[k])]
    for k in differ:
        a, b = before[k], now[k]
        err = (a.double() - b.double()).abs().max().item() if a.shape == b.shape else float("nan")
        print(f"differs: {k} {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}, max abs {err:.3g}")
    for k in missing:
        print(f"missing now: {k}")
    for k in extra:
        print(f"new: {k}")
    same = len(before.keys() & now.keys()) - len(differ)
    print(f"{same} of {len(before)} tensors bit-identical; {len(differ)} differ, {len(missing)} missing, {len(extra)} new")
    sys.exit(1 if differ or missing else 0)


if __name__ == "__main__":
    main()
