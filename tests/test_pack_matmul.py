"""PackMatMulPass (graph_passes/pack_matmul.py): q/k/v and gate/up as one MatMul + Split each.

tiny_artifact and interleave_artifact are exported with the default (fused) form, which now packs, so every parity
test on them (test_parity.py, test_mitigation_parity.py, test_fused_attention.py) runs on the packed form; here:
the node counts, parity with the independent reference with CLVA + SEVI on one row and off on the other (MHA
LLaVA, and Qwen2 with q/k/v biases and 2 KV heads under 4 query heads: three different N), int4 / int8 quantization
of the packed weight (the same codes and scales as quantizing each projection), fp16, the external-data file, and
the near misses that stay unpacked.
"""

from __future__ import annotations

import shutil

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from anchorrt.exporter.reference import ReferenceLlava
from anchorrt.graph_passes.bake import BakeOptions, PrecisionOptions, bake, convert_precision
from anchorrt.graph_passes.fuse_attention import FuseAttentionPass
from anchorrt.graph_passes.naming import AssignNodeNames
from anchorrt.graph_passes.pack_matmul import PackMatMulPass
from anchorrt.graph_passes.pack_qkv import UnpackQkvPass
from anchorrt.graph_passes.pipeline import run_passes
from anchorrt.graph_passes.quantize import Int4WeightPass, Int8DynamicPass
from anchorrt.runtime.manifest import Manifest
from anchorrt.runtime.pipeline import Pipeline, Request

from tests.test_mitigation_parity import ATOL, CASES, PROMPTS, onnx_passes, reference_flags, reference_passes


def _ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


def _fused_unpacked(unfused_artifact) -> ir.Model:
    model = ir.load(Manifest.load(unfused_artifact).graph_path("decoder"))
    AssignNodeNames()(model)
    FuseAttentionPass()(model)
    return model


def _session(model: ir.Model) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), so,
                                providers=["CPUExecutionProvider"])


