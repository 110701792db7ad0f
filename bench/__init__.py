"""Benchmarks of minidiffseg against the diffusers way of running DiffSegmenter (docs/design.md §6).

    run.py       the plan: which configurations, each in a fresh process; writes results/*.md + .json
    worker.py    one configuration in one process: warm-up, then median of N per stage
    ours.py      our pipeline, stage by stage, over minidiffseg's own code path (Segmenter)
    baseline.py  the official recipe on diffusers + transformers (the `bench` extra)
    measure.py   clocks (CPU: perf_counter + peak RSS; CUDA: events + max_memory_allocated), FLOPs, GEMM rate
    report.py    the Markdown tables and the targets
    weights.py   random SD1.5 checkpoints in the diffusers layout, written once into a cache folder

Run from the repository root: `python -m bench.run --quick` (or `minidiffseg bench --quick`).
"""
