"""Debug outputs for `anchorrt explain`: every layer's attention of the pass's T rows, as one graph output.

The pictures of `anchorrt explain` (the CLVA paper's Figures 1-2, METHODS.md section CLVA) need, per layer and
head, the attention of the pass's T rows (Phi, eq. 1) and of its last row (the maps M, eq. 4) over the image keys.
This pass exposes exactly those rows; everything else (Phi, head sets, maps, entropy, correlations) is computed
from them in numpy by runtime/explain/, so the numbers in explain.json never come from the CLVA pass's own subgraph.

    attention_mask, visual_mask, inputs_embeds ─► regions (graph_passes/regions.py) ─► last_image [B,1]
    rows_from = clamp(min_b last_image + 1 - past_len, 0, S-1)  [1]      (the batch's first T row of this pass)
    per layer l:  attention_rows(site_l, rows_from)  [B,H,R,K] ─Unsqueeze(1)─► [B,1,H,R,K] ──┐
                                                                                              ▼
                                                       Concat(layers, axis=1) ─► explain.attention [B,L,H,R,K] fp32

With a batch of one, R is exactly the pass's T rows (every row of a decode step); the rows need `visual_mask`,
so CLVA or SEVI must be baked first (`explained_copy` bakes CLVA into the copy when the artifact has none). No
input is added, so a Pipeline opened on the copy generates as usual. The attention is the layer's own
(graph_passes/regions.attention_rows): a CLVA bias baked before this pass is included, SEVI's last-row edit is not.
The pass is meant for a temporary copy (`explained_copy`), never for a shipped artifact: R·K per layer and head is
more than a production decoder should write.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir
from anchorrt.graph_passes.attention_match import match_attention
from anchorrt.graph_passes.base import Builder, GraphPass, PassError, graph_input
from anchorrt.graph_passes.regions import FLOAT, attention_rows, build_regions
from anchorrt.graph_passes.shapes import annotate_missing

ATTENTION = "explain.attention"


class ExplainPass(GraphPass):
    """Expose every layer's attention of the T rows as `explain.attention`; count = layers exposed."""

    name = "explain"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        sites = match_attention(graph)
        if not sites:
            self.count = 0
            return ir.passes.PassResult(model, modified=False)
        if any(v.name == ATTENTION for v in graph.outputs):
            raise PassError("the explain outputs are already baked into this decoder")
        visual_mask = graph_input(graph, "visual_mask")
        attention_mask = graph_input(graph, "attention_mask")
        inputs_embeds = graph_input(graph, "inputs_embeds")
        if visual_mask is None or attention_mask is None or inputs_embeds is None:
            raise PassError("the decoder has no visual_mask input; bake CLVA or SEVI before the explain outputs")

        b = Builder("model/explain", taken={n.name for n in graph.all_nodes()})
        r = build_regions(b, attention_mask, visual_mask, inputs_embeds)
        one, zero = b.const(np.int64(1), "one"), b.const(np.int64(0), "zero")
        first = b.op("Sub", [b.op("Add", [b.op("ReduceMin", [r.last_image], "first_t_row", keepdims=0), one],
                                  "first_t_row"), b.op("Sub", [r.total_len, r.seq_len], "past_len")], "first_t_row")
        first = b.op("Min", [b.op("Max", [first, zero], "first_t_row"), b.op("Sub", [r.seq_len, one], "last_row")],
                     "first_t_row")
        rows_from = b.op("Unsqueeze", [first, b.const(np.array([0], np.int64), "axes_0")], "rows_from")  # [1]
        layer_axis = b.const(np.array([1], np.int64), "layer_axis")
        per_layer = []
        for site in sites:
            lb = b.child(f"layers.{site.layer}", same_graph=True)
            probs = attention_rows(lb, site, rows_from, "rows")  # [B, H, R, K]
            per_layer.append(lb.op("Unsqueeze", [probs, layer_axis], "layer"))  # [B, 1, H, R, K]
        stacked = b.op("Concat", per_layer, "layers", axis=1) if len(per_layer) > 1 else per_layer[0]
        graph.extend(b.nodes)
        ident = ir.Node("", "Identity", [stacked], name=f"/debug/{ATTENTION}/Identity")
        out = ident.outputs[0]
        out.name, out.dtype = ATTENTION, FLOAT
        out.shape = ir.Shape(["batch", len(sites), sites[0].query_heads(), "rows", "total_length"])
        graph.append(ident)
        graph.outputs.append(out)
        graph.sort()
        self.count = len(sites)
        annotate_missing(model)  # every value this pass created gets a type and shape (graph_passes/shapes.py)
        return ir.passes.PassResult(model, modified=True)


def explained_copy(artifact_dir: str | os.PathLike, clva_options=None, verify: bool = True) -> Path:
    """A temporary copy of an artifact folder whose decoder also has `explain.attention` (and CLVA, baked here with
    `clva_options` (a BakeOptions) when the artifact has none). -> the copy's folder; the caller removes it
    (shutil.rmtree). The original folder is only read. The decoder is written anew with its weights (as `bake`
    does): for a 7B fp32 export that is its full size on disk for the duration of the run."""
    from anchorrt.graph_passes.bake import _passes, transform_into
    from anchorrt.runtime.manifest import Manifest, write_manifest

    folder = Path(artifact_dir)
    manifest = Manifest.load(folder, verify=verify)
    data = dict(manifest.data)
    if (data.get("precision") or {}).get("activations", "fp32") != "fp32":
        raise PassError(f"'{folder}' has {data['precision']['activations']} activations; explain reads fp32 "
                        "attention: run it on the fp32 export (before --precision fp16)")
    passes = _passes(["clva"], clva_options) if clva_options is not None and "clva" not in (data.get("mitigation") or {}) \
        else []
    passes.append(ExplainPass())
    decoder = data["graphs"]["decoder"]
    skip = {decoder["file"], decoder.get("external_data"), "manifest.json"}
    try:  # beside the artifact, so that the unchanged graphs are hard links, not copies
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.explain-", dir=folder.resolve().parent))
    except OSError:  # a read-only parent folder
        tmp = Path(tempfile.mkdtemp(prefix=".anchorrt-explain-"))
    try:
        for p in sorted(folder.iterdir()):
            if p.is_file() and not p.name.startswith(".") and p.name not in skip:
                try:
                    os.link(p, tmp / p.name)
                except OSError:
                    shutil.copy2(p, tmp / p.name)
        transform_into(tmp, data, passes, source=folder, require_match=True)
        if not passes[-1].count:
            raise PassError(f"no decoder layer's attention matched in '{folder}'; explain cannot read attention")
        write_manifest(tmp, data)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp
