"""Sibling weight MatMuls that read the same activation become one MatMul and a Split (the decoder's q/k/v and
gate/up projections), as ONNX Runtime GenAI's model builder packs them.

FIELD-NOTES "Where the decoder's time goes": with int4 `MatMulNBits` (accuracy level 4, hidden 1024 x 16 layers,
ctx 300) the projections cost 8.68 ms a step in 113 nodes against GenAI's 7.87 ms in 81: one wide MatMul reads the
activation once, quantizes it once (accuracy level 4) and runs one kernel instead of three; every node also costs
a fixed overhead per step.

    x ─MatMul(W_q [K,Nq])─► q ─(Add b_q)─► q'              x ─MatMul(W [K,Nq+Nk+Nv])─(Add [b_q;b_k;b_v])─► qkv
    x ─MatMul(W_k [K,Nk])─► k ─(Add b_k)─► k'      ==>      qkv ─Split(axis=-1, split=[Nq,Nk,Nv])─► q', k', v'
    x ─MatMul(W_v [K,Nv])─► v ─(Add b_v)─► v'                 (W = [W_q | W_k | W_v] concatenated along N)

The Split's outputs take the old outputs' names, types, shapes and readers, so nothing downstream changes: the
Reshape/Transpose (and rotary) that lead to GroupQueryAttention's separate q/k/v inputs, the MLP's SiLU and Mul.
The mitigation passes find their sites through GroupQueryAttention's own inputs (graph_passes/attention_match.py,
pattern C), never through a projection, so they run on the packed form as before.

Which MatMuls (checked per member; one that does not fit stays as it is, the others may still pack):
  - an ONNX `MatMul` of the main graph whose input 0 is the shared activation and whose input 1 is a constant 2-D
    weight: an initializer that is not a graph input, or a `Constant` node's tensor; read by this MatMul alone
    (a weight read elsewhere would be stored twice); its output is no graph output;
  - members are grouped by (activation, weight dtype, K); a group of two or more is packed (count = groups packed;
    nothing is refused: a graph with no group is left as it is, count 0).
Biases (Qwen2's q/k/v): when every member's only reader is an `Add` with a constant 1-D bias [Ni] of the weight's
dtype, the biases are packed too (one Add before the Split); otherwise any bias Adds stay on the Split's outputs.
Members are concatenated in graph order (q, k, v as exported). The packed weight is a new initializer (written to
the artifact's external-data file when the graph has one, like every other weight, graph_passes/pipeline.py
`save_model`); the old weights are removed, so the artifact does not grow.

Quantization afterwards (graph_passes/quantize.py) sees one MatMul with a constant [K, ΣN] weight: int4 blocks run
along K within one output column and int8 scales are per column, so the packed weight quantizes to exactly the
members' codes and scales side by side (tests/test_pack_matmul.py checks it). The bake runs this pass on the
decoder only (graph_passes/bake.py `fused_form_passes`); it is generic ONNX and would run on any graph.

Measured (bench decoder, hidden 1024 x 16 layers, ORT 1.32 CPU, this shared 2-core machine, 2026-11-28): 960 -> 944
nodes, 113 -> 65 MatMul / MatMulNBits, 32 Splits added; logits bit-identical (fp32 and int4); decoder file
954.57 -> 954.43 MB. Separate processes in alternating order, 1 thread, CPU time: one decode step at ctx 300 fp32
0.97-1.01x, int4 1.02-1.03x (q/k/v packed alone 1.01x, gate/up alone 1.035x: ORT's MatMulNBits kernel took longer
for one [1024, 5632] weight than for two [1024, 2816]); a 2100-token prefill fp32 1.02x, int4 1.01x. So no gain at
one thread; what packing removes is per-node work (fewer kernels, one activation quantization, one thread-pool
dispatch instead of three), which two threads would show, but 2-thread timings on the loaded machine spread
0.6-1.2x per round (medians 0.91-1.00x) and could not decide it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from anchorrt.graph_passes.base import META_LAYER, Builder, GraphPass, decoder_opset
from anchorrt.graph_passes.naming import layer_of
from anchorrt.graph_passes.shapes import annotate_missing

MIN_OPSET = 13  # Split takes `split` as an input from opset 13


def constant_tensor(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The constant behind `value`: an initializer that is not a graph input, or a `Constant` node's `value`
    (read lazily: an external-data weight is only loaded when it is packed)."""
    if value is None or (value.graph is not None and any(v is value for v in value.graph.inputs)):
        return None  # a graph input (an overridable initializer too) is not a constant
    if value.is_initializer():
        return value.const_value
    node = value.producer()
    if node is not None and node.op_type == "Constant" and node.domain == "" and "value" in node.attributes:
        return node.attributes["value"].value
    return None


