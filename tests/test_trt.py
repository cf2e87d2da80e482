"""TensorRT: the op-compatibility check on our graphs, the engine profiles/keys/paths, the errors without TensorRT,
and the builder/runtime wiring against a FAKE `tensorrt` module.

No machine of this project has TensorRT. The fake module below (test-only) records the calls the builder makes and
"executes" engines by running the ONNX graph with onnxruntime on the CPU, on host memory standing in for device
memory. It proves that the code calls the documented API in the documented order with the manifest's shapes, and
that the Pipeline's IOBinding/KV-cache traffic survives the TensorRT backend's binding layer. It proves nothing about
TensorRT itself (parsing, kernels, precision).
"""

from __future__ import annotations

import ctypes
import json
import shutil
import sys
import types
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from anchorrt.graph_passes.trt_compat import check_artifact, check_graph
from anchorrt.runtime.errors import ArtifactError, BackendError, FlagError
from anchorrt.runtime.manifest import Manifest
from onnx import TensorProto, helper

from tests.conftest import run_cli

# -- the compatibility check -------------------------------------------------------------------------------------


def _count_ops(path: Path) -> Counter:
    """Independent count of (domain, op) over a graph and its subgraphs."""
    c: Counter = Counter()

    def walk(g):
        for n in g.node:
            c[(n.domain, n.op_type)] += 1
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)
                for sub in a.graphs:
                    walk(sub)

    walk(onnx.load(str(path), load_external_data=False).graph)
    return c


def _rows_by_op(report, graph):
    out: Counter = Counter()
    for r in report.rows:
        if r.graph == graph:
            out[(r.domain, r.op_type)] += r.count
    return out


@pytest.mark.parametrize("which", ["unfused_artifact", "gqa_artifact", "baked_unfused_artifact"])
def test_compat_lists_every_op_of_every_graph(which, request):
    folder = request.getfixturevalue(which)
    report = check_artifact(folder)
    m = Manifest.load(folder)
    for role in ("vision", "embed", "decoder"):
        assert _rows_by_op(report, role) == _count_ops(m.graph_path(role)), role
    assert all(r.status in ("yes", "restricted", "no") for r in report.rows)
    assert all(r.reason for r in report.rows if r.status != "yes")
    # The embed graph's CumSum (the image-token positions) runs on float32: operators.md lists floats only for it.
    cumsum = [r for r in report.rows if r.op_type == "CumSum"]
    assert cumsum and cumsum[0].status == "yes", cumsum
    assert not [r for r in report.rows if r.status == "no"], [r for r in report.rows if r.status == "no"]
    assert report.ok, report.problems  # "restricted" rows (the baked statistics in float64) do not fail the check


def test_compat_opset23_ops_and_versions(gqa_artifact):
    report = check_artifact(gqa_artifact)
    attention = [r for r in report.rows if r.op_type == "Attention"]
    assert {r.graph for r in attention} == {"vision", "decoder"}
    assert all(r.status == "yes" and r.reason.startswith("checked") for r in attention)  # no past/present, 4-D
    for op in ("RMSNormalization", "RotaryEmbedding"):
        assert {r.status for r in report.rows if r.op_type == op} == {"yes"}
    old = check_artifact(gqa_artifact, "10.13")  # Attention came with the 10.14 parser
    assert {r.status for r in old.rows if r.op_type == "Attention"} == {"no"}
    ancient = check_artifact(gqa_artifact, "10.0")  # opset range 9..20
    assert any("opset 23" in p for p in ancient.problems) and ancient.notes
    with pytest.raises(FlagError):
        check_artifact(gqa_artifact, "9.0")
    with pytest.raises(FlagError):
        check_artifact(gqa_artifact, "10.99")


