"""Issue 19 end to end: the bundled tritonserver (nvidia-pytriton) serves the baked tiny artifact on 127.0.0.1, and
plain and mitigated requests sent together come back as one dynamic batch with the local Pipeline's tokens; the
streaming (decoupled) model over gRPC gives the same tokens one by one. Marker `serve` (in `make test`; the
serve extra must be installed in a venv made from /usr/bin/python3, see README "Serving")."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from tests.test_serve import MIXED, png

pytestmark = pytest.mark.serve


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(baked_artifact, tmp_path_factory):
    pytest.importorskip("pytriton", reason="nvidia-pytriton (anchorrt[serve]) is not installed")
    pytest.importorskip("tritonclient.grpc", reason="tritonclient (anchorrt[serve]) is not installed")
    from anchorrt.runtime.serving.repository import write_repository
    from anchorrt.runtime.serving.server import LocalTriton

    tmp = tmp_path_factory.mktemp("served")
    # a long queue delay: requests sent together are executed as one batch
    repo = write_repository(baked_artifact, tmp / "repo", max_queue_delay_us=300_000, intra_op_threads=1)
    http, grpc = free_port(), free_port()
    with LocalTriton(repo, http_port=http, grpc_port=grpc, log_file=tmp / "triton.log") as triton:
        yield triton


def test_mixed_dynamic_batch_equals_pipeline(server, baked_artifact, images):
    import tritonclient.grpc as grpcclient
    from anchorrt.runtime import Pipeline
    from anchorrt.runtime.serving.client import AnchorClient

    local = Pipeline.from_dir(baked_artifact, providers=["CPUExecutionProvider"])
    prompts = ["What is in the image?", "Describe it.", "Is there a dog?"]
    rows = [(png(images[i % 3]), prompts[i % 3], m) for i, m in enumerate(MIXED)]
    stats = grpcclient.InferenceServerClient(server.grpc_url)
    before = stats.get_inference_statistics("anchorrt", as_json=True)["model_stats"][0]
    results: list = [None] * len(rows)
    barrier = threading.Barrier(len(rows))

    def send(i: int) -> None:
        client = AnchorClient(server.http_url.removeprefix("http://"))
        barrier.wait()
        img, prompt, mitigation = rows[i]
        results[i] = client.generate(img, prompt, mitigation=mitigation, max_new_tokens=6)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(rows))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for (img, prompt, mitigation), served in zip(rows, results):
        ref = local.generate(img, prompt, mitigation=mitigation, max_new_tokens=6)
        assert (served.token_ids, served.text, served.finish_reason) == (ref.token_ids, ref.text, ref.finish_reason)
    after = stats.get_inference_statistics("anchorrt", as_json=True)["model_stats"][0]
    inferences = int(after.get("inference_count", 0)) - int(before.get("inference_count", 0))
    executions = int(after.get("execution_count", 0)) - int(before.get("execution_count", 0))
    assert inferences == len(rows) and executions < len(rows)  # batched (one execute when all arrive in 300 ms)


def test_stream_and_errors(server, baked_artifact, images):
    from anchorrt.runtime import Pipeline
    from anchorrt.runtime.serving.client import AnchorClient, ServerError

    local = Pipeline.from_dir(baked_artifact, providers=["CPUExecutionProvider"])
    img = png(images[2])
    grpc = AnchorClient(server.grpc_url, protocol="grpc")
    pieces = list(grpc.stream(img, "Describe it.", mitigation={"clva": True, "sevi": True}, max_new_tokens=6))
    ref = local.generate(img, "Describe it.", mitigation={"clva": True, "sevi": True}, max_new_tokens=6)
    assert [t for p in pieces for t in p.token_ids] == ref.token_ids and len(pieces) >= 2
    assert "".join(p.text for p in pieces) == ref.text and pieces[-1].finish_reason == ref.finish_reason
    with pytest.raises(ServerError, match="unknown request parameter 'clva.alpah'"):
        grpc.generate(img, "x", mitigation={"clva": {"alpah": 1.0}})
    assert server.ready()


def test_cli_serve_ready_then_sigterm(baked_artifact, tmp_path):
    """`anchorrt serve ARTIFACT --port P`: ready (health endpoint, one answered request), SIGTERM stops it and its
    server, nothing left running."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from anchorrt.runtime.serving.server import http_ready

    pytest.importorskip("pytriton", reason="nvidia-pytriton (anchorrt[serve]) is not installed")
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, "-m", "anchorrt", "serve", str(baked_artifact), "--port", str(port),
                             "--grpc-port", str(free_port()), "--threads", "1"], stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        first = proc.stderr.readline() + proc.stderr.readline()
        assert "ready in" in first, first + proc.stderr.read()
        assert http_ready(f"http://127.0.0.1:{port}")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert proc.returncode == 143
    deadline = time.monotonic() + 10
    while http_ready(f"http://127.0.0.1:{port}", timeout=0.5) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not http_ready(f"http://127.0.0.1:{port}", timeout=0.5)
