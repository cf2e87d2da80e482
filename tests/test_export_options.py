"""Export options that the default fixture does not exercise: external-data files, and re-export over a folder."""

from __future__ import annotations

import anchorrt.exporter.export as export_mod
import pytest
from anchorrt.runtime.manifest import Manifest
from anchorrt.runtime.pipeline import Pipeline


def test_external_data_artifact_runs(tiny_model, tiny_artifact, images, tmp_path, monkeypatch):
    """Models over the 2 GB protobuf limit get `<graph>.onnx.data`; force that path on the tiny model."""
    monkeypatch.setattr(export_mod, "EXTERNAL_DATA_THRESHOLD", 0)
    out = tmp_path / "ext"
    export_mod.export_model(tiny_model, out)
    m = Manifest.load(out)
    for role in ("vision", "embed", "decoder"):
        ext = m.graph(role).get("external_data")
        assert ext and (out / ext).stat().st_size > 0 and ext in m.data["files"]
    inline = (tiny_artifact / "decoder.onnx").stat().st_size
    weights = (out / "decoder.onnx.data").stat().st_size
    assert weights > 1_000_000 and (out / "decoder.onnx").stat().st_size < inline - weights // 2  # weights moved out
    got = Pipeline.from_dir(out).generate(images[0], "What is in the image?", max_new_tokens=8).token_ids
    want = Pipeline.from_dir(tiny_artifact).generate(images[0], "What is in the image?", max_new_tokens=8).token_ids
    assert got == want


def test_force_replaces_atomically(tiny_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    export_mod.export_model(tiny_model, out, force=True)
    assert not (out / "old.txt").exists() and (out / "manifest.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no backup or temporary folder left


def test_bad_options(tiny_model, tmp_path):
    from anchorrt.runtime.errors import AnchorError

    with pytest.raises(AnchorError, match="opset 17 is not supported"):
        export_mod.export_model(tiny_model, tmp_path / "o", opset=17)
    with pytest.raises(AnchorError, match="export dtype 'int8'"):
        export_mod.export_model(tiny_model, tmp_path / "o", dtype="int8")
    assert not (tmp_path / "o").exists()
