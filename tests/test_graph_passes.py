"""Graph passes on the exported tiny decoders (opset 18 MatMul/Softmax form, opset 23 Attention op with GQA):
node names, attention matching and its near misses, CLVA/SEVI counts and inputs, bit-exact flags-off, layer-choice
checks, the atomic bake and its manifest, `anchorrt bake` without torch, and the runtime's flag validation."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from anchorrt.graph_passes.attention_match import ATTENTION_OP, DECOMPOSED, GQA, match_attention
from anchorrt.graph_passes.bake import BakeOptions, bake
from anchorrt.graph_passes.base import PassError
from anchorrt.graph_passes.clva import ClvaPass, resolve_clva_layers
from anchorrt.graph_passes.naming import AssignNodeNames, layer_of
from anchorrt.graph_passes.pipeline import run_passes
from anchorrt.graph_passes.sevi import SeviPass
from anchorrt.runtime.errors import ArtifactError, FlagError
from anchorrt.runtime.manifest import Manifest
from anchorrt.runtime.mitigation import decoder_feeds, mitigation_specs, parse_request

from tests.conftest import run_cli

CLVA_INPUTS = {"visual_mask", "clva.enable", "clva.alpha", "clva.beta", "clva.tau", "clva.lambda"}
SEVI_INPUTS = {"visual_mask", "sevi.enable", "sevi.omega", "sevi.kappa"}
ON = {"clva.alpha": 14.0, "clva.beta": 0.9, "clva.tau": 0.5, "clva.lambda": 0.0, "sevi.omega": 0.5, "sevi.kappa": 0.2}


def _serialized(model: ir.Model) -> bytes:
    return ir.serde.serialize_model(model).SerializeToString()


@pytest.fixture(scope="module")
def baked(tiny_artifact, gqa_artifact, tmp_path_factory):
    """Both artifacts with CLVA + SEVI (start_layer 2, so the 8-layer models change) and debug outputs."""
    out = {}
    for name, src in (("mha18", tiny_artifact), ("gqa23", gqa_artifact)):
        dst = tmp_path_factory.mktemp("baked") / name
        shutil.copytree(src, dst)
        bake(dst, "clva,sevi", BakeOptions(sevi_start_layer=2, debug_outputs=True))
        out[name] = dst
    return out


def _session(path):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _run_passes(sess_plain, sess_baked, manifest: Manifest, enable: tuple[bool, bool], steps: int = 3, seed: int = 0):
    """Prefill + `steps` decode steps with synthetic embeddings on both sessions; row 1 is left padded.
    -> list of (plain outputs, baked outputs) per pass."""
    rng = np.random.default_rng(seed)
    d, layers = manifest.dims["hidden_size"], manifest.dims["num_layers"]
    kvh, hd = manifest.dims["num_kv_heads"], manifest.dims["head_dim"]
    b, s = 2, 30
    mask = np.ones((b, s), np.int64)
    mask[1, :4] = 0
    visual = np.zeros((b, s), bool)
    visual[:, 6:22] = True
    visual &= mask.astype(bool)
    embeds = rng.standard_normal((b, s, d)).astype(np.float32)
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    past_plain = past_baked = {f"past_key_values.{i}.{kv}": np.zeros((b, kvh, 0, hd), np.float32)
                               for i in range(layers) for kv in ("key", "value")}
    names = {i.name for i in sess_baked.get_inputs()}
    out = []
    for _ in range(steps + 1):
        feed = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions}
        extra = {"visual_mask": visual}
        for method in ("clva", "sevi"):
            if f"{method}.enable" in names:
                extra[f"{method}.enable"] = np.array(enable)
                extra.update({k: np.full(b, v, np.float32) for k, v in ON.items() if k.startswith(method)})
        plain = dict(zip([o.name for o in sess_plain.get_outputs()], sess_plain.run(None, {**feed, **past_plain})))
        baked_out = dict(zip([o.name for o in sess_baked.get_outputs()],
                             sess_baked.run(None, {**feed, **extra, **past_baked})))
        out.append((plain, baked_out))
        past_plain = {f"past_key_values.{k[len('present.'):]}": v for k, v in plain.items() if k.startswith("present.")}
        past_baked = {f"past_key_values.{k[len('present.'):]}": v for k, v in baked_out.items()
                      if k.startswith("present.")}
        mask = np.concatenate([mask, np.ones((b, 1), np.int64)], 1)
        visual = np.concatenate([visual, np.zeros((b, 1), bool)], 1)
        positions = positions[:, -1:] + 1
        embeds = rng.standard_normal((b, 1, d)).astype(np.float32)
    return out


# ---------------------------------------------------------------------------------------------- names, matching


def test_export_names_every_node_by_layer(unfused_artifact, tiny_artifact):
    fused = ir.load(tiny_artifact / "decoder.onnx")  # the default form: names stay unique and stable after fusion
    p = AssignNodeNames()
    run_passes(fused, [p])
    assert p.count == 0 and len({n.name for n in fused.graph}) == fused.graph.num_nodes()
    assert all(f"/model/layers.{i}/attn/fused/GroupQueryAttention" in {n.name for n in fused.graph} for i in range(8))
    model = ir.load(unfused_artifact / "decoder.onnx")
    names = [n.name for n in model.graph]
    assert all(n.startswith("/") for n in names)
    assert len(set(names)) == len(names)
    for i in range(8):
        assert f"/model/layers.{i}/attn/Softmax_0" in names
    assert "/lm_head/MatMul_0" in names
    p = AssignNodeNames()
    run_passes(model, [p])
    assert p.count == 0  # idempotent
    softmax = next(n for n in model.graph if n.name == "/model/layers.5/attn/Softmax_0")
    assert layer_of(softmax) == 5
    manifest = Manifest.load(tiny_artifact)
    assert {(e["graph"], e["pass"]) for e in manifest.data["passes"]} >= {("decoder", "assign_node_names"),
                                                                         ("vision", "assign_node_names")}


@pytest.mark.parametrize("which,form", [("unfused_artifact", DECOMPOSED), ("gqa_artifact", ATTENTION_OP),
                                        ("tiny_artifact", GQA)])
def test_attention_matches_once_per_layer(which, form, request):
    model = ir.load(request.getfixturevalue(which) / "decoder.onnx")
    sites = match_attention(model.graph)
    assert [s.layer for s in sites] == list(range(8))
    assert {s.form for s in sites} == {form}
    if form == GQA:
        assert sites[0].base_mask.dtype == ir.DataType.FLOAT and sites[0].scale == pytest.approx(8 ** -0.5)
        assert sites[0].q.shape.rank() == 3 and sites[0].query_heads() == 8  # q [B, S, H·D] (pattern C)
        assert sites[0].out.producer().op_type == "Transpose"
    elif form == ATTENTION_OP:
        assert sites[0].base_mask.dtype == ir.DataType.BOOL and sites[0].scale == pytest.approx(8 ** -0.5)
    else:
        assert sites[0].probs.producer().op_type == "Where"  # after the NaN guard


def test_near_miss_graph_is_left_unchanged(tiny_artifact):
    """The vision graph has Softmax attention but no additive mask: no match, count 0, graph byte-identical."""
    model = ir.load(tiny_artifact / "vision.onnx")
    before = _serialized(model)
    counts = run_passes(model, [ClvaPass(), SeviPass(start_layer=0)])
    assert counts == {"clva": 0, "sevi": 0}
    assert _serialized(model) == before


def test_one_layer_missing_fails_loudly(unfused_artifact):
    """Layer 3's Softmax no longer reads a masked q kᵀ: 7 of 8 layers match, which must not bake silently."""
    model = ir.load(unfused_artifact / "decoder.onnx")
    softmax = next(n for n in model.graph if n.name == "/model/layers.3/attn/Softmax_0")
    add = softmax.inputs[0].producer()
    softmax.replace_input_with(0, add.inputs[0])
    with pytest.raises(PassError, match=r"8 layers\), matched 7 .*missing layers \[3\].*not an Add"):
        run_passes(model, [ClvaPass()])


