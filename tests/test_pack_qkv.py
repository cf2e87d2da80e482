"""PackQkvPass / UnpackQkvPass (graph_passes/pack_qkv.py): GroupQueryAttention takes the packed projection and
rotates itself; the mitigation branches get their own Split and rotations.

The export default ends with this pass. The default tiny LLaVA (head size 8) stays unpacked (onnxruntime's
GroupQueryAttention rotates only head sizes that are multiples of 16), so the suite's parity tests on it keep
covering fuse_rotary's form; interleave_artifact (Qwen2, head size 16; test_pack_matmul.py's parity test) and the
head-16 LLaVA below run packed against the independent reference with CLVA + SEVI on and off. Here: the form itself, the graph against its unpacked
self on positions that are not slot indices (left padding, an offset, batch 2, a prefill over a past, a decode
step), the round trip the bake makes, every method's tokens packed vs unpacked, and the layers that stay
unpacked.
"""

from __future__ import annotations

import shutil

import numpy as np
import onnx_ir as ir
import pytest
import torch
from anchorrt.graph_passes.attention_match import GQA, match_attention
from anchorrt.graph_passes.pack_qkv import PackQkvPass, UnpackQkvPass
from anchorrt.runtime.manifest import Manifest

from tests.test_pack_matmul import _session


def _decoder(folder) -> ir.Model:
    return ir.load(Manifest.load(folder).graph_path("decoder"))


def _gqas(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph if n.op_type == "GroupQueryAttention"]


