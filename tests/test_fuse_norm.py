"""Fused RMSNorm (graph_passes/fuse_norm.py): SimplifiedLayerNormalization in the fused decoder form (the default),
and SkipSimplifiedLayerNormalization with `skip=True`.

Node counts on the default (fused) exports, nothing changed with --attention unfused, the in-memory pass against
the graph without it (onnxruntime, prefill + a decode step), CLVA + SEVI flags on/off against the independent
PyTorch reference on the fused-norm artifact, near misses on hand-built graphs, fp16 / int4 / int8 conversions, and
onnxruntime's symbolic shape inference. Fixtures are the session's (tests/conftest.py); ~10 s on top of them.
"""

from __future__ import annotations

import shutil
from collections import Counter

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from anchorrt.graph_passes.fuse_attention import FuseAttentionPass
from anchorrt.graph_passes.fuse_norm import SIMPLIFIED, SKIP_SIMPLIFIED, FuseNormPass
from anchorrt.graph_passes.naming import AssignNodeNames
from anchorrt.graph_passes.pipeline import run_on_model
from anchorrt.runtime.pipeline import Pipeline

FLOAT = ir.DataType.FLOAT
DECOMPOSED_OPS = ("Pow", "ReduceMean", "Sqrt", "Reciprocal")


def _ops(model: ir.Model) -> Counter:
    return Counter(n.op_type for n in model.graph)


def _session(model: ir.Model) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), so,
                                providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("artifact", ["tiny_artifact", "interleave_artifact"])  # Llama, Qwen2
def test_fused_export_has_one_simplified_norm_per_norm(artifact, request):
    """The default (skip=False): every norm a SimplifiedLayerNormalization, every residual Add kept."""
    pipe = Pipeline.from_dir(request.getfixturevalue(artifact))
    norms = 2 * pipe.num_layers + 1
    model = ir.load(pipe.manifest.graph_path("decoder"))
    ops = _ops(model)
    assert ops[SIMPLIFIED] == norms and not ops[SKIP_SIMPLIFIED]
    assert not any(ops[op] for op in DECOMPOSED_OPS)
    assert pipe.manifest.data["attention"]["fusions"]["fuse_norm"] == norms
    fused = [n for n in model.graph if n.op_type == SIMPLIFIED]
    assert fused[0].inputs[0].name == "inputs_embeds" and fused[0].name == "/model/layers.0/input_layernorm/" + SIMPLIFIED
    assert fused[-1].name == "/model/norm/" + SIMPLIFIED
    for node in fused:
        assert node.domain == "" and node.inputs[1].const_value is not None and node.metadata_props.get(
            "anchorrt.layer", "") == ("" if node is fused[-1] else node.name.split("layers.")[1].split("/")[0])
    for node in fused[1:]:  # every later norm reads a residual Add
        assert node.inputs[0].producer().op_type == "Add"


def test_unfused_export_keeps_decomposed_norms(unfused_artifact):
    pipe = Pipeline.from_dir(unfused_artifact)
    ops = _ops(ir.load(pipe.manifest.graph_path("decoder")))
    assert ops["Pow"] == ops["Reciprocal"] == 2 * pipe.num_layers + 1
    assert not ops[SIMPLIFIED] and not ops[SKIP_SIMPLIFIED]
    assert "fusions" not in pipe.manifest.data["attention"]


def _decode_feeds(layers: int, kv_heads: int, head_dim: int, hidden: int):
    """Prefill of 5 tokens (row 1 left-padded by 2) then one decode step, distinct past/present tensors."""
    rng = np.random.default_rng(0)
    b, s = 2, 5
    mask = np.ones((b, s), np.int64)
    mask[1, :2] = 0
    past = {f"past_key_values.{i}.{kv}": np.zeros((b, kv_heads, 0, head_dim), np.float32)
            for i in range(layers) for kv in ("key", "value")}
    yield {"inputs_embeds": rng.standard_normal((b, s, hidden), dtype=np.float32), "attention_mask": mask,
           "position_ids": np.maximum(np.cumsum(mask, -1) - 1, 0), **past}
    grown = {f"past_key_values.{i}.{kv}": rng.standard_normal((b, kv_heads, s, head_dim), dtype=np.float32)
             for i in range(layers) for kv in ("key", "value")}
    mask = np.concatenate([mask, np.ones((b, 1), np.int64)], 1)
    yield {"inputs_embeds": rng.standard_normal((b, 1, hidden), dtype=np.float32), "attention_mask": mask,
           "position_ids": mask.sum(-1, keepdims=True) - 1, **grown}


