"""Run graph passes in order and report `{pass_name: count}`.

    counts = run_passes("out/llava/decoder.onnx", [AssignNodeNames(), ClvaPass(l_pos=14)])
    counts = run_passes(model, [...])          # an onnx_ir.Model, changed in place

A path is loaded with onnx-ir, transformed, and written back atomically (a temporary file beside it, then a
rename; external weights are rewritten the same way by onnx-ir). An artifact folder is not accepted here: use
`graph_passes.bake.bake`, which also updates the manifest (mitigation records, pass counts, file hashes).
Nothing here imports torch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import onnx_ir as ir

from graph_passes.base import GraphPass, PassError


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
    """Run `passes` on a model (in place) or an .onnx file (rewritten atomically). -> {pass_name: count}."""
    if isinstance(target, ir.Model):
        return run_on_model(target, passes)
    path = Path(target)
    if path.is_dir():
        raise PassError(f"'{path}' is a folder; use `anchorrt bake` / graph_passes.bake.bake for artifact folders")
    if not path.is_file():
        raise PassError(f"ONNX file '{path}' does not exist")
    model = ir.load(path)
    counts = run_on_model(model, passes)
    if any(counts.values()):
        save_model(model, path, has_external_data(path))
    return counts
