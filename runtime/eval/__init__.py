"""Hallucination evaluation (POPE, CHAIR, MME) and the synthetic world the demo model lives in. Torch-free.

- `metrics`: POPE's rule and metrics (evaluate.py).  - `chair`: CHAIR as the official code scores it (two variants).
- `mme`: MME as the eval tool's calculation.py scores it.  - `loaders`: the benchmarks' official file formats.
- `formats`: answer files in the official scripts' formats, read back from any model.
- `harness`: batching, progress, resumable answers files (every input fingerprinted), reports.
- `world`: procedural images and question sets.
"""
