"""Issue 13 item 10: onnxruntime's symbolic shape inference (`python -m onnxruntime.tools.symbolic_shape_infer`,
which ORT's transformer optimizer and its TensorRT EP path run) works on every baked form, and every value a pass
creates carries a type and a shape.

It used to crash on a baked decoder (`TypeError: object of type 'NoneType' has no len()` at
`/model/clva/anchors/t_count/ReduceSum`): an opset-18 ReduceMax takes its axes as an input, which the tool infers
node by node without that input's value, so the output had no rank. The passes now take a maximum over one axis as
ArgMax + GatherElements (graph_passes/shapes.py) and type every value they create (`annotate_missing`).

The tool runs with auto_merge, as ORT documents it for the TensorRT EP and as its transformer optimizer calls it:
the exporter's decoder names the key length "past_length + sequence" inside and "total_length" on the mask, and
without auto_merge the tool stops at the first op that meets both. Opset 23: onnxruntime 1.32's tool cannot read
any opset-23 decoder (the unbaked export included; see the xfail below), so there the check is that every value
is typed and ONNX's strict shape inference accepts the graph. Passes run in memory on the session fixtures'
graphs (no export, no file written): about 10 s for every form on a quiet 2-core machine."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from anchorrt.graph_passes.clva import ClvaPass
from anchorrt.graph_passes.naming import AssignNodeNames
from anchorrt.graph_passes.pipeline import run_on_model
from anchorrt.graph_passes.probe import ProbePass
from anchorrt.graph_passes.sevi import SeviPass

FORMS = {  # name -> passes after AssignNodeNames; SEVI from layer 2 so that the 8-layer fixtures change
    "clva": lambda: [ClvaPass()],
    "sevi": lambda: [SeviPass(2)],
    "probe": lambda: [ProbePass()],
    "clva,sevi,probe": lambda: [ClvaPass(), SeviPass(2), ProbePass()],
    "clva,sevi,probe+fp16": lambda: [ClvaPass(), SeviPass(2), ProbePass(), _fp16()],
    "clva,sevi,probe+int4": lambda: [ClvaPass(), SeviPass(2), ProbePass(), _int4()],
    "clva,sevi,probe+int8": lambda: [ClvaPass(), SeviPass(2), ProbePass(), _int8()],
    "clva+explain": lambda: [ClvaPass(), _explain()],  # `anchorrt explain`'s temporary copy
}


def _fp16():
    from anchorrt.graph_passes.precision import Fp16Pass

    return Fp16Pass("decoder")


def _int4():
    from anchorrt.graph_passes.quantize import Int4WeightPass

    return Int4WeightPass()


def _int8():
    from anchorrt.graph_passes.quantize import Int8DynamicPass

    return Int8DynamicPass()


def _explain():
    from anchorrt.graph_passes.explain import ExplainPass

    return ExplainPass()


def symbolic_shape_infer(model: ir.Model):
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    return SymbolicShapeInference.infer_shapes(ir.serde.serialize_model(model), auto_merge=True,
                                               guess_output_rank=False)


def untyped(model: ir.Model) -> list[str]:
    """Values (in every graph and subgraph) without a dtype or a shape. An output with an empty name is an optional
    output the node does not produce (SkipSimplifiedLayerNormalization's mean and inv_std_var), not a value."""
    out = []
    for g in model.graphs():
        for v in [*g.inputs, *(o for n in g for o in n.outputs if o.name != "")]:
            if v.dtype is None or v.shape is None:
                out.append(f"{g.name}:{v.name}")
    return out


def baked(artifact, form: str) -> ir.Model:
    model = ir.load(artifact / "decoder.onnx")
    passes = FORMS[form]()
    counts = run_on_model(model, [AssignNodeNames(), *passes])
    assert all(counts[p.name] > 0 for p in passes), counts  # every pass changed the graph
    assert untyped(model) == []
    return model


def _check_logits(inferred) -> None:
    logits = next(o for o in inferred.graph.output if o.name == "logits").type.tensor_type
    assert logits.elem_type in (1, 10) and len(logits.shape.dim) == 3  # float or float16 [batch, 1, vocab]


@pytest.mark.parametrize("form", list(FORMS))
def test_symbolic_shape_inference_on_baked_decoder_opset18(tiny_artifact, form):
    _check_logits(symbolic_shape_infer(baked(tiny_artifact, form)))


def test_symbolic_shape_inference_on_the_baked_artifact_on_disk(baked_artifact):
    """What `anchorrt bake ... --mitigation clva,sevi,probe` wrote, as the tool reads it from the file."""
    model = ir.load(baked_artifact / "decoder.onnx")
    assert untyped(model) == []
    _check_logits(symbolic_shape_infer(model))


@pytest.mark.parametrize("form", list(FORMS))
def test_opset23_baked_decoder_is_fully_typed(gqa_artifact, form):
    """Opset 23: every value typed and shaped, and ONNX's own shape inference accepts the graph in strict mode."""
    import onnx

    model = baked(gqa_artifact, form)
    onnx.shape_inference.infer_shapes(ir.serde.serialize_model(model), check_type=True, strict_mode=True,
                                      data_prop=True)


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "onnxruntime 1.32's symbolic_shape_infer dispatches by op_type only: the ONNX-domain Attention op (opset 23) "
    "goes to its handler for com.microsoft Attention, which asserts on the bias shape, so the tool fails on every "
    "opset-23 decoder, the unbaked export included; strict: this fails once ORT handles it, to turn the check on"))
