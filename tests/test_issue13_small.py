"""Issue 13 item 11, the small defects: export's progress reaches [5/5]; a missing package is named with the extra
that provides it (a [bake,cpu] install running the torch-free `bake` was told to install [export]); `verify`'s
FAIL line comes once, without transformers' FutureWarnings; the README's flags-off claim says what fp16 does.
(`export --help` listing probe is checked in tests/test_export_precheck.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from tests.conftest import ROOT, run_cli


def test_export_progress_reaches_five_of_five(tiny_artifact):
    from tests.conftest import EXPORT_PROGRESS

    steps = [line.split("]")[0] + "]" for line in EXPORT_PROGRESS if line.startswith("[")]
    assert steps == [f"[{i}/5]" for i in range(1, 6)], EXPORT_PROGRESS
    assert EXPORT_PROGRESS[-2].startswith("[5/5] finishing: node names") and "manifest" in EXPORT_PROGRESS[-2]


def _run_without(modules: tuple[str, ...], tmp_path, *args: str) -> subprocess.CompletedProcess:
    """`python -m anchorrt ARGS` where importing any of `modules` raises ModuleNotFoundError, as in an install
    without them."""
    block = tmp_path / "block"
    block.mkdir(exist_ok=True)
    (block / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import sys
        class _Missing:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {modules!r}:
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        sys.meta_path.insert(0, _Missing())
    """))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(block), str(ROOT)]))
    return subprocess.run([sys.executable, "-m", "anchorrt", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_missing_package_names_its_own_extra(tiny_artifact, tmp_path):
    proc = _run_without(("onnx_ir",), tmp_path, "bake", str(tiny_artifact), "--mitigation", "probe")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "error: onnx_ir is not installed; this command needs `pip install anchorrt[bake]`"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    proc = _run_without(("onnxruntime",), tmp_path, "generate", str(tiny_artifact), "--image", str(tmp_path / "x.png"),
                        "--prompt", "hi")
    assert proc.returncode == 2 and "onnxruntime is not installed" in proc.stderr and "anchorrt[cpu]" in proc.stderr
    assert "[export]" not in proc.stderr


def test_verify_fail_line_once_without_warnings(tiny_artifact, tiny_model):
    # tolerance 0: the fp32 export differs from PyTorch by ~1e-6, so this is a FAIL
    proc = run_cli("verify", str(tiny_artifact), "--model", str(tiny_model), "--atol", "0", "--steps", "1")
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: exported graphs differ") and lines[0].endswith("FAIL"), \
        proc.stderr
    assert "Warning" not in proc.stderr and "deprecated" not in proc.stderr


def test_readme_flags_off_claim_names_fp16():
    text = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    claim = text[text.index("With every flag off a baked graph gives exactly"):][:700]
    assert "fp32, int8 and int4" in claim and "fp16 artifacts are the exception" in claim and "2e-3" in claim
