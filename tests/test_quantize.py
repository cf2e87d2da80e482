"""int4 (MatMulNBits) and dynamic int8 quantization passes (graph_passes/quantize.py) on the tiny fixtures.

Tolerances (quantized vs fp32 logits, prefill + 8 teacher-forced decode steps, 2 prompts, tiny random-weight
fixture at opset 18; measured with `anchorrt verify --precision` on this machine, then bounded with margin):
    int8: max |diff| measured 0.098, mean 0.020  -> bounds 0.3 / 0.06
    int4: max |diff| measured 0.81,  mean 0.16   -> bounds 2.0 / 0.4
The logits of this random model span about ±2.5 and are nearly flat, so top-1 agreement is fragile (int8 89%,
int4 72% measured); the bounds below (70% / 50%) only catch a broken rewrite, not a quality regression.
"""

from __future__ import annotations

import shutil

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from anchorrt.graph_passes.bake import BakeOptions, PrecisionOptions, convert_precision
from anchorrt.graph_passes.base import PassError
from anchorrt.graph_passes.quantize import Int4WeightPass, quantize_int4_blocks
from anchorrt.runtime.manifest import Manifest

from tests.conftest import run_cli

BAKE = BakeOptions(sevi_start_layer=4)  # the fixtures have 8 layers: SEVI's default (8) would edit none


