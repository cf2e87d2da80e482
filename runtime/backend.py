"""Execution backends behind one small interface (Polygraphy's runner shape).

    with OrtBackend(path, providers=["CPUExecutionProvider"]) as b:
        outputs = b.run({"input_ids": ids})          # dict name -> numpy array

The session is built lazily on first use. A GPU provider that silently falls back to the CPU is refused unless
`allow_fallback=True`: onnxruntime logs the failure and carries on, so only `session.get_providers()` tells.

CUDA: a plain "CUDAExecutionProvider" gets this project's provider options (documented on onnxruntime.ai, CUDA
Execution Provider): `device_id`; `cudnn_conv_algo_search=HEURISTIC` (the vision graph has one patch-embedding
Conv; an exhaustive search costs more at load than it can save); `arena_extend_strategy=kSameAsRequested` (the KV
cache is one large allocation per request, which next-power-of-two growth would nearly double). `cuda_options`
overrides any of them. `cuda_graph=True` sets `enable_cuda_graph`; onnxruntime can only replay a captured graph
when every input and output is bound through IOBinding at fixed device addresses with the same shapes each run.
Our decoder's shapes change every step (past_length and attention_mask grow by one token), and the vision and
embed graphs are fed host arrays, so the Pipeline never turns it on: CUDA graphs do not apply to these graphs.
`make_backend(..., providers=["tensorrt-native"])` returns the TensorRT backend (runtime/trt_backend.py).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from anchorrt.runtime.errors import BackendError

GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
TRT_NATIVE = "tensorrt-native"
CUDA_DEFAULTS = {"cudnn_conv_algo_search": "HEURISTIC", "arena_extend_strategy": "kSameAsRequested"}


def _import_ort():
    try:
        import onnxruntime as ort
    except ImportError:
        raise BackendError("onnxruntime is not installed; run `pip install anchorrt[cpu]` (or [gpu] for CUDA)") from None
    return ort


class OrtBackend:
    def __init__(self, path: str | Path, providers: Sequence | None = None, allow_fallback: bool = False,
                 intra_op_threads: int | None = None, profile_prefix: str | Path | None = None, device_id: int = 0,
                 cuda_options: dict | None = None, cuda_graph: bool = False):
        self.path = Path(path)
        self.device_id = device_id
        self.requested = [self._with_options(p, device_id, cuda_options, cuda_graph)
                          for p in (list(providers) if providers else ["CPUExecutionProvider"])]
        self.allow_fallback = allow_fallback
        self.intra_op_threads = intra_op_threads
        self.profile_prefix = profile_prefix  # onnxruntime's own profiler (chrome-trace JSON) when set
        self._session = None
        self._lock = threading.Lock()  # threads sharing a Pipeline build the session once

    @staticmethod
    def _with_options(provider, device_id: int, cuda_options: dict | None, cuda_graph: bool):
        """A plain "CUDAExecutionProvider" -> (name, options); anything else as given."""
        if provider != "CUDAExecutionProvider":
            return provider
        options = {**CUDA_DEFAULTS, "device_id": str(device_id), **{k: str(v) for k, v in (cuda_options or {}).items()}}
        if cuda_graph:
            options["enable_cuda_graph"] = "1"
        return provider, options

    def __enter__(self) -> OrtBackend:
        _ = self.session
        return self

    def __exit__(self, *exc) -> None:
        self._session = None

    @property
    def session(self):
        session = self._session
        if session is None:
            with self._lock:
                if self._session is None:
                    self._session = self._build()
                session = self._session
        return session

    def _build(self):
        ort = _import_ort()
        names = [p if isinstance(p, str) else p[0] for p in self.requested]
        if any(n in GPU_PROVIDERS for n in names) and hasattr(ort, "preload_dlls"):
            try:
                ort.preload_dlls()  # loads CUDA/cuDNN from the pip packages when they are there
            except Exception:  # noqa: BLE001 - missing libraries show up as a provider fallback below
                pass
        if self.path.is_file():  # external data must stay beside the graph (SECURITY.md): checked before ort reads it
            from anchorrt.runtime.manifest import check_onnx_file

            check_onnx_file(self.path)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if self.intra_op_threads:
            opts.intra_op_num_threads = self.intra_op_threads
        if self.profile_prefix:
            opts.enable_profiling = True
            opts.profile_file_prefix = str(self.profile_prefix)
        # A provider this onnxruntime build lacks gets no options (with options onnxruntime logs a device warning
        # of its own) and its Python warning is muted: the fallback check below reports it as one line.
        available = set(ort.get_available_providers())
        providers = [p if isinstance(p, str) or p[0] in available else p[0] for p in self.requested]
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Specified provider", category=UserWarning)
                sess = ort.InferenceSession(str(self.path), sess_options=opts, providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors
            msg = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else exc.__class__.__name__
            raise BackendError(f"onnxruntime cannot open '{self.path.name}': {msg}") from None
        got = sess.get_providers()[0]
        if names[0] != got and not self.allow_fallback:
            raise BackendError(
                f"asked for {names[0]} but onnxruntime runs '{self.path.name}' on {got}; install onnxruntime-gpu "
                "with CUDA 13 and cuDNN 9, or pass allow_fallback=True / --allow-fallback to accept the CPU"
            )
        return sess

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    @property
    def device(self) -> str:
        return "cuda" if self.provider in GPU_PROVIDERS else "cpu"

    def start_profiling(self, prefix: str | Path) -> None:
        """Turn onnxruntime's profiler on: the session is rebuilt with it on its next use."""
        self.profile_prefix = prefix
        self._session = None

    def end_profiling(self) -> str | None:
        """Stop onnxruntime's profiler; returns the trace file it wrote (None if profiling was off)."""
        if not self.profile_prefix or self._session is None:
            return None
        return self._session.end_profiling()

    def input_names(self) -> list[str]:
        return [i.name for i in self.session.get_inputs()]

    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    def run(self, feed: dict[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        names = list(outputs) if outputs else self.output_names()
        return dict(zip(names, self.session.run(names, feed)))


def make_backend(path: str | Path, providers: Sequence | None = None, **kw):
    """OrtBackend for onnxruntime providers; TrtBackend (an engine from `anchorrt trt build`) for "tensorrt-native".
    Without TensorRT that is a BackendError at construction, one line with the install command."""
    names = [p if isinstance(p, str) else p[0] for p in (providers or [])]
    if names and names[0] == TRT_NATIVE:
        from anchorrt.runtime.trt_backend import TrtBackend, import_tensorrt

        import_tensorrt()  # fail at construction, before any image is read
        return TrtBackend(path, device_id=kw.get("device_id", 0))
    return OrtBackend(path, providers=providers, **kw)
