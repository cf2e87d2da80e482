"""Shared fixtures: tiny random-weight LLaVA checkpoints built in code and their exported artifact folders.

Built once per test session (export is the slow part: ~25 s a model on 2 cores).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from anchorrt.exporter.testing import TinyLlavaSpec, build_tiny_llava

ROOT = Path(__file__).resolve().parents[1]
BLOCK_TORCH = Path(__file__).resolve().parent / "block_torch"


# Property-based tests draw the same examples on every run (CI stays deterministic: a red run is a code change, not
# luck); ANCHORRT_FUZZ_RANDOM=1 explores new examples, and whatever it finds becomes a regression test
# (tests/test_fuzz.py::test_regression_inputs_found_by_fuzzing).
try:
    from hypothesis import settings as _hypothesis_settings

    _hypothesis_settings.register_profile("fixed", derandomize=True, database=None)
    _hypothesis_settings.register_profile("explore", derandomize=False)
    _hypothesis_settings.load_profile("explore" if os.environ.get("ANCHORRT_FUZZ_RANDOM") == "1" else "fixed")
except ImportError:  # hypothesis is in the dev extra; without it only test_fuzz.py fails to import
    pass


def pytest_collection_modifyitems(config, items):
    try:
        import onnxruntime as ort

        has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="no NVIDIA GPU / onnxruntime-gpu CUDA provider on this machine")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """8 layers, 8 heads (MHA), 16 image tokens."""
    return build_tiny_llava(tmp_path_factory.mktemp("models") / "tiny-llava", TinyLlavaSpec())


@pytest.fixture(scope="session")
def gqa_model(tmp_path_factory) -> Path:
    """Grouped-query attention: 8 query heads over 2 key/value heads; CLIP "full" feature strategy (CLS kept)."""
    spec = TinyLlavaSpec(kv_heads=2, seed=1, vision_feature_select_strategy="full", vision_feature_layer=-1)
    return build_tiny_llava(tmp_path_factory.mktemp("models") / "tiny-llava-gqa", spec)


EXPORT_PROGRESS: list[str] = []  # the progress lines of the tiny_artifact export (tests of the export's output)


@pytest.fixture(scope="session")
def tiny_artifact(tiny_model, tmp_path_factory) -> Path:
    from anchorrt.exporter.export import export_model

    out = tmp_path_factory.mktemp("artifacts") / "tiny"
    export_model(tiny_model, out, progress=EXPORT_PROGRESS.append)
    return out


@pytest.fixture(scope="session")
def unfused_artifact(tiny_model, tmp_path_factory) -> Path:
    """tiny_model exported with --attention unfused (the opset-18 MatMul/Softmax form; the default is fused)."""
    from anchorrt.exporter.export import export_model

    out = tmp_path_factory.mktemp("artifacts") / "tiny-unfused"
    export_model(tiny_model, out, attention="unfused")
    return out


@pytest.fixture(scope="session")
def baked_artifact(tiny_artifact, tmp_path_factory) -> Path:
    """tiny_artifact with CLVA, SEVI (start_layer 2, so the 8-layer model changes) and the IAVA probe baked in.
    Read-only for the tests that share it."""
    import shutil

    from anchorrt.graph_passes.bake import BakeOptions, bake

    out = tmp_path_factory.mktemp("artifacts") / "baked"
    shutil.copytree(tiny_artifact, out)
    bake(out, "clva,sevi,probe", BakeOptions(sevi_start_layer=2))
    return out


@pytest.fixture(scope="session")
def baked_unfused_artifact(unfused_artifact, tmp_path_factory) -> Path:
    """baked_artifact's methods on the unfused form (TensorRT's checks: the fused op is ONNX Runtime's own)."""
    import shutil

    from anchorrt.graph_passes.bake import BakeOptions, bake

    out = tmp_path_factory.mktemp("artifacts") / "baked-unfused"
    shutil.copytree(unfused_artifact, out)
    bake(out, "clva,sevi,probe", BakeOptions(sevi_start_layer=2))
    return out


