"""Benchmark evaluation: dataset readers, the mIoU metric, a resumable distributed runner, reports
and the `eval` / `calibrate` commands (docs/design.md §5)."""