def test_compat_baked_if_and_doubles(baked_unfused_artifact):
    report = check_artifact(baked_unfused_artifact)
    ifs = [r for r in report.rows if r.op_type == "If"]
    assert ifs and all(r.status == "yes" for r in ifs)  # distinct branch output names, equal ranks: checked
    # the mitigation subgraphs compute some statistics in float64: TensorRT casts those to float32
    assert any(r.status == "restricted" and "DOUBLE" in r.reason for r in report.rows if r.graph == "decoder")


def _model(nodes, inputs, outputs, inits=(), opset=23, domains=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    ops = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    return helper.make_model(g, opset_imports=ops)


def _vi(name, shape, t=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, t, shape)


def _status(model, op, version="10.15"):
    rows, problems = check_graph(model, "g", version)
    return {(r.status, r.reason) for r in rows if r.op_type == op}, problems


def test_compat_near_misses():
    # com.microsoft MatMulNBits (the int4 artifacts): TensorRT has no importer
    n = helper.make_node("MatMulNBits", ["x", "w", "s"], ["y"], domain="com.microsoft", K=8, N=8, bits=4,
                         block_size=16)
    m = _model([n], [_vi("x", [1, 8]), _vi("w", [8, 1, 8], TensorProto.UINT8), _vi("s", [8])], [_vi("y", [1, 8])],
               domains=["com.microsoft"])
    (st,), _ = _status(m, "MatMulNBits")
    assert st[0] == "no" and "com.microsoft" in st[1] and "default ONNX domain" in st[1]
    # Attention with past_key/past_value and present outputs: unsupported inputs/outputs
    q = [_vi(x, [1, 2, 3, 4]) for x in ("q", "k", "v", "pk", "pv")]
    att = helper.make_node("Attention", ["q", "k", "v", "", "pk", "pv"], ["y", "pko", "pvo"])
    m = _model([att], q, [_vi("y", [1, 2, 3, 4]), _vi("pko", [1, 2, 6, 4]), _vi("pvo", [1, 2, 6, 4])])
    (st,), _ = _status(m, "Attention")
    assert st[0] == "no" and "past_key input is used" in st[1] and "present_key output is used" in st[1]
    plain = _model([helper.make_node("Attention", ["q", "k", "v"], ["y"])], q[:3], [_vi("y", [1, 2, 3, 4])])
    assert _status(plain, "Attention")[0].pop()[0] == "yes"
    # 3-D Q/K/V (the op allows it; TensorRT wants 4-D)
    q3 = [_vi(x, [1, 3, 8]) for x in ("q", "k", "v")]
    m = _model([helper.make_node("Attention", ["q", "k", "v"], ["y"], q_num_heads=2, kv_num_heads=2)], q3,
               [_vi("y", [1, 3, 8])])
    assert _status(m, "Attention")[0].pop()[0] == "no"
    # ReduceMean with computed axes vs initializer axes
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    ok = _model([helper.make_node("ReduceMean", ["x", "axes"], ["y"])], [_vi("x", [2, 3])], [_vi("y", [2, 1])],
                [axes], opset=18)
    assert _status(ok, "ReduceMean")[0].pop()[0] == "yes"
    bad = _model([helper.make_node("ReduceMean", ["x", "a"], ["y"])], [_vi("x", [2, 3]), _vi("a", [1], TensorProto.INT64)],
                 [_vi("y", [2, 1])], opset=18)
    assert _status(bad, "ReduceMean")[0].pop()[0] == "no"
    # If whose branches name their outputs alike
    then_g = helper.make_graph([helper.make_node("Identity", ["x"], ["same"])], "t", [], [_vi("same", [2])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["same"])], "e", [], [_vi("same", [2])])
    m = _model([helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)],
               [_vi("c", [], TensorProto.BOOL), _vi("x", [2])], [_vi("y", [2])], opset=18)
    (st,), _ = _status(m, "If")
    assert st[0] == "no" and "same" in st[1]
    # an op TensorRT lists as unsupported, and one it does not list at all
    m = _model([helper.make_node("Unique", ["x"], ["y"])], [_vi("x", [4])], [_vi("y", [None])], opset=18)
    assert _status(m, "Unique")[0].pop()[0] == "no"