@pytest.mark.parametrize("skip", [False, True])
def test_pass_against_the_graph_without_it(unfused_artifact, skip):
    """FuseAttention alone vs FuseAttention + FuseNorm on the same decoder: every output within 1e-5; node count
    down by 7 per norm less the one fused node (skip: and every residual Add but layer 0's input norm's, which
    reads inputs_embeds); onnxruntime's symbolic shape inference reads the result."""
    from tests.test_shape_inference import symbolic_shape_infer, untyped

    pipe = Pipeline.from_dir(unfused_artifact)
    path = pipe.manifest.graph_path("decoder")
    before, after = ir.load(path), ir.load(path)
    run_on_model(before, [AssignNodeNames(), FuseAttentionPass()])
    p = FuseNormPass(skip=skip)
    run_on_model(after, [AssignNodeNames(), FuseAttentionPass(), p])
    norms, layers = 2 * pipe.num_layers + 1, pipe.num_layers
    skips = norms - 1 if skip else 0
    assert p.count == norms and p.skip_count == skips and p.skipped == {}
    assert _ops(after)[SKIP_SIMPLIFIED] == skips and _ops(after)[SIMPLIFIED] == norms - skips
    assert before.graph.num_nodes() - after.graph.num_nodes() == 6 * norms + skips
    assert untyped(after) == []
    symbolic_shape_infer(after)
    sa, sb = _session(before), _session(after)
    hidden = next(v for v in before.graph.inputs if v.name == "inputs_embeds").shape[-1]
    for feed in _decode_feeds(layers, pipe.kv_heads, pipe.head_dim, hidden):
        for x, y in zip(sa.run(None, feed), sb.run(None, feed)):
            np.testing.assert_allclose(x, y, atol=1e-5)
    again = FuseNormPass()  # idempotent: nothing left to fuse
    again(after)
    assert again.count == 0


# ------------------------------------------------------------------------------- flags on/off vs the reference


@pytest.fixture(scope="module")
def baked_parity(tiny_artifact, tiny_model, tmp_path_factory, images):
    from anchorrt.exporter.reference import ReferenceLlava
    from anchorrt.graph_passes.bake import BakeOptions, bake

    from tests.test_mitigation_parity import PROMPTS

    baked_dir = tmp_path_factory.mktemp("fuse-norm") / "baked"
    shutil.copytree(tiny_artifact, baked_dir)
    bake(baked_dir, "clva,sevi", BakeOptions(sevi_start_layer=2, debug_outputs=True))
    pipe, plain = Pipeline.from_dir(baked_dir), Pipeline.from_dir(tiny_artifact)
    batch = pipe._pad([pipe.prompts.encode(p) for p in PROMPTS])
    pixels = pipe.preprocess([pipe._load(img, i) for i, img in enumerate(images[:2])])
    return pipe, plain, batch, pixels, ReferenceLlava.from_pretrained(tiny_model)


def test_flags_on_and_off_match_the_reference_on_fused_norms(baked_parity):
    """Row 0 with CLVA + SEVI on, row 1 off (tests/test_mitigation_parity.py's procedure, one case): logits within
    1e-4 of the PyTorch reference for the prefill and 3 decode steps, the off row exactly the plain model."""
    from tests.test_mitigation_parity import ATOL, CASES, onnx_passes, reference_flags, reference_passes

    pipe, plain, batch, pixels, ref = baked_parity
    assert _ops(ir.load(pipe.manifest.graph_path("decoder")))[SIMPLIFIED] == 2 * pipe.num_layers + 1
    spec = CASES["both"]
    clva, sevi = reference_flags(spec)
    refs, tokens = reference_passes(ref, batch, pixels, clva, sevi)
    for step, ((res, plain_logits), r) in enumerate(zip(onnx_passes(pipe, plain, batch, pixels, [spec, None], tokens),
                                                        refs)):
        logits = res["logits"][:, -1]
        diff = float(np.abs(logits - r.logits[:, -1].numpy()).max())
        assert diff <= ATOL, f"step {step}: max |logit diff| {diff:.3g}"
        assert np.array_equal(logits[1], plain_logits[1])


def test_greedy_tokens_flags_on_and_off_match_the_reference(baked_parity, images):
    from anchorrt.runtime.pipeline import Request

    from tests.test_mitigation_parity import CASES, PROMPTS, assert_reference_tokens, reference_flags

    pipe, _, batch, pixels, ref = baked_parity
    spec = CASES["both"]
    clva, sevi = reference_flags(spec)
    got = pipe.generate_batch([Request(img, p, spec if i == 0 else None)
                               for i, (img, p) in enumerate(zip(images[:2], PROMPTS))], max_new_tokens=12)
    assert_reference_tokens(ref, batch, pixels, got, 12, clva, sevi)


