"""Subgraphs shared by the CLVA and SEVI passes: the S/V/T regions of a pass, and attention recomputation.

METHODS.md notation: per batch row, V = the image-token key columns (`visual_mask`, restricted to real tokens),
T rows = the query rows of this pass after the row's last V column. The decoder's contract gives the pass
geometry: `attention_mask` [B, K] covers past + this pass (K = total_length), `inputs_embeds` [B, S, d].

    attention_mask ─Cast(bool)─► seen [B,K] ─┬──────────────── And ─► visual [B,K]
    visual_mask ─────────────────────────────┘                   │
    Range(0,K) ─► key_index [K] ─► Where(visual, key_index, -1) ─► max (ArgMax+GatherElements) ─► last_image [B,1] (-1: none)
    Range(K-S,K) ─► query_index [S] ─► Greater(·, last_image) ─┐
    last_image >= 0 ─► has_image [B,1] ───────────────────────┼─► And ─► t_rows [B,S]
    Gather(seen, query_index, axis=1) ─► seen rows [B,S] ──────┘
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from anchorrt.graph_passes.base import NEG_INF, Builder, PassError
from anchorrt.graph_passes.shapes import reduce_extreme

INT64_MAX = np.iinfo(np.int64).max
FLOAT, DOUBLE, BOOL, INT64 = ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.BOOL, ir.DataType.INT64


@dataclass
class Regions:
    seen: ir.Value  # [B, K] bool: real (non-pad) key columns
    visual: ir.Value  # [B, K] bool: V columns
    key_index: ir.Value  # [K] int64
    last_image: ir.Value  # [B, 1] int64, -1 for a row without image tokens
    has_image: ir.Value  # [B, 1] bool
    t_rows: ir.Value  # [B, S] bool
    seq_len: ir.Value  # [] int64 (S)
    total_len: ir.Value  # [] int64 (K)


def build_regions(b: Builder, attention_mask: ir.Value, visual_mask: ir.Value, inputs_embeds: ir.Value) -> Regions:
    one = b.const(np.int64(1), "one")
    seen = b.op("Cast", [attention_mask], "seen", to=BOOL)
    visual = b.op("And", [visual_mask, seen], "visual")
    total = b.op("Gather", [b.op("Shape", [attention_mask], "total_len"), one], "total_len", axis=0)
    seq = b.op("Gather", [b.op("Shape", [inputs_embeds], "seq_len"), one], "seq_len", axis=0)
    zero = b.const(np.int64(0), "zero")
    key_index = b.op("Range", [zero, total, one], "key_index")
    minus_one = b.const(np.int64(-1), "minus_one")
    last_image = reduce_extreme(b, b.op("Where", [visual, key_index, minus_one], "last_image"), 1, "last_image")
    has_image = b.op("GreaterOrEqual", [last_image, zero], "has_image")
    query_index = b.op("Range", [b.op("Sub", [total, seq], "past_len"), total, one], "query_index")
    after = b.op("Greater", [query_index, last_image], "after_image")  # [B, S]
    seen_rows = b.op("Gather", [seen, query_index], "seen_rows", axis=1)  # [B, S]
    t_rows = b.op("And", [b.op("And", [after, has_image], "t_rows"), seen_rows], "t_rows")
    return Regions(seen, visual, key_index, last_image, has_image, t_rows, seq, total)


def float_mask(b: Builder, mask: ir.Value) -> ir.Value:
    """An additive fp32 mask from the layer's mask: a bool mask becomes 0 (visible) / -inf (hidden), exactly what
    ONNX Runtime's Attention adds for a bool mask; a float mask is used as it is."""
    if mask.dtype == BOOL:
        return b.op("Where", [mask, b.const(np.float32(0.0), "zero_f"), b.const(np.float32(NEG_INF), "neg_inf")],
                    "float_mask", dtype=FLOAT)
    if mask.dtype not in (FLOAT, None):
        raise PassError(f"attention mask '{mask.name}' has dtype {mask.dtype}; only bool or float32 masks are supported")
    return mask