def _decoder_feeds(model: ir.Model, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """A 5-token prefill from an empty cache and a 1-token step after 6 cached ones (batch 1, distinct buffers)."""
    rng = np.random.default_rng(seed)
    feeds = []
    for seq, past in ((5, 0), (1, 6)):
        feed = {}
        for v in model.graph.inputs:
            shape = [d if isinstance(d, int) else 1 for d in v.shape]
            if v.name == "attention_mask":
                feed[v.name] = np.ones((1, past + seq), np.int64)
            elif v.name == "position_ids":
                feed[v.name] = np.arange(past, past + seq, dtype=np.int64)[None]
            else:
                shape[1 if v.name == "inputs_embeds" else 2] = seq if v.name == "inputs_embeds" else past
                feed[v.name] = rng.standard_normal(shape).astype(np.float32)
        feeds.append(feed)
    return feeds


def _max_diff(a: ir.Model, b: ir.Model) -> float:
    sa, sb = _session(a), _session(b)
    diff = 0.0
    for feed in _decoder_feeds(a):
        for x, y in zip(sa.run(None, feed), sb.run(None, feed)):
            diff = max(diff, float(np.abs(x - y).max()))
    return diff


# ------------------------------------------------------------------------------------------------ the form


def test_node_counts_before_and_after_on_the_tiny_llava(unfused_artifact, tiny_artifact):
    before = _fused_unpacked(unfused_artifact)
    layers = sum(1 for n in before.graph if n.op_type == "GroupQueryAttention")
    after = _fused_unpacked(unfused_artifact)
    p = PackMatMulPass()
    p(after)
    assert p.count == 2 * layers  # q/k/v and gate/up in every layer; o_proj, down_proj and lm_head stand alone
    ob, oa = _ops(before), _ops(after)
    assert ob.count("MatMul") == 7 * layers + 1 and oa.count("MatMul") == 4 * layers + 1
    assert oa.count("Split") == 2 * layers and "Split" not in ob
    assert len(oa) == len(ob) - layers  # 3 MatMuls -> MatMul + Split; 2 -> MatMul + Split; sizes are initializers
    assert len(after.graph.initializers) == len(before.graph.initializers) - layers  # 5 weights -> 2 + 2 sizes
    assert _max_diff(before, after) <= 1e-5
    again = PackMatMulPass()
    again(after)
    assert again.count == 0  # nothing left to pack
    # the export default packs: the manifest records it, the decoder carries it
    m = Manifest.load(tiny_artifact)
    assert m.data["attention"]["fusions"]["pack_matmul"] == 2 * layers
    assert _ops(ir.load(m.graph_path("decoder"))).count("Split") == 2 * layers


def test_qwen2_biases_are_packed_and_gqa_sizes_differ(interleave_artifact):
    """Qwen2's q/k/v carry biases (one packed Add before the Split); 4 query heads over 2 KV heads of 16: the
    Split's sizes are [64, 32, 32]."""
    model = ir.load(Manifest.load(interleave_artifact).graph_path("decoder"))
    assert model.graph.initializers  # loaded
    packed = next(n for n in model.graph if n.op_type == "GroupQueryAttention")
    assert packed.inputs[0].producer().op_type == "Add"  # the export feeds the packed sum to the attention itself
    UnpackQkvPass()(model)  # (graph_passes/pack_qkv.py) the Split the fused form had before its last pass
    split = next(n for n in model.graph if n.op_type == "Split" and "/layers.0/attn/" in n.name)
    assert split.inputs[1].const_value.numpy().tolist() == [64, 32, 32]
    add = split.inputs[0].producer()
    assert add.op_type == "Add" and add.inputs[0].producer().op_type == "MatMul"
    assert add.inputs[1].const_value.numpy().shape == (128,)
    names = {n.name for n in model.graph}
    assert not any("/attn/q_proj/" in n or "/attn/k_proj/" in n for n in names)  # the per-projection Adds are gone
    gqa = next(n for n in model.graph if n.op_type == "GroupQueryAttention")
    assert split.outputs[2] is gqa.inputs[2]  # the value projection feeds GroupQueryAttention directly


# ------------------------------------------------------------------------- parity with the reference, flags on/off

PACKED = {"mha18": ("tiny_artifact", "tiny_model"), "interleave": ("interleave_artifact", "interleave_model")}


@pytest.fixture(scope="module", params=list(PACKED))
def baked(request, tmp_path_factory, images):
    plain_dir = request.getfixturevalue(PACKED[request.param][0])
    model_dir = request.getfixturevalue(PACKED[request.param][1])
    baked_dir = tmp_path_factory.mktemp("pack") / request.param
    shutil.copytree(plain_dir, baked_dir)
    bake(baked_dir, "clva,sevi", BakeOptions(sevi_start_layer=2, debug_outputs=True))
    pipe, plain = Pipeline.from_dir(baked_dir), Pipeline.from_dir(plain_dir)
    decoder = ir.load(pipe.manifest.graph_path("decoder"))
    # packed: gate/up's Split in every layer; q/k/v's too, or GroupQueryAttention reads the packed projection itself
    # (graph_passes/pack_qkv.py: head size 16 here, 8 on the MHA model, which stays as fuse_rotary left it)
    qkv_packed = sum(n.op_type == "GroupQueryAttention" and n.attributes["do_rotary"].value == 1 for n in decoder.graph)
    assert _ops(decoder).count("Split") + qkv_packed == 2 * pipe.num_layers
    assert qkv_packed == (pipe.num_layers if request.param == "interleave" else 0)
    batch = pipe._pad([pipe.prompts.encode(p) for p in PROMPTS])
    pixels = pipe.preprocess([pipe._load(img, i) for i, img in enumerate(images[:2])])
    return {"pipe": pipe, "plain": plain, "batch": batch, "pixels": pixels, "images": images[:2],
            "ref": ReferenceLlava.from_pretrained(model_dir), "name": request.param}


def test_packed_matches_the_reference_flags_on_and_off(baked):
    """CLVA + SEVI on row 0, off on row 1 of a left-padded batch: prefill + 3 decode logits within 1e-4 of the
    reference, the off row exactly the plain (packed) model; then 12 greedy tokens identical."""
    spec = CASES["both"]
    clva, sevi = reference_flags(spec)
    refs, tokens = reference_passes(baked["ref"], baked["batch"], baked["pixels"], clva, sevi)
    passes = onnx_passes(baked["pipe"], baked["plain"], baked["batch"], baked["pixels"], [spec, None], tokens)
    for step, ((res, plain_logits), r) in enumerate(zip(passes, refs)):
        diff = float(np.abs(res["logits"][:, -1] - r.logits[:, -1].numpy()).max())
        assert diff <= ATOL, f"{baked['name']} step {step}: max |logit diff| {diff:.3g}"
        assert np.array_equal(res["logits"][:, -1][1], plain_logits[1])
    ref = baked["ref"]
    eos = ref.hf.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    got = baked["pipe"].generate_batch([Request(img, p, spec if i == 0 else None) for i, (img, p)
                                        in enumerate(zip(baked["images"], PROMPTS))], max_new_tokens=12)
    want = ref.generate(torch.tensor(baked["batch"].ids), torch.tensor(baked["pixels"]),
                        torch.tensor(baked["batch"].attention_mask), 12, clva=clva, sevi=sevi, eos_token_id=eos)
    for row, g in zip(want.tolist(), got):
        cut = next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
        assert g.token_ids == row[:cut]


# ---------------------------------------------------------------------------------- quantization and fp16


@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_packed_then_quantized_equals_quantized_unpacked(unfused_artifact, quant):
    """Blocks (int4) and scales (int8) run along K within one output column, so the packed weight quantizes to
    the members' codes and scales side by side, and the two decoders compute the same logits."""
    make = (lambda: Int4WeightPass(32, True, 4)) if quant == "int4" else (lambda: Int8DynamicPass(True))
    unpacked, packed = _fused_unpacked(unfused_artifact), _fused_unpacked(unfused_artifact)
    PackMatMulPass()(packed)
    make()(unpacked)
    make()(packed)
    init_u, init_p = unpacked.graph.initializers, packed.graph.initializers
    op = "MatMulNBits" if quant == "int4" else "MatMulInteger"
    qkv = next(n for n in packed.graph if n.op_type == op and "/layers.0/attn/q_k_v_proj/" in n.name)
    parts = [next(n for n in unpacked.graph if n.op_type == op and f"/layers.0/attn/{p}_proj/" in n.name)
             for p in ("q", "k", "v")]
    axis = 0 if quant == "int4" else 1  # B [N, blocks, blob] / scales [N*blocks];  W_q [K, N]
    for i in (1, 2) if quant == "int4" else (1,):
        want = np.concatenate([init_u[n.inputs[i].name].const_value.numpy() for n in parts], axis=axis)
        np.testing.assert_array_equal(init_p[qkv.inputs[i].name].const_value.numpy(), want)
    assert _max_diff(unpacked, packed) <= 1e-4


def test_int4_and_fp16_conversions_load_and_run(tiny_artifact, tmp_path, images):
    layers = Pipeline.from_dir(tiny_artifact).num_layers
    for name, options in (("int4", PrecisionOptions(quantize="int4", accuracy_level=4)),
                          ("fp16", PrecisionOptions(precision="fp16"))):
        dst = tmp_path / name
        shutil.copytree(tiny_artifact, dst)
        convert_precision(dst, options)
        pipe = Pipeline.from_dir(dst)
        ops = _ops(ir.load(pipe.manifest.graph_path("decoder")))
        if name == "int4":
            assert ops.count("MatMulNBits") == 4 * layers + 1 and "MatMul" not in ops
        assert ops.count("Split") == 2 * layers
        got = pipe.generate(images[0], PROMPTS[0], max_new_tokens=4)
        assert len(got.token_ids) >= 1


# ----------------------------------------------------------------------------- weights on disk, near misses


def _graph(weights: dict[str, np.ndarray | None], constant_nodes: tuple[str, ...] = (), outputs=None,
           extra_reader: str | None = None) -> ir.Model:
    """x [2, K] ─MatMul(W_i)─► y_i for each weight (None: the weight is a graph input), then y = Σ y_i."""
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["batch", 8]))
    ys = []
    graph = ir.Graph([x], [], nodes=[], name="g", opset_imports={"": 18})
    for name, w in weights.items():
        if w is None:
            wv = ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([8, 4]))
            graph.inputs.append(wv)
        elif name in constant_nodes:
            c = ir.node("Constant", [], attributes={"value": ir.tensor(w, name=name)})
            c.outputs[0].name = name
            graph.append(c)
            wv = c.outputs[0]
        else:
            wv = ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(w.shape),
                          const_value=ir.tensor(w, name=name))
            graph.register_initializer(wv)
        mm = ir.node("MatMul", [x, wv], name=f"/model/{name}_proj/MatMul_0")
        mm.outputs[0].name = f"y_{name}"
        graph.append(mm)
        ys.append(mm.outputs[0])
        if extra_reader == name:
            t = ir.node("Transpose", [wv], attributes={"perm": [1, 0]})
            t.outputs[0].name = f"{name}_t"
            graph.append(t)
            graph.outputs.append(t.outputs[0])
    total = ys[0]
    for y in ys[1:]:
        add = ir.node("Add", [total, y])
        add.outputs[0].name = f"sum_{y.name}"
        graph.append(add)
        total = add.outputs[0]
    graph.outputs.append(total)
    for name in outputs or ():
        graph.outputs.append(next(y for y in ys if y.name == f"y_{name}"))
    for v in graph.outputs:
        v.dtype = ir.DataType.FLOAT
    return ir.Model(graph, ir_version=10)


