"""The fused decoder form (graph_passes/fuse_attention.py) and the in-place KV cache (runtime/kv_cache.py).

tiny_artifact is exported with the default form (fused); `unfused_artifact` is the same checkpoint with
`--attention unfused`. Parity with transformers on left-padded batches is tests/test_parity.py's (it runs on the
fused default); here: the form itself, its equality with the unfused form through the runtime (batches with
different prompt lengths, so left padding), the in-place binding, the pass's negative cases and the refusals.
"""

from __future__ import annotations

import re

import numpy as np
import onnx_ir as ir
import pytest
from anchorrt.graph_passes.attention_match import GQA, check_gqa, match_attention
from anchorrt.graph_passes.base import PassError
from anchorrt.graph_passes.fuse_attention import FuseAttentionPass, check_fusable
from anchorrt.runtime.kv_cache import KVCache
from anchorrt.runtime.pipeline import Pipeline, Request

PROMPTS = ["What is in the image? Describe the content of the image.", "Count.", "Is there a dog?"]


def test_default_export_is_fused(tiny_artifact):
    pipe = Pipeline.from_dir(tiny_artifact)
    assert pipe.manifest.attention_form == "gqa"
    model = ir.load(pipe.manifest.graph_path("decoder"))
    ops = [n.op_type for n in model.graph]
    assert ops.count("GroupQueryAttention") == pipe.num_layers
    assert "Softmax" not in ops  # no unfused attention left
    for out in model.graph.outputs:  # present.* come from the fused node, not from a Concat
        if out.name.startswith("present."):
            assert out.producer().op_type == "GroupQueryAttention"
    sites = match_attention(model.graph)
    assert [s.form for s in sites] == [GQA] * pipe.num_layers


def test_unfused_export_keeps_the_opset18_form(unfused_artifact):
    pipe = Pipeline.from_dir(unfused_artifact)
    assert pipe.manifest.attention_form == "unfused"
    ops = [n.op_type for n in ir.load(pipe.manifest.graph_path("decoder")).graph]
    assert "GroupQueryAttention" not in ops and ops.count("Softmax") == pipe.num_layers


def test_fused_equals_unfused_through_the_runtime(tiny_artifact, unfused_artifact, images):
    """Left-padded batch of three prompt lengths, greedy: same tokens; a prefill + decode logits within 1e-5."""
    fused, plain = Pipeline.from_dir(tiny_artifact), Pipeline.from_dir(unfused_artifact)
    reqs = [Request(images[i % len(images)], p) for i, p in enumerate(PROMPTS)]
    a = fused.generate_batch(reqs, max_new_tokens=12)
    b = plain.generate_batch(reqs, max_new_tokens=12)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert len({len(fused.prompts.encode(p).ids) for p in PROMPTS}) == 3  # really padded
    batch = fused._pad([fused.prompts.encode(p) for p in PROMPTS])
    feats = fused.encode_images(fused.preprocess([fused._load(images[i % len(images)], i) for i in range(3)]))
    caches = [fused._new_cache(3, batch.ids.shape[1] + 4), plain._new_cache(3, batch.ids.shape[1] + 4)]
    assert caches[0].in_place and not caches[1].in_place
    la = fused.prefill(batch, feats, caches[0], {})
    lb = plain.prefill(batch, feats, caches[1], {})
    np.testing.assert_allclose(la, lb, atol=1e-5)
    mask, pos = batch.attention_mask, batch.attention_mask.sum(-1) - 1
    for _ in range(3):
        nxt = la.argmax(-1)
        mask = np.concatenate([mask, np.ones((3, 1), np.int64)], 1)
        pos = pos + 1
        la = fused.decode_one_token(nxt, mask, pos, caches[0], {})
        lb = plain.decode_one_token(nxt, mask, pos, caches[1], {})
        np.testing.assert_allclose(la, lb, atol=1e-5)
    for layer in (0, fused.num_layers - 1):  # the real (non-pad) slots hold the same keys/values
        for x, y in zip(caches[0].layer(layer), caches[1].layer(layer)):
            real = mask.astype(bool)
            np.testing.assert_allclose(x.transpose(0, 2, 1, 3)[real], y.transpose(0, 2, 1, 3)[real], atol=1e-5)


class RecordingBinding:
    def __init__(self):
        self.inputs, self.outputs = {}, {}

    def bind_input(self, name, device, device_id, dtype, shape, ptr):
        self.inputs[name] = (tuple(shape), ptr)

    def bind_output(self, name, device, device_id, dtype, shape, ptr):
        self.outputs[name] = (tuple(shape), ptr)


