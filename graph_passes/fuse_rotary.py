"""Fused rotary embedding on the fused decoder form: each layer's query and key rotation (RoFormer, Su et al. 2021,
eq. 34 in the "rotate_half" layout of transformers' Llama: x·cos + rotate_half(x)·sin) becomes one
`com.microsoft.RotaryEmbedding` per input of the layer's GroupQueryAttention: 22 nodes fewer per layer (the issue-18
bench decoder, 16 layers: 960 -> 599 nodes; ONNX Runtime GenAI's has 187). Measured on that decoder's rotary alone
(the 16 layers' section cut out, int4 projections' outputs in, ORT 1.32 CPU, 1 thread, CPU time, loaded machine):
a decode step 0.21 -> 0.064 ms, a 2100-token prefill 176 -> 19 ms. A whole decode step moves by less than this
machine's session-to-session spread (about 10%): the rotary was not where most of the small nodes' time went.

Per layer, for the query (GQA input 0) and the key (GQA input 1) — graph_passes/fuse_attention.py made the 3-D side:

    proj [B,S,N·D] ─Reshape─► [B,S,N,D] ─Transpose(0,2,1,3)─► x [B,N,S,D] ─┬─────────────────── Mul(·, cos) ─┐
                                        x ─Slice(D/2:D)─Neg─┐               │                                   Add ─► r
                                        x ─Slice(0:D/2)─────┴─Concat(-1)─► rotate_half(x) ─Mul(·, sin) ──────┘
    r [B,N,S,D] ─Transpose(0,2,1,3)─Reshape(0,0,-1)─► GroupQueryAttention input [B,S,N·D]
    cos, sin [B,1,S,D]: the exporter's own subgraph of position_ids (inv_freq, rope scaling, attention scaling)

becomes

    proj [B,S,N·D] ─┐
    position_ids ───┼─► RotaryEmbedding(num_heads=N, interleaved=0) ─► GroupQueryAttention input [B,S,N·D]
    cos_cache, sin_cache [T, D/2] (constants) ─┘

GroupQueryAttention keeps do_rotary=0 and its separate q/k/v inputs here: the mitigation passes read its rotated
query and new keys (graph_passes/attention_match.py, pattern C). graph_passes/pack_qkv.py, the form's last pass
(after any bake), then moves the rotation into the attention node and gives each mitigation branch its own copy. Positions stay the runtime's `position_ids` input
(left padding, IAVA's streams), looked up in the table; never slot indices.

The tables are not re-derived per rope type: the values the pattern multiplies by are evaluated, with their own
subgraph (onnx.reference, no onnxruntime or torch), on position_ids = arange(T)[None]. A layer is fused only when
that subgraph reads no graph input but a 2-D `position_ids` [B, S], its result is one row per position (checked
again on a small batch of scattered positions against the table), and the row has the rotate_half layout
(cos[:, :D/2] == cos[:, D/2:]), so the op's cache is its first half. T is the caller's `max_positions` (the
manifest's context length, capped at MAX_TABLE_POSITIONS by graph_passes/bake.py, which lowers the context length
to T when it caps: the runtime refuses a prompt past it in one line, runtime/prompt.py). ONNX Runtime 1.32 refuses
a position outside [0, T) itself (INVALID_ARGUMENT, "position_ids value ... is out of range").

Left as exported, with the reason in `skipped` (count = layers fused; 0 is allowed): M-RoPE (Qwen2-VL's
position_ids [3, B, S]), partial rotary (a slice of the head), interleaved pairs, anything whose cos/sin read
another input; a layer is fused for both its query and its key or not at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as ir_common
from anchorrt.graph_passes.base import META_LAYER, GraphPass, graph_input
from anchorrt.graph_passes.naming import AssignNodeNames, layer_of
from anchorrt.graph_passes.shapes import annotate_missing

MS_DOMAIN = "com.microsoft"
FLOAT = ir.DataType.FLOAT
MAX_TABLE_POSITIONS = 32_768  # rows of the cos/sin tables: 2 x 16 MiB at head size 128; longer contexts are capped
TABLE_NAMES = ("model.rotary_emb.cos_cache", "model.rotary_emb.sin_cache")


@dataclass
class RotatedInput:
    """One GroupQueryAttention input that is the exporter's rotation of a 3-D projection."""

    proj: ir.Value  # [B, S, N·D], before the head reshape
    heads: int
    head_dim: int
    cos: ir.Value  # what x is multiplied by [B, 1, S, D]
    sin: ir.Value  # what rotate_half(x) is multiplied by


