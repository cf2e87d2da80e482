"""Attention probe for IAVA (METHODS.md "IAVA" step 1): the last query row's attention over the keys, mean over
heads, for a set of layers fixed at bake time, as a decoder output behind the run-time input `probe.enable`.

    probe.enable [B] ─Cast─ReduceMax─Cast─► any_on ─► If ─┬─ then: per probed layer l
                                                          │     opset 18: probs_l [B,H,S,K] ─Slice(last row)─► [B,H,1,K]
                                                          │     opset 23: q_l[:, :, -1:] kᵀ·scale + mask_l[last row]
                                                          │               ─Softmax─► [B,H,1,K]
                                                          │   ─ReduceMean(heads)─► [B,1,K] ─Concat(layers)─► [B,L,K]
                                                          │   ─Where(enable, ·, 0)
                                                          └─ else: zeros [B,L,K]
    → output `probe.attention` [batch, probe_layers, total_length] float32

With every row off, the If runs its `else` branch: one ConstantOfShape, so the probe costs (almost) nothing in
decode steps. The probabilities are the layer's own, with its effective mask (a CLVA bias baked before the probe
included); SEVI's last-row edit is not seen (the probe reads the layer's softmax, which SEVI leaves in place and
re-does for the last row). The runtime averages over the probed layers and restricts to the image keys.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from anchorrt.graph_passes.attention_match import match_attention
from anchorrt.graph_passes.base import Builder, GraphPass, PassError, add_graph_input, graph_input
from anchorrt.graph_passes.regions import BOOL, FLOAT, attention_rows
from anchorrt.graph_passes.shapes import annotate_missing

INT32 = ir.DataType.INT32
PROBE_ENABLE = "probe.enable"
PROBE_OUTPUT = "probe.attention"


def resolve_probe_layers(num_layers: int, layers: list[int] | tuple[int, ...] | None) -> list[int]:
    if layers is None:
        return list(range(num_layers))
    chosen = sorted(set(int(x) for x in layers))
    if not chosen or chosen[0] < 0 or chosen[-1] >= num_layers:
        raise PassError(f"probe layers {list(layers)} are not within 0..{num_layers - 1}")
    return chosen


class ProbePass(GraphPass):
    name = "probe"

    def __init__(self, layers: list[int] | tuple[int, ...] | None = None):
        super().__init__()
        self.requested = layers
        self.layers: list[int] = []
        self.form = ""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        sites = match_attention(graph)
        if not sites:
            self.count = 0
            return ir.passes.PassResult(model, modified=False)
        if graph_input(graph, PROBE_ENABLE) is not None:
            raise PassError("the attention probe is already baked into this decoder")
        self.layers = resolve_probe_layers(len(sites), self.requested)
        self.form = sites[0].form
        attention_mask = graph_input(graph, "attention_mask")
        if attention_mask is None:
            raise PassError("the decoder has no attention_mask input; not an AnchorRT decoder graph")
        enable = add_graph_input(graph, PROBE_ENABLE, BOOL, ["batch"])

        b = Builder("model/probe", taken={n.name for n in graph.all_nodes()})
        any_on = b.op("Cast", [b.op("ReduceMax", [b.op("Cast", [enable], "enabled", to=INT32)], "enabled", keepdims=0)],
                      "enabled", to=BOOL)
        then = b.child("on")
        heads_axis = then.const(np.array([1], np.int64), "heads_axis")
        rows = []
        for layer in self.layers:
            site = sites[layer]
            lb = then.child(f"layers.{layer}", same_graph=True)
            probs = attention_rows(lb, site, -1, "last")  # [B, H, 1, K]
            rows.append(lb.op("ReduceMean", [lb.op("Squeeze", [probs, lb.const(np.array([2], np.int64), "row_axis")],
                                                    "last_row"), heads_axis], "head_mean", keepdims=1))  # [B, 1, K]
        stacked = then.op("Concat", rows, "layers", axis=1) if len(rows) > 1 else rows[0]  # [B, L, K]
        on_rows = then.op("Unsqueeze", [enable, then.const(np.array([1, 2], np.int64), "row_axes")], "on_rows")
        then_out = then.op("Where", [on_rows, stacked, then.const(np.float32(0.0), "zero")], "attention", dtype=FLOAT)

        otherwise = b.child("off")
        batch = otherwise.op("Gather", [otherwise.op("Shape", [attention_mask], "shape"),
                                        otherwise.const(np.array([0], np.int64), "batch_index")], "batch", axis=0)
        total = otherwise.op("Gather", [otherwise.op("Shape", [attention_mask], "shape"),
                                        otherwise.const(np.array([1], np.int64), "total_index")], "total", axis=0)
        shape = otherwise.op("Concat", [batch, otherwise.const(np.array([len(self.layers)], np.int64), "layers"), total],
                             "shape", axis=0)
        else_out = otherwise.op("ConstantOfShape", [shape], "zeros", value=ir.tensor(np.array([0.0], np.float32)),
                                dtype=FLOAT)
        (out,) = b.if_node(any_on, [then_out], then.nodes, [else_out], otherwise.nodes, "attention", [FLOAT])
        graph.extend(b.nodes)
        ident = ir.Node("", "Identity", [out], name=f"/model/probe/{PROBE_OUTPUT}/Identity")
        ident.outputs[0].name = PROBE_OUTPUT
        ident.outputs[0].dtype = FLOAT
        ident.outputs[0].shape = ir.Shape(["batch", len(self.layers), "total_length"])
        graph.append(ident)
        graph.outputs.append(ident.outputs[0])
        self.count = len(self.layers)
        annotate_missing(model)  # every value this pass created gets a type and shape
        return ir.passes.PassResult(model, modified=True)

    def record(self) -> dict:
        return {
            "version": 1,
            "paper": "papers/iava-instruction-aligned-visual-attention.txt (arXiv 2503.18556)",
            "semantics": "METHODS.md section IAVA, step 1 (the probe only; selection and contrastive decoding run in "
                         "the runtime)",
            "form": self.form,
            "layers": self.layers,
            "pass_count": self.count,
            "inputs": {PROBE_ENABLE: {"dtype": "bool", "shape": ["batch"], "default": False,
                                      "meaning": "rows whose probe output is computed (others get zeros)"}},
            "outputs": {PROBE_OUTPUT: {"dtype": "float32", "shape": ["batch", len(self.layers), "total_length"],
                                       "meaning": "last query row's attention over all keys, mean over heads, "
                                                  "one row per probed layer"}},
        }
