"""Benchmarks of minidiffseg against the diffusers way of running DiffSegmenter (docs/design.md §6).

The headline run, `python -m bench.run` (or `minidiffseg bench`), and what it needs:

    run.py        the plan: which configurations, each in a fresh process; writes results/*.md + .json
    worker.py     one configuration in one process: warm-up, then median of N per stage
    ours.py       our pipeline, stage by stage, over minidiffseg's own code path (Segmenter)
    baseline.py   the official recipe on diffusers + transformers (the `bench` extra)
    baseline_xl.py  the method's SDXL recipe on diffusers + transformers (experiments/sdxl.py)
    baseline_sd3.py the method's SD3 recipe on diffusers + transformers (experiments/sd3.py)
    measure.py    clocks (CPU: perf_counter + peak RSS; CUDA: events + max_memory_allocated), FLOPs, GEMM rate
    report.py     the Markdown tables and the targets
    weights.py    random checkpoints in the diffusers layout, written once into a cache folder
    linux.py      what /proc says: a process's memory, the machine's CPU time, other processes' share
    models.py     `python -m bench.models`: runs of several models side by side in one table
    gpu_check.py  `python -m bench.gpu_check`: the few-minutes check for a machine with an NVIDIA GPU

experiments/: one measurement each, for a design decision (`python -m bench.experiments.NAME`).
bench/README.md lists every file with how to run it and where its results go.

Run from the repository root. bench/ shares the diffusers reference builders of the tests
(tests/reference_sd.py: the tests import nothing from bench/): tests/ is put at the end of the module
path here, so that `from reference_sd import ...` finds them.
"""

import sys
from pathlib import Path

_TESTS = str(Path(__file__).resolve().parents[1] / "tests")
if _TESTS not in sys.path:
    sys.path.append(_TESTS)
