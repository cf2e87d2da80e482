"""Find each decoder layer's attention in an exported decoder graph, in either of the two forms torch.onnx emits.

Pattern A, opset 18 (scaled_dot_product_attention decomposed; GQA keys/values are already repeated to the query
heads by Expand/Reshape upstream, so the pattern does not change with grouped-query attention):

    q ──Mul(√s)──┐
                 MatMul ──► logits ──► Add(·, mask) ──► Softmax(axis=-1) ──► IsNaN ──► Where(nan, 0, p) ──► MatMul(·, v) ──► out
    kᵀ ─Mul(√s)──┘          [B,H,S,K]      mask [B,1,S,K]                                  probs [B,H,S,K]              [B,H,S,D]

Pattern B, opset 23 (the ONNX `Attention` op with 4-D inputs and an explicit mask, no is_causal, no softcap):

    Attention(q [B,H,S,D], k [B,Hk,K,D], v [B,Hk,K,D], attn_mask [B,1,S,K] bool|float) ──► out [B,H,S,D]

Pattern C, the fused form (graph_passes/fuse_attention.py; past and present share one max-length buffer):

    GroupQueryAttention(q [B,S,H·D], k, v [B,S,Hk·D], past_key/value [B,Hk,M,D], seqlens_k, total_length,
                        attention_bias=mask [B,1,S,K]) ──► out [B,S,H·D] ─Reshape─Transpose─► out4 [B,H,S,D]
                                                        └─► present_key/value [B,Hk,M,D]

(A packed node, do_rotary=1, as graph_passes/pack_qkv.py leaves the form, is not matched: `anchorrt bake`
unpacks it first. Where SEVI baked its prefill edit, out [B,S,H·D] goes through that `If` first, tagged
META_OUTPUT_EDIT, and out4 is the edited output.) It is read like pattern B: the query is the node's own rotated input [B, S, H·D] (`site.q`; passes take rows of
it as [B, H, R, D] with graph_passes/regions.py `query_rows`, inside their branch), the mask is `attention_bias`,
and the logits a pass recomputes come from graph_passes/regions.py `site_logits`: the past input read where it is
stored (MatMul over Transpose(past), which ONNX Runtime runs as one FusedMatMul with transB; logit columns from P =
K - S on dropped) plus the node's new keys, so no pass copies the key cache and nothing but the graph output reads
the fused node's present buffers (the in-place contract then does not depend on how ONNX Runtime plans a buffer
with several readers; with a reader it was still shared in ORT 1.32: SEVI baked, flags off, 0.999x plain per step
at context 3000, CPU time). Past holds the first P slots in both contracts (distinct buffers, or one shared buffer
the node writes after P), so the same subgraph serves both, before or after the node runs. Values, where a pass
needs them (SEVI's prefill row), are `site_values`: Concat(past[:, :, :P], new) (a copy of the layer's cache; keys are never
copied: passes take logits from `site_logits`). A pass may feed the node a mask it derives per pass
from the layer's (SEVI's decode-step bias); it records the layer's own mask in `META_EFFECTIVE_MASK` on the node,
which `site.mask` returns.

`match_attention` returns one `AttentionSite` per decoder layer, ordered by layer, or fails loudly (PassError)
when some layers match and others do not, or a layer matches twice; a graph where nothing matches gives `[]`
(the caller reports count 0 and leaves the graph unchanged). Each candidate goes through `check()`, which
returns the reason a near-miss is rejected; those reasons are part of the error message.

The layer index comes from the node name (`/model/layers.{i}/...`, after `AssignNodeNames`) or from the torch
module scopes in the node metadata. When a pass has replaced a layer's mask it records the original in
`META_BASE_MASK` on the node, so the next pass still finds the exporter's mask (`base_mask`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from anchorrt.graph_passes.base import META_BASE_MASK, META_EFFECTIVE_MASK, META_OUTPUT_EDIT, PassError
from anchorrt.graph_passes.naming import layer_of

DECOMPOSED = "matmul_softmax"
ATTENTION_OP = "attention_op"
GQA = "group_query_attention"
RECOMPUTED = (ATTENTION_OP, GQA)  # forms whose probabilities are not in the graph: passes recompute the rows they need
GQA_BIAS_INDEX = 10
_PAST_KEY = re.compile(r"^past_key_values\.(\d+)\.key$")


@dataclass
class AttentionSite:
    layer: int
    form: str  # DECOMPOSED, ATTENTION_OP or GQA
    anchor: ir.Node  # the Softmax (A) or the Attention node (B)
    mask_node: ir.Node  # the node the mask enters: the Add (A) or the Attention node (B)
    mask_index: int  # input index of the mask on mask_node
    base_mask: ir.Value  # the exporter's mask (A: float 0/-inf; B: bool or float)
    out: ir.Value  # [B, H, S, D] attention output, before the head transpose
    v: ir.Value  # [B, Hv, K, D]
    logits: ir.Value | None = None  # A: scaled q kᵀ before the mask [B, H, S, K]
    probs: ir.Value | None = None  # A: post-softmax probabilities after the NaN guard [B, H, S, K]
    q: ir.Value | None = None  # B: [B, H, S, D]; C: [B, S, H·D] (both after rotary; see regions.query_rows)
    k: ir.Value | None = None  # B: [B, Hk, K, D]; C: the past input [B, Hk, P or M, D] (regions.site_logits)
    new_k: ir.Value | None = None  # C: the node's new keys [B, S, Hk·D] (rotated)
    new_v: ir.Value | None = None  # C: the node's new values [B, S, Hk·D]
    scale: float | None = None  # B: the softmax scale
    heads: int | None = None  # C: the node's num_heads
    effective_mask: ir.Value | None = None  # the layer's mask when the node's mask input is derived from it per pass

    def query_heads(self) -> int:
        """Number of query heads, from the first 4-D value with a static head dimension: q (B), the logits or the
        q kᵀ MatMul's left operand (A), then v (A: already repeated to the query heads)."""
        if self.heads is not None:
            return self.heads
        candidates = [self.q] if self.form in RECOMPUTED else [self.logits]
        if self.form == DECOMPOSED and self.logits is not None and self.logits.producer() is not None:
            candidates.append(self.logits.producer().inputs[0])
            candidates.append(self.v)
        for value in candidates:
            if value is not None and value.shape is not None and value.shape.rank() == 4:
                if isinstance(value.shape[1], int):
                    return value.shape[1]
        raise PassError(f"the head count of layer {self.layer}'s attention is not static; cannot build the per-head "
                        "subgraph")

    @property
    def mask(self) -> ir.Value:
        """The mask as the layer applies it now (a previous pass may have replaced the exporter's: CLVA's bias is
        included). Where a pass feeds the node a mask it derives per pass (SEVI's decode-step bias on the fused form,
        `META_EFFECTIVE_MASK`), the mask it derives that from: SEVI's edit is not part of the layer's mask."""
        return self.effective_mask if self.effective_mask is not None else self.mask_node.inputs[self.mask_index]