def _run(model: ir.Model, feed: dict) -> list[np.ndarray]:
    return _session(model).run(None, feed)


W = {k: np.random.default_rng(i).standard_normal((8, 4)).astype(np.float32) for i, k in enumerate("abc")}
X = np.random.default_rng(9).standard_normal((2, 8)).astype(np.float32)


def test_constant_node_weights_pack_and_match():
    model = _graph(dict(W), constant_nodes=("b",))
    want = _run(model, {"x": X})
    p = PackMatMulPass()
    p(model)
    assert p.count == 1 and _ops(model).count("MatMul") == 1 and "Constant" not in _ops(model)
    assert list(model.graph.initializers) == ["/model/a_b_c_proj/weight", "/model/a_b_c_proj/split"]
    np.testing.assert_allclose(_run(model, {"x": X})[0], want[0], atol=1e-6)


@pytest.mark.parametrize("case", ["graph_input_weight", "weight_read_elsewhere", "output_is_graph_output"])
def test_near_misses_are_left_alone(case):
    """One of two siblings does not fit: no group of two is left, count 0, the graph unchanged."""
    weights = {"a": W["a"], "b": None if case == "graph_input_weight" else W["b"]}
    model = _graph(weights, outputs=("b",) if case == "output_is_graph_output" else None,
                   extra_reader="b" if case == "weight_read_elsewhere" else None)
    before = _ops(model)
    p = PackMatMulPass()
    p(model)
    assert p.count == 0 and _ops(model) == before
    # a third sibling that fits packs with the first one, the misfit stays as it was
    weights["c"] = W["c"]
    model = _graph(weights, outputs=("b",) if case == "output_is_graph_output" else None,
                   extra_reader="b" if case == "weight_read_elsewhere" else None)
    feed = {"x": X, **({"b": W["b"]} if case == "graph_input_weight" else {})}
    want = _run(model, feed)
    p(model)
    assert p.count == 1 and _ops(model).count("MatMul") == 2
    for x, y in zip(_run(model, feed), want):
        np.testing.assert_allclose(x, y, atol=1e-6)


