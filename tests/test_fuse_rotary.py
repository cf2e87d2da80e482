"""Fused rotary embedding (graph_passes/fuse_rotary.py) on the fused decoder form.

The export default runs it (tests/test_mitigation_parity.py and test_parity.py therefore check it against the
independent references too); here: the rewrite itself (node counts, tables, inputs), ONNX Runtime parity with the
exporter's rotary on a left-padded prefill and a decode step, the reference with flags on and off, a left-padded
batch against one-by-one, the near misses it leaves alone, the table size and the refusal past it, fp16 / int4.
M-RoPE (Qwen2-VL) is left as exported: tests/test_qwen2_vl.py checks the count 0 and its parity.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from anchorrt.graph_passes.fuse_attention import FuseAttentionPass
from anchorrt.graph_passes.fuse_rotary import FuseRotaryPass, match_rotated
from anchorrt.runtime.pipeline import Pipeline, Request

PROMPTS = ["What is in the image? Describe the content of the image.", "Count.", "Is there a dog?"]
POSITIONS = 512  # the tiny LLaVA's max_position_embeddings


def _attention_fused(unfused_artifact) -> ir.Model:
    """The unfused export with only FuseAttentionPass run: the form FuseRotaryPass starts from."""
    model = ir.load(unfused_artifact / "decoder.onnx")
    FuseAttentionPass()(model)
    return model


def _session(model: ir.Model) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), so,
                                providers=["CPUExecutionProvider"])


def _prefill_and_step(sess: ort.InferenceSession, layers: int = 8, heads: int = 8, d: int = 8) -> list[np.ndarray]:
    """Left-padded prefill of two rows (row 0 padded by 2) and one decode step; -> [logits, present.0.key] of each."""
    rng = np.random.default_rng(0)
    b, s = 2, 5
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], np.int64)
    feed = {"inputs_embeds": rng.standard_normal((b, s, 64), dtype=np.float32), "attention_mask": mask,
            "position_ids": np.maximum(np.cumsum(mask, -1) - 1, 0)}
    past = {f"past_key_values.{i}.{k}": np.zeros((b, heads, 0, d), np.float32)
            for i in range(layers) for k in ("key", "value")}
    names = [o.name for o in sess.get_outputs()]
    res = dict(zip(names, sess.run(None, {**feed, **past})))
    out = [res["logits"], res["present.0.key"]]
    past = {f"past_key_values.{k[8:]}": v for k, v in res.items() if k.startswith("present.")}
    mask = np.concatenate([mask, np.ones((b, 1), np.int64)], 1)
    step = {"inputs_embeds": rng.standard_normal((b, 1, 64), dtype=np.float32), "attention_mask": mask,
            "position_ids": feed["position_ids"][:, -1:] + 1}
    res = dict(zip(names, sess.run(None, {**step, **past})))
    return out + [res["logits"], res["present.7.key"]]


def test_export_fuses_rotary_in_every_layer(tiny_artifact):
    data = json.loads((tiny_artifact / "manifest.json").read_text())
    assert data["attention"]["fusions"]["fuse_rotary"] == 8
    assert "fuse_rotary" not in data["attention"].get("left_as_exported", {})  # (pack_qkv: head size 8, not rotated)
    model = ir.load(tiny_artifact / "decoder.onnx")
    ops = [n.op_type for n in model.graph]
    assert ops.count("RotaryEmbedding") == 16 and not {"Neg", "Cos", "Sin"} & set(ops)
    position_ids = next(v for v in model.graph.inputs if v.name == "position_ids")
    tables = set()
    for gqa in (n for n in model.graph if n.op_type == "GroupQueryAttention"):
        assert gqa.attributes["do_rotary"].value == 0  # the mitigation passes read the rotated q and new keys
        for index in (0, 1):
            rope = gqa.inputs[index].producer()
            assert rope.op_type == "RotaryEmbedding" and rope.domain == "com.microsoft"
            assert rope.inputs[1] is position_ids  # the runtime's positions, never slot indices
            assert rope.inputs[0].producer().op_type in ("MatMul", "Split")  # q_proj / k_proj (packed), 3-D
            assert rope.attributes["interleaved"].value == 0 and rope.attributes["num_heads"].value == 8
            tables.update((rope.inputs[2].name, rope.inputs[3].name))
    assert len(tables) == 2  # one cos and one sin table for all layers
    cos = model.graph.initializers["model.rotary_emb.cos_cache"].const_value.numpy()
    assert cos.shape == (data["context_length"], 4) == (POSITIONS, 4)
    np.testing.assert_allclose(cos[0], 1.0)


def test_node_counts_and_onnxruntime_parity(unfused_artifact):
    """The exporter's rotary (after FuseAttentionPass) against the fused op: 23 fewer nodes per layer, the same
    logits and cache on a left-padded prefill and a decode step."""
    before, after = _attention_fused(unfused_artifact), _attention_fused(unfused_artifact)
    p = FuseRotaryPass(POSITIONS)
    p(after)
    n_before, n_after = len(list(before.graph)), len(list(after.graph))
    assert p.count == 8 and p.skipped == {}
    # per layer, for q and k: Reshape + Transpose to 4-D, the 7 rotate nodes, Transpose + Reshape + its Constant
    # back to 3-D -> RotaryEmbedding; the per-layer Unsqueeze of cos and sin; once: the cos/sin subgraph
    ops = [n.op_type for n in after.graph]
    assert ops.count("RotaryEmbedding") == 16 and not {"Neg", "Cos", "Sin"} & set(ops)
    assert n_before - n_after == 8 * 23 + 1, (n_before, n_after)
    for x, y in zip(_prefill_and_step(_session(before)), _prefill_and_step(_session(after))):
        np.testing.assert_allclose(x, y, atol=1e-5)


def test_flags_on_and_off_match_the_reference(tiny_artifact, tiny_model, images, tmp_path_factory):
    """CLVA + SEVI baked on the rotary-fused form: row 0 on, row 1 off, logits <= 1e-4 for a prefill and 3 decode
    steps, and the greedy tokens identical (tests/test_mitigation_parity.py's helpers)."""
    from anchorrt.exporter.reference import ReferenceLlava
    from anchorrt.graph_passes.bake import BakeOptions, bake

    from tests.test_mitigation_parity import (
        ATOL,
        CASES,
        assert_reference_tokens,
        onnx_passes,
        reference_flags,
        reference_passes,
    )

    baked = tmp_path_factory.mktemp("rotary") / "baked"
    shutil.copytree(tiny_artifact, baked)
    bake(baked, "clva,sevi", BakeOptions(sevi_start_layer=2))
    pipe, plain = Pipeline.from_dir(baked), Pipeline.from_dir(tiny_artifact)
    assert sum(n.op_type == "RotaryEmbedding" for n in ir.load(baked / "decoder.onnx").graph) == 16
    spec = CASES["both"]
    clva, sevi = reference_flags(spec)
    batch = pipe._pad([pipe.prompts.encode(p) for p in PROMPTS[:2]])
    pixels = pipe.preprocess([pipe._load(img, i) for i, img in enumerate(images[:2])])
    ref = ReferenceLlava.from_pretrained(tiny_model)
    refs, tokens = reference_passes(ref, batch, pixels, clva, sevi)
    for step, ((res, plain_logits), r) in enumerate(zip(onnx_passes(pipe, plain, batch, pixels, [spec, None], tokens),
                                                        refs)):
        diff = float(np.abs(res["logits"][:, -1] - r.logits[:, -1].numpy()).max())
        assert diff <= ATOL, f"step {step}: max |logit diff| {diff:.3g}"
        assert np.array_equal(res["logits"][1, -1], plain_logits[1])
    got = pipe.generate_batch([Request(images[i], p, spec if i == 0 else None) for i, p in enumerate(PROMPTS[:2])],
                              max_new_tokens=12)
    assert_reference_tokens(ref, batch, pixels, got, 12, clva, sevi)


def test_left_padded_batch_equals_one_by_one(tiny_artifact, images):
    pipe = Pipeline.from_dir(tiny_artifact)
    reqs = [Request(images[i % len(images)], p) for i, p in enumerate(PROMPTS)]
    batch = pipe.generate_batch(reqs, max_new_tokens=10)
    alone = [pipe.generate_batch([r], max_new_tokens=10)[0] for r in reqs]
    assert [g.token_ids for g in batch] == [g.token_ids for g in alone]


def test_near_misses_are_left_as_exported(unfused_artifact):
    """A layer whose query rotation is not rotate_half (the Concat's halves swapped) keeps the exporter's rotary for
    both its query and key, with the reason; the other layers are fused and the graph computes what it did."""
    model = _attention_fused(unfused_artifact)
    gqa = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
    add = gqa[3].inputs[0].producer().inputs[0].producer().inputs[0].producer()  # Reshape <- Transpose <- Add
    cat = next(m.inputs[i].producer() for m in (v.producer() for v in add.inputs) for i in (0, 1)
               if m.inputs[i].producer() is not None and m.inputs[i].producer().op_type == "Concat")
    first, second = cat.inputs[0], cat.inputs[1]
    cat.replace_input_with(0, second)
    cat.replace_input_with(1, first)
    assert match_rotated(gqa[3].inputs[0])[0] is None and match_rotated(gqa[3].inputs[1])[0] is not None
    expected = _prefill_and_step(_session(model))
    p = FuseRotaryPass(POSITIONS)
    p(model)
    assert p.count == 7 and set(p.skipped) == {3} and "the query is not rotated" in p.skipped[3]
    assert all(n.inputs[1].producer().op_type != "RotaryEmbedding" for n in model.graph
               if n.op_type == "GroupQueryAttention" and "layers.3/" in n.name)
    for x, y in zip(expected, _prefill_and_step(_session(model))):
        np.testing.assert_allclose(x, y, atol=1e-5)
    # M-RoPE-shaped positions ([3, B, S]) and no table size: nothing fused, each with its reason
    for positions, shape, why in ((POSITIONS, [3, "batch", "sequence"], "M-RoPE"), (None, None, "no table size")):
        m = _attention_fused(unfused_artifact)
        if shape is not None:
            next(v for v in m.graph.inputs if v.name == "position_ids").shape = ir.Shape(shape)
        p = FuseRotaryPass(positions)
        p(m)
        assert p.count == 0 and len(p.skipped) == 8 and all(why in r for r in p.skipped.values()), p.skipped
        assert not any(n.op_type == "RotaryEmbedding" for n in m.graph)


def test_table_cap_lowers_the_context_and_longer_prompts_are_refused(unfused_artifact, images, tmp_path,
                                                                      monkeypatch):
    """fuse_artifact with the table capped below the context: the manifest's context_length follows the table, a
    prompt past it is refused in one line before any graph runs, and the op itself refuses a position past it."""
    from anchorrt.graph_passes import bake as bake_module
    from anchorrt.runtime.errors import PromptError

    art = tmp_path / "capped"
    shutil.copytree(unfused_artifact, art)
    monkeypatch.setattr(bake_module, "MAX_TABLE_POSITIONS", 40)
    said = []
    bake_module.fuse_artifact(art, progress=said.append)
    data = json.loads((art / "manifest.json").read_text())
    assert data["context_length"] == 40 and data["attention"]["fusions"]["fuse_rotary"] == 8
    assert any("capped at 40 positions" in s for s in said)
    pipe = Pipeline.from_dir(art)
    prompt_tokens = len(pipe.prompts.encode(PROMPTS[1]).ids)
    assert pipe.generate(images[0], PROMPTS[1], max_new_tokens=40 - prompt_tokens).token_ids
    with pytest.raises(PromptError, match="context holds 40") as err:
        pipe.generate(images[0], PROMPTS[1], max_new_tokens=41 - prompt_tokens)
    assert "\n" not in str(err.value)
    sess = pipe.decoder.session
    feed = {"inputs_embeds": np.zeros((1, 1, 64), np.float32), "attention_mask": np.ones((1, 1), np.int64),
            "position_ids": np.array([[40]], np.int64),
            **{f"past_key_values.{i}.{k}": np.zeros((1, 8, 0, 8), np.float32) for i in range(8)
               for k in ("key", "value")}}
    with pytest.raises(Exception, match="out of range"):
        sess.run(None, feed)


@pytest.mark.parametrize("options", [{"precision": "fp16"}, {"quantize": "int4", "accuracy_level": 4}])
def test_fp16_and_int4_conversions_load_and_run(tiny_artifact, images, tmp_path, options):
    from anchorrt.graph_passes.bake import PrecisionOptions, convert_precision

    art = tmp_path / "converted"
    shutil.copytree(tiny_artifact, art)
    convert_precision(art, PrecisionOptions(**options))
    model = ir.load(art / "decoder.onnx")
    ropes = [n for n in model.graph if n.op_type == "RotaryEmbedding"]
    assert len(ropes) == 16
    for rope in ropes:  # the caches follow the op's input dtype (fp16: the projections run in fp16)
        assert rope.inputs[2].dtype == rope.inputs[3].dtype == rope.inputs[0].dtype
    pipe, ref = Pipeline.from_dir(art), Pipeline.from_dir(tiny_artifact)
    got = pipe.generate(images[0], PROMPTS[0], max_new_tokens=8)
    assert len(got.token_ids) >= 1
    if "precision" in options:  # fp16 of this tiny random model keeps the greedy tokens (test_precision.py)
        assert got.token_ids[:4] == ref.generate(images[0], PROMPTS[0], max_new_tokens=4).token_ids