def _ints(value: ir.Value | None) -> list[int] | None:
    """The integer contents of a constant (an initializer or a Constant node's output)."""
    if value is None:
        return None
    cv = value.const_value
    node = value.producer()
    if cv is None and node is not None and node.op_type == "Constant" and "value" in node.attributes:
        cv = node.attributes["value"].value
    if cv is None:
        return None
    array = np.asarray(cv.numpy())
    return [int(x) for x in array.reshape(-1)] if array.dtype.kind in "iu" else None


def _producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type and node.domain == "" else None


def _transpose_0213(value: ir.Value | None) -> ir.Node | None:
    node = _producer(value, "Transpose")
    perm = node.attributes.get("perm") if node is not None else None
    return node if perm is not None and list(perm.value) == [0, 2, 1, 3] else None


def _half_slice(node: ir.Node | None, x: ir.Value, d: int) -> str | None:
    """'low' for Slice(x, 0, D/2) and 'high' for Slice(x, D/2, >=D) on the last axis (step 1), else None."""
    if node is None or node.op_type != "Slice" or node.domain != "" or node.inputs[0] is not x:
        return None
    inputs = list(node.inputs) + [None] * (5 - len(node.inputs))
    starts, ends = _ints(inputs[1]), _ints(inputs[2])
    axes = _ints(inputs[3]) if inputs[3] is not None else [3]
    steps = _ints(inputs[4]) if inputs[4] is not None else [1]
    if None in (starts, ends, axes, steps) or len(starts) != 1 or axes[0] not in (3, -1) or steps != [1]:
        return None
    if starts == [0] and ends == [d // 2]:
        return "low"
    if starts == [d // 2] and ends[0] >= d:
        return "high"
    return None


def _rotate_half_of(value: ir.Value, d: int) -> ir.Value | None:
    """x for Concat(Neg(Slice(x, D/2:)), Slice(x, :D/2), axis=-1), else None."""
    cat = _producer(value, "Concat")
    if cat is None or len(cat.inputs) != 2 or int(cat.attributes["axis"].value) not in (3, -1):
        return None
    neg = _producer(cat.inputs[0], "Neg")
    low = cat.inputs[1].producer()
    high = neg.inputs[0].producer() if neg is not None else None
    if high is None or low is None:
        return None
    x = high.inputs[0]
    return x if _half_slice(high, x, d) == "high" and _half_slice(low, x, d) == "low" else None


def match_rotated(value: ir.Value) -> tuple[RotatedInput | None, str]:
    """A GroupQueryAttention query/key input -> (RotatedInput, "") or (None, reason)."""
    back = _producer(value, "Reshape")
    r = _transpose_0213(back.inputs[0]) if back is not None else None
    if r is None or value.shape is None or value.shape.rank() != 3:
        return None, "is not Reshape(Transpose(·, 0,2,1,3)) to [B, S, N·D]"
    if _ints(back.inputs[1]) not in ([0, 0, -1],):
        return None, "is not reshaped with [0, 0, -1] (heads merged into the last axis)"
    rotated = r.inputs[0]
    add = _producer(rotated, "Add")
    if add is None:
        return None, "is not rotated by x·cos + rotate_half(x)·sin (no Add)"
    muls = [_producer(v, "Mul") for v in add.inputs]
    if None in muls:
        return None, "is not rotated by x·cos + rotate_half(x)·sin (the Add's operands are not two Muls)"
    shape = rotated.shape
    if shape is None or shape.rank() != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int) \
            or shape[3] % 2:
        return None, "the rotated value is not [B, N, S, D] with static heads and an even head size"
    heads, d = shape[1], shape[3]
    found = None
    for rot_mul, plain_mul in (muls, muls[::-1]):
        for i in (0, 1):
            x = _rotate_half_of(rot_mul.inputs[i], d)
            if x is None:
                continue
            sin = rot_mul.inputs[1 - i]
            for j in (0, 1):
                if plain_mul.inputs[j] is x:
                    found = (x, plain_mul.inputs[1 - j], sin)
    if found is None:
        return None, ("is not rotated by x·cos + rotate_half(x)·sin over the whole head (partial or interleaved "
                      "rotary, or another layout)")
    x, cos, sin = found
    split = _producer(_transpose_0213(x).inputs[0], "Reshape") if _transpose_0213(x) is not None else None
    proj = split.inputs[0] if split is not None else None
    if proj is None or proj.shape is None or proj.shape.rank() != 3 or proj.shape[2] != heads * d:
        return None, f"the rotated x is not Transpose(Reshape(projection [B, S, {heads * d}]))"
    rshape = split.outputs[0].shape
    if rshape is None or rshape.rank() != 4 or list(rshape)[2:] != [heads, d]:
        return None, f"the projection is not split into [B, S, {heads}, {d}]"
    if proj.dtype != FLOAT or cos.dtype != FLOAT or sin.dtype != FLOAT:
        return None, "the projection or cos/sin are not float32 (fuse the fp32 export, convert afterwards)"
    return RotatedInput(proj, heads, d, cos, sin), ""


# ------------------------------------------------------------------------------------------- cos/sin tables


def _upstream(values: list[ir.Value], graph: ir.Graph) -> tuple[list[ir.Node], set[ir.Value], str]:
    """The nodes computing `values` (graph order), the graph inputs they read, or a reason they cannot be
    evaluated on their own."""
    seen: set[ir.Node] = set()
    inputs: set[ir.Value] = set()
    stack = list(values)
    visited: set[ir.Value] = set()
    while stack:
        v = stack.pop()
        if v in visited:
            continue
        visited.add(v)
        node = v.producer()
        if node is None:
            if v.is_graph_input():
                inputs.add(v)
            elif not v.is_initializer() or v.const_value is None:
                return [], inputs, f"'{v.name}' is neither a graph input nor a constant"
            continue
        if node.graph is not graph:
            return [], inputs, f"'{v.name}' is computed inside a subgraph"
        if any(a.type == ir.AttributeType.GRAPH or a.type == ir.AttributeType.GRAPHS
               for a in node.attributes.values()):
            return [], inputs, f"'{v.name}' comes from a node with subgraphs ({node.op_type})"
        if node not in seen:
            seen.add(node)
            stack.extend(i for i in node.inputs if i is not None)
    return [n for n in graph if n in seen], inputs, ""


def _evaluator(model: ir.Model, nodes: list[ir.Node], outputs: list[ir.Value], position_ids: ir.Value):
    """onnx.reference over `nodes` alone: position_ids -> outputs."""
    from onnx.reference import ReferenceEvaluator

    initializers, names = [], set()
    for node in nodes:
        for v in node.inputs:
            if v is not None and v.is_initializer() and v.name not in names:
                names.add(v.name)
                initializers.append(ir.serde.serialize_tensor(ir.tensor(v.const_value.numpy(), name=v.name)))
    graph = onnx.helper.make_graph(
        [ir.serde.serialize_node(n) for n in nodes], "rotary_tables",
        [onnx.helper.make_tensor_value_info(position_ids.name, onnx.TensorProto.INT64, None)],
        [onnx.helper.make_tensor_value_info(v.name, onnx.TensorProto.FLOAT, None) for v in outputs],
        initializer=initializers)
    opsets = [onnx.helper.make_opsetid(domain, version) for domain, version in model.opset_imports.items()]
    return ReferenceEvaluator(onnx.helper.make_model(graph, opset_imports=opsets, ir_version=model.ir_version))


def _as_rows(array: np.ndarray, rows: int, d: int) -> np.ndarray | None:
    """[1.., rows, D] with unit dims elsewhere (the broadcast [B=1, 1, S, D]) -> [rows, D], else None."""
    if array.ndim < 2 or array.shape[-2:] != (rows, d) or any(s != 1 for s in array.shape[:-2]):
        return None
    return array.reshape(rows, d)


def rotary_tables(model: ir.Model, values: list[ir.Value], head_dims: dict[ir.Value, int], positions: int
                  ) -> tuple[dict[ir.Value, np.ndarray], dict[ir.Value, str]]:
    """Each cos/sin value of `values` as a table [positions, D/2] (the first half of a rotate_half row), or the
    reason it is not one. Values whose subgraph reads anything but a 2-D `position_ids` are refused unevaluated."""
    graph = model.graph
    tables: dict[ir.Value, np.ndarray] = {}
    refused: dict[ir.Value, str] = {}
    position_ids = graph_input(graph, "position_ids")
    if position_ids is None:
        return tables, dict.fromkeys(values, "the decoder has no position_ids input")
    if position_ids.shape is None or position_ids.shape.rank() != 2 or position_ids.dtype != ir.DataType.INT64:
        return tables, dict.fromkeys(values, f"position_ids is {position_ids.shape} (not [B, S] int64: M-RoPE or "
                                             "another position layout); one table row per position does not apply")
    unique: list[np.ndarray] = []
    probe_ids = np.array([[positions - 1, 0, 2 % positions], [1, 1, positions // 2]], np.int64)  # [2, 3]
    for v in values:  # one at a time: a full [T, D] table each (a shared evaluation would hold all at once)
        nodes, inputs, reason = _upstream([v], graph)
        if reason:
            refused[v] = f"cos/sin: {reason}"
            continue
        if inputs != {position_ids}:
            others = sorted(i.name for i in inputs if i is not position_ids)
            refused[v] = f"cos/sin read {', '.join(others)}" if others else "cos/sin do not depend on position_ids"
            continue
        try:
            run = _evaluator(model, nodes, [v], position_ids)
            (array,) = run.run(None, {position_ids.name: np.arange(positions, dtype=np.int64)[None]})
            (scattered,) = run.run(None, {position_ids.name: probe_ids})
        except Exception as exc:  # noqa: BLE001 - onnx.reference raises whatever its op implementations raise
            refused[v] = f"cannot evaluate the cos/sin subgraph ({exc})"[:200]
            continue
        d = head_dims[v]
        rows = _as_rows(np.asarray(array), positions, d)
        if rows is None:
            refused[v] = f"cos/sin evaluate to {np.shape(array)}, not one row of {d} per position"
            continue
        scattered = np.asarray(scattered)
        if scattered.size != probe_ids.size * d or not np.allclose(
                scattered.reshape(*probe_ids.shape, d), rows[probe_ids], rtol=0, atol=1e-6):
            refused[v] = "cos/sin are not a function of each token's position alone"
            continue
        if not np.array_equal(rows[:, : d // 2], rows[:, d // 2:]):
            refused[v] = "cos/sin halves differ (not the rotate_half layout)"
            continue
        half = np.ascontiguousarray(rows[:, : d // 2], dtype=np.float32)
        tables[v] = next((t for t in unique if t.shape == half.shape and np.array_equal(t, half)), half)
        if tables[v] is half:
            unique.append(half)  # every layer's Unsqueeze(cos) gives the same table: keep one copy
    return tables, refused


# --------------------------------------------------------------------------------------------------- pass


class FuseRotaryPass(GraphPass):
    """Replace the exporter's rotary on every GroupQueryAttention's query and key by RotaryEmbedding; count =
    layers fused (0: none matched, the graph is left as it is). `skipped`: layer -> why it was left as exported.

    `max_positions`: rows of the cos/sin tables (positions 0..max_positions-1); None leaves every layer as
    exported (the table size comes from the manifest: graph_passes/bake.py `fused_form_passes`)."""

    name = "fuse_rotary"

    def __init__(self, max_positions: int | None = None):
        super().__init__()
        self.max_positions = max_positions
        self.skipped: dict[int, str] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self.count, self.skipped = 0, {}
        gqa = [n for n in graph if n.domain == MS_DOMAIN and n.op_type == "GroupQueryAttention"]
        if not gqa:
            return ir.passes.PassResult(model, modified=False)
        plans: list[tuple[ir.Node, int, RotatedInput, RotatedInput]] = []
        for node in gqa:
            layer = layer_of(node)
            layer = -1 if layer is None else layer
            if self.max_positions is None or self.max_positions < 1:
                self.skipped[layer] = "no table size given (max_positions)"
                continue
            sides = []
            for index, what in ((0, "query"), (1, "key")):
                side, reason = match_rotated(node.inputs[index]) if node.inputs[index] is not None else (None, "absent")
                if side is None:
                    self.skipped[layer] = f"the {what} {reason}"
                    break
                sides.append(side)
            if len(sides) == 2:
                plans.append((node, layer, sides[0], sides[1]))
        if not plans:
            return ir.passes.PassResult(model, modified=False)

        head_dims = {}
        for _, _, q, k in plans:
            for side in (q, k):
                head_dims[side.cos], head_dims[side.sin] = side.head_dim, side.head_dim
        tables, refused = rotary_tables(model, list(head_dims), head_dims, self.max_positions)
        consts: list[tuple[int, np.ndarray, ir.Value]] = []
        taken = {n.name for n in graph.all_nodes()}
        position_ids = graph_input(graph, "position_ids")
        for node, layer, q, k in plans:
            reason = next((refused[v] for side in (q, k) for v in (side.cos, side.sin) if v in refused), None)
            if reason is not None:
                self.skipped[layer] = reason
                continue
            for index, what, side in ((0, "query", q), (1, "key", k)):
                caches = [self._constant(graph, tables[v], kind, consts) for kind, v in enumerate((side.cos, side.sin))]
                name = _unique(f"/model/layers.{layer}/attn/rotary/{what}/RotaryEmbedding", taken)
                rope = ir.Node(MS_DOMAIN, "RotaryEmbedding", [side.proj, position_ids, *caches],
                               attributes=ir.convenience.convert_attributes({
                                   "num_heads": side.heads, "interleaved": 0}),
                               name=name, metadata_props={META_LAYER: str(layer)})
                out = rope.outputs[0]
                out.name, out.dtype, out.shape = f"{name}_output_0", FLOAT, side.proj.shape
                graph.insert_before(node, rope)
                node.replace_input_with(index, out)
            self.count += 1
        if not self.count:
            return ir.passes.PassResult(model, modified=False)
        ir_common.RemoveUnusedNodesPass()(model)
        AssignNodeNames()(model)
        model.opset_imports.setdefault(MS_DOMAIN, 1)
        graph.sort()
        annotate_missing(model)
        return ir.passes.PassResult(model, modified=True)

    @staticmethod
    def _constant(graph: ir.Graph, table: np.ndarray, kind: int, consts: list[tuple[int, np.ndarray, ir.Value]]
                  ) -> ir.Value:
        """One initializer per distinct table (every layer reads the same two in the exporter's graphs)."""
        for k, known, value in consts:
            if k == kind and (known is table or known.shape == table.shape and np.array_equal(known, table)):
                return value
        base = TABLE_NAMES[kind]
        name = base if base not in graph.initializers else f"{base}_{len(consts)}"
        value = ir.Value(name=name, type=ir.TensorType(FLOAT), shape=ir.Shape(table.shape),
                         const_value=ir.tensor(table, name=name))
        graph.register_initializer(value)
        consts.append((kind, table, value))
        return value


def _unique(name: str, taken: set[str]) -> str:
    out, k = name, 0
    while out in taken:
        k += 1
        out = f"{name}_{k}"
    taken.add(out)
    return out


__all__ = ["FuseRotaryPass", "MAX_TABLE_POSITIONS", "match_rotated", "rotary_tables"]
