"""Issue 21 item 3: `anchorrt --version`, the version recorded in the manifest, and a clear refusal of a manifest
whose format is newer than this runtime reads."""

from __future__ import annotations

import json
import shutil

import pytest
from anchorrt.runtime.errors import ArtifactError
from anchorrt.runtime.manifest import FORMAT_VERSION, Manifest

from anchorrt import __version__
from tests.conftest import run_cli


def test_cli_version():
    proc = run_cli("--version")
    assert proc.returncode == 0 and __version__ in proc.stdout


def test_manifest_records_the_anchorrt_version(tiny_artifact):
    data = json.loads((tiny_artifact / "manifest.json").read_text())
    assert data["versions"]["anchorrt"] == __version__


def test_newer_manifest_format_is_refused_in_one_line(tiny_artifact, tmp_path):
    folder = tmp_path / "future"
    shutil.copytree(tiny_artifact, folder)
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    data["format_version"] = FORMAT_VERSION + 1
    data["versions"]["anchorrt"] = "9.0.0"
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactError) as err:
        Manifest.load(folder, verify=False)
    msg = str(err.value)
    assert "newer than this AnchorRT reads" in msg and "9.0.0" in msg and "pip install -U anchorrt" in msg
    assert "\n" not in msg
    proc = run_cli("generate", str(folder), "--image", "x.png", "--prompt", "hi", "--no-verify")
    assert proc.returncode != 0 and "newer than this AnchorRT reads" in proc.stderr
    assert "Traceback" not in proc.stderr