def test_in_place_cache_binds_one_buffer_for_past_and_present():
    cache = KVCache(2, 3, 2, 4, 10, in_place=True)
    seen = set()
    for new in (5, 1, 1):
        bd = RecordingBinding()
        cache.bind(bd, new)
        for layer in range(2):
            for kind in ("key", "value"):
                shape_in, ptr_in = bd.inputs[f"past_key_values.{layer}.{kind}"]
                shape_out, ptr_out = bd.outputs[f"present.{layer}.{kind}"]
                assert shape_in == shape_out == (3, 2, 10, 4) and ptr_in == ptr_out
                seen.add(ptr_in)
        cache.update(new)
    assert len(seen) == 4 and cache.length == 7  # the same 4 buffers every step: nothing flips, nothing is copied
    bd = RecordingBinding()
    cache.bind_rows_prefill(bd, 1, 2)  # rows 1..2 as a block of the same buffer
    shape, ptr = bd.inputs["past_key_values.0.key"]
    assert shape == (2, 2, 10, 4) and bd.outputs["present.0.key"][1] == ptr
    assert ptr == cache._buffers[0][0][0].data_ptr() + 1 * 2 * 10 * 4 * 4
    with pytest.raises(ValueError, match="holds 10 tokens"):
        cache.bind(RecordingBinding(), 4)


def test_cache_load_round_trips_in_both_layouts():
    rng = np.random.default_rng(0)
    key, value = rng.standard_normal((2, 2, 3, 4)).astype(np.float32), rng.standard_normal((2, 2, 3, 4)).astype(np.float32)
    for in_place in (True, False):
        cache = KVCache(1, 2, 2, 4, 6, in_place=in_place)
        cache.load(0, key, value)
        cache.length = 3
        k, v = cache.layer(0)
        np.testing.assert_array_equal(k, key)
        np.testing.assert_array_equal(v, value)


def test_pass_refuses_a_fused_or_baked_decoder_and_reports_near_misses(tiny_artifact, unfused_artifact):
    fused = ir.load(Pipeline.from_dir(tiny_artifact).manifest.graph_path("decoder"))
    with pytest.raises(PassError, match="already fused"):
        FuseAttentionPass()(fused)
    plain = ir.load(Pipeline.from_dir(unfused_artifact).manifest.graph_path("decoder"))
    site = match_attention(plain.graph)[0]
    past = {v.name: v for v in plain.graph.inputs}
    present = {v.name: v for v in plain.graph.outputs}
    bind, reason = check_fusable(site, present["present.0.key"].producer(), present["present.0.value"].producer(),
                                 past["past_key_values.0.key"], past["past_key_values.0.value"])
    assert bind is not None and reason == "" and bind["heads"] % bind["kv_heads"] == 0
    # near miss: the value Concat of another layer
    bind, reason = check_fusable(site, present["present.0.key"].producer(), present["present.1.value"].producer(),
                                 past["past_key_values.0.key"], past["past_key_values.0.value"])
    assert bind is None and "Concat(past_key_values.0.value" in reason
    # a GroupQueryAttention that rotates inside, or takes packed QKV, hides what the passes need: not matched
    gqa = next(n for n in fused.graph if n.op_type == "GroupQueryAttention")
    assert check_gqa(gqa)[0] is not None
    gqa.attributes["do_rotary"] = ir.AttrInt64("do_rotary", 1)
    assert "rotary" in check_gqa(gqa)[1]
    gqa.attributes["do_rotary"] = ir.AttrInt64("do_rotary", 0)
    gqa.replace_input_with(1, None)
    assert "packed QKV" in check_gqa(gqa)[1]


def test_opset23_export_refuses_fused(tiny_model, tmp_path):
    from anchorrt.exporter.export import export_model
    from anchorrt.runtime.errors import AnchorError

    with pytest.raises(AnchorError, match="opset-18 form"):
        export_model(tiny_model, tmp_path / "x", opset=23, attention="fused")
    assert not (tmp_path / "x").exists()


def test_manifest_refuses_an_unknown_form(tiny_artifact, tmp_path):
    import json
    import shutil

    from anchorrt.runtime.errors import ArtifactError
    from anchorrt.runtime.manifest import Manifest

    dst = tmp_path / "a"
    shutil.copytree(tiny_artifact, dst)
    data = json.loads((dst / "manifest.json").read_text())
    data["attention"]["form"] = "flash"
    (dst / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="attention.form"):
        Manifest.load(dst, verify=False)


