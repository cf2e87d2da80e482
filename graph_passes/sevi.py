"""SEVI (aligning attention to information flow, arXiv 2505.14257) baked into a decoder graph, as METHODS.md
section SEVI defines it (the semantics come from the authors' public code).

In every layer l >= start_layer (literal), on the last query row of each pass only, per batch row:

    classes from the layer's unedited attention A(last, ·):
        text head   <=> sum_{j > last image} A  >=  sum_{j <= last image} A      (equal masses: text)
        global      <=> text head and max_{j text} A <= kappa * sum_{j text} A   (else local); other heads: vision
    step 1 (a vision and a global head exist):  vision logits <- (logits + omega * mean_global logits) / (1 + omega)
    step 2 (a global and a local head exist):   global logits <- (logits + omega * max_local logits) / (1 + omega)

"logits" are the scaled q kᵀ before the mask; both steps read unedited logits (step 1 edits only vision heads,
step 2 reads only local heads, which are never edited). The mask (and CLVA's bias in a drift layer: SEVI edits
first, CLVA re-weights the result, as the reference orders them) is added after the edit, so a masked key stays
masked and -inf is never multiplied.

Graph form. The layer's attention is left as it is (opset 18: MatMul/Softmax; opset 23: the fused Attention op)
and only its last output row is recomputed when some row has SEVI on:

    sevi.enable ─► any_on ─┬─► If (shared): text_keys [B,1,1,K] = key > last image, row_on [B,1,1,1]
                           └─► If (layer l): then ─ raw [B,H,1,K] = last row of q kᵀ·scale
                                                     (opset 18: a Slice of the layer's MatMul; opset 23: k·q_lastᵀ)
                                                   ─ A = Softmax(raw + mask_last) ─f64─► classes [B,H]
                                                   ─ edited = Where(step1 & vision, e1, Where(step2 & global, e2, raw))
                                                   ─ out_last = Softmax(edited + effective_mask_last) @ v
                                                   ─ out' = Concat(out[:, :, :-1], Where(edited head, out_last, out[:, :, -1:]))
                                             else ─ out' = out
    out' replaces the layer's attention output [B,H,S,D] before the head transpose.

Unedited heads and rows keep the layer's own output values (Where), so rows with the flag off are bit-exact, and
with every row off the If returns `out` itself. The classification sums run in float64.

Inputs added: `visual_mask` [batch, total_length] bool (shared with CLVA), `sevi.enable` [batch] bool,
`sevi.omega`, `sevi.kappa` [batch] float32. Debug outputs (optional): `sevi.head_class.{l}` [batch, heads] int8
(0 vision, 1 global text, 2 local text, -1 not classified: row off or without image).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graph_passes.attention_match import ATTENTION_OP, AttentionSite, match_attention
from graph_passes.base import (
    META_LAYER,
    META_MASK_ROLE,
    NEG_INF,
    Builder,
    GraphPass,
    PassError,
    add_graph_input,
    add_graph_output,
    graph_input,
)
from graph_passes.regions import (
    BOOL,
    DOUBLE,
    FLOAT,
    build_regions,
    grouped_probs_matmul,
    recompute_logits,
    shared_float_mask,
    slice_axis,
    static_heads,
)

INT32, INT8 = ir.DataType.INT32, ir.DataType.INT8
VISION_HEAD, GLOBAL_TEXT_HEAD, LOCAL_TEXT_HEAD, NOT_CLASSIFIED = 0, 1, 2, -1
DEFAULT_START_LAYER = 8

SEVI_INPUTS = {  # name -> (dtype, meaning); defaults and valid ranges live in runtime/mitigation.py
    "sevi.enable": ("bool", "turn SEVI on for this batch row"),
    "sevi.omega": ("float32", "conservativeness of the logit edits (0 = unchanged model)"),
    "sevi.kappa": ("float32", "global/local text-head threshold"),
}


class SeviPass(GraphPass):
    """Bake SEVI; count = layers rewritten (0 and the graph unchanged if no attention matches or start_layer >= L)."""

    name = "sevi"

    def __init__(self, start_layer: int = DEFAULT_START_LAYER, debug_outputs: bool = False):
        super().__init__()
        if int(start_layer) < 0:
            raise PassError(f"SEVI start_layer must be >= 0, got {start_layer}")
        self.start_layer = int(start_layer)
        self.debug_outputs = debug_outputs
        self.layers: tuple[int, ...] = ()
        self.form: str | None = None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        sites = match_attention(graph)
        chosen = [s for s in sites if s.layer >= self.start_layer]
        self.form = sites[0].form if sites else None
        self.layers = tuple(s.layer for s in chosen)
        if not chosen:
            self.count = 0
            return ir.passes.PassResult(model, modified=False)
        if graph_input(graph, "sevi.enable") is not None:
            raise PassError("SEVI is already baked into this decoder")
        inputs_embeds = graph_input(graph, "inputs_embeds")
        attention_mask = graph_input(graph, "attention_mask")
        if inputs_embeds is None or attention_mask is None:
            raise PassError("the decoder has no inputs_embeds/attention_mask input; not an AnchorRT decoder graph")
        visual_mask = add_graph_input(graph, "visual_mask", BOOL, ["batch", "total_length"])
        enable = add_graph_input(graph, "sevi.enable", BOOL, ["batch"])
        omega = add_graph_input(graph, "sevi.omega", FLOAT, ["batch"])
        kappa = add_graph_input(graph, "sevi.kappa", FLOAT, ["batch"])

        taken = {n.name for n in graph.all_nodes()}
        b = Builder("model/sevi", taken=taken)
        any_on = b.op("Cast", [b.op("ReduceMax", [b.op("Cast", [enable], "enabled", to=INT32)], "enabled", keepdims=0)],
                      "enabled", to=BOOL)
        text_keys, row_on = _shared_regions(b, any_on, attention_mask, visual_mask, inputs_embeds, enable)
        graph.extend(b.nodes)

        for site in chosen:
            lb = Builder(f"model/layers.{site.layer}/attn/sevi", metadata={META_LAYER: str(site.layer)}, taken=taken)
            new_out, classes = _layer_edit(graph, lb, site, any_on, text_keys, row_on, omega, kappa,
                                           self.debug_outputs)
            graph.extend(lb.nodes)
            for use in list(site.out.uses()):
                if use.node.graph is graph and use.node is not new_out.producer():
                    use.node.replace_input_with(use.idx, new_out)
            if classes is not None:
                add_graph_output(graph, classes, f"sevi.head_class.{site.layer}", INT8, ["batch", _heads(site)])
        graph.sort()
        self.count = len(chosen)
        return ir.passes.PassResult(model, modified=True)


def _heads(site: AttentionSite) -> int:
    return static_heads(site.q if site.form == ATTENTION_OP else site.logits, "the attention's query")


def _shared_regions(b: Builder, any_on, attention_mask, visual_mask, inputs_embeds, enable):
    """One If for every SEVI layer: text_keys [B,1,1,K] (keys after the row's last image position, the current
    row included) and row_on [B,1,1,1] (flag on and the row has an image)."""
    then = b.child("regions")
    r = build_regions(then, attention_mask, visual_mask, inputs_embeds)
    text = then.op("Greater", [r.key_index, r.last_image], "text_keys")  # [B,K]
    text = then.op("Unsqueeze", [text, then.const(np.array([1, 2], np.int64), "axes_1_2")], "text_keys")
    on = then.op("And", [then.op("Unsqueeze", [enable, then.const(np.array([1], np.int64), "axes_1")], "enable_col"),
                         r.has_image], "row_on")  # [B,1]
    on = then.op("Unsqueeze", [on, then.const(np.array([2, 3], np.int64), "axes_2_3")], "row_on")  # [B,1,1,1]
    off = b.child("regions_off")
    dummy = [off.const(np.zeros((1, 1, 1, 1), bool), "text_keys"), off.const(np.zeros((1, 1, 1, 1), bool), "row_on")]
    return b.if_node(any_on, [text, on], then.nodes, dummy, off.nodes, "regions", [BOOL, BOOL])


def _layer_edit(graph: ir.Graph, lb: Builder, site: AttentionSite, any_on, text_keys, row_on, omega, kappa,
                debug: bool):
    heads = _heads(site)
    base_f = shared_float_mask(graph, site.base_mask)
    effective = site.mask if site.mask.dtype == FLOAT else base_f  # CLVA's mask if CLVA was baked first
    t = lb.child("edit")
    ax1 = t.const(np.array([1], np.int64), "axes_1")
    ax3 = t.const(np.array([3], np.int64), "axes_3")

    if site.form == ATTENTION_OP:
        q_last = slice_axis(t, site.q, -1, 2, "q_last")
        raw = recompute_logits(t, q_last, site.k, heads, static_heads(site.k, "the attention's key"), site.scale)
    else:
        raw = slice_axis(t, site.logits, -1, 2, "raw_last")  # [B,H,1,K]
    base_last = slice_axis(t, base_f, -1, 2, "mask_last")  # [B,1,1,K]
    eff_last = slice_axis(t, effective, -1, 2, "effective_mask_last")
    eff_last.producer().metadata_props[META_MASK_ROLE] = "effective"  # a later CLVA bake rewires this input

    probs = t.op("Softmax", [t.op("Add", [raw, base_last], "unedited")], "unedited", axis=-1)  # [B,H,1,K]
    p = t.op("Cast", [probs], "unedited_d", to=DOUBLE)
    text_d = t.op("Cast", [text_keys], "text_keys_d", to=DOUBLE)  # [B,1,1,K]
    image_d = t.op("Sub", [t.const(np.float64(1.0), "one_d"), text_d], "image_keys_d")
    text_mass = t.op("ReduceSum", [t.op("Mul", [p, text_d], "text_mass"), ax3], "text_mass", keepdims=1)  # [B,H,1,1]
    image_mass = t.op("ReduceSum", [t.op("Mul", [p, image_d], "image_mass"), ax3], "image_mass", keepdims=1)
    is_text = t.op("GreaterOrEqual", [text_mass, image_mass], "is_text")
    text_max = t.op("ReduceMax", [t.op("Where", [text_keys, p, t.const(np.float64(0.0), "zero_d")], "text_max"), ax3],
                    "text_max", keepdims=1)
    kappa_d = t.op("Reshape", [t.op("Cast", [kappa], "kappa_d", to=DOUBLE), t.const(np.array([-1, 1, 1, 1], np.int64),
                                                                                     "col_shape")], "kappa_col")
    is_global = t.op("And", [is_text, t.op("LessOrEqual", [text_max, t.op("Mul", [kappa_d, text_mass], "kappa_mass")],
                                           "concentrated")], "is_global")
    vision = t.op("And", [t.op("Not", [is_text], "vision"), row_on], "vision")  # [B,H,1,1]
    glob = t.op("And", [is_global, row_on], "global")
    local = t.op("And", [t.op("And", [is_text, t.op("Not", [is_global], "local")], "local"), row_on], "local")

    def count(x: ir.Value, what: str) -> ir.Value:
        return t.op("ReduceSum", [t.op("Cast", [x], what, to=FLOAT), ax1], what, keepdims=1)  # [B,1,1,1]

    n_vision, n_global, n_local = count(vision, "n_vision"), count(glob, "n_global"), count(local, "n_local")
    zero_f = t.const(np.float32(0.0), "zero_f")
    has_global = t.op("Greater", [n_global, zero_f], "has_global")
    step1 = t.op("And", [t.op("Greater", [n_vision, zero_f], "has_vision"), has_global], "step1")
    has_local = t.op("Greater", [n_local, zero_f], "has_local")
    step2 = t.op("And", [has_global, has_local], "step2")

    glob_f = t.op("Cast", [glob], "global_f", to=FLOAT)
    global_sum = t.op("ReduceSum", [t.op("Mul", [raw, glob_f], "global_sum"), ax1], "global_sum", keepdims=1)
    global_mean = t.op("Div", [global_sum, t.op("Max", [n_global, t.const(np.float32(1.0), "one_f")], "n_global")],
                       "global_mean")  # [B,1,1,K]
    local_max = t.op("ReduceMax", [t.op("Where", [local, raw, t.const(np.float32(NEG_INF), "neg_inf")], "local_max"),
                                   ax1], "local_max", keepdims=1)
    local_max = t.op("Where", [has_local, local_max, zero_f], "local_max")  # no -inf reaches the arithmetic below
    w = t.op("Reshape", [omega, t.const(np.array([-1, 1, 1, 1], np.int64), "col_shape")], "omega_col")
    denom = t.op("Add", [t.const(np.float32(1.0), "one_f"), w], "one_plus_omega")
    e1 = t.op("Div", [t.op("Add", [raw, t.op("Mul", [w, global_mean], "step1")], "step1"), denom], "step1")
    e2 = t.op("Div", [t.op("Add", [raw, t.op("Mul", [w, local_max], "step2")], "step2"), denom], "step2")
    do1 = t.op("And", [vision, step1], "do_step1")  # [B,H,1,1]
    do2 = t.op("And", [glob, step2], "do_step2")
    edited = t.op("Where", [do1, e1, t.op("Where", [do2, e2, raw], "edited")], "edited")
    new_probs = t.op("Softmax", [t.op("Add", [edited, eff_last], "edited_masked")], "edited", axis=-1)
    new_last = grouped_probs_matmul(t, new_probs, site.v, heads, static_heads(site.v, "the attention's value"))
    old_last = slice_axis(t, site.out, -1, 2, "out_last")
    changed = t.op("Or", [do1, do2], "changed")
    last = t.op("Where", [changed, new_last, old_last], "out_last")
    rest = slice_axis(t, site.out, 0, 2, "out_rest", end=-1)
    new_out = t.op("Concat", [rest, last], "out", axis=2, dtype=FLOAT)
    then_outs, dtypes = [new_out], [FLOAT]

    off = lb.child("off")
    else_outs = [off.op("Identity", [site.out], "out", dtype=FLOAT)]
    if debug:
        cls = t.op("Where", [is_text, t.op("Where", [is_global, t.const(np.int8(GLOBAL_TEXT_HEAD), "global_id"),
                                                     t.const(np.int8(LOCAL_TEXT_HEAD), "local_id")], "class"),
                             t.const(np.int8(VISION_HEAD), "vision_id")], "class")
        cls = t.op("Where", [row_on, cls, t.const(np.int8(NOT_CLASSIFIED), "none_id")], "class")
        then_outs.append(t.op("Reshape", [cls, t.const(np.array([0, heads], np.int64), "class_shape")], "class"))
        shape = off.op("Concat", [off.op("Shape", [site.out], "batch", start=0, end=1),
                                  off.const(np.array([heads], np.int64), "heads")], "class_shape", axis=0)
        else_outs.append(off.op("ConstantOfShape", [shape], "class", value=ir.tensor(np.array([NOT_CLASSIFIED],
                                                                                              np.int8))))
        dtypes.append(INT8)
    outs = lb.if_node(any_on, then_outs, t.nodes, else_outs, off.nodes, "edit", dtypes)
    if site.mask_node.metadata_props.get(META_LAYER) is None:
        site.mask_node.metadata_props[META_LAYER] = str(site.layer)
    return outs[0], (outs[1] if debug else None)


__all__ = ["SeviPass", "SEVI_INPUTS", "PassError"]