# --------------------------------------------------------------------------------------- counts, inputs, layers


@pytest.mark.parametrize("name", ["mha18", "gqa23"])
def test_baked_counts_inputs_and_manifest(baked, name):
    m = Manifest.load(baked[name])  # re-hashed: verification passes
    counts = {e["pass"]: e["count"] for e in m.data["passes"] if e["graph"] == "decoder"}
    assert counts["clva"] == 5 and counts["sevi"] == 6  # drift layers 3..7; SEVI layers 2..7
    clva, sevi = m.mitigation["clva"], m.mitigation["sevi"]
    assert clva["layers"] == {"l_neg": 0, "l_pos": 2, "drift_layers": [3, 4, 5, 6, 7]}
    assert sevi["layers"] == {"start_layer": 2, "edited_layers": [2, 3, 4, 5, 6, 7]}
    assert set(clva["inputs"]) == CLVA_INPUTS and set(sevi["inputs"]) == SEVI_INPUTS
    assert clva["inputs"]["clva.alpha"]["default"] == 14.0 and clva["inputs"]["clva.enable"]["dtype"] == "bool"
    inputs = {x["name"]: x for x in m.graph("decoder")["inputs"]}
    assert CLVA_INPUTS | SEVI_INPUTS <= set(inputs)
    assert inputs["visual_mask"]["shape"] == ["batch", "total_length"] and inputs["clva.tau"]["dtype"] == "float32"
    outputs = {x["name"] for x in m.graph("decoder")["outputs"]}
    assert {"clva.zpos", "clva.zneg", "sevi.head_class.2"} <= outputs
    decoder = ir.load(baked[name] / "decoder.onnx")
    names = {n.name for n in decoder.graph}
    assert "/model/clva/anchors/If" in names and "/model/layers.7/attn/sevi/edit/If" in names


