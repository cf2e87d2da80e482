"""scripts/bench_gpu.py (issue 6's GPU measurements) keeps working between GPU sessions: a CPU smoke run of the tiny
shape through every code path but nvidia-smi (export + bake + fp16/int4 conversion, timings, mitigation ratios,
roofline with a given bandwidth, the PyTorch eager comparison), and its pure helpers. The figures themselves mean
nothing on a CPU and are not checked beyond being finite and positive."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

from tests.conftest import ROOT


def _script():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "scripts" / "bench_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bandwidth_table_and_weight_bytes(tiny_artifact):
    mod = _script()
    assert mod.bandwidth_for("NVIDIA H200") == 4800 and mod.bandwidth_for("NVIDIA H100 80GB HBM3") == 3350
    assert mod.bandwidth_for("NVIDIA H100 PCIe") == 2000 and mod.bandwidth_for("Some GPU") is None
    files = sum(p.stat().st_size for p in tiny_artifact.glob("decoder.onnx*"))
    assert 0.5 * files < mod.decoder_weight_bytes(tiny_artifact) <= files  # weights are most of the decoder file
    assert mod.SHAPES["llava7b"]["layers"] == 32 and mod.SHAPES["llava7b"]["hidden"] == 4096


def test_cpu_smoke_run(tmp_path):
    out = tmp_path / "r.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_gpu.py"), "--shape", "tiny", "--device", "cpu",
           "--precision", "fp16", "--quantize", "int4", "--batches", "1,2", "--new-tokens", "3", "--reps", "1",
           "--bandwidth-gbs", "20", "--torch-eager", "--keep", str(tmp_path / "m"), "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["provider"] == "CPUExecutionProvider" and data["peak_mib"] is None
    assert [r["batch"] for r in data["runtime"]] == [1, 2] == [r["batch"] for r in data["torch_eager"]]
    for r in data["runtime"]:
        for key in ("ttft_s", "step_s", "tokens_per_s", "mitigation_step_ratio", "flags_off_vs_plain_step_ratio",
                    "roofline_fraction"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
    assert "| 2 |" in proc.stdout and "fp16 + int4" in proc.stdout and "flags off / plain" in proc.stdout
    plain = json.loads((tmp_path / "m" / "tiny-plain-fp32" / "manifest.json").read_text())
    assert not plain.get("mitigation")  # the comparison export has nothing baked