def _copy(src, tmp_path, name):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _reference_dequantize(packed, scales, zero_points, k):
    """Independent of graph_passes/quantize.py: the layout of ONNX Runtime's ContribOperators.md, element by
    element (B[n, block, byte] holds codes 2*byte (low nibble) and 2*byte+1 (high nibble) of the block)."""
    n, n_blocks, blob = packed.shape
    block = 2 * blob
    w = np.zeros((k, n), np.float64)
    for col in range(n):
        for blk in range(n_blocks):
            if zero_points is None:
                zp = 8
            else:
                byte = zero_points[col * ((n_blocks + 1) // 2) + blk // 2]
                zp = (byte >> 4) if blk % 2 else (byte & 0x0F)
            scale = float(scales[col * n_blocks + blk])
            for j in range(block):
                row = blk * block + j
                if row >= k:
                    break
                byte = packed[col, blk, j // 2]
                code = (byte >> 4) if j % 2 else (byte & 0x0F)
                w[row, col] = (int(code) - int(zp)) * scale
    return w


@pytest.mark.parametrize("block_size,symmetric", [(16, True), (32, False), (64, True)])
def test_int4_packing_matches_reference_and_onnxruntime(block_size, symmetric):
    rng = np.random.default_rng(block_size)
    k, n = 70, 24  # K not a multiple of the block: the padded tail must not matter
    w = (rng.standard_normal((k, n)) * np.linspace(0.1, 3.0, n)).astype(np.float32)
    packed, scales, zp = quantize_int4_blocks(w, block_size, symmetric)
    assert packed.shape == (n, -(-k // block_size), block_size // 2) and packed.dtype == np.uint8
    deq = _reference_dequantize(packed, scales.reshape(-1), None if zp is None else zp.reshape(-1), k)
    # every weight within half a quantization step of its block (plus float rounding)
    step = np.repeat(scales, block_size, axis=1)[:, :k].T
    assert np.all(np.abs(deq - w) <= 0.5 * step + 1e-6)
    # ONNX Runtime's kernel on the same bytes computes x @ the reference-dequantized weight
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([3, k]))
    model = ir.Model(ir.Graph([x], [], nodes=[], name="g", opset_imports={"": 18, "com.microsoft": 1}), ir_version=10)
    w_val = ir.Value(name="w", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([k, n]), const_value=ir.tensor(w))
    model.graph.register_initializer(w_val)
    node = ir.Node("", "MatMul", [x, w_val], name="/model/layers.0/mlp/up_proj/MatMul_0",
                   metadata_props={"pkg.torch.onnx.name_scopes": "['', 'lm', 'lm.layers.0', 'x']"})
    node.outputs[0].name, node.outputs[0].dtype = "y", ir.DataType.FLOAT
    model.graph.append(node)
    model.graph.outputs.append(node.outputs[0])
    p = Int4WeightPass(block_size, symmetric)
    p(model)
    assert p.count == 1 and [n_.op_type for n_ in model.graph] == ["MatMulNBits"]
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    xs = rng.standard_normal((3, k)).astype(np.float32)
    (y,) = sess.run(None, {"x": xs})
    np.testing.assert_allclose(y, xs.astype(np.float64) @ deq, rtol=1e-4, atol=1e-4)


def test_int8_and_int4_artifacts_generate(tiny_artifact, tmp_path, images):
    from anchorrt.runtime.pipeline import Pipeline

    weight_matmuls = None
    for quant, op in (("int8", "MatMulInteger"), ("int4", "MatMulNBits")):
        art = _copy(tiny_artifact, tmp_path, quant)
        m = convert_precision(art, PrecisionOptions(quantize=quant))
        assert m.data["precision"]["weights"] == quant and m.data["precision"]["activations"] == "fp32"
        q = m.data["precision"]["quantization"]
        decoder = ir.load(art / "decoder.onnx")
        ops = [n.op_type for n in decoder.graph]
        assert ops.count(op) == q["quantized"] > 0
        weight_matmuls = weight_matmuls or q["quantized"]
        assert q["quantized"] == weight_matmuls  # the same MatMuls for both methods
        # what is left as MatMul are exactly the attention score/value products (2 per layer, 8 layers); none in
        # the fused default (GroupQueryAttention)
        assert ops.count("GroupQueryAttention") == 8 and ops.count("MatMul") == 0 and not q["excluded"]
        # the vision graph is never quantized; fp16 by default with int4 (a GPU target), fp32 with CPU int8
        vision = ir.load(art / "vision.onnx")
        assert not {"MatMulNBits", "MatMulInteger"} & {n.op_type for n in vision.graph}
        want = "fp16" if quant == "int4" else "fp32"
        assert m.data["precision"]["graphs"]["vision"] == want
        assert vision.graph.inputs[0].dtype == (ir.DataType.FLOAT16 if want == "fp16" else ir.DataType.FLOAT)
        out = Pipeline.from_dir(art).generate(images[0], "What is in the image?", max_new_tokens=6)
        assert len(out.token_ids) == 6


def test_int8_on_opset23_leaves_attention_and_mitigation_alone(gqa_artifact, tmp_path):
    art = _copy(gqa_artifact, tmp_path, "gqa-int8")
    plain = ir.load(gqa_artifact / "decoder.onnx")
    m = convert_precision(art, PrecisionOptions(quantize="int8"), mitigation="clva,sevi,probe", bake_options=BAKE)
    decoder = ir.load(art / "decoder.onnx")
    ops = [n.op_type for n in decoder.graph]
    assert ops.count("Attention") == 8 and "QAttention" not in ops  # the opset-23 op untouched
    assert all(n.domain == "" for n in decoder.graph if n.op_type == "Attention")
    # every weight MatMul of the plain graph was quantized, nothing else
    plain_weights = {n.name for n in plain.graph if n.op_type == "MatMul" and n.inputs[1].is_initializer()}
    assert ops.count("MatMulInteger") == len(plain_weights) == m.data["precision"]["quantization"]["quantized"]
    quantized_scopes = {n.name.rsplit("/int8/", 1)[0] for n in decoder.graph if n.op_type == "MatMulInteger"}
    assert quantized_scopes == plain_weights
    # mitigation MatMuls (inside If branches) are all still float MatMuls, and listed as excluded
    inner = [n for n in decoder.graph.all_nodes() if n.graph is not decoder.graph]
    assert inner and not any(n.op_type in ("MatMulInteger", "DynamicQuantizeLinear") for n in inner)
    excluded = m.data["precision"]["quantization"]["excluded"]
    inner_matmuls = {n.name for n in inner if n.op_type == "MatMul"}
    assert inner_matmuls and inner_matmuls <= set(excluded)
    assert all(excluded[name] == "mitigation subgraph" for name in inner_matmuls)


def _teacher_forced_logits(art, images, tokens=None, flags=None):
    from anchorrt.exporter.verify import _teacher_forced
    from anchorrt.runtime.pipeline import Pipeline

    pipe = Pipeline.from_dir(art)
    prompts = ["What is in the image?", "Describe it."]
    logits, chosen, _ = _teacher_forced(pipe, images[:2], prompts, 4, tokens)
    return np.stack(logits), chosen


@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_flags_off_quantized_baked_equals_quantized_plain(tiny_artifact, tmp_path, images, quant):
    plain = _copy(tiny_artifact, tmp_path, "plain")
    baked = _copy(tiny_artifact, tmp_path, "baked")
    convert_precision(plain, PrecisionOptions(quantize=quant))
    m = convert_precision(baked, PrecisionOptions(quantize=quant), mitigation="clva,sevi,probe", bake_options=BAKE)
    assert set(m.mitigation) >= {"clva", "sevi", "probe"}
    a, tokens = _teacher_forced_logits(plain, images)
    b, _ = _teacher_forced_logits(baked, images, tokens)
    assert np.array_equal(a, b), f"max diff {np.abs(a - b).max()}"  # bitwise, every method's flag off


def test_mitigation_onto_quantized_artifact(tiny_artifact, tmp_path, images):
    """Baking mitigation after int4 works (activations stay fp32); its flags still change nothing when off."""
    from anchorrt.graph_passes.bake import bake

    art = _copy(tiny_artifact, tmp_path, "q-then-bake")
    convert_precision(art, PrecisionOptions(quantize="int4"))
    before, tokens = _teacher_forced_logits(art, images)
    m = bake(art, "clva,sevi", BAKE)
    assert m.data["precision"]["weights"] == "int4" and {"clva", "sevi"} <= set(m.mitigation)
    after, _ = _teacher_forced_logits(art, images, tokens)
    assert np.array_equal(before, after)


def test_quantized_logits_within_stated_tolerance(tiny_artifact):
    from anchorrt.exporter.verify import verify_precisions

    rows = {r.precision: r for r in verify_precisions(tiny_artifact, "int8,int4", steps=8)}
    assert rows["fp32"].max_abs_diff == 0.0
    for name, max_bound, mean_bound, top1 in (("int8", 0.3, 0.06, 0.7), ("int4", 2.0, 0.4, 0.5)):
        r = rows[name]
        assert r.ran, r.error
        assert 0.0 < r.max_abs_diff <= max_bound, (name, r.max_abs_diff)  # > 0: the weights did change
        assert r.mean_abs_diff <= mean_bound, (name, r.mean_abs_diff)
        assert r.top1_agreement >= top1, (name, r.top1_agreement)


def test_bad_options_and_double_quantization(tiny_artifact, tmp_path):
    with pytest.raises(PassError, match="block size 48"):
        PrecisionOptions(quantize="int4", block_size=48).check()
    with pytest.raises(PassError, match="int8 is dynamic quantization for the CPU"):
        PrecisionOptions(precision="fp16", quantize="int8").check()
    art = _copy(tiny_artifact, tmp_path, "twice")
    convert_precision(art, PrecisionOptions(quantize="int8"))
    files = {p.name: p.stat().st_mtime_ns for p in art.iterdir()}
    with pytest.raises(PassError, match="already converted"):
        convert_precision(art, PrecisionOptions(quantize="int4"))
    assert {p.name: p.stat().st_mtime_ns for p in art.iterdir()} == files  # untouched
    Manifest.load(art)  # still verifies


def test_cli_bake_quantize_torch_free(tiny_artifact, tmp_path):
    art = _copy(tiny_artifact, tmp_path, "cli")
    r = run_cli("bake", str(art), "--quantize", "int4", "--block-size", "16", "--asymmetric", "--accuracy-level", "4",
                block_torch=True)
    assert r.returncode == 0, r.stderr
    q = Manifest.load(art).data["precision"]["quantization"]
    assert (q["block_size"], q["symmetric"], q["accuracy_level"]) == (16, False, 4)
    bad = run_cli("bake", str(art), "--quantize", "int4", "--block-size", "48", block_torch=True)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "block size 48" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_cli_verify_precision_table(tiny_artifact):
    """`verify --precision` on an fp32 artifact, torch-free: one row per precision, accuracy and size."""
    r = run_cli("verify", str(tiny_artifact), "--precision", "int8,int4", "--steps", "2", block_torch=True)
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ")]
    assert "top-1 agreement" in rows[0] and [row.split("|")[1].strip() for row in rows[1:]] == ["fp32", "int8", "int4"]
    sizes = [float(row.split("|")[5]) for row in rows[1:]]
    assert sizes[0] > sizes[1] > sizes[2] > 0  # fp32 > int8 > int4 graphs
    agree = [float(row.split("|")[4].strip().rstrip("%")) for row in rows[2:]]
    assert all(0 <= a <= 100 for a in agree)
    bad = run_cli("verify", str(tiny_artifact), "--precision", "int3", block_torch=True)
    assert bad.returncode == 2 and "int3" in bad.stderr and "Traceback" not in bad.stderr
