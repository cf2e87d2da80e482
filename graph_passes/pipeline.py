"""Run graph passes in order and report `{pass_name: count}`.

    counts = run_passes("out/llava", [AssignNodeNames(), ClvaPass(l_pos=14)])   # an artifact folder's decoder
    counts = run_passes("model/decoder.onnx", [...])   # one ONNX file
    counts = run_passes(model, [...])                  # an onnx_ir.Model, changed in place

An artifact folder is transformed atomically (graph_passes/bake.py: a hidden copy, then a rename) and its manifest
updated: decoder inputs/outputs, the pass counts, a mitigation record per CLVA/SEVI pass, fresh sha256 hashes. A
file is loaded with onnx-ir, transformed, and written back atomically (a temporary file beside it, then a rename;
external weights are rewritten the same way by onnx-ir). `anchorrt.graph_passes.bake.bake` is the user-facing way to add
methods (it validates names, refuses a second bake, and fails when a method matches nothing). No torch here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import onnx_ir as ir
from anchorrt.graph_passes.base import GraphPass, PassError


def run_on_model(model: ir.Model, passes: Sequence[GraphPass]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for p in passes:
        if p.name in counts:
            raise PassError(f"pass '{p.name}' appears twice in one pipeline")
        p(model)
        counts[p.name] = p.count
    return counts


def save_model(model: ir.Model, path: Path, external_data: str | None) -> None:
    """Write `path` atomically; weights go to `external_data` (a file name beside it) when given."""
    tmp = path.with_name(f".{path.name}.partial")
    try:
        ir.save(model, tmp, external_data=external_data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def has_external_data(path: Path) -> str | None:
    data = path.with_name(path.name + ".data")
    return data.name if data.exists() else None


def run_passes(target: ir.Model | str | os.PathLike, passes: Sequence[GraphPass]) -> dict[str, int]:
    """Run `passes` on a model (in place), an artifact folder's decoder or an .onnx file. -> {pass_name: count}."""
    if isinstance(target, ir.Model):
        return run_on_model(target, passes)
    path = Path(target)
    if path.is_dir():
        from anchorrt.graph_passes.bake import transform_artifact

        return transform_artifact(path, passes)[1]
    if not path.is_file():
        raise PassError(f"ONNX file '{path}' does not exist")
    model = ir.load(path)
    counts = run_on_model(model, passes)
    if any(counts.values()):
        save_model(model, path, has_external_data(path))
    return counts
