"""What every AnchorRT graph pass shares: the pass base class, its errors, and a node builder.

A pass is an onnx-ir in-place pass (`PassBase.call(model) -> PassResult(model, modified)`, as in onnx/ir-py's
`passes/common/topological_sort.py`) that also reports `count`, the number of sites it matched/rewrote, so a
pipeline can return `{pass_name: count}`.

`Builder` emits the nodes a pass adds with deterministic names `/{scope}/{what}/{Op}` (STYLE.md) and names
every output value after its node, so a pass's additions never collide with the exporter's automatic names
(`val_12`) and a subgraph never shadows an outer value. Nothing here imports torch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
from anchorrt.runtime.errors import AnchorError

# Metadata keys the passes write on nodes (read back by later passes and by debugging tools).
META_LAYER = "anchorrt.layer"  # decoder layer index of a node a pass added or rewired
META_BASE_MASK = "anchorrt.base_mask"  # on an attention node whose mask a pass replaced: the original mask's name
META_MASK_ROLE = "anchorrt.mask_role"  # "effective": this node reads the layer's mask as the layer applies it
# On an attention node whose mask input a pass derived per pass from the layer's mask (SEVI's decode-step bias on
# the fused form): the name of that mask as the layer applies it without the pass's edit. A later pass reads it as
# the layer's mask (site.mask), and CLVA rewires the "effective" readers and this record, not the node's input.
META_EFFECTIVE_MASK = "anchorrt.effective_mask"
# on an `If` that edits a fused attention node's output: its else branch passes that output through (Identity), and
# its own output is reshaped/transposed back to [B, H, S, D] as the node's was (graph_passes/attention_match.py)
META_OUTPUT_EDIT = "anchorrt.output_edit"

NEG_INF = float("-inf")


class PassError(AnchorError):
    """A graph pass cannot run on this graph (a pattern matched a number of times other than expected...)."""


class GraphPass(ir.passes.InPlacePass):
    """An in-place onnx-ir pass that records how many sites it matched in `self.count`."""

    name = "pass"

    def __init__(self) -> None:
        super().__init__()
        self.count = 0


def tensor_value(name: str, dtype: ir.DataType, shape: Sequence[int | str | None] | None) -> ir.Value:
    return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape) if shape is not None else None)


class Builder:
    """Records nodes named `/{scope}/{what}/{Op}` (a suffix `_k` only if the same name repeats).

        b = Builder("model/layers.3/attn/sevi")
        p = b.op("Softmax", [x], "probs", axis=-1)      # node "/model/layers.3/attn/sevi/probs/Softmax"
        graph.extend(b.nodes)                           # or ir.Graph([], outs, nodes=b.nodes) for a branch
    """

    def __init__(self, scope: str, metadata: dict[str, str] | None = None, taken: set[str] | None = None):
        self.scope = scope.strip("/")
        self.nodes: list[ir.Node] = []
        self.metadata = dict(metadata or {})
        self._taken = taken if taken is not None else set()
        self._seen: Counter[str] = Counter()

    def child(self, scope: str, same_graph: bool = False) -> Builder:
        """A builder for a sub-scope that shares the name registry of this one. `same_graph=True`: its nodes go
        into this builder's list (a sub-scope of the same graph); otherwise it collects the nodes of a subgraph."""
        child = Builder(f"{self.scope}/{scope}", self.metadata, self._taken)
        if same_graph:
            child.nodes = self.nodes
        return child

    def _name(self, what: str, op_type: str) -> str:
        base = f"/{self.scope}/{what}/{op_type}" if what else f"/{self.scope}/{op_type}"
        name = base
        while name in self._taken:
            self._seen[base] += 1
            name = f"{base}_{self._seen[base]}"
        self._taken.add(name)
        return name

    def op(self, op_type: str, inputs: Sequence[ir.Value | None], what: str = "", *, num_outputs: int = 1,
           dtype: ir.DataType | None = None, metadata: dict[str, str] | None = None, **attributes: Any):
        attrs = ir.convenience.convert_attributes({k: v for k, v in attributes.items() if v is not None})
        name = self._name(what, op_type)
        node = ir.Node("", op_type, list(inputs), attributes=attrs, num_outputs=num_outputs, name=name,
                       metadata_props={**self.metadata, **(metadata or {})} or None)
        for k, out in enumerate(node.outputs):
            out.name = f"{name}_output_{k}"
        if dtype is not None:
            node.outputs[0].dtype = dtype
        self.nodes.append(node)
        return node.outputs[0] if num_outputs == 1 else tuple(node.outputs)

    def const(self, value: Any, what: str, dtype: np.dtype | type | None = None) -> ir.Value:
        """A Constant node (kept in the graph where it is used, so a branch carries its own constants)."""
        array = np.asarray(value, dtype=dtype)
        out = self.op("Constant", [], what, value=ir.tensor(array, name=f"/{self.scope}/{what}"))
        out.dtype = ir.DataType.from_numpy(array.dtype)
        out.shape = ir.Shape(array.shape)
        return out

    def if_node(self, cond: ir.Value, then_outputs: Sequence[ir.Value], then_nodes: Sequence[ir.Node],
                else_outputs: Sequence[ir.Value], else_nodes: Sequence[ir.Node], what: str,
                out_dtypes: Sequence[ir.DataType]) -> tuple[ir.Value, ...]:
        """An ONNX `If` whose branches read outer values directly (onnx-ir tracks those uses)."""
        for v, t in zip(list(then_outputs) + list(else_outputs), list(out_dtypes) * 2):
            if v.dtype is None:
                v.dtype = t
        then_g = ir.Graph([], list(then_outputs), nodes=then_nodes, name=f"/{self.scope}/{what}/then")
        else_g = ir.Graph([], list(else_outputs), nodes=else_nodes, name=f"/{self.scope}/{what}/else")
        outs = self.op("If", [cond], what, num_outputs=len(out_dtypes),
                       then_branch=ir.AttrGraph("then_branch", then_g), else_branch=ir.AttrGraph("else_branch", else_g))
        outs = outs if isinstance(outs, tuple) else (outs,)
        for v, t in zip(outs, out_dtypes):
            v.dtype = t
        return outs


def graph_input(graph: ir.Graph, name: str) -> ir.Value | None:
    return next((v for v in graph.inputs if v.name == name), None)


def add_graph_input(graph: ir.Graph, name: str, dtype: ir.DataType, shape: Sequence[int | str]) -> ir.Value:
    """Add a graph input, or return the existing one if a previous pass added the same input (e.g. visual_mask)."""
    existing = graph_input(graph, name)
    if existing is not None:
        if existing.dtype != dtype:
            raise PassError(f"decoder input '{name}' exists with dtype {existing.dtype}, expected {dtype}")
        return existing
    value = tensor_value(name, dtype, shape)
    graph.inputs.append(value)
    return value


def add_graph_output(graph: ir.Graph, value: ir.Value, name: str, dtype: ir.DataType,
                     shape: Sequence[int | str] | None) -> None:
    """Expose `value` as a graph output named `name` (through an Identity, so the value keeps its own name)."""
    if any(v.name == name for v in graph.outputs):
        raise PassError(f"the decoder already has an output named '{name}'")
    node = ir.Node("", "Identity", [value], name=f"/debug/{name}/Identity")
    out = node.outputs[0]
    out.name, out.dtype = name, dtype
    out.shape = ir.Shape(shape) if shape is not None else None
    graph.append(node)
    graph.outputs.append(out)


def decoder_opset(model: ir.Model) -> int:
    return int(model.opset_imports.get("", model.graph.opset_imports.get("", 0)))