def static_heads(value: ir.Value, what: str) -> int:
    dim = value.shape[1] if value.shape is not None and value.shape.rank() == 4 else None
    if not isinstance(dim, int):
        raise PassError(f"the head count of {what} '{value.name}' is not static; cannot build the per-head subgraph")
    return dim


def recompute_logits(b: Builder, q_rows: ir.Value, k: ir.Value, heads: int, kv_heads: int, scale: float) -> ir.Value:
    """Scaled q kᵀ for some query rows of an `Attention` layer, with grouped-query heads.

        q_rows [B,H,R,D] ─Reshape─► [B,Hk,rep·R,D] ─Transpose─► [B,Hk,D,rep·R]
        k [B,Hk,K,D] ─MatMul(k, ·)─► [B,Hk,K,rep·R] ─Transpose─► [B,Hk,rep·R,K] ─Reshape─► [B,H,R,K] ─Mul(scale)

    The MatMul runs as k·qᵀ so that nothing of size K·D is transposed (at decode R = 1). Query head h reads key
    head h // rep, the ONNX Attention rule for 4-D inputs.
    """
    rep = heads // kv_heads
    q_grouped = b.op("Reshape", [q_rows, b.const(np.array([0, kv_heads, -1, 0], np.int64), "group_shape")],
                     "q_grouped") if rep > 1 else q_rows
    kq = b.op("MatMul", [k, b.op("Transpose", [q_grouped], "q_t", perm=[0, 1, 3, 2])], "k_q")
    logits = b.op("Transpose", [kq], "logits", perm=[0, 1, 3, 2])
    if rep > 1:
        logits = b.op("Reshape", [logits, b.const(np.array([0, heads, -1, 0], np.int64), "head_shape")], "logits")
    return b.op("Mul", [logits, b.const(np.float32(scale), "scale")], "logits", dtype=FLOAT)