def test_cli_trt_compat_exit_codes(unfused_artifact, tmp_path):
    ok = run_cli("inspect", str(unfused_artifact), "--trt-compat", block_torch=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "TensorRT 10.15: compatible" in ok.stdout and "graph" in ok.stdout.splitlines()[0]
    bad = run_cli("inspect", str(unfused_artifact), "--trt-compat", "--trt-version", "eleven", block_torch=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and len(bad.stderr.strip().splitlines()) == 1
    # An embed graph whose CumSum runs on int64 (what torch.onnx exported before the float32 count): exit 1.
    broken = tmp_path / "broken"
    shutil.copytree(unfused_artifact, broken)
    path = broken / "embed.onnx"
    model = onnx.load(str(path))
    nodes = list(model.graph.node)
    i, node = next((i, n) for i, n in enumerate(nodes) if n.op_type == "CumSum")
    src, dst = node.input[0], node.output[0]
    node.input[0], node.output[0] = src + "_i", dst + "_i"
    del model.graph.node[:]
    model.graph.node.extend(nodes[:i] + [helper.make_node("Cast", [src], [src + "_i"], to=TensorProto.INT64), node,
                                         helper.make_node("Cast", [dst + "_i"], [dst], to=TensorProto.FLOAT)]
                            + nodes[i + 1:])
    onnx.save(model, str(path))
    r = run_cli("inspect", str(broken), "--trt-compat", "--no-verify", block_torch=True)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "CumSum" in r.stdout and "NOT compatible" in r.stdout and "INT64" in r.stdout
    j = run_cli("inspect", str(broken), "--trt-compat", "--no-verify", "--json", block_torch=True)
    data = json.loads(j.stdout)
    assert j.returncode == 1 and not data["ok"] and data["trt_version"] == "10.15"


# -- profiles, keys, errors ---------------------------------------------------------------------------------------


def test_profile_shapes_from_manifest(gqa_artifact):
    from anchorrt.runtime.trt_backend import EngineLimits, profile_shapes

    m = Manifest.load(gqa_artifact, verify=False)
    limits = EngineLimits(max_batch=4, max_context=128, opt_batch=2, opt_context=40)
    prefill, decode = profile_shapes(m, "decoder", limits)
    d, kvh, hd = m.dims["hidden_size"], m.dims["num_kv_heads"], m.dims["head_dim"]
    assert prefill["inputs_embeds"] == ([1, 1, d], [2, 40, d], [4, 128, d])
    assert prefill["past_key_values.0.key"] == ([1, kvh, 0, hd], [2, kvh, 0, hd], [4, kvh, 0, hd])
    assert prefill["attention_mask"] == ([1, 1], [2, 40], [4, 128])
    assert decode["inputs_embeds"] == ([1, 1, d], [2, 1, d], [4, 1, d])
    assert decode["past_key_values.7.value"] == ([1, kvh, 1, hd], [2, kvh, 40, hd], [4, kvh, 127, hd])
    assert decode["attention_mask"] == ([1, 2], [2, 41], [4, 128])
    for prof in (prefill, decode):  # total_length = past_length + sequence at min, opt and max
        for k in range(3):
            assert prof["attention_mask"][k][1] == prof["past_key_values.0.key"][k][2] + prof["position_ids"][k][1]
    (vision,) = profile_shapes(m, "vision", limits)
    assert vision["pixel_values"][0][0] == 1 and vision["pixel_values"][2][0] == 4
    e_prefill, e_decode = profile_shapes(m, "embed", limits)
    assert e_decode["image_features"][0][0] == 0 and e_decode["input_ids"] == ([1, 1], [2, 1], [4, 1])
    # defaults: the manifest's context length, one row
    (v,) = profile_shapes(m, "vision", EngineLimits())
    assert v["pixel_values"][2][0] == 1
    assert profile_shapes(m, "decoder", EngineLimits())[0]["attention_mask"][2][1] == m.data["context_length"]
    with pytest.raises(BackendError, match="max_context"):
        profile_shapes(m, "decoder", EngineLimits(max_context=10**6))
    with pytest.raises(BackendError, match="opt_batch"):
        profile_shapes(m, "decoder", EngineLimits(max_batch=1, opt_batch=2))
    m.data["graphs"]["decoder"]["inputs"][0]["shape"] = ["rows", "sequence", d]
    with pytest.raises(ArtifactError, match="rows"):
        profile_shapes(m, "decoder", limits)


def test_engine_key_and_paths(tmp_path):
    from anchorrt.runtime.trt_backend import engine_dir, engine_file, engine_key, find_engine

    base = ("10.15.1", "NVIDIA H100 sm90", ("fp16",), "a" * 64, [{"x": ([1], [2], [3])}])
    k = engine_key(*base)
    assert len(k) == 64 and engine_key(*base) == k
    assert engine_key(base[0], base[1], ("fp16", "fp16"), *base[3:]) == k  # flags are a set
    for i, other in enumerate(("10.16.0", "NVIDIA L4 sm89", ("fp16", "int8"), "b" * 64, [{"x": ([1], [2], [4])}])):
        changed = list(base)
        changed[i] = other
        assert engine_key(*changed) != k, i
    assert engine_file("decoder", k) == f"decoder-{k[:16]}.engine"
    assert engine_dir(tmp_path) == tmp_path / "trt"
    graph = tmp_path / "decoder.onnx"
    graph.write_bytes(b"graph")
    with pytest.raises(BackendError, match="anchorrt trt build"):
        find_engine(graph, "10.15.1", "GPU")


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError


def test_fused_artifact_is_refused_before_anything_is_built(fake_trt, tiny_artifact, tmp_path):
    from anchorrt.runtime.errors import ArtifactError
    from anchorrt.runtime.trt_backend import build_engines

    with pytest.raises(ArtifactError, match="--attention unfused"):
        build_engines(tiny_artifact)
    assert not (tiny_artifact / "trt").exists()
    report = check_artifact(tiny_artifact)  # the compatibility check names the fused op
    assert any(r.op_type == "GroupQueryAttention" and r.status == "no" for r in report.rows)


def test_errors_without_tensorrt(no_tensorrt, unfused_artifact):
    from anchorrt.runtime.backend import make_backend
    from anchorrt.runtime.pipeline import Pipeline
    from anchorrt.runtime.trt_backend import build_engines, import_tensorrt

    for call in (import_tensorrt, lambda: make_backend(unfused_artifact / "decoder.onnx", providers=["tensorrt-native"]),
                 lambda: Pipeline.from_dir(unfused_artifact, providers=["tensorrt-native"]),
                 lambda: build_engines(unfused_artifact)):
        with pytest.raises(BackendError) as err:
            call()
        msg = str(err.value)
        assert "\n" not in msg and "pip install anchorrt[trt]" in msg and "NVIDIA GPU" in msg
    assert not (unfused_artifact / "trt").exists()


def test_cli_without_tensorrt(unfused_artifact, tmp_path):
    if _has_real_tensorrt():
        pytest.skip("TensorRT is installed here; this test checks the message without it")
    r = run_cli("trt", "build", str(unfused_artifact), "--precision", "fp16", block_torch=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert "TensorRT is not installed" in r.stderr and "pip install anchorrt[trt]" in r.stderr
    assert not (unfused_artifact / "trt").exists() and not list(unfused_artifact.glob(".trt-build-*"))
    g = run_cli("generate", str(unfused_artifact), "--image", "x.png", "--prompt", "hi", "--device", "trt",
                block_torch=True)
    assert g.returncode == 2 and "TensorRT is not installed" in g.stderr


def _has_real_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


# -- a fake tensorrt (test-only): records calls, "runs" engines with onnxruntime on host memory ----------------------


class FakeCuda:
    """Host memory standing in for device memory: pointers are real host addresses, copies are memmove."""

    stream = 0

    def __init__(self, device_id: int = 0):
        self.device_id = device_id
        self.blocks: dict[int, np.ndarray] = {}

    def malloc(self, nbytes):
        block = np.zeros(max(int(nbytes), 1) + 64, np.uint8)
        ptr = block.ctypes.data
        self.blocks[ptr] = block
        return ptr

    def free(self, ptr):
        self.blocks.pop(ptr, None)

    def copy(self, dst, src, nbytes):
        if nbytes:
            ctypes.memmove(dst, src, nbytes)

    def synchronize(self):
        pass

    def device_name(self):
        return "FakeGPU sm90"


def _read(ptr, shape, dtype):
    dtype = np.dtype(dtype)
    n = int(np.prod(shape))
    if n == 0:
        return np.zeros(shape, dtype)
    return np.frombuffer((ctypes.c_char * (n * dtype.itemsize)).from_address(ptr), dtype).reshape(shape).copy()


def make_fake_trt(calls: list):
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.15.1.fake"

    class Enum:
        def __init__(self, name):
            self.name = name

        def __repr__(self):
            return self.name

    class Logger:
        WARNING = Enum("WARNING")

        def __init__(self, level):
            pass

    trt.Logger = Logger
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE=Enum("WORKSPACE"))
    trt.BuilderFlag = types.SimpleNamespace(FP16=Enum("FP16"), INT8=Enum("INT8"), FP8=Enum("FP8"))
    trt.TensorIOMode = types.SimpleNamespace(INPUT=Enum("INPUT"), OUTPUT=Enum("OUTPUT"))
    np_of = {1: np.float32, 7: np.int64, 9: np.bool_, 10: np.float16, 6: np.int32}
    trt.nptype = lambda t: np_of[t]

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            calls.append(("profile.set_shape", name, list(lo), list(opt), list(hi)))
            self.shapes[name] = (list(lo), list(opt), list(hi))

    class Cache:
        def __init__(self, data):
            self.data = data

        def serialize(self):
            return self.data + b"+"

    class Config:
        def __init__(self):
            self.profiles, self.cache = [], None

        def set_memory_pool_limit(self, pool, size):
            calls.append(("config.set_memory_pool_limit", pool.name, size))

        def set_flag(self, flag):
            calls.append(("config.set_flag", flag.name))

        def add_optimization_profile(self, profile):
            calls.append(("config.add_optimization_profile",))
            self.profiles.append(profile.shapes)

        def create_timing_cache(self, data):
            calls.append(("config.create_timing_cache", bytes(data)))
            return Cache(bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch):
            calls.append(("config.set_timing_cache", ignore_mismatch))
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Network:
        pass

    class Parser:
        def __init__(self, network, logger):
            calls.append(("OnnxParser",))
            self.network, self.num_errors = network, 0

        def parse_from_file(self, path):
            calls.append(("parser.parse_from_file", path))
            self.network.path = path
            return True

    class Builder:
        def __init__(self, logger):
            calls.append(("Builder",))

        def create_network(self, flags):
            calls.append(("builder.create_network", flags))
            return Network()

        def create_builder_config(self):
            calls.append(("builder.create_builder_config",))
            return Config()

        def create_optimization_profile(self):
            calls.append(("builder.create_optimization_profile",))
            return Profile()

        def build_serialized_network(self, network, config):
            calls.append(("builder.build_serialized_network",))
            if getattr(trt, "fail_build", False):
                return None
            return json.dumps({"onnx": network.path, "profiles": config.profiles}).encode()

    class Engine:
        def __init__(self, spec):
            import onnxruntime as ort

            self.session = ort.InferenceSession(spec["onnx"], providers=["CPUExecutionProvider"])
            self.profiles = spec["profiles"]
            ios = [(i, True) for i in self.session.get_inputs()] + [(o, False) for o in self.session.get_outputs()]
            self.names = [x.name for x, _ in ios]
            self.is_input = {x.name: inp for x, inp in ios}
            code = {"tensor(float)": 1, "tensor(int64)": 7, "tensor(bool)": 9, "tensor(float16)": 10}
            self.dtype = {x.name: code[x.type] for x, _ in ios}
            self.num_io_tensors = len(self.names)
            self.num_optimization_profiles = len(self.profiles)

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            return trt.TensorIOMode.INPUT if self.is_input[name] else trt.TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return self.dtype[name]

        def get_tensor_profile_shape(self, name, k):
            return self.profiles[k][name]

        def create_execution_context(self):
            return Context(self)

    class Context:
        """set_input_shape / set_tensor_address / execute_async_v3; outputs computed by onnxruntime on the CPU."""

        def __init__(self, engine):
            self.engine, self.shapes, self.addr, self.result, self.profile = engine, {}, {}, None, 0

        def set_optimization_profile_async(self, k, stream):
            calls.append(("context.set_optimization_profile_async", k))
            self.profile = k
            return True

        def set_input_shape(self, name, shape):
            lo, _, hi = self.engine.profiles[self.profile][name]
            assert all(a <= d <= b for d, a, b in zip(shape, lo, hi)), (name, shape, self.profile)
            self.shapes[name] = list(shape)
            self.result = None
            return True

        def set_tensor_address(self, name, ptr):
            self.addr[name] = ptr
            return True

        def _compute(self):
            if self.result is None:
                feed = {n: _read(self.addr[n], self.shapes[n], np_of[self.engine.dtype[n]])
                        for n in self.shapes}
                outs = [o.name for o in self.engine.session.get_outputs()]
                self.result = dict(zip(outs, self.engine.session.run(outs, feed)))
            return self.result

        def get_tensor_shape(self, name):
            return list(self._compute()[name].shape)

        def execute_async_v3(self, stream):
            for name, value in self._compute().items():
                value = np.ascontiguousarray(value)
                ctypes.memmove(self.addr[name], value.ctypes.data, value.nbytes)
            self.result = None
            return True

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return Engine(json.loads(bytes(data)))

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, Parser, Runtime
    return trt


@pytest.fixture
def fake_trt(monkeypatch):
    calls: list = []
    trt = make_fake_trt(calls)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    import anchorrt.runtime.trt_backend as tb

    monkeypatch.setattr(tb, "Cuda", FakeCuda)
    return trt, calls


def test_fake_build_calls_documented_api_in_order(fake_trt, unfused_artifact, tmp_path):
    from anchorrt.runtime.trt_backend import EngineLimits, build_engines, profile_shapes, read_index

    trt, calls = fake_trt
    art = tmp_path / "art"
    shutil.copytree(unfused_artifact, art)
    limits = EngineLimits(max_batch=2, max_context=64, opt_context=24)
    built = build_engines(art, flags=("fp16",), limits=limits, workspace_mb=256, roles=("decoder",))
    m = Manifest.load(art)
    profiles = profile_shapes(m, "decoder", limits)
    head = [c[0] for c in calls[:6]]
    assert head == ["Builder", "builder.create_network", "OnnxParser", "parser.parse_from_file",
                    "builder.create_builder_config", "config.set_memory_pool_limit"]
    assert calls[3][1] == str(m.graph_path("decoder")) and calls[5][1:] == ("WORKSPACE", 256 << 20)
    assert ("config.set_flag", "FP16") in calls
    set_shapes = [c for c in calls if c[0] == "profile.set_shape"]
    expected = [("profile.set_shape", n, *map(list, s)) for p in profiles for n, s in p.items()]
    assert set_shapes == expected and len(profiles) == 2
    names = [c[0] for c in calls]
    assert names.count("config.add_optimization_profile") == 2
    assert names.index("config.create_timing_cache") < names.index("config.set_timing_cache") \
        < names.index("builder.build_serialized_network")
    assert ("config.create_timing_cache", b"") in calls and ("config.set_timing_cache", False) in calls
    # files: engine keyed by version/GPU/flags/sha/profiles, index, timing cache; nothing else, no temp folders
    index = read_index(art)["engines"]
    assert [e["role"] for e in index] == ["decoder"] and index[0]["gpu"] == "FakeGPU sm90"
    assert index[0]["graph_sha256"] == m.data["files"]["decoder.onnx"] and index[0]["flags"] == ["fp16"]
    assert built["decoder"] == art / "trt" / index[0]["engine"] and built["decoder"].is_file()
    assert (art / "trt" / "timing.cache").read_bytes() == b"+"
    assert not list(art.glob(".trt-build-*"))
    Manifest.load(art)  # the artifact still verifies with trt/ beside it
    # up to date: no rebuild; --force: the saved timing cache is fed back to the builder
    calls.clear()
    build_engines(art, flags=("fp16",), limits=limits, roles=("decoder",))
    assert "Builder" not in [c[0] for c in calls]
    build_engines(art, flags=("fp16",), limits=limits, roles=("decoder",), force=True)
    assert ("config.create_timing_cache", b"+") in calls
    # a failed build leaves the previous trt/ folder as it was
    before = {p.name: p.read_bytes() for p in (art / "trt").iterdir()}
    trt.fail_build = True
    with pytest.raises(BackendError, match="could not build"):
        build_engines(art, flags=("int8",), limits=limits, roles=("decoder",))
    assert {p.name: p.read_bytes() for p in (art / "trt").iterdir()} == before
    assert not list(art.glob(".trt-build-*"))
    with pytest.raises(BackendError, match="precision flag"):
        build_engines(art, flags=("int3",))


def test_fake_engine_pipeline_matches_cpu(fake_trt, unfused_artifact, tmp_path, images):
    """The Pipeline on TrtBackend (fake engines = onnxruntime CPU behind the binding layer, host memory as device
    memory): the same greedy tokens as the CPU pipeline, for a batch of 2 with profile switches prefill/decode."""
    from anchorrt.runtime.pipeline import Pipeline, Request
    from anchorrt.runtime.trt_backend import EngineLimits, TrtBackend, build_engines

    _, calls = fake_trt
    art = tmp_path / "art"
    shutil.copytree(unfused_artifact, art)
    build_engines(art, limits=EngineLimits(max_batch=2, max_context=128))
    pipe = Pipeline.from_dir(art, providers=["tensorrt-native"])
    assert isinstance(pipe.decoder, TrtBackend) and pipe.decoder.device == "cuda"
    reqs = [Request(images[0], "What is this?"), Request(images[1], "Describe the picture in detail.")]
    got = pipe.generate_batch(reqs, max_new_tokens=6)
    want = Pipeline.from_dir(art).generate_batch(reqs, max_new_tokens=6)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert ("context.set_optimization_profile_async", 1) in calls  # decode steps ran on the decode profile
    logits = pipe.decoder.run  # plain run() path too (vision graph)
    assert callable(logits)
    pv = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    np.testing.assert_array_equal(pipe.vision.run({"pixel_values": pv})["image_features"],
                                  Pipeline.from_dir(art).vision.run({"pixel_values": pv})["image_features"])
    with pytest.raises(BackendError, match="outside every optimization profile"):
        pipe.vision.run({"pixel_values": np.zeros((3, 3, 32, 32), np.float32)})
    # an output bound to a host array of another shape is refused (the copy back would overrun the array)
    binding = pipe.vision.io_binding()
    binding.bind_cpu_input("pixel_values", pv)
    small = np.empty((1, 1), np.float32)
    binding.bind_output("image_features", "cpu", 0, np.float32, list(small.shape), small.ctypes.data)
    with pytest.raises(BackendError, match="bound as"):
        pipe.vision.run_with_iobinding(binding)
