"""Qwen2-VL / Qwen2.5-VL end to end: export, runtime vs transformers, `verify`, and the methods vs the reference.

Tiny random-weight checkpoints built in code (exporter/testing.py: shaped like Qwen/Qwen2-VL-2B-Instruct and
Qwen/Qwen2.5-VL-3B-Instruct). Two images of different sizes give different image-token counts (4 and 12) in one
left-padded batch. Qwen2-VL: 8 layers (so CLVA's l_pos = 2 differs from l_neg = 0); Qwen2.5-VL: a 2-layer decoder
(its text side is the same Qwen2 + M-RoPE; what differs is the windowed vision tower, 4 blocks).

- greedy tokens identical to transformers' generate, and `verify` (fp32 logits <= 1e-4, prefill + 5 steps) passes;
- baked CLVA / SEVI / probe with every flag off = the plain artifact exactly;
- CLVA, SEVI, both on row 0 and off on row 1 against exporter/reference/qwen2_vl_reference.py (its own decoder
  forward with M-RoPE): logits <= 1e-4 for the prefill and 3 decode steps, identical CLVA anchor masks and head sets
  and SEVI head classes, the off row exactly plain, the on row measurably changed; greedy tokens identical;
- refusals: video files, the video token in a prompt, Qwen-VL (v1) checkpoints, a forged manifest entry.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from anchorrt.exporter.testing import TinyQwen2VLSpec, build_tiny_qwen2_vl
from anchorrt.runtime.errors import ArtifactError, ImageError, PromptError
from anchorrt.runtime.pipeline import Pipeline, Request
from PIL import Image

PROMPTS = ["What is in the image? Describe the content of the image.", "Count."]
CLVA = {"alpha": 14.0, "beta": 0.9, "tau": 0.5, "lambda": 0.0}
SEVI = {"omega": 0.5, "kappa": 0.2}
CASES = {"clva": {"clva": CLVA}, "sevi": {"sevi": SEVI}, "both": {"clva": CLVA, "sevi": SEVI}}
ATOL = 1e-4
STEPS = 3


@pytest.fixture(scope="module")
def qwen_images():
    """(100, 150) -> a 6 x 8 patch grid (12 image tokens), (60, 60) -> 4 x 4 (4 tokens)."""
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(100, 150), (60, 60)]]


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    from anchorrt.exporter.export import export_model

    root = tmp_path_factory.mktemp("qwen2-vl")
    model = build_tiny_qwen2_vl(root / "model", TinyQwen2VLSpec(version="2"))
    export_model(model, root / "artifact")
    return {"model": model, "artifact": root / "artifact", "root": root}


@pytest.fixture(scope="module")
def qwen25(tmp_path_factory):
    from anchorrt.exporter.export import export_model

    root = tmp_path_factory.mktemp("qwen2.5-vl")
    model = build_tiny_qwen2_vl(root / "model", TinyQwen2VLSpec(version="2.5", layers=2, seed=1))
    export_model(model, root / "artifact")
    return {"model": model, "artifact": root / "artifact"}


@pytest.fixture(scope="module")
def baked(qwen2):
    from anchorrt.graph_passes.bake import BakeOptions, bake

    out = qwen2["root"] / "baked"
    shutil.copytree(qwen2["artifact"], out)
    bake(out, "clva,sevi,probe", BakeOptions(sevi_start_layer=2, debug_outputs=True))
    return out


@pytest.fixture(scope="module")
def reference(qwen2):
    from anchorrt.exporter.reference import ReferenceQwen2VL

    return ReferenceQwen2VL.from_pretrained(qwen2["model"])


def prompt_batch(pipe: Pipeline, images, prompts):
    """The runtime's own preprocessing and prompt layout (each image's token count from its grid)."""
    visual = pipe.preprocess_images(images)
    enc = [pipe.prompts.encode(p, tokens_per_image=visual.tokens_per_image[k:k + 1]) for k, p in enumerate(prompts)]
    for k, e in enumerate(enc):
        e.images = [k]
    return visual, pipe._pad(enc, visual)


def test_export_manifest_and_graph_inputs(qwen2, qwen_images):
    data = json.loads((qwen2["artifact"] / "manifest.json").read_text())
    assert data["model_type"] == "qwen2_vl" and data["architecture"] == "Qwen2VLForConditionalGeneration"
    assert data["qwen2_vl"]["mrope_section"] == [2, 3, 3] and data["qwen2_vl"]["windowed"] is False
    assert data["prompt"]["image_placeholder"] == "<|image_pad|>"
    assert data["prompt"]["video_placeholder"] == "<|video_pad|>"
    assert data["prompt"]["source"] == "chat_template"
    assert "<|vision_start|><|image_pad|><|vision_end|>{prompt}" in data["prompt"]["template"]
    inputs = {g: {i["name"]: i["shape"] for i in data["graphs"][g]["inputs"]} for g in data["graphs"]}
    assert inputs["vision"] == {"pixel_values": ["num_patches", 3 * 2 * 14 * 14], "vision_position_ids":
                                ["num_patches", 2], "segment_ids": ["num_patches"]}
    assert inputs["embed"]["image_features"] == ["num_image_tokens", 128]
    assert inputs["decoder"]["position_ids"] == [3, "batch", "sequence"]
    assert data["attention"]["fusions"]["fuse_rotary"] == 0  # M-RoPE: rotary left as exported (graph_passes/fuse_rotary.py)
    (reason, layers), = data["attention"]["left_as_exported"]["fuse_rotary"].items()
    assert "M-RoPE" in reason and layers == list(range(data["dims"]["num_layers"]))
    pipe = Pipeline.from_dir(qwen2["artifact"])
    visual = pipe.preprocess_images(qwen_images)
    assert visual.tokens_per_image == [12, 4]
    assert pipe.encode_images(visual).shape == (16, 128)


@pytest.mark.parametrize("variant", ["qwen2", "qwen25"])
def test_verify_passes_at_two_image_sizes(variant, request, qwen_images):
    from anchorrt.exporter.verify import verify

    setup = request.getfixturevalue(variant)
    report = verify(setup["model"], setup["artifact"], images=qwen_images, prompts=PROMPTS, steps=5)
    assert report.ok, report.summary()
    assert report.max_abs_diff <= ATOL and len(report.per_step_max_abs_diff) == 6


@pytest.mark.parametrize("variant", ["qwen2", "qwen25"])
def test_greedy_tokens_identical_to_transformers(variant, request, qwen_images):
    """The public API (generate_batch, left padding, two token counts) against transformers' generate."""
    from anchorrt.exporter.archs.qwen2_vl import Qwen2VLArch

    setup = request.getfixturevalue(variant)
    pipe = Pipeline.from_dir(setup["artifact"])
    got = pipe.generate_batch([Request(img, p) for img, p in zip(qwen_images, PROMPTS)], max_new_tokens=10)
    side = Qwen2VLArch.verify_torch_side(setup["model"])
    template = pipe.manifest.prompt["template"]
    inputs = side.inputs(qwen_images, [template.replace("{prompt}", p) for p in PROMPTS])
    _, batch = prompt_batch(pipe, qwen_images, PROMPTS)
    assert np.array_equal(batch.ids, inputs["input_ids"].numpy())  # the runtime's prompt = the processor's
    with torch.no_grad():
        out = side.model.generate(**inputs, max_new_tokens=10, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1]:].tolist()
    eos = set(pipe.stop_ids)
    for row, g in zip(new, got):
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        assert g.token_ids == row[:cut]
    assert len(set(got[0].token_ids)) > 2  # not a degenerate repetition of one token