def test_layer_choices_are_checked():
    assert resolve_clva_layers(32).as_dict() == {"l_neg": 0, "l_pos": 14, "drift_layers": list(range(15, 32))}
    with pytest.raises(PassError, match="after both anchor layers"):
        resolve_clva_layers(8, l_neg=0, l_pos=4, drift_layers=(3, 4, 5))
    with pytest.raises(PassError, match="outside the model's layers"):
        resolve_clva_layers(8, l_pos=8)


def test_run_passes_on_an_artifact_folder(tiny_artifact, tmp_path):
    """The generic pipeline on a folder: {pass: count}, atomic rewrite, manifest updated and re-hashed."""
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    counts = run_passes(art, [AssignNodeNames(), ClvaPass(l_pos=3, drift_layers=(5, 7))])
    assert counts == {"assign_node_names": 0, "clva": 2}
    m = Manifest.load(art)
    assert m.mitigation["clva"]["layers"] == {"l_neg": 0, "l_pos": 3, "drift_layers": [5, 7]}
    assert m.data["passes"][-1] == {"graph": "decoder", "pass": "clva", "count": 2}
    assert {"clva.enable", "visual_mask"} <= {x["name"] for x in m.graph("decoder")["inputs"]}
    with pytest.raises(PassError, match="CLVA is already baked"):
        run_passes(art, [ClvaPass()])
    Manifest.load(art)  # the failed second run left the folder as it was


def test_sevi_default_start_leaves_an_8_layer_model_alone(tiny_artifact, tmp_path):
    model = ir.load(tiny_artifact / "decoder.onnx")
    before = _serialized(model)
    assert run_passes(model, [SeviPass()]) == {"sevi": 0}
    assert _serialized(model) == before
    shutil.copytree(tiny_artifact, tmp_path / "a")
    files = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    with pytest.raises(PassError, match="start_layer 8 leaves this 8-layer model unchanged"):
        bake(tmp_path / "a", "sevi")
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == files  # atomic: nothing changed
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------------------- exact flags-off


@pytest.mark.parametrize("name,plain", [("mha18", "tiny_artifact"), ("gqa23", "gqa_artifact")])
def test_flags_off_is_bit_exact_and_off_rows_stay_exact(baked, name, plain, request):
    plain_dir = request.getfixturevalue(plain)
    manifest = Manifest.load(baked[name])
    s_plain, s_baked = _session(plain_dir / "decoder.onnx"), _session(baked[name] / "decoder.onnx")
    for p, b in _run_passes(s_plain, s_baked, manifest, (False, False)):  # prefill + 3 decode steps
        for key in p:
            assert np.array_equal(p[key], b[key]), key  # logits and every present.*: 0.0 difference
        assert not b["clva.zpos"].any() and (b["sevi.head_class.4"] == -1).all()
    passes = _run_passes(s_plain, s_baked, manifest, (True, False))
    for p, b in passes:
        assert np.array_equal(p["logits"][1], b["logits"][1])  # the off row: exactly the plain model
        assert np.array_equal(p["present.7.key"][1], b["present.7.key"][1])
    assert max(np.abs(p["logits"][0] - b["logits"][0]).max() for p, b in passes) > 1e-3  # the on row changed