def test_symbolic_shape_inference_opset23_upstream_limitation(gqa_artifact):
    model = ir.load(gqa_artifact / "decoder.onnx")  # unbaked: the limitation is not ours
    assert any(n.op_type == "Attention" and n.domain == "" for n in model.graph)
    symbolic_shape_infer(model)


def test_symbolic_shape_inference_on_visalign_embed(tiny_artifact):
    from anchorrt.graph_passes.visalign import FusionWeights, VisAlignPass

    model = ir.load(tiny_artifact / "embed.onnx")
    d = next(v for v in model.graph.outputs if v.name == "inputs_embeds").shape[-1]
    rng = np.random.default_rng(0)
    weights = FusionWeights(rng.normal(size=(d, 2 * d)).astype(np.float32), rng.normal(size=d).astype(np.float32))
    p = VisAlignPass(weights)
    run_on_model(model, [AssignNodeNames(), p])
    assert p.count == 1 and untyped(model) == []
    symbolic_shape_infer(model)


def test_reduce_extreme_equals_reduce_max_and_min():
    """The ArgMax/ArgMin + GatherElements form gives ReduceMax/ReduceMin's values (ties, -inf and int64 included)."""
    import onnxruntime as ort
    from anchorrt.graph_passes.base import Builder
    from anchorrt.graph_passes.shapes import reduce_extreme

    for dtype, np_dtype in ((ir.DataType.FLOAT, np.float32), (ir.DataType.INT64, np.int64)):
        x = ir.Value(name="x", type=ir.TensorType(dtype), shape=ir.Shape(["b", "k", 3]))
        b = Builder("t")
        outs = [reduce_extreme(b, x, 1, "max"), reduce_extreme(b, x, 1, "min", largest=False)]
        for i, o in enumerate(outs):
            o.name = f"y{i}"
        graph = ir.Graph([x], outs, nodes=b.nodes, opset_imports={"": 18})
        model = ir.Model(graph, ir_version=10)
        assert untyped(model) == [] or all(o.shape is None for o in outs)  # shapes come from annotate_missing
        sess = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(),
                                    providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        data = rng.integers(-3, 3, (4, 7, 3)).astype(np_dtype)  # many ties
        if np_dtype == np.float32:
            data[0, :, 0] = -np.inf
        got_max, got_min = sess.run(None, {"x": data})
        np.testing.assert_array_equal(got_max, data.max(axis=1, keepdims=True))
        np.testing.assert_array_equal(got_min, data.min(axis=1, keepdims=True))


@pytest.mark.parametrize("form", ["sevi", "clva,sevi,probe+int4"])
def test_every_split_states_its_sizes(tiny_artifact, gqa_artifact, form):
    """Split-18 and later: "Either input 'split' or the attribute 'num_outputs' should be specified". SEVI's two
    Splits inside its `If` branches gave neither; onnxruntime 1.32 loads the whole decoder regardless, but ONNX's
    inference (and onnxruntime's, on the branch alone) refuses such a node: "Neither 'split' input nor
    'num_outputs' attribute has been given". Every graph and subgraph of the fused (opset 18) and the opset-23 form."""
    for artifact in (tiny_artifact, gqa_artifact):
        model = baked(artifact, form)
        splits = [n for g in model.graphs() for n in g if n.op_type == "Split" and n.domain == ""]
        assert splits, "no Split in the baked decoder: the check would pass vacuously"
        missing = [n.name for n in splits
                   if not (len(n.inputs) > 1 and n.inputs[1] is not None) and "num_outputs" not in n.attributes]
        assert missing == []