def onnx_passes(pipe: Pipeline, plain: Pipeline, visual, batch, specs, tokens):
    """Prefill + teacher-forced decode steps through the runtime's stages, every decoder output fetched, and the
    plain artifact on the same feeds. -> [(baked outputs, plain logits)]."""
    features = pipe.encode_images(visual)
    extra = pipe._extra_inputs(batch, specs)
    sess, sess_plain = pipe.decoder.session, plain.decoder.session
    names = [o.name for o in sess.get_outputs()]
    b = batch.ids.shape[0]
    past = {f"past_key_values.{i}.{kv}": np.zeros((b, pipe.kv_heads, 0, pipe.head_dim), np.float32)
            for i in range(pipe.num_layers) for kv in ("key", "value")}
    past_plain = dict(past)
    mask = batch.attention_mask
    positions, last = pipe.arch.prefill_positions(batch.layout())
    embeds = pipe._embed(batch.ids, features, batch.image_mask)
    out = []
    for step in range(STEPS + 1):
        feed = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions}
        extra_now = {k: (v(mask) if callable(v) else v) for k, v in extra.items()}
        res = dict(zip(names, sess.run(None, {**feed, **extra_now, **past})))
        res_plain = dict(zip([o.name for o in sess_plain.get_outputs()], sess_plain.run(None, {**feed, **past_plain})))
        out.append((res, res_plain["logits"][:, -1]))
        if step == STEPS:
            break
        past = {f"past_key_values.{k[8:]}": v for k, v in res.items() if k.startswith("present.")}
        past_plain = {f"past_key_values.{k[8:]}": v for k, v in res_plain.items() if k.startswith("present.")}
        mask = np.concatenate([mask, np.ones((b, 1), np.int64)], 1)
        last = last + 1
        positions = pipe.arch.decode_positions(last)
        embeds = pipe._embed(tokens[step][:, None], np.zeros((0, pipe.hidden), np.float32), np.zeros((b, 1), bool))
    return out


