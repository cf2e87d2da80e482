"""Issue 21: the wheel installs one import namespace (`anchorrt`), the runtime-only install (`anchorrt[cpu]`) has
no torch and imports nothing from the exporter or the graph passes, and the embedding sample runs from a folder
outside the repository against the installed package (not the checkout's folders).

Builds the wheel and installs it with its runtime dependencies into a fresh virtual environment from the package
index (about a minute on a fresh machine; pip's cache makes later runs faster)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


def _run(cmd: list, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=900, **kw)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with the built wheel installed as `anchorrt[cpu]`; returns its python."""
    tmp = tmp_path_factory.mktemp("packaging")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp / "dist", ROOT])
    wheel = next((tmp / "dist").glob("anchorrt-*.whl"))
    _run([sys.executable, "-m", "venv", tmp / "venv"])
    py = tmp / "venv" / "bin" / "python"
    _run([py, "-m", "pip", "install", "-q", f"{wheel}[cpu]"])
    return py


def _outside(py: Path, code: str, tmp_path: Path, **env) -> str:
    """Run `code` with the installed interpreter from a folder outside the repository, with a clean PYTHONPATH."""
    e = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return _run([py, "-c", code], cwd=tmp_path, env={**e, **env}).stdout


def test_wheel_installs_only_the_anchorrt_namespace(installed, tmp_path):
    out = _outside(installed, "import importlib.metadata as md, json; "
                              "print(json.dumps(md.distribution('anchorrt').read_text('top_level.txt').split()))",
                   tmp_path)
    assert json.loads(out) == ["anchorrt"]
    files = _outside(installed, "import importlib.metadata as md, json; "
                                "print(json.dumps([str(f) for f in md.distribution('anchorrt').files]))", tmp_path)
    tops = {f.split("/")[0] for f in json.loads(files) if not f.startswith(("anchorrt-", "../"))}
    assert tops == {"anchorrt"}
    for name in ("runtime", "exporter", "graph_passes"):
        proc = subprocess.run([installed, "-c", f"import {name}"], cwd=tmp_path, capture_output=True, text=True)
        assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr, name


def test_runtime_only_install_has_no_torch_and_no_exporter_imports(installed, tmp_path, tiny_artifact, images):
    image = tmp_path / "image.png"
    images[0].save(image)
    code = ("import sys, importlib.util; from anchorrt.runtime import Pipeline, Request; import anchorrt.runtime;"
            f"p = Pipeline.from_dir({str(tiny_artifact)!r});"
            f"r = p.generate_batch([Request({str(image)!r}, 'What is in the image?')], max_new_tokens=3)[0];"
            "print(len(r.token_ids));"
            "assert importlib.util.find_spec('torch') is None, 'torch installed';"
            "assert importlib.util.find_spec('transformers') is None, 'transformers installed';"
            "bad = sorted(m for m in sys.modules if m.startswith(('anchorrt.exporter', 'anchorrt.graph_passes', 'onnx_ir')));"
            "assert not bad, bad;"
            "print(anchorrt.runtime.__file__)")
    out = _outside(installed, code, tmp_path).splitlines()
    assert int(out[0]) >= 1
    assert "site-packages" in out[1] and str(ROOT) not in out[1]


def test_embedding_sample_runs_outside_the_repository(installed, tmp_path, tiny_artifact, images):
    image = tmp_path / "image.png"
    images[0].save(image)
    sample = tmp_path / "answer.py"
    shutil.copyfile(ROOT / "samples" / "01_embed_runtime" / "answer.py", sample)
    e = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    proc = _run([installed, sample, tiny_artifact, image, "What is in the image?"], cwd=tmp_path, env=e)
    assert proc.stdout.strip() or proc.stderr.strip()
    cli = _run([installed.parent / "anchorrt", "--version"], cwd=tmp_path, env=e)
    assert "anchorrt" in cli.stdout
