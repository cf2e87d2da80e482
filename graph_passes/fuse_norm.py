"""Fused RMSNorm in the fused decoder form: each decomposed RMSNorm (Llama, Qwen2, Vicuna: y = w · x / sqrt(mean(x²)
+ eps)) becomes ONNX Runtime's `SimplifiedLayerNormalization` (what GenAI's model builder emits; ONNX Runtime's own
optimizer leaves the exporter's chain alone: its SimplifiedLayerNormFusion expects Div, the exporter writes
Reciprocal + Mul). Optionally (`skip=True`) a norm whose input is the residual `Add` becomes
`com.microsoft.SkipSimplifiedLayerNormalization`, which also returns the sum for the next residual connection.

Per norm, as the exporter emits it (torch.onnx, opset 18, traced in fp32 so Llama's `.to(float32)` is gone):

    x ─┬─► Pow(·, 2) ─► ReduceMean(axes=[-1], keepdims=1) ─► Add(·, eps) ─► Sqrt ─► Reciprocal ─┐
       └──────────────────────────────────────────────────────────────────────────────────────► Mul ─► Mul(w, ·) ─► y

becomes

    x ─► SimplifiedLayerNormalization(x, w, axis=-1, epsilon=eps, stash_type=1) ─► y

and with `skip=True`, where x = Add(a, b) of two activations (the residual connection)

    a ─┐                                                        ┌─► output 0 ─► y
    b ─┴─► SkipSimplifiedLayerNormalization(a, b, w, epsilon) ──┤   (com.microsoft)
                                                                └─► output 3 (input_skip_bias_sum = a + b) ─► x's
                                                                    other readers (the output is left out when
                                                                    there are none: the final norm)

onnxruntime 1.32's CPU contract for the latter (ContribOperators.md, checked by running it): inputs input, skip,
gamma[, bias]; outputs output, mean, inv_std_var, input_skip_bias_sum, all but the first optional (mean and
inv_std_var are left empty here: an empty output name); input and skip [B, S, hidden] or [S, hidden].

Why `skip` is off by default: scripts/bench_fuse_norm.py (the bench model's residual stream alone, 16 layers,
hidden 1024, 33 norms; onnxruntime 1.32 CPU EP, 1 thread, CPU time per step, interleaved medians, 2026-11-28):

    rows    exporter's chains (295 nodes)    sln: + Add kept (97 nodes)    skip: SkipSimplified... (65 nodes)
    1       0.142 ms                         0.058 ms (0.41x)              0.072 ms (0.50x)
    300     10.3 ms                          5.29 ms  (0.51x)              12.1 ms  (1.17x)
    2100    106 ms                           59.2 ms  (0.56x)              93.7 ms  (0.88x)

The CPU kernel of the skip op is slower than the plain norm plus a separate Add at every size, and slower than
the exporter's chain in a 300-row prefill, so the fused form keeps the Add; `skip=True` stays available (and
tested) for a provider where the skip op wins (GenAI emits it, aiming at CUDA). Per decode step the norms are a
small part of the decoder (0.14 ms of a ~14 ms int4 step); ORT's profiler shows them as ~1.5 ms because it adds
~2 us to every node it times.

Left alone (count only what was fused; `skipped` names the scope of each Pow -> ReduceMean chain that is not an
RMSNorm as above and why, and the manifest records it): a weight or eps that is not a constant, a reduction over
another axis than the last, keepdims=0, an exponent other than 2, an intermediate read by another node, and a Cast
inside the chain (the fp32 export has none). With `skip=True` an Add with a constant operand (a bias, not a
residual) stays and feeds a SimplifiedLayerNormalization. A norm output (or residual sum) that is a graph output
keeps its name. The pass touches no attention node, so the mitigation passes (which match attention sites) bake on
its output as before; the fp16 converter keeps both ops in fp32 (graph_passes/precision.py `_NORM_OPS`), as it
kept the exporter's chain.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as ir_common
from anchorrt.graph_passes.base import META_LAYER, Builder, GraphPass
from anchorrt.graph_passes.naming import layer_of

MS_DOMAIN = "com.microsoft"
FLOAT = ir.DataType.FLOAT
SIMPLIFIED = "SimplifiedLayerNormalization"  # ONNX domain in onnxruntime's schema registry (since version 1)
SKIP_SIMPLIFIED = "SkipSimplifiedLayerNormalization"  # com.microsoft


def _constant(value: ir.Value | None) -> np.ndarray | None:
    """The value of an initializer or a Constant node's output, else None."""
    if value is None:
        return None
    cv = value.const_value
    node = value.producer()
    if cv is None and node is not None and node.op_type == "Constant" and node.domain == "":
        attr = node.attributes.get("value")
        cv = attr.value if attr is not None else None
    return None if cv is None else np.asarray(cv.numpy())