def _f32(x: float) -> float:
    return float(np.float32(x))


def reference_flags(spec: dict):
    clva = sevi = None
    if "clva" in spec:
        c = spec["clva"]
        clva = {"alpha": _f32(c["alpha"]), "beta": c["beta"], "tau": _f32(c["tau"]), "lam": _f32(c["lambda"])}
    if "sevi" in spec:
        sevi = {"omega": _f32(spec["sevi"]["omega"]), "kappa": _f32(spec["sevi"]["kappa"]), "start_layer": 2}
    return ([clva, None] if clva else None), ([sevi, None] if sevi else None)


def reference_passes(ref, visual, batch, clva, sevi):
    ids, mask = torch.tensor(batch.ids), torch.tensor(batch.attention_mask)
    pixels, grids = torch.tensor(visual.feeds["pixel_values"]), torch.tensor(visual.extra["grid_thw"])
    r = ref.forward(ids, pixels, mask, clva=clva, sevi=sevi, image_grid_thw=grids)
    out, tokens = [r], []
    for _ in range(STEPS):
        tok = r.logits[:, -1].argmax(-1)  # [B]
        tokens.append(tok.numpy().astype(np.int64))
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        r = ref.forward(tok[:, None], None, mask, cache=r.cache, clva=clva, sevi=sevi)
        out.append(r)
    return out, tokens


def test_flags_off_is_the_plain_artifact_exactly(qwen2, baked, qwen_images):
    # the attention matcher found the Qwen2 attention (q/k/v bias, M-RoPE, GQA) in every layer it was asked for
    counts = {p["pass"]: p["count"] for p in json.loads((baked / "manifest.json").read_text())["passes"]
              if p["graph"] == "decoder"}
    assert (counts["clva"], counts["sevi"], counts["probe"]) == (5, 6, 8)  # drift layers 3-7, layers 2-7, all 8
    pipe, plain = Pipeline.from_dir(baked), Pipeline.from_dir(qwen2["artifact"])
    visual, batch = prompt_batch(pipe, qwen_images, PROMPTS)
    tokens = [np.array([5, 7]), np.array([9, 11]), np.array([13, 2])]
    for res, plain_logits in onnx_passes(pipe, plain, visual, batch, [None, None], tokens):
        assert np.array_equal(res["logits"][:, -1], plain_logits)
    reqs = [Request(img, p) for img, p in zip(qwen_images, PROMPTS)]
    assert [g.token_ids for g in pipe.generate_batch(reqs, max_new_tokens=6)] == \
        [g.token_ids for g in plain.generate_batch(reqs, max_new_tokens=6)]


@pytest.mark.parametrize("case", list(CASES))
def test_methods_match_the_reference(qwen2, baked, reference, qwen_images, case):
    """V = the image-pad positions (12 of them on row 0, 4 on row 1): CLVA/SEVI on row 0, off on row 1."""
    check_methods(qwen2["artifact"], baked, reference, qwen_images, case)


