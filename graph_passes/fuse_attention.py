"""The fused decoder form: each layer's opset-18 attention becomes one `com.microsoft.GroupQueryAttention` whose
past and present share one max-length KV buffer (the runtime binds both to the same memory; only the new tokens
are written). FIELD-NOTES "Where the decoder's time goes": the per-step past->present `Concat`, the repeat of K/V
to the query heads, the transpose of K and the unfused q kᵀ / softmax / ·v cost more than the weight MatMuls'
difference to ONNX Runtime GenAI; its one fused node per layer removes them.

Per layer (pattern A of graph_passes/attention_match.py, found through `present.{i}.key/value`):

    q4 [B,H,S,D] (rotated) ─Mul(c)─► MatMul ─► Add(mask) ─► Softmax ─► IsNaN/Where ─► MatMul ─► out4 [B,H,S,D]
    past_key_values.i.key ─┐                                                            ▲
    k4 [B,Hk,S,D] (rotated)┴► Concat ─► present.i.key ─► Expand/Reshape (repeat) ─► Transpose ─Mul(c)┘
    past_key_values.i.value ┐
    v4 [B,Hk,S,D] ──────────┴► Concat ─► present.i.value ─► Expand/Reshape ─────────────────────────┘

becomes

    q4 ─Transpose(0,2,1,3)─Reshape─► q [B,S,H·D] ─┐
    k4 ─Transpose─Reshape─► k [B,S,Hk·D] ─────────┤
    v  [B,S,Hk·D] (the v_proj output) ────────────┤
    past_key_values.i.key/value [B,Hk,M,D] ───────┼─► GroupQueryAttention(scale=c², do_rotary=0) ─┬─► present.i.key/value
    seqlens_k [B] = last real key, total [] ──────┤    com.microsoft, causal                       │   [B,Hk,M,D]
    mask [B,1,S,total_length] (attention_bias) ───┘                                               └─► out [B,S,H·D]
    out ─Reshape─Transpose─► out4 [B,H,S,D] (what the exporter's Transpose/Reshape/o_proj read)

Rotary stays the exporter's (cos/sin from `position_ids`), so positions are whatever the runtime feeds, left
padding included. Left padding: the runtime left-pads every row to one length, so every row holds the same number
of cache slots (seqlens_k = total_length - 1 for all rows) and the exporter's finite additive mask (0 / float32
min at padded keys, exactly the opset-18 mask) goes in as `attention_bias`; GQA's own causal rule is the one the
mask already contains. A padded query row sees only padded keys, gets uniform weights (no NaN: the bias is finite)
and is never read by a real row. The cache keeps the contract of the opset-18 form when past and present are
distinct tensors (past [B,Hk,P,D] in, [B,Hk,P+S,D] out); bound to one buffer [B,Hk,M,D] it is written in place.

Row lengths: `seqlens_k[b]` is the last column where row b's `attention_mask` is 1 (ArgMax of mask · (1..K)), so
GroupQueryAttention reads slots 0..seqlens_k[b] of row b and writes the pass's new tokens after its own past. A
left-padded row ends in a real key, so every row of an ordinary batch gets total_length - 1 (the same count for all
rows, as before). A row whose mask ends in zeros holds fewer slots: IAVA's rows hold only their real tokens and
V* only the keys it sees, from slot 0 (runtime/iava.py "Shared and compacted passes"), and each decodes with a mask
of ones up to its own length, so its steps read only those slots. The bias row is the exporter's mask row for that layout (columns past a row's length are masked and never
read); the manifest records it as `attention.row_lengths` so that the runtime never compacts an older artifact.
Measured (ORT 1.32 CPU, GroupQueryAttention alone, batch 2, rows of 5 and 9 past slots in one shared buffer, a bias
row per batch row): output within 1.2e-7 of a numpy reference and each row's new key written at its own slot.

Mitigation passes run after this one and treat the fused node like the opset-23 `Attention` op: the mask goes
into `attention_bias` (CLVA's drift bias; SEVI's edit of a decode step), and what needs probabilities recomputes
only the rows it needs from the node's rotated query input (graph_passes/regions.py `query_rows`) and the keys read
in place (graph_passes/regions.py `site_logits`: the past input and the node's new keys), inside its own `If`, so
flags off run the fused node alone.

Measured before choosing (scripts-free micro benchmark, one layer, H 16, D 64, fp32, one decode step, 1 thread,
ORT 1.32 CPU, loaded machine): GroupQueryAttention with a shared buffer 0.17 ms at context 300 and 0.78 ms at 2100;
opset-24 `Attention` + two `TensorScatter` writing the same max-length buffers 33 ms and 12 ms (same outputs; why
it is that slow was not profiled), so GroupQueryAttention it is.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as ir_common
from anchorrt.graph_passes.attention_match import (
    DECOMPOSED,
    GQA_BIAS_INDEX,
    AttentionSite,
    match_attention,
)
from anchorrt.graph_passes.base import META_LAYER, Builder, GraphPass, PassError, graph_input
from anchorrt.graph_passes.naming import AssignNodeNames
from anchorrt.graph_passes.shapes import annotate_missing

MS_DOMAIN = "com.microsoft"
FLOAT, INT32, INT64 = ir.DataType.FLOAT, ir.DataType.INT32, ir.DataType.INT64
FORM_FUSED = "gqa"  # manifest["attention"]["form"]
FORM_UNFUSED = "unfused"
META_FUSED = "anchorrt.fused_attention"


def _const_scalar(value: ir.Value | None) -> float | None:
    if value is None:
        return None
    cv = value.const_value
    if cv is None and value.producer() is not None and value.producer().op_type == "Constant":
        attr = value.producer().attributes.get("value")
        cv = attr.value if attr is not None else None
    if cv is None:
        return None
    array = np.asarray(cv.numpy())
    return float(array.reshape(-1)[0]) if array.size == 1 else None


def _scaled_operand(value: ir.Value) -> tuple[ir.Value, float] | None:
    """Mul(x, c) with a scalar constant c -> (x, c)."""
    node = value.producer()
    if node is None or node.op_type != "Mul" or node.domain != "":
        return None
    for i in (0, 1):
        c = _const_scalar(node.inputs[1 - i])
        if c is not None:
            return node.inputs[i], c
    return None


def _is_transpose_0213(node: ir.Node | None) -> bool:
    if node is None or node.op_type != "Transpose" or node.domain != "":
        return False
    perm = node.attributes.get("perm")
    return perm is not None and list(perm.value) == [0, 2, 1, 3]


def check_fusable(site: AttentionSite, concat_k: ir.Node | None, concat_v: ir.Node | None,
                  past_k: ir.Value, past_v: ir.Value) -> tuple[dict | None, str]:
    """One layer of pattern A with its cache Concats -> (bindings, "") or (None, reason)."""
    if site.form != DECOMPOSED:
        return None, f"layer {site.layer}'s attention is not the opset-18 MatMul/Softmax form"
    for kind, node, past in (("key", concat_k, past_k), ("value", concat_v, past_v)):
        if node is None or node.op_type != "Concat" or node.domain != "":
            return None, f"present.{site.layer}.{kind} is not produced by a Concat"
        axis = node.attributes.get("axis")
        if axis is None or int(axis.value) not in (2, -2) or len(node.inputs) != 2 or node.inputs[0] is not past:
            return None, f"present.{site.layer}.{kind} is not Concat(past_key_values.{site.layer}.{kind}, new, axis=2)"
    qk = site.logits.producer()
    q_side, k_side = _scaled_operand(qk.inputs[0]), _scaled_operand(qk.inputs[1])
    if q_side is None or k_side is None:
        return None, "q kᵀ is not MatMul(Mul(q, c), Mul(kᵀ, c)) with a constant scale"
    if abs(q_side[1] - k_side[1]) > 1e-12 * abs(q_side[1]):
        return None, "q and kᵀ carry different scales"
    q4 = q_side[0]
    if q4.shape is None or q4.shape.rank() != 4 or not isinstance(q4.shape[1], int) \
            or not isinstance(q4.shape[3], int):
        return None, "the query is not [B, H, S, D] with static heads and head size"
    k4, v4 = concat_k.inputs[1], concat_v.inputs[1]
    if k4.shape is None or k4.shape.rank() != 4 or not isinstance(k4.shape[1], int):
        return None, "the new key is not [B, Hk, S, D] with static heads"
    if site.mask.dtype != ir.DataType.FLOAT:
        return None, "the layer's mask is not a float32 additive mask"
    heads, head_dim, kv_heads = q4.shape[1], q4.shape[3], k4.shape[1]
    if heads % kv_heads:
        return None, f"{heads} query heads are not a multiple of {kv_heads} key/value heads"
    return {"q4": q4, "k4": k4, "v4": v4, "scale": q_side[1] * k_side[1], "heads": heads, "kv_heads": kv_heads,
            "head_dim": head_dim}, ""


def _to_3d(b: Builder, x4: ir.Value, what: str) -> ir.Value:
    """[B, N, S, D] -> [B, S, N·D]; reuses the projection output when x4 is Transpose(Reshape(x3))."""
    t = x4.producer()
    if _is_transpose_0213(t):
        r = t.inputs[0].producer()
        if r is not None and r.op_type == "Reshape" and r.inputs[0].shape is not None \
                and r.inputs[0].shape.rank() == 3:
            return r.inputs[0]
    t = b.op("Transpose", [x4], f"{what}_bsnd", perm=[0, 2, 1, 3])
    return b.op("Reshape", [t, b.const(np.array([0, 0, -1], np.int64), f"{what}_shape")], what)


class FuseAttentionPass(GraphPass):
    """Rewrite every layer's opset-18 attention into GroupQueryAttention; count = layers fused (0: no match).

    Refuses graphs that already carry mitigation inputs (bake after fusing, not before: the passes build on the
    form they find) and graphs where some layers fit and others do not."""

    name = "fuse_attention"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self.count = 0
        if any(n.op_type == "GroupQueryAttention" for n in graph):
            raise PassError("the decoder's attention is already fused")
        if any((v.name or "").split(".")[0] in ("clva", "sevi", "probe") for v in graph.inputs):
            raise PassError("the decoder has mitigation baked in; fuse the attention of the plain export, then bake")
        sites = match_attention(graph)
        if not sites:
            return ir.passes.PassResult(model, modified=False)
        attention_mask = graph_input(graph, "attention_mask")
        if attention_mask is None:
            raise PassError("the decoder has no attention_mask input; not an AnchorRT decoder graph")
        outputs = {v.name: v for v in graph.outputs}
        plans = []
        for site in sites:
            names = [f"{p}.{site.layer}.{k}" for p in ("past_key_values", "present") for k in ("key", "value")]
            past_k, past_v = graph_input(graph, names[0]), graph_input(graph, names[1])
            pres_k, pres_v = outputs.get(names[2]), outputs.get(names[3])
            if None in (past_k, past_v, pres_k, pres_v):
                raise PassError(f"layer {site.layer} has no {' / '.join(names)} graph inputs/outputs")
            bind, reason = check_fusable(site, pres_k.producer(), pres_v.producer(), past_k, past_v)
            if bind is None:
                raise PassError(f"cannot fuse the attention of layer {site.layer}: {reason}")
            plans.append((site, bind, past_k, past_v, pres_k, pres_v))

        taken = {n.name for n in graph.all_nodes()}
        shared = Builder("model/attn_fused", taken=taken)
        # seqlens_k [B] int32: each row's last real key column (see "Row lengths" above)
        shape = shared.op("Shape", [attention_mask], "mask_shape")  # [2] = (B, total_length)
        total = shared.op("Gather", [shape, shared.const(np.int64(1), "one")], "total_length", axis=0)  # []
        total32 = shared.op("Cast", [total], "total_length", to=INT32, dtype=INT32)
        # mask · (1..K) peaks at the last real column (strictly increasing there); plain fp32 ArgMax, no
        # select_last_index: that attribute is not implemented by every execution provider's ArgMax
        real = shared.op("Cast", [attention_mask], "real_keys", to=FLOAT)
        total_f = shared.op("Cast", [total], "total_f", to=FLOAT)
        one_f = shared.const(np.float32(1.0), "one_f")
        columns = shared.op("Range", [one_f, shared.op("Add", [total_f, one_f], "end_f"), one_f], "columns")  # [K]
        last = shared.op("ArgMax", [shared.op("Mul", [real, columns], "ranked_keys")], "seqlens_k", axis=1,
                         keepdims=0)  # [B] int64
        seqlens = shared.op("Cast", [last], "seqlens_k", to=INT32, dtype=INT32)  # [B]
        # past_length = total_length - sequence: the past inputs' own dim 2 is the buffer's length once shared
        seq = shared.op("Shape", [graph_input(graph, "inputs_embeds") or plans[0][1]["q4"]], "sequence", start=1,
                        end=2) if graph_input(graph, "inputs_embeds") is not None else None
        if seq is None:
            raise PassError("the decoder has no inputs_embeds input; not an AnchorRT decoder graph")
        past_len = shared.op("Sub", [shared.op("Shape", [attention_mask], "total_length", start=1, end=2), seq],
                             "past_length")  # [1] int64
        graph.extend(shared.nodes)
        _past_length_from_mask(graph, past_len)

        for site, bind, past_k, past_v, pres_k, pres_v in plans:
            self._rewrite(graph, site, bind, past_k, past_v, pres_k, pres_v, seqlens, total32, taken)
            self.count += 1
        _max_length_dims(graph)
        ir_common.RemoveUnusedNodesPass()(model)
        AssignNodeNames()(model)  # the exporter's per-scope counters, renumbered over what is left (idempotent again)
        model.opset_imports.setdefault(MS_DOMAIN, 1)
        graph.sort()
        annotate_missing(model)  # every value it created typed and shaped (graph_passes/shapes.py)
        return ir.passes.PassResult(model, modified=True)

    @staticmethod
    def _rewrite(graph, site, bind, past_k, past_v, pres_k, pres_v, seqlens, total32, taken) -> None:
        layer = site.layer
        b = Builder(f"model/layers.{layer}/attn/fused", metadata={META_LAYER: str(layer)}, taken=taken)
        heads, kv_heads, head_dim = bind["heads"], bind["kv_heads"], bind["head_dim"]
        q = _to_3d(b, bind["q4"], "query")
        k = _to_3d(b, bind["k4"], "key")
        v = _to_3d(b, bind["v4"], "value")
        name = b._name("", "GroupQueryAttention")
        gqa = ir.Node(MS_DOMAIN, "GroupQueryAttention",
                      [q, k, v, past_k, past_v, seqlens, total32, None, None, None, site.mask],
                      attributes=ir.convenience.convert_attributes({
                          "num_heads": heads, "kv_num_heads": kv_heads, "scale": float(bind["scale"]),
                          "do_rotary": 0}),
                      num_outputs=3, name=name,
                      metadata_props={META_LAYER: str(layer)})
        out3 = gqa.outputs[0]
        out3.name, out3.dtype = f"{name}_output_0", ir.DataType.FLOAT
        q4 = bind["q4"]  # [B, H, S, D]: the output is [B, S, H·D] (ONNX shape inference has no schema for the op)
        out3.shape = ir.Shape([q4.shape[0], q4.shape[2], heads * head_dim])
        b.nodes.append(gqa)
        r = b.op("Reshape", [out3, b.const(np.array([0, 0, heads, head_dim], np.int64), "out_shape")], "out")
        out4 = b.op("Transpose", [r], "out", perm=[0, 2, 1, 3], dtype=ir.DataType.FLOAT)  # [B,H,S,D]
        # the graph outputs present.i.* now come from the fused node (same names, max-length buffers)
        for old, new in ((pres_k, gqa.outputs[1]), (pres_v, gqa.outputs[2])):
            idx = graph.outputs.index(old)
            old_name, old_shape = old.name, old.shape
            old.name = f"{old_name}.unfused"
            new.name, new.dtype, new.shape = old_name, old.dtype, old_shape
            graph.outputs[idx] = new
        graph.extend(b.nodes)
        ir.convenience.replace_all_uses_with(site.out, out4)


def _past_length_from_mask(graph: ir.Graph, past_len: ir.Value) -> None:
    """The exporter reads the past length as Shape(past_key_values.i.*)[2] (positions, the causal mask); with one
    shared buffer that is the buffer's length, so every such read becomes total_length - sequence."""
    for v in graph.inputs:
        if not (v.name or "").startswith("past_key_values."):
            continue
        for node in [u.node for u in v.uses()]:
            if node.op_type != "Shape":
                continue
            start = node.attributes.get("start")
            end = node.attributes.get("end")
            start = 0 if start is None else int(start.value) % 4
            end = 4 if end is None else (int(end.value) if int(end.value) >= 0 else int(end.value) + 4)
            if end <= 2:
                continue  # batch / heads: the same in both contracts
            if (start, end) != (2, 3):
                raise PassError(f"node '{node.name}' reads dims {start}..{end - 1} of {v.name}; only its length (dim 2) "
                                "can be rewritten for the shared KV buffer")
            ir.convenience.replace_all_uses_with(node.outputs[0], past_len)


def _max_length_dims(graph: ir.Graph) -> None:
    """present.* is [B, Hk, present_length, D]: past + new tokens for distinct buffers, the buffer's length (the
    request's max length) when past and present share one buffer."""
    for v in graph.outputs:
        if (v.name or "").startswith("present.") and v.shape is not None and v.shape.rank() == 4:
            v.shape = ir.Shape([v.shape[0], v.shape[1], "present_length", v.shape[3]])


def fused_form(model: ir.Model) -> str:
    return FORM_FUSED if any(n.op_type == "GroupQueryAttention" for n in model.graph) else FORM_UNFUSED


__all__ = ["FuseAttentionPass", "FORM_FUSED", "FORM_UNFUSED", "GQA_BIAS_INDEX", "check_fusable", "fused_form"]
