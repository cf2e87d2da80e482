"""The CUDA execution provider path.

CPU tests (run everywhere): asking for CUDA where onnxruntime cannot give it (this project's CPU build) is refused
with the install hint unless the fallback is accepted; the provider options the backend passes.
GPU tests (`@pytest.mark.gpu`, skipped with the reason by tests/conftest.py when onnxruntime has no
CUDAExecutionProvider): the fixture on CUDA against the CPU, the KV cache resident on the device.
"""

from __future__ import annotations

import numpy as np
import pytest
from anchorrt.runtime.backend import CUDA_DEFAULTS, OrtBackend
from anchorrt.runtime.errors import BackendError

from tests.conftest import run_cli

CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]


def _cuda_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def test_provider_options():
    b = OrtBackend("x.onnx", providers=CUDA, device_id=1, cuda_options={"gpu_mem_limit": 1 << 30}, cuda_graph=True)
    name, opts = b.requested[0]
    assert name == "CUDAExecutionProvider" and b.requested[1] == "CPUExecutionProvider"
    assert opts == {**CUDA_DEFAULTS, "device_id": "1", "gpu_mem_limit": str(1 << 30), "enable_cuda_graph": "1"}
    plain = OrtBackend("x.onnx", providers=CUDA)
    assert "enable_cuda_graph" not in plain.requested[0][1] and plain.requested[0][1]["device_id"] == "0"
    given = ("CUDAExecutionProvider", {"device_id": "3"})  # explicit (name, options) pairs pass through untouched
    assert OrtBackend("x.onnx", providers=[given]).requested == [given]
    assert OrtBackend("x.onnx").requested == ["CPUExecutionProvider"]


@pytest.mark.skipif(_cuda_available(), reason="onnxruntime here has CUDA; the refusal needs a build without it")
def test_silent_cpu_fallback_is_refused(tiny_artifact, images):
    from anchorrt.runtime.pipeline import Pipeline

    b = OrtBackend(tiny_artifact / "vision.onnx", providers=CUDA)
    with pytest.raises(BackendError) as err:
        _ = b.session
    msg = str(err.value)
    assert "\n" not in msg and "CUDAExecutionProvider" in msg and "CPUExecutionProvider" in msg
    assert "onnxruntime-gpu" in msg and "allow_fallback=True" in msg and "--allow-fallback" in msg
    ok = OrtBackend(tiny_artifact / "vision.onnx", providers=CUDA, allow_fallback=True)
    assert ok.provider == "CPUExecutionProvider" and ok.device == "cpu"
    pipe = Pipeline.from_dir(tiny_artifact, providers=CUDA, allow_fallback=True)
    cpu = Pipeline.from_dir(tiny_artifact)
    img = images[0]
    assert pipe.generate(img, "Hi", max_new_tokens=3).token_ids == cpu.generate(img, "Hi", max_new_tokens=3).token_ids


@pytest.mark.skipif(_cuda_available(), reason="onnxruntime here has CUDA; the refusal needs a build without it")
def test_cli_cuda_fallback(tiny_artifact, tmp_path):
    from PIL import Image

    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(img)
    args = ["generate", str(tiny_artifact), "--image", str(img), "--prompt", "Hi", "--max-new-tokens", "2",
            "--device", "cuda"]
    r = run_cli(*args, block_torch=True)
    assert r.returncode == 2 and r.stderr.startswith("error: asked for CUDAExecutionProvider")
    assert len(r.stderr.strip().splitlines()) == 1 and "--allow-fallback" in r.stderr
    ok = run_cli(*args, "--allow-fallback", block_torch=True)
    assert ok.returncode == 0, ok.stderr
    assert "(CPUExecutionProvider)" in ok.stderr


# -- on a GPU --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_pipeline_matches_cpu(tiny_artifact, images):
    """Tolerance: |logit difference| <= 1e-3 (onnxruntime's CUDA EP may use TF32 matmuls); greedy tokens equal."""
    from anchorrt.runtime.kv_cache import KVCache
    from anchorrt.runtime.pipeline import Pipeline

    gpu = Pipeline.from_dir(tiny_artifact, providers=CUDA)
    cpu = Pipeline.from_dir(tiny_artifact)
    assert gpu.decoder.provider == "CUDAExecutionProvider" and gpu.decoder.device == "cuda"
    cache = gpu._new_cache(1, 8)
    assert isinstance(cache, KVCache) and cache._buffers[0][0][0].device_name() == "cuda"  # KV lives on the device
    prompts = ["What is in the image?", "Describe it."]
    got = gpu.generate_batch(list(zip(images[:2], prompts)), max_new_tokens=8)
    want = cpu.generate_batch(list(zip(images[:2], prompts)), max_new_tokens=8)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    batch = cpu._pad([cpu.prompts.encode(p) for p in prompts])
    feats_cpu = cpu.encode_images(cpu.preprocess(images[:2]))
    feats_gpu = gpu.encode_images(gpu.preprocess(images[:2]))
    assert np.abs(feats_cpu - feats_gpu).max() <= 1e-3
    logits = []
    for pipe, feats in ((cpu, feats_cpu), (gpu, feats_cpu)):
        c = pipe._new_cache(2, batch.ids.shape[1] + 1)
        logits.append(pipe.prefill(batch, feats, c, pipe._extra_inputs(batch)))
    assert np.abs(logits[0] - logits[1]).max() <= 1e-3
