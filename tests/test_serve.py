"""Issue 19, without a server: the Triton model repository (config.pbtxt parsed as Triton's ModelConfig, the copied
artifact and runtime), the Python-backend model.py run on fake batches through a fake `triton_python_backend_utils`
(plain and decoupled), request parameters, and the CLI's errors. tests/test_serve_e2e.py starts a real tritonserver.
"""

from __future__ import annotations

import importlib.util
import io
import json
import sys
import types

import numpy as np
import pytest
from anchorrt.runtime.errors import BackendError, FlagError
from anchorrt.runtime.serving.params import methods_of, parse_parameters, to_parameters

from tests.conftest import run_cli

MIXED = [None, {"clva": True}, {"sevi": {"omega": 0.7}}, {"clva": {"alpha": 20.0}, "sevi": True}, {"iava": True}]


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def repo(baked_artifact, tmp_path_factory):
    from anchorrt.runtime.serving.repository import write_repository

    return write_repository(baked_artifact, tmp_path_factory.mktemp("serve") / "repo", max_queue_delay_us=5000,
                            intra_op_threads=1)


def parse_config(path):
    """config.pbtxt -> (ModelConfig message, the JSON dict Triton hands to the Python backend's initialize)."""
    text_format = pytest.importorskip("google.protobuf.text_format", reason="protobuf comes with anchorrt[serve]")
    from google.protobuf import json_format

    mc = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient comes with anchorrt[serve]")
    message = text_format.Parse(path.read_text(), mc.ModelConfig())
    return message, json_format.MessageToDict(message, preserving_proto_field_name=True)


# -- the repository ------------------------------------------------------------------------------------------------
def test_config_is_a_valid_model_config(repo, baked_artifact):
    plain, _ = parse_config(repo / "anchorrt" / "config.pbtxt")
    stream, _ = parse_config(repo / "anchorrt_stream" / "config.pbtxt")
    assert plain.name == "anchorrt" and plain.backend == "python" and plain.max_batch_size == 8
    assert [(i.name, i.data_type, list(i.dims)) for i in plain.input] == [("IMAGE", 13, [1]), ("PROMPT", 13, [1])]
    assert [(o.name, list(o.dims)) for o in plain.output] == [("TEXT", [1]), ("TOKEN_IDS", [-1]), ("FINISH_REASON", [1])]
    assert plain.dynamic_batching.max_queue_delay_microseconds == 5000
    assert plain.instance_group[0].kind == plain.instance_group[0].KIND_CPU
    assert not plain.model_transaction_policy.decoupled and stream.model_transaction_policy.decoupled
    assert plain.parameters["artifact"].string_value == "artifact"
    assert (repo / "anchorrt_stream" / "1" / stream.parameters["artifact"].string_value / "manifest.json").is_file()
    assert (repo / "anchorrt" / "1" / "anchorrt" / "runtime" / "pipeline.py").is_file()
    assert not (repo / "anchorrt" / "1" / "anchorrt" / "runtime" / "profile").exists()
    from anchorrt.runtime.manifest import Manifest

    Manifest.load(repo / "anchorrt" / "1" / "artifact", verify=True)  # the copy is complete, hashes hold


def test_gpu_instance_group_and_batch_size(unfused_artifact, tmp_path):
    from anchorrt.runtime.serving.repository import write_repository

    # the unfused form: fp32 runs on CUDA only unfused (the fused one needs --precision fp16)
    repo = write_repository(unfused_artifact, tmp_path / "r", kind="gpu", gpus=(0, 1), instances=2, max_batch_size=3,
                            streaming=False)
    config, _ = parse_config(repo / "anchorrt" / "config.pbtxt")
    group = config.instance_group[0]
    assert (group.kind, group.count, list(group.gpus), config.max_batch_size) == (group.KIND_GPU, 2, [0, 1], 3)
    assert not (repo / "anchorrt_stream").exists()


