"""Hallucination evaluation (POPE, CHAIR, MME) and the synthetic world the demo model lives in. Torch-free.

- `metrics`: METHODS.md's parsing rule and metrics.  - `loaders`: the benchmarks' official file formats.
- `harness`: batching, progress, resumable answers files, reports.  - `world`: procedural images and question sets.
"""
