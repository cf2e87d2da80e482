"""Types and shapes for the values a graph pass creates (issue 13 item 10).

Tools that walk a graph value by value need every value typed and shaped: onnxruntime's
`python -m onnxruntime.tools.symbolic_shape_infer` (which ORT's transformer optimizer and its TensorRT EP path
run) stops with `TypeError: object of type 'NoneType' has no len()` at the first value without a shape, e.g. one
inside a mitigation `If` branch. The passes build their nodes with `Builder` (graph_passes/base.py), which names
values but cannot know every output's shape, so each pass ends with `annotate_missing(model)`:

    model (weights set aside) ──► onnx.shape_inference (data propagation on) ──► type/shape per value name,
                                                                               per graph and subgraph
    every value of the model still without a dtype or shape ◄── takes the inferred one (nothing else changes)

Values that already carry a type and shape (the exporter's, a pass's graph inputs) are never touched, so the
interface names of dimensions ("batch", "total_length") stay as they are. Large initializers are detached for the
call (the ONNX C API serialises the whole model, and protobuf stops at 2 GiB) and put back afterwards whatever
happens. Ops ONNX has no schema for (com.microsoft MatMulNBits) are shaped by the pass that adds them.
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx
import onnx_ir as ir

_DETACH_BYTES = 1024  # initializers above this size are taken out of the proto the shape inference reads


def _values(graph: ir.Graph) -> Iterator[ir.Value]:
    yield from graph.inputs
    yield from graph.initializers.values()
    for node in graph:
        yield from node.outputs


def _without_weights(model: ir.Model) -> onnx.ModelProto:
    """The model's proto with every initializer over _DETACH_BYTES given as a typed graph input instead."""
    graph = model.graph
    detached = [v for v in graph.initializers.values()
                if v.const_value is None or v.const_value.nbytes > _DETACH_BYTES]
    kept = {v.name: v.const_value for v in detached}
    n_inputs = len(graph.inputs)
    try:
        for v in detached:
            if v.const_value is not None:
                v.dtype = v.dtype or v.const_value.dtype
                v.shape = v.shape or ir.Shape(v.const_value.shape)
            graph.initializers.pop(v.name)
            v.const_value = None
            if v not in graph.inputs:
                graph.inputs.append(v)
        return ir.serde.serialize_model(model)
    finally:
        while len(graph.inputs) > n_inputs:  # pop, not `del`: onnx-ir's list clears is_graph_input() on pop only
            graph.inputs.pop()
        for v in detached:
            v.const_value = kept[v.name]
            graph.initializers.add(v)


def annotate_missing(model: ir.Model) -> int:
    """Give every value of `model` (subgraphs included) that lacks a dtype or a shape the one ONNX shape inference
    derives. -> the number of values changed. Non-strict: an op without an ONNX schema (com.microsoft MatMulNBits)
    leaves its outputs to the pass that made them; tests/test_shape_inference.py checks nothing stays untyped."""
    missing = [(g, v) for g in model.graphs() for v in _values(g) if v.dtype is None or v.shape is None]
    if not missing:
        return 0
    inferred = ir.serde.deserialize_model(
        onnx.shape_inference.infer_shapes(_without_weights(model), check_type=True, strict_mode=False,
                                          data_prop=True))
    found: dict[str, ir.Value] = {}
    for g in inferred.graphs():
        for v in _values(g):
            if v.name and v.name not in found:
                found[v.name] = v
    changed = 0
    for _, v in missing:
        src = found.get(v.name or "")
        if src is None:
            continue
        if v.dtype is None and src.dtype is not None:
            v.dtype = src.dtype
            changed += 1
        if v.shape is None and src.shape is not None:
            v.shape = ir.Shape(list(src.shape))
            changed += 1
    return changed


def reduce_extreme(b, x: ir.Value, axis: int, what: str, largest: bool = True) -> ir.Value:
    """`ReduceMax` (`largest`) or `ReduceMin` of `x` over one axis, keepdims=1, as ArgMax/ArgMin + GatherElements:

        x ─► ArgMax(axis) ─► index [.., 1, ..] ─► GatherElements(x, index, axis) ─► max [.., 1, ..]

    The same values (the first extreme's value is the extreme). Why not ReduceMax: from opset 18 its axes are an
    input, and onnxruntime's symbolic_shape_infer infers it node by node without that input's value, so the output
    has no rank and the first consumer that needs one crashes the tool; ArgMax's axis is an attribute. TensorRT
    takes both ops for FP32/FP16/INT32/INT64 (graph_passes/trt_ops_table.py) without ReduceMax's constant-axes rule.
    `b` is a graph_passes.base.Builder."""
    index = b.op("ArgMax" if largest else "ArgMin", [x], what, axis=axis, keepdims=1)
    return b.op("GatherElements", [x, index], what, axis=axis, dtype=x.dtype)
