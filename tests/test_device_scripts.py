"""scripts/device: what the GPU machine runs (checks.sh, prebuild.py) is checked here on the CPU first, where a
broken script costs minutes instead of the session's device time (prebuild.py once resolved the repository one
folder too high and could not have loaded bench_peers on the device)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _prebuild():
    spec = importlib.util.spec_from_file_location("prebuild", ROOT / "scripts" / "device" / "prebuild.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # builds nothing: main() runs only as a script
    return module


def test_checks_sh_times_the_folders_prebuild_fills():
    prebuild = _prebuild()
    assert prebuild.ROOT == ROOT
    checks = (ROOT / "scripts" / "device" / "checks.sh").read_text()
    assert "python3 scripts/device/prebuild.py" in checks
    folders = set(re.findall(r"--folder (\S+)", checks))
    keeps = set(re.findall(r"--keep (\S+)", checks))
    assert folders == {str(prebuild.BENCH_PEERS_FOLDER)} and keeps == {str(prebuild.BENCH_GPU_FOLDER)}
    assert set(re.findall(r"--shape (\S+)", checks)) == {"bench"}


def test_prebuild_builds_every_model_the_device_checks_load(tiny_model, tmp_path):
    """The tiny twin of what prebuild builds on the device: bench_peers' fp16 / int4-with-fp16-activations forms,
    the baked fp16 artifact of the CUDA mitigation rows, the language model, and bench_gpu's four artifacts."""
    bp, bg = tmp_path / "bp", tmp_path / "bg"
    _prebuild().main(bp, bg, model=tiny_model, tiny=True)
    start = json.loads((tiny_model / "config.json").read_text())["text_config"]["num_hidden_layers"] // 4
    for name in ("anchorrt-fused-fp16", "anchorrt-fused-int4-fp16", "anchorrt-unfused-fp16",
                 "anchorrt-unfused-int4-fp16", f"anchorrt-baked-fp16-sevi{start}"):
        assert (bp / name / "manifest.json").exists(), name
    assert (bp / "llama" / "config.json").exists()
    for name in ("tiny-fp16", "tiny-fp16-int4", "tiny-plain-fp16", "tiny-plain-fp16-int4"):
        assert (bg / name / "manifest.json").exists()
    baked = json.loads((bp / f"anchorrt-baked-fp16-sevi{start}" / "manifest.json").read_text())
    assert set(baked["mitigation"]) >= {"clva", "sevi", "probe"}