# -------------------------------------------------------------------------------------------------- bake, CLI


def test_bake_refuses_a_second_bake_and_unknown_methods(baked):
    with pytest.raises(PassError, match="clva is already baked"):
        bake(baked["mha18"], "clva")
    with pytest.raises(PassError, match="unknown mitigation method 'dola'"):
        bake(baked["mha18"], "dola")


def test_bake_cli_runs_without_torch(tiny_artifact, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    proc = run_cli("bake", str(art), "--mitigation", "sevi,clva", "--sevi-start-layer", "4", "--clva-l-pos", "1",
                   block_torch=True)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((art / "manifest.json").read_text())
    assert data["mitigation"]["clva"]["layers"]["drift_layers"] == [2, 3, 4, 5, 6, 7]
    assert data["mitigation"]["sevi"]["layers"]["edited_layers"] == [4, 5, 6, 7]
    Manifest.load(art)
    for args, pattern in [
        (("bake", str(art), "--mitigation", "clva"), "clva is already baked"),
        (("bake", str(art), "--mitigation", "dola"), "unknown mitigation method 'dola'"),
        (("bake", str(tmp_path / "missing"), "--mitigation", "clva"), "does not exist"),
    ]:
        proc = run_cli(*args, block_torch=True)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(pattern, lines[0]), proc.stderr


# ------------------------------------------------------------------------------------------ runtime flags


def test_runtime_flag_validation(baked):
    baked_rec = Manifest.load(baked["mha18"]).mitigation
    assert parse_request({"clva": {"alpha": 3, "lam": 0}, "sevi": True}, baked_rec) == {
        "clva": {"alpha": 3.0, "beta": 0.9, "tau": 2.0, "lambda": 0.0}, "sevi": {"omega": 0.5, "kappa": 0.2}}
    assert parse_request({"clva": False}, baked_rec) == {"clva": None, "sevi": None}
    bad = [
        ({"clva": {"tau": -0.5}}, "clva tau must be >= 0"),
        ({"clva": {"alpha": float("nan")}}, "finite"),
        ({"clva": {"beta": float("inf")}}, "finite"),
        ({"sevi": {"kappa": 0}}, r"kappa must be in \(0, 1\]"),
        ({"sevi": {"omega": -1}}, "omega must be >= 0"),
        ({"clva": {"gamma": 1}}, "unknown clva parameter 'gamma'"),
        ({"clva": {"drift_layers": [5]}}, "fixed at bake time"),
        ({"clva": {"alpha": "big"}}, "must be a number"),
        ({"dola": True}, "unknown mitigation method"),
    ]
    for spec, pattern in bad:
        with pytest.raises(FlagError, match=pattern):
            parse_request(spec, baked_rec)
    with pytest.raises(FlagError, match="no sevi baked in"):
        parse_request({"sevi": True}, {"clva": baked_rec["clva"]})
    with pytest.raises(FlagError, match="2 entries for 1 requests"):
        mitigation_specs([object()], [{}, {}])


def test_runtime_feeds(baked):
    rec = Manifest.load(baked["mha18"]).mitigation
    image_mask = np.array([[0, 1, 1, 0], [0, 0, 1, 0]], bool)
    rows = [parse_request({"clva": {"alpha": 3}}, rec), parse_request(None, rec)]
    names = CLVA_INPUTS | SEVI_INPUTS
    feeds = decoder_feeds(rec, names, image_mask, rows)
    assert feeds["clva.enable"].tolist() == [True, False] and feeds["sevi.enable"].tolist() == [False, False]
    assert feeds["clva.alpha"].dtype == np.float32 and feeds["clva.alpha"].tolist() == [3.0, 14.0]
    attention_mask = np.array([[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]], np.int64)  # two generated tokens
    assert feeds["visual_mask"](attention_mask).tolist() == [[False, True, True, False, False, False],
                                                              [False, False, True, False, False, False]]
    with pytest.raises(ArtifactError, match="inputs this runtime does not know"):
        decoder_feeds(rec, names | {"dola.enable"}, image_mask, rows)


# --------------------------------------------------------------- SEVI on a hand-made layer (both steps fire)


def _one_layer_decoder(form: str, heads: int, kv_heads: int, keys: int, seq: int) -> ir.Model:
    """A one-layer 'decoder' whose attention logits are the input q itself (k is the identity, scale 1), in the
    opset-18 MatMul/Softmax form or as an opset-23 Attention op with grouped-query keys/values."""
    f32, b1 = ir.DataType.FLOAT, ir.DataType.BOOL

    def val(name, dtype, shape):
        return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape))

    inputs = [val("inputs_embeds", f32, ["batch", "sequence", 4]), val("attention_mask", ir.DataType.INT64,
                                                                        ["batch", "total_length"]),
              val("past_key_values.0.key", f32, ["batch", kv_heads, "past", keys])]
    q = val("q", f32, ["batch", heads, "sequence", keys])
    v = val("v", f32, ["batch", kv_heads, "total_length", 3])
    nodes = []
    meta = {"pkg.torch.onnx.name_scopes": "['', 'lm', 'lm.layers.0', 'lm.layers.0.self_attn', 'sdpa']"}
    if form == DECOMPOSED:
        kt = val("kt", f32, ["batch", heads, keys, "total_length"])
        mask = val("mask", f32, ["batch", 1, "sequence", "total_length"])
        mm = ir.Node("", "MatMul", [q, kt], name="n_qk", metadata_props=dict(meta))
        add = ir.Node("", "Add", [mm.outputs[0], mask], name="n_add", metadata_props=dict(meta))
        sm = ir.Node("", "Softmax", [add.outputs[0]], attributes=[ir.AttrInt64("axis", -1)], name="n_softmax",
                     metadata_props=dict(meta))
        zero = ir.Node("", "Constant", [], attributes=[ir.AttrTensor("value", ir.tensor(np.array(0.0, np.float32)))],
                       name="n_zero")
        nan = ir.Node("", "IsNaN", [sm.outputs[0]], name="n_isnan")
        where = ir.Node("", "Where", [nan.outputs[0], zero.outputs[0], sm.outputs[0]], name="n_where")
        pv = ir.Node("", "MatMul", [where.outputs[0], v], name="n_pv")
        nodes += [mm, add, sm, zero, nan, where, pv]
        inputs += [q, kt, mask, v]
        out = pv.outputs[0]
    else:
        k = val("k", f32, ["batch", kv_heads, "total_length", keys])
        mask = val("mask", b1, ["batch", 1, "sequence", "total_length"])
        att = ir.Node("", "Attention", [q, k, v, mask], attributes=[ir.AttrFloat32("scale", 1.0)], name="n_attention",
                      metadata_props=dict(meta))
        nodes.append(att)
        inputs += [q, k, mask, v]
        out = att.outputs[0]
    ident = ir.Node("", "Identity", [out], name="n_out")
    ident.outputs[0].name = "attn_out"
    for i, n in enumerate(nodes):
        for o in n.outputs:
            o.name = o.name or f"v{i}"
    graph = ir.Graph(inputs, [ident.outputs[0]], nodes=nodes + [ident], opset_imports={"": 18 if form == DECOMPOSED
                                                                                         else 23})
    return ir.Model(graph, ir_version=10)


