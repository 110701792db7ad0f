"""How to stream the weights: the mechanisms compared in docs/memory.md §3, on one U-Net pass.

    python -m bench.experiments.stream_mechanisms [--weights DIR] [--dtype bf16] [--classes 4] [--repeats 2]

Full-size SD1.5 U-Net passes (512², C prompt rows, fp16 files), the weights streamed by:
- resident: the weights converted to the compute dtype once, at load (the reference time);
- up-cast per block: the file's tensors kept as stored (mapped), each block converted as it runs (docs/memory.md §6);
- arena (minidiffseg's choice): each block `pread` into one reused anonymous mapping;
- fresh memory: each block `pread` into a new anonymous mapping, unmapped after the block;
- malloc: each block `pread` into tensors from torch's allocator (glibc's heap);
- mapped file: each block converted from views of the memory-mapped file into the arena, the
  block's file pages dropped from this process afterwards (madvise MADV_DONTNEED);
- arena + prefetch: two arenas; a thread reads block i+1 while block i computes.
Each mechanism runs in a fresh process. Reported: the pass time with a warm page cache (median), the
process's CPU time per pass, the pass with the U-Net file evicted from the page cache first
(posix_fadvise DONTNEED), minor page faults per warm pass, the process's peak RSS (VmHWM).
Wall times need a quiet machine; page faults and memory do not.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "bench" / "results" / "stream-mechanisms.md"  # --out
sys.path.insert(0, str(REPO))

from bench import linux  # noqa: E402
from bench.linux import evict  # noqa: E402
from bench.measure import source_revision as revision  # noqa: E402
from bench.weights import random_hub_sd15 as random_weights  # noqa: E402
from minidiffseg.cli.options import DTYPES  # noqa: E402
from minidiffseg.sd import arena, checkpoint, heap, loading, stream  # noqa: E402
from minidiffseg.sd.loading import load_strict  # noqa: E402
from minidiffseg.sd.stream import StreamedWeights  # noqa: E402
from minidiffseg.sd.weightfile import WeightFile  # noqa: E402


class FreshMemory(arena.Arena):
    def take(self, nbytes):  # a new anonymous mapping, unmapped when the block's tensors are freed
        return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)


class Malloc(arena.Arena):
    def take(self, nbytes):
        return torch.empty(nbytes, dtype=torch.uint8)


class FreshWeights(StreamedWeights):
    arena = FreshMemory()


class MallocWeights(StreamedWeights):
    arena = Malloc()


class MappedFile(StreamedWeights):
    """Tensors converted from views of the mapped file; the block's pages dropped after it."""

    def __init__(self, *args):
        super().__init__(*args)
        with open(self.file.path, "rb") as f:
            self.map = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        self.spans = []

    def fill(self, key, out, stage):
        stored, begin, end = self.file.stored(key)
        out.view(-1).copy_(torch.frombuffer(self.map, dtype=torch.uint8, offset=begin, count=end - begin).view(stored))
        self.spans.append((begin, end))

    def stage_bytes(self, keys):
        return 0

    @contextlib.contextmanager
    def block(self, module):
        with super().block(module):
            try:
                yield
            finally:
                for begin, end in self.spans:  # the pages this block touched leave our RSS
                    first = begin // mmap.PAGESIZE * mmap.PAGESIZE
                    self.map.madvise(mmap.MADV_DONTNEED, first, end - first)
                self.spans.clear()


class TwoArenas(arena.Arena):
    """The arena of the thread's current side (Prefetch)."""

    def __init__(self):
        super().__init__()
        self.arenas = [arena.Arena(), arena.Arena()]
        self.local = threading.local()

    def take(self, nbytes):
        return self.arenas[self.local.side].take(nbytes)


class Prefetch(StreamedWeights):
    """Two arenas: while block i computes from one, a thread reads block i+1 (the order of the first pass)
    into the other."""

    def __init__(self, *args):
        self.arena = TwoArenas()
        self.side, self.order, self.pending = 0, [], None
        super().__init__(*args)

    def _read(self, module, side):
        self.arena.local.side = side
        return self.read(module)

    @contextlib.contextmanager
    def block(self, module):
        self.file.check()
        if self.pending is not None and self.pending[0] is module:
            _, thread, box, side = self.pending
            thread.join()
            state = box[0]
        else:
            side = self.side
            state = self._read(module, side)
        self.pending = None
        if module not in self.order:
            self.order.append(module)
        nxt = self.order[(self.order.index(module) + 1) % len(self.order)] if len(self.order) > 1 else None
        if nxt is not None and nxt is not module:
            box = [None]
            other = 1 - side
            thread = threading.Thread(target=lambda: box.__setitem__(0, self._read(nxt, other)))
            thread.start()
            self.pending = (nxt, thread, box, other)
        self.side = 1 - side
        module.load_state_dict(state, strict=True, assign=True)
        try:
            yield
        finally:
            module.load_state_dict(self._named(module, lambda full, p: self.empty[full]), strict=True, assign=True)
            heap.trim_heap()