def _only_reader(value: ir.Value, op_type: str) -> ir.Node | None:
    """The single node reading `value` if it is an ONNX-domain `op_type` in the same graph and `value` is no
    graph output."""
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    node = uses[0].node
    return node if node.op_type == op_type and node.domain == "" and node.graph is value.graph else None


def _other_operand(node: ir.Node, value: ir.Value) -> ir.Value | None:
    """The input of a two-input node that is not `value`."""
    if len(node.inputs) != 2:
        return None
    a, b = node.inputs
    return b if a is value else a if b is value else None


def _copy(shape: ir.Shape | None) -> ir.Shape | None:
    return ir.Shape(list(shape)) if shape is not None else None


def check_rms_norm(pow_node: ir.Node) -> tuple[dict | None, str]:
    """The decomposed RMSNorm that starts at `pow_node` -> ({x, weight, eps, out, nodes}, "") or (None, reason)."""
    if pow_node.op_type != "Pow" or pow_node.domain != "" or len(pow_node.inputs) != 2:
        return None, "not an ONNX Pow"
    x, exponent = pow_node.inputs
    e = _constant(exponent)
    if e is None or e.size != 1 or float(e.reshape(-1)[0]) != 2.0:
        return None, "Pow's exponent is not the constant 2"
    if x is None or x.dtype != FLOAT:
        return None, "the normalised input is not float32"
    reduce = _only_reader(pow_node.outputs[0], "ReduceMean")
    if reduce is None:
        return None, "x² is not read by one ReduceMean alone"
    keepdims = reduce.attributes.get("keepdims")
    if keepdims is not None and int(keepdims.value) != 1:
        return None, "ReduceMean drops the reduced axis (keepdims=0)"
    axes_attr = reduce.attributes.get("axes")  # opset < 18
    axes = np.asarray(axes_attr.value) if axes_attr is not None else _constant(
        reduce.inputs[1] if len(reduce.inputs) > 1 else None)
    rank = x.shape.rank() if x.shape is not None else None
    if axes is None or axes.size != 1:
        return None, "ReduceMean's axes are not one constant axis"
    axis = int(axes.reshape(-1)[0])
    if axis != -1 and (rank is None or axis != rank - 1):
        return None, f"ReduceMean reduces axis {axis}, not the last"
    add_eps = _only_reader(reduce.outputs[0], "Add")
    if add_eps is None:
        return None, "mean(x²) is not read by one Add alone"
    eps = _constant(_other_operand(add_eps, reduce.outputs[0]))
    if eps is None or eps.size != 1:
        return None, "eps is not a constant scalar"
    sqrt = _only_reader(add_eps.outputs[0], "Sqrt")
    recip = _only_reader(sqrt.outputs[0], "Reciprocal") if sqrt is not None else None
    if recip is None:
        return None, "mean(x²) + eps is not followed by Sqrt and Reciprocal alone"
    scale = _only_reader(recip.outputs[0], "Mul")
    if scale is None or _other_operand(scale, recip.outputs[0]) is not x:
        return None, "1/sqrt(mean(x²) + eps) does not multiply x"
    weigh = _only_reader(scale.outputs[0], "Mul")
    if weigh is None:
        return None, "the normalised x is not read by one Mul (the weight) alone"
    weight = _other_operand(weigh, scale.outputs[0])
    w = _constant(weight)
    if w is None or w.ndim != 1 or w.dtype != np.float32:
        return None, "the norm's weight is not a constant float32 vector"
    if rank is None or not isinstance(x.shape[-1], int) or x.shape[-1] != w.shape[0]:
        return None, "the weight's length is not x's static last dimension"
    return {"x": x, "weight": weight, "eps": float(eps.reshape(-1)[0]), "out": weigh.outputs[0],
            "nodes": [pow_node, reduce, add_eps, sqrt, recip, scale, weigh]}, ""