@pytest.mark.slow
def test_qwen25_methods_match_the_reference(tmp_path_factory, qwen_images):
    """The same on an 8-layer Qwen2.5-VL (windowed vision tower) exported and baked on its own (slow: one more
    export)."""
    from anchorrt.exporter.export import export_model
    from anchorrt.exporter.reference import ReferenceQwen2VL
    from anchorrt.graph_passes.bake import BakeOptions, bake

    root = tmp_path_factory.mktemp("qwen2.5-vl-8")
    model = build_tiny_qwen2_vl(root / "model", TinyQwen2VLSpec(version="2.5", seed=2))
    export_model(model, root / "artifact")
    shutil.copytree(root / "artifact", root / "baked")
    bake(root / "baked", "clva,sevi", BakeOptions(sevi_start_layer=2, debug_outputs=True))
    reference = ReferenceQwen2VL.from_pretrained(model)
    for case in CASES:
        check_methods(root / "artifact", root / "baked", reference, qwen_images, case)


def check_methods(plain_dir, baked_dir, reference, qwen_images, case):
    spec = CASES[case]
    clva, sevi = reference_flags(spec)
    pipe, plain = Pipeline.from_dir(baked_dir), Pipeline.from_dir(plain_dir)
    visual, batch = prompt_batch(pipe, qwen_images, PROMPTS)
    refs, tokens = reference_passes(reference, visual, batch, clva, sevi)
    passes = onnx_passes(pipe, plain, visual, batch, [spec, None], tokens)
    effect = 0.0
    for step, ((res, plain_logits), r) in enumerate(zip(passes, refs)):
        logits, ref_logits = res["logits"][:, -1], r.logits[:, -1].numpy()
        diff = float(np.abs(logits - ref_logits).max())
        assert diff <= ATOL, f"{case} step {step}: max |logit diff| {diff:.3g}"
        assert np.array_equal(logits[1], plain_logits[1]), "the off row must be exactly the plain model"
        effect = max(effect, float(np.abs(logits[0] - plain_logits[0]).max()))
        if clva:
            d = r.debug["clva"]
            for name, key in (("clva.zpos", "zpos"), ("clva.zneg", "zneg"), ("clva.sensitive_heads", "sensitive_heads"),
                              ("clva.insensitive_heads", "insensitive_heads")):
                assert np.array_equal(res[name], d[key].numpy()), f"{name} differs at step {step}"
            assert res["clva.sensitive_heads"][0].any() and res["clva.insensitive_heads"][0].any()  # not vacuous
            assert res["clva.zpos"][0].any() and not res["clva.zpos"][1].any()
            assert not (res["clva.zpos"][0] & ~batch_visual(batch, res["clva.zpos"].shape[1])[0]).any()
        if sevi:
            for layer in range(2, 8):
                expected = r.debug["sevi"][layer]["head_class"].numpy()
                assert np.array_equal(res[f"sevi.head_class.{layer}"], expected), f"SEVI layer {layer}, step {step}"
    assert effect > 1e-3, f"{case} on row 0 changed the logits by only {effect:.3g}"


def batch_visual(batch, width: int) -> np.ndarray:
    """The image-pad positions of the prompt, padded with False to `width` key columns."""
    out = np.zeros((batch.image_mask.shape[0], width), bool)
    out[:, :batch.image_mask.shape[1]] = batch.image_mask
    return out


@pytest.mark.parametrize("case", ["clva", "both"])
def test_greedy_tokens_with_methods_match_the_reference(baked, reference, qwen_images, case):
    spec = CASES[case]
    clva, sevi = reference_flags(spec)
    pipe = Pipeline.from_dir(baked)
    got = pipe.generate_batch([Request(img, p, spec if i == 0 else None)
                               for i, (img, p) in enumerate(zip(qwen_images, PROMPTS))], max_new_tokens=12)
    visual, batch = prompt_batch(pipe, qwen_images, PROMPTS)
    new = reference.generate(torch.tensor(batch.ids), torch.tensor(visual.feeds["pixel_values"]),
                             torch.tensor(batch.attention_mask), 12, clva=clva, sevi=sevi,
                             eos_token_id=list(pipe.stop_ids), image_grid_thw=torch.tensor(visual.extra["grid_thw"]))
    for row, g in zip(new.tolist(), got):
        cut = next((i + 1 for i, t in enumerate(row) if t in pipe.stop_ids), len(row))
        assert g.token_ids == row[:cut]