# ------------------------------------------------------------------------------------------- hand-built graphs

HIDDEN = 8


def _norm_graph(*, weight_const: bool = True, axis: int = -1, extra_reader: bool = True,
                eps_reader: bool = False, bias_add: bool = False, outputs_too: bool = False) -> ir.Model:
    """x = Add(a, b) ─► the exporter's RMSNorm chain ─► y ─► Mul(y, y) (the projections); `extra_reader`: x is also
    read by the next residual connection, Add(x, y²). Knobs build the near misses."""
    shape = ["batch", "sequence", HIDDEN]
    rng = np.random.default_rng(0)

    def value(name, dims=shape):
        return ir.Value(name=name, type=ir.TensorType(FLOAT), shape=ir.Shape(dims))

    def const(name, array):
        v = ir.Value(name=name, type=ir.TensorType(ir.DataType.from_numpy(array.dtype)), shape=ir.Shape(array.shape),
                     const_value=ir.tensor(array, name=name))
        return v

    a, b = value("a"), value("b")
    inputs = [a, b]
    consts = [const("two", np.array(2.0, np.float32)), const("axes", np.array([axis], np.int64)),
              const("eps", np.array(1e-5, np.float32))]
    if weight_const:
        w = const("w", rng.standard_normal(HIDDEN).astype(np.float32))
        consts.append(w)
    else:
        w = value("w", [HIDDEN])
        inputs.append(w)
    if bias_add:
        bias = const("bias", rng.standard_normal(HIDDEN).astype(np.float32))
        consts.append(bias)
    nodes = []

    def op(op_type, ins, name):
        node = ir.Node("", op_type, ins, name=f"/model/layers.0/post_attention_layernorm/{name}")
        node.outputs[0].name = name
        node.outputs[0].dtype = FLOAT
        nodes.append(node)
        return node.outputs[0]

    x = op("Add", [a, bias if bias_add else b], "x")
    x.shape = ir.Shape(shape)
    sq = op("Pow", [x, consts[0]], "pow")
    mean = op("ReduceMean", [sq, consts[1]], "mean")
    var = op("Add", [mean, consts[2]], "var")
    rs = op("Reciprocal", [op("Sqrt", [var], "sqrt")], "rsqrt")
    y = op("Mul", [w, op("Mul", [x, rs], "normed")], "y")
    outputs = [op("Mul", [y, y], "proj")]  # stands for the projections that read the norm
    if extra_reader:
        outputs.append(op("Add", [x, outputs[0]], "next"))
    if eps_reader:
        outputs.append(op("Mul", [var, var], "var2"))
    if outputs_too:
        outputs += [y, x]
    for v in outputs:
        v.shape = ir.Shape(shape) if v.name != "var2" else ir.Shape(["batch", "sequence", 1])
    graph = ir.Graph(inputs, outputs, nodes=nodes, initializers=consts, opset_imports={"": 18})
    return ir.Model(graph, ir_version=10)


def _run(model: ir.Model, feed: dict) -> list[np.ndarray]:
    return _session(model).run(None, feed)


def _feed(model: ir.Model) -> dict:
    rng = np.random.default_rng(1)
    return {v.name: rng.standard_normal([2, 3, HIDDEN][-(v.shape.rank()):], dtype=np.float32)
            for v in model.graph.inputs}


def test_norm_becomes_simplified_and_keeps_the_residual_add():
    model = _norm_graph()
    feed = _feed(model)
    want = _run(model, feed)
    p = FuseNormPass()
    p(model)
    assert (p.count, p.skip_count) == (1, 0)
    node = next(n for n in model.graph if n.op_type == SIMPLIFIED)
    assert node.inputs[0].name == "x" and node.inputs[1].name == "w"
    assert node.attributes["epsilon"].value == pytest.approx(1e-5) and node.attributes["axis"].value == -1
    assert node.attributes["stash_type"].value == 1
    assert _ops(model) == Counter({SIMPLIFIED: 1, "Mul": 1, "Add": 2})  # the residual Add and the next one
    for x, y in zip(want, _run(model, feed)):
        np.testing.assert_allclose(x, y, atol=1e-5)