def _producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type and node.domain == "" else None


def _int_attr(node: ir.Node, name: str, default: int = 0) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else int(attr.value)


def _float_attr(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return default if attr is None else float(attr.value)


def _values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    values = {v.name: v for v in graph.inputs}
    values.update({name: v for name, v in graph.initializers.items()})
    for node in graph:
        for out in node.outputs:
            values[out.name] = out
    return values


def _effective_mask(node: ir.Node, values: dict[str, ir.Value]) -> ir.Value | None:
    return _recorded(node, META_EFFECTIVE_MASK, None, values, "effective")


def _base_mask(node: ir.Node, current: ir.Value, values: dict[str, ir.Value]) -> ir.Value:
    return _recorded(node, META_BASE_MASK, current, values, "original")


def _recorded(node: ir.Node, key: str, default: ir.Value | None, values: dict[str, ir.Value], what: str):
    """The value a pass recorded by name in the node's metadata under `key` (default when none is recorded)."""
    name = node.metadata_props.get(key)
    if name is None:
        return default
    if name not in values:
        raise PassError(f"node '{node.name}' records its {what} mask '{name}', which is not in the graph")
    return values[name]


# ----------------------------------------------------------------------------------- pattern A: decomposed


def check_decomposed(softmax: ir.Node) -> tuple[dict | None, str]:
    """Pattern A around one Softmax -> (bindings, "") or (None, reason)."""
    if _int_attr(softmax, "axis", -1) not in (-1, 3):
        return None, "Softmax is not over the last axis"
    add = _producer(softmax.inputs[0], "Add")
    if add is None:
        return None, "Softmax input is not an Add (no additive mask)"
    mm_index = next((i for i in (0, 1) if _producer(add.inputs[i], "MatMul") is not None), None)
    if mm_index is None:
        return None, "the Add before Softmax is not fed by a MatMul (q kᵀ)"
    qk = _producer(add.inputs[mm_index], "MatMul")
    mask_index = 1 - mm_index
    if add.inputs[mask_index] is None:
        return None, "the Add before Softmax has no mask operand"
    probs = softmax.outputs[0]
    # Main-graph consumers only: a pass may read the probabilities from inside an If branch.
    consumers = [c for c in probs.consumers() if c.graph is softmax.graph]
    isnan = next((c for c in consumers if c.op_type == "IsNaN"), None)
    if isnan is not None:
        where = next((c for c in consumers if c.op_type == "Where" and c.inputs[0] is isnan.outputs[0]), None)
        if where is None or where.inputs[2] is not probs:
            return None, "IsNaN after Softmax is not followed by Where(isnan, 0, probs)"
        probs = where.outputs[0]
        consumers = [c for c in probs.consumers() if c.graph is softmax.graph]
    pv = [c for c in consumers if c.op_type == "MatMul" and c.inputs[0] is probs]
    if len(pv) != 1 or len(consumers) != 1:
        return None, "the attention probabilities do not feed exactly one MatMul(probs, v)"
    return {"qk": qk, "add": add, "mask_index": mask_index, "probs": probs, "pv": pv[0]}, ""


# ------------------------------------------------------------------------------- pattern B: Attention op


def check_attention_op(node: ir.Node) -> tuple[dict | None, str]:
    inputs = list(node.inputs) + [None] * (6 - len(node.inputs))
    if inputs[3] is None:
        return None, "Attention has no attn_mask input (is_causal only); CLVA/SEVI need an explicit mask"
    if inputs[4] is not None or inputs[5] is not None:
        return None, "Attention takes past_key/past_value inputs; the exporter's form concatenates the cache outside"
    if _int_attr(node, "is_causal", 0) != 0:
        return None, "Attention has is_causal=1"
    if _float_attr(node, "softcap", 0.0) != 0.0:
        return None, "Attention has a softcap"
    if _int_attr(node, "qk_matmul_output_mode", 0) != 0:
        return None, "Attention has qk_matmul_output_mode != 0"
    if len(node.outputs) > 1 and any(o is not None and o.name and o.uses() for o in node.outputs[1:]):
        return None, "Attention's present_key/value or qk outputs are used"
    q = inputs[0]
    if q.shape is not None and q.shape.rank() != 4:
        return None, "Attention inputs are 3-D ([B, S, H*D]); only the 4-D form is supported"
    scale = node.attributes.get("scale")
    if scale is None:
        d = q.shape[3] if q.shape is not None else None
        if not isinstance(d, int):
            return None, "Attention has no scale attribute and the head size is not static"
        scale_value = 1.0 / math.sqrt(d)
    else:
        scale_value = float(scale.value)
    return {"scale": scale_value}, ""


# ------------------------------------------------------------------------------- pattern C: fused GQA


def check_gqa(node: ir.Node) -> tuple[dict | None, str]:
    inputs = list(node.inputs) + [None] * (11 - len(node.inputs))
    if inputs[GQA_BIAS_INDEX] is None:
        return None, "GroupQueryAttention has no attention_bias (the mask CLVA/SEVI edit)"
    if _int_attr(node, "do_rotary", 0) != 0:
        return None, "GroupQueryAttention applies rotary inside; the passes need the rotated query"
    if inputs[1] is None or inputs[2] is None:
        return None, "GroupQueryAttention takes packed QKV; the passes need the key and value inputs"
    if inputs[3] is None or inputs[4] is None:
        return None, "GroupQueryAttention has no past_key/past_value (no KV buffer)"
    past = inputs[3]
    d = past.shape[3] if past.shape is not None and past.shape.rank() == 4 else None
    if not isinstance(d, int) or not isinstance(past.shape[1], int):
        return None, "GroupQueryAttention's past key is not [B, Hk, M, D] with static heads and head size"
    out = _edited_output(node) or node.outputs[0]
    reshape = next((c for c in out.consumers() if c.op_type == "Reshape" and c.graph is node.graph), None)
    transpose = None if reshape is None else next(
        (c for c in reshape.outputs[0].consumers() if c.op_type == "Transpose" and c.graph is node.graph), None)
    if transpose is None:
        return None, "GroupQueryAttention's output is not reshaped/transposed back to [B, H, S, D]"
    scale = node.attributes.get("scale")
    return {"out4": transpose.outputs[0], "heads": _int_attr(node, "num_heads", 0), "head_dim": d,
            "scale": float(scale.value) if scale is not None else 1.0 / math.sqrt(d)}, ""


def _edited_output(node: ir.Node) -> ir.Value | None:
    """The output of a main-graph `If` tagged META_OUTPUT_EDIT whose else branch passes `node`'s output through
    (SEVI's prefill edit on the fused form, graph_passes/sevi.py), else None."""
    x = node.outputs[0]
    for n in node.graph:
        if n.op_type != "If" or n.metadata_props.get(META_OUTPUT_EDIT) != "1":
            continue
        kept = n.attributes["else_branch"].value.outputs[0].producer()
        if kept is not None and kept.op_type == "Identity" and kept.inputs[0] is x:
            return n.outputs[0]
    return None


def _past_and_new(b, site: AttentionSite, past: ir.Value, new3: ir.Value, what: str) -> ir.Value:
    """Concat(past[:, :, :P], new as [B, Hk, S, D]) with P = K - S (K: the mask's last dim, S: the query's rows).

        mask [B,1,S,K] ─Shape(3:4)─┐
        q [B,S,H·D] ─Shape(1:2)────┴─Sub─► P ─► Slice(past, 0:P, axis 2) ─┐
        new [B,S,Hk·D] ─Reshape [B,S,Hk,D]─Transpose(0,2,1,3) ───────────┴─Concat(axis 2)─► [B,Hk,K,D]
    """
    heads = static_heads_of(site.k)
    d = site.k.shape[3]  # static (check_gqa)
    total = b.op("Shape", [site.mask], f"{what}_total_length", start=3, end=4)  # [1]
    seq = b.op("Shape", [site.q], f"{what}_sequence", start=1, end=2)  # [1] (q [B, S, H·D])
    past_len = b.op("Sub", [total, seq], f"{what}_past_length")
    zero = b.const(np.array([0], np.int64), f"{what}_start")
    axis = b.const(np.array([2], np.int64), f"{what}_axis")
    old = b.op("Slice", [past, zero, past_len, axis], f"{what}_past")
    new4 = b.op("Reshape", [new3, b.const(np.array([0, 0, heads, d], np.int64), f"{what}_new_shape")], f"{what}_new")
    new4 = b.op("Transpose", [new4], f"{what}_new", perm=[0, 2, 1, 3])
    return b.op("Concat", [old, new4], what, axis=2)


def static_heads_of(value: ir.Value) -> int:
    dim = value.shape[1] if value.shape is not None and value.shape.rank() == 4 else None
    if not isinstance(dim, int):
        raise PassError(f"the head count of '{value.name}' is not static")
    return dim


def site_values(b, site: AttentionSite) -> ir.Value:
    """Values [B, Hk, K, D] of a site, as nodes of builder `b` for the fused form (pattern C: Concat(past[:, :, :P],
    new), a copy of the layer's value cache; pattern A: already repeated to the query heads)."""
    return _past_and_new(b, site, site.v, site.new_v, "values") if site.form == GQA else site.v


# ------------------------------------------------------------------------------------------------ driver


def require_float32(sites: list[AttentionSite], method: str) -> None:
    """The passes add fp32 statistics and an fp32 bias to the attention (FIELD-NOTES: an fp16 bias costs ~1e-3)."""
    for site in sites:
        dtype = site.v.dtype
        if dtype is not None and dtype != ir.DataType.FLOAT:
            raise PassError(f"{method} needs a float32 decoder; layer {site.layer}'s attention runs in {dtype.name.lower()}"
                            " (bake mitigation into the fp32 export first; --precision fp16 converts after it)")


def num_decoder_layers(graph: ir.Graph) -> int:
    """Number of layers from the `past_key_values.{i}.key` inputs (the decoder's contract)."""
    layers = {int(m.group(1)) for v in graph.inputs if (m := _PAST_KEY.match(v.name or ""))}
    return len(layers)


def match_attention(graph: ir.Graph, num_layers: int | None = None) -> list[AttentionSite]:
    """One AttentionSite per layer (sorted), [] if nothing matches, PassError on any other count."""
    num_layers = num_decoder_layers(graph) if num_layers is None else num_layers
    values = _values_by_name(graph)
    sites: list[AttentionSite] = []
    rejected: list[str] = []
    for node in graph:  # the main graph only: subgraphs hold what passes added
        if node.domain == "com.microsoft" and node.op_type == "GroupQueryAttention":
            bind, reason = check_gqa(node)
            if bind is None:
                rejected.append(f"{node.name}: {reason}")
                continue
            site = AttentionSite(
                layer=-1, form=GQA, anchor=node, mask_node=node, mask_index=GQA_BIAS_INDEX,
                base_mask=_base_mask(node, node.inputs[GQA_BIAS_INDEX], values), out=bind["out4"],
                v=node.inputs[4], q=node.inputs[0], k=node.inputs[3], scale=bind["scale"], new_k=node.inputs[1],
                new_v=node.inputs[2], heads=bind["heads"], effective_mask=_effective_mask(node, values))
        elif node.domain != "":
            continue
        elif node.op_type == "Softmax":
            bind, reason = check_decomposed(node)
            if bind is None:
                rejected.append(f"{node.name}: {reason}")
                continue
            add, mi = bind["add"], bind["mask_index"]
            site = AttentionSite(
                layer=-1, form=DECOMPOSED, anchor=node, mask_node=add, mask_index=mi,
                base_mask=_base_mask(add, add.inputs[mi], values), out=bind["pv"].outputs[0],
                v=bind["pv"].inputs[1], logits=bind["qk"].outputs[0], probs=bind["probs"])
        elif node.op_type == "Attention":
            bind, reason = check_attention_op(node)
            if bind is None:
                rejected.append(f"{node.name}: {reason}")
                continue
            site = AttentionSite(
                layer=-1, form=ATTENTION_OP, anchor=node, mask_node=node, mask_index=3,
                base_mask=_base_mask(node, node.inputs[3], values), out=node.outputs[0], v=node.inputs[2],
                q=node.inputs[0], k=node.inputs[1], scale=bind["scale"])
        else:
            continue
        layer = layer_of(node)
        if layer is None:
            rejected.append(f"{node.name}: attention-shaped, but no decoder layer index in its name or scopes")
            continue
        site.layer = layer
        sites.append(site)
    if not sites:
        return []
    by_layer: dict[int, list[AttentionSite]] = {}
    for s in sites:
        by_layer.setdefault(s.layer, []).append(s)
    twice = sorted(i for i, v in by_layer.items() if len(v) > 1)
    missing = sorted(set(range(num_layers)) - set(by_layer))
    extra = sorted(set(by_layer) - set(range(num_layers)))
    if twice or missing or extra:
        detail = "; ".join(filter(None, [
            f"missing layers {missing}" if missing else "",
            f"layers matched twice {twice}" if twice else "",
            f"layer indices outside 0..{num_layers - 1}: {extra}" if extra else "",
            f"rejected: {'; '.join(rejected[:4])}" if rejected else "",
        ]))
        raise PassError(f"expected one attention per decoder layer ({num_layers} layers), matched {len(sites)} "
                        f"in {len(by_layer)} layers: {detail}")
    return sorted(sites, key=lambda s: s.layer)