def test_baked_methods_never_read_the_fused_present(baked_artifact):
    """CLVA, SEVI and the probe recompute from the past input + the new keys/values inside their branches: the
    present outputs have no reader but the graph output (graph_passes/attention_match.py, pattern C). The keys are
    read as stored (MatMul over Transpose(past), which ONNX Runtime runs as one FusedMatMul), never sliced into a
    copy; only SEVI's prefill recompute takes past[:, :, :P] of the values."""
    model = ir.load(baked_artifact / "decoder.onnx")
    gqa = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 8
    for node in gqa:
        for present in node.outputs[1:3]:
            assert present.is_graph_output() and not list(present.uses()), node.name
    nodes = list(model.graph.all_nodes())
    key_readers = {n.op_type for n in nodes for v in n.inputs
                   if v is not None and re.fullmatch(r"past_key_values\.\d+\.key", v.name or "")}
    assert key_readers == {"GroupQueryAttention", "Transpose"}, key_readers
    names = {n.name for n in nodes}
    assert any("/past_scores/MatMul" in n for n in names) and any("/values_past/Slice" in n for n in names)


def test_mitigation_query_scale_stays_off_the_matmul_alpha(baked_artifact):
    """Every q_scaled Mul that feeds a past_scores MatMul multiplies by a [1, Hk, 1, 1] constant, never a scalar:
    onnxruntime folds a scalar Mul on a MatMul input into FusedMatMul's alpha, a kernel measured 3-5x slower on one
    query row (graph_passes/regions.py site_logits). And the logits are still scaled: one value, 1/sqrt(head_dim)."""
    import json

    dims = json.loads((baked_artifact / "manifest.json").read_text())["dims"]
    model = ir.load(baked_artifact / "decoder.onnx")
    nodes = list(model.graph.all_nodes())
    scaled = [n for n in nodes if n.op_type == "Mul" and "q_scaled" in n.name]
    assert scaled, "no mitigation branch scales a query"
    for node in scaled:
        const = node.inputs[1].producer()
        assert const is not None and const.op_type == "Constant", node.name
        value = const.attributes["value"].as_tensor().numpy()
        assert value.shape == (1, dims["num_kv_heads"], 1, 1), (node.name, value.shape)
        assert np.all(value == value.flat[0]) and np.isclose(value.flat[0], dims["head_dim"] ** -0.5), node.name
        assert any("past_scores" in u.node.name for u in node.outputs[0].uses()), node.name


class CountingDecoder:
    """Wraps a Pipeline's _decode to count decoder calls and the tokens each one gets."""

    def __init__(self, pipe):
        self.calls, self._decode = [], pipe._decode

        def decode(embeds, *args, **kw):
            self.calls.append(embeds.shape[1])
            return self._decode(embeds, *args, **kw)

        pipe._decode = decode


