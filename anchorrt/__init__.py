"""AnchorRT: vision-language models to ONNX Runtime / TensorRT with hallucination mitigation in the graphs.

One import namespace: `anchorrt.runtime` (the torch-free runtime: `from anchorrt.runtime import Pipeline, Request`),
`anchorrt.exporter` (torch + transformers → ONNX) and `anchorrt.graph_passes` (ONNX IR rewrites, no torch).
"""

from pathlib import Path as _Path

__version__ = "0.1.0"

# In a wheel, runtime/, exporter/ and graph_passes/ are installed inside this package. In the source checkout they
# are the repository's top-level folders (setup.py maps them), and a Python started in the repository root finds
# this folder before any installed mapping: extend the package path to the repository root there, so that
# `anchorrt.runtime` is the checkout's runtime/ in both cases (and never a top-level `runtime` of another project).
_ROOT = _Path(__file__).resolve().parent.parent
if (_ROOT / "pyproject.toml").is_file() and (_ROOT / "runtime" / "__init__.py").is_file():
    __path__.append(str(_ROOT))  # noqa: F821 - __path__ is defined for packages