def check_residual(x: ir.Value) -> tuple[tuple[ir.Value, ir.Value] | None, str]:
    """x = Add(a, b) of two activations of x's own shape -> ((a, b), "") or (None, reason)."""
    add = x.producer()
    if add is None or add.op_type != "Add" or add.domain != "" or len(add.inputs) != 2:
        return None, "the norm's input is not an Add"
    a, b = add.inputs
    if a is None or b is None or _constant(a) is not None or _constant(b) is not None:
        return None, "the Add has a constant operand (a bias, not a residual)"
    shape = x.shape
    if shape is None or any(isinstance(d, ir.SymbolicDim) and d.value is None for d in shape):
        return None, "the residual sum's shape is not known"
    if shape.rank() not in (2, 3) or any(v.dtype != FLOAT or v.shape != shape for v in (a, b)):
        return None, "the Add's operands are not float32 of the sum's own [B, S, hidden] shape"
    return (a, b), ""


def _take_over(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """`new` replaces `old` everywhere, as a graph output too (under `old`'s name, so the interface is unchanged)."""
    for k, v in enumerate(graph.outputs):  # onnx-ir wants the graph output replaced first
        if v is old:
            name = old.name
            old.name = f"{name}.decomposed"
            new.name = name
            graph.outputs[k] = new
    ir.convenience.replace_all_uses_with(old, new)


class FuseNormPass(GraphPass):
    """Rewrite every decomposed RMSNorm as above; count = norms fused (0: none matched, the graph is unchanged).

    `skip=True` also takes the residual Add into com.microsoft.SkipSimplifiedLayerNormalization (`skip_count` of
    them); the default keeps the Add (the faster form on onnxruntime 1.32's CPU EP, module docstring)."""

    name = "fuse_norm"

    def __init__(self, skip: bool = False) -> None:
        super().__init__()
        self.skip = skip
        self.skip_count = 0
        self.skipped: dict[str, str] = {}  # norm scope -> why its chain was left as exported (manifest: bake.py)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self.count = self.skip_count = 0
        self.skipped = {}
        plans = []
        for node in graph:
            if node.op_type != "Pow" or node.domain != "" or not any(
                    u.node.op_type == "ReduceMean" for u in node.outputs[0].uses()):
                continue  # not the start of a norm (e.g. a tanh-GELU's x³)
            bind, reason = check_rms_norm(node)
            if bind is None:
                self.skipped[(node.name or "").rsplit("/", 1)[0].strip("/") or "graph"] = reason
            else:
                plans.append(bind)
        if not plans:
            return ir.passes.PassResult(model, modified=False)
        taken = {n.name for n in graph.all_nodes()}
        for bind in plans:  # in graph order: a residual Add read by an earlier norm already reads its fused sum
            self._rewrite(graph, bind, taken)
            self.count += 1
        ir_common.RemoveUnusedNodesPass()(model)
        if self.skip_count:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        graph.sort()
        return ir.passes.PassResult(model, modified=True)

    def _rewrite(self, graph: ir.Graph, bind: dict, taken: set[str]) -> None:
        first = bind["nodes"][0]
        scope = (first.name or "/model/norm/Pow").rsplit("/", 1)[0].strip("/") or "model/norm"
        layer = layer_of(first)
        meta = {META_LAYER: str(layer)} if layer is not None else None
        b = Builder(scope, taken=taken)
        x, y = bind["x"], bind["out"]
        residual = check_residual(x)[0] if self.skip else None
        if residual is None:
            node = ir.Node("", SIMPLIFIED, [x, bind["weight"]], name=b._name("", SIMPLIFIED),
                           attributes=ir.convenience.convert_attributes(
                               {"axis": -1, "epsilon": bind["eps"], "stash_type": 1}), metadata_props=meta)
        else:
            norm_nodes = set(bind["nodes"])
            others = x.is_graph_output() or any(u.node not in norm_nodes for u in x.uses())
            node = ir.Node(MS_DOMAIN, SKIP_SIMPLIFIED, [*residual, bind["weight"]], name=b._name("", SKIP_SIMPLIFIED),
                           attributes=ir.convenience.convert_attributes({"epsilon": bind["eps"]}),
                           num_outputs=4 if others else 1, metadata_props=meta)
            if others:  # mean, inv_std_var: not produced (an empty output name is ONNX's "absent")
                node.outputs[1].name = node.outputs[2].name = ""
                total = node.outputs[3]
                total.name, total.dtype, total.shape = f"{node.name}_output_3", FLOAT, _copy(x.shape)
                _take_over(graph, x, total)  # the norm's own chain reads it too, and goes
            self.skip_count += 1
        out = node.outputs[0]
        out.name, out.dtype, out.shape = f"{node.name}_output_0", FLOAT, _copy(y.shape)
        graph.insert_after(bind["nodes"][-1], node)
        _take_over(graph, y, out)


__all__ = ["FuseNormPass", "check_residual", "check_rms_norm"]