@pytest.mark.parametrize("form,kv_heads", [(DECOMPOSED, 6), (ATTENTION_OP, 2)])
def test_sevi_layer_matches_the_reference_functions(form, kv_heads, tmp_path):
    """Crafted last-row logits give vision, global-text and local-text heads, so both SEVI steps fire; the graph's
    head classes and output row equal exporter/reference/sevi.py's classify_heads + edit_logits."""
    import torch
    from anchorrt.exporter.reference.sevi import classify_heads, edit_logits

    heads, keys, seq, omega, kappa = 6, 8, 3, 0.5, 0.4
    vision = [0, 3, 3, 3, 3, 0, 0, 0]
    glob = [0, -2, -2, -2, -2, 2, 2, 2]
    local = [0, -2, -2, -2, -2, 4, 0, 0]
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, heads, seq, keys)).astype(np.float32)
    q[:, :, -1] = np.array([vision, glob, glob, local, local, vision], np.float32)  # [H, K] on the last row
    eye = np.eye(keys, dtype=np.float32)
    v = rng.standard_normal((2, kv_heads, keys, 3)).astype(np.float32)
    causal = np.tril(np.ones((seq, keys), bool), k=keys - seq)[None, None].repeat(2, 0)  # [2,1,S,K]
    visual = np.zeros((2, keys), bool)
    visual[:, 1:5] = True  # image keys 1..4; text keys 5..7 (the pass's rows are keys 5, 6, 7)
    model = _one_layer_decoder(form, heads, kv_heads, keys, seq)
    p = SeviPass(start_layer=0, debug_outputs=True)
    assert run_passes(model, [p]) == {"sevi": 1}
    path = tmp_path / "one_layer.onnx"
    ir.save(model, path)
    feed = {"inputs_embeds": np.zeros((2, seq, 4), np.float32), "attention_mask": np.ones((2, keys), np.int64),
            "past_key_values.0.key": np.zeros((2, kv_heads, keys - seq, keys), np.float32), "q": q, "v": v,
            "visual_mask": visual, "sevi.enable": np.array([True, False]),
            "sevi.omega": np.full(2, omega, np.float32), "sevi.kappa": np.full(2, kappa, np.float32)}
    if form == DECOMPOSED:
        feed.update(kt=np.broadcast_to(eye, (2, heads, keys, keys)).copy(), mask=np.where(causal, 0, -np.inf)
                    .astype(np.float32))
    else:
        feed.update(k=np.broadcast_to(eye, (2, kv_heads, keys, keys)).copy(), mask=causal)
    sess = _session(path)
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))
    plain = _session(_save(_one_layer_decoder(form, heads, kv_heads, keys, seq), tmp_path / "plain.onnx"))
    before = plain.run(None, {k: x for k, x in feed.items() if not k.startswith(("sevi.", "visual"))})[0]

    raw = torch.tensor(q[0, :, -1])  # [H, K]: all keys visible on the last row
    classes = classify_heads(torch.softmax(raw.double(), -1).float(), 4, float(np.float32(kappa)))
    assert classes.tolist() == [0, 1, 1, 2, 2, 0]
    assert got["sevi.head_class.0"].tolist() == [[0, 1, 1, 2, 2, 0], [-1] * 6]
    edited, step1, step2 = edit_logits(raw, classes, omega)
    assert step1 and step2
    v_heads = torch.tensor(v[0]).repeat_interleave(heads // kv_heads, 0)  # [H, K, 3]
    expected = torch.einsum("hk,hkd->hd", torch.softmax(edited, -1), v_heads).numpy()  # [H, 3]
    assert np.abs(got["attn_out"][0, :, -1] - expected).max() < 1e-5
    assert np.abs(got["attn_out"][0, :, -1] - before[0, :, -1]).max() > 1e-2  # the edit did something
    assert np.array_equal(got["attn_out"][0, :, :-1], before[0, :, :-1])  # other rows untouched
    assert np.array_equal(got["attn_out"][1], before[1])  # the row with SEVI off: exactly the plain layer


def _save(model: ir.Model, path) -> str:
    ir.save(model, path)
    return str(path)


def _one_layer_fused(heads: int, kv_heads: int, d: int) -> ir.Model:
    """A one-layer fused 'decoder': GroupQueryAttention (scale 1, no rotary) over q/k/v graph inputs, its output
    reshaped back to [B, H, S, D] as graph_passes/fuse_attention.py leaves it (pattern C of attention_match.py)."""
    import onnx
    from onnx import TensorProto as T
    from onnx import helper as h

    def f(name, shape, t=T.FLOAT):
        return h.make_tensor_value_info(name, t, shape)

    layer = "/model/layers.0/attn/fused"
    gqa = h.make_node("GroupQueryAttention", ["q", "k", "v", "past_key_values.0.key", "past_key_values.0.value",
                                              "seqlens_k", "total_length", "", "", "", "mask"],
                      [f"{layer}/out3", "present.0.key", "present.0.value"], domain="com.microsoft",
                      name=f"{layer}/GroupQueryAttention", num_heads=heads, kv_num_heads=kv_heads, scale=1.0,
                      do_rotary=0)
    shape = onnx.numpy_helper.from_array(np.array([0, 0, heads, d], np.int64), "out_shape")
    nodes = [gqa, h.make_node("Reshape", [f"{layer}/out3", "out_shape"], [f"{layer}/out"], name=f"{layer}/out/Reshape"),
             h.make_node("Transpose", [f"{layer}/out"], [f"{layer}/out4"], perm=[0, 2, 1, 3],
                         name=f"{layer}/out/Transpose"),
             h.make_node("Identity", [f"{layer}/out4"], ["attn_out"], name="/model/out/Identity")]
    inputs = [f("inputs_embeds", ["batch", "sequence", 4]), f("attention_mask", ["batch", "total_length"], T.INT64),
              f("past_key_values.0.key", ["batch", kv_heads, "past", d]),
              f("past_key_values.0.value", ["batch", kv_heads, "past", d]),
              f("q", ["batch", "sequence", heads * d]), f("k", ["batch", "sequence", kv_heads * d]),
              f("v", ["batch", "sequence", kv_heads * d]), f("seqlens_k", ["batch"], T.INT32),
              f("total_length", [], T.INT32), f("mask", ["batch", 1, "sequence", "total_length"])]
    outputs = [f("attn_out", ["batch", heads, "sequence", d]), f("present.0.key", ["batch", kv_heads, "present", d]),
               f("present.0.value", ["batch", kv_heads, "present", d])]
    graph = h.make_graph(nodes, "one_layer", inputs, outputs, initializer=[shape])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 18), h.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return ir.from_proto(model)