def site_logits(b: Builder, site, q_rows: ir.Value, past_len: ir.Value | None = None, one_row: bool = False) -> ir.Value:
    """Scaled q kᵀ [B, H, R, K] of some query rows `q_rows` [B, H, R, D] (`query_rows`) of a RECOMPUTED-form site,
    over every key the layer sees in this pass (K = the mask's last dim).

    Fused GroupQueryAttention (pattern C): the keys are read where they are stored, never copied:

        q_rows [B,H,R,D] ─Reshape─Mul(scale)─► q [B,Hk,rep·R,D]
        q ─ MatMul(q, Transpose(past)) ─► [B,Hk,rep·R,M|P] ─Slice(0:P)─┐
        q ─ MatMul(q, Transpose(new4)) ─► [B,Hk,rep·R,S] ──────────────┴─Concat─Reshape─► [B,H,R,K]
        new_k [B,S,Hk·D] ─Reshape─Transpose─► new4 [B,Hk,S,D]

    P = K - S. `past` is the graph input in both cache contracts: past [B,Hk,P,D] (distinct buffers) or the shared
    max-length buffer [B,Hk,M,D], whose slots 0..P-1 hold the past whether the fused node has already written the
    new tokens after them or not; whatever the slots from P on hold (stale or never written) only reaches logit
    columns that the Slice drops (one logit reads one key row). Nothing reads the node's present outputs.

    Why this form: ONNX Runtime fuses MatMul(a, Transpose(b, perm [0,1,3,2])) into com.microsoft FusedMatMul with
    transB (MatMulTransposeFusion, inside If branches too), which reads K as stored: no [.., K, D] tensor is
    materialised. The former Concat(past[:, :, :P], new) + MatMul(k, qᵀ) copied the layer's key cache twice per pass
    (Slice, then Concat). One layer at decode (H 16, D 32, K 1024, 1 thread, ORT 1.32 CPU, process time): 0.045 ms
    against 0.34 ms for Slice+Concat+MatMul(k, qᵀ)+Transpose, 0.19 ms for MatMul(buffer, qᵀ)+Slice+Transpose (a GEMM
    of one column) and 0.25 ms for the ONNX Einsum; written as standard ops (not FusedMatMul itself) so that ONNX
    and ONNX Runtime's symbolic shape inference still read the graph. What it costs: one read of the buffer's M
    slots (M = the request's max length, so early decode steps also read the tail not yet written).

    The scale is a [1, Hk, 1, 1] constant of equal values, not a scalar: ONNX Runtime's MatMulScaleFusion folds a
    scalar Mul on a MatMul input into FusedMatMul's alpha, and that FusedMatMul ran 3-5x slower than the plain
    transB one (ORT 1.32 CPU, q [1,16,1,64] against a [1,16,2113,64] buffer: 1.2-1.9 ms a layer with alpha, 0.34-0.37
    ms without, 1 and 2 threads; in the bench decoder's SEVI and CLVA branches the past_scores FusedMatMul was the
    largest cost of a decode step with the flag on). Same products, same values: q·s is computed before the MatMul
    either way.

    `past_len` [1] int64: P, when the caller has it already (else taken from the mask and the query). `one_row`: the
    pass has one query row (a decode step), so the new key is reshaped to [B,Hk,1,D] without the Transpose.

    Opset 23 (`Attention`): k [B,Hk,K,D] is the op's own input (`recompute_logits`).
    """
    from anchorrt.graph_passes.attention_match import GQA

    heads = site.query_heads()
    kv_heads = static_heads(site.k, "the attention's key")
    if site.form != GQA:
        return recompute_logits(b, q_rows, site.k, heads, kv_heads, site.scale)
    d = site.k.shape[3]
    rep = heads // kv_heads
    grouped = q_rows if rep == 1 else b.op("Reshape", [q_rows, b.const(np.array([0, kv_heads, -1, d], np.int64),
                                                                           "q_group_shape")],
                                           "q_grouped")  # [B, Hk, rep·R, D]: query head h = g·rep + i reads key head g
    # R·H·D values, not R·H·K; per key head, so that ORT does not fold it into a slower FusedMatMul (see above)
    scale = np.full((1, kv_heads, 1, 1), site.scale, np.float32)
    grouped = b.op("Mul", [grouped, b.const(scale, "scale")], "q_scaled")
    if past_len is None:
        total = b.op("Shape", [site.base_mask], "total_length", start=3, end=4)  # [1] K
        seq = b.op("Shape", [site.q], "sequence", start=1, end=2)  # [1] S (q [B, S, H·D])
        past_len = b.op("Sub", [total, seq], "past_length")

    def scores(keys: ir.Value, what: str) -> ir.Value:  # q kᵀ, K read as stored (see above)
        return b.op("MatMul", [grouped, b.op("Transpose", [keys], f"{what}_t", perm=[0, 1, 3, 2])], what)

    old = b.op("Slice", [scores(site.k, "past_scores"), b.const(np.array([0], np.int64), "past_start"), past_len,
                         b.const(np.array([3], np.int64), "past_axis")], "past_scores")  # [B, Hk, rep·R, P]
    if one_row:  # [B, 1, Hk·D] is [B, Hk, 1, D] in memory
        new4 = b.op("Reshape", [site.new_k, b.const(np.array([0, kv_heads, 1, d], np.int64), "new_key_shape")],
                    "new_keys")
    else:
        new4 = b.op("Reshape", [site.new_k, b.const(np.array([0, 0, kv_heads, d], np.int64), "new_key_shape")],
                    "new_keys")
        new4 = b.op("Transpose", [new4], "new_keys", perm=[0, 2, 1, 3])  # [B, Hk, S, D]
    logits = b.op("Concat", [old, scores(new4, "new_scores")], "scores", axis=3, dtype=FLOAT)  # [B, Hk, rep·R, K]
    if rep == 1:
        return logits
    return b.op("Reshape", [logits, b.const(np.array([0, heads, -1, 0], np.int64), "scores_shape")], "logits",
                dtype=FLOAT)


def grouped_probs_matmul(b: Builder, probs: ir.Value, v: ir.Value, heads: int, kv_heads: int) -> ir.Value:
    """probs [B,H,R,K] @ v [B,Hk,K,D] -> [B,H,R,D] with query head h reading value head h // rep."""
    rep = heads // kv_heads
    if rep == 1:
        return b.op("MatMul", [probs, v], "probs_v")
    grouped = b.op("Reshape", [probs, b.const(np.array([0, kv_heads, -1, 0], np.int64), "group_shape")], "probs_grouped")
    out = b.op("MatMul", [grouped, v], "probs_v")
    return b.op("Reshape", [out, b.const(np.array([0, heads, -1, 0], np.int64), "head_shape")], "probs_v")


