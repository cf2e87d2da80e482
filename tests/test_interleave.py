"""LLaVA-Interleave (llava-hf/llava-interleave-qwen-0.5b-hf's form: Qwen2 with q/k/v bias and tied embeddings, SigLIP
tower, SiglipImageProcessor, no pad_token_id, several images per prompt) on a tiny random-weight model.

- SigLIP preprocessing bit-identical to transformers' SiglipImageProcessor (PIL backend);
- issue 13 item 9: the artifact pads prompts with the tokenizer's pad token (not EOS), and `verify` passes;
- greedy tokens identical to transformers' generate, one image per prompt (a left-padded batch) and two images in
  one prompt (the chat template puts them side by side, one span each);
- every method over all images' positions (METHODS.md "Visual positions across architectures"): CLVA + SEVI
  logits against the independent reference with two images, IAVA's sets over both spans against its reference,
  VisAlign's v_bar the mean over both images' tokens. (CLVA/SEVI on one image, flags on and off against the
  reference and flags off exactly the plain graph: tests/test_mitigation_parity.py's "interleave" fixture.)
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from anchorrt.runtime.pipeline import Pipeline, Request

PROMPTS = ["What is in the image? Describe the content of the image.", "Count."]
ATOL = 1e-4


@pytest.fixture(scope="module")
def hf(interleave_model):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(interleave_model, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(interleave_model)
    processor.tokenizer.padding_side = "left"
    return model, processor


@pytest.fixture(scope="module")
def baked(interleave_artifact, tmp_path_factory):
    from anchorrt.graph_passes.bake import BakeOptions, bake

    out = tmp_path_factory.mktemp("interleave") / "baked"
    shutil.copytree(interleave_artifact, out)
    manifest = bake(out, "clva,sevi,probe", BakeOptions(sevi_start_layer=2, debug_outputs=True))
    return out, manifest


def two_image_template(template: str) -> str:
    return template.replace("<image>", "<image><image>")  # interleave's chat template: images side by side


def hf_generate(hf, images_per_prompt, texts, max_new_tokens=6) -> list[list[int]]:
    model, processor = hf
    inputs = processor(images=images_per_prompt, text=texts, return_tensors="pt", padding=True)
    eos = model.generation_config.eos_token_id
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=processor.tokenizer.pad_token_id)
    rows = []
    for row in out[:, inputs["input_ids"].shape[1]:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t == eos), len(row))
        rows.append(row[:cut])
    return rows


# -- preprocessing -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(32, 32), (40, 24)])
def test_siglip_preprocessing_is_bit_identical(images, size):
    from anchorrt.exporter.preprocessing import params_from_config
    from anchorrt.runtime.preprocess import ImagePreprocessor
    from PIL import Image
    from transformers import SiglipImageProcessor

    theirs = SiglipImageProcessor(size={"height": size[0], "width": size[1]}, resample=3, image_mean=[0.5] * 3,
                                  image_std=[0.5] * 3)
    config = json.loads(theirs.to_json_string())
    ours = ImagePreprocessor(params_from_config(config))
    rng = np.random.default_rng(1)
    extra = [Image.fromarray(rng.integers(0, 256, (300, 17), dtype=np.uint8), "L"),
             Image.fromarray(rng.integers(0, 256, (7, 90, 3), dtype=np.uint8))]
    for img in [*images, *extra]:
        want = theirs(images=[img], return_tensors="np")["pixel_values"]
        got = ours([img])
        assert got.shape == want.shape == (1, 3, *size)
        assert got.dtype == want.dtype == np.float32
        assert np.array_equal(got, want), f"{img.mode} {img.size}: max diff {np.abs(got - want).max()}"


def test_siglip_defaults_and_refusals():
    from anchorrt.exporter.preprocessing import params_from_config
    from anchorrt.runtime.errors import CheckpointError

    p = params_from_config({"image_processor_type": "SiglipImageProcessor"})
    assert p["resize_to"] == [224, 224] and not p["do_center_crop"] and p["image_mean"] == [0.5] * 3
    with pytest.raises(CheckpointError, match="'size'.*SiglipImageProcessor"):
        params_from_config({"image_processor_type": "SiglipImageProcessor", "size": {"shortest_edge": 10}})
    with pytest.raises(CheckpointError, match="not supported; AnchorRT supports.*SiglipImageProcessor"):
        params_from_config({"image_processor_type": "FancyImageProcessor"})


# -- export, pad token, verify ---------------------------------------------------------------------------------------
def test_checkpoint_mirrors_the_real_config(interleave_model):
    cfg = json.loads((interleave_model / "config.json").read_text())
    assert cfg["architectures"] == ["LlavaForConditionalGeneration"]
    assert cfg["text_config"]["model_type"] == "qwen2" and cfg["vision_config"]["model_type"] == "siglip_vision_model"
    assert cfg["vision_feature_select_strategy"] == "full" and cfg["text_config"]["tie_word_embeddings"]
    assert cfg.get("pad_token_id") is None and cfg["text_config"].get("pad_token_id") is None


def test_pad_token_comes_from_the_tokenizer_and_verify_passes(interleave_model, interleave_artifact, hf):
    """Issue 13 item 9: no pad_token_id in the config, tokenizer pad <|endoftext|> != EOS <|im_end|>. The manifest
    used to pad with EOS, so the left-padded ids differed from the processor's and verify failed (exit 3)."""
    from anchorrt.exporter.verify import verify

    manifest = json.loads((interleave_artifact / "manifest.json").read_text())
    tokenizer = hf[1].tokenizer
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert manifest["tokens"]["pad_token_id"] == tokenizer.pad_token_id
    assert manifest["tokens"]["eos_token_ids"] == [tokenizer.eos_token_id]
    assert manifest["preprocessing"]["resize_to"] == [32, 32]
    report = verify(interleave_model, interleave_artifact, prompts=PROMPTS)  # a left-padded batch of two lengths
    assert report.ok and report.max_abs_diff <= ATOL and report.greedy_agreement == 1.0, report.summary()