@dataclass
class Member:
    node: ir.Node  # the MatMul
    weight: ir.TensorProtocol  # [K, N]
    add: ir.Node | None = None  # its bias Add, when it has one of the packable form
    bias: ir.TensorProtocol | None = None  # [N]

    @property
    def n(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out(self) -> ir.Value:
        """What the Split output replaces: the bias Add's output when the bias is packed, else the MatMul's."""
        return self.add.outputs[0] if self.add is not None else self.node.outputs[0]


def check_member(node: ir.Node, graph: ir.Graph) -> tuple[Member | None, str]:
    """A MatMul that may join a pack -> (Member, "") or (None, reason)."""
    if node.op_type != "MatMul" or node.domain != "" or node.graph is not graph:
        return None, "not an ONNX MatMul of the main graph"
    w_value = node.inputs[1]
    w = constant_tensor(w_value)
    if w is None:
        return None, "its weight is not a constant (initializer or Constant)"
    if len(w.shape) != 2:
        return None, f"its weight has rank {len(w.shape)}, not 2"
    if len(list(w_value.uses())) != 1:
        return None, "its weight is read by another node too"
    if node.outputs[0].is_graph_output():
        return None, "its output is a graph output"
    return Member(node, w), ""


def _bias_of(member: Member) -> tuple[ir.Node, ir.TensorProtocol] | None:
    """The member's only reader as Add(out, b) with a constant b [N] of the weight's dtype, else None."""
    out = member.node.outputs[0]
    uses = list(out.uses())
    if len(uses) != 1:
        return None
    add = uses[0].node
    if add.op_type != "Add" or add.domain != "" or add.graph is not member.node.graph or len(add.inputs) != 2 \
            or add.outputs[0].is_graph_output():
        return None
    other = add.inputs[1 - uses[0].idx]
    b = constant_tensor(other)
    if b is None or tuple(b.shape) != (member.n,) or b.dtype != member.weight.dtype or other is out:
        return None
    return add, b


def sibling_groups(graph: ir.Graph) -> list[list[Member]]:
    """Groups of >= 2 members reading the same activation with weights of the same dtype and K, in graph order."""
    by_key: dict[tuple[int, ir.DataType, int], list[Member]] = {}
    for node in graph:
        if node.op_type != "MatMul" or node.domain != "" or node.inputs[0] is None:
            continue
        member, _ = check_member(node, graph)
        if member is None:
            continue
        key = (id(node.inputs[0]), member.weight.dtype, int(member.weight.shape[0]))
        by_key.setdefault(key, []).append(member)
    return [g for g in by_key.values() if len(g) >= 2]


def _packed_scope(members: list[Member]) -> str:
    """`/model/layers.0/attn/q_proj/MatMul_0`, `.../k_proj/...`, `.../v_proj/...` -> `model/layers.0/attn/q_k_v_proj`
    (`model/layers.0/mlp/gate_up_proj`); names that are not `/scope/leaf/Op` -> `{scope}/packed`."""
    parts = [(m.node.name or "").strip("/").split("/") for m in members]
    if all(len(p) >= 3 for p in parts) and len({tuple(p[:-2]) for p in parts}) == 1:
        leaves = [p[-2] for p in parts]
        stem = "_".join(leaf.removesuffix("_proj") for leaf in leaves)
        return "/".join(parts[0][:-2] + [stem + ("_proj" if all(x.endswith("_proj") for x in leaves) else "")])
    parent = parts[0][:-1] if parts[0] and parts[0][0] else ["graph"]
    return "/".join(parent + ["packed"])


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    while name in graph.initializers:
        name += "_"
    value = ir.Value(name=name, type=ir.TensorType(ir.DataType.from_numpy(array.dtype)), shape=ir.Shape(array.shape),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def _drop_constant(graph: ir.Graph, value: ir.Value) -> None:
    """Remove a weight or bias nothing reads any more (the initializer, or the Constant node that made it)."""
    if value.uses():
        return
    if value.is_initializer():
        graph.initializers.pop(value.name)
    elif value.producer() is not None and value.producer().op_type == "Constant":
        graph.remove(value.producer(), safe=True)


class PackMatMulPass(GraphPass):
    """Pack sibling weight MatMuls into one MatMul + Split (see the module docstring); count = groups packed."""

    name = "pack_matmul"

    def __init__(self) -> None:
        super().__init__()
        self.packed: list[str] = []  # the packed MatMuls' node names

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self.count, self.packed = 0, []
        if decoder_opset(model) < MIN_OPSET:
            return ir.passes.PassResult(model, modified=False)
        taken = {n.name for n in graph.all_nodes()}
        for members in sibling_groups(graph):
            self._pack(graph, members, taken)
            self.count += 1
        if self.count:
            annotate_missing(model)
        return ir.passes.PassResult(model, modified=self.count > 0)

    def _pack(self, graph: ir.Graph, members: list[Member], taken: set[str]) -> None:
        biases = [_bias_of(m) for m in members]
        if all(b is not None for b in biases):
            for m, (add, bias) in zip(members, biases):
                m.add, m.bias = add, bias
        first, x = members[0].node, members[0].node.inputs[0]
        layer = layer_of(first)
        b = Builder(_packed_scope(members), metadata={META_LAYER: str(layer)} if layer is not None else None,
                    taken=taken)
        weight = _initializer(graph, f"/{b.scope}/weight", np.concatenate([m.weight.numpy() for m in members], axis=1))
        dtype = weight.dtype
        total = sum(m.n for m in members)
        shape = ir.Shape([*x.shape[:-1], total]) if x.shape is not None and x.shape.rank() >= 1 else None
        packed = b.op("MatMul", [x, weight], dtype=dtype)
        packed.shape = shape
        self.packed.append(packed.producer().name)
        if members[0].add is not None:
            bias = _initializer(graph, f"/{b.scope}/bias", np.concatenate([m.bias.numpy() for m in members]))
            packed = b.op("Add", [packed, bias], dtype=dtype)
            packed.shape = shape
        # an initializer, not a Constant node: the pack should not add nodes to the graph
        sizes = _initializer(graph, f"/{b.scope}/split", np.array([m.n for m in members], np.int64))
        outs = b.op("Split", [packed, sizes], num_outputs=len(members), axis=-1)
        graph.insert_before(first, b.nodes)
        constants = [m.node.inputs[1] for m in members]
        constants += [m.add.inputs[1 - m.add.inputs.index(m.node.outputs[0])] for m in members if m.add is not None]
        old_nodes = []
        for m, new in zip(members, outs):
            old = m.out
            name, old_dtype, old_shape = old.name, old.dtype, old.shape
            old.replace_all_uses_with(new)
            old.name = f"{name}.unpacked"
            new.name, new.dtype, new.shape = name, old_dtype or dtype, old_shape
            old_nodes += [m.add, m.node] if m.add is not None else [m.node]
        graph.remove(old_nodes, safe=True)
        for c in constants:
            _drop_constant(graph, c)


__all__ = ["PackMatMulPass", "check_member", "constant_tensor", "sibling_groups"]