def _run_shared_buffer(path, feed: dict, past_k: np.ndarray, past_v: np.ndarray) -> dict:
    """One pass with past and present bound to the same max-length buffers (the runtime's in-place contract)."""
    sess = _session(path)
    binding = sess.io_binding()
    for name, x in feed.items():
        if name in {i.name for i in sess.get_inputs()}:
            binding.bind_cpu_input(name, x)
    for name, buf in (("key", past_k), ("value", past_v)):
        value = ort.OrtValue.ortvalue_from_numpy(buf)
        binding.bind_ortvalue_input(f"past_key_values.0.{name}", value)
        binding.bind_ortvalue_output(f"present.0.{name}", value)
    names = [o.name for o in sess.get_outputs() if not o.name.startswith("present.")]
    for name in names:
        binding.bind_output(name)
    sess.run_with_iobinding(binding)
    return dict(zip(names, (o.numpy() for o in binding.get_outputs()[2:])))


@pytest.mark.parametrize("seq", [1, 8], ids=["decode", "prefill"])
def test_sevi_fused_layer_matches_the_reference_functions(seq, tmp_path):
    """The fused form (GroupQueryAttention, 6 query heads over 2 key/value heads): a decode step edits through the
    node's attention bias, a prefill (no past: GroupQueryAttention takes a multi-row pass with a past only for batch 1)
    recomputes the last output row after it; both equal exporter/reference/sevi.py,
    with past and present as one max-length buffer whose slots after the keys hold NaN (never read into a result)
    and as distinct buffers; other rows, unchanged heads and the row with SEVI off are exactly the plain layer."""
    import torch
    from anchorrt.exporter.reference.sevi import classify_heads, edit_logits

    heads, kv_heads, keys, omega, kappa, spare = 6, 2, 8, 0.5, 0.4, 5
    d, past = keys, keys - seq  # head size = keys: with k the identity, q kᵀ is q itself
    vision = [0, 3, 3, 3, 3, 0, 0, 0]
    glob = [0, -2, -2, -2, -2, 2, 2, 2]
    local = [0, -2, -2, -2, -2, 4, 0, 0]
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, seq, heads, d)).astype(np.float32)
    q[:, -1] = np.array([vision, glob, glob, local, local, vision], np.float32)  # [H, K] on the last row
    eye = np.eye(keys, dtype=np.float32)
    k_all = np.broadcast_to(eye, (2, kv_heads, keys, d))
    v_all = rng.standard_normal((2, kv_heads, keys, d)).astype(np.float32)
    causal = np.tril(np.ones((seq, keys), bool), k=past)[None, None].repeat(2, 0)  # [2,1,S,K]
    visual = np.zeros((2, keys), bool)
    visual[:, 1:5] = True  # image keys 1..4; text keys 5..7
    feed = {"inputs_embeds": np.zeros((2, seq, 4), np.float32), "attention_mask": np.ones((2, keys), np.int64),
            "q": q.reshape(2, seq, heads * d),
            "k": np.ascontiguousarray(k_all[:, :, past:].transpose(0, 2, 1, 3)).reshape(2, seq, kv_heads * d),
            "v": np.ascontiguousarray(v_all[:, :, past:].transpose(0, 2, 1, 3)).reshape(2, seq, kv_heads * d),
            "seqlens_k": np.full(2, keys - 1, np.int32), "total_length": np.array(keys, np.int32),
            "mask": np.where(causal, 0.0, np.finfo(np.float32).min).astype(np.float32),
            "visual_mask": visual, "sevi.enable": np.array([True, False]),
            "sevi.omega": np.full(2, omega, np.float32), "sevi.kappa": np.full(2, kappa, np.float32)}
    model = _one_layer_fused(heads, kv_heads, d)
    assert [s.form for s in match_attention(model.graph)] == [GQA]
    p = SeviPass(start_layer=0, debug_outputs=True)
    assert run_passes(model, [p]) == {"sevi": 1}
    path = _save(model, tmp_path / "one_layer.onnx")
    plain_path = _save(_one_layer_fused(heads, kv_heads, d), tmp_path / "plain.onnx")

    def buffers(length):  # [2, Hk, length, D]: the past in slots 0..P-1, NaN after it
        kb, vb = (np.full((2, kv_heads, length, d), np.nan, np.float32) for _ in range(2))
        kb[:, :, :past], vb[:, :, :past] = k_all[:, :, :past], v_all[:, :, :past]
        return kb, vb

    got = _run_shared_buffer(path, feed, *buffers(keys + spare))
    plain = _run_shared_buffer(plain_path, feed, *buffers(keys + spare))["attn_out"]
    k_past, v_past = buffers(past)
    sess = _session(path)
    distinct = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {
        **{n: x for n, x in feed.items() if n in {i.name for i in sess.get_inputs()}},
        "past_key_values.0.key": k_past, "past_key_values.0.value": v_past})))

    raw = torch.tensor(q[0, -1])  # [H, K]: all keys visible on the last row
    classes = classify_heads(torch.softmax(raw.double(), -1).float(), 4, float(np.float32(kappa)))
    assert classes.tolist() == [0, 1, 1, 2, 2, 0]
    edited, step1, step2 = edit_logits(raw, classes, omega)
    assert step1 and step2
    v_heads = torch.tensor(v_all[0]).repeat_interleave(heads // kv_heads, 0)  # [H, K, D]
    expected = torch.einsum("hk,hkd->hd", torch.softmax(edited, -1), v_heads).numpy()  # [H, D]
    for out in (got, distinct):
        assert out["sevi.head_class.0"].tolist() == [[0, 1, 1, 2, 2, 0], [-1] * 6]
        assert np.abs(out["attn_out"][0, :, -1] - expected).max() < 1e-5
        assert np.abs(out["attn_out"][0, :, -1] - plain[0, :, -1]).max() > 1e-2  # the edit did something
        assert np.array_equal(out["attn_out"][0, :, :-1], plain[0, :, :-1])  # other rows untouched
        assert np.array_equal(out["attn_out"][1], plain[1])  # the row with SEVI off: exactly the plain layer
    if seq == 1:  # the decode step's edit is the fused node's bias: nothing after the node
        gqa = next(n for n in model.graph if n.op_type == "GroupQueryAttention")
        assert gqa.inputs[10].producer().op_type == "If" and "decode" in gqa.inputs[10].producer().name