def test_padding_with_eos_is_what_failed(interleave_model, interleave_artifact, tmp_path):
    """The check above can fail: the same artifact with main's choice (pad = EOS) is refused by verify."""
    from anchorrt.exporter.verify import verify
    from anchorrt.runtime.errors import VerifyError

    art = tmp_path / "eos-pad"
    shutil.copytree(interleave_artifact, art)
    data = json.loads((art / "manifest.json").read_text())
    data["tokens"]["pad_token_id"] = data["tokens"]["eos_token_ids"][0]
    (art / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(VerifyError, match="prompt ids .* differ from the checkpoint processor's"):
        verify(interleave_model, art, prompts=PROMPTS)


def test_greedy_tokens_match_transformers(interleave_artifact, hf, images):
    pipe = Pipeline.from_dir(interleave_artifact)
    template = pipe.manifest.prompt["template"]
    want = hf_generate(hf, [[images[0]], [images[1]]], [template.replace("{prompt}", p) for p in PROMPTS])
    got = pipe.generate_batch([Request(images[0], PROMPTS[0]), Request(images[1], PROMPTS[1])], max_new_tokens=6)
    assert [g.token_ids for g in got] == want


def test_two_images_in_one_prompt_match_transformers(interleave_artifact, hf, images):
    pipe = Pipeline.from_dir(interleave_artifact)
    t = pipe.manifest.tokens["tokens_per_image"]
    template = two_image_template(pipe.manifest.prompt["template"])
    enc = pipe.prompts.encode(PROMPTS[0], 2)
    inputs = hf[1](images=[[images[0], images[1]]], text=[template.replace("{prompt}", PROMPTS[0])],
                   return_tensors="np")
    assert np.array_equal(enc.ids, inputs["input_ids"][0])
    assert enc.spans == [(enc.spans[0][0], enc.spans[0][0] + t), (enc.spans[0][0] + t, enc.spans[0][0] + 2 * t)]
    assert int(enc.image_mask.sum()) == 2 * t
    want = hf_generate(hf, [[images[0], images[1]], [images[2]]],
                       [template.replace("{prompt}", PROMPTS[0]),
                        pipe.manifest.prompt["template"].replace("{prompt}", PROMPTS[1])])
    got = pipe.generate_batch([Request([images[0], images[1]], PROMPTS[0]), Request(images[2], PROMPTS[1])],
                              max_new_tokens=6)
    assert [g.token_ids for g in got] == want


# -- methods over every image position -------------------------------------------------------------------------------
def test_methods_bake_on_qwen2_attention(baked):
    """The attention matcher finds every layer of Qwen2 (q/k/v bias upstream of the q k^T MatMul)."""
    m = baked[1].mitigation
    assert m["sevi"]["layers"]["edited_layers"] == [2, 3, 4, 5]
    assert m["probe"]["layers"] == [0, 1, 2, 3, 4, 5]
    assert m["clva"]["layers"]["l_pos"] == 1 and m["clva"]["layers"]["drift_layers"] == [2, 3, 4, 5]


def test_clva_sevi_over_two_images_match_the_reference(baked, interleave_model, images):
    from anchorrt.exporter.reference import ReferenceLlava

    pipe = Pipeline.from_dir(baked[0])
    ref = ReferenceLlava.from_pretrained(interleave_model)
    spec = {"clva": {"alpha": 14.0, "beta": 0.9, "tau": 0.5, "lambda": 0.0}, "sevi": {"omega": 0.5, "kappa": 0.2}}
    clva = {"alpha": 14.0, "beta": 0.9, "tau": 0.5, "lam": 0.0}
    sevi = {"omega": 0.5, "kappa": 0.2, "start_layer": 2}
    visual = pipe.preprocess_images([pipe._load(images[0], 0), pipe._load(images[1], 1)])
    enc = pipe.prompts.encode(PROMPTS[0], 2, tokens_per_image=visual.tokens_per_image)
    enc.images = [0, 1]
    batch = pipe._pad([enc], visual)
    features = pipe.encode_images(visual)  # [2T, d]
    assert features.shape[0] == int(batch.image_mask.sum())

    cache = pipe._new_cache(1, batch.ids.shape[1] + 4)
    extra = pipe._extra_inputs(batch, [spec])
    fetched = {"clva.zpos": None}
    logits = pipe.prefill(batch, features, cache, extra, fetch=fetched)
    r = ref.forward(torch.tensor(batch.ids), torch.tensor(visual.feeds["pixel_values"]),
                    torch.tensor(batch.attention_mask), clva=clva, sevi=sevi)
    assert np.abs(logits - r.logits[:, -1].numpy()).max() <= ATOL
    assert np.array_equal(fetched["clva.zpos"], r.debug["clva"]["zpos"].numpy())
    (a0, z0), (a1, z1) = batch.spans[0]
    assert fetched["clva.zpos"][0, a0:z0].any() or fetched["clva.zpos"][0, a1:z1].any()  # anchors live in V
    mask, last = batch.attention_mask, batch.attention_mask.sum(-1) - 1
    for _ in range(3):
        tok = r.logits[:, -1].argmax(-1)
        mask = np.concatenate([mask, np.ones((1, 1), np.int64)], 1)
        last = last + 1
        logits = pipe.decode_one_token(tok.numpy().astype(np.int64), mask, last, cache, extra)
        r = ref.forward(tok[:, None], None, torch.tensor(mask), cache=r.cache, clva=clva, sevi=sevi)
        assert np.abs(logits - r.logits[:, -1].numpy()).max() <= ATOL


def test_iava_sets_run_over_both_images(baked, interleave_model, images):
    from anchorrt.exporter.reference.iava import ReferenceIava

    pipe = Pipeline.from_dir(baked[0])
    t = pipe.manifest.tokens["tokens_per_image"]
    template = two_image_template(pipe.manifest.prompt["template"])
    got = pipe.generate([images[0], images[1]], PROMPTS[1], max_new_tokens=8, mitigation={"iava": {"i": 6}})
    want = ReferenceIava(interleave_model).generate([images[0], images[1]], PROMPTS[1], template, i=6,
                                                    max_new_tokens=8)
    assert len(got.details["iava"]["att_query"]) == 2 * t  # V is both spans
    assert got.details["iava"]["irrelevant"] == want.irrelevant
    np.testing.assert_allclose(got.details["iava"]["att_query"], want.att_query.numpy(), atol=1e-6)
    assert got.token_ids == want.tokens


def test_visalign_mean_covers_every_image():
    """v_bar of a row is the mean over all of its image positions, whichever image they belong to."""
    from anchorrt.runtime.visalign import visual_mean

    rng = np.random.default_rng(0)
    features = rng.normal(size=(3 * 4, 8)).astype(np.float32)  # row 0: images 0 and 1; row 1: image 2 (T = 4)
    mask = np.zeros((2, 12), bool)
    mask[0, 1:9] = True
    mask[1, 5:9] = True
    v_bar = visual_mean(features, mask)
    np.testing.assert_allclose(v_bar[0], features[:8].mean(0), rtol=1e-6)
    np.testing.assert_allclose(v_bar[1], features[8:].mean(0), rtol=1e-6)


def test_one_image_artifact_refuses_several(tiny_artifact, images):
    """A chat template that cannot take two images (none recorded) gets one line, before any image is decoded."""
    from anchorrt.runtime.errors import PromptError

    pipe = Pipeline.from_dir(tiny_artifact)
    if pipe.prompts.image_separator is not None:
        pipe.prompts.image_separator = None  # as an artifact exported before several images were supported
    with pytest.raises(PromptError, match="takes exactly one image, got 2"):
        pipe.generate([images[0], "/nonexistent.png"], PROMPTS[0], max_new_tokens=2)


def test_cli_one_prompt_with_two_images(interleave_artifact, images, tmp_path):
    from tests.conftest import run_cli

    paths = []
    for i in (0, 1):
        paths += ["--image", str(tmp_path / f"{i}.png")]
        images[i].convert("RGB").save(paths[-1])
    run = run_cli("generate", str(interleave_artifact), *paths, "--prompt", PROMPTS[0], "--one-prompt", "--json",
                  "--max-new-tokens", "5", block_torch=True)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 1
    pipe = Pipeline.from_dir(interleave_artifact)
    want = pipe.generate([tmp_path / "0.png", tmp_path / "1.png"], PROMPTS[0], max_new_tokens=5)
    assert json.loads(lines[0])["token_ids"] == want.token_ids
    assert json.loads(lines[0])["prompt_tokens"] == want.prompt_tokens > 2 * pipe.manifest.tokens["tokens_per_image"]
    bad = run_cli("generate", str(interleave_artifact), *paths, "--prompt", "a", "--prompt", "b", "--one-prompt",
                  block_torch=True)
    assert bad.returncode == 2 and "--one-prompt puts every --image into one prompt" in bad.stderr


def test_visalign_over_two_images_matches_the_reference(interleave_model, interleave_artifact, images, tmp_path):
    """A random VisAlign fusion baked (torch-free pass) onto the Qwen2 + SigLIP artifact; one prompt with two images:
    v_bar is the mean over both images' tokens, in the runtime and in the reference (exporter/visalign/reference.py)."""
    from anchorrt.exporter.visalign.checkpoint import write_entry
    from anchorrt.exporter.visalign.reference import VisAlignLlava
    from anchorrt.graph_passes.visalign import WEIGHTS_FILE, bake_visalign
    from anchorrt.runtime.manifest import MANIFEST_NAME, write_manifest
    from anchorrt.runtime.visalign import visalign_state

    from tests.test_visalign import random_fusion

    model_dir, art = tmp_path / "model", tmp_path / "art"
    shutil.copytree(interleave_model, model_dir)
    shutil.copytree(interleave_artifact, art)
    random_fusion(64).save(model_dir / WEIGHTS_FILE)
    write_entry(model_dir, 64, "identity")
    manifest = json.loads((art / MANIFEST_NAME).read_text())
    assert bake_visalign(art, manifest, str(model_dir / WEIGHTS_FILE)) == 1
    write_manifest(art, manifest)
    pipe = Pipeline.from_dir(art)
    visual = pipe.preprocess_images([pipe._load(images[0], 0), pipe._load(images[1], 1)])
    enc = pipe.prompts.encode(PROMPTS[0], 2, tokens_per_image=visual.tokens_per_image)
    enc.images = [0, 1]
    batch = pipe._pad([enc], visual)
    feats = pipe.encode_images(visual)
    cache = pipe._new_cache(1, batch.ids.shape[1] + 4)
    state = visalign_state(pipe.visalign, [{"visalign": True}], feats, batch.image_mask)
    np.testing.assert_allclose(state.v_bar[0], feats.mean(0), rtol=1e-5, atol=1e-6)  # both images' tokens
    got = [pipe.prefill(batch, feats, cache, {}, state)]
    ref = VisAlignLlava.from_pretrained(model_dir)
    ids, mask = torch.from_numpy(batch.ids), torch.from_numpy(batch.attention_mask)
    from transformers import DynamicCache

    with torch.no_grad():
        out = ref(ids, mask, pixel_values=torch.from_numpy(visual.feeds["pixel_values"]), enable=True,
                  past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
        want = [out.logits[:, -1].numpy()]
        last, amask = batch.attention_mask.sum(-1) - 1, batch.attention_mask
        for _ in range(3):
            token = out.logits[:, -1].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = ref(token[:, None], mask, v_bar=out.v_bar, enable=True, past_key_values=out.past_key_values,
                      use_cache=True, logits_to_keep=1)
            want.append(out.logits[:, -1].numpy())
            amask = np.concatenate([amask, np.ones((1, 1), np.int64)], 1)
            last = last + 1
            got.append(pipe.decode_one_token(token.numpy().astype(np.int64), amask, last, cache, {}, state))
    assert max(float(np.abs(a - b).max()) for a, b in zip(got, want)) <= ATOL


@pytest.mark.slow
def test_pad_token_regression_on_a_clip_llama_llava(tmp_path):
    """Issue 13 item 9 without SigLIP: a LLaVA-1.5 checkpoint whose config has no pad_token_id and whose tokenizer
    pads with <pad> (not EOS). On main the manifest padded with EOS and verify failed with exit 3."""
    from anchorrt.exporter.export import export_model
    from anchorrt.exporter.testing import TinyLlavaSpec, build_tiny_llava
    from anchorrt.exporter.verify import verify

    model = build_tiny_llava(tmp_path / "m", TinyLlavaSpec(layers=2, seed=4))
    for name, keys in (("config.json", ("pad_token_id",)), ("generation_config.json", ("pad_token_id",))):
        data = json.loads((model / name).read_text())
        for k in keys:
            data.pop(k, None)
            if isinstance(data.get("text_config"), dict):
                data["text_config"].pop(k, None)
        (model / name).write_text(json.dumps(data))
    export_model(model, tmp_path / "art")
    tokens = json.loads((tmp_path / "art" / "manifest.json").read_text())["tokens"]
    assert tokens["pad_token_id"] != tokens["eos_token_ids"][0]
    report = verify(model, tmp_path / "art", prompts=PROMPTS)
    assert report.ok, report.summary()