def test_max_batch_size_from_the_manifest(tiny_artifact, tmp_path):
    import shutil

    from anchorrt.runtime.errors import ArtifactError
    from anchorrt.runtime.serving.repository import write_repository

    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    manifest = json.loads((art / "manifest.json").read_text())
    (art / "manifest.json").write_text(json.dumps(dict(manifest, serving={"max_batch_size": 3})))
    repo = write_repository(art, tmp_path / "r", streaming=False)
    assert parse_config(repo / "anchorrt" / "config.pbtxt")[0].max_batch_size == 3
    (art / "manifest.json").write_text(json.dumps(dict(manifest, serving={"max_batch_size": 0})))
    with pytest.raises(ArtifactError, match="serving.max_batch_size"):
        write_repository(art, tmp_path / "r2")


def test_repository_errors(baked_artifact, tmp_path):
    from anchorrt.runtime.serving.repository import write_repository

    (tmp_path / "taken").mkdir()
    with pytest.raises(FlagError, match="exists; pass --force"):
        write_repository(baked_artifact, tmp_path / "taken")
    with pytest.raises(FlagError, match="max_batch_size"):
        write_repository(baked_artifact, tmp_path / "x", max_batch_size=0)
    assert not (tmp_path / "x").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


# -- request parameters --------------------------------------------------------------------------------------------
def test_parameters_round_trip_and_errors():
    methods = methods_of({"clva": {}, "sevi": {}, "probe": {}}, has_visalign=False)
    assert set(methods) == {"clva", "sevi", "iava"}
    spec = {"clva": {"alpha": 14.0}, "sevi": True, "iava": {"i": 0.2}}
    sampling, mitigation = parse_parameters(json.dumps(to_parameters(spec, max_new_tokens=5)), methods)
    assert sampling == {"max_new_tokens": 5} and mitigation == spec
    assert parse_parameters({"clva.alpha": 3.0, "clva": False}, methods)[1] == {"clva": False}
    assert parse_parameters({"clva": False, "clva.alpha": 3.0}, methods)[1] == {"clva": False}
    assert parse_parameters("", methods) == ({}, None)
    for bad, match in [({"clva.alpah": 1.0}, "unknown request parameter 'clva.alpah'"),
                       ({"visalign": True}, "unknown request parameter 'visalign'"),
                       ({"sevi": 1}, "must be true or false"), ({"max_new_tokens": 2.5}, "must be an integer"),
                       ({"temperature": "hot"}, "must be a number"), ("{", "not a JSON object")]:
        with pytest.raises(FlagError, match=match):
            parse_parameters(bad, methods)


# -- model.py on fake batches ------------------------------------------------------------------------------------
class FakeTensor:
    def __init__(self, name, array):
        self._name, self._array = name, array

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array


class FakeResponse:
    def __init__(self, output_tensors=(), error=None):
        self.outputs = {t.name(): t.as_numpy() for t in output_tensors}
        self.error = error


class FakeError:
    CANCELLED, INVALID_ARG = "CANCELLED", "INVALID_ARG"

    def __init__(self, message, code=None):
        self.msg, self.code = message, code


class FakeSender:
    def __init__(self, cancel_after=None):
        self.sent, self.cancel_after = [], cancel_after

    def send(self, response, flags=0):
        self.sent.append((response, flags))

    def is_cancelled(self):
        return self.cancel_after is not None and len(self.sent) >= self.cancel_after


class FakeRequest:
    def __init__(self, image, prompt, params, cancel_after=None, cancelled=False):
        self.cancelled = cancelled
        self.inputs = {"IMAGE": np.array([[image]], dtype=object), "PROMPT": np.array([[prompt.encode()]], dtype=object)}
        self.params, self.sender = json.dumps(params), FakeSender(cancel_after)

    def parameters(self):
        return self.params

    def is_cancelled(self):
        return self.cancelled

    def get_response_sender(self):
        return self.sender


def fake_pb_utils():
    m = types.ModuleType("triton_python_backend_utils")
    m.Tensor, m.InferenceResponse, m.TritonError = FakeTensor, FakeResponse, FakeError
    m.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
    m.get_input_tensor_by_name = lambda r, n: FakeTensor(n, r.inputs[n]) if n in r.inputs else None
    m.using_decoupled_model_transaction_policy = lambda c: bool(c.get("model_transaction_policy", {}).get("decoupled"))
    return m