MECHANISMS = {"arena": StreamedWeights, "fresh memory": FreshWeights, "malloc": MallocWeights, "mapped file": MappedFile,
              "arena + prefetch": Prefetch}


def child(folder: Path, mechanism: str, dtype: torch.dtype, classes: int, repeats: int) -> dict:
    """One mechanism in this (fresh) process: a warm-up pass, `repeats` warm passes, one cold pass."""
    unet_part = checkpoint.diffusers_parts(folder)["unet"]
    g = torch.Generator().manual_seed(0)
    cfg = unet_part.module.cfg  # full size: a 64² latent (512²), 768-wide text
    z = torch.randn(1, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g).to(dtype)
    ctx = torch.randn(classes, 77, cfg.cross_attention_dim, generator=g).to(dtype)
    if mechanism == "resident":  # every tensor converted to the compute dtype at load
        net = load_strict(unet_part.module, unet_part.file, unet_part.names, dtype, torch.device("cpu"), "U-Net")
    elif mechanism == "up-cast per block":  # the file's tensors mapped, converted per block (docs/precision.md)
        net = stream.upcast_weights(unet_part.module, unet_part.file, unet_part.names, dtype, torch.device("cpu"),
                                    "U-Net", keep=torch.float16)
    else:
        net = unet_part.module
        loading.check(net, unet_part.file, unet_part.names).raise_first(unet_part.file, "U-Net")
        file = WeightFile(unet_part.file, loading.read_layout(unet_part.file))
        MECHANISMS[mechanism](net, unet_part.names, file, dtype, torch.device("cpu"))  # attaches itself to net
    out = {"warm": [], "cpu": [], "faults": []}
    with torch.inference_mode():
        net(z, 100, ctx, output=False)  # warm-up: oneDNN's kernels, the prefetch order, the arena's pages
        for rep in range(repeats + 1):
            cold = rep == repeats
            if cold:
                evict([unet_part.file])
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            net(z, 100, ctx, output=False)
            seconds, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
            if cold:
                out["cold"] = seconds
            else:
                out["warm"].append(seconds)
                out["cpu"].append(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
                out["faults"].append(r1.ru_minflt - r0.ru_minflt)
    out["peak"] = linux.status("VmHWM")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", type=Path, help="a diffusers SD1.5 folder (default: the random one of bench/weights.py random_hub_sd15)")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--mechanisms", help="comma-separated subset of: resident, up-cast per block, " + ", ".join(MECHANISMS))
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    folder = args.weights or random_weights()
    if args.child:
        print(json.dumps(child(folder, args.child, DTYPES[args.dtype], args.classes, args.repeats)))
        return
    results = {}
    names = args.mechanisms.split(",") if args.mechanisms else ["resident", *MECHANISMS]
    for name in names:  # each in a fresh process: no heap or page state carried over
        run = subprocess.run([sys.executable, __file__, "--child", name, "--weights", str(folder), "--dtype", args.dtype,
                              "--classes", str(args.classes), "--repeats", str(args.repeats)],
                             capture_output=True, text=True, check=True)
        results[name] = json.loads(run.stdout.strip().splitlines()[-1])
        print(f"  {name}: {results[name]}", file=sys.stderr, flush=True)
    ref = results["resident"]
    lines = [f"Generated by `python -m bench.experiments.stream_mechanisms {' '.join(sys.argv[1:])}` at commit {revision()}; "
             "not edited by hand.", "",
             f"U-Net pass, 512², C={args.classes}, {args.dtype}, fp16 files, {torch.get_num_threads()} threads, each "
             f"mechanism in a fresh process; median of {args.repeats} warm passes; cold: the U-Net file evicted from "
             f"the page cache first; CPU s: user + system time of the process (all its threads) per warm pass, less "
             f"disturbed than wall time by other work on the machine", "",
             "| mechanism | warm s | CPU s | CPU vs resident | cold s | page faults / pass | process peak RSS |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        cpu = statistics.median(r["cpu"])
        lines.append(f"| {name} | {statistics.median(r['warm']):.2f} | {cpu:.2f} | "
                     f"{cpu / statistics.median(ref['cpu']):.2f}× | {r['cold']:.2f} | "
                     f"{statistics.median(r['faults']):,.0f} | {r['peak'] / 2**30:.2f} GiB |")
    print("\n".join(lines))
    args.out.write_text("# Streaming mechanisms: one U-Net pass\n\n" + "\n".join(lines) + "\n")
    print(f"wrote {args.out}")

if __name__ == "__main__":
    main()