def _feeds(model: ir.Model, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Positions that are not the slots: a batch-2 prefill from an empty cache (row 0 left-padded by 2, row 1
    starting at position 7), a batch-2 step over 8 cached slots, and a one-row 3-token pass over 6 (onnxruntime's
    CPU kernel takes several new tokens over a past at batch 1 only) at positions 10..12. Flag inputs (a baked
    decoder) off."""
    rng = np.random.default_rng(seed)
    out = []
    for batch, seq, past in ((2, 5, 0), (2, 1, 8), (1, 3, 6)):
        total = past + seq
        mask = np.ones((batch, total), np.int64)
        if batch == 2:
            mask[0, :2] = 0
            pos = np.stack([np.maximum(np.arange(total) - 2, 0), np.arange(total) + 7])[:, past:]
        else:
            pos = np.arange(past, total)[None] + 4
        feed = {}
        for v in model.graph.inputs:
            if v.name == "attention_mask":
                feed[v.name] = mask
            elif v.name == "position_ids":
                feed[v.name] = pos.astype(np.int64)
            elif v.name == "inputs_embeds":
                feed[v.name] = rng.standard_normal((batch, seq, v.shape[2])).astype(np.float32)
            elif v.name.startswith("past_key_values."):
                feed[v.name] = rng.standard_normal((batch, v.shape[1], past, v.shape[3])).astype(np.float32)
            elif v.name == "visual_mask":
                feed[v.name] = np.zeros((batch, total), bool)
            else:  # a method's per-row inputs: flags off, parameters 0
                dt = np.dtype(ir.DataType(v.dtype).numpy())
                feed[v.name] = np.zeros([batch if not isinstance(d, int) else d for d in v.shape], dt)
        out.append(feed)
    return out


def _max_diff(a: ir.Model, b: ir.Model) -> float:
    sa, sb = _session(a), _session(b)
    names = [o.name for o in sa.get_outputs()]
    assert names == [o.name for o in sb.get_outputs()]
    diff = 0.0
    for feed in _feeds(a):
        for x, y in zip(sa.run(names, feed), sb.run(names, feed)):
            assert x.shape == y.shape
            diff = max(diff, float(np.abs(x.astype(np.float64) - y.astype(np.float64)).max()) if x.size else 0.0)
    return diff


def test_the_export_default_packs_every_layer(interleave_artifact, tiny_artifact):
    """Qwen2 (head size 16) is packed in every layer; the default tiny LLaVA (head size 8, which onnxruntime's
    GroupQueryAttention refuses to rotate) stays as fuse_rotary left it, and the manifest says why."""
    model = _decoder(interleave_artifact)
    data = Manifest.load(interleave_artifact).data
    layers = data["dims"]["num_layers"]
    assert data["attention"]["fusions"]["pack_qkv"] == layers
    ops = [n.op_type for n in model.graph]
    assert "RotaryEmbedding" not in ops and ops.count("Split") == layers  # only gate/up's Split is left
    for gqa in _gqas(model):
        assert gqa.attributes["do_rotary"].value == 1
        assert gqa.inputs[1] is None and gqa.inputs[2] is None
        assert [gqa.inputs[i].name for i in (7, 8, 9)] == ["model.rotary_emb.cos_cache", "model.rotary_emb.sin_cache",
                                                           "position_ids"]
        assert gqa.inputs[16] is _gqas(model)[0].inputs[16]  # one query_seqlens for the graph
    assert _gqas(model)[0].inputs[16].producer().op_type == "Expand"
    tiny = Manifest.load(tiny_artifact).data["attention"]
    assert tiny["fusions"]["pack_qkv"] == 0
    (reason, skipped), = tiny["left_as_exported"]["pack_qkv"].items()
    assert "head size 8 is not a multiple of 16" in reason and skipped == list(range(tiny["pass_count"]))


def test_packed_equals_unpacked_on_positions_that_are_not_slots(interleave_artifact):
    """The round trip: unpacked (the Split and RotaryEmbedding nodes of fuse_rotary's form) vs packed again; Qwen2
    (q/k/v biases, 4 query heads over 2 KV heads: Split [64, 32, 32])."""
    packed = _decoder(interleave_artifact)
    unpacked = _decoder(interleave_artifact)
    u = UnpackQkvPass()
    u(unpacked)
    assert u.count == len(_gqas(unpacked)) > 0
    assert all(s.form == GQA for s in match_attention(unpacked.graph))  # what the mitigation passes read
    assert sum(n.op_type == "RotaryEmbedding" for n in unpacked.graph) == 2 * u.count
    assert not any("query_seqlens" in (n.name or "") for n in unpacked.graph)  # removed with its last reader
    diff = _max_diff(unpacked, packed)
    assert diff <= 1e-5, diff
    again = PackQkvPass()
    again(unpacked)
    assert again.count == u.count and not again.skipped
    assert _max_diff(unpacked, packed) == 0.0  # the same graph again


def test_the_baked_decoder_keeps_the_chain_only_inside_the_branches(head16):
    """CLVA + SEVI + probe baked: the main graph runs the packed attention; each branch that reads a rotated query
    or key (or a split value) starts with its own Split and rotations; flags off equals the unpacked bake."""
    baked_artifact = head16["baked_dir"]
    model = _decoder(baked_artifact)
    assert "RotaryEmbedding" not in [n.op_type for n in model.graph]
    assert all(g.attributes["do_rotary"].value == 1 for g in _gqas(model))
    inside = [n for n in model.graph.all_nodes() if n.op_type == "RotaryEmbedding"]
    assert inside and all(n.graph is not model.graph for n in inside)
    for n in inside:  # each copy reads a Split of its own branch
        assert n.inputs[0].producer().graph is n.graph and n.inputs[0].producer().op_type == "Split"
    unpacked = _decoder(baked_artifact)
    UnpackQkvPass()(unpacked)
    assert _max_diff(unpacked, model) <= 1e-5
    layers = Manifest.load(baked_artifact).data["dims"]["num_layers"]
    passes = Manifest.load(baked_artifact).data["passes"]
    assert {"graph": "decoder", "pass": "pack_qkv", "count": layers} in passes


def test_a_rotated_query_read_in_the_main_graph_stays_unpacked(interleave_artifact):
    model = _decoder(interleave_artifact)
    UnpackQkvPass()(model)
    gqa = _gqas(model)[0]
    reader = ir.Node("", "Identity", [gqa.inputs[0]], name="/reader/Identity")
    model.graph.append(reader)
    model.graph.outputs.append(reader.outputs[0])
    reader.outputs[0].name = "rotated_query"
    p = PackQkvPass()
    p(model)
    assert p.count == len(_gqas(model)) - 1
    assert "outside an If" in p.skipped[0] and "/reader/Identity" in p.skipped[0]
    assert _gqas(model)[0].attributes["do_rotary"].value == 0


def test_different_rotations_stay_unpacked(interleave_artifact):
    model = _decoder(interleave_artifact)
    UnpackQkvPass()(model)
    rotary = next(n for n in model.graph if n.op_type == "RotaryEmbedding" and "layers.1/" in n.name)
    rotary.attributes["interleaved"] = ir.AttrInt64("interleaved", 1)
    p = PackQkvPass()
    p(model)
    assert p.count == len(_gqas(model)) - 1 and "interleaving" in p.skipped[1]


# ------------------------------------------------------ a LLaVA whose head size ONNX Runtime rotates (16), vs the reference

PACKED_HEAD = 16  # the default tiny LLaVA has head size 8, which onnxruntime's GroupQueryAttention does not rotate


@pytest.fixture(scope="module")
def head16(head16_model, head16_artifact, tmp_path_factory, images):
    """The head-16 tiny LLaVA (tests/conftest.py) exported (packed), then CLVA + SEVI (debug outputs) + probe baked."""
    from anchorrt.exporter.reference import ReferenceLlava
    from anchorrt.graph_passes.bake import BakeOptions, bake
    from anchorrt.runtime.pipeline import Pipeline

    baked = tmp_path_factory.mktemp("head16") / "baked"
    shutil.copytree(head16_artifact, baked)
    bake(baked, "clva,sevi,probe", BakeOptions(sevi_start_layer=2, debug_outputs=True))
    pipe = Pipeline.from_dir(baked)
    return {"pipe": pipe, "plain": Pipeline.from_dir(head16_artifact), "baked_dir": baked,
            "ref": ReferenceLlava.from_pretrained(head16_model), "images": images[:2]}


def test_head16_llava_is_packed(head16):
    model = ir.load(head16["pipe"].manifest.graph_path("decoder"))
    gqas = _gqas(model)
    assert gqas and all(g.attributes["do_rotary"].value == 1 for g in gqas)
    assert gqas[0].inputs[3].shape[3] == PACKED_HEAD


def test_head16_packed_matches_the_reference_flags_on_and_off(head16):
    """CLVA + SEVI on row 0, off on row 1 of a left-padded batch: prefill + 3 decode logits within 1e-4 of the
    independent reference, the off row exactly the plain (packed) model; then 12 greedy tokens identical."""
    from anchorrt.runtime.pipeline import Request

    from tests.test_mitigation_parity import ATOL, CASES, PROMPTS, onnx_passes, reference_flags, reference_passes

    pipe, plain, ref = head16["pipe"], head16["plain"], head16["ref"]
    batch = pipe._pad([pipe.prompts.encode(p) for p in PROMPTS])
    pixels = pipe.preprocess([pipe._load(img, i) for i, img in enumerate(head16["images"])])
    spec = CASES["both"]
    clva, sevi = reference_flags(spec)
    refs, tokens = reference_passes(ref, batch, pixels, clva, sevi)
    for step, ((res, plain_logits), r) in enumerate(zip(onnx_passes(pipe, plain, batch, pixels, [spec, None], tokens),
                                                        refs)):
        diff = float(np.abs(res["logits"][:, -1] - r.logits[:, -1].numpy()).max())
        assert diff <= ATOL, f"step {step}: max |logit diff| {diff:.3g}"
        assert np.array_equal(res["logits"][:, -1][1], plain_logits[1])
    eos = ref.hf.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    got = pipe.generate_batch([Request(img, p, spec if i == 0 else None)
                               for i, (img, p) in enumerate(zip(head16["images"], PROMPTS))], max_new_tokens=12)
    want = ref.generate(torch.tensor(batch.ids), torch.tensor(pixels), torch.tensor(batch.attention_mask), 12,
                        clva=clva, sevi=sevi, eos_token_id=eos)
    for row, g in zip(want.tolist(), got):
        cut = next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
        assert g.token_ids == row[:cut]


def test_head16_every_method_gives_the_unpacked_tokens(head16, tmp_path):
    """CLVA, SEVI, IAVA (probe + contrastive decoding) and all of them: the packed bake and the same bake unpacked
    (the form the reference parity tests cover on the default tiny model) give the same tokens and scores."""
    from anchorrt.graph_passes.bake import transform_artifact
    from anchorrt.runtime.pipeline import Pipeline

    unpacked_dir = tmp_path / "unpacked"
    shutil.copytree(head16["baked_dir"], unpacked_dir)
    _, counts = transform_artifact(unpacked_dir, [UnpackQkvPass()])
    assert counts == {"unpack_qkv": head16["pipe"].num_layers}
    unpacked = Pipeline.from_dir(unpacked_dir)
    assert all(g.attributes["do_rotary"].value == 0 for g in _gqas(ir.load(unpacked.manifest.graph_path("decoder"))))
    image = head16["images"][0]
    for spec in (None, {"clva": True}, {"sevi": True}, {"iava": True}, {"clva": True, "sevi": True, "iava": True}):
        a = head16["pipe"].generate(image, "Describe the image.", mitigation=spec, max_new_tokens=10)
        b = unpacked.generate(image, "Describe the image.", mitigation=spec, max_new_tokens=10)
        assert a.token_ids == b.token_ids, spec


def test_head16_int4_conversion_gives_the_unpacked_tokens(head16, tmp_path):
    """The int4 (MatMulNBits) conversion of the packed bake stays packed, runs, and gives the tokens of the same
    conversion of the unpacked bake."""
    from anchorrt.graph_passes.bake import PrecisionOptions, convert_precision, transform_artifact
    from anchorrt.runtime.pipeline import Pipeline

    pipes = []
    for name in ("packed", "unpacked"):
        dst = tmp_path / name
        shutil.copytree(head16["baked_dir"], dst)
        if name == "unpacked":
            transform_artifact(dst, [UnpackQkvPass()])
        convert_precision(dst, PrecisionOptions(quantize="int4", accuracy_level=4))
        pipes.append(Pipeline.from_dir(dst))
    packed_gqas = _gqas(ir.load(pipes[0].manifest.graph_path("decoder")))
    assert all(g.attributes["do_rotary"].value == 1 for g in packed_gqas)
    image = head16["images"][1]
    for spec in (None, {"sevi": True}, {"clva": True, "iava": True}):
        a, b = (p.generate(image, "What is this?", mitigation=spec, max_new_tokens=8) for p in pipes)
        assert a.token_ids and a.token_ids == b.token_ids, spec


def test_head16_fp16_conversion_unpacks_and_the_forced_pack_agrees(head16, tmp_path):
    """fp16 (the CUDA form) unpacks: every GroupQueryAttention gets its separate RotaryEmbedding back (the form run
    on the GPU), the manifest says why (pack_qkv.HALF_REASON) and a later bake does not pack it again. Packed anyway
    (`PackQkvPass(half=True)`, what tests/test_cuda.py's fp16_packed check runs on CUDA), fp16 on the CPU gives the
    same tokens, flags off and on (GroupQueryAttention rotates in fp16 with its tables converted for it)."""
    from anchorrt.graph_passes.bake import PrecisionOptions, convert_precision, transform_artifact
    from anchorrt.graph_passes.pack_qkv import HALF_REASON
    from anchorrt.runtime.pipeline import Pipeline

    dst = tmp_path / "fp16"
    shutil.copytree(head16["baked_dir"], dst)
    convert_precision(dst, PrecisionOptions(precision="fp16"))
    model = _decoder(dst)
    layers = len(_gqas(model))
    assert layers and all(g.attributes["do_rotary"].value == 0 for g in _gqas(model))
    assert sum(n.op_type == "RotaryEmbedding" for n in model.graph) == 2 * layers
    attention = Manifest.load(dst).data["attention"]
    assert attention["fusions"]["pack_qkv"] == 0
    assert attention["left_as_exported"]["pack_qkv"][HALF_REASON] == list(range(layers))
    again = PackQkvPass()
    again(model)  # what the last pass of a later bake would do
    assert again.count == 0 and set(again.skipped.values()) == {HALF_REASON}

    forced = tmp_path / "fp16-packed"
    shutil.copytree(dst, forced)
    _, counts = transform_artifact(forced, [PackQkvPass(half=True)])
    assert counts["pack_qkv"] == layers
    assert all(g.attributes["do_rotary"].value == 1 for g in _gqas(_decoder(forced)))
    pipes = [Pipeline.from_dir(dst), Pipeline.from_dir(forced)]
    image = head16["images"][1]
    for spec in (None, {"sevi": True}, {"clva": True}):
        a, b = (p.generate(image, "What is this?", mitigation=spec, max_new_tokens=8) for p in pipes)
        assert a.token_ids and a.token_ids == b.token_ids, spec


def test_sevi_prefill_if_leaves_the_transposes_adjacent(baked_artifact, head16):
    """SEVI's prefill edit `If` (fused form) reads the attention node's own output and is tagged; the main graph
    has no Transpose or Reshape reading an `If` output except the one Reshape that restores [B,H,S,D] after it, so
    onnxruntime cancels the Transpose pair as in the plain decoder (before, the `If` sat between the Transposes)."""
    from anchorrt.graph_passes.base import META_OUTPUT_EDIT

    for folder in (baked_artifact, head16["baked_dir"]):
        model = _decoder(folder)
        edits = [n for n in model.graph if n.op_type == "If" and n.metadata_props.get(META_OUTPUT_EDIT) == "1"]
        assert len(edits) == len([g for g in _gqas(model) if "sevi" in (g.inputs[10].producer().name or "")])
        for n in edits:
            kept = n.attributes["else_branch"].value.outputs[0].producer()
            assert kept.op_type == "Identity" and kept.inputs[0].producer().op_type == "GroupQueryAttention"
            (reader,) = [u.node for u in n.outputs[0].uses()]
            assert reader.op_type == "Reshape"
            transpose = next(iter(reader.outputs[0].uses())).node
            assert transpose.op_type == "Transpose" and next(iter(transpose.outputs[0].uses())).node.op_type == "Transpose"
        UnpackQkvPass()(model)  # (what a later bake does first)
        sites = match_attention(model.graph)  # the probe's and later bakes' matcher follows the tagged If
        assert len(sites) == len(_gqas(model)) and all(s.out.producer().inputs[0].producer().inputs[0].producer().op_type
                                                       in ("If", "GroupQueryAttention") for s in sites)