def load_model(repo, name, monkeypatch, kind="CPU"):
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake_pb_utils())
    monkeypatch.setattr(sys, "path", list(sys.path))
    path = repo / name / "1" / "model.py"
    spec = importlib.util.spec_from_file_location(f"anchorrt_triton_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _, config = parse_config(repo / name / "config.pbtxt")
    model = module.TritonPythonModel()
    model.initialize({"model_config": json.dumps(config), "model_repository": str(repo / name), "model_version": "1",
                      "model_instance_kind": kind, "model_instance_device_id": "0", "model_name": name})
    return model


@pytest.fixture(scope="module")
def local(baked_artifact):
    from anchorrt.runtime import Pipeline

    return Pipeline.from_dir(baked_artifact, providers=["CPUExecutionProvider"])


def batch(images):
    prompts = ["What is in the image?", "Describe it.", "Is there a dog?"]
    return [(png(images[i % 3]), prompts[i % 3], m) for i, m in enumerate(MIXED)]


def test_model_execute_mixed_batch_equals_pipeline(repo, local, images, monkeypatch):
    model = load_model(repo, "anchorrt", monkeypatch)
    rows = batch(images)
    requests = [FakeRequest(img, p, to_parameters(m, max_new_tokens=6)) for img, p, m in rows]
    requests.insert(2, FakeRequest(b"not an image", "x", {}))
    requests.insert(4, FakeRequest(png(images[0]), "x", {"clva.alpha": -1.0}))
    requests.append(FakeRequest(png(images[0]), "x", {}, cancelled=True))  # the client gave up while it was queued
    responses = model.execute(requests)
    assert len(responses) == len(requests)
    assert responses.pop().error.code == "CANCELLED"
    assert "not a recognised image format" in responses[2].error.msg
    assert responses[4].error.msg == "clva alpha must be >= 0, got -1" and responses[4].error.code == "INVALID_ARG"
    served = [r for i, r in enumerate(responses) if i not in (2, 4)]
    assert len(served) == len(rows)
    for (img, prompt, mitigation), r in zip(rows, served):
        ref = local.generate(img, prompt, mitigation=mitigation, max_new_tokens=6)
        assert r.error is None
        assert r.outputs["TOKEN_IDS"].tolist() == [ref.token_ids]
        assert r.outputs["TEXT"][0, 0].decode() == ref.text and r.outputs["FINISH_REASON"][0, 0].decode() == ref.finish_reason
    # the flags reach the graphs: some mitigated row differs from the same request unmitigated
    plain = [local.generate(img, p, max_new_tokens=6).token_ids for img, p, _ in rows]
    assert any(r.outputs["TOKEN_IDS"].tolist() != [p] for r, p in zip(served[1:], plain[1:]))


def test_model_stream_sends_tokens_then_final(repo, local, images, monkeypatch):
    model = load_model(repo, "anchorrt_stream", monkeypatch)
    rows = batch(images)[:3]
    requests = [FakeRequest(img, p, to_parameters(m, max_new_tokens=5)) for img, p, m in rows]
    requests.append(FakeRequest(png(images[1]), "Describe it.", {"max_new_tokens": 5}, cancel_after=2))
    assert model.execute(requests) is None
    for (img, prompt, mitigation), req in zip(rows, requests):
        ref = local.generate(img, prompt, mitigation=mitigation, max_new_tokens=5)
        flags = [f for _, f in req.sender.sent]
        assert flags == [0] * (len(flags) - 1) + [1]  # exactly one FINAL, last
        ids = [t for r, _ in req.sender.sent for t in r.outputs["TOKEN_IDS"].reshape(-1).tolist()]
        assert ids == ref.token_ids
        assert "".join(r.outputs["TEXT"][0, 0].decode() for r, _ in req.sender.sent) == ref.text
        assert req.sender.sent[-1][0].outputs["FINISH_REASON"][0, 0].decode() == ref.finish_reason
    cancelled = requests[-1].sender.sent
    assert len(cancelled) == 3 and cancelled[-1][1] == 1 and cancelled[-1][0].error.code == "CANCELLED"


def test_gpu_instance_of_the_fp32_fused_form_is_refused(repo, baked_artifact, tmp_path, monkeypatch):
    """The fixture is the fused form in fp32, which CUDA cannot run (runtime/pipeline.py refuse_fp32_fused_on_gpu):
    a GPU instance is refused at load, and `--kind gpu` before the repository is written. (The install hint for a
    missing CUDA provider is tested in tests/test_cuda.py on the unfused form.)"""
    from anchorrt.runtime.serving.repository import write_repository

    with pytest.raises(BackendError, match="--precision fp16"):
        load_model(repo, "anchorrt", monkeypatch, kind="GPU")
    with pytest.raises(BackendError, match="--attention unfused"):
        write_repository(baked_artifact, tmp_path / "gpu-repo", kind="gpu")
    assert not (tmp_path / "gpu-repo").exists()


def test_model_runs_without_torch(repo, images, tmp_path):
    """model.py and the runtime it loads from the repository, in a subprocess where torch cannot be imported."""
    import subprocess

    from tests.conftest import BLOCK_TORCH

    (tmp_path / "img.png").write_bytes(png(images[0]))
    script = f"""
import json, sys, types, importlib.util
import numpy as np
from google.protobuf import json_format, text_format
import tritonclient.grpc.model_config_pb2 as mc
class T:
    def __init__(self, n, a): self.n, self.a = n, a
    def as_numpy(self): return self.a
class R:
    def __init__(self, output_tensors=(), error=None): self.out, self.error = {{t.n: t.a for t in output_tensors}}, error
class Req:
    inputs = {{"IMAGE": np.array([[open({str(tmp_path / "img.png")!r}, "rb").read()]], dtype=object),
              "PROMPT": np.array([[b"Describe it."]], dtype=object)}}
    def parameters(self): return json.dumps({{"clva": True, "max_new_tokens": 3}})
pb = types.ModuleType("triton_python_backend_utils")
pb.Tensor, pb.InferenceResponse, pb.TritonError = T, R, Exception
pb.get_input_tensor_by_name = lambda r, n: T(n, r.inputs[n])
pb.using_decoupled_model_transaction_policy = lambda c: False
sys.modules["triton_python_backend_utils"] = pb
repo = {str(repo)!r}
config = json_format.MessageToDict(text_format.Parse(open(repo + "/anchorrt/config.pbtxt").read(), mc.ModelConfig()),
                                   preserving_proto_field_name=True)
spec = importlib.util.spec_from_file_location("m", repo + "/anchorrt/1/model.py")
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
model = m.TritonPythonModel()
model.initialize({{"model_config": json.dumps(config), "model_repository": repo + "/anchorrt", "model_version": "1",
                   "model_instance_kind": "CPU"}})
out = model.execute([Req()])[0]
import anchorrt.runtime as runtime
assert runtime.__file__.startswith(repo), runtime.__file__   # the runtime copied into the repository
assert "torch" not in sys.modules
print(out.out["TOKEN_IDS"].tolist())
"""
    pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient comes with anchorrt[serve]")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(BLOCK_TORCH), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout.strip().splitlines()[-1])[0]) == 3


# -- CLI ------------------------------------------------------------------------------------------------------------
def test_cli_serve_triton_and_errors(baked_artifact, tmp_path):
    r = run_cli("serve", "triton", str(baked_artifact), "-o", str(tmp_path / "repo"), "--max-batch-size", "4",
                block_torch=True)
    assert r.returncode == 0, r.stderr
    assert "max_batch_size: 4" in (tmp_path / "repo" / "anchorrt" / "config.pbtxt").read_text()
    again = run_cli("serve", "triton", str(baked_artifact), "-o", str(tmp_path / "repo"))
    assert again.returncode == 2 and again.stderr.strip().splitlines() == [f"error: {tmp_path / 'repo'} exists; pass --force to replace it"]
    missing = run_cli("serve", str(tmp_path / "nothing"), "--port", "18999")
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1 and "error:" in missing.stderr


def test_no_tritonserver_is_one_line(monkeypatch):
    from anchorrt.runtime.serving import server

    monkeypatch.setattr(server.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BackendError, match=r"tritonserver is not installed; pip install 'anchorrt\[serve\]'"):
        server.find_tritonserver()