@pytest.mark.parametrize("extra_reader", [True, False])
def test_residual_norm_becomes_skip_simplified(extra_reader):
    model = _norm_graph(extra_reader=extra_reader)
    feed = _feed(model)
    want = _run(model, feed)
    p = FuseNormPass(skip=True)
    p(model)
    assert (p.count, p.skip_count) == (1, 1)
    node = next(n for n in model.graph if n.op_type == SKIP_SIMPLIFIED)
    assert [v.name for v in node.inputs[:2]] == ["a", "b"] and node.inputs[2].name == "w"
    assert node.name == "/model/layers.0/post_attention_layernorm/" + SKIP_SIMPLIFIED
    assert len(node.outputs) == (4 if extra_reader else 1)
    assert _ops(model) == Counter({SKIP_SIMPLIFIED: 1, "Mul": 1, "Add": int(extra_reader)}) - Counter()
    for x, y in zip(want, _run(model, feed)):
        np.testing.assert_allclose(x, y, atol=1e-5)


def test_bias_add_is_not_a_residual():
    """Add(x, constant) stays; the norm becomes the plain SimplifiedLayerNormalization."""
    model = _norm_graph(bias_add=True)
    feed = _feed(model)
    want = _run(model, feed)
    p = FuseNormPass(skip=True)
    p(model)
    assert (p.count, p.skip_count) == (1, 0) and _ops(model)[SIMPLIFIED] == 1
    for x, y in zip(want, _run(model, feed)):
        np.testing.assert_allclose(x, y, atol=1e-5)


@pytest.mark.parametrize("skip", [False, True])
def test_graph_outputs_keep_their_names(skip):
    """The norm's output and the residual sum as graph outputs: same names, now the fused node's outputs."""
    model = _norm_graph(outputs_too=True)
    feed = _feed(model)
    want = _run(model, feed)
    names = [v.name for v in model.graph.outputs]
    p = FuseNormPass(skip=skip)
    p(model)
    assert p.count == 1 and [v.name for v in model.graph.outputs] == names
    fused = next(n for n in model.graph if n.op_type in (SIMPLIFIED, SKIP_SIMPLIFIED))
    assert model.graph.outputs[-2] is fused.outputs[0]
    assert (model.graph.outputs[-1].producer() is fused) == skip  # skip: the sum is output 3
    for x, y in zip(want, _run(model, feed)):
        np.testing.assert_allclose(x, y, atol=1e-5)


@pytest.mark.parametrize("knob, reason", [
    ({"weight_const": False}, "weight is not a constant"),
    ({"axis": 1}, "reduces axis 1, not the last"),
    ({"eps_reader": True}, "mean(x²) + eps is not followed by Sqrt and Reciprocal alone"),
])
def test_near_misses_are_left_alone(knob, reason):
    model = _norm_graph(**knob)
    ops = _ops(model)
    p = FuseNormPass()
    result = p(model)
    assert p.count == 0 and not result.modified and _ops(model) == ops
    assert len(p.skipped) == 1 and reason in next(iter(p.skipped.values())), p.skipped


# --------------------------------------------------------------------------- conversions and shape inference


@pytest.mark.parametrize("options", [{"precision": "fp16"}, {"quantize": "int4", "accuracy_level": 4},
                                     {"quantize": "int8"}], ids=["fp16", "int4", "int8"])
def test_conversions_keep_fused_norms_and_run(tiny_artifact, tmp_path, images, options):
    from anchorrt.graph_passes.bake import PrecisionOptions, convert_precision

    art = tmp_path / "converted"
    shutil.copytree(tiny_artifact, art)
    m = convert_precision(art, PrecisionOptions(**options))
    pipe = Pipeline.from_dir(art)
    model = ir.load(pipe.manifest.graph_path("decoder"))
    norms = [n for n in model.graph if n.op_type in (SIMPLIFIED, SKIP_SIMPLIFIED)]
    assert len(norms) == 2 * pipe.num_layers + 1
    for node in norms:  # fp32 in every form (the fp16 converter keeps norm ops fp32)
        assert all(v.dtype == FLOAT for v in node.inputs if v is not None), node.name
    if "precision" in options:
        assert m.data["precision"]["fp16"]["decoder"]["kept_fp32"]["by_reason"]["normalisation"] == len(norms)
    out = pipe.generate(images[0], "What is in the image?", max_new_tokens=4)
    assert len(out.token_ids) >= 1


def test_symbolic_shape_inference_types_the_fused_norms(tiny_artifact):
    from tests.test_shape_inference import symbolic_shape_infer, untyped

    model = ir.load(Pipeline.from_dir(tiny_artifact).manifest.graph_path("decoder"))
    assert untyped(model) == []
    inferred = symbolic_shape_infer(model)
    shapes = {vi.name: len(vi.type.tensor_type.shape.dim) for vi in list(inferred.graph.value_info)}
    outs = [o for n in model.graph if n.op_type in (SIMPLIFIED, SKIP_SIMPLIFIED) for o in n.outputs if o.name]
    assert outs and all(shapes.get(o.name) == 3 for o in outs if not o.is_graph_output())