def slice_axis(b: Builder, x: ir.Value, start: ir.Value | int, axis: int, what: str, end: int | None = None) -> ir.Value:
    """x[..., start:end, ...] on one axis; `start` a constant or a [1] int64 value."""
    starts = b.const(np.array([start], np.int64), f"{what}_start") if isinstance(start, int) else start
    ends = b.const(np.array([INT64_MAX if end is None else end], np.int64), f"{what}_end")
    return b.op("Slice", [x, starts, ends, b.const(np.array([axis], np.int64), f"{what}_axis")], what)


def query_rows(b: Builder, site, start: ir.Value | int, what: str) -> ir.Value:
    """Rows `start:` of a RECOMPUTED-form site's rotated query as [B, H, R, D].

        opset 23: q [B,H,S,D] ─Slice(axis 2)─► [B,H,R,D]
        fused GQA: q [B,S,H·D] ─Slice(axis 1)─► [B,R,H·D] ─Reshape [B,R,H,D]─Transpose(0,2,1,3)─► [B,H,R,D]
    """
    from anchorrt.graph_passes.attention_match import GQA

    if site.form != GQA:
        return slice_axis(b, site.q, start, 2, what)
    rows = slice_axis(b, site.q, start, 1, what)
    d = site.k.shape[3]
    rows = b.op("Reshape", [rows, b.const(np.array([0, 0, site.query_heads(), d], np.int64), f"{what}_shape")], what)
    return b.op("Transpose", [rows], what, perm=[0, 2, 1, 3])


def attention_rows(b: Builder, site, start: ir.Value | int, what: str = "rows") -> ir.Value:
    """The post-softmax attention of query rows `start:` of one layer, as the layer applies it: [B, H, R, K].

        opset 18: probs [B,H,S,K] ─Slice(rows)─► [B,H,R,K]             (the layer's own Softmax, NaN guard included)
        opset 23 / fused GQA: q[:, :, rows] kᵀ·scale (site_logits) + mask[rows] ─Softmax─► [B,H,R,K]
                              (recomputed: the op hides its probabilities)

    The mask is the layer's current one (a CLVA bias baked before is included); SEVI's last-row edit is not seen.
    Shared by the IAVA probe (last row) and the explain pass (the T rows)."""
    from anchorrt.graph_passes.attention_match import RECOMPUTED

    if site.form not in RECOMPUTED:
        return slice_axis(b, site.probs, start, 2, f"probs_{what}")
    q_rows = query_rows(b, site, start, f"q_{what}")  # [B, H, R, D]
    logits = site_logits(b, site, q_rows)  # [B, H, R, K]
    mask_rows = slice_axis(b, float_mask(b, site.mask), start, 2, f"mask_{what}")  # [B, 1, R, K]
    return b.op("Softmax", [b.op("Add", [logits, mask_rows], "masked")], "probs", axis=-1)


SHARED_FLOAT_MASK = "/model/attn_mask/float/Where"


def shared_float_mask(graph: ir.Graph, base: ir.Value) -> ir.Value:
    """The exporter's mask as an fp32 additive mask, in the main graph, made once for every pass that needs it.

    A float mask is returned as it is; a bool mask (opset 23) gets one Where(mask, 0, -inf) node, reused by CLVA
    and SEVI so that a later pass can rewire a float consumer to a float replacement."""
    if base.dtype != BOOL:
        return float_mask(Builder("unused"), base)
    for node in graph:
        if node.name == SHARED_FLOAT_MASK and node.inputs[0] is base:
            return node.outputs[0]
    b = Builder("model/attn_mask", taken={n.name for n in graph})
    out = b.op("Where", [base, b.const(np.float32(0.0), "float/zero"), b.const(np.float32(NEG_INF), "float/neg_inf")],
               "float", dtype=FLOAT)
    graph.extend(b.nodes)
    return out
