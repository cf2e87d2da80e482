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

    sevi.enable ─► any_on ─┬─► If (once per pass): text_f [B,1,1,K] (keys after the last image position),
                           │                       keys [B,1,K,2] (text | image-side one-hot), row_on, kappa, omega,
                           │                       base_last [B,1,1,K] (the exporter's mask, last row)
                           └─► If (layer l): then ─ raw [B,H,1,K] = last row of q kᵀ·scale
                                                     (opset 18: a Slice of the layer's MatMul; opset 23: k·q_lastᵀ)
                                                   ─ A = Softmax(raw + base_last); (text, image) mass = A @ keys;
                                                     text max = max(A * text_f) ─► vision/global/local [B,H]
                                                   ─ If (some head edited): then ─
                                                       edited = (raw + omega * Where(step1 & vision, mean_global,
                                                                 max_local)) / (1 + omega)   (edited heads only)
                                                       out_last = Softmax(edited + effective_mask_last) @ v
                                                       out' = Concat(out[:, :, :-1],
                                                                     Where(edited head, out_last, out[:, :, -1:]))
                                                                          else ─ out' = out
                                             else ─ out' = out
    out' replaces the layer's attention output [B,H,S,D] before the head transpose.

Fused form (GroupQueryAttention, graph_passes/fuse_attention.py). Recomputing the output row after the node reads
the layer's values a second time (before: Concat(past[:, :, :P], new), a copy of the value cache and a read of it).
A decode step (one query row) puts the edit into the node instead, as its attention bias, built before the node
from the node's own inputs; a prefill (S > 1) keeps the recomputed row above, since the op's bias has no broadcast
over rows ([B,H,S,K] per edited layer: 1 GB at 4k tokens and 16 heads):

    sevi on, S == 1 ─► If (layer l, before the node): raw = q kᵀ·scale of the last row [B,H,1,K]
                       │  (graph_passes/regions.py site_logits: the past key buffer read in place, plus the new key)
                       │  ─ the classes above ─ bias = mask + Where(edited head, omega/(1+omega), 0)·(target - raw)
                       │                                                                               [B,H,1,K]
                       │  else: bias = mask
                       └─► GroupQueryAttention(q, k, v, past, ..., attention_bias = bias) ─► out (edited row included)
    sevi on, S > 1  ─► If (layer l, after the node): the recomputed last row above, on the node's own output
                       out [B,S,H·D] (reshaped to [B,H,S,D] and back inside the branch; else: out as it is), so
                       the main graph keeps out ─Reshape─Transpose─Transpose─Reshape─► o_proj, which ONNX Runtime
                       cancels: flags off pay for the If alone (tagged META_OUTPUT_EDIT for attention_match.py)

The node computes softmax(raw' + mask + omega/(1+omega)·(target - raw)) with raw' its own q kᵀ: softmax(edited +
mask) up to float rounding (tests: 1e-5 on the output row, parity with the reference unchanged); heads and rows that
SEVI leaves alone get the mask + 0.0, the mask bit for bit. The node records the layer's own mask (`META_EFFECTIVE_MASK`),
which later passes read as `site.mask` (a probe baked after SEVI still sees the unedited attention) and which a
later CLVA bake rewires. What a decode step with SEVI on costs on top of the node: one read of each edited layer's
key buffer (an edit of a layer's output row needs that layer's logits before the node or its values after it, so
one pass over K or V is the floor) and ~40 small ops per layer on [B,H,1,K] rows. `scripts/bench_peers.py`
(engine anchorrt-baked: the issue's bench model, hidden 1024, 12 of 16 layers edited, 2 threads) measured 1.09 /
1.15 / 1.21x the plain step at 300 / 1100 / 2100 tokens in fp32, where the extra keys are 1-8% of the step's
bytes, and 1.21 / 1.23 / 1.41x at int4, where they are 8-24%. LLaVA-1.5-7B at context 1024 with the default 24
edited layers reads 384 MB more against ~28 GB (fp32 weights, ~1.4%) or ~4.5 GB (int4, ~8.5%) per step, and its
~1,000 extra small ops are well under 1% of such a step. (regions.site_logits keeps the query scale off
FusedMatMul's alpha: folded in, that kernel made the key read 3-5x slower.)

Unedited heads and rows keep the layer's own output values (Where), so rows with the flag off are bit-exact, and
with every row off the If returns `out` itself. The per-layer branch is kept short (about 20 small ops to classify,
20 more only when a head is edited) because at decode time op dispatch, not arithmetic, is what it costs. The classification sums run in fp32 (METHODS.md: fp32
at least; the reference uses float64): a head whose two masses tie within ~1e-7 may be classed differently.

Inputs added: `visual_mask` [batch, total_length] bool (shared with CLVA), `sevi.enable` [batch] bool,
`sevi.omega`, `sevi.kappa` [batch] float32. Debug outputs (optional): `sevi.head_class.{l}` [batch, heads] int8
(0 vision, 1 global text, 2 local text, -1 not classified: row off or without image).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from anchorrt.graph_passes.attention_match import (
    GQA,
    RECOMPUTED,
    AttentionSite,
    match_attention,
    require_float32,
    site_values,
)
from anchorrt.graph_passes.base import (
    META_BASE_MASK,
    META_EFFECTIVE_MASK,
    META_LAYER,
    META_MASK_ROLE,
    META_OUTPUT_EDIT,
    NEG_INF,
    Builder,
    GraphPass,
    PassError,
    add_graph_input,
    add_graph_output,
    graph_input,
)
from anchorrt.graph_passes.regions import (
    BOOL,
    FLOAT,
    grouped_probs_matmul,
    query_rows,
    shared_float_mask,
    site_logits,
    slice_axis,
    static_heads,
)
from anchorrt.graph_passes.shapes import annotate_missing, reduce_extreme

INT32, INT8, INT64 = ir.DataType.INT32, ir.DataType.INT8, ir.DataType.INT64
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
        require_float32(chosen, "SEVI")
        inputs_embeds = graph_input(graph, "inputs_embeds")
        attention_mask = graph_input(graph, "attention_mask")
        if inputs_embeds is None or attention_mask is None:
            raise PassError("the decoder has no inputs_embeds/attention_mask input; not an AnchorRT decoder graph")
        visual_mask = add_graph_input(graph, "visual_mask", BOOL, ["batch", "total_length"])
        enable = add_graph_input(graph, "sevi.enable", BOOL, ["batch"])
        omega = add_graph_input(graph, "sevi.omega", FLOAT, ["batch"])
        kappa = add_graph_input(graph, "sevi.kappa", FLOAT, ["batch"])

        base = chosen[0].base_mask
        if any(site.base_mask is not base for site in chosen):
            raise PassError("the decoder layers use different attention masks; SEVI expects the one shared causal mask")

        taken = {n.name for n in graph.all_nodes()}
        b = Builder("model/sevi", taken=taken)
        any_on = b.op("Cast", [b.op("ReduceMax", [b.op("Cast", [enable], "enabled", to=INT32)], "enabled", keepdims=0)],
                      "enabled", to=BOOL)
        shared = _shared(b, any_on, attention_mask, inputs_embeds, visual_mask, base, enable, omega, kappa)
        graph.extend(b.nodes)

        fused = chosen[0].form == GQA
        if fused:  # decode steps edit through the fused node's bias; a prefill recomputes its last row after the node
            sb = b.child("steps", same_graph=True)
            start = len(b.nodes)
            decode = sb.op("Equal", [sb.op("Shape", [inputs_embeds], "sequence", start=1, end=2),
                                     sb.const(np.array([1], np.int64), "one")], "decode")
            decode = sb.op("Squeeze", [decode, sb.const(np.array([0], np.int64), "axes_0")], "decode")  # []
            on_decode = sb.op("And", [any_on, decode], "on_decode")
            on_prefill = sb.op("And", [any_on, sb.op("Not", [decode], "prefill")], "on_prefill")
            graph.extend(b.nodes[start:])
        for site in chosen:
            lb = Builder(f"model/layers.{site.layer}/attn/sevi", metadata={META_LAYER: str(site.layer)}, taken=taken)
            effective = _effective_mask(graph, site)  # before the fused node's bias input is replaced
            classes_d = None
            if fused:
                _, classes_d = _fused_decode_bias(lb, site, effective, on_decode, shared, self.debug_outputs)
            chain = _output_chain(site)
            new_out, classes = _layer_edit(lb, site, effective, on_prefill if fused else any_on, shared,
                                           self.debug_outputs, chain)
            if classes_d is not None:
                classes = lb.op("Where", [decode, classes_d, classes], "head_class")
            graph.extend(lb.nodes)
            for use in list(site.out.uses()):
                if use.node.graph is graph and use.node is not new_out.producer():
                    use.node.replace_input_with(use.idx, new_out)
            if chain is not None and not site.out.uses() and len(chain[0].outputs[0].uses()) == 1:
                graph.remove([chain[1], chain[0]], safe=True)  # the node's own Reshape/Transpose: now in the If
            if classes is not None:
                add_graph_output(graph, classes, f"sevi.head_class.{site.layer}", INT8, ["batch", _heads(site)])
        graph.sort()
        self.count = len(chosen)
        annotate_missing(model)  # every value this pass created gets a type and shape
        return ir.passes.PassResult(model, modified=True)


def _heads(site: AttentionSite) -> int:
    return site.query_heads()


SHARED = ("text_f", "keys", "row_on", "kappa", "omega", "one_plus_omega", "edit_weight", "base_last", "past_len")
SHARED_TYPES = (FLOAT, FLOAT, BOOL, FLOAT, FLOAT, FLOAT, FLOAT, FLOAT, INT64)


def _shared(b: Builder, any_on, attention_mask, inputs_embeds, visual_mask, base, enable, omega, kappa) -> dict[str, ir.Value]:
    """One If for every SEVI layer, the per-pass values all layers share (so each layer's branch stays short):

        text_f [B,1,1,K]   1.0 at keys after the row's last image position (the current row included)
        keys   [B,1,K,2]   columns (text key, image-side key): probs @ keys = (text mass, image-side mass)
        row_on [B,1,1,1]   flag on and the row has an image token
        kappa, omega, 1 + omega, omega / (1 + omega) [B,1,1,1];  base_last [B,1,1,K] the exporter's mask on the
                           last row (fp32);  past_len [1] P (keys before this pass)
    """
    t = b.child("shared")
    seen = t.op("Cast", [attention_mask], "seen", to=BOOL)
    visual = t.op("And", [visual_mask, seen], "visual")
    total = t.op("Gather", [t.op("Shape", [attention_mask], "total_len"), t.const(np.int64(1), "one")], "total_len",
                 axis=0)
    key_index = t.op("Range", [t.const(np.int64(0), "zero"), total, t.const(np.int64(1), "one")], "key_index")
    last_image = reduce_extreme(t, t.op("Where", [visual, key_index, t.const(np.int64(-1), "minus_one")],
                                         "last_image"), 1, "last_image")  # [B,1], -1 without image
    col = t.const(np.array([-1, 1, 1, 1], np.int64), "col_shape")
    text_f = t.op("Cast", [t.op("Greater", [key_index, last_image], "text_keys")], "text_f", to=FLOAT)  # [B,K]
    image_f = t.op("Sub", [t.const(np.float32(1.0), "one_f"), text_f], "image_f")
    keys = t.op("Concat", [t.op("Unsqueeze", [text_f, t.const(np.array([1, 3], np.int64), "axes_1_3")], "text_col"),
                           t.op("Unsqueeze", [image_f, t.const(np.array([1, 3], np.int64), "axes_1_3")], "image_col")],
                "keys", axis=3)  # [B,1,K,2]
    text_f = t.op("Unsqueeze", [text_f, t.const(np.array([1, 2], np.int64), "axes_1_2")], "text_f")  # [B,1,1,K]
    has_image = t.op("GreaterOrEqual", [last_image, t.const(np.int64(0), "zero")], "has_image")
    row_on = t.op("Reshape", [t.op("And", [t.op("Unsqueeze", [enable, t.const(np.array([1], np.int64), "axes_1")],
                                                   "enable_col"), has_image], "row_on"), col], "row_on")
    omega4 = t.op("Reshape", [omega, col], "omega")
    base_last = slice_axis(t, base, -1, 2, "base_last")
    if base.dtype == BOOL:
        base_last = t.op("Where", [base_last, t.const(np.float32(0.0), "zero_f"),
                                   t.const(np.float32(NEG_INF), "neg_inf")], "base_last", dtype=FLOAT)
    past_len = t.op("Sub", [t.op("Shape", [attention_mask], "total_length", start=1, end=2),
                            t.op("Shape", [inputs_embeds], "sequence", start=1, end=2)], "past_length")  # [1] P
    one_plus_omega = t.op("Add", [t.const(np.float32(1.0), "one_f"), omega4], "one_plus_omega")
    values = [text_f, keys, row_on, t.op("Reshape", [kappa, col], "kappa"), omega4, one_plus_omega,
              t.op("Div", [omega4, one_plus_omega], "edit_weight"), base_last, past_len]
    off = b.child("shared_off")  # never read: every layer's If takes its else branch too
    dummies = [off.const(np.zeros((1, 1, 1, 1), bool if dt == BOOL else np.float32), name) if dt != INT64
               else off.const(np.zeros(1, np.int64), name) for name, dt in zip(SHARED, SHARED_TYPES)]
    return dict(zip(SHARED, b.if_node(any_on, values, t.nodes, dummies, off.nodes, "shared", list(SHARED_TYPES))))


def _classify(t: Builder, site: AttentionSite, sh: dict[str, ir.Value], heads: int,
              one_row: bool = False) -> dict[str, ir.Value]:
    """The last row's unedited logits and the head classes of one layer (about 20 small ops). `one_row`: the pass
    is a decode step (fused form: its query [B, 1, H·D] is [B, H, 1, D] in memory)."""
    ax1 = t.const(np.array([1], np.int64), "axes_1")
    if site.form == GQA:
        q_last = (t.op("Reshape", [site.q, t.const(np.array([0, heads, 1, site.k.shape[3]], np.int64), "q_shape")],
                       "q_last") if one_row else query_rows(t, site, -1, "q_last"))  # [B,H,1,D]
        raw = site_logits(t, site, q_last, sh["past_len"], one_row)  # [B,H,1,K]
    elif site.form in RECOMPUTED:
        raw = site_logits(t, site, query_rows(t, site, -1, "q_last"))  # [B,H,1,K]
    else:
        raw = slice_axis(t, site.logits, -1, 2, "raw_last")  # [B,H,1,K] scaled q kᵀ, finite
    probs = t.op("Softmax", [t.op("Add", [raw, sh["base_last"]], "unedited")], "unedited", axis=-1)  # [B,H,1,K]
    two = t.const(np.array([1, 1], np.int64), "split_2")  # Split-18 needs its sizes (or num_outputs) given
    text_mass, image_mass = t.op("Split", [t.op("MatMul", [probs, sh["keys"]], "masses"), two], "masses",
                                 num_outputs=2, axis=3)  # [B,H,1,1] each
    text_max = reduce_extreme(t, t.op("Mul", [probs, sh["text_f"]], "text_max"), 3, "text_max")
    is_text = t.op("GreaterOrEqual", [text_mass, image_mass], "is_text")  # equal masses: a text head
    text_on = t.op("And", [is_text, sh["row_on"]], "text_on")
    concentrated = t.op("LessOrEqual", [text_max, t.op("Mul", [sh["kappa"], text_mass], "kappa_mass")], "spread_out")
    glob = t.op("And", [text_on, concentrated], "global")  # [B,H,1,1]
    local = t.op("Xor", [text_on, glob], "local")  # global heads are text heads
    vision = t.op("Xor", [sh["row_on"], text_on], "vision")  # row on and not a text head
    classes = t.op("Cast", [t.op("Concat", [vision, glob, local], "classes", axis=3)], "classes", to=FLOAT)
    counts = t.op("ReduceSum", [classes, ax1], "counts", keepdims=1)  # [B,1,1,3]
    _, has_g, has_l = t.op("Split", [t.op("Greater", [counts, t.const(np.float32(0.0), "zero_f")], "present"),
                                     t.const(np.array([1, 1, 1], np.int64), "split_3")], "present", num_outputs=3,
                           axis=3)
    # step 1 needs a vision and a global head: a vision head is there wherever `vision` is true; likewise step 2.
    do1 = t.op("And", [vision, has_g], "do_step1")  # [B,H,1,1]
    do2 = t.op("And", [glob, has_l], "do_step2")
    changed = t.op("Or", [do1, do2], "changed")
    return {"raw": raw, "is_text": is_text, "concentrated": concentrated, "local": local, "classes": classes,
            "counts": counts, "do1": do1, "changed": changed}


def _edited_logits(a: Builder, c: dict[str, ir.Value], sh: dict[str, ir.Value], heads: int) -> ir.Value:
    """(logits + omega * target) / (1 + omega) [B,H,1,K] (see _edit_target)."""
    target = _edit_target(a, c, heads)
    return a.op("Div", [a.op("Add", [c["raw"], a.op("Mul", [sh["omega"], target], "edited")], "edited"),
                        sh["one_plus_omega"]], "edited")  # (logits + omega * target) / (1 + omega)


def _edit_target(a: Builder, c: dict[str, ir.Value], heads: int) -> ir.Value:
    """[B,H,1,K]: the mean over global heads (step 1, for vision heads) or the max over local heads (step 2, for
    global heads) of the unedited logits. Where a row has no global (local) head these are 0/0 (the lowest float),
    but then no head selects them: unchanged heads keep the layer's own output, so their edit is never used."""
    raw = c["raw"]
    # sum over global heads as one GEMV: [B,1,1,H] @ [B,1,H,K] (a reduction over the head axis is slower)
    global_row = a.op("Reshape", [slice_axis(a, c["classes"], 1, 3, "global_f", end=2),
                                  a.const(np.array([0, 1, 1, heads], np.int64), "global_row_shape")], "global_row")
    raw_rows = a.op("Reshape", [raw, a.const(np.array([0, 1, heads, -1], np.int64), "raw_rows_shape")], "raw_rows")
    global_sum = a.op("MatMul", [global_row, raw_rows], "global_sum")  # [B,1,1,K]
    global_mean = a.op("Div", [global_sum, slice_axis(a, c["counts"], 1, 3, "n_global", end=2)], "global_mean")
    lowest = a.const(np.float32(np.finfo(np.float32).min), "lowest")  # finite: no -inf meets omega = 0
    local_max = reduce_extreme(a, a.op("Where", [c["local"], raw, lowest], "local_max"), 1, "local_max")
    return a.op("Where", [c["do1"], global_mean, local_max], "target")  # step 1 for vision heads, step 2 for global


def _class_codes(t: Builder, c: dict[str, ir.Value], sh: dict[str, ir.Value], heads: int) -> ir.Value:
    """Debug output: [B, H] int8, 0 vision / 1 global text / 2 local text / -1 not classified."""
    cls = t.op("Where", [c["is_text"], t.op("Where", [c["concentrated"], t.const(np.int8(GLOBAL_TEXT_HEAD), "global_id"),
                                                       t.const(np.int8(LOCAL_TEXT_HEAD), "local_id")], "class"),
                         t.const(np.int8(VISION_HEAD), "vision_id")], "class")
    cls = t.op("Where", [sh["row_on"], cls, t.const(np.int8(NOT_CLASSIFIED), "none_id")], "class")
    return t.op("Reshape", [cls, t.const(np.array([0, heads], np.int64), "class_shape")], "class")


def _no_class_codes(off: Builder, like: ir.Value, heads: int) -> ir.Value:
    """[B, H] int8 of -1 (B from `like`'s first dimension)."""
    shape = off.op("Concat", [off.op("Shape", [like], "batch", start=0, end=1),
                              off.const(np.array([heads], np.int64), "heads")], "class_shape", axis=0)
    return off.op("ConstantOfShape", [shape], "class", value=ir.tensor(np.array([NOT_CLASSIFIED], np.int8)))


def _effective_mask(graph: ir.Graph, site: AttentionSite) -> ir.Value:
    """The mask the layer applies (CLVA's when CLVA was baked first), as fp32."""
    return site.mask if site.mask.dtype == FLOAT else shared_float_mask(graph, site.base_mask)


def _tag_effective(value: ir.Value) -> ir.Value:
    """A node whose input 0 is the layer's effective mask: a later CLVA bake rewires it to CLVA's mask."""
    value.producer().metadata_props[META_MASK_ROLE] = "effective"
    return value


def _layer_edit(lb: Builder, site: AttentionSite, effective: ir.Value, cond, sh: dict[str, ir.Value], debug: bool,
                chain: tuple[ir.Node, ir.Node, list[int]] | None = None):
    """One layer's If after the layer: classify heads on the last row, edit its logits, recompute its output row
    (see above); `effective`: the layer's mask (fp32); `chain`: `_output_chain(site)` (fused form: the node's
    [B,S,H·D] output goes into the If and is reshaped there). -> (out' [B,H,S,D], debug classes or None)."""
    heads = _heads(site)
    t = lb.child("edit")
    out4 = site.out if chain is None else _to_heads(t, chain[0].inputs[0], chain)
    c = _classify(t, site, sh, heads)
    any_changed = t.op("Cast", [t.op("ReduceMax", [t.op("Cast", [c["changed"]], "any_changed", to=INT32)],
                                     "any_changed", keepdims=0)], "any_changed", to=BOOL)

    # Only when some head of some row is edited: a nested If (it saves the pass over the values).
    a = t.child("apply")
    eff_last = _tag_effective(slice_axis(a, effective, -1, 2, "effective_mask_last"))
    new_probs = a.op("Softmax", [a.op("Add", [_edited_logits(a, c, sh, heads), eff_last], "edited_masked")], "edited",
                     axis=-1)
    new_last = grouped_probs_matmul(a, new_probs, site_values(a, site), heads, static_heads(site.v, "the attention's value"))
    last = a.op("Where", [c["changed"], new_last, slice_axis(a, out4, -1, 2, "out_last")], "out_last")
    applied = a.op("Concat", [slice_axis(a, out4, 0, 2, "out_rest", end=-1), last], "out", axis=2, dtype=FLOAT)
    same = t.child("unchanged")
    kept = same.op("Identity", [out4], "out", dtype=FLOAT)
    new_out = t.if_node(any_changed, [applied], a.nodes, [kept], same.nodes, "apply", [FLOAT])[0]
    passed = site.out if chain is None else chain[0].inputs[0]  # what the else branch returns as it is
    if chain is not None:  # back to the node's [B,S,H·D]
        new_out = t.op("Reshape", [t.op("Transpose", [new_out], "out", perm=np.argsort(chain[2]).tolist(), dtype=FLOAT),
                                   t.const(np.array([0, 0, -1], np.int64), "out_shape")], "out", dtype=FLOAT)
    then_outs, dtypes = [new_out], [FLOAT]

    off = lb.child("off")
    else_outs = [off.op("Identity", [passed], "out", dtype=FLOAT)]
    if debug:
        then_outs.append(_class_codes(t, c, sh, heads))
        else_outs.append(_no_class_codes(off, passed, heads))
        dtypes.append(INT8)
    outs = lb.if_node(cond, then_outs, t.nodes, else_outs, off.nodes, "edit", dtypes)
    if site.mask_node.metadata_props.get(META_LAYER) is None:
        site.mask_node.metadata_props[META_LAYER] = str(site.layer)
    edited = outs[0]
    if chain is not None:
        edited.producer().metadata_props[META_OUTPUT_EDIT] = "1"
        edited = _to_heads(lb, edited, chain)
    return edited, (outs[1] if debug else None)


def _output_chain(site: AttentionSite) -> tuple[ir.Node, ir.Node, list[int]] | None:
    """Fused form: (Reshape, Transpose, perm) that turn the node's output [B,S,H·D] into site.out [B,H,S,D]; None
    for the other forms. SEVI's prefill edit reads the output in the [B,H,S,D] form; taking the node's own output
    into its `If` and reshaping inside keeps the main graph's Reshape -> Transpose -> Transpose -> Reshape chain
    that ONNX Runtime cancels to nothing, so a decode step (flags on or off) pays only for the `If`: the baked
    bench decoder with these `If`s inlined (their transposes cancelled) ran 0.93-0.97x the baked one, flags off."""
    if site.form != GQA:
        return None
    transpose = site.out.producer()
    reshape = transpose.inputs[0].producer() if transpose is not None and transpose.op_type == "Transpose" else None
    if reshape is None or reshape.op_type != "Reshape" or reshape.inputs[0].producer() is not site.anchor:
        return None
    return reshape, transpose, [int(x) for x in transpose.attributes["perm"].value]


def _to_heads(b: Builder, x: ir.Value, chain: tuple[ir.Node, ir.Node, list[int]]) -> ir.Value:
    """x [B,S,H·D] -> [B,H,S,D] as the fused form's own Reshape + Transpose do (same shape input, same perm)."""
    reshape, transpose, perm = chain
    heads4 = b.op("Reshape", [x, reshape.inputs[1]], "out_heads", dtype=FLOAT)
    heads4.shape = reshape.outputs[0].shape
    out = b.op("Transpose", [heads4], "out_heads", perm=perm, dtype=FLOAT)
    out.shape = transpose.outputs[0].shape
    return out


def _fused_decode_bias(lb: Builder, site: AttentionSite, effective: ir.Value, cond, sh: dict[str, ir.Value],
                       debug: bool):
    """Fused form, decode step (one query row): the edit as the fused node's attention bias (see above), built
    before the node from its own inputs. -> (bias [B,H|1,1,K], debug classes or None)."""
    heads = _heads(site)
    t = lb.child("decode")
    c = _classify(t, site, sh, heads, one_row=True)  # keys: the past buffer's slots 0..P-1 and the node's new key

    # (logits + omega target) / (1 + omega) + mask  =  logits + [mask + omega / (1 + omega) (target - logits)]: the
    # node adds its own logits to this bias; exactly the mask (+ ±0.0) on rows and heads that SEVI leaves alone. No
    # nested If on "some head edited" here (unlike the recomputed row): the edit is ~10 ops on [B,H,1,K] and a
    # decode step of a model with a vision and a global text head edits nearly always.
    # The weight is zeroed per head ([B,H,1,1]) instead of the edit per key ([B,H,1,K], one op less over the row):
    # target - raw is finite (raw = q kᵀ; the target is a mean of raws or their max, or the lowest float where no
    # head selects it, and lowest - raw stays finite for |raw| < ~1e31), so an unchanged head gets mask + (±0.0).
    target = _edit_target(t, c, heads)
    weight = t.op("Where", [c["changed"], sh["edit_weight"], t.const(np.float32(0.0), "zero_f")], "edit_weight")
    delta = t.op("Mul", [weight, t.op("Sub", [target, c["raw"]], "edit")], "edit")  # [B,H,1,K]
    # one query row: the mask [B,1,1,K] is its last row
    new_bias = _tag_effective(t.op("Add", [effective, delta], "bias", dtype=FLOAT))  # [B,H,1,K]
    then_outs, dtypes = [new_bias], [FLOAT]

    off = lb.child("decode_off")
    else_outs = [_tag_effective(off.op("Identity", [effective], "bias", dtype=FLOAT))]
    if debug:
        then_outs.append(_class_codes(t, c, sh, heads))
        else_outs.append(_no_class_codes(off, site.q, heads))  # the node's input: this If runs before the node
        dtypes.append(INT8)
    outs = lb.if_node(cond, then_outs, t.nodes, else_outs, off.nodes, "decode", dtypes)
    node = site.mask_node
    node.metadata_props.setdefault(META_BASE_MASK, site.base_mask.name)
    node.metadata_props[META_EFFECTIVE_MASK] = effective.name
    node.metadata_props[META_LAYER] = str(site.layer)
    node.replace_input_with(site.mask_index, outs[0])
    return outs[0], (outs[1] if debug else None)


__all__ = ["SeviPass", "SEVI_INPUTS", "PassError"]