def test_packed_weight_goes_to_the_external_data_file(tmp_path):
    """A graph whose weights live in `<file>.data`: the packed weight is written there, the old ones are gone
    (the file does not grow), and the model runs from disk with the same outputs."""
    big = {k: np.random.default_rng(i).standard_normal((8, 512)).astype(np.float32) for i, k in enumerate("abc")}
    path = tmp_path / "g.onnx"
    ir.save(_graph(big), path, external_data="g.onnx.data")
    size = (tmp_path / "g.onnx.data").stat().st_size
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": X})
    assert run_passes(path, [PackMatMulPass()]) == {"pack_matmul": 1}
    after = (tmp_path / "g.onnx.data").stat().st_size
    assert size <= after <= size + 4096 and (tmp_path / "g.onnx").stat().st_size < 4096
    model = ir.load(path)
    w = model.graph.initializers["/model/a_b_c_proj/weight"]
    assert isinstance(w.const_value, ir.ExternalTensor) and w.const_value.location == "g.onnx.data"
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": X})
    np.testing.assert_allclose(got[0], want[0], atol=1e-5)


def test_annotate_missing_leaves_initializers_out_of_the_graph_inputs(unfused_artifact):
    """graph_passes/shapes.py detaches big initializers as graph inputs for the ONNX shape inference and puts them
    back; onnx-ir's `is_graph_input()` must say False again afterwards (a `del` on the inputs list left it True, and
    this pass then took every weight after FuseAttentionPass for an overridable input)."""
    model = _fused_unpacked(unfused_artifact)  # FuseAttentionPass ends with annotate_missing
    assert not any(v.is_graph_input() for v in model.graph.initializers.values())
