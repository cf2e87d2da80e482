"""Packed QKV with GroupQueryAttention's own rotary: the fused decoder's last step, after the mitigation passes.

The fused form (graph_passes/fuse_attention.py, fuse_rotary.py, pack_matmul.py) feeds each layer's
GroupQueryAttention its rotated query and key as separate inputs, because the mitigation passes read them
(graph_passes/attention_match.py, pattern C). On the path every request takes (flags off) that costs three nodes a
layer that ONNX Runtime GenAI's decoder does not have: the Split of the packed projection and two
RotaryEmbedding. GroupQueryAttention does both itself when it is given the packed projection (its query input
[B, S, (H + 2·Hk)·D], key and value left empty) and `do_rotary=1` with the same cos/sin tables and positions
(ContribOperators.md, GroupQueryAttention: inputs cos_cache 7, sin_cache 8, position_ids 9):

    qkv ─Split([H·D, Hk·D, Hk·D])─┬─ q ─RotaryEmbedding(pos, cos, sin)─┐
                                  ├─ k ─RotaryEmbedding(pos, cos, sin)─┼─► GroupQueryAttention(do_rotary=0)
                                  └─ v ────────────────────────────────┘
becomes
    qkv ─► GroupQueryAttention(qkv, -, -, past, ..., cos, sin, pos, bias, query_seqlens; do_rotary=1,
                               rotary_interleaved=i)
    query_seqlens [B] int32 = S in every row (one Shape/Cast/Expand for the whole graph, from inputs_embeds)

Every `If` branch that reads the rotated query/key or the split values (CLVA's anchors, SEVI's last-row
logits, IAVA's probe: only when their flag is on) gets its own copy of the Split and the rotations at its start, so
only a request that turns a method on pays for them. Positions stay the runtime's `position_ids` (never slot
indices: left padding, IAVA's compacted rows), now read by the attention node itself.

`query_seqlens` (input 16) matters: onnxruntime 1.32's contract says of position_ids "when processing the first
prompt the kernel uses only the first element", and so it does without it: a first pass of a left-padded batch
(generate_batch, IAVA's streams, the exporter's verify) rotated row 0's keys at positions[0, 0] + slot, found by
the export's own verify (max |logit diff| 1.36 from the first decode step). With query_seqlens given (every row's S
new tokens real, which is what the runtime's passes are) the kernel reads position_ids per element there too:
bit-identical to the RotaryEmbedding form for a left-padded batch-2 prefill, positions with gaps, a batch-2 decode
step with different positions and a one-row pass over a past (session-local micro-graph, /tmp/s9/gqa_pos.py).

Measured (issue-18 bench decoder, int4, 2 threads, this 2-core CPU; one process, two sessions of each form, blocks
of 8 steps rotated, 16 rounds): logits bit-identical, the decode step packed / unpacked 0.965x and 0.962x at 300
tokens, 0.959x at 1100, 0.975x at 2100; fp32 0.968x at 300, 0.999x at 1100.

`UnpackQkvPass` is the inverse (the Split and the two rotations back in the main graph, do_rotary=0); the bake runs
it first and this pass last (graph_passes/bake.py), so mitigation passes always see pattern C and a decoder baked
twice is packed once. Left as it is (the reason per layer in `skipped`; count = layers packed): a node whose
query/key are not RotaryEmbedding of one three-way Split, rotations that differ (positions, tables, interleaving,
scale, partial rotary), tables that are not [T, D/2], a head size that is not a multiple of 16 (onnxruntime
1.32's CPU kernel refuses to rotate it: "head_size shall be a multiple of 16"), inputs after attention_bias, or a
rotated query/key/split value read by a main-graph node other than the attention (only readers inside `If`
branches can be given their own copy).

fp16/bf16 attention (the CUDA form, `--precision fp16`: onnxruntime's CUDA kernel is fp16/bf16 only) stays unpacked
unless `half=True`: the form measured and checked on the GPU (tests/test_cuda.py, the H200 bench) is the separate
RotaryEmbedding one, and the CUDA kernel's packed, self-rotating path (which, by its own notes, rotates keys at
implicit slot positions in some of its fused paths) has not been run on a GPU with left-padded batches here. The
fp16 conversion unpacks (graph_passes/bake.py `_precision_passes`); test_cuda's `fp16_packed` check packs with
`half=True`, and is the one to run before that default changes.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from anchorrt.graph_passes.attention_match import GQA_BIAS_INDEX, _int_attr
from anchorrt.graph_passes.base import META_LAYER, Builder, GraphPass, graph_input
from anchorrt.graph_passes.naming import layer_of
from anchorrt.graph_passes.pack_matmul import constant_tensor

MS_DOMAIN = "com.microsoft"
COS_INDEX, SIN_INDEX, POSITION_INDEX, QUERY_SEQLENS_INDEX = 7, 8, 9, 16
ROTARY_HEAD_MULTIPLE = 16  # onnxruntime 1.32 CPU, do_rotary=1: "head_size shall be a multiple of 16" (found running it)
HALF_TYPES = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
HALF_REASON = ("fp16/bf16 attention (the CUDA form): the CUDA kernel's packed, self-rotating path is not verified on "
               "a GPU yet (tests/test_cuda.py fp16_packed); the separate rotations stay")


def _float_attr(node: ir.Node, name: str, default: float) -> float:
    a = node.attributes.get(name)
    return float(a.value) if a is not None else default


def _is_gqa(node: ir.Node) -> bool:
    return node.domain == MS_DOMAIN and node.op_type == "GroupQueryAttention"


def _is_rotary(node: ir.Node | None) -> bool:
    return node is not None and node.domain == MS_DOMAIN and node.op_type == "RotaryEmbedding"


def _head_size(gqa: ir.Node) -> int | None:
    past = gqa.inputs[3] if len(gqa.inputs) > 3 else None
    d = past.shape[3] if past is not None and past.shape is not None and past.shape.rank() == 4 else None
    return d if isinstance(d, int) else None


def _const_ints(value: ir.Value | None) -> list[int] | None:
    tensor = constant_tensor(value)
    return None if tensor is None else [int(x) for x in np.asarray(tensor.numpy()).reshape(-1)]


def _inputs(node: ir.Node, n: int) -> list[ir.Value | None]:
    return list(node.inputs) + [None] * (n - len(node.inputs))


def match_packable(graph: ir.Graph, gqa: ir.Node) -> tuple[dict | None, str]:
    """(the chain {split, rq, rk, qkv, pos, cos, sin, interleaved}, "") or (None, why this node stays as it is)."""
    q, k, v, *_ = inputs = _inputs(gqa, GQA_BIAS_INDEX + 1)
    if _int_attr(gqa, "do_rotary") != 0:
        return None, "already rotates inside (do_rotary=1)"
    if any(x is not None for x in list(gqa.inputs)[GQA_BIAS_INDEX + 1:]):
        return None, "reads inputs after attention_bias (head_sink, quantized cache, query_seqlens)"
    if q is None or k is None or v is None or any(inputs[i] is not None for i in (COS_INDEX, SIN_INDEX, POSITION_INDEX)):
        return None, "not separate query/key/value inputs without cos/sin/position_ids"
    rq, rk = q.producer(), k.producer()
    if not (_is_rotary(rq) and _is_rotary(rk)) or rq.graph is not graph or rk.graph is not graph:
        return None, "query/key are not RotaryEmbedding outputs"
    if any(a is not b for a, b in zip(_inputs(rq, 4)[1:], _inputs(rk, 4)[1:])):
        return None, "query and key rotations read different positions or tables"
    pos, cos, sin = _inputs(rq, 4)[1:]
    if pos is None or cos is None or sin is None or pos.shape is None or pos.shape.rank() != 2:
        return None, "the rotation's position_ids are not [batch, sequence]"
    for r in (rq, rk):
        if _int_attr(r, "rotary_embedding_dim") or _int_attr(r, "is_packed_batching") or _float_attr(r, "scale", 1.0) != 1.0:
            return None, "partial, packed-batching or scaled rotation"
    interleaved = _int_attr(rq, "interleaved")
    if _int_attr(rk, "interleaved") != interleaved:
        return None, "query and key rotations differ in interleaving"
    split = rq.inputs[0].producer()
    if (split is None or split.op_type != "Split" or split.domain not in ("", "ai.onnx") or split.graph is not graph
            or len(split.outputs) != 3 or list(split.outputs) != [rq.inputs[0], rk.inputs[0], v]):
        return None, "query/key/value are not the three outputs of one Split"
    heads, kv_heads, d = _int_attr(gqa, "num_heads"), _int_attr(gqa, "kv_num_heads"), _head_size(gqa)
    if d is None or _int_attr(split, "axis", 0) not in (-1, 2):
        return None, "the Split is not along the last axis of a [B, S, N] projection (or the head size is not static)"
    if d % ROTARY_HEAD_MULTIPLE:
        return None, (f"head size {d} is not a multiple of {ROTARY_HEAD_MULTIPLE} (onnxruntime's GroupQueryAttention "
                      "refuses to rotate it)")
    if _const_ints(split.inputs[1] if len(split.inputs) > 1 else None) != [heads * d, kv_heads * d, kv_heads * d]:
        return None, "the Split's sizes are not [H·D, Hk·D, Hk·D]"
    if cos.shape is None or cos.shape.rank() != 2 or cos.shape[1] != d // 2 or sin.shape != cos.shape:
        return None, "the cos/sin tables are not [T, D/2] (full rotary)"
    chain = {split, rq, rk}
    for value in (*split.outputs, rq.outputs[0], rk.outputs[0]):
        if value.is_graph_output():
            return None, f"'{value.name}' is a graph output"
        for use in value.uses():
            if use.node.graph is graph and use.node is not gqa and use.node not in chain:
                return None, f"'{value.name}' is read by {use.node.op_type} '{use.node.name}' outside an If"
    return {"split": split, "rq": rq, "rk": rk, "qkv": split.inputs[0], "pos": pos, "cos": cos, "sin": sin,
            "interleaved": interleaved}, ""


def _top_branches(graph: ir.Graph) -> dict[int, ir.Graph]:
    """id(any subgraph, nested or not) -> the branch graph of the main-graph node that holds it."""
    out: dict[int, ir.Graph] = {}
    for node in graph:
        for top in _subgraphs(node):
            out[id(top)] = top
            out.update((id(g), top) for g in top.subgraphs())
    return out


def _subgraphs(node: ir.Node) -> list[ir.Graph]:
    subs = []
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            subs.append(attr.value)
        elif attr.type == ir.AttributeType.GRAPHS:
            subs.extend(attr.value)
    return subs


def _copy_node(node: ir.Node, inputs: list[ir.Value | None], suffix: str) -> ir.Node:
    attrs = [ir.Attr(a.name, a.type, a.value) for a in node.attributes.values()]
    copy = ir.Node(node.domain, node.op_type, inputs, attributes=attrs, num_outputs=len(node.outputs),
                   name=f"{node.name}{suffix}", metadata_props=dict(node.metadata_props) or None)
    for old, new in zip(node.outputs, copy.outputs):
        new.name, new.dtype, new.shape = f"{old.name}{suffix}", old.dtype, old.shape
    return copy


def _give_branches_their_copy(graph: ir.Graph, chain: dict, tops: dict[int, ir.Graph]) -> None:
    """Each branch graph that reads a value of the chain gets the Split (and the rotations it reads) at its start."""
    split, rq, rk = chain["split"], chain["rq"], chain["rk"]
    values = [*split.outputs, rq.outputs[0], rk.outputs[0]]
    by_branch: dict[int, list[tuple[ir.Node, int, ir.Value]]] = {}
    branches: dict[int, ir.Graph] = {}
    for value in values:
        for use in list(value.uses()):
            if use.node.graph is graph:
                continue
            top = tops[id(use.node.graph)]
            branches[id(top)] = top
            by_branch.setdefault(id(top), []).append((use.node, use.idx, value))
    for key, uses in by_branch.items():
        top = branches[key]
        suffix = f"/in{top.name or ''}"
        s = _copy_node(split, list(split.inputs), suffix)
        new = dict(zip(split.outputs, s.outputs))
        nodes = [s]
        read = {value for _, _, value in uses}
        for r in (rq, rk):
            if r.outputs[0] in read:
                c = _copy_node(r, [new[r.inputs[0]], *r.inputs[1:]], suffix)
                new[r.outputs[0]] = c.outputs[0]
                nodes.append(c)
        first = next(iter(top), None)
        if first is None:
            top.extend(nodes)
        else:
            top.insert_before(first, nodes)
        for node, idx, value in uses:
            node.replace_input_with(idx, new[value])


class PackQkvPass(GraphPass):
    """Packed QKV into GroupQueryAttention with do_rotary=1 (see the module docstring); count = layers packed."""

    name = "pack_qkv"

    def __init__(self, half: bool = False) -> None:
        super().__init__()
        self.half = half  # also pack fp16/bf16 attention (see the module docstring: not the default)
        self.skipped: dict[int, str] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        tops = _top_branches(graph)
        embeds = graph_input(graph, "inputs_embeds")
        query_seqlens = None
        for node in list(graph):
            if not _is_gqa(node):
                continue
            chain, reason = match_packable(graph, node)
            if chain is not None and not self.half and chain["qkv"].dtype in HALF_TYPES:
                chain, reason = None, HALF_REASON
            if chain is None or embeds is None:
                self.skipped[_layer(node)] = reason or "the decoder has no inputs_embeds input"
                continue
            if query_seqlens is None:
                query_seqlens = _query_seqlens(graph, embeds)
            _give_branches_their_copy(graph, chain, tops)
            node.resize_inputs(QUERY_SEQLENS_INDEX + 1)
            node.replace_input_with(QUERY_SEQLENS_INDEX, query_seqlens)
            node.replace_input_with(0, chain["qkv"])
            node.replace_input_with(1, None)
            node.replace_input_with(2, None)
            node.replace_input_with(COS_INDEX, chain["cos"])
            node.replace_input_with(SIN_INDEX, chain["sin"])
            node.replace_input_with(POSITION_INDEX, chain["pos"])
            node.attributes["do_rotary"] = ir.AttrInt64("do_rotary", 1)
            node.attributes["rotary_interleaved"] = ir.AttrInt64("rotary_interleaved", chain["interleaved"])
            graph.remove([chain["rk"], chain["rq"], chain["split"]], safe=True)
            self.count += 1
        return ir.passes.PassResult(model, modified=self.count > 0)


class UnpackQkvPass(GraphPass):
    """The inverse: a packed, self-rotating GroupQueryAttention (as PackQkvPass leaves it) gets its Split and
    RotaryEmbedding nodes back, so the mitigation passes find pattern C; count = layers unpacked."""

    name = "unpack_qkv"

    def __init__(self) -> None:
        super().__init__()
        self.layers: list[int] = []  # the layers unpacked (-1: a node without a layer tag)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        for node in list(graph):
            if not _is_gqa(node) or _int_attr(node, "do_rotary") != 1:
                continue
            qkv, k, v, *_ = inputs = _inputs(node, GQA_BIAS_INDEX + 1)
            cos, sin, pos = inputs[COS_INDEX], inputs[SIN_INDEX], inputs[POSITION_INDEX]
            d = _head_size(node)
            if k is not None or v is not None or pos is None or cos is None or sin is None or d is None:
                continue  # not PackQkvPass's form (e.g. positions derived from seqlens_k): left alone
            heads, kv_heads = _int_attr(node, "num_heads"), _int_attr(node, "kv_num_heads")
            interleaved = _int_attr(node, "rotary_interleaved")
            scope = f"/model/layers.{_layer(node)}/attn" if _layer(node) >= 0 else (node.name or "/attn")
            meta = {META_LAYER: str(_layer(node))} if _layer(node) >= 0 else None
            sizes = _sizes_initializer(graph, f"{scope}/q_k_v/split_sizes", [heads * d, kv_heads * d, kv_heads * d])
            split = ir.Node("", "Split", [qkv, sizes], attributes=[ir.AttrInt64("axis", -1)], num_outputs=3,
                            name=f"{scope}/q_k_v/Split", metadata_props=meta)
            rotated = []
            for what, n, x in (("query", heads, split.outputs[0]), ("key", kv_heads, split.outputs[1])):
                r = ir.Node(MS_DOMAIN, "RotaryEmbedding", [x, pos, cos, sin],
                            attributes=[ir.AttrInt64("num_heads", n), ir.AttrInt64("interleaved", interleaved)],
                            name=f"{scope}/rotary/{what}/RotaryEmbedding", metadata_props=meta)
                r.outputs[0].name = f"{r.name}_output_0"
                r.outputs[0].dtype = qkv.dtype
                rotated.append(r)
            lead = list(qkv.shape)[:2] if qkv.shape is not None and qkv.shape.rank() == 3 else ["batch", "sequence"]
            for i, (out, n) in enumerate(zip(split.outputs, (heads, kv_heads, kv_heads))):
                out.name, out.dtype, out.shape = f"{split.name}_output_{i}", qkv.dtype, ir.Shape([*lead, n * d])
            for r in rotated:
                r.outputs[0].shape = r.inputs[0].shape
            graph.insert_before(node, [split, *rotated])
            for i, value in ((0, rotated[0].outputs[0]), (1, rotated[1].outputs[0]), (2, split.outputs[2]),
                             (COS_INDEX, None), (SIN_INDEX, None), (POSITION_INDEX, None)):
                node.replace_input_with(i, value)
            node.attributes["do_rotary"] = ir.AttrInt64("do_rotary", 0)
            node.attributes.pop("rotary_interleaved", None)
            seqlens = node.inputs[QUERY_SEQLENS_INDEX] if len(node.inputs) > QUERY_SEQLENS_INDEX else None
            node.resize_inputs(GQA_BIAS_INDEX + 1)
            if seqlens is not None and not seqlens.uses():
                _remove_unused_chain(graph, seqlens)
            self.layers.append(_layer(node))
            self.count += 1
        return ir.passes.PassResult(model, modified=self.count > 0)


def _sizes_initializer(graph: ir.Graph, name: str, sizes: list[int]) -> ir.Value:
    """The Split's sizes as an initializer; one left by an earlier unpack (the branches' copies read it) is reused."""
    existing = graph.initializers.get(name)
    if existing is not None and existing.const_value is not None and \
            existing.const_value.numpy().tolist() == sizes:
        return existing
    k = 0
    while name in graph.initializers:
        k += 1
        name = f"{name}_{k}"
    value = ir.Value(name=name, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([3]),
                     const_value=ir.tensor(np.array(sizes, np.int64), name=name))
    graph.register_initializer(value)
    return value


def _query_seqlens(graph: ir.Graph, embeds: ir.Value) -> ir.Value:
    """[B] int32, every entry S (the pass's new tokens, all of them real), from inputs_embeds [B, S, d]; at the
    start of the graph. With it ONNX Runtime's kernel reads position_ids per element in a first prompt too (without
    it, "the kernel uses only the first element" there: a left-padded row is rotated at the wrong positions)."""
    b = Builder("model/attn_fused/query_seqlens")
    seq = b.op("Cast", [b.op("Shape", [embeds], "sequence", start=1, end=2)], "sequence", to=ir.DataType.INT32)
    out = b.op("Expand", [seq, b.op("Shape", [embeds], "batch", start=0, end=1)], "query_seqlens")
    out.dtype, out.shape = ir.DataType.INT32, ir.Shape([embeds.shape[0] if embeds.shape is not None else "batch"])
    first = next(iter(graph), None)
    if first is None:
        graph.extend(b.nodes)
    else:
        graph.insert_before(first, b.nodes)
    return out


def _remove_unused_chain(graph: ir.Graph, value: ir.Value) -> None:
    """Remove `value`'s producer and, recursively, producers left without readers (query_seqlens' four nodes)."""
    node = value.producer()
    if node is None or node.graph is not graph or any(o.uses() or o.is_graph_output() for o in node.outputs):
        return
    inputs = [x for x in node.inputs if x is not None]
    graph.remove(node, safe=True)
    for x in inputs:
        _remove_unused_chain(graph, x)


def _layer(node: ir.Node) -> int:
    layer = layer_of(node)
    return -1 if layer is None else int(layer)


__all__ = ["PackQkvPass", "UnpackQkvPass", "match_packable"]