@pytest.fixture(scope="session")
def gqa_artifact(gqa_model, tmp_path_factory) -> Path:
    from anchorrt.exporter.export import export_model

    out = tmp_path_factory.mktemp("artifacts") / "gqa-opset23"
    export_model(gqa_model, out, opset=23)
    return out


@pytest.fixture(scope="session")
def head16_model(tmp_path_factory) -> Path:
    """tiny_model's shape with 4 heads of 16: a head size onnxruntime's GroupQueryAttention rotates itself, so the
    export packs q/k/v into it (graph_passes/pack_qkv.py); the default tiny model's 8 stays unpacked."""
    return build_tiny_llava(tmp_path_factory.mktemp("models") / "tiny-llava-head16", TinyLlavaSpec(heads=4, kv_heads=4,
                                                                                                  seed=3))


@pytest.fixture(scope="session")
def head16_artifact(head16_model, tmp_path_factory) -> Path:
    from anchorrt.exporter.export import export_model

    out = tmp_path_factory.mktemp("artifacts") / "head16"
    export_model(head16_model, out)
    return out


@pytest.fixture(scope="session")
def interleave_model(tmp_path_factory) -> Path:
    """LLaVA-Interleave-shaped (llava-hf/llava-interleave-qwen-0.5b-hf): Qwen2 with q/k/v bias and tied embeddings,
    SigLIP tower, no pad_token_id; 6 layers (CLVA's l_pos = 1 differs from l_neg = 0), 4 heads over 2 KV heads."""
    from anchorrt.exporter.testing import TinyInterleaveSpec, build_tiny_llava_interleave

    return build_tiny_llava_interleave(tmp_path_factory.mktemp("models") / "tiny-interleave", TinyInterleaveSpec())


@pytest.fixture(scope="session")
def interleave_artifact(interleave_model, tmp_path_factory) -> Path:
    from anchorrt.exporter.export import export_model

    out = tmp_path_factory.mktemp("artifacts") / "interleave"
    export_model(interleave_model, out)
    return out


@pytest.fixture(scope="session")
def images():
    """Deterministic test images of different sizes and modes."""
    from PIL import Image

    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, (64, 30, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, (33, 33, 4), dtype=np.uint8), "RGBA"),
    ]


def run_cli(*args: str, block_torch: bool = False, cwd: Path | None = None, env: dict | None = None,
            timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python -m anchorrt ...` in a subprocess (optionally with torch made unimportable)."""
    e = dict(os.environ)
    path = [str(ROOT)]
    if block_torch:
        path.insert(0, str(BLOCK_TORCH))
    e["PYTHONPATH"] = os.pathsep.join(path + ([e["PYTHONPATH"]] if e.get("PYTHONPATH") else []))
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "anchorrt", *args], capture_output=True, text=True, cwd=cwd, env=e,
                          timeout=timeout)


@pytest.fixture(scope="session")
def tiny_instructblip(tmp_path_factory) -> Path:
    """InstructBLIP-Vicuna-shaped: EVA ViT (17 image tokens), 4-layer Q-Former (cross-attention in 0 and 2),
    32 random query tokens, 8-layer Llama."""
    from anchorrt.exporter.testing import build_tiny_instructblip

    return build_tiny_instructblip(tmp_path_factory.mktemp("models") / "tiny-instructblip")


@pytest.fixture(scope="session")
def instructblip_artifact(tiny_instructblip, tmp_path_factory) -> Path:
    """The one InstructBLIP export the tests share (read-only)."""
    from anchorrt.exporter.export import export_model

    out = tmp_path_factory.mktemp("artifacts") / "instructblip"
    export_model(tiny_instructblip, out)
    return out


@pytest.fixture(scope="session")
def instructblip_baked(instructblip_artifact, tmp_path_factory) -> Path:
    """instructblip_artifact with CLVA (in the Q-Former), SEVI (start_layer 2) and the IAVA probe baked in."""
    import shutil

    from anchorrt.graph_passes.bake import BakeOptions, bake

    out = tmp_path_factory.mktemp("artifacts") / "instructblip-baked"
    shutil.copytree(instructblip_artifact, out)
    bake(out, "clva,sevi,probe", BakeOptions(sevi_start_layer=2))
    return out
