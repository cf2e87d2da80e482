"""scripts/bench_peers.py runs end to end on a tiny model (AnchorRT fused and unfused, no peers): CI's smoke test."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("bench_peers", ROOT / "scripts" / "bench_peers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_peers_quick_tiny(tiny_model, unfused_artifact, tmp_path, capsys):
    bench = _load()
    out = tmp_path / "result.json"
    result = bench.main(["--tiny", "--quick", "--model", str(tiny_model), "--unfused-artifact", str(unfused_artifact),
                         "--folder", str(tmp_path / "work"), "--engines", "anchorrt-fused,anchorrt-unfused",
                         "--precisions", "fp32", "--contexts", "40", "--steps", "3", "--threads", "1",
                         "--json", str(out)])
    printed = capsys.readouterr().out
    assert set(result["step_s"]) == {"anchorrt-fused fp32", "anchorrt-unfused fp32"}
    for by_ctx in result["step_s"].values():
        assert by_ctx[40] > 0
    assert "| anchorrt-fused fp32 | " in printed and "(1.00x" in printed and "of bound" in printed
    assert json.loads(out.read_text())["contexts"] == [40]
    fused = json.loads((tmp_path / "work" / "anchorrt-fused-fp32" / "manifest.json").read_text())
    assert fused["attention"]["form"] == "gqa"


def test_step_bytes_counts_weights_and_cache():
    bench = _load()
    spec = dict(hidden=8, intermediate=16, layers=2, heads=2, kv_heads=1)
    kv = 1 * 4  # kv heads * head_dim
    weights = 2 * (8 * 8 * 2 + 8 * kv * 2 + 3 * 8 * 16) + 8 * 10
    assert bench.step_bytes(spec, 10, 5, "fp32") == weights * 4 + 5 * 8 * 4 + 2 * 2 * kv * 5 * 4
    assert bench.step_bytes(spec, 10, 0, "int4") < bench.step_bytes(spec, 10, 0, "fp32") / 5


def test_device_cuda_needs_onnxruntime_gpu_and_fp16_precisions(capsys):
    """--device cuda takes fp16/int4 (the fused form's CUDA attention is fp16-only) and, where onnxruntime has no
    CUDA provider (CI), stops at once with a usage error naming onnxruntime-gpu; nothing is built."""
    import onnxruntime as ort
    import pytest

    bench = _load()
    with pytest.raises(SystemExit) as e:
        bench.main(["--device", "cuda", "--precisions", "fp32", "--tiny", "--quick"])
    assert e.value.code == 2 and "fp16 and/or int4 with --device cuda" in capsys.readouterr().err
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(SystemExit) as e:
            bench.main(["--device", "cuda", "--precisions", "fp16", "--tiny", "--quick"])
        assert e.value.code == 2 and "onnxruntime-gpu" in capsys.readouterr().err
    assert bench.step_bytes(dict(hidden=8, intermediate=16, layers=2, heads=2, kv_heads=1), 10, 3, "fp16", 2) < \
        bench.step_bytes(dict(hidden=8, intermediate=16, layers=2, heads=2, kv_heads=1), 10, 3, "fp32", 4)
