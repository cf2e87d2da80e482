"""TensorRT engines for an artifact's graphs, and a backend that runs them behind OrtBackend's interface.

Build (offline, once per GPU and TensorRT version):

    ARTIFACT/trt/engines.json            what each engine is: graph, its sha256, TensorRT version, GPU, flags, profiles
    ARTIFACT/trt/<role>-<key16>.engine   one serialized engine per graph; key = sha256 of all of the above
    ARTIFACT/trt/timing.cache            the builder's timing cache, reused by the next build (written atomically)

The trt/ folder is replaced as a whole (built beside it, then renamed), so a failed build leaves the old one. Graph
passes (`anchorrt bake`) copy only the flat artifact files, so a rebaked artifact has no stale engines; an engine
whose key does not match the graph's current sha256, TensorRT version or GPU is never loaded.

Optimization profiles come from the manifest's symbolic dims (`batch`, `sequence`, `past_length`, `total_length`,
`num_images`) and the user's limits; a graph with a `sequence` dim gets two profiles, prefill (sequence 1..max) and
decode (sequence 1), and the backend picks the first profile whose ranges hold the call's shapes.

Run: `TrtBackend` has OrtBackend's surface (`run(feed) -> dict`, `input_names()`, `output_names()`, `provider`,
`device`, and a `session` whose `io_binding()` / `run_with_iobinding()` take the same calls the Pipeline and the KV
cache make on onnxruntime's), so `Pipeline` runs it unchanged; KV buffers are device memory from `allocate()`.
Device memory and copies go through the CUDA runtime (libcudart) by ctypes: no torch, no cuda-python, and no second
GPU framework beside TensorRT. (onnxruntime's CUDA OrtValues would have worked too, but would make TensorRT users
install onnxruntime-gpu as well.)

TensorRT API (10.x names), checked against NVIDIA's Python API pages:
  https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/python-api-docs.html  (build + run phases)
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Builder.html
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/BuilderConfig.html
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/OptimizationProfile.html
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/TimingCache.html
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/ExecutionContext.html
  https://docs.nvidia.com/deeplearning/tensorrt/latest/performance/builder-performance.html  (timing cache)
NOT RUN: no machine of this project has TensorRT; the tests drive this code with a fake `tensorrt` module, which
proves the call order and the shapes, not TensorRT's behaviour.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from anchorrt.runtime.errors import ArtifactError, BackendError

ENGINE_DIR = "trt"
INDEX_NAME = "engines.json"
TIMING_CACHE_NAME = "timing.cache"
FLAGS = ("fp16", "int8", "fp8")
INSTALL_HINT = ("TensorRT is not installed: `pip install anchorrt[trt]` (tensorrt>=10) on a machine with an NVIDIA GPU "
                "and CUDA")
KNOWN_DIMS = ("batch", "sequence", "past_length", "total_length", "num_images")


def import_tensorrt():
    """The `tensorrt` module, or BackendError with the install command (one line)."""
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendError(INSTALL_HINT) from None
    major = str(getattr(trt, "__version__", "0")).split(".")[0]
    if not major.isdigit() or int(major) < 10:
        raise BackendError(f"TensorRT {getattr(trt, '__version__', '?')} is too old: `pip install 'tensorrt>=10'`")
    return trt


# -- optimization profiles ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EngineLimits:
    """What the engines must accept. `max_batch`: decoder rows per call (IAVA decodes 2 per request);
    `max_context`: prompt + generated tokens (default: the manifest's context_length); `opt_*`: tuned-for sizes."""

    max_batch: int = 1
    max_context: int | None = None
    opt_batch: int = 1
    opt_context: int | None = None

    def resolve(self, manifest) -> tuple[int, int, int, int]:
        """-> (opt_batch, max_batch, opt_context, max_context), checked."""
        ctx = manifest.data.get("context_length") or manifest.dims["max_position_embeddings"]
        max_ctx = self.max_context or ctx
        if self.max_batch < 1 or not 1 <= self.opt_batch <= self.max_batch:
            raise BackendError(f"TensorRT limits: need 1 <= opt_batch ({self.opt_batch}) <= max_batch "
                               f"({self.max_batch})")
        if not 2 <= max_ctx <= ctx:
            raise BackendError(f"TensorRT limits: max_context {max_ctx} must be within 2..{ctx} (the model's context)")
        tpi = manifest.tokens["tokens_per_image"]
        opt_ctx = self.opt_context or min(max_ctx, tpi + 64)  # one image and a short question
        if not 1 <= opt_ctx <= max_ctx:
            raise BackendError(f"TensorRT limits: opt_context {opt_ctx} must be within 1..{max_ctx}")
        return self.opt_batch, self.max_batch, opt_ctx, max_ctx


def dim_ranges(role: str, phase: str, limits: tuple[int, int, int, int]) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of each symbolic dim for one graph and phase ("prefill", "decode" or "all").

    total_length = past_length + sequence holds at min, opt and max (TensorRT checks the network at each); a prefill
    has no past (IAVA's contrastive prefill included); decode steps feed zero images (num_images 0) to embed."""
    opt_b, max_b, opt_ctx, max_ctx = limits
    if phase == "decode":
        seq, past, total = (1, 1, 1), (1, opt_ctx, max_ctx - 1), (2, opt_ctx + 1, max_ctx)
    else:
        seq, past, total = (1, opt_ctx, max_ctx), (0, 0, 0), (1, opt_ctx, max_ctx)
    images = (1, opt_b, max_b) if role == "vision" else ((0, 0, max_b) if phase == "decode" else (0, opt_b, max_b))
    return {"batch": (1, opt_b, max_b), "sequence": seq, "past_length": past, "total_length": total,
            "num_images": images}


def profile_shapes(manifest, role: str, limits: EngineLimits) -> list[dict[str, tuple[list[int], ...]]]:
    """Optimization profiles of one graph: [{input name: (min shape, opt shape, max shape)}], from the manifest's
    input shapes. A graph with a `sequence` dim gets [prefill, decode]; others one profile."""
    lim = limits.resolve(manifest)
    inputs = manifest.graph(role)["inputs"]
    symbols = {d for x in inputs for d in x.get("shape", []) if isinstance(d, str)}
    unknown = symbols - set(KNOWN_DIMS)
    if unknown:
        raise ArtifactError(f"graph '{role}' has input dims {sorted(unknown)} that the TensorRT profiles do not know "
                            f"(known: {', '.join(KNOWN_DIMS)}); re-export the model")
    phases = ("prefill", "decode") if "sequence" in symbols else ("all",)
    profiles = []
    for phase in phases:
        ranges = dim_ranges(role, phase, lim)
        prof = {}
        for x in inputs:
            shape = x.get("shape")
            if shape is None:
                raise ArtifactError(f"manifest has no shape for {role} input '{x['name']}'; re-export the model")
            prof[x["name"]] = tuple([d if isinstance(d, int) else ranges[d][k] for d in shape] for k in range(3))
        profiles.append(prof)
    return profiles


# -- engine cache: keys and paths ----------------------------------------------------------------------------

def engine_key(trt_version: str, gpu: str, flags: Sequence[str], graph_sha256: str, profiles: list) -> str:
    """sha256 over everything an engine depends on; a change in any of them means another engine."""
    payload = {"tensorrt": trt_version, "gpu": gpu, "flags": sorted(set(flags)), "graph_sha256": graph_sha256,
               "profiles": profiles}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def engine_file(role: str, key: str) -> str:
    return f"{role}-{key[:16]}.engine"


def engine_dir(artifact: str | Path) -> Path:
    return Path(artifact) / ENGINE_DIR


def read_index(artifact: str | Path) -> dict:
    path = engine_dir(artifact) / INDEX_NAME
    if not path.is_file():
        return {"engines": []}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ArtifactError(f"'{path}' is not valid JSON; rebuild with `anchorrt trt build {artifact} --force`") from None
    if not isinstance(data, dict) or not isinstance(data.get("engines"), list):
        raise ArtifactError(f"'{path}' is not an engine index; rebuild with `anchorrt trt build {artifact} --force`")
    return data


def _check_flags(flags: Sequence[str]) -> tuple[str, ...]:
    bad = [f for f in flags if f not in FLAGS]
    if bad:
        raise BackendError(f"unknown TensorRT precision flag(s) {bad}; use {', '.join(FLAGS)}")
    return tuple(sorted(set(flags)))


# -- CUDA runtime through ctypes ----------------------------------------------------------------------------

_MEMCPY_DEFAULT = 4  # cudaMemcpyDefault: direction inferred from unified virtual addresses (CUDA runtime API enum)
_ATTR_CC_MAJOR, _ATTR_CC_MINOR = 75, 76  # cudaDevAttrComputeCapabilityMajor / Minor


class Cuda:
    """The few CUDA runtime calls the TensorRT backend needs (cudaMalloc, cudaMemcpy, streams), by ctypes."""

    def __init__(self, device_id: int = 0):
        self.lib = _load_cudart()
        self.device_id = device_id
        self._check(self.lib.cudaSetDevice(ctypes.c_int(device_id)), "cudaSetDevice")
        stream = ctypes.c_void_p()
        self._check(self.lib.cudaStreamCreate(ctypes.byref(stream)), "cudaStreamCreate")
        self.stream = stream.value or 0

    def _check(self, status: int, what: str) -> None:
        if status != 0:
            self.lib.cudaGetErrorString.restype = ctypes.c_char_p
            msg = self.lib.cudaGetErrorString(ctypes.c_int(status)) or b"?"
            raise BackendError(f"CUDA {what} failed: {msg.decode(errors='replace')} (error {status})")

    def malloc(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        self._check(self.lib.cudaMalloc(ctypes.byref(ptr), ctypes.c_size_t(max(int(nbytes), 1))), "cudaMalloc")
        return ptr.value

    def free(self, ptr: int) -> None:
        self.lib.cudaFree(ctypes.c_void_p(ptr))

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        if nbytes:
            self._check(self.lib.cudaMemcpy(ctypes.c_void_p(dst), ctypes.c_void_p(src), ctypes.c_size_t(nbytes),
                                            ctypes.c_int(_MEMCPY_DEFAULT)), "cudaMemcpy")

    def synchronize(self) -> None:
        self._check(self.lib.cudaStreamSynchronize(ctypes.c_void_p(self.stream)), "cudaStreamSynchronize")

    def device_name(self) -> str:
        """'<name> sm<major><minor>' (the name from the driver API's cuDeviceGetName)."""
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(self.lib.cudaDeviceGetAttribute(ctypes.byref(major), _ATTR_CC_MAJOR, self.device_id), "attribute")
        self._check(self.lib.cudaDeviceGetAttribute(ctypes.byref(minor), _ATTR_CC_MINOR, self.device_id), "attribute")
        name = "GPU"
        try:
            drv = ctypes.CDLL("libcuda.so.1")
            dev, buf = ctypes.c_int(), ctypes.create_string_buffer(256)
            if drv.cuInit(0) == 0 and drv.cuDeviceGet(ctypes.byref(dev), self.device_id) == 0 and \
                    drv.cuDeviceGetName(buf, 256, dev) == 0:
                name = buf.value.decode(errors="replace")
        except OSError:
            pass
        return f"{name} sm{major.value}{minor.value}"


def _load_cudart():
    names = ["libcudart.so.13", "libcudart.so.12", "libcudart.so", ctypes.util.find_library("cudart")]
    for base in sys.path:  # the nvidia-cuda-runtime pip packages
        names += sorted(glob.glob(os.path.join(base, "nvidia", "*", "lib", "libcudart.so*")), reverse=True)
        names += sorted(glob.glob(os.path.join(base, "nvidia", "cu*", "lib", "libcudart.so*")), reverse=True)
    for name in names:
        if not name:
            continue
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise BackendError("the CUDA runtime (libcudart) was not found: install the CUDA toolkit or "
                       "`pip install nvidia-cuda-runtime-cu12` on a machine with an NVIDIA GPU")


class DeviceBuffer:
    """A flat device allocation (what KVCache asks `allocate` for): `data_ptr()` and a host copy with `numpy()`."""

    def __init__(self, cuda: Cuda, n: int, dtype):
        self.cuda, self.n, self.dtype = cuda, n, np.dtype(dtype)
        self.ptr = cuda.malloc(n * self.dtype.itemsize)

    def data_ptr(self) -> int:
        return self.ptr

    def numpy(self) -> np.ndarray:
        out = np.empty(self.n, self.dtype)
        self.cuda.copy(out.ctypes.data, self.ptr, out.nbytes)
        return out

    def __del__(self):
        try:
            self.cuda.free(self.ptr)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


# -- build ------------------------------------------------------------------------------------------------------

def build_engine(trt, onnx_path: Path, profiles: list[dict], flags: Sequence[str], workspace_mb: int,
                 timing_cache: bytes, logger=None) -> tuple[bytes, bytes]:
    """Parse one ONNX graph and build a serialized engine. -> (engine bytes, updated timing cache bytes)."""
    logger = logger or trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 10: networks are always explicit-batch; no creation flag is needed (EXPLICIT_BATCH is deprecated).
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads external data beside the file
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        first = errors[0].splitlines()[0][:300] if errors else "unknown error"
        raise BackendError(f"TensorRT cannot parse '{onnx_path.name}': {first} (run `anchorrt inspect ARTIFACT "
                           "--trt-compat`)")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    for flag in flags:
        config.set_flag({"fp16": trt.BuilderFlag.FP16, "int8": trt.BuilderFlag.INT8, "fp8": trt.BuilderFlag.FP8}[flag])
    for prof in profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in prof.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache)  # b"" creates an empty cache
    config.set_timing_cache(cache, False)  # ignore_mismatch=False: a cache from another device/version is rejected
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(f"TensorRT could not build an engine for '{onnx_path.name}' (see the TensorRT log above)")
    return bytes(serialized), bytes(config.get_timing_cache().serialize())


def build_engines(artifact_dir: str | Path, flags: Sequence[str] = (), limits: EngineLimits | None = None,
                  workspace_mb: int = 4096, force: bool = False, verify: bool = True,
                  progress: Callable[[str], None] | None = None, device_id: int = 0,
                  roles: Sequence[str] = ("vision", "embed", "decoder")) -> dict[str, Path]:
    """Build an engine per graph into ARTIFACT/trt/ (atomically, as one folder). -> {role: engine path}."""
    from anchorrt.runtime.manifest import Manifest, replace_folder

    say = progress or (lambda msg: None)
    flags = _check_flags(flags)
    trt = import_tensorrt()  # before anything is read or written
    manifest = Manifest.load(artifact_dir, verify=verify)
    if "decoder" in roles and manifest.attention_form != "unfused":
        raise ArtifactError(f"'{manifest.folder}' has the fused decoder (com.microsoft.GroupQueryAttention, ONNX "
                            "Runtime only); TensorRT needs `anchorrt export ... --attention unfused`")
    limits = limits or EngineLimits()
    gpu = Cuda(device_id).device_name()
    folder = manifest.folder
    out = engine_dir(folder)
    index = read_index(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{ENGINE_DIR}-build-", dir=folder))
    built: dict[str, Path] = {}
    try:
        if out.is_dir():
            for p in out.iterdir():
                if p.is_file():
                    shutil.copy2(p, tmp / p.name)
        cache_path = tmp / TIMING_CACHE_NAME
        timing = cache_path.read_bytes() if cache_path.is_file() else b""
        entries = [e for e in index["engines"] if isinstance(e, dict)]
        for role in roles:
            graph = manifest.graph(role)
            sha = manifest.data["files"][graph["file"]]
            profiles = profile_shapes(manifest, role, limits)
            key = engine_key(trt.__version__, gpu, flags, sha, profiles)
            name = engine_file(role, key)
            if (tmp / name).is_file() and not force:
                say(f"{role}: engine {name} is up to date")
                built[role] = out / name
                continue
            say(f"{role}: building a TensorRT {trt.__version__} engine on {gpu} ({', '.join(flags) or 'graph types'})")
            engine, timing = build_engine(trt, manifest.graph_path(role), profiles, flags, workspace_mb, timing)
            _write_atomic(tmp / name, engine)
            _write_atomic(cache_path, timing)
            entries = [e for e in entries if e.get("key") != key] + [{
                "role": role, "graph": graph["file"], "graph_sha256": sha, "tensorrt": trt.__version__, "gpu": gpu,
                "flags": list(flags), "profiles": profiles, "key": key, "engine": name}]
            built[role] = out / name
        live = {e["engine"] for e in entries}
        for p in tmp.glob("*.engine"):  # engines of older graphs or settings that no entry names any more
            if p.name not in live:
                p.unlink()
        _write_atomic(tmp / INDEX_NAME, (json.dumps({"engines": entries}, indent=2) + "\n").encode())
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return built


def _write_atomic(path: Path, data: bytes) -> None:
    part = path.with_name(f".{path.name}.partial")
    part.write_bytes(data)
    os.replace(part, path)


def find_engine(graph_path: str | Path, trt_version: str, gpu: str) -> Path:
    """The engine built for this graph's current sha256 on this TensorRT version and GPU, or BackendError."""
    from anchorrt.runtime.manifest import file_sha256

    graph_path = Path(graph_path)
    folder = graph_path.parent
    sha = file_sha256(graph_path)
    for e in read_index(folder)["engines"]:
        if (isinstance(e, dict) and e.get("graph") == graph_path.name and e.get("graph_sha256") == sha
                and e.get("tensorrt") == trt_version and e.get("gpu") == gpu):
            path = engine_dir(folder) / str(e.get("engine"))
            if path.is_file():
                return path
    raise BackendError(f"no TensorRT engine for '{graph_path.name}' built with TensorRT {trt_version} on {gpu}; "
                       f"run `anchorrt trt build {folder}`")


# -- run --------------------------------------------------------------------------------------------------------

@dataclass
class _IO:  # what onnxruntime's NodeArg offers that the Pipeline reads
    name: str
    type: str
    shape: list


def _profile_dims(state: dict, name: str) -> list:
    """An input's shape as ONNX Runtime's NodeArg gives it: a dim fixed in every profile (min == max) as its int,
    a dynamic one as None. The arch seam reads the rank and the static token count of `image_features` from it."""
    ranges = [r[name] for r in state["ranges"] if name in r]
    if not ranges:
        return []
    lo, hi = list(ranges[0][0]), list(ranges[0][2])
    return [int(a) if a == b and all(list(r[0])[i] == a == list(r[2])[i] for r in ranges) else None
            for i, (a, b) in enumerate(zip(lo, hi))]


class _HostOutput:
    def __init__(self, array: np.ndarray):
        self._array = array

    def numpy(self) -> np.ndarray:
        return self._array


class _Binding:
    """Records onnxruntime IOBinding calls (the subset the Pipeline and KVCache make) for TrtBackend to run."""

    def __init__(self):
        self.inputs: dict[str, tuple] = {}  # name -> ("host", array) | ("ptr", device, shape, ptr)
        self.outputs: dict[str, tuple | None] = {}  # name -> None (fetch to host) | (device, shape, ptr)
        self.results: list = []

    def bind_cpu_input(self, name: str, array: np.ndarray) -> None:
        self.inputs[name] = ("host", np.ascontiguousarray(array))

    def bind_input(self, name, device_type, device_id, element_type, shape, buffer_ptr) -> None:
        self.inputs[name] = ("ptr", device_type, [int(s) for s in shape], int(buffer_ptr))

    def bind_output(self, name, device_type="cpu", device_id=0, element_type=None, shape=None,
                    buffer_ptr=None) -> None:
        self.outputs[name] = None if buffer_ptr is None else (device_type, [int(s) for s in shape], int(buffer_ptr))

    def get_outputs(self) -> list:
        return self.results


class TrtBackend:
    """One TensorRT engine behind OrtBackend's interface (see the module docstring)."""

    provider = "TensorrtNative"
    device = "cuda"

    def __init__(self, path: str | Path, engine_path: str | Path | None = None, device_id: int = 0, **_ignored):
        self.path = Path(path)  # the ONNX graph the engine was built from
        self.engine_path = Path(engine_path) if engine_path else None
        self.device_id = device_id
        self._state = None
        self._lock = threading.Lock()  # one execution context: runs and the lazy load are serialised

    def __enter__(self) -> TrtBackend:
        _ = self.session
        return self

    def __exit__(self, *exc) -> None:
        self._state = None

    @property
    def session(self) -> TrtBackend:
        if self._state is None:
            with self._lock:
                if self._state is None:
                    self._state = self._load()
        return self

    def _load(self) -> dict:
        trt = import_tensorrt()
        cuda = Cuda(self.device_id)
        path = self.engine_path or find_engine(self.path, trt.__version__, cuda.device_name())
        logger = trt.Logger(trt.Logger.WARNING)
        engine = trt.Runtime(logger).deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise BackendError(f"TensorRT cannot load engine '{path.name}' (another TensorRT version or GPU?); "
                               f"run `anchorrt trt build {self.path.parent} --force`")
        context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        ranges = [{n: engine.get_tensor_profile_shape(n, k) for n in inputs}
                  for k in range(engine.num_optimization_profiles)]
        return {"trt": trt, "cuda": cuda, "engine": engine, "context": context, "inputs": inputs,
                "outputs": outputs, "dtypes": dtypes, "ranges": ranges, "profile": 0, "scratch": {}}

    # -- OrtBackend's surface --------------------------------------------------------------------------------
    def input_names(self) -> list[str]:
        return list(self.session._state["inputs"])

    def output_names(self) -> list[str]:
        return list(self.session._state["outputs"])

    def get_inputs(self) -> list[_IO]:
        s = self.session._state
        return [_IO(n, f"tensor({_ORT_TYPE.get(s['dtypes'][n], str(s['dtypes'][n]))})", _profile_dims(s, n))
                for n in s["inputs"]]

    def get_outputs(self) -> list[_IO]:
        s = self.session._state
        return [_IO(n, f"tensor({_ORT_TYPE.get(s['dtypes'][n], str(s['dtypes'][n]))})", []) for n in s["outputs"]]

    def get_providers(self) -> list[str]:
        return [self.provider]

    def io_binding(self) -> _Binding:
        return _Binding()

    def allocate(self, n: int, dtype) -> DeviceBuffer:
        """A flat device buffer of n elements (the KV cache's ping-pong buffers)."""
        return DeviceBuffer(self.session._state["cuda"], n, dtype)

    def run(self, feed: dict[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        binding = self.io_binding()
        for name, value in feed.items():
            binding.bind_cpu_input(name, value)
        names = list(outputs) if outputs else self.output_names()
        for name in names:
            binding.bind_output(name, "cpu")
        self.run_with_iobinding(binding)
        return {n: r.numpy() for n, r in zip(names, binding.get_outputs())}

    def run_with_iobinding(self, binding: _Binding) -> None:
        s = self.session._state
        with self._lock:
            self._run(s, binding)

    def _run(self, s: dict, binding: _Binding) -> None:
        trt_ctx, cuda = s["context"], s["cuda"]
        missing = set(s["inputs"]) - set(binding.inputs)
        if missing:
            raise BackendError(f"'{self.path.name}' needs input(s) {sorted(missing)}")
        shapes = {n: (list(v[1].shape) if v[0] == "host" else v[2]) for n, v in binding.inputs.items()}
        self._select_profile(shapes)
        for name in s["inputs"]:
            kind = binding.inputs[name]
            trt_ctx.set_input_shape(name, shapes[name])
            if kind[0] == "host":
                array = kind[1].astype(s["dtypes"][name], copy=False)
                ptr = self._scratch(name, array.nbytes)
                cuda.copy(ptr, array.ctypes.data, array.nbytes)
            elif kind[1] == "cuda":
                ptr = kind[3]
            else:  # a host pointer (a CPU KV cache): copy in
                nbytes = int(np.prod(kind[2])) * s["dtypes"][name].itemsize
                ptr = self._scratch(name, nbytes)
                cuda.copy(ptr, kind[3], nbytes)
            trt_ctx.set_tensor_address(name, ptr)
        fetch = []
        for name in s["outputs"]:  # every output needs an address, bound or not
            shape = [int(d) for d in trt_ctx.get_tensor_shape(name)]
            nbytes = int(np.prod(shape)) * s["dtypes"][name].itemsize
            bound = binding.outputs.get(name)
            if bound is not None and list(bound[1]) != shape:  # a device or host buffer of another size
                raise BackendError(f"'{self.path.name}' output {name} is {shape}, bound as {bound[1]}")
            if bound is not None and bound[0] == "cuda":
                ptr = bound[2]
            else:
                ptr = self._scratch(name, nbytes)
                if name in binding.outputs:
                    fetch.append((name, shape, ptr, bound))
            trt_ctx.set_tensor_address(name, ptr)
        if not trt_ctx.execute_async_v3(cuda.stream):
            raise BackendError(f"TensorRT failed to run '{self.path.name}' (see the TensorRT log)")
        cuda.synchronize()
        results = {}
        for name, shape, ptr, bound in fetch:
            if bound is None:
                out = np.empty(shape, s["dtypes"][name])
                cuda.copy(out.ctypes.data, ptr, out.nbytes)
                results[name] = _HostOutput(out)
            else:  # bound to a host pointer
                cuda.copy(bound[2], ptr, int(np.prod(shape)) * s["dtypes"][name].itemsize)
                results[name] = None
        binding.results = [results.get(n) for n in binding.outputs]

    def _select_profile(self, shapes: dict[str, list[int]]) -> None:
        s = self.session._state
        for k, ranges in enumerate(s["ranges"]):
            if all(_within(shapes[n], ranges[n]) for n in s["inputs"]):
                if k != s["profile"]:
                    s["context"].set_optimization_profile_async(k, s["cuda"].stream)
                    s["profile"] = k
                return
        raise BackendError(f"input shapes {shapes} are outside every optimization profile of '{self.path.name}'s "
                           "engine; rebuild with larger --max-batch/--max-context")

    def _scratch(self, name: str, nbytes: int) -> int:
        """A grow-only device buffer per tensor name for host inputs and unbound outputs."""
        s = self.session._state
        buf = s["scratch"].get(name)
        if buf is None or buf.n < max(nbytes, 1):
            buf = DeviceBuffer(s["cuda"], max(nbytes, 1), np.uint8)
            s["scratch"][name] = buf
        return buf.ptr


_ORT_TYPE = {np.dtype(np.float32): "float", np.dtype(np.float16): "float16", np.dtype(np.int64): "int64",
             np.dtype(np.int32): "int32", np.dtype(np.bool_): "bool", np.dtype(np.int8): "int8",
             np.dtype(np.uint8): "uint8"}


def _within(shape: Sequence[int], rng) -> bool:
    lo, _, hi = rng
    return len(shape) == len(lo) and all(a <= d <= b for d, a, b in zip(shape, lo, hi))