def test_chunked_prefill_equals_one_pass(baked_artifact, images):
    """Prefill in chunks (the default for long one-row prompts, methods off): the same logits, cache and tokens as
    one pass, for chunk sizes that do and do not divide the prompt; a method on, or a batch, runs one pass."""
    pipe = Pipeline.from_dir(baked_artifact)
    prompt = max(PROMPTS, key=lambda p: len(pipe.prompts.encode(p).ids))
    batch = pipe._pad([pipe.prompts.encode(prompt)])
    s = batch.ids.shape[1]
    feats = pipe.encode_images(pipe.preprocess([pipe._load(images[0], 0)]))
    extra = pipe._extra_inputs(batch)
    pipe.prefill_chunk = 0
    ref_cache = pipe._new_cache(1, s + 2)
    ref = pipe.prefill(batch, feats, ref_cache, extra)
    counter = CountingDecoder(pipe)
    for chunk in (7, s // 2, s - 1):
        pipe.prefill_chunk = chunk
        cache = pipe._new_cache(1, s + 2)
        counter.calls.clear()
        got = pipe.prefill(batch, feats, cache, extra)
        assert counter.calls == [chunk] * ((s - 1) // chunk) + [s - (s - 1) // chunk * chunk]
        np.testing.assert_allclose(got, ref, atol=1e-5)
        assert cache.length == s
        for layer in (0, pipe.num_layers - 1):
            for x, y in zip(cache.layer(layer), ref_cache.layer(layer)):
                np.testing.assert_allclose(x, y, atol=1e-5)
    pipe.prefill_chunk = 7
    counter.calls.clear()
    plain = pipe.generate(images[0], prompt, max_new_tokens=6)
    assert counter.calls[0] == 7  # generate chunks too
    counter.calls.clear()
    pipe.prefill(batch, feats, pipe._new_cache(1, s + 2), pipe._extra_inputs(batch, [{"sevi": {}}]))
    assert counter.calls == [s]  # a method on: one pass
    three = pipe._pad([pipe.prompts.encode(p) for p in PROMPTS])
    feats3 = pipe.encode_images(pipe.preprocess([pipe._load(images[i % len(images)], i) for i in range(3)]))
    counter.calls.clear()
    pipe.prefill(three, feats3, pipe._new_cache(3, three.ids.shape[1] + 2), pipe._extra_inputs(three))
    assert counter.calls == [three.ids.shape[1]]  # a batch: one pass
    pipe.prefill_chunk = 0
    assert pipe.generate(images[0], prompt, max_new_tokens=6).token_ids == plain.token_ids


def test_the_kept_binding_returns_fresh_logits_each_step(tiny_artifact):
    """The in-place cache keeps one IOBinding per request (KV bound once, logits written into one host array bound
    once): logits kept from earlier steps must not change when later steps run, and equal those of a fresh binding
    per step and those of the kept binding without the host array (onnxruntime's own output, `get_outputs()`)."""
    pipe = Pipeline.from_dir(tiny_artifact)
    rng = np.random.default_rng(3)
    b, n = 3, 9
    embeds = rng.standard_normal((b, n + 3, pipe.hidden), dtype=np.float32)
    mask = np.ones((b, n), np.int64)
    mask[1, :3] = 0
    pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)

    def run(fresh: bool) -> tuple[list[np.ndarray], KVCache]:
        cache, m, p = pipe._new_cache(b, n + 4), mask, pos[:, -1]
        kw = {"fetch": {}} if fresh else {}  # fetch: the per-call binding
        out = [pipe._decode(embeds[:, :n], m, pos, cache, {}, **kw)]
        for i in range(3):
            m, p = np.concatenate([m, np.ones((b, 1), np.int64)], 1), p + 1
            out.append(pipe._decode(embeds[:, n + i:n + i + 1], m, p[:, None], cache, {}, **kw))
        return out, cache

    (kept, cache), (fresh, _) = run(False), run(True)
    assert pipe._step_logits(b) == ((b, 1, kept[0].shape[-1]), np.dtype(np.float32))
    host = cache._shared[2]  # the host array the kept binding wrote the last step into
    assert host is not None and host.shape[:2] == (b, 1)
    np.testing.assert_array_equal(host[:, -1, :], kept[-1])
    assert all(not np.allclose(kept[0], x) for x in kept[1:])
    for x, y in zip(kept, fresh):
        np.testing.assert_array_equal(x, y)
    pipe._logits_spec = None  # a backend that declares no static logits shape: onnxruntime allocates them
    without, cache = run(False)
    assert cache._shared[2] is None
    for x, y in zip(kept, without):
        np.testing.assert_array_equal(x, y)


def test_kept_binding_binds_a_request_s_fixed_inputs_once():
    """Pipeline._bind_inputs with a kept binding's record: an extra input bound once stays bound while the caller
    passes the same array (the binding reads its memory at every run, so an in-place change still counts); a new
    array is bound; a callable (an input as wide as the mask) is evaluated and bound every step."""
    class Binding:
        def __init__(self):
            self.calls = []

        def bind_cpu_input(self, name, value):
            self.calls.append(name)

    fixed, widths = np.array([True]), []
    extra = {"clva.enable": fixed, "visual_mask": lambda m: widths.append(m.shape[1]) or np.zeros(m.shape, bool)}
    binding, bound = Binding(), {}
    e, p = np.zeros((1, 1, 4), np.float32), np.zeros((1, 1), np.int64)
    for t in (5, 6):
        Pipeline._bind_inputs(binding, e, np.ones((1, t), np.int64), p, extra, bound)
    base = ["inputs_embeds", "attention_mask", "position_ids"]
    assert binding.calls == [*base, "clva.enable", "visual_mask", *base, "visual_mask"] and widths == [5, 6]
    binding.calls.clear()
    extra["clva.enable"] = np.array([False])  # another array: bound again
    Pipeline._bind_inputs(binding, e, np.ones((1, 7), np.int64), p, extra, bound)
    assert binding.calls == [*base, "clva.enable", "visual_mask"]
    binding.calls.clear()
    Pipeline._bind_inputs(binding, e, np.ones((1, 7), np.int64), p, extra)  # no record (a per-call binding): all
    assert binding.calls == [*base, "clva.enable", "visual_mask"]