def test_refusals(qwen2, qwen_images, tmp_path):
    from anchorrt.exporter.checkpoint import inspect_checkpoint
    from anchorrt.runtime.errors import CheckpointError

    pipe = Pipeline.from_dir(qwen2["artifact"])
    with pytest.raises(PromptError, match="video input is not supported"):
        pipe.generate(qwen_images[0], "Compare <|video_pad|> with this", max_new_tokens=2)
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom" + bytes(64))
    with pytest.raises(ImageError, match="is a video, and video input is not supported"):
        pipe.generate(str(video), "What is in it?", max_new_tokens=2)
    v1 = tmp_path / "qwen-vl-chat"
    v1.mkdir()
    (v1 / "config.json").write_text(json.dumps({"architectures": ["QWenLMHeadModel"], "model_type": "qwen",
                                                "auto_map": {"AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
                                                "visual": {"image_size": 448}}))
    with pytest.raises(CheckpointError, match=r"Qwen-VL \(v1\).*remote code.*Qwen2-VL") as err:
        inspect_checkpoint(v1)
    assert "\n" not in str(err.value)
    forged = tmp_path / "forged"
    shutil.copytree(qwen2["artifact"], forged)
    data = json.loads((forged / "manifest.json").read_text())
    data["qwen2_vl"]["merge_size"] = 0
    (forged / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="qwen2_vl.merge_size"):
        Pipeline.from_dir(forged, verify=False)


@pytest.mark.parametrize("image_index,i", [(0, 0.5), (1, None)])
def test_iava_matches_the_reference(qwen2, baked, qwen_images, monkeypatch, image_index, i):
    """IAVA on V = the image-pad positions (12 and 4 of them): irrelevant set, attention read by the probe, combined
    scores (3 steps, <= 1e-4) and 12 greedy tokens against the reference on transformers' eager attention."""
    import anchorrt.runtime.pipeline as pipeline_mod
    from anchorrt.exporter.reference import ReferenceIavaQwen2VL
    from anchorrt.runtime.iava import contrastive_scores

    calls: list[np.ndarray] = []

    def spy(*args, **kwargs):
        calls.append(contrastive_scores(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(pipeline_mod, "contrastive_scores", spy)
    pipe = Pipeline.from_dir(baked)
    image, prompt = qwen_images[image_index], PROMPTS[0]
    got = pipe.generate(image, prompt, max_new_tokens=12, mitigation={"iava": {"i": i}})
    ref = ReferenceIavaQwen2VL(qwen2["model"])
    want = ref.generate(image, prompt, pipe.manifest.prompt["template"], i=i, max_new_tokens=12,
                        eos_token_id=list(pipe.stop_ids))
    assert len(want.att_general) == (12, 4)[image_index]
    assert got.details["iava"]["irrelevant"] == want.irrelevant and want.irrelevant
    np.testing.assert_allclose(got.details["iava"]["att_general"], want.att_general.numpy(), atol=1e-6)
    np.testing.assert_allclose(got.details["iava"]["att_query"], want.att_query.numpy(), atol=1e-6)
    assert got.token_ids == want.tokens
    for step in range(3):
        diff = np.abs(calls[step][0] - want.logits[step].numpy())
        assert float(diff[np.isfinite(diff)].max()) <= ATOL


def test_visalign_matches_the_reference(qwen2, qwen_images, tmp_path):
    """A random (non-identity) fusion baked into the Qwen2-VL embed graph: on for row 0, off for row 1. v_bar = the
    mean of the row's merged visual tokens; logits <= 1e-4 on every pass and greedy tokens against the reference on
    transformers' model; the off row equals the plain artifact's tokens."""
    from anchorrt.exporter.reference.qwen2_vl_reference import VisAlignQwen2VL
    from anchorrt.exporter.visalign.fusion import VisAlignFusion
    from anchorrt.graph_passes.bake import bake_visalign_weights
    from anchorrt.runtime.visalign import visalign_state

    g = torch.Generator().manual_seed(3)
    fusion = VisAlignFusion(128)
    with torch.no_grad():
        fusion.proj.weight.add_(torch.randn(128, 256, generator=g) * 0.15)
        fusion.proj.bias.copy_(torch.randn(128, generator=g) * 0.1)
    weights = tmp_path / "visalign.safetensors"
    fusion.save(weights)
    art = tmp_path / "va"
    shutil.copytree(qwen2["artifact"], art)
    bake_visalign_weights(art, weights)
    pipe, plain = Pipeline.from_dir(art), Pipeline.from_dir(qwen2["artifact"])
    specs = [{"visalign": True}, {"visalign": False}]  # a VisAlign artifact fuses by default
    got = pipe.generate_batch([Request(img, p, s) for img, p, s in zip(qwen_images, PROMPTS, specs)],
                              max_new_tokens=10)
    ref = VisAlignQwen2VL(qwen2["model"], fusion)
    template = pipe.manifest.prompt["template"]
    ids, rows, ref_logits = ref.generate(qwen_images, [template.replace("{prompt}", p) for p in PROMPTS], [True, False],
                                         10, list(pipe.stop_ids))
    assert [g.token_ids for g in got] == rows
    base = plain.generate_batch([Request(img, p) for img, p in zip(qwen_images, PROMPTS)], max_new_tokens=10)
    assert got[1].token_ids == base[1].token_ids and got[0].token_ids != base[0].token_ids
    # logits, teacher-forced on the reference's tokens, through the runtime's stages (v_bar fed to every pass)
    visual, batch = prompt_batch(pipe, qwen_images, PROMPTS)
    assert np.array_equal(batch.ids, ids.numpy())
    features = pipe.encode_images(visual)
    state = visalign_state(pipe.visalign, specs, features, batch.image_mask)
    cache = pipe._new_cache(2, batch.ids.shape[1] + 4)
    extra = pipe._extra_inputs(batch, specs)
    logits = [pipe.prefill(batch, features, cache, extra, state)]
    mask, (_, last) = batch.attention_mask, pipe.arch.prefill_positions(batch.layout())
    for step in range(3):
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
        last = last + 1
        forced = ref_logits[step].argmax(-1).numpy().astype(np.int64)
        logits.append(pipe.decode_one_token(forced, mask, last, cache, extra, state))
    for step, (a, b) in enumerate(zip(logits, ref_logits)):
        assert float(np.abs(a - b.numpy()).max()) <= ATOL, f"step {step}"


def test_cli_torch_backend_agrees_with_the_artifact(qwen2, baked, qwen_images, tmp_path):
    """`anchorrt generate --backend torch MODEL_DIR --clva ...` (the M-RoPE reference) and the baked artifact through
    the CLI (torch blocked) give the same tokens with CLVA at the default layers."""
    from tests.conftest import run_cli

    image = tmp_path / "image.png"
    qwen_images[0].save(image)
    flags = ["--clva", "--clva-tau", "0.5", "--clva-lambda", "0", "--max-new-tokens", "6", "--json",
             "--image", str(image), "--prompt", PROMPTS[0]]
    torch_run = run_cli("generate", "--backend", "torch", str(qwen2["model"]), *flags)
    onnx_run = run_cli("generate", str(baked), *flags, block_torch=True)
    assert torch_run.returncode == 0, torch_run.stderr
    assert onnx_run.returncode == 0, onnx_run.stderr
    assert json.loads(torch_run.stdout)["token_ids"] == json.loads(onnx_run.stdout)["token_ids"]


def test_explain_refuses_in_one_line(baked, qwen_images, tmp_path):
    """`anchorrt explain` draws fixed patch grids: on a Qwen2-VL artifact it refuses in one line (exit 2)."""
    from tests.conftest import run_cli

    image = tmp_path / "image.png"
    qwen_images[1].save(image)
    run = run_cli("explain", str(baked), "--image", str(image), "--prompt", "What is it?", "--out",
                  str(tmp_path / "out"), block_torch=True)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith("error: explain draws a fixed patch grid")
    assert "Traceback" not in run.stderr
